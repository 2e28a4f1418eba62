"""Distributed fitting on ``torch.distributed``: a chain's points, or a curve's data,
split across processes.

**A chain is path-parallel.** The geodesic energy couples neighbouring points only
through their predictions on a shared batch, so a path splits cleanly across
processes (ranks)::

    rank 0              rank 1              rank 2
    a ─ 1 ─ 2 ─ 3 ═══ 4 ─ 5 ─ 6 ─ 7 ═══ 8 ─ 9 ─ 10 ─ b
        └ block 0 ┘     └─ block 1 ──┘     └ block 2 ┘

Rank r holds and optimises a contiguous block of the interior points, with the two
ends (:meth:`PathGroup.keep_block`: a shard of the path). Every rank draws the
same batches (the same ``random_state``). At each step every rank evaluates its
block's first and last points, and the ranks exchange those logits — two
(batch × classes) tensors per rank, whatever the model's size; then each rank
differentiates the segments that touch its block, the segment ``═`` that straddles
a boundary on both sides, each with the other side's logits detached, so each rank
gets exactly its own points' gradient. After each epoch the segment sums are added
up across ranks (so every rank records the same energy and stops at the same
epoch). At each coarse-to-fine level and at the end the blocks are broadcast from
their owners (:meth:`PathGroup.whole_path`), so that every rank holds the whole
path then; the block's starting copy, gradients, optimiser moments and activations
never leave it. On the CPU the ranks talk over gloo, on GPUs over NCCL.

**A curve is data-parallel** (the continuous geodesic, ``CurveConnector``): every
rank holds the bends; a step takes one batch of the shared batch order per rank,
each rank its own at its own draws of ``t``, and :meth:`PathGroup.sum` adds up the
bends' gradients (one bucket a step); rank 0's bends are broadcast at the end
(:meth:`PathGroup.share_from_first`). See ``geoconnect.curves.fit_curve``.

A rank that dies makes the others' next collective raise :class:`RankLostError`,
naming it (:meth:`PathGroup.naming_the_lost`).

:class:`PathGroup` is the engine's view of the process group: which block is
whose, and the collectives the fits need. The connectors make one with
:meth:`PathGroup.from_environment` under ``distributed=True``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .path import ModelPath, Shard

__all__ = ["PathGroup", "RankLostError", "block_bounds"]

#: How long a rank waits for the others at a collective before it raises, when
#: geoconnect initialises the process group itself.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def block_bounds(n_interior: int, world_size: int) -> list[tuple[int, int]]:
    """Each rank's block of interior points, ``[start, stop)`` in interior indices.

    Contiguous blocks whose sizes differ by at most one, the larger ones first; a rank
    gets an empty block when there are fewer interior points than ranks.

    Examples
    --------
    >>> from geoconnect.distributed import block_bounds
    >>> block_bounds(23, 2)
    [(0, 12), (12, 23)]
    >>> block_bounds(2, 3)
    [(0, 1), (1, 2), (2, 2)]
    """
    base, extra = divmod(n_interior, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class PathGroup:
    """A process group fitting one path, a block of its points per rank.

    Parameters
    ----------
    rank, world_size : int
        This process's rank and the number of ranks.
    group : ProcessGroup, optional
        The torch.distributed group; default the default group.

    Attributes
    ----------
    counts : dict of str to int
        What this rank has sent: ``steps`` (exchanges of boundary logits),
        ``exchanged_bytes`` (their bytes), ``shared_bytes`` (the parameters of its
        blocks, broadcast after each epoch) and ``reduced_bytes`` (segment sums).
        A fitted connector reports them as ``communication_``.

    Examples
    --------
    >>> from geoconnect.distributed import PathGroup
    >>> PathGroup(rank=1, world_size=2).block(23)
    slice(12, 23, None)
    """

    rank: int
    world_size: int
    group: object = None
    #: Each rank's host name and process id, in rank order (gathered when the
    #: connector makes the group): what names a rank that died.
    members: list[tuple[str, int]] = field(default_factory=list, compare=False)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("steps", "exchanged_bytes", "shared_bytes", "reduced_bytes"), 0
        ),
        compare=False,
    )

    @classmethod
    def from_environment(cls, device: torch.device) -> PathGroup:
        """The default process group, initialised from torchrun's variables if needed.

        Raises a clear ``ValueError`` when there is no process group and no torchrun
        environment to make one from.
        """
        if not dist.is_available():
            raise ValueError(
                "distributed=True needs torch.distributed, which this PyTorch build "
                "lacks. Install a build with it, or set distributed=False."
            )
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if v not in os.environ]
            if missing:
                raise ValueError(
                    "distributed=True needs an initialised torch.distributed process "
                    "group, or torchrun's environment to make one (missing "
                    f"{', '.join(missing)}). Launch the script with torchrun, e.g. "
                    "torchrun --nproc_per_node=2 script.py, or call "
                    "torch.distributed.init_process_group first; or set "
                    "distributed=False."
                )
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=DEFAULT_TIMEOUT)
            # The group is geoconnect's: it is taken down when the script ends, unless
            # the script does it first. Left to the interpreter's teardown, a rank
            # whose communication threads are still running aborts ("terminate called
            # without an active exception": 1 launch in about 30 of the tests').
            atexit.register(_destroy_if_initialised)
        group = cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        group.members = group.gather((socket.gethostname(), os.getpid()))  # type: ignore[assignment]
        return group

    @classmethod
    def of_shard(cls, shard: Shard) -> PathGroup:
        """The group a shard was fitted in: this process must be its rank, in an
        initialised process group of its world size (else a ``ValueError``)."""
        here = (
            (dist.get_rank(), dist.get_world_size())
            if dist.is_available() and dist.is_initialized()
            else None
        )
        if here != (shard.rank, shard.world_size):
            raise ValueError(
                f"This path is rank {shard.rank}'s shard of a path split across "
                f"{shard.world_size} ranks: it is evaluated by every rank of the fit's "
                "process group together, each with its own shard (here: "
                f"{'no process group' if here is None else f'rank {here[0]} of {here[1]}'}). "
                "Elsewhere, save the shards on every rank (path_.save) and load the whole "
                "path with ModelPath.load."
            )
        return cls(rank=shard.rank, world_size=shard.world_size)

    # -- which points are whose -------------------------------------------------------

    def block(self, n_interior: int) -> slice:
        """This rank's interior points (interior indices) of a level."""
        start, stop = block_bounds(n_interior, self.world_size)[self.rank]
        return slice(start, stop)

    def owned_segments(self, n_interior: int) -> slice:
        """The segments whose sums this rank reports: from its block's left neighbour
        to its last point, and the last rank also the one to ``b``.

        Segment ``s`` joins points ``s`` and ``s + 1`` of the level (ends included).
        """
        block = self.block(n_interior)
        stop = block.stop + 1 if block.stop == n_interior else block.stop
        return slice(block.start, stop)

    # -- the collectives ---------------------------------------------------------------

    def neighbours(
        self, first: Tensor, last: Tensor, n_interior: int, *, step: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Exchange boundary logits: the points just before and after this block.

        ``first`` and ``last`` are this block's first and last points' logits (any
        tensors of one shape for an empty block). Returns the logits of the point
        before the block and the point after it, or None where that point is the
        fixed end ``a`` or ``b``. ``step=False``: an exchange to measure the
        energy, counted with the sums (``reduced_bytes``), not as a step's.
        """
        mine = torch.stack([first, last]).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self.naming_the_lost("exchanging the boundary logits"):
            dist.all_gather(gathered, mine, group=self.group)
        self.counts["steps"] += step
        self.counts["exchanged_bytes" if step else "reduced_bytes"] += _nbytes(mine)
        bounds = block_bounds(n_interior, self.world_size)
        start, stop = bounds[self.rank]
        owners = [r for r, (lo, hi) in enumerate(bounds) if hi > lo]
        left = next((gathered[r][1] for r in reversed(owners) if bounds[r][1] == start), None)
        right = next((gathered[r][0] for r in owners if bounds[r][0] == stop), None)
        return left, right

    def gather_tensor(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (of one shape on every rank), in rank order."""
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self.naming_the_lost("gathering the ranks' values"):
            dist.all_gather(gathered, tensor.contiguous(), group=self.group)
        self.counts["reduced_bytes"] += _nbytes(tensor)
        return gathered

    def sum(self, tensor: Tensor, *, step: bool = False) -> Tensor:
        """``tensor`` summed over the ranks, in place; returned. ``step=True``
        counts it as a step's exchange (a data-parallel curve's gradients)."""
        self.counts["steps"] += step
        with self.naming_the_lost("adding up across the ranks"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        self.counts["reduced_bytes"] += _nbytes(tensor)
        return tensor

    @torch.no_grad()
    def share_points(self, stacks: dict[str, Tensor], n_interior: int) -> None:
        """Broadcast each block's parameters from its owner: every rank the whole path.

        ``stacks`` are a level's parameter stacks ``(n_interior + 2, *shape)``.
        """
        for owner, (start, stop) in enumerate(block_bounds(n_interior, self.world_size)):
            if stop == start:
                continue
            for stack in stacks.values():
                block = stack[1 + start : 1 + stop]
                with self.naming_the_lost(f"sharing rank {owner}'s points"):
                    dist.broadcast(block, src=owner, group=self.group)
                if owner == self.rank:
                    self.counts["shared_bytes"] += _nbytes(block)

    def keep_block(self, path: ModelPath) -> ModelPath:
        """This rank's shard of a whole path: copies of the ends and of its block.

        Examples
        --------
        >>> import torch
        >>> from geoconnect import ModelPath
        >>> from geoconnect.distributed import PathGroup
        >>> path = ModelPath.linear(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 25)
        >>> shard = PathGroup(rank=1, world_size=2).keep_block(path)
        >>> shard.n_points, shard.shard
        (13, Shard(start=12, stop=23, n_points=25, rank=1, world_size=2))
        """
        if path.shard is not None:
            raise ValueError(f"keep_block needs a whole path; got a shard ({path.shard}).")
        block = self.block(path.n_points - 2)
        shard = Shard(block.start, block.stop, path.n_points, self.rank, self.world_size)
        return path.select(shard.points, shard)

    @torch.no_grad()
    def whole_path(self, shard: ModelPath) -> ModelPath:
        """The whole path of every rank's :meth:`keep_block` shard, on every rank.

        Each block is broadcast from its owner (see :meth:`share_points`); the
        positions ``t_`` are the evenly spaced ones.
        """
        if shard.shard is None:
            raise ValueError("whole_path needs a shard (PathGroup.keep_block's).")
        n_points, points = shard.shard.n_points, shard.shard.points

        def whole(stacks: dict[str, Tensor]) -> dict[str, Tensor]:
            out = {}
            for name, local in stacks.items():
                out[name] = local.new_empty((n_points, *local.shape[1:]))
                out[name][points] = local  # the ends and this rank's block
            self.share_points(out, n_points - 2)
            return out

        path = shard.holding(whole(shard.params), whole(shard.batchnorm_buffers))
        path.metadata = dict(shard.metadata)
        return path

    @torch.no_grad()
    def point_before(self, shard: ModelPath) -> dict[str, Tensor]:
        """The parameters of the point just before this rank's block: the left
        neighbour's last point, sent by it (``a``, held, for the first block).

        Every rank takes part, each owner of a block sending its last point once.
        """
        assert shard.shard is not None
        n_interior = shard.shard.n_points - 2
        bounds = block_bounds(n_interior, self.world_size)
        before = {name: stack[0] for name, stack in shard.params.items()}
        for owner, (start, stop) in enumerate(bounds):
            if stop == start or stop == n_interior:
                continue  # no block, or the last: nobody's point before
            mine = owner == self.rank
            taker = bounds[self.rank][0] == stop and bounds[self.rank][1] > stop
            for name, stack in shard.params.items():
                buffer = stack[-2] if mine else torch.empty_like(stack[0])
                with self.naming_the_lost(f"sending rank {owner}'s last point"):
                    dist.broadcast(buffer, src=owner, group=self.group)
                if mine:
                    self.counts["shared_bytes"] += _nbytes(buffer)
                if taker:
                    before[name] = buffer
        return before

    @torch.no_grad()
    def share_from_first(self, tensors: dict[str, Tensor]) -> None:
        """Broadcast ``tensors`` from rank 0, in place: the same values on every rank.

        A data-parallel curve's bends after its fit: the ranks took the same steps,
        and this makes their bends the same to the bit whatever the collectives'
        rounding did.
        """
        for tensor in tensors.values():
            with self.naming_the_lost("sharing rank 0's curve"):
                dist.broadcast(tensor, src=0, group=self.group)
            if self.rank == 0:
                self.counts["shared_bytes"] += _nbytes(tensor)

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (a picklable object), in rank order."""
        values: list[object] = [None] * self.world_size
        with self.naming_the_lost("gathering the ranks' records"):
            dist.all_gather_object(values, value, group=self.group)
        return values

    @contextlib.contextmanager
    def naming_the_lost(self, what: str) -> Iterator[None]:
        """A collective that fails because a rank is gone raises ``RankLostError``
        naming it (and its host and process) instead of the backend's error.

        A rank killed mid-fit (the out-of-memory killer, a node lost, ``kill -9``)
        closes its connections: the others' next collective fails at once, and
        each names the rank that died — on its host, the rank whose process no longer
        runs; on another host, the ranks there. A rank that hangs without dying
        makes the others fail when the group's timeout runs out
        (:data:`DEFAULT_TIMEOUT` when geoconnect initialises the group).
        """
        try:
            yield
        except RuntimeError as error:  # torch's DistBackendError is one
            if isinstance(error, RankLostError):
                raise
            message = self._lost_message(what, error)
            if message is None:  # not a lost rank: the backend's error as it is
                raise
            raise RankLostError(message) from error

    def _lost_message(self, what: str, error: BaseException) -> str | None:
        """Which ranks are gone, as far as this rank can tell, and what to do; None
        when none is and the error does not read as a lost connection."""
        here = socket.gethostname()
        lost = any(sign in str(error).lower() for sign in _LOST_SIGNS)
        dead = _ended([pid if host == here else None for host, pid in self.members])
        away = [r for r, (host, _) in enumerate(self.members) if host != here]
        if dead:
            who = ", ".join(f"rank {r} (pid {self.members[r][1]})" for r in dead)
            gone = "is gone: its process" if len(dead) == 1 else "are gone: their processes"
            who = f"{who} {gone} on {here} ended"
        elif not lost:
            return None
        elif away:
            who = f"a rank on another host stopped answering (ranks {_listed(away)})"
        else:
            who = "another rank stopped answering"
        return (
            f"distributed fit: {who}, so rank {self.rank} stops too (found while {what}; "
            "the backend's error is above). Look at that rank's output for why it ended "
            "(a full memory is a common cause); a fit with checkpoint=DIR resumes from "
            "the last epoch every rank wrote."
        )

    @contextlib.contextmanager
    def warnings_once(self) -> Iterator[None]:
        """Warnings given inside: gathered from every rank and given once, by rank 0.

        The ranks of a fit compute the same energies and stop together, so each
        would give the same warnings; torchrun's output would show every one once per
        rank. Inside this context each rank records its warnings (the filters in
        force still decide which: an ``"error"`` filter still raises, ``"ignore"``
        still drops), and at the end rank 0 gives each distinct warning once, at the
        place it was raised. A warning that not every rank gave names the ranks that
        did. If the block raises, there is no collective (another rank may never
        reach it): each rank gives its own warnings, then the error propagates.

        Examples
        --------
        >>> import warnings
        >>> from geoconnect.distributed import PathGroup
        >>> group = PathGroup(rank=0, world_size=1)
        >>> group.gather = lambda value: [value]  # what one rank's all_gather returns
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     with group.warnings_once():
        ...         warnings.warn("energy rose", RuntimeWarning)
        >>> [str(w.message) for w in caught]
        ['energy rose']
        """
        failed: BaseException | None = None
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except BaseException as error:  # Ctrl-C included: the same path out
                failed = error
        mine = [(w.category, str(w.message), w.filename, w.lineno) for w in caught]
        if failed is not None:
            for category, message, filename, lineno in mine:
                warnings.warn_explicit(message, category, filename, lineno)
            raise failed
        every = self.gather(mine)
        if self.rank != 0:
            return
        for (category, message, filename, lineno), ranks in _distinct(every).items():
            if len(ranks) < self.world_size:
                message += f" (on rank{'s' if len(ranks) > 1 else ''} {_listed(ranks)} only)"
            warnings.warn_explicit(message, category, filename, lineno)

    def check_same(self, what: str, value: str) -> None:
        """Raise on every rank when ``value`` differs between ranks, naming ``what``."""
        values = self.gather(value)
        differing = [r for r, v in enumerate(values) if v != values[0]]
        if differing:
            raise ValueError(
                f"distributed=True: the ranks were given different {what} (rank "
                f"{differing[0]} differs from rank 0). Every rank must fit the same "
                "models on the same X with the same parameters (random_state included)."
            )


class RankLostError(RuntimeError):
    """A rank of a distributed fit died or stopped answering; the message names it.

    Raised on the ranks that are left, by the collective that found it out, in place
    of the backend's error (kept as ``__cause__``).

    Examples
    --------
    >>> from geoconnect.distributed import RankLostError
    >>> issubclass(RankLostError, RuntimeError)
    True
    """


#: Words of the backends' errors when a peer is gone or silent (gloo's, NCCL's).
_LOST_SIGNS = (
    "connection",
    "closed",
    "peer",
    "broken pipe",
    "socket",
    "eof",
    "timed out",
    "timeout",
)


#: How long a rank whose connection to another closed waits for that process to be
#: seen ended (a killed process closes its sockets before it is gone).
_SETTLE_SECONDS = 3.0


def _ended(pids: list[int | None]) -> list[int]:
    """The ranks whose process (``pids``, None for another host's) has ended, checked
    again for up to ``_SETTLE_SECONDS`` until one has (only a failed collective asks)."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while True:
        dead = [r for r, pid in enumerate(pids) if pid is not None and not _alive(pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:  # no /proc (not Linux): it answered the signal
        return True


def _destroy_if_initialised() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _distinct(every: list) -> dict[tuple, list[int]]:
    """Each distinct warning of the ranks' lists, in order of first sight, and its ranks."""
    seen: dict[tuple, tuple[tuple, list[int]]] = {}  # (category, message) -> warning, ranks
    for rank, caught in enumerate(every):
        for warning in caught:
            key = warning[:2]  # category and message; the first place it was raised
            if key not in seen:
                seen[key] = (warning, [])
            if rank not in seen[key][1]:
                seen[key][1].append(rank)
    return {warning: ranks for warning, ranks in seen.values()}


def _listed(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:-1])) + (" and " if len(ranks) > 1 else "") + str(ranks[-1])


def _nbytes(tensor: Tensor) -> int:
    return tensor.element_size() * tensor.nelement()
