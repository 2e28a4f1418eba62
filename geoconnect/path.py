"""ModelPath: a chain of networks held as stacked parameters, evaluated in one call."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ._inputs import Inputs, Output, arguments, call, check_output, extract_logits, n_rows
from ._model_checks import batchnorm_buffer_names, has_batchnorm

__all__ = ["ModelPath"]

Strategy = Literal["vmap", "loop"]


@dataclass(frozen=True)
class Shard:
    """Which points of a whole path a sharded :class:`ModelPath` holds: the two ends
    and the interior points ``start … stop − 1`` (interior indices, point ``i + 1``
    of the whole path) of a path of ``n_points``; the shard of rank ``rank`` of
    ``world_size``.

    A distributed chain fit holds one per rank (see
    :meth:`geoconnect.distributed.PathGroup.keep_block`), and with ``gather=False``
    returns it as ``path_``; :meth:`ModelPath.save` writes it as one file of the
    path's shards.

    Examples
    --------
    >>> from geoconnect.path import Shard
    >>> Shard(start=12, stop=23, n_points=25).points
    [0, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    """

    start: int
    stop: int
    n_points: int
    rank: int = 0
    world_size: int = 1

    @property
    def points(self) -> list[int]:
        """The whole path's indices of the points held, in order."""
        return [0, *range(self.start + 1, self.stop + 1), self.n_points - 1]


STRATEGIES: tuple[Strategy, ...] = ("vmap", "loop")


class ModelPath:
    """A piecewise-linear path of networks ``θ_0 … θ_{N−1}`` of one architecture.

    The points' parameters are held stacked, one tensor of shape
    ``(n_points, *shape)`` per parameter, so that all points are evaluated on a batch
    in one call (:meth:`logits`). BatchNorm running statistics are held per point;
    every other buffer is shared and comes from the first model. The path owns its
    tensors: it never aliases the modules it was built from.

    Build one with :meth:`linear` or get one from a fitted connector's ``path_``.

    Parameters
    ----------
    template : nn.Module
        A module of the architecture; its parameter values are not used, its non-
        BatchNorm buffers are shared by all points. Copied.
    params : dict of str to Tensor
        For each parameter name of ``template``, a tensor ``(n_points, *shape)``.
    batchnorm_buffers : dict of str to Tensor, optional
        For each BatchNorm statistic of ``template``, a tensor ``(n_points, *shape)``.
    t : array-like of shape (n_points,), optional
        Positions of the points in [0, 1]; default ``i / (n_points − 1)``.
    strategy : {"loop", "vmap"}, default="loop"
        How a stack of points is evaluated: see :attr:`strategy`.
    frozen : iterable of str, optional
        Names of parameters that fitting must not move; default those of
        ``template`` with ``requires_grad=False``. Modules of the path keep them
        frozen.
    output : None, str, int or callable, default=None
        Where the logits are in the architecture's output: see :attr:`output`.

    Attributes
    ----------
    t_ : ndarray of shape (n_points,)
        Positions of the points along the path, from 0 to 1. Connectors set them to
        the cumulative Fisher–Rao arc length on the fit data, normalised.
    metadata : dict
        JSON-serialisable facts about the path, saved with it by :meth:`save`.
        Connectors record the connector, the divergence and the path's lengths and
        energy on the fit data.
    alignment : dict of str to Tensor
        With ``align="weight_matching"``, the permutation of each group of model_b's
        units that aligned it to model_a (see :mod:`geoconnect.align`); else empty.
    shard : Shard or None
        None for a whole path. A rank's shard of a distributed chain fitted with
        ``gather=False``: the path holds only the ends and that rank's block, and
        :class:`~geoconnect.path.Shard` says which points of the whole path they
        are (:meth:`save` writes it as one file of the path's shards).

    Examples
    --------
    >>> import torch
    >>> from geoconnect import ModelPath
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> path = ModelPath.linear(a, b, n_points=5)
    >>> len(path), path.parameters_vector().shape
    (5, torch.Size([5, 15]))
    >>> torch.allclose(path[0](torch.ones(1, 4)), a(torch.ones(1, 4)))
    True
    """

    #: (for paths pickled before shards existed)
    shard: Shard | None = None

    def __init__(
        self,
        template: nn.Module,
        params: dict[str, Tensor],
        batchnorm_buffers: dict[str, Tensor] | None = None,
        t: Sequence[float] | np.ndarray | None = None,
        strategy: Strategy = "loop",
        frozen: Iterable[str] | None = None,
        output: Output = None,
    ):
        self.template = copy.deepcopy(template).eval()
        #: Parameters that do not move along a fit (``requires_grad=False`` in both
        #: models): default, those the template has frozen.
        self.frozen = frozenset(
            (n for n, p in self.template.named_parameters() if not p.requires_grad)
            if frozen is None
            else frozen
        )
        for p in self.template.parameters():
            p.requires_grad_(False)
        names = [name for name, _ in self.template.named_parameters()]
        if sorted(names) != sorted(params):
            raise ValueError("params must have one stacked tensor per template parameter.")
        self.params = {name: params[name].detach() for name in names}
        self.batchnorm_buffers = {k: v.detach() for k, v in (batchnorm_buffers or {}).items()}
        sizes = {v.shape[0] for v in self.params.values()}
        sizes |= {v.shape[0] for v in self.batchnorm_buffers.values()}
        if len(sizes) != 1:
            raise ValueError("every stacked tensor must have the same n_points.")
        self.n_points = sizes.pop()
        if self.n_points < 2:
            raise ValueError(f"a path needs at least 2 points; got {self.n_points}.")
        bn_names = set(self.batchnorm_buffers)
        self.shared_buffers = {k: v for k, v in self.template.named_buffers() if k not in bn_names}
        # functional_call looks for tied (shared) tensors on every call unless told there
        # are none: about 50 us of a small network's 370 us forward pass on the CPU.
        self._tied = _has_tied_tensors(self.template)
        self.t_ = (
            np.linspace(0.0, 1.0, self.n_points) if t is None else np.asarray(t, dtype=float).copy()
        )
        self.strategy = strategy
        self.output = output
        self.metadata: dict = {}
        self.alignment: dict[str, Tensor] = {}
        #: None, or which points of a whole path these are (a distributed fit's rank).
        self.shard: Shard | None = None

    @property
    def strategy(self) -> Strategy:
        """How a stack of points is evaluated: ``"vmap"`` or ``"loop"``.

        ``"vmap"`` evaluates all points in one ``torch.func.vmap`` call; ``"loop"``
        calls the network once per point, which needs less memory and suits layers
        whose batching rules are slow (BatchNorm, attention). Both compute the same
        function. A :class:`~geoconnect.GeodesicConnector` sets it by
        :func:`geoconnect.fitting.choose_strategy` or its ``strategy`` parameter.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 3)
        >>> path.strategy
        'loop'
        >>> path.strategy = "vmap"
        >>> path.logits(torch.zeros(4, 2)).shape
        torch.Size([3, 4, 2])
        """
        return self._strategy

    @strategy.setter
    def strategy(self, value: Strategy) -> None:
        if value not in STRATEGIES:
            raise ValueError(
                f"The path's strategy must be one of {list(STRATEGIES)}; got {value!r}."
            )
        self._strategy = value

    @property
    def output(self) -> Output:
        """Where the logits are in what the architecture's forward returns.

        ``None`` (automatic) takes a tensor as it is, the first element of a tuple or
        list, and the ``"logits"`` entry of a mapping — a ``transformers``
        ``ModelOutput`` is one. A ``str`` is a key, an ``int`` an index, and a
        callable ``output(model_output) -> logits`` is applied. The path's modules
        (``path[i]``) still return what the architecture returns; :meth:`logits` and
        every number are computed from the logits.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> class Scores(torch.nn.Linear):
        ...     def forward(self, x):
        ...         return {"scores": super().forward(x)}
        >>> path = ModelPath.linear(Scores(4, 3), Scores(4, 3), 3)
        >>> path.output = "scores"
        >>> path.logits(torch.zeros(2, 4)).shape
        torch.Size([3, 2, 3])
        """
        return self._output

    @output.setter
    def output(self, value: Output) -> None:
        self._output = check_output(value)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def linear(
        cls,
        model_a: nn.Module,
        model_b: nn.Module,
        n_points: int,
        device: torch.device | str | None = None,
    ) -> ModelPath:
        """The straight line ``θ_i = (1 − t_i) θ_a + t_i θ_b``, ``t_i = i/(n_points−1)``.

        BatchNorm statistics are the models' own at the ends; the interior points get
        placeholders (model_a's) that must be recomputed on data with
        :meth:`recompute_batchnorm` before the path is evaluated — interpolating
        running statistics gives a barrier that is not real.

        Parameters
        ----------
        model_a, model_b : nn.Module
            The ends, of the same architecture. Not modified.
        n_points : int
            Number of points, ends included (≥ 2).
        device : torch.device or str, optional
            Where the path lives; default model_a's device.

        Returns
        -------
        ModelPath

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 3)
        >>> path.t_.tolist()
        [0.0, 0.5, 1.0]
        """
        if device is None:
            device = next(model_a.parameters()).device
        t = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
        params_b = dict(model_b.named_parameters())
        params, frozen = {}, set()
        with torch.no_grad():
            for name, pa in model_a.named_parameters():
                a = pa.detach().to(device)
                b = params_b[name].detach().to(device)
                params[name] = _interpolated(a, b, t.to(device))
                if not (pa.requires_grad or params_b[name].requires_grad):
                    frozen.add(name)
                    _check_frozen(name, a, b, params[name])
            bn = {}
            buffers_b = dict(model_b.named_buffers())
            for name in batchnorm_buffer_names(model_a):
                a = dict(model_a.named_buffers())[name].detach().to(device)
                stack = a.unsqueeze(0).repeat((n_points,) + (1,) * a.ndim).clone()
                stack[-1] = buffers_b[name].detach().to(device)
                bn[name] = stack
            for name, a in model_a.named_buffers():
                b = buffers_b[name]
                if name not in bn and a.is_floating_point() and not torch.equal(a, b.to(a)):
                    warnings.warn(
                        f"Buffer {name!r} differs between model_a and model_b. Buffers "
                        "that are not BatchNorm statistics are shared along the path and "
                        "taken from model_a, so the path's last point will not compute "
                        "exactly what model_b computes.",
                        UserWarning,
                        stacklevel=2,
                    )
        template = copy.deepcopy(model_a).to(device)
        return cls(template, params, bn, frozen=frozen)

    def resample(self, n_points: int) -> ModelPath:
        """The same polygon in parameter space through ``n_points`` evenly spaced points.

        Point j of the result lies at index position ``j (N − 1)/(n_points − 1)`` of
        this path, linearly interpolated between its neighbours; so ``2N − 1`` points
        insert the midpoints and keep every existing point. The ends are kept exactly,
        with their BatchNorm statistics; interior statistics are placeholders (the
        nearest point's) until :meth:`recompute_batchnorm`.

        Parameters
        ----------
        n_points : int
            Number of points of the result (≥ 2).

        Returns
        -------
        ModelPath

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 3)
        >>> finer = path.resample(5)
        >>> torch.equal(finer.parameters_vector()[::2], path.parameters_vector())
        True
        """
        if not isinstance(n_points, (int, np.integer)) or n_points < 2:
            raise ValueError(f"n_points must be an int ≥ 2; got {n_points!r}.")
        device = self.device
        u = torch.linspace(0.0, self.n_points - 1, int(n_points), dtype=torch.float64)
        low = u.floor().long().clamp_max(self.n_points - 2)
        frac = u - low
        nearest = u.round().long()
        params = {}
        for name, stack in self.params.items():
            w = frac.to(device=device, dtype=stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
            a, b = stack[low.to(device)], stack[(low + 1).to(device)]
            params[name] = torch.where(w == 0, a, torch.where(w == 1, b, torch.lerp(a, b, w)))
        bn = {k: v[nearest.to(device)].clone() for k, v in self.batchnorm_buffers.items()}
        return self.holding(params, bn)

    def holding(
        self,
        params: dict[str, Tensor],
        batchnorm_buffers: dict[str, Tensor],
        t: np.ndarray | None = None,
    ) -> ModelPath:
        """A path of this one's architecture, settings and :attr:`alignment` holding
        other stacks of points (``t`` their positions, default evenly spaced).

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 5)
        >>> len(path.holding({k: v[:3] for k, v in path.params.items()}, {}))
        3
        """
        path = ModelPath(
            self.template,
            params,
            batchnorm_buffers,
            t=t,
            strategy=self.strategy,
            frozen=self.frozen,
            output=self.output,
        )
        path.alignment = dict(self.alignment)
        return path

    @property
    def whole_points(self) -> int:
        """Points of the whole path: :attr:`n_points`, or a shard's whole path's."""
        return self.n_points if self.shard is None else self.shard.n_points

    def check_whole(self, what: str) -> None:
        """Refuse to ``what`` a shard: its points are some of a path's, not the path.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect.distributed import PathGroup
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 5)
        >>> PathGroup(rank=1, world_size=2).keep_block(path).check_whole("evaluate")
        Traceback (most recent call last):
        ...
        ValueError: Cannot evaluate this path: it is rank 1's shard of a 5-point path ...
        """
        if self.shard is None:
            return
        raise ValueError(
            f"Cannot {what} this path: it is rank {self.shard.rank}'s shard of a "
            f"{self.shard.n_points}-point path split across {self.shard.world_size} ranks "
            f"(it holds points {self.shard.points}; a distributed fit with gather=False). "
            "Save it on every rank with path_.save(file), and load the whole path with "
            "ModelPath.load(file, template) to do this; or fit with gather=True."
        )

    @torch.no_grad()
    def select(self, points: Sequence[int], shard: Shard | None = None) -> ModelPath:
        """A path of copies of the points ``points`` (with their BatchNorm statistics).

        ``shard`` records which points of a whole path they are.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 5)
        >>> path.select([0, 2, 4]).t_.tolist()
        [0.0, 0.5, 1.0]
        """
        index = torch.as_tensor(list(points), dtype=torch.long, device=self.device)
        path = self.holding(
            {k: v.index_select(0, index) for k, v in self.params.items()},
            {k: v.index_select(0, index) for k, v in self.batchnorm_buffers.items()},
            t=self.t_[index.cpu().numpy()],
        )
        path.metadata, path.shard = dict(self.metadata), shard
        return path

    def take_points(self, other: ModelPath) -> None:
        """Hold ``other``'s points (of this architecture) instead of this path's own:
        its stacks, positions and :attr:`shard`. A distributed fit turns the path it
        is given into the rank's shard and back, so that no rank holds the whole path
        while it fits."""
        if set(other.params) != set(self.params):
            raise ValueError(f"take_points needs a path of this architecture; got {other!r}.")
        self.params, self.batchnorm_buffers = other.params, other.batchnorm_buffers
        self.n_points, self.t_, self.shard = other.n_points, other.t_.copy(), other.shard

    # -- container protocol -----------------------------------------------------------

    def __len__(self) -> int:
        return self.n_points

    def __getitem__(self, i: int) -> nn.Module:
        """The module of point ``i``, a fresh copy in eval mode."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"path indices must be integers; got {type(i).__name__}.")
        if not -self.n_points <= i < self.n_points:
            raise IndexError(f"point {i} is out of range for a path of {self.n_points}.")
        i = int(i) % self.n_points
        return self._module_from(
            {k: v[i] for k, v in self.params.items()},
            {k: v[i] for k, v in self.batchnorm_buffers.items()},
        )

    def __iter__(self):
        for i in range(self.n_points):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"ModelPath(n_points={self.n_points}, n_params={self.n_params}, "
            f"architecture={type(self.template).__name__}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def n_params(self) -> int:
        """Number of parameters of one point."""
        return sum(v[0].numel() for v in self.params.values())

    @property
    def has_batchnorm(self) -> bool:
        return bool(self.batchnorm_buffers)

    def to(self, device: torch.device | str) -> ModelPath:
        """Move the path to ``device`` in place and return it.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 3)
        >>> path.to("cpu").device.type
        'cpu'
        """
        self.template.to(device)
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.batchnorm_buffers = {k: v.to(device) for k, v in self.batchnorm_buffers.items()}
        self.alignment = {k: v.to(device) for k, v in self.alignment.items()}
        bn_names = set(self.batchnorm_buffers)
        self.shared_buffers = {k: v for k, v in self.template.named_buffers() if k not in bn_names}
        return self

    # -- persistence -------------------------------------------------------------------

    def save(self, file: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the path to ``file`` in the safetensors format; return the file's path.

        The file holds the stacked parameters and per-point BatchNorm statistics, the
        shared buffers, :attr:`t_`, the :attr:`strategy`, the :attr:`alignment`
        permutations, and a JSON record: the geoconnect and torch versions, the
        architecture (every module's class, every parameter's and buffer's name,
        shape and dtype, and a fingerprint of them), :attr:`metadata` and
        ``metadata``. Reading it runs no code (unlike ``pickle``), and a digest of
        the whole content makes a truncated or altered file fail to load. The file
        is written atomically: a crash leaves the previous file or the new one.

        A :attr:`shard` (a distributed chain's ``path_`` with ``gather=False``) is
        saved by every rank together: each writes its points to
        ``<stem>-<rank + 1>-of-<world size>.safetensors`` (five digits each, as
        Hugging Face's sharded checkpoints) next to ``file``, and rank 0 the index
        ``<file>.index.json``, whose path is returned; :meth:`load` of either name
        reads the whole path.

        Parameters
        ----------
        file : str or path-like
            Conventionally ``*.safetensors``; replaced if it exists.
        metadata : dict, optional
            More JSON-serialisable facts to store (they update :attr:`metadata`
            in the file, not on the path).

        Returns
        -------
        Path

        See Also
        --------
        load : read it back, given a module of the architecture.

        Examples
        --------
        >>> import tempfile, torch
        >>> from geoconnect import ModelPath
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> file = ModelPath.linear(a, b, 5).save(tempfile.mkdtemp() + "/path.safetensors")
        >>> path = ModelPath.load(file, template=torch.nn.Linear(4, 3))
        >>> torch.equal(path[-1](torch.ones(1, 4)), b(torch.ones(1, 4)))
        True
        """
        from .persistence import save_path

        return save_path(self, file, metadata)

    @classmethod
    def load(
        cls,
        file: str | os.PathLike,
        template: nn.Module,
        *,
        device: torch.device | str | None = None,
        output: Output = None,
    ) -> ModelPath:
        """Read a path :meth:`save` wrote.

        Parameters
        ----------
        file : str or path-like
            A file :meth:`save` wrote; or the index of a path saved in shards
            (``*.index.json``), or the name it was saved under: the whole path is
            read from every shard.
        template : nn.Module
            A module of the saved architecture (a fresh instance of your model
            class); its values are not used, it is copied, and it is checked against
            the file's record: the first difference (a parameter's name, shape or
            dtype, a buffer, a module's class) is named in a ``ValueError``.
        device : torch.device or str, optional
            Where the path lives; default the template's device. A path saved on one
            device and loaded on another computes the same logits (up to the
            devices' arithmetic).
        output : callable, optional
            Needed only for a path saved with a callable :attr:`output`, which a
            file cannot hold (its name is recorded): pass the same callable. A key
            or an index is restored from the file.

        Returns
        -------
        ModelPath

        Raises
        ------
        FileNotFoundError
            If ``file`` does not exist.
        ValueError
            If ``file`` is truncated, corrupted, of another format or kind, or was
            saved from another architecture.

        Examples
        --------
        >>> import tempfile, torch
        >>> from geoconnect import ModelPath
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> file = ModelPath.linear(a, b, 5).save(tempfile.mkdtemp() + "/path.safetensors")
        >>> ModelPath.load(file, template=torch.nn.Linear(4, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The template does not match the architecture saved in ...: parameter \
'weight' has shape (3, 4) in the file and (2, 4) in the template. ...
        """
        from .persistence import load_path

        return load_path(file, template, device, output)

    def export(self, point: int | float, X: object = None, *, batch_size: int = 256) -> nn.Module:
        """A standalone module of the architecture: point ``i``, or position ``t``.

        An ``int`` selects the point of that index (negative from the end); a
        ``float`` the position ``t`` ∈ [0, 1] along the path (:meth:`at`; a network
        with BatchNorm needs ``X`` between points). The module is a fresh copy of the
        architecture's class with its own weights, in eval mode, sharing nothing with
        the path; its ``state_dict()`` loads into an instance of your own class.

        Parameters
        ----------
        point : int or float
            A point's index, or a position t.
        X : array-like, tensor, Dataset or DataLoader, optional
            Data to recompute BatchNorm statistics on, for a t between points.
        batch_size : int, default=256

        Returns
        -------
        nn.Module

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
        >>> mine = torch.nn.Linear(4, 3)
        >>> _ = mine.load_state_dict(path.export(0.5).state_dict())
        >>> torch.equal(mine.weight, path.export(2).weight)
        True
        """
        if isinstance(point, bool) or not isinstance(point, (int, float, np.integer, np.floating)):
            raise TypeError(
                "point must be an int (a point's index) or a float (a position t in "
                f"[0, 1]); got {type(point).__name__}."
            )
        if isinstance(point, (int, np.integer)):
            return self[int(point)]
        return self.at(float(point), X, batch_size=batch_size)

    def __getstate__(self) -> dict:
        """Pickle on the CPU: a path fitted on a GPU unpickles on any machine.

        ``pickle`` runs code when it reads: unpickle only files you trust, and share
        paths with :meth:`save`. :func:`copy.deepcopy` keeps the device.
        """
        state = self.__dict__.copy()
        state["template"] = copy.deepcopy(self.template).to("cpu")
        for key in ("params", "batchnorm_buffers", "alignment"):
            state[key] = {k: v.to("cpu") for k, v in state[key].items()}
        bn_names = set(state["batchnorm_buffers"])
        state["shared_buffers"] = {
            k: v for k, v in state["template"].named_buffers() if k not in bn_names
        }
        return state

    def __deepcopy__(self, memo: dict) -> ModelPath:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def parameters_vector(self) -> Tensor:
        """All points' parameters, flattened: a tensor of shape (n_points, n_params).

        The order within a row is that of ``named_parameters()``.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 4)
        >>> path.parameters_vector().shape
        torch.Size([4, 6])
        """
        return torch.cat([v.reshape(self.n_points, -1) for v in self.params.values()], 1)

    def interior(self, *, trainable: bool = False) -> dict[str, Tensor]:
        """Views of the interior points' parameters: ``(n_points − 2, *shape)`` each.

        Writing into them moves the path; fitting optimises them in place, so the
        parameters are never held twice. ``trainable=True`` leaves out the
        :attr:`frozen` ones.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 4)
        >>> path.interior()["weight"].shape
        torch.Size([2, 2, 2])
        """
        return {
            name: stack[1:-1]
            for name, stack in self.params.items()
            if not (trainable and name in self.frozen)
        }

    @torch.no_grad()
    def copy_interior_from(self, other: ModelPath) -> None:
        """Set this path's interior parameters to ``other``'s (same ``n_points``).

        The ends and every BatchNorm statistic stay as they are.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> path, other = ModelPath.linear(a, b, 3), ModelPath.linear(b, a, 3)
        >>> path.copy_interior_from(other)
        >>> torch.equal(path.params["weight"][1], other.params["weight"][1])
        True
        """
        if other.n_points != self.n_points or set(other.params) != set(self.params):
            raise ValueError(
                f"copy_interior_from needs a path of the same architecture and "
                f"n_points={self.n_points}; got {other!r}."
            )
        for name, stack in self.params.items():
            stack[1:-1] = other.params[name][1:-1].to(stack.device)

    # -- modules -----------------------------------------------------------------------

    def _module_from(self, params: dict[str, Tensor], bn: dict[str, Tensor]) -> nn.Module:
        module = copy.deepcopy(self.template)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(params[name])
            if bn:
                buffers = dict(module.named_buffers())
                for name, value in bn.items():
                    buffers[name].copy_(value)
        for name, p in module.named_parameters():
            p.requires_grad_(name not in self.frozen)
        return module.eval()

    def at(self, t: float, X: object = None, *, batch_size: int = 256) -> nn.Module:
        """The module at position ``t`` ∈ [0, 1] along the path.

        Between two points the parameters are interpolated linearly; ``t`` is measured
        by :attr:`t_` (Fisher–Rao arc length for fitted paths). For a network with
        BatchNorm, a module between points needs ``X`` to recompute its statistics,
        since interpolated statistics are wrong.

        Parameters
        ----------
        t : float
            Position in [0, 1].
        X : array-like, tensor, Dataset or DataLoader, optional
            Data to recompute BatchNorm statistics on (needed only for BatchNorm
            networks between points).
        batch_size : int, default=256
            Batch size for that recomputation.

        Returns
        -------
        nn.Module
            A fresh module in eval mode.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> mid = ModelPath.linear(a, b, 3).at(0.25)
        >>> expected = 0.75 * a.weight + 0.25 * b.weight
        >>> torch.allclose(mid.weight, expected)
        True
        """
        self.check_whole("take a position t along")
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise TypeError(f"t must be a number in [0, 1]; got {t!r}.") from None
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1]; got {t}.")
        hits = np.flatnonzero(np.isclose(self.t_, t, rtol=0.0, atol=1e-12))
        if hits.size:
            return self[int(hits[0])]
        i = int(np.clip(np.searchsorted(self.t_, t, side="right") - 1, 0, self.n_points - 2))
        width = self.t_[i + 1] - self.t_[i]
        frac = 0.0 if width <= 0 else (t - self.t_[i]) / width
        params = {k: torch.lerp(v[i], v[i + 1], frac) for k, v in self.params.items()}
        if not self.has_batchnorm:
            return self._module_from(params, {})
        if X is None:
            raise ValueError(
                f"t={t} lies between points {i} and {i + 1} of a network with BatchNorm, "
                "whose statistics cannot be interpolated. Pass X to recompute them: "
                "path.at(t, X)."
            )
        from ._data import as_data

        module = self._module_from(params, {k: v[i] for k, v in self.batchnorm_buffers.items()})
        recompute_module_batchnorm(module, as_data(X, device=self.device), batch_size)
        return module

    # -- batched evaluation ------------------------------------------------------------

    def functional_forward(
        self,
        params: dict[str, Tensor],
        x: Inputs,
        batchnorm_buffers: dict[str, Tensor] | None = None,
        *,
        module: nn.Module | None = None,
        strategy: Strategy | None = None,
        stacked_x: bool = False,
    ) -> Tensor:
        """Logits of a stack of K points on one batch: shape (K, batch, n_classes).

        ``params`` holds tensors ``(K, *shape)``; ``batchnorm_buffers`` likewise, or
        ``None`` with a ``module`` whose BatchNorm layers use batch statistics. ``x``
        is a tensor or a mapping of keyword tensors; with ``stacked_x`` each of its
        tensors has a leading axis of K, and point k sees its k-th batch. The stack
        is evaluated with ``torch.func.vmap`` or a Python loop, by ``strategy``
        (default :attr:`strategy`); the logits are read off each output by
        :attr:`output`.
        """
        module = self.template if module is None else module
        bn = batchnorm_buffers or {}
        args, kwargs = arguments(x)

        def one(
            p: dict[str, Tensor], b: dict[str, Tensor], a: tuple, kw: dict[str, Tensor]
        ) -> Tensor:
            out = functional_call(
                module, (p, b, self.shared_buffers), a, kw, tie_weights=self._tied
            )
            return extract_logits(out, self.output)

        x_dim = 0 if stacked_x else None
        if (strategy or self.strategy) == "vmap":
            dims = (0, 0, x_dim, x_dim)
            return vmap(one, in_dims=dims, randomness="same")(params, bn, args, kwargs)
        names, stacks = list(params), [params[n].unbind(0) for n in params]
        bn_names, bn_stacks = list(bn), [bn[n].unbind(0) for n in bn]
        outputs = []
        for k in range(len(stacks[0])):
            p = {n: s[k] for n, s in zip(names, stacks)}
            b = {n: s[k] for n, s in zip(bn_names, bn_stacks)}
            a = tuple(v[k] for v in args) if stacked_x else args
            kw = {n: v[k] for n, v in kwargs.items()} if stacked_x else kwargs
            outputs.append(one(p, b, a, kw))
        return torch.stack(outputs)

    @torch.no_grad()
    def logits(
        self,
        x: Inputs,
        points: slice | Sequence[int] | None = None,
        *,
        strategy: Strategy | None = None,
    ) -> Tensor:
        """Eval-mode logits of the points on a batch: shape (n_points, batch, n_classes).

        Parameters
        ----------
        x : Tensor of shape (batch, *input_shape), or dict of str to Tensor
            A batch on the path's device: one tensor, or the keyword arguments of
            the architecture's forward.
        points : slice or sequence of int, optional
            Which points (a contiguous block, or indices); default all.
        strategy : {"vmap", "loop"}, optional
            How to evaluate them; default :attr:`strategy`.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> path = ModelPath.linear(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), 5)
        >>> path.logits(torch.zeros(8, 4)).shape
        torch.Size([5, 8, 3])
        """
        points = slice(None) if points is None else points
        params = {k: v[points] for k, v in self.params.items()}
        bn = {k: v[points] for k, v in self.batchnorm_buffers.items()}
        return self.functional_forward(params, x, bn, strategy=strategy)

    def batch_statistics_module(self) -> nn.Module:
        """A copy of the template whose BatchNorm layers always use batch statistics.

        Used during fitting: interior points have no valid running statistics yet.
        Dropout is off (eval mode).
        """
        module = copy.deepcopy(self.template)
        replace_all_batch_norm_modules_(module)
        return module.eval()

    # -- BatchNorm ----------------------------------------------------------------------

    def recompute_batchnorm(
        self, data: object, points: Iterable[int] | None = None, *, batch_size: int = 256
    ) -> None:
        """Recompute the BatchNorm statistics of ``points`` (default: interior) on data.

        As ``torch.optim.swa_utils.update_bn`` does: statistics reset, then the
        cumulative average over one pass of the data, with dropout off.

        Parameters
        ----------
        data : array-like, tensor, Dataset or DataLoader
            The inputs.
        points : iterable of int, optional
            Which points; default all but the ends, which keep their own statistics.
        batch_size : int, default=256
            Batch size of the pass.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> path = ModelPath.linear(net(), net(), 3)
        >>> path.recompute_batchnorm(torch.randn(64, 3))
        >>> bool(path.batchnorm_buffers["1.running_mean"][1].abs().sum() > 0)
        True
        """
        if not self.has_batchnorm:
            return
        from ._data import StreamData, TensorData, as_data

        source = (
            data
            if isinstance(data, (TensorData, StreamData))
            else as_data(data, device=self.device)
        )
        points = list(range(1, self.n_points - 1) if points is None else points)
        if not points:
            return
        if self.strategy == "vmap":
            try:
                statistics = self._batchnorm_statistics(source, points, batch_size)
            except Exception:  # a model vmap cannot trace uses the loop
                statistics = None
            if statistics is not None:
                for name, value in statistics.items():
                    self.batchnorm_buffers[name][points] = value.to(
                        self.batchnorm_buffers[name].dtype
                    )
                return
        for i in points:
            module = self[i]
            recompute_module_batchnorm(module, source, batch_size)
            buffers = dict(module.named_buffers())
            for name, stack in self.batchnorm_buffers.items():
                stack[i] = buffers[name].detach()

    @torch.no_grad()
    def _batchnorm_statistics(
        self, data: object, points: list[int], batch_size: int
    ) -> dict[str, Tensor] | None:
        """The statistics ``recompute_module_batchnorm`` gives, for all points at once.

        One vmapped forward per batch through a copy whose BatchNorm layers use batch
        statistics; pre-hooks record each layer's batch mean and unbiased variance, and
        the cumulative average over batches (``momentum=None``) is their plain mean.
        None where that would not be the loop's result (the loop then runs).
        """
        module = self.batch_statistics_module()
        layers = self._tracked_batchnorm_layers(module)
        if layers is None:
            return None
        moments = self._batch_moments(module, layers, data, points, batch_size)
        if moments is None:
            return None
        sums, n_batches = moments
        statistics: dict[str, Tensor] = {}
        for k, name in enumerate(layers):
            statistics[f"{name}.running_mean"] = sums[2 * k] / n_batches
            statistics[f"{name}.running_var"] = sums[2 * k + 1] / n_batches
            counter = f"{name}.num_batches_tracked"
            if counter in self.batchnorm_buffers:
                statistics[counter] = torch.full(
                    (len(points),), n_batches, dtype=torch.long, device=self.device
                )
        return statistics

    def _tracked_batchnorm_layers(self, module: nn.Module) -> dict[str, _BatchNorm] | None:
        """``module``'s BatchNorm layers whose statistics the path holds, by name; None
        unless they are all of them and each averages cumulatively or by momentum."""
        layers = {
            name: m
            for name, m in module.named_modules()
            if isinstance(m, _BatchNorm)
            and f"{name}.running_mean" in self.batchnorm_buffers
            and f"{name}.running_var" in self.batchnorm_buffers
        }
        tracked = {
            name[: -len(".running_mean")]
            for name in self.batchnorm_buffers
            if name.endswith(".running_mean")
        }
        if set(layers) != tracked or any(m.momentum == 0 for m in layers.values()):
            return None
        return layers

    def _batch_moments(
        self,
        module: nn.Module,
        layers: dict[str, _BatchNorm],
        data: object,
        points: list[int],
        batch_size: int,
    ) -> tuple[list[Tensor], int] | None:
        """Each layer's batch mean and unbiased variance at every point, summed over
        the batches (float64, ``[mean, var]`` per layer in ``layers``' order), and
        the number of batches; None on a batch of one sample, which the loop skips."""
        recorded: list[tuple[Tensor, Tensor]] = []

        def record(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            n = x.numel() // x.shape[1]
            dims = [0, *range(2, x.ndim)]
            recorded.append((x.mean(dim=dims), x.var(dim=dims, unbiased=n > 1)))

        def one(p: dict[str, Tensor], x: Inputs) -> tuple[Tensor, ...]:
            recorded.clear()
            args, kwargs = arguments(x)
            functional_call(module, (p, self.shared_buffers), args, kwargs)
            return tuple(t for pair in recorded for t in pair)

        params = {k: v[points] for k, v in self.params.items()}
        handles = [m.register_forward_pre_hook(record) for m in layers.values()]
        sums: list[Tensor] | None = None
        n_batches = 0
        try:
            for batch in data.batches(batch_size):  # type: ignore[attr-defined]
                if n_rows(batch.x) < 2:
                    return None  # the loop skips it, and says so
                out = vmap(one, in_dims=(0, None), randomness="same")(params, batch.x)
                parts = [o.double() for o in out]
                sums = parts if sums is None else [s + o for s, o in zip(sums, parts)]
                n_batches += 1
        finally:
            for handle in handles:
                handle.remove()
        if sums is None or len(sums) != 2 * len(layers):
            return None
        return sums, n_batches


def _interpolated(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """``(1 − t_i) a + t_i b`` for each ``t_i``, in float64, stacked in ``a``'s dtype.

    Point by point: the temporaries are a few points' worth, not the whole stack's
    in float64 (for 25 points, six paths' worth).
    """
    stack = torch.empty((len(t), *a.shape), dtype=a.dtype, device=a.device)
    a64, b64 = a.double(), b.double()
    for i, w in enumerate(t.reshape(-1, *([1] * a.ndim))):
        stack[i] = ((1 - w) * a64 + w * b64).to(a.dtype)
    return stack


def _check_frozen(name: str, a: Tensor, b: Tensor, stack: Tensor) -> None:
    """A parameter frozen in both models stays at its common value; or is said to move."""
    if torch.equal(a, b):
        stack.copy_(a.expand_as(stack))  # exactly the common value, at every point
        return
    warnings.warn(
        f"Parameter {name!r} is frozen (requires_grad=False) in both models but its "
        "values differ between them: the path interpolates it between the ends, and "
        "fitting leaves it there.",
        UserWarning,
        stacklevel=3,
    )


def _has_tied_tensors(module: nn.Module) -> bool:
    """Whether a parameter or buffer is reachable under two names."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return len({id(tensor) for _, tensor in named}) != len(named)


@torch.no_grad()
def recompute_module_batchnorm(module: nn.Module, data: object, batch_size: int) -> None:
    """Reset and recompute the running statistics of ``module``'s BatchNorm layers."""
    if not has_batchnorm(module):
        return
    batchnorms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    momenta = {}
    module.eval()
    for bn in batchnorms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # cumulative average over the pass
        bn.train()
    used = skipped = 0
    for batch in data.batches(batch_size):  # type: ignore[attr-defined]
        if n_rows(batch.x) < 2:  # no batch statistics from one sample
            skipped += 1
            continue
        call(module, batch.x)
        used += 1
    for bn in batchnorms:
        bn.momentum = momenta[bn]
    module.eval()
    if used == 0:
        raise ValueError(
            "BatchNorm statistics need batches of two or more samples, and X gave none: "
            f"set batch_size ≥ 2 (now {batch_size}) or pass more samples."
        )
    if skipped:
        warnings.warn(
            f"{skipped} batch(es) of one sample were left out of the recomputed BatchNorm "
            "statistics (one sample has no batch statistics). Give the DataLoader a "
            "batch_size that does not leave one sample over (or drop_last=True).",
            UserWarning,
            stacklevel=2,
        )
