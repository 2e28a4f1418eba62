"""Permutation alignment of hidden units: weight matching (Git Re-Basin).

Two networks trained from different seeds compute the same kind of function with
their hidden units in a different order. Permuting model B's units to match model
A's changes nothing about what B computes, but brings the two much closer in
parameter space, so that the straight line between them crosses a far lower loss
barrier (Ainsworth, Hayase & Srinivasa, *Git Re-Basin*, ICLR 2023; Entezari et al.
2022).

:func:`weight_matching` finds the permutation by coordinate descent: each step
re-solves one layer's permutation as a linear assignment problem that maximises
``Σ ⟨W_a, P W_b⟩`` over every tensor that permutation touches, the others held
fixed. Which axes of which tensors a permutation touches is a
:class:`PermutationSpec`, derived automatically with ``torch.fx`` for sequential
MLPs and CNNs, BatchNorm/LayerNorm/GroupNorm layers, residual blocks and
``nn.TransformerEncoder`` stacks, or given explicitly for anything else.

Which architectures align by themselves (what the tests check):

- MLPs and 1-, 2- and 3-d CNNs (``Linear``, ``Conv``, elementwise activations,
  dropout, max/average/adaptive pooling, ``flatten``): the units (channels) of every
  hidden layer.
- BatchNorm, LayerNorm, and GroupNorm with one group per channel: their parameters
  and running statistics move with the units they normalise. GroupNorm
  with several channels per group and grouped convolutions keep those channels in
  order; depthwise convolutions follow their input.
- Residual blocks, and torchvision's ``resnet18`` / ``resnet50`` module structure
  (``downsample`` branches, ``out += identity``, in-place ReLU, ``MaxPool2d``,
  ``AdaptiveAvgPool2d``, ``torch.flatten``): one permutation per residual stream
  (the stem's, which resnet18's ``layer1`` adds to, and each stage's) and one per
  inner layer of each block.
- ``nn.Embedding`` with ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``
  (post- or pre-norm, ReLU or GELU, padding masks): the residual stream (the
  embeddings, the attention's input and output projections, every LayerNorm, the
  head's inputs) and each layer's feed-forward units. Attention heads keep their
  order.
- Hugging Face ``transformers`` models (for BERT, torch.fx cannot trace
  ``bert.encoder.layer.0.attention.self``), ``nn.MultiheadAttention`` called
  directly, parameters used directly in ``forward``, data-dependent control flow and
  unknown layers: a ``ValueError`` naming the module, with the two ways forward, an
  explicit ``PermutationSpec`` or no alignment (``align=None``: the geodesic does not
  need it).

The network's inputs and outputs are never permuted, so the aligned copy computes
what model_b computes; the connectors check this on the fit data.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.utils import check_random_state
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from ._model_checks import check_model, check_same_architecture

__all__ = ["PermutationSpec", "weight_matching"]


class PermutationSpec:
    """Which axes of a network's tensors each permutation of hidden units acts on.

    A network's hidden units can be reordered without changing its function when
    every tensor axis indexed by those units is reordered alike: the rows of the
    layer producing them (weight, bias, the next BatchNorm's parameters and running
    statistics) and the columns of the layer consuming them. Units joined by a
    residual addition share one permutation.

    Parameters
    ----------
    axes : mapping of str to sequence of (str or None)
        For each parameter or buffer name (as in ``named_parameters()`` /
        ``named_buffers()``), one entry per axis of the tensor: the name of the
        permutation acting on that axis, or None. Names left out are not permuted.
        An axis ``k`` times longer than its permutation holds ``k`` consecutive
        entries per unit — the layout of ``flatten`` applied to a
        ``(channels, *spatial)`` feature map — and is permuted block by block.

    Attributes
    ----------
    axes : dict of str to tuple of (str or None)
        The specification.
    perm_to_axes : dict of str to list of (str, int)
        For each permutation, the ``(tensor name, axis)`` pairs it acts on.

    See Also
    --------
    weight_matching : align one network's units to another's.

    Examples
    --------
    A 4-8-3 MLP has one permutable layer of 8 hidden units:

    >>> import torch
    >>> from geoconnect.align import PermutationSpec
    >>> mlp = torch.nn.Sequential(
    ...     torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ... )
    >>> spec = PermutationSpec.from_model(mlp)
    >>> spec.axes
    {'0.weight': ('0', None), '0.bias': ('0',), '2.weight': (None, '0'), '2.bias': (None,)}

    The same structure written by hand (tensors left out are not permuted):

    >>> hand = PermutationSpec(
    ...     {"0.weight": ("h", None), "0.bias": ("h",), "2.weight": (None, "h")}
    ... )
    >>> hand.perm_to_axes
    {'h': [('0.weight', 0), ('0.bias', 0), ('2.weight', 1)]}
    """

    def __init__(self, axes: Mapping[str, Sequence[str | None]]):
        if not isinstance(axes, Mapping):
            raise TypeError(
                "axes must be a mapping from tensor name to one permutation name (or "
                f"None) per axis, e.g. {{'0.weight': ('h', None)}}; got {type(axes).__name__}."
            )
        checked: dict[str, tuple[str | None, ...]] = {}
        for name, entry in axes.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names in axes must be strings; got {name!r}.")
            if isinstance(entry, str) or not isinstance(entry, Sequence):
                raise TypeError(
                    f"axes[{name!r}] must be a sequence with one permutation name or None "
                    f"per axis of the tensor, e.g. ('h', None); got {entry!r}."
                )
            for perm in entry:
                if perm is not None and not isinstance(perm, str):
                    raise TypeError(
                        f"axes[{name!r}] must hold permutation names (str) or None; got {perm!r}."
                    )
            checked[name] = tuple(entry)
        self.axes = checked

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for name, entry in self.axes.items():
            for axis, perm in enumerate(entry):
                if perm is not None:
                    out.setdefault(perm, []).append((name, axis))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermutationSpec) and self.axes == other.axes

    def __repr__(self) -> str:
        sizes = {p: len(v) for p, v in self.perm_to_axes.items()}
        return f"PermutationSpec({len(sizes)} permutations over {len(self.axes)} tensors)"

    # -- derivation ---------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module) -> PermutationSpec:
        """Derive the specification of ``model`` by tracing it with ``torch.fx``.

        Supported: ``Linear`` and ``Conv1d/2d/3d`` layers (and transposed
        convolutions), BatchNorm, InstanceNorm, LayerNorm and GroupNorm, elementwise
        activations, dropout, pooling, ``flatten`` / ``view(n, -1)`` / spatial means,
        residual additions (which tie the permutations they add), ``Embedding``, and
        ``TransformerEncoder`` / ``TransformerEncoderLayer`` (the residual stream and
        the feed-forward units; attention heads keep their order). The network's
        inputs and outputs are never permuted. Linear layers are taken to act on
        ``(batch, features)`` inputs, transformer layers on batched sequences.
        GroupNorm with ``1 < num_groups < num_channels`` and grouped convolutions
        keep their channels in place.

        Parameters
        ----------
        model : nn.Module
            The network; not modified.

        Returns
        -------
        PermutationSpec

        Raises
        ------
        ValueError
            If the network cannot be traced, or uses a layer or operation whose
            effect on the units is not known; the message names it (for a network
            torch.fx cannot trace, the first submodule on the way that does not trace
            on its own). Pass an explicit ``PermutationSpec`` for such networks, or
            connect them without alignment.

        Examples
        --------
        >>> import torch
        >>> from geoconnect.align import PermutationSpec
        >>> from geoconnect.models import make_cnn
        >>> spec = PermutationSpec.from_model(make_cnn(width=4))
        >>> spec.axes["1.running_mean"], spec.axes["4.weight"], spec.axes["9.weight"]
        (('0',), ('4', '0', None, None), (None, '4'))
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        return _derive_spec(model)

    # -- use ---------------------------------------------------------------------------

    def sizes(self, model: nn.Module) -> dict[str, int]:
        """Check the specification against ``model``; return each permutation's size.

        Parameters
        ----------
        model : nn.Module

        Returns
        -------
        dict of str to int
            The number of units each permutation reorders.

        Raises
        ------
        ValueError
            If a name is not a parameter or buffer of ``model``, an entry has the
            wrong number of axes, or the axes of one permutation disagree in size.

        Examples
        --------
        >>> import torch
        >>> from geoconnect.align import PermutationSpec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> PermutationSpec.from_model(mlp).sizes(mlp)
        {'0': 8}
        """
        tensors = _named_tensors(model)
        lengths: dict[str, list[tuple[str, int, int]]] = {}
        for name, entry in self.axes.items():
            if name not in tensors:
                raise ValueError(
                    f"The permutation spec names {name!r}, which is not a parameter or "
                    f"buffer of {type(model).__name__}. Use names from named_parameters() "
                    "and named_buffers()."
                )
            tensor = tensors[name]
            if len(entry) != tensor.ndim:
                raise ValueError(
                    f"The permutation spec gives {len(entry)} axes for {name!r}, which has "
                    f"{tensor.ndim} (shape {tuple(tensor.shape)}); give one permutation "
                    "name or None per axis."
                )
            for axis, perm in enumerate(entry):
                if perm is not None:
                    lengths.setdefault(perm, []).append((name, axis, int(tensor.shape[axis])))
        sizes = {}
        for perm, uses in lengths.items():
            n = min(length for _, _, length in uses)
            for name, axis, length in uses:
                if n == 0 or length % n:
                    raise ValueError(
                        f"Permutation {perm!r} acts on axes of different sizes: axis {axis} "
                        f"of {name!r} has {length} entries, not a multiple of {n}."
                    )
            sizes[perm] = n
        return sizes

    def apply(self, model: nn.Module, permutation: Mapping[str, object]) -> nn.Module:
        """A copy of ``model`` with its units reordered by ``permutation``.

        Unit ``i`` of the result is unit ``permutation[p][i]`` of ``model``. The
        copy computes the same function as ``model`` (for a correct specification).

        Parameters
        ----------
        model : nn.Module
            Not modified.
        permutation : mapping of str to array-like of int
            For each permutation of the specification, a permutation of
            ``range(size)``; permutations left out are the identity.

        Returns
        -------
        nn.Module

        Examples
        --------
        >>> import torch
        >>> from geoconnect.align import PermutationSpec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> spec = PermutationSpec.from_model(mlp)
        >>> swapped = spec.apply(mlp, {"0": [2, 0, 1]})
        >>> torch.equal(swapped[0].weight[0], mlp[0].weight[2])
        True
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(swapped(x), mlp(x), atol=1e-6)
        True
        """
        sizes = self.sizes(model)
        perms: dict[str, Tensor] = {}
        for perm, value in permutation.items():
            if perm not in sizes:
                raise ValueError(
                    f"permutation has an entry {perm!r}, which is not a permutation of the "
                    f"spec; its permutations are {sorted(sizes)}."
                )
            index = torch.as_tensor(np.asarray(value), dtype=torch.long)
            if index.ndim != 1 or not torch.equal(
                torch.sort(index).values, torch.arange(sizes[perm])
            ):
                raise ValueError(
                    f"permutation[{perm!r}] must be a permutation of range({sizes[perm]})."
                )
            perms[perm] = index
        result = copy.deepcopy(model)
        tensors = _named_tensors(result)
        with torch.no_grad():
            for name, entry in self.axes.items():
                if any(p in perms for p in entry):
                    tensor = tensors[name]
                    tensor.copy_(_permute(tensor, entry, perms, sizes))
        return result


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _block_index(perm: Tensor, length: int, n: int) -> Tensor:
    """Index reordering an axis of ``length`` = k·n entries, k consecutive per unit."""
    k = length // n
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)).reshape(-1)


def _permute(
    tensor: Tensor,
    entry: Sequence[str | None],
    perms: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    except_axis: int | None = None,
) -> Tensor:
    out = tensor
    for axis, perm in enumerate(entry):
        if perm is None or axis == except_axis or perm not in perms:
            continue
        index = _block_index(perms[perm], tensor.shape[axis], sizes[perm])
        out = out.index_select(axis, index.to(tensor.device))
    return out


# -- weight matching ---------------------------------------------------------------------


def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    random_state: int | np.random.RandomState | None = None,
    return_permutations: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, Tensor]]:
    """Permute ``model_b``'s hidden units to match ``model_a``'s weights.

    Weight matching (Ainsworth et al., *Git Re-Basin*, 2023): coordinate descent
    over the permutations, each step maximising ``Σ ⟨W_a, P(W_b)⟩`` — summed over
    every parameter the permutation acts on, with the other permutations held fixed —
    as a linear assignment problem (``scipy.optimize.linear_sum_assignment``). It
    stops when a sweep over all permutations improves nothing, or after
    ``max_iter`` sweeps. The result computes the same function as ``model_b``
    (BatchNorm running statistics are permuted with the units), and is much closer
    to ``model_a`` in parameter space.

    Parameters
    ----------
    model_a : nn.Module
        The reference network. Not modified.
    model_b : nn.Module
        The network to permute, of the same architecture. Not modified.
    spec : PermutationSpec, optional
        Which axes each permutation acts on; default
        ``PermutationSpec.from_model(model_a)``, derived with ``torch.fx``.
    max_iter : int, default=100
        Maximum number of sweeps over the permutations.
    random_state : int, RandomState instance or None, default=None
        Seeds the order in which each sweep visits the permutations.
    return_permutations : bool, default=False
        Also return the permutations found, by group name (``spec.apply(model_b,
        permutations)`` is the result).

    Returns
    -------
    nn.Module
        A permuted copy of ``model_b``.
    permutations : dict of str to Tensor
        Only with ``return_permutations=True``: each group's permutation, int64.

    Raises
    ------
    ValueError
        If the permutation structure cannot be derived (the message names the
        module or operation; pass ``spec``), or the models differ in architecture.

    See Also
    --------
    PermutationSpec : the permutation structure, derived or explicit.

    References
    ----------
    S. K. Ainsworth, J. Hayase, S. Srinivasa. "Git Re-Basin: Merging Models modulo
    Permutation Symmetries". ICLR 2023.

    Examples
    --------
    A network and a copy with its hidden units shuffled are recovered exactly:

    >>> import torch
    >>> from geoconnect.align import PermutationSpec, weight_matching
    >>> from geoconnect.models import make_mlp
    >>> a = make_mlp((4, 16, 16, 3), seed=0)
    >>> spec = PermutationSpec.from_model(a)
    >>> b = spec.apply(a, {"0": torch.randperm(16), "2": torch.randperm(16)})
    >>> aligned = weight_matching(a, b, random_state=0)
    >>> all(torch.equal(p, q) for p, q in zip(aligned.parameters(), a.parameters()))
    True
    >>> x = torch.randn(8, 4)
    >>> torch.allclose(aligned(x), b(x), atol=1e-6)
    True
    """
    model_a = check_model(model_a, "model_a", "weight_matching")
    model_b = check_model(model_b, "model_b", "weight_matching")
    check_same_architecture(model_a, model_b)
    if spec is None:
        spec = PermutationSpec.from_model(model_a)
    elif not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"spec must be a PermutationSpec or None; got {type(spec).__name__}. Wrap a "
            "mapping of tensor names to axes as PermutationSpec({...})."
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an int in the range [1, inf); got {max_iter!r}.")
    rng = check_random_state(random_state)
    sizes = spec.sizes(model_a)
    params_a = {k: v.detach().cpu().double() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach().cpu().double() for k, v in model_b.named_parameters()}
    # Only parameters enter the objective; running statistics just follow the units.
    uses = {
        perm: [(name, axis) for name, axis in axes if name in params_a]
        for perm, axes in spec.perm_to_axes.items()
    }
    names = sorted(uses)
    perms = {p: torch.arange(sizes[p]) for p in names}
    for _ in range(max_iter):
        improved = False
        for p in rng.permutation(len(names)):
            perm = names[p]
            n = sizes[perm]
            score = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in uses[perm]:
                w_a = params_a[name].movedim(axis, 0).reshape(n, -1)
                w_b = _permute(params_b[name], spec.axes[name], perms, sizes, except_axis=axis)
                score += w_a @ w_b.movedim(axis, 0).reshape(n, -1).T
            _, col = linear_sum_assignment(score.numpy(), maximize=True)
            rows = torch.arange(n)
            old = float(score[rows, perms[perm]].sum())
            new = float(score[rows, torch.as_tensor(col)].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[perm] = torch.as_tensor(col, dtype=torch.long)
                improved = True
        if not improved:
            break
    aligned = spec.apply(model_b, perms)
    return (aligned, perms) if return_permutations else aligned


# -- derivation by tracing ---------------------------------------------------------------

_FIXED = 0  # the union-find class of axes that are never permuted

_PASS_THROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.Upsample,
)

_PASS_THROUGH_FUNCTIONS = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.exp,
    operator.neg,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.leaky_relu,
    F.mish,
    F.softplus,
    F.hardswish,
    F.hardtanh,
    F.sigmoid,
    F.tanh,
    F.softmax,
    F.log_softmax,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.interpolate,
}

_PASS_THROUGH_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "abs",
    "neg",
    "clamp",
    "exp",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
}

_ELEMENTWISE_BINARY = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


@dataclass
class _Features:
    """What is known about one traced tensor: the union-find class of its units."""

    group: int
    kind: str  # "flat": units on the last axis of (batch, units); "channels": axis 1
    ndim: int | None


class _Derivation:
    def __init__(self, model: nn.Module):
        self.model = model
        self.parent = [_FIXED]
        self.names: list[str | None] = [None]
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.canonical = {id(t): name for name, t in tensors.items()}
        self.axes: dict[str, list[int | None]] = {
            name: [None] * t.ndim for name, t in tensors.items()
        }

    # union-find over permutation classes; the FIXED class absorbs whatever joins it
    def new(self, name: str) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return ri
        root, child = (ri, rj) if ri < rj else (rj, ri)  # FIXED (0) and older win
        self.parent[child] = root
        return root

    def fixed(self, i: int) -> bool:
        return self.find(i) == _FIXED

    def assign(self, module_name: str, tensor: Tensor | None, axis: int, group: int) -> None:
        if tensor is None:
            return
        name = self.canonical[id(tensor)]
        current = self.axes[name][axis]
        self.axes[name][axis] = group if current is None else self.union(current, group)

    def spec(self) -> PermutationSpec:
        out = {}
        for name, entry in self.axes.items():
            resolved = []
            for group in entry:
                if group is None or self.fixed(group):
                    resolved.append(None)
                else:
                    resolved.append(self.names[self.find(group)])
            out[name] = tuple(resolved)
        return PermutationSpec(out)


class _CannotDerive(ValueError):
    pass


# Every derivation error ends with the two ways forward.
_WAYS_FORWARD = (
    "Pass an explicit spec=PermutationSpec({tensor name: (permutation name or None "
    "per axis), ...}) for this network, or connect the models without alignment: "
    "the geodesic does not need it (fit with align=None)."
)


def _cannot(where: str, why: str) -> _CannotDerive:
    return _CannotDerive(
        f"Cannot derive the permutation structure at {where}: {why}. {_WAYS_FORWARD}"
    )


def _trace_error(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _untraceable_submodule(model: nn.Module) -> tuple[str, nn.Module, Exception] | None:
    """The deepest submodule on the way to the first that ``torch.fx`` cannot trace.

    Descends from ``model`` (which failed to trace) into its first child that also
    fails on its own, skipping the modules the tracer keeps whole (``torch.nn``'s
    own layers); None when every child traces, so ``model``'s own forward is at fault.
    """
    tracer = fx.Tracer()
    found = None
    prefix, module = "", model
    while True:
        for qualified, child in _callable_children(module, prefix):
            if tracer.is_leaf_module(child, qualified):
                continue
            try:
                fx.symbolic_trace(child)
            except Exception as exc:  # any failure to trace
                found = (qualified, child, exc)
                prefix, module = qualified, child
                break
        else:
            return found


def _callable_children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """``module``'s children by qualified name, with ModuleLists and ModuleDicts opened."""
    out = []
    for name, child in module.named_children():
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_callable_children(child, qualified))
        else:
            out.append((qualified, child))
    return out


def _derive_spec(model: nn.Module) -> PermutationSpec:
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:
        culprit = _untraceable_submodule(model)
        if culprit is None:
            where = f"its forward ({_trace_error(exc)})"
        else:
            name, module, inner = culprit
            where = f"its submodule {name!r} ({type(module).__name__}; {_trace_error(inner)})"
        raise ValueError(
            f"Cannot derive the permutation structure of {type(model).__name__}: torch.fx "
            f"cannot trace {where}. {_WAYS_FORWARD}"
        ) from None
    state = _Derivation(model)
    values: dict[fx.Node, object] = {}
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            values[node] = _Features(_FIXED, "flat", None)
        elif node.op == "get_attr":
            values[node] = _cannot(
                f"{node.target!r}",
                "a parameter or buffer is used directly in forward rather than through a submodule",
            )
        elif node.op == "call_module":
            values[node] = _module_rule(state, node, modules[node.target], values)
        elif node.op in ("call_function", "call_method"):
            values[node] = _function_rule(state, node, values)
        elif node.op == "output":
            for arg in _flat_args(node.args):
                value = values.get(arg) if isinstance(arg, fx.Node) else None
                if isinstance(value, _CannotDerive):
                    raise value
                if isinstance(value, _Features):
                    state.union(value.group, _FIXED)
    return state.spec()


def _flat_args(args: object) -> list[object]:
    out: list[object] = []
    if isinstance(args, (tuple, list)):
        for a in args:
            out.extend(_flat_args(a))
    elif isinstance(args, dict):
        for a in args.values():
            out.extend(_flat_args(a))
    else:
        out.append(args)
    return out


def _inputs(node: fx.Node, values: Mapping[fx.Node, object]) -> list[_Features]:
    """The traced tensors ``node`` consumes; raises an unresolved error it consumes."""
    found = []
    for arg in _flat_args((node.args, node.kwargs)):
        if isinstance(arg, fx.Node):
            value = values[arg]
            if isinstance(value, _CannotDerive):
                raise value
            if isinstance(value, _Features):
                found.append(value)
    return found


def _module_rule(
    state: _Derivation, node: fx.Node, module: nn.Module, values: Mapping[fx.Node, object]
) -> object:
    name = str(node.target)
    where = f"module {name!r} ({type(module).__name__})"
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
        return _transformer_rule(state, node, module, values, where)
    inputs = _inputs(node, values)
    if isinstance(module, nn.Embedding):
        if not all(state.fixed(x.group) for x in inputs):
            return _cannot(where, "it looks up indices computed from permuted units")
        g = state.new(name)
        state.assign(name, module.weight, 1, g)
        ndim = inputs[0].ndim + 1 if inputs and inputs[0].ndim is not None else None
        return _Features(g, "flat", ndim)
    if len(inputs) != 1:
        return _unknown(state, inputs, where, "it takes several tensors")
    x = inputs[0]
    if isinstance(module, nn.Linear):
        if x.kind == "channels" and not state.fixed(x.group):
            raise _cannot(where, "a Linear layer is applied to a channels-first feature map")
        g = state.new(name)
        state.assign(name, module.weight, 0, g)
        state.assign(name, module.weight, 1, x.group)
        state.assign(name, module.bias, 0, g)
        return _Features(g, "flat", x.ndim)
    if isinstance(module, _ConvNd):
        if x.kind == "flat" and not state.fixed(x.group):
            raise _cannot(where, "a convolution is applied to the output of a Linear layer")
        ndim = len(module.kernel_size) + 2
        transposed = bool(module.transposed)
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        if module.groups == 1:
            g = state.new(name)
            state.assign(name, module.weight, out_axis, g)
            state.assign(name, module.weight, in_axis, x.group)
        elif not transposed and module.groups == module.in_channels == module.out_channels:
            g = x.group  # depthwise: each channel is filtered on its own
            state.assign(name, module.weight, 0, g)
        else:
            state.union(x.group, _FIXED)  # grouped: keep channels in place
            g = _FIXED
        state.assign(name, module.bias, 0, g)
        return _Features(g, "channels", ndim)
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.ndim == 1:
                state.assign(name, tensor, 0, x.group)
        return x
    if isinstance(module, nn.LayerNorm):
        n_norm = len(module.normalized_shape)
        if x.kind == "flat":
            axis = n_norm - 1  # the units are the last axis
        elif x.ndim is not None and n_norm == x.ndim - 1:
            axis = 0  # normalises over channels and space
        elif x.ndim is not None and n_norm < x.ndim - 1:
            axis = None  # normalises over space only
        elif state.fixed(x.group):
            axis = None
        else:
            raise _cannot(where, "the layout of its input is unknown")
        if axis is not None:
            for tensor in module.parameters(recurse=False):
                state.assign(name, tensor, axis, x.group)
        return x
    if isinstance(module, nn.GroupNorm):
        if module.num_groups in (1, module.num_channels):
            for tensor in module.parameters(recurse=False):
                state.assign(name, tensor, 0, x.group)
        else:
            state.union(x.group, _FIXED)  # permuting across groups would change them
        return x
    if isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            state.assign(name, module.weight, 0, x.group)
        return x
    if isinstance(module, _PASS_THROUGH_MODULES):
        return x
    if isinstance(module, nn.Flatten):
        return _flatten(state, x, module.start_dim, module.end_dim, where)
    return _unknown(state, inputs, where, "its effect on the units is not known")


def _transformer_rule(
    state: _Derivation,
    node: fx.Node,
    module: nn.TransformerEncoder | nn.TransformerEncoderLayer,
    values: Mapping[fx.Node, object],
    where: str,
) -> object:
    """``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``, which fx keeps whole.

    The residual stream keeps the permutation of the layer's input (every layer adds
    to it, and LayerNorm normalises over it, so one permutation runs through them
    all); each layer's feed-forward hidden units get their own. Attention heads, and
    the dimensions within a head, keep their order.
    """
    kwargs = dict(node.kwargs)
    src = node.args[0] if node.args else kwargs.pop("src", None)
    x = values.get(src) if isinstance(src, fx.Node) else None
    if isinstance(x, _CannotDerive):
        return x
    if not isinstance(x, _Features):
        return _cannot(where, "its input is not a traced tensor")
    for arg in _flat_args((node.args[1:], kwargs)):  # the masks
        mask = values.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(mask, _CannotDerive):
            return mask
        if isinstance(mask, _Features) and not state.fixed(mask.group):
            return _cannot(where, "its mask is computed from permuted units")
    if x.kind == "channels" and not state.fixed(x.group):
        return _cannot(where, "it is applied to a channels-first feature map")
    name = str(node.target)
    if isinstance(module, nn.TransformerEncoder):
        layers = [(f"{name}.layers.{i}", layer) for i, layer in enumerate(module.layers)]
        norms = [(f"{name}.norm", module.norm)] if module.norm is not None else []
    else:
        layers, norms = [(name, module)], []
    for layer_name, layer in layers:  # check them all before assigning any axis
        layer_where = f"module {layer_name!r} ({type(layer).__name__})"
        # A subclass may compute something else with the same submodules.
        if type(layer) is not nn.TransformerEncoderLayer:
            return _cannot(layer_where, "its effect on the units is not known")
        activation = layer.activation
        if not (
            isinstance(activation, _PASS_THROUGH_MODULES) or activation in _PASS_THROUGH_FUNCTIONS
        ):
            return _cannot(layer_where, f"its activation {activation!r} is not elementwise")
        if not layer.self_attn._qkv_same_embed_dim or layer.self_attn.in_proj_weight is None:
            return _cannot(layer_where, "its attention projects queries, keys and values apart")
        norms += [(f"{layer_name}.norm1", layer.norm1), (f"{layer_name}.norm2", layer.norm2)]
    for norm_name, norm in norms:
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            return _cannot(
                f"module {norm_name!r} ({type(norm).__name__})",
                "it is not a LayerNorm over the features",
            )
    stream = x.group
    for layer_name, layer in layers:
        attn = layer.self_attn
        state.assign(layer_name, attn.in_proj_weight, 1, stream)
        state.assign(layer_name, attn.out_proj.weight, 0, stream)
        state.assign(layer_name, attn.out_proj.bias, 0, stream)
        hidden = state.new(f"{layer_name}.linear1")
        state.assign(layer_name, layer.linear1.weight, 0, hidden)
        state.assign(layer_name, layer.linear1.weight, 1, stream)
        state.assign(layer_name, layer.linear1.bias, 0, hidden)
        state.assign(layer_name, layer.linear2.weight, 0, stream)
        state.assign(layer_name, layer.linear2.weight, 1, hidden)
        state.assign(layer_name, layer.linear2.bias, 0, stream)
    for norm_name, norm in norms:
        for tensor in norm.parameters(recurse=False):
            state.assign(norm_name, tensor, 0, stream)
    # Taken to act on batched input: (batch, sequence, features) or (sequence, batch, features).
    return _Features(stream, "flat", x.ndim if x.ndim is not None else 3)


def _unknown(state: _Derivation, inputs: list[_Features], where: str, why: str) -> object:
    """An unknown operation is harmless on tensors whose units are never permuted."""
    if all(state.fixed(x.group) for x in inputs):
        return _Features(_FIXED, "flat", None)
    return _cannot(where, why)


def _flatten(
    state: _Derivation, x: _Features, start: int, end: int, where: str
) -> _Features | _CannotDerive:
    if state.fixed(x.group):
        return _Features(_FIXED, "flat", None)
    if x.kind == "channels" and start == 1 and end == -1:
        return _Features(x.group, "flat", 2)  # (c, *spatial) → c-major blocks
    if x.kind == "flat" and x.ndim in (None, 2) and start in (1, -1) and end == -1:
        return x
    return _cannot(where, f"flatten(start_dim={start}, end_dim={end}) mixes the units")


def _function_rule(state: _Derivation, node: fx.Node, values: Mapping[fx.Node, object]) -> object:
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    where = f"operation {label!r} (node {node.name!r})"
    if node.op == "call_method" and target in ("size", "dim"):
        return None
    if node.op == "call_function" and target is getattr:
        return None  # x.shape and the like
    if node.op == "call_function" and target is operator.getitem:
        source = values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if isinstance(source, _CannotDerive):
            return source  # an element of an output we could not follow
        if not isinstance(source, _Features):
            return None  # indexing a shape
    try:
        inputs = _inputs(node, values)
    except _CannotDerive as exc:
        return exc
    if not inputs:
        return None
    if all(state.fixed(x.group) for x in inputs):
        return _Features(_FIXED, "flat", None)
    first = inputs[0]
    is_method = node.op == "call_method"
    if (not is_method and target in _PASS_THROUGH_FUNCTIONS) or (
        is_method and target in _PASS_THROUGH_METHODS
    ):
        return first
    if (not is_method and target in _ELEMENTWISE_BINARY) or (
        is_method and target in _ELEMENTWISE_METHODS
    ):
        group = inputs[0].group
        for other in inputs[1:]:
            group = state.union(group, other.group)
        best = max(inputs, key=lambda x: (x.kind == "channels", x.ndim or 0))
        return _Features(group, best.kind, best.ndim)
    args = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if target in (torch.flatten, "flatten"):
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return _flatten(state, first, start, end, where)
    if (is_method and target in ("view", "reshape")) or target is torch.reshape:
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(shape) == 2 and (shape[1] == -1 or shape[0] == -1 or isinstance(shape[0], fx.Node)):
            return _flatten(state, first, 1, -1, where)
        return _cannot(where, "a reshape other than (batch, -1) mixes the units")
    reduction = target if is_method else getattr(target, "__name__", None)
    if reduction in _REDUCTIONS and (is_method or target in (torch.mean, torch.sum, torch.amax)):
        dims = kwargs.get("dim", args[0] if args else None)
        keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
        if dims is None or first.ndim is None:
            return _cannot(where, "a reduction over unknown axes")
        dims = {d % first.ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        unit_axis = 1 if first.kind == "channels" else first.ndim - 1
        if unit_axis in dims or 0 in dims:
            return _cannot(where, "a reduction over the units or the batch")
        if keepdim:
            return first
        ndim = first.ndim - len(dims)
        return _Features(first.group, "flat" if ndim == 2 else first.kind, ndim)
    if is_method and target == "squeeze" and first.kind == "channels":
        dims = kwargs.get("dim", args if args else None)
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None:
            return _Features(first.group, "flat", 2)  # after global pooling
        if first.ndim is not None:
            dims = {d % first.ndim for d in dims}
            if 1 not in dims and 0 not in dims:
                ndim = first.ndim - len(dims)
                return _Features(first.group, "flat" if ndim == 2 else "channels", ndim)
    if target in (torch.cat, torch.stack):
        dim = kwargs.get("dim", args[0] if args else 0)
        if dim == 0:
            group = inputs[0].group
            for other in inputs[1:]:
                group = state.union(group, other.group)
            return _Features(group, first.kind, first.ndim)
    return _cannot(where, "its effect on the units is not known")
