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
MLPs and CNNs, BatchNorm/LayerNorm/GroupNorm layers, residual blocks,
concatenations, ConvNeXt blocks, ViT patch embeddings and ``nn.TransformerEncoder``
stacks, or given explicitly for anything else.

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
- Concatenation along the channels (``torch.cat(..., 1)``): torchvision's DenseNet
  module structure (dense layers, dense blocks, transition layers) and SqueezeNet's
  ``Fire`` modules. The concatenated axis carries each part's own permutation, one
  segment after another (an axis entry of the spec that is a tuple of names). A
  concatenation with never-permuted units (the network's input) keeps all its
  parts in place.
- ConvNeXt blocks, as in the official code (depthwise 7×7, ``permute(0, 2, 3, 1)``,
  ``LayerNorm``, ``Linear``–GELU–``Linear``, ``self.gamma * x``, ``permute(0, 3, 1,
  2)``, drop path or ``nn.Identity``, residual add) and as torchvision's ``CNBlock``
  (a ``Permute`` module, ``layer_scale`` of shape ``(C, 1, 1)``, stochastic depth),
  with ``LayerNorm2d`` (``F.layer_norm`` between two permutes): ``permute`` /
  ``transpose`` move the units between the channels-first and channels-last axis,
  and a parameter or buffer used directly in ``forward`` in elementwise arithmetic
  moves with the units it is broadcast against (along the axis that meets them,
  unless that axis has size 1). Drop path is followed in eval mode, where it is the
  identity.
- A small ViT as timm writes it: ``Conv2d(kernel_size=stride=patch)``,
  ``flatten(2).transpose(1, 2)``, a class token ``expand``-ed and concatenated along
  the tokens, a learned position embedding added directly, an
  ``nn.TransformerEncoder``, ``LayerNorm``, a head on ``x[:, 0]``: the residual
  stream is the patch convolution's output channels.
- Hugging Face ``transformers`` models (for BERT, torch.fx cannot trace
  ``bert.encoder.layer.0.attention.self``), ``nn.MultiheadAttention`` called
  directly, parameters used directly other than elementwise (``x @ self.w``, or
  concatenated along the units), reductions over the units (the official
  ConvNeXt's channels-first LayerNorm written out with ``x.mean(1, keepdim=True)``),
  a concatenation added to units permuted as one, data-dependent control flow and
  unknown layers: a ``ValueError`` naming the module, operation or parameter, with
  the two ways forward, an explicit ``PermutationSpec`` or no alignment
  (``align=None``: the geodesic does not need it).

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
    axes : mapping of str to sequence of (str, tuple of str, or None)
        For each parameter or buffer name (as in ``named_parameters()`` /
        ``named_buffers()``), one entry per axis of the tensor: the name of the
        permutation acting on that axis, or None. Names left out are not permuted.
        An axis ``k`` times longer than its permutation holds ``k`` consecutive
        entries per unit — the layout of ``flatten`` applied to a
        ``(channels, *spatial)`` feature map — and is permuted block by block.
        A tuple of names ``(p1, p2, ...)`` is an axis concatenated from segments
        (``torch.cat`` of differently permuted units, as in DenseNet): the units of
        ``p1``, then those of ``p2``, each segment permuted by its own permutation
        (and ``k`` entries per unit, as above, for an axis ``k`` times longer than
        the segments together). Every permutation in a tuple must also act on some
        axis whole, which gives its size.

    Attributes
    ----------
    axes : dict of str to tuple of (str, tuple of str, or None)
        The specification (a one-name tuple is stored as that name).
    perm_to_axes : dict of str to list of (str, int)
        For each permutation, the ``(tensor name, axis)`` pairs it acts on (whole,
        or a segment of).

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

    A layer reading ``torch.cat([h1, h2], dim=1)`` of two 4-unit layers has an input
    axis of two segments:

    >>> cat = PermutationSpec(
    ...     {"a.weight": ("h1", None), "b.weight": ("h2", None), "c.weight": (None, ("h1", "h2"))}
    ... )
    >>> cat.perm_to_axes["h2"]
    [('b.weight', 0), ('c.weight', 1)]
    """

    def __init__(self, axes: Mapping[str, Sequence[str | Sequence[str] | None]]):
        if not isinstance(axes, Mapping):
            raise TypeError(
                "axes must be a mapping from tensor name to one permutation name (or "
                f"None) per axis, e.g. {{'0.weight': ('h', None)}}; got {type(axes).__name__}."
            )
        checked: dict[str, tuple[str | tuple[str, ...] | None, ...]] = {}
        for name, entry in axes.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names in axes must be strings; got {name!r}.")
            if isinstance(entry, str) or not isinstance(entry, Sequence):
                raise TypeError(
                    f"axes[{name!r}] must be a sequence with one permutation name or None "
                    f"per axis of the tensor, e.g. ('h', None); got {entry!r}."
                )
            resolved: list[str | tuple[str, ...] | None] = []
            for perm in entry:
                if perm is None or isinstance(perm, str):
                    resolved.append(perm)
                elif isinstance(perm, Sequence) and perm and all(isinstance(q, str) for q in perm):
                    # consecutive segments; a single segment is the whole axis
                    resolved.append(perm[0] if len(perm) == 1 else tuple(perm))
                else:
                    raise TypeError(
                        f"axes[{name!r}] must hold, per axis, a permutation name (str), None, "
                        "or a non-empty tuple of permutation names for an axis concatenated "
                        f"from differently permuted segments, e.g. ('h1', 'h2'); got {perm!r}."
                    )
            checked[name] = tuple(resolved)
        self.axes = checked

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for name, axis, _, perm in self._uses():
            if (name, axis) not in out.setdefault(perm, []):
                out[perm].append((name, axis))
        return out

    def _uses(self) -> list[tuple[str, int, int | None, str]]:
        """Every ``(tensor name, axis, segment or None, permutation)`` of the spec."""
        out = []
        for name, entry in self.axes.items():
            for axis, perm in enumerate(entry):
                if isinstance(perm, tuple):
                    out.extend((name, axis, j, q) for j, q in enumerate(perm))
                elif perm is not None:
                    out.append((name, axis, None, perm))
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
        convolutions), BatchNorm, InstanceNorm, LayerNorm (and ``F.layer_norm``) and
        GroupNorm, elementwise activations, dropout, pooling, ``flatten`` /
        ``view(n, -1)`` / spatial means, ``permute`` / ``transpose`` between
        channels-first and channels-last layouts, basic indexing that keeps every
        unit (``x[:, 0]``), residual additions (which tie the permutations they add),
        ``torch.cat`` (along the units: one segment per part; along other axes: a
        tie), parameters and buffers used directly in elementwise arithmetic (they
        move with the units they meet), ``Embedding``, and ``TransformerEncoder`` /
        ``TransformerEncoderLayer`` (the residual stream and the feed-forward units;
        attention heads keep their order). The network's inputs and outputs are
        never permuted. Linear layers are taken to act on ``(batch, features)``
        inputs, transformer layers on batched sequences.
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
                if isinstance(perm, str):
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
        for name, entry in self.axes.items():
            for axis, perm in enumerate(entry):
                if isinstance(perm, tuple):
                    _segment_layout(name, axis, int(tensors[name].shape[axis]), perm, sizes)
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
                if any(q in perms for p in entry for q in _segments(p)):
                    tensor = tensors[name]
                    tensor.copy_(_permute(tensor, entry, perms, sizes, name=name))
        return result


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _segments(perm: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if perm is None:
        return ()
    return perm if isinstance(perm, tuple) else (perm,)


def _block_index(perm: Tensor, length: int, n: int) -> Tensor:
    """Index reordering an axis of ``length`` = k·n entries, k consecutive per unit."""
    k = length // n
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)).reshape(-1)


def _segment_layout(
    name: str, axis: int, length: int, perms: tuple[str, ...], sizes: Mapping[str, int]
) -> list[tuple[int, int]]:
    """``(offset, length)`` of each segment of a concatenated axis; checks the sizes."""
    for perm in perms:
        if perm not in sizes:
            raise ValueError(
                f"Permutation {perm!r} acts only on a segment of axis {axis} of {name!r}, so "
                "its size is not known: name it also on an axis it permutes whole (the "
                "output axis of the layer producing its units)."
            )
    total = sum(sizes[perm] for perm in perms)
    if length % total:
        segments = " + ".join(f"{sizes[perm]} ({perm!r})" for perm in perms)
        raise ValueError(
            f"Axis {axis} of {name!r} has {length} entries, which is not a multiple of its "
            f"segments' units, {segments} = {total}."
        )
    k = length // total
    out, offset = [], 0
    for perm in perms:
        out.append((offset, k * sizes[perm]))
        offset += k * sizes[perm]
    return out


def _axis_index(
    name: str,
    axis: int,
    length: int,
    perm: str | tuple[str, ...],
    perms: Mapping[str, Tensor],
    sizes: Mapping[str, int],
) -> Tensor:
    if isinstance(perm, str):
        return _block_index(perms[perm], length, sizes[perm])
    pieces = []
    for q, (offset, size) in zip(perm, _segment_layout(name, axis, length, perm, sizes)):
        local = perms[q] if q in perms else torch.arange(sizes[q])
        pieces.append(offset + _block_index(local, size, sizes[q]))
    return torch.cat(pieces)


def _permute(
    tensor: Tensor,
    entry: Sequence[str | tuple[str, ...] | None],
    perms: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    except_axis: int | None = None,
    name: str = "",
) -> Tensor:
    out = tensor
    for axis, perm in enumerate(entry):
        if axis == except_axis or not any(q in perms for q in _segments(perm)):
            continue
        index = _axis_index(name, axis, tensor.shape[axis], perm, perms, sizes)
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
    uses: dict[str, list[tuple[str, int, int | None]]] = {}
    for name, axis, segment, perm in spec._uses():
        if name in params_a:
            uses.setdefault(perm, []).append((name, axis, segment))
    names = sorted(uses)
    perms = {p: torch.arange(sizes[p]) for p in names}
    for _ in range(max_iter):
        improved = False
        for p in rng.permutation(len(names)):
            perm = names[p]
            n = sizes[perm]
            score = torch.zeros(n, n, dtype=torch.float64)
            for name, axis, segment in uses[perm]:
                entry = spec.axes[name]
                w_a = params_a[name]
                w_b = _permute(params_b[name], entry, perms, sizes, except_axis=axis, name=name)
                if segment is not None:
                    layout = _segment_layout(name, axis, w_a.shape[axis], entry[axis], sizes)
                    offset, length = layout[segment]
                    w_a, w_b = w_a.narrow(axis, offset, length), w_b.narrow(axis, offset, length)
                w_a = w_a.movedim(axis, 0).reshape(n, -1)
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


# The units of a traced tensor: one union-find class, or a tuple of classes for units
# concatenated from differently permuted parts (consecutive segments).
_Group = int | tuple[int, ...]


def _parts(group: _Group) -> tuple[int, ...]:
    return group if isinstance(group, tuple) else (group,)


def _concatenation(groups: Sequence[_Group]) -> _Group:
    parts = tuple(g for group in groups for g in _parts(group))
    return parts[0] if len(parts) == 1 else parts


@dataclass
class _Features:
    """What is known about one traced tensor: the union-find class of its units."""

    group: _Group
    kind: str  # "flat": units on the last axis of (batch, units); "channels": axis 1
    ndim: int | None

    def unit_axis(self) -> int | None:
        if self.kind == "channels":
            return 1
        return None if self.ndim is None else self.ndim - 1


@dataclass(eq=False)
class _Direct:
    """A parameter or buffer used directly in forward, possibly viewed or expanded.

    ``axes`` gives, for each axis of the view, the axis of the tensor it shows (None
    for an axis the view added).
    """

    name: str
    tensor: Tensor | None  # None: a constant that is not a parameter or buffer
    axes: tuple[int | None, ...]


class _Derivation:
    def __init__(self, model: nn.Module):
        self.model = model
        self.parent = [_FIXED]
        self.names: list[str | None] = [None]
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.canonical = {id(t): name for name, t in tensors.items()}
        self.axes: dict[str, list[_Group | None]] = {
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

    def fixed(self, group: _Group) -> bool:
        return all(self.find(i) == _FIXED for i in _parts(group))

    def fix(self, group: _Group) -> None:
        for i in _parts(group):
            self.union(i, _FIXED)

    def tie(self, a: _Group, b: _Group, where: str) -> _Group:
        """Join two sets of units that must be permuted alike (segment by segment)."""
        if isinstance(a, int) and isinstance(b, int):
            return self.union(a, b)
        if self.fixed(a) or self.fixed(b):
            self.fix(a)
            self.fix(b)
            return _FIXED
        if len(_parts(a)) != len(_parts(b)):
            raise _cannot(
                where,
                "it joins units concatenated from differently permuted parts with units "
                "that are split otherwise",
            )
        return tuple(self.union(i, j) for i, j in zip(_parts(a), _parts(b)))

    def tie_all(self, features: Sequence[_Features], where: str) -> _Group | _CannotDerive:
        """One group for the units of every input (they are permuted alike), or the
        reason they cannot be."""
        group = features[0].group
        try:
            for other in features[1:]:
                group = self.tie(group, other.group, where)
        except _CannotDerive as exc:
            return exc
        return group

    def assign(self, module_name: str, tensor: Tensor | None, axis: int, group: _Group) -> None:
        if tensor is None:
            return
        name = self.canonical[id(tensor)]
        current = self.axes[name][axis]
        where = f"{module_name!r} (axis {axis} of {name!r})"
        self.axes[name][axis] = group if current is None else self.tie(current, group, where)

    def spec(self) -> PermutationSpec:
        # A concatenation with never-permuted parts (say, the network's input) cannot
        # tell the size of those parts: keep all of its parts in place.
        changed = True
        while changed:
            changed = False
            for entry in self.axes.values():
                for group in entry:
                    if group is not None and any(self.fixed(i) for i in _parts(group)):
                        if not self.fixed(group):
                            self.fix(group)
                            changed = True
        out = {}
        for name, entry in self.axes.items():
            resolved: list[str | tuple[str, ...] | None] = []
            for group in entry:
                if group is None or self.fixed(group):
                    resolved.append(None)
                elif isinstance(group, tuple):
                    resolved.append(tuple(self.names[self.find(i)] for i in group))
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
            tensor = _fetch_attr(graph_module, str(node.target))
            name = state.canonical.get(id(tensor), str(node.target))
            if isinstance(tensor, Tensor) and id(tensor) in state.canonical:
                values[node] = _Direct(name, tensor, tuple(range(tensor.ndim)))
            elif isinstance(tensor, Tensor):
                values[node] = _Direct(name, None, tuple(range(tensor.ndim)))
            else:
                values[node] = None
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
                    state.fix(value.group)
    return state.spec()


def _fetch_attr(module: nn.Module, target: str) -> object:
    out: object = module
    for atom in target.split("."):
        out = getattr(out, atom, None)
    return out


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


def _inputs(node: fx.Node, values: Mapping[fx.Node, object], where: str) -> list[_Features]:
    """The traced tensors ``node`` consumes; raises an unresolved error it consumes."""
    found = []
    for arg in _flat_args((node.args, node.kwargs)):
        if isinstance(arg, fx.Node):
            value = values[arg]
            if isinstance(value, _CannotDerive):
                raise value
            if isinstance(value, _Direct):
                raise _direct_error(value, where)
            if isinstance(value, _Features):
                found.append(value)
    return found


def _direct_error(direct: _Direct, where: str) -> _CannotDerive:
    what = "parameter or buffer" if direct.tensor is not None else "constant tensor"
    return _cannot(
        f"{what} {direct.name!r}",
        f"it is used directly in forward by {where}, which is not an elementwise "
        "operation on the units (a parameter used directly is followed only through "
        "elementwise arithmetic, expand, indexing, and concatenation along other axes)",
    )


def _module_rule(
    state: _Derivation, node: fx.Node, module: nn.Module, values: Mapping[fx.Node, object]
) -> object:
    name = str(node.target)
    where = f"module {name!r} ({type(module).__name__})"
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
        return _transformer_rule(state, node, module, values, where)
    try:
        inputs = _inputs(node, values, where)
    except _CannotDerive as exc:
        return exc
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
        return _conv_rule(state, name, module, x, where)
    if isinstance(module, (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm)):
        return _norm_rule(state, name, module, x, where)
    if isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            state.assign(name, module.weight, 0, x.group)
        return x
    if isinstance(module, _PASS_THROUGH_MODULES):
        return x
    if isinstance(module, nn.Flatten):
        return _flatten(state, x, module.start_dim, module.end_dim, where)
    return _unknown(state, inputs, where, "its effect on the units is not known")


def _conv_rule(state: _Derivation, name: str, module: _ConvNd, x: _Features, where: str) -> object:
    """A convolution: its output channels a new group (ordinary), its input's
    (depthwise), or fixed (grouped)."""
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
        state.fix(x.group)  # grouped: keep channels in place
        g = _FIXED
    state.assign(name, module.bias, 0, g)
    return _Features(g, "channels", ndim)


def _norm_rule(
    state: _Derivation, name: str, module: nn.Module, x: _Features, where: str
) -> _Features:
    """A normalisation layer: its per-unit tensors follow the units of ``x``; a group
    norm of other than 1 or one group per channel keeps the channels in place."""
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.ndim == 1:
                state.assign(name, tensor, 0, x.group)
    elif isinstance(module, nn.LayerNorm):
        axis = _layer_norm_axis(state, x, len(module.normalized_shape), where)
        if axis is not None:
            for tensor in module.parameters(recurse=False):
                state.assign(name, tensor, axis, x.group)
    elif module.num_groups in (1, module.num_channels):  # GroupNorm
        for tensor in module.parameters(recurse=False):
            state.assign(name, tensor, 0, x.group)
    else:
        state.fix(x.group)  # permuting across groups would change them
    return x


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
    layers, norms = _encoder_parts(module, str(node.target))
    refused = _refused_encoder(layers, norms)  # checked whole before assigning any axis
    if refused is not None:
        return refused
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


def _encoder_parts(
    module: nn.TransformerEncoder | nn.TransformerEncoderLayer, name: str
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module | None]]]:
    """The encoder's layers and its LayerNorms (the layers' and the final one), named."""
    if isinstance(module, nn.TransformerEncoder):
        layers = [(f"{name}.layers.{i}", layer) for i, layer in enumerate(module.layers)]
        norms = [(f"{name}.norm", module.norm)] if module.norm is not None else []
    else:
        layers, norms = [(name, module)], []
    for layer_name, layer in layers:
        norms += [(f"{layer_name}.norm1", getattr(layer, "norm1", None))]
        norms += [(f"{layer_name}.norm2", getattr(layer, "norm2", None))]
    return layers, norms


def _refused_encoder(
    layers: list[tuple[str, nn.Module]], norms: list[tuple[str, nn.Module | None]]
) -> _CannotDerive | None:
    """Why the encoder's units cannot be followed, or None: each layer must be
    torch's own, with an elementwise activation and one input projection, and each
    norm a LayerNorm over the features."""
    for layer_name, layer in layers:
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
    for norm_name, norm in norms:
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            return _cannot(
                f"module {norm_name!r} ({type(norm).__name__})",
                "it is not a LayerNorm over the features",
            )
    return None


def _layer_norm_axis(state: _Derivation, x: _Features, n_norm: int, where: str) -> int | None:
    """The axis of a LayerNorm's weight that the units of its input ``x`` index."""
    if x.kind == "flat":
        return n_norm - 1  # the units are the last axis
    if x.ndim is not None and n_norm == x.ndim - 1:
        return 0  # normalises over channels and space
    if x.ndim is not None and n_norm < x.ndim - 1:
        return None  # normalises over space only
    if state.fixed(x.group):
        return None
    raise _cannot(where, "the layout of its input is unknown")


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
    if x.ndim is not None and isinstance(start, int) and isinstance(end, int):
        start, end = start % x.ndim, end % x.ndim
        unit = x.unit_axis()
        if 0 < start <= end and unit not in range(start, end + 1):
            # spatial axes only, on one side of the units: (b, c, h, w) → (b, c, h·w)
            ndim = x.ndim - (end - start)
            return _at(x.group, unit if unit < start else unit - (end - start), ndim)
    return _cannot(where, f"flatten(start_dim={start}, end_dim={end}) mixes the units")


def _at(group: _Group, unit_axis: int, ndim: int) -> _Features:
    """Features of ``ndim`` axes with their units on ``unit_axis`` (1 or the last)."""
    if unit_axis == ndim - 1:
        return _Features(group, "flat", ndim)
    if unit_axis == 1:
        return _Features(group, "channels", ndim)
    raise ValueError(f"units on axis {unit_axis} of {ndim}")  # callers check first


def _movable(x: _Features, where: str) -> tuple[int, int] | _CannotDerive:
    unit, ndim = x.unit_axis(), x.ndim
    if unit is None or ndim is None:
        return _cannot(where, "the number of axes of its input is unknown")
    return unit, ndim


def _moved(x: _Features, new_unit: int, ndim: int, where: str) -> _Features | _CannotDerive:
    if new_unit in (1, ndim - 1):
        return _at(x.group, new_unit, ndim)
    return _cannot(where, f"it moves the units to axis {new_unit} of {ndim}")


def _layout_rule(
    x: _Features, target: object, args: list, kwargs: dict, where: str
) -> _Features | _CannotDerive:
    """``permute`` / ``transpose`` / ``swapaxes``: where the unit axis goes."""
    located = _movable(x, where)
    if isinstance(located, _CannotDerive):
        return located
    unit, ndim = located
    if target in ("permute", torch.permute):
        dims = kwargs.get("dims", args[0] if len(args) == 1 else args)
        dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return _cannot(where, f"it permutes {len(dims)} axes of a tensor with {ndim}")
        dims = [d % ndim for d in dims]
        return _moved(x, dims.index(unit), ndim, where)
    d0 = kwargs.get("dim0", args[0] if args else None)
    d1 = kwargs.get("dim1", args[1] if len(args) > 1 else None)
    if not isinstance(d0, int) or not isinstance(d1, int):
        return _cannot(where, "it swaps axes that are not known")
    d0, d1 = d0 % ndim, d1 % ndim
    new_unit = d1 if unit == d0 else d0 if unit == d1 else unit
    return _moved(x, new_unit, ndim, where)


_LAYOUT = {"permute", "transpose", "swapaxes", torch.permute, torch.transpose, torch.swapaxes}


def _index_axes(index: object, ndim: int) -> list[tuple[int | None, object]] | None:
    """``(source axis or None for a new one, index)`` per axis of ``x[index]``, kept only.

    None when the index is not a tuple of ints, slices, None and one Ellipsis.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(item is Ellipsis for item in items) > 1:
        return None
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    if used > ndim:
        return None
    out: list[tuple[int | None, object]] = []
    axis = 0
    for item in items:
        if item is Ellipsis:
            for _ in range(ndim - used):
                out.append((axis, slice(None)))
                axis += 1
        elif item is None:
            out.append((None, None))
        elif isinstance(item, slice):
            out.append((axis, item))
            axis += 1
        elif isinstance(item, int) and not isinstance(item, bool):
            axis += 1  # removed
        else:
            return None
    out.extend((a, slice(None)) for a in range(axis, ndim))
    return out


def _index_rule(
    state: _Derivation, x: _Features, index: object, where: str
) -> _Features | _CannotDerive:
    """``x[index]`` for basic indexing that keeps every unit."""
    located = _movable(x, where)
    if isinstance(located, _CannotDerive):
        return located
    unit, ndim = located
    kept = _index_axes(index, ndim)
    if kept is None:
        return _cannot(where, "an index other than ints, slices, None and ...")
    positions = [i for i, (axis, _) in enumerate(kept) if axis == unit]
    if not positions or kept[positions[0]][1] != slice(None):
        return _cannot(where, "it indexes the units")
    return _moved(x, positions[0], len(kept), where)


def _direct_view(direct: _Direct, target: object, args: list, kwargs: dict) -> _Direct | None:
    """A view of a parameter used directly: ``expand``, indexing, dtype casts."""
    if target in ("expand",):
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        grown = len(sizes) - len(direct.axes)
        if grown < 0:
            return None
        return _Direct(direct.name, direct.tensor, (None,) * grown + direct.axes)
    if target is operator.getitem:
        kept = _index_axes(args[0], len(direct.axes))
        if kept is None:
            return None
        axes = tuple(None if axis is None else direct.axes[axis] for axis, _ in kept)
        return _Direct(direct.name, direct.tensor, axes)
    if target in ("to", "type_as", "float", "double", "half", "contiguous", "clone", "detach"):
        return direct
    return None


def _attach(state: _Derivation, direct: _Direct, x: _Features, where: str) -> _CannotDerive | None:
    """``direct`` broadcast against ``x`` elementwise: it moves with x's units."""
    if x.ndim is None and x.kind == "flat":
        ndim, unit = len(direct.axes), len(direct.axes) - 1  # aligned on the last axis
    elif x.ndim is not None and len(direct.axes) <= x.ndim:
        ndim, unit = x.ndim, x.unit_axis()
    else:
        return _cannot(where, f"{direct.name!r} has more axes than the features it acts on")
    view_axis = unit - (ndim - len(direct.axes))
    axis = direct.axes[view_axis] if view_axis >= 0 else None
    if axis is None:
        return None  # broadcast along the units
    if direct.tensor is None:
        if state.fixed(x.group):
            return None
        return _direct_error(direct, where)
    if direct.tensor.shape[axis] != 1:
        state.assign(direct.name, direct.tensor, axis, x.group)
    return None


def _direct_rule(
    state: _Derivation,
    node: fx.Node,
    values: Mapping[fx.Node, object],
    directs: list[_Direct],
    where: str,
) -> object:
    """An operation on a parameter or buffer used directly in forward."""
    target = node.target
    is_method = node.op == "call_method"
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    first = values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if len(directs) == 1 and first is directs[0]:
        view = _direct_view(first, target, args, kwargs)
        if view is not None:
            return view
    features = [
        values[a]
        for a in _flat_args((node.args, node.kwargs))
        if isinstance(a, fx.Node) and isinstance(values[a], _Features)
    ]
    elementwise = (not is_method and target in _ELEMENTWISE_BINARY) or (
        is_method and target in _ELEMENTWISE_METHODS
    )
    if elementwise and len(directs) == 1 and len(features) == 1:
        error = _attach(state, directs[0], features[0], where)
        return error if error is not None else features[0]
    if target is F.layer_norm and features and first is features[0]:
        return _functional_layer_norm(state, node, values, first, directs, where)
    if target in _CHANNEL_NORMS and features and first is features[0]:
        return _functional_channel_norm(state, node, values, first, directs, where)
    if target in _CONCATENATIONS:
        return _cat_rule(state, node, values, where)
    return _direct_error(directs[0], where)


# Attributes of a tensor that are not tensors computed from its entries.
_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}

_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}


def _functional_layer_norm(
    state: _Derivation,
    node: fx.Node,
    values: Mapping[fx.Node, object],
    x: _Features,
    directs: list[_Direct],
    where: str,
) -> object:
    """``F.layer_norm(x, shape, weight, bias)``, as ``LayerNorm2d`` calls it."""
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    shape = kwargs.get("normalized_shape", args[0] if args else None)
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        return _cannot(where, "its normalized_shape is not known")
    try:
        axis = _layer_norm_axis(state, x, len(shape), where)
    except _CannotDerive as exc:
        return exc
    affine = [kwargs.get("weight", args[1] if len(args) > 1 else None)]
    affine.append(kwargs.get("bias", args[2] if len(args) > 2 else None))
    params = [values.get(a) for a in affine if isinstance(a, fx.Node)]
    for direct in directs:
        if not any(direct is p for p in params) or not _whole(direct):
            return _direct_error(direct, where)
        if axis is not None:
            state.assign(direct.name, direct.tensor, axis, x.group)
    return x


def _whole(direct: _Direct, ndim: int | None = None) -> bool:
    """Whether ``direct`` is a parameter or buffer as it is (not a view of it), of
    ``ndim`` dimensions when given."""
    tensor = direct.tensor
    if tensor is None or direct.axes != tuple(range(tensor.ndim)):
        return False
    return ndim is None or tensor.ndim == ndim


#: The functional per-channel normalisations, and their arguments after the input.
_CHANNEL_NORMS = {
    F.batch_norm: ("running_mean", "running_var", "weight", "bias"),
    F.instance_norm: ("running_mean", "running_var", "weight", "bias"),
    F.group_norm: ("num_groups", "weight", "bias"),
}


def _functional_channel_norm(
    state: _Derivation,
    node: fx.Node,
    values: Mapping[fx.Node, object],
    x: _Features,
    directs: list[_Direct],
    where: str,
) -> object:
    """``F.batch_norm`` / ``F.instance_norm`` / ``F.group_norm`` (x, …), as timm's
    ``BatchNormAct2d`` calls the first on its own buffers: statistics and affine
    parameters per channel of ``x`` (axis 1), as ``nn.BatchNorm2d`` is followed. A
    group norm of other than 1 or one group per channel keeps the channels in place."""
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    names = _CHANNEL_NORMS[node.target]
    bound = {n: kwargs.get(n, args[i] if i < len(args) else None) for i, n in enumerate(names)}
    per_channel = [values.get(a) for a in bound.values() if isinstance(a, fx.Node)]
    for direct in directs:
        if not any(direct is p for p in per_channel) or not _whole(direct, ndim=1):
            return _direct_error(direct, where)
    groups = bound.get("num_groups", 1)
    channels = {d.tensor.shape[0] for d in directs if d.tensor is not None}
    if groups != 1 and channels != {groups}:
        state.fix(x.group)  # permuting across groups would change them
        return x
    for direct in directs:
        state.assign(direct.name, direct.tensor, 0, x.group)
    return x


def _cat_rule(
    state: _Derivation, node: fx.Node, values: Mapping[fx.Node, object], where: str
) -> object:
    """``torch.cat``: along the units, a concatenation of segments; else a tie."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else 0))
    if not isinstance(tensors, (tuple, list)) or not isinstance(dim, int):
        return _cannot(where, "it concatenates tensors that are not known")
    parts = [values.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    for part in parts:
        if isinstance(part, _CannotDerive):
            return part
    features = [p for p in parts if isinstance(p, _Features)]
    directs = [p for p in parts if isinstance(p, _Direct)]
    if len(features) + len(directs) != len(parts) or not features:
        return _cannot(where, "it concatenates tensors that are not known")
    if all(state.fixed(x.group) for x in features) and not directs:
        return _Features(_FIXED, "flat", None)
    ndims = {x.ndim for x in features if x.ndim is not None}
    if len(ndims) > 1:
        return _cannot(where, "it concatenates tensors with different numbers of axes")
    if not ndims and dim == 0:  # the batch: the units stay where they are
        group = state.tie_all(features, where)
        if isinstance(group, _CannotDerive):
            return group
        try:
            for direct in directs:
                error = _attach(state, direct, _Features(group, "flat", None), where)
                if error is not None:
                    return error
        except _CannotDerive as exc:
            return exc
        return _Features(group, "flat", None)
    # Linear layers are taken to act on (batch, features): so is an unknown flat input.
    ndim = ndims.pop() if ndims else 2
    units = {1 if x.kind == "channels" else ndim - 1 for x in features}
    if len(units) > 1:
        return _cannot(where, "it concatenates channels-first and channels-last tensors")
    unit = units.pop()
    if dim % ndim == unit:
        if directs:
            return _direct_error(directs[0], f"{where}, along the units")
        # Never-permuted parts (the network's input) stay; spec() keeps the rest with them.
        return _at(_concatenation([x.group for x in features]), unit, ndim)
    group = state.tie_all(features, where)
    if isinstance(group, _CannotDerive):
        return group
    result = _at(group, unit, ndim)
    for direct in directs:
        error = _attach(state, direct, result, where)
        if error is not None:
            return error
    return result


def _function_rule(state: _Derivation, node: fx.Node, values: Mapping[fx.Node, object]) -> object:
    target = node.target
    label = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    where = f"operation {label!r} (node {node.name!r})"
    if node.op == "call_method" and target in ("size", "dim"):
        return None
    if node.op == "call_function" and target in (getattr, operator.getitem):
        early = _access_rule(state, node, values, where)
        if early is not _FOLLOW:
            return early
    arg_values = [values[a] for a in _flat_args((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    for value in arg_values:
        if isinstance(value, _CannotDerive):
            return value
    directs = [v for v in arg_values if isinstance(v, _Direct)]
    if directs:
        return _direct_rule(state, node, values, directs, where)
    try:
        inputs = _inputs(node, values, where)
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
        group = state.tie_all(inputs, where)
        if isinstance(group, _CannotDerive):
            return group
        best = max(inputs, key=lambda x: (x.kind == "channels", x.ndim or 0))
        return _Features(group, best.kind, best.ndim)
    return _shape_rule(state, node, values, inputs, where)


#: What :func:`_access_rule` returns when the operation is to be followed as any other.
_FOLLOW = object()


def _access_rule(
    state: _Derivation, node: fx.Node, values: Mapping[fx.Node, object], where: str
) -> object:
    """``getattr(x, name)`` and ``x[i]`` where ``x`` is not a tensor of units (shapes,
    outputs that could not be followed): their value, or ``_FOLLOW``."""
    source = values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if node.target is getattr:
        if node.args[1] in _METADATA:
            return None  # x.shape and the like
        if isinstance(source, _CannotDerive):
            return source
        if not isinstance(source, (_Features, _Direct)):
            return None
        if isinstance(source, _Features) and state.fixed(source.group):
            return _Features(_FIXED, "flat", None)
        if isinstance(source, _Direct):
            return _direct_error(source, where)
        return _cannot(where, f"its attribute {node.args[1]!r} of the units is not followed")
    if isinstance(source, _CannotDerive):
        return source  # an element of an output we could not follow
    if not isinstance(source, (_Features, _Direct)):
        return None  # indexing a shape
    return _FOLLOW


def _shape_rule(
    state: _Derivation,
    node: fx.Node,
    values: Mapping[fx.Node, object],
    inputs: list[_Features],
    where: str,
) -> object:
    """The operations that move, index, join, normalise or reduce the units' axes."""
    target, first = node.target, inputs[0]
    is_method = node.op == "call_method"
    args = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if target in _LAYOUT:
        return _layout_rule(first, target, args, kwargs, where)
    if target is operator.getitem and node.args[0] is not None:
        return _index_rule(state, first, args[0], where)
    if target in _CONCATENATIONS:
        return _cat_rule(state, node, values, where)
    if target is F.layer_norm:
        return _functional_layer_norm(state, node, values, first, [], where)
    if target in _CHANNEL_NORMS:
        return _functional_channel_norm(state, node, values, first, [], where)
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
        return _reduction_rule(first, args, kwargs, where)
    if is_method and target == "squeeze" and first.kind == "channels":
        squeezed = _squeeze_rule(first, args, kwargs)
        if squeezed is not None:
            return squeezed
    if target is torch.stack:
        return _stack_rule(state, inputs, args, kwargs, where)
    return _cannot(where, "its effect on the units is not known")


def _reduction_rule(first: _Features, args: list, kwargs: dict, where: str) -> object:
    """A mean, sum or maximum over axes other than the units' and the batch's."""
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


def _squeeze_rule(first: _Features, args: list, kwargs: dict) -> _Features | None:
    """``x.squeeze(...)`` of a channels-first map; None where it is not followed."""
    dims = kwargs.get("dim", args if args else None)
    dims = (dims,) if isinstance(dims, int) else dims
    if dims is None:
        return _Features(first.group, "flat", 2)  # after global pooling
    if first.ndim is not None:
        dims = {d % first.ndim for d in dims}
        if 1 not in dims and 0 not in dims:
            ndim = first.ndim - len(dims)
            return _Features(first.group, "flat" if ndim == 2 else "channels", ndim)
    return None


def _stack_rule(
    state: _Derivation, inputs: list[_Features], args: list, kwargs: dict, where: str
) -> object:
    """``torch.stack``: the inputs' units tied, and their axis moved by the new one."""
    first = inputs[0]
    dim = kwargs.get("dim", args[0] if args else 0)
    if first.kind == "flat" and first.ndim is None and isinstance(dim, int) and dim == 0:
        group = state.tie_all(inputs, where)
        if isinstance(group, _CannotDerive):
            return group
        return _Features(group, "flat", None)  # the units stay last
    located = _movable(first, where)
    if isinstance(located, _CannotDerive) or not isinstance(dim, int):
        return _cannot(where, "it stacks tensors whose axes are not known")
    unit, ndim = located
    group = state.tie_all(inputs, where)
    if isinstance(group, _CannotDerive):
        return group
    new_unit = unit + 1 if dim % (ndim + 1) <= unit else unit
    return _moved(_Features(group, first.kind, ndim), new_unit, ndim + 1, where)
