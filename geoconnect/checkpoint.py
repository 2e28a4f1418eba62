"""Crash-safe checkpoints of a geodesic fit: written after every epoch, resumed by a refit.

``GeodesicConnector(checkpoint=DIR)`` keeps one file, ``DIR/checkpoint.safetensors``,
holding the whole state of the fit after its last complete epoch: the current level's
path, the optimiser's moments, the random generators' states, the epoch counters and
early-stopping counters, and the history (see :meth:`geoconnect.fitting.FitState.snapshot`).
Each epoch replaces it atomically (:func:`geoconnect.persistence.write_file`), so a
crash, a ``SIGKILL`` or a power cut leaves the previous epoch's checkpoint whole.

The file also records a fingerprint of the fit — its parameters, the two models, the
starting path, the data and the architecture. A later fit with the same checkpoint
directory resumes from it only when every one of them agrees, and otherwise refuses,
naming what differs: a checkpoint is never resumed into another fit, and never
overwritten by one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .persistence import read_file, write_file

__all__ = ["Checkpoint"]

#: What each part of a fingerprint stands for, in the refusal's words.
_PARTS = {
    "parameters": "the estimator's parameters differ",
    "architecture": "the models' architecture differs",
    "models": "model_a or model_b (the path's ends) differs",
    "start": "the path the fit starts from (warm_start's previous path_) differs",
    "data": "X differs",
}


class Checkpoint:
    """The checkpoint of one fit in a directory; open it with :meth:`open`.

    Parameters
    ----------
    directory : Path
    fingerprint : dict
        What identifies the fit (JSON-serialisable): compared, part by part, with a
        checkpoint found in ``directory``.

    files : sequence of str, default=("checkpoint.safetensors",)
        The file names the checkpoint is written to, in turn: one (replaced at every
        write) in one process; two per rank in a distributed fit, so that a crash
        while the ranks write still leaves an epoch that every rank has.

    Attributes
    ----------
    file : Path
        The file the next :meth:`write` replaces.
    saved : tuple of (dict of str to Tensor, dict) or None
        The found checkpoint's tensors and record (the latest epoch's of
        :attr:`found`), to resume from; None for a fit that starts afresh.
    found : list of tuple of (dict of str to Tensor, dict)
        Every checkpoint found in the directory under :attr:`files`.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect.checkpoint import Checkpoint
    >>> directory = tempfile.mkdtemp()
    >>> checkpoint = Checkpoint.open(directory, {"parameters": {"n_points": 5}})
    >>> checkpoint.saved is None
    True
    >>> checkpoint.write({"w": torch.ones(2)}, {"level": 0})
    >>> Checkpoint.open(directory, {"parameters": {"n_points": 5}}).saved[1]
    {'level': 0}
    >>> Checkpoint.open(directory, {"parameters": {"n_points": 7}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The checkpoint ... was made by another fit: parameter n_points is 5 there ...
    """

    FILENAME = "checkpoint.safetensors"

    def __init__(
        self, directory: Path, fingerprint: dict[str, Any], files: Sequence[str] = (FILENAME,)
    ):
        self.directory = Path(directory)
        self._files = [self.directory / name for name in files]
        self.file = self._files[0]
        self.fingerprint = fingerprint
        self.saved: tuple[dict[str, Tensor], dict[str, Any]] | None = None
        self.found: list[tuple[dict[str, Tensor], dict[str, Any]]] = []

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        fingerprint: dict[str, Any],
        files: Sequence[str] = (FILENAME,),
    ) -> Checkpoint:
        """Check ``directory`` before the fit: writable, and any checkpoint in it this fit's.

        Creates the directory if needed. Reads a checkpoint found there into
        :attr:`saved` when its fingerprint equals ``fingerprint``.

        Raises
        ------
        ValueError
            If the directory cannot be created or written to, or holds a checkpoint
            that is corrupted or made by another fit (the message names what differs).
        """
        checkpoint = cls(cls.check_directory(directory), fingerprint, files)
        epochs = []
        for file in checkpoint._files:
            if file.exists():
                checkpoint.file = file
                checkpoint.found.append(checkpoint._read())
                epochs.append((checkpoint_epochs(checkpoint.found[-1][1]), file))
        if checkpoint.found:
            latest = max(range(len(epochs)), key=lambda k: epochs[k][0])
            checkpoint.saved = checkpoint.found[latest]
            checkpoint.file = epochs[latest][1]
            checkpoint._advance()  # the next write keeps the latest
        else:
            checkpoint.file = checkpoint._files[0]
        return checkpoint

    @staticmethod
    def check_directory(directory: str | os.PathLike) -> Path:
        """Create ``directory`` if needed and check that files can be written in it.

        Raises
        ------
        TypeError
            If ``directory`` is not a path.
        ValueError
            If it cannot be created or written to (the message names it).
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"checkpoint must be a directory path (str or os.PathLike); got "
                f"{type(directory).__name__}."
            )
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"checkpoint={str(directory)!r} is a file, not a directory. Pass a directory "
                "(it is created if needed); the fit keeps checkpoint.safetensors in it."
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(
                f"checkpoint={str(directory)!r} cannot be used: {exc.strerror or exc} "
                f"({type(exc).__name__}). Pass a directory the fit can create and write to."
            ) from None
        return directory

    def _read(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        try:
            tensors, header = read_file(self.file, "checkpoint")
        except (ValueError, OSError) as exc:
            raise ValueError(
                f"{exc} The fit does not overwrite it: delete {self.file} to start afresh, "
                "or pass another checkpoint directory."
            ) from None
        saved = header.get("fingerprint", {})
        for part, label in _PARTS.items():
            mine, theirs = self.fingerprint.get(part), saved.get(part)
            if mine == theirs:
                continue
            if part == "parameters" and isinstance(mine, dict) and isinstance(theirs, dict):
                name = next(k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k))
                what = (
                    f"parameter {name} is {theirs.get(name, 'unset')} there and "
                    f"{mine.get(name, 'unset')} now"
                )
            else:
                what = label
            raise ValueError(
                f"The checkpoint {self.file} was made by another fit: {what}. Resuming it "
                "would not give this fit's path, and the fit does not overwrite it: pass "
                f"another checkpoint directory, or delete {self.file} to start afresh."
            )
        return tensors, header["state"]

    def write(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Replace the checkpoint, atomically, with ``tensors`` and the record ``state``."""
        header = {"kind": "checkpoint", "fingerprint": self.fingerprint, "state": state}
        write_file(self.file, tensors, header)
        self._advance()

    def _advance(self) -> None:
        """Make the next of :attr:`files` (in turn) the one the next write replaces."""
        self.file = self._files[(self._files.index(self.file) + 1) % len(self._files)]


def checkpoint_epochs(state: dict[str, Any]) -> int:
    """The number of epochs a checkpoint's record has run."""
    return len(state.get("history", {}).get("energy", []))
