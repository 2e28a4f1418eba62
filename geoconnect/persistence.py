"""Paths and fit states on disk, in the safetensors format: reading a file runs no code.

Every file geoconnect writes is a [safetensors](https://huggingface.co/docs/safetensors)
file — the weights format of the field, which holds raw tensors and a JSON header and
so, unlike ``pickle`` or ``torch.load``, cannot execute code when read. Its header
carries geoconnect's own record (what the file is, the architecture it was saved
from, the fit's numbers) and a digest of the whole content, so that a truncated or
altered file is refused with an error naming it, never read as a different path.

* :func:`save_path` / :func:`load_path` — behind :meth:`ModelPath.save` and
  :meth:`ModelPath.load`.
* :func:`file_info` — a saved path's or checkpoint's summary without the model class
  (``geoconnect info FILE``).
* :func:`write_file` / :func:`read_file` — the atomic, digested format itself, which
  :class:`~geoconnect.checkpoint.Checkpoint` also writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._inputs import Output, convention, describe_output

if TYPE_CHECKING:  # pragma: no cover
    from .path import ModelPath

__all__ = [
    "FORMAT_VERSION",
    "describe_architecture",
    "file_info",
    "format_info",
    "index_file",
    "load_path",
    "prefixed",
    "read_file",
    "save_path",
    "shard_files",
    "tensor_digest",
    "write_file",
]

#: Version of the record in geoconnect's files; a file of a later version is refused.
FORMAT_VERSION = 1
_FORMAT = "geoconnect"
_HEADER_KEY = "geoconnect"
_DIGEST_KEY = "geoconnect.digest"
_KINDS = ("path", "checkpoint")


# -- the format -------------------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, Tensor], text: str = "") -> str:
    """A BLAKE2b digest of named tensors (names, dtypes, shapes and bytes) and ``text``.

    The same tensors give the same digest on every device and in every process.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.persistence import tensor_digest
    >>> a = tensor_digest({"w": torch.zeros(2)})
    >>> a == tensor_digest({"w": torch.zeros(2)}), a == tensor_digest({"w": torch.ones(2)})
    (True, False)
    """
    digest = hashlib.blake2b(text.encode(), digest_size=32)
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensors[key].shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_file(file: str | os.PathLike, tensors: Mapping[str, Tensor], header: dict) -> Path:
    """Write tensors and a JSON header atomically: the file is whole or not replaced.

    The content goes to a temporary file in the same directory, is flushed to the
    disk, and is renamed over ``file`` (``os.replace``, atomic on POSIX and Windows):
    a crash at any moment leaves either the previous file or the new one.

    Parameters
    ----------
    file : str or path-like
    tensors : mapping of str to Tensor
        Copied to the CPU.
    header : dict
        JSON-serialisable, with str keys; ``format``, ``format_version``,
        ``geoconnect_version`` and ``torch_version`` are added.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect.persistence import read_file, write_file
    >>> file = tempfile.mkdtemp() + "/x.safetensors"
    >>> _ = write_file(file, {"w": torch.ones(2)}, {"kind": "path"})
    >>> tensors, header = read_file(file, "path")
    >>> tensors["w"].tolist(), header["kind"]
    ([1.0, 1.0], 'path')
    """
    from . import __version__

    file = Path(file)
    if not file.parent.is_dir():
        raise OSError(
            f"Could not write {file}: the directory {file.parent} does not exist. Create "
            "it first, or choose an existing one."
        )
    _check_json(header, "the metadata")
    header = {
        **header,
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "geoconnect_version": __version__,
        "torch_version": torch.__version__,
    }
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The metadata to save in {file} must be JSON-serialisable (str, numbers, "
            f"bools, None, lists and dicts with str keys): {exc}."
        ) from None
    # Own CPU copies: safetensors refuses tensors that share memory, and needs CPU ones.
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {_HEADER_KEY: text, _DIGEST_KEY: tensor_digest(cpu, text)}
    temporary = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        save_file(cpu, str(temporary), metadata=metadata)
        _fsync(temporary)
        os.replace(temporary, file)
        _fsync(file.parent)
    except Exception as exc:  # an OSError, or safetensors' own SafetensorError
        raise OSError(
            f"Could not write {file}: {getattr(exc, 'strerror', None) or exc}. Choose a "
            "writable location."
        ) from exc
    finally:
        temporary.unlink(missing_ok=True)
    return file


def _check_json(value: object, where: str) -> None:
    """Refuse dict keys JSON would silently turn into strings (or fail to sort)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"The keys of {where} must be str to be saved as JSON; got {key!r} "
                    f"({type(key).__name__}). Use str({key!r})."
                )
            _check_json(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, where)


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to the disk, where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_file(file: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Read a file :func:`write_file` wrote, checking it whole; tensors on the CPU.

    Parameters
    ----------
    file : str or path-like
    kind : {"path", "checkpoint"}, optional
        The kind of file expected; None accepts either.

    Returns
    -------
    tensors : dict of str to Tensor
    header : dict

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is truncated, altered, of another format or kind, or written by a
        later geoconnect; the message names the file.

    Examples
    --------
    >>> import tempfile
    >>> from geoconnect.persistence import read_file
    >>> file = tempfile.mkdtemp() + "/notes.txt"
    >>> _ = open(file, "w").write("not tensors")
    >>> read_file(file)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: .../notes.txt is not a readable safetensors file ...
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"No such file: {file}" + (" (it is a directory)" * file.is_dir()))
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, or others
        raise ValueError(
            f"{file} is not a readable safetensors file ({exc}): it is truncated or "
            "corrupted, or a file of another format. geoconnect reads the files that "
            "ModelPath.save and checkpoint= write."
        ) from None
    if _HEADER_KEY not in metadata:
        raise ValueError(
            f"{file} is a safetensors file, but not one geoconnect wrote (its header has "
            "no 'geoconnect' record): it holds plain weights. Load them with "
            "safetensors.torch.load_file into your model; ModelPath.load reads the files "
            "ModelPath.save writes."
        )
    text = metadata[_HEADER_KEY]
    if metadata.get(_DIGEST_KEY) != tensor_digest(tensors, text):
        raise ValueError(
            f"{file} is corrupted: its content does not match the digest it was written "
            "with (bytes were changed after it was written). Use an intact copy, or "
            "write it again."
        )
    header = json.loads(text)
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError(f"{file} holds a 'geoconnect' record of an unknown format.")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{file} was written by geoconnect {header.get('geoconnect_version')} in format "
            f"version {version}; this geoconnect reads up to version {FORMAT_VERSION}. "
            "Upgrade geoconnect to read it."
        )
    if kind is not None and header.get("kind") != kind:
        raise ValueError(
            f"{file} is a geoconnect {header.get('kind')} file, not a {kind} file"
            + (
                ": a fit's checkpoint is resumed by fitting with checkpoint= its directory."
                if header.get("kind") == "checkpoint"
                else "."
            )
        )
    return tensors, header


def prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix``, by the rest of their names.

    Examples
    --------
    >>> import torch
    >>> from geoconnect.persistence import prefixed
    >>> list(prefixed({"params/w": torch.ones(1), "t": torch.ones(1)}, "params/"))
    ['w']
    """
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# -- architectures ------------------------------------------------------------------------


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_architecture(module: nn.Module) -> dict[str, Any]:
    """A JSON description of a module's architecture, with a fingerprint of it.

    The fingerprint covers every submodule's name and class, and every parameter's
    and buffer's name, shape and dtype — not their values: two networks of one
    architecture have the same fingerprint.

    Parameters
    ----------
    module : nn.Module

    Returns
    -------
    dict
        ``class``, ``fingerprint``, ``modules`` (``[name, class]`` each),
        ``parameters`` and ``buffers`` (``[name, shape, dtype]`` each).

    Examples
    --------
    >>> import torch
    >>> from geoconnect.persistence import describe_architecture
    >>> a, b = describe_architecture(torch.nn.Linear(2, 3)), describe_architecture(
    ...     torch.nn.Linear(2, 3))
    >>> a["fingerprint"] == b["fingerprint"], a["parameters"][0]
    (True, ['weight', [3, 2], 'float32'])
    """
    modules = [[name, _type_name(type(m))] for name, m in module.named_modules()]
    parameters = [
        [name, list(p.shape), _dtype_name(p.dtype)] for name, p in module.named_parameters()
    ]
    buffers = [[name, list(b.shape), _dtype_name(b.dtype)] for name, b in module.named_buffers()]
    text = json.dumps([modules, parameters, buffers])
    return {
        "class": _type_name(type(module)),
        "fingerprint": hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
        "modules": modules,
        "parameters": parameters,
        "buffers": buffers,
    }


def _check_template(saved: dict, template: nn.Module, file: Path) -> None:
    """Raise naming the first difference between the saved architecture and the template's."""
    own = describe_architecture(template)
    if own["fingerprint"] == saved["fingerprint"]:
        return
    fix = f"Pass a template of the saved architecture (geoconnect info {file} describes it)."
    for what in ("parameters", "buffers", "modules"):
        mine, theirs = own[what], saved[what]
        for i in range(max(len(mine), len(theirs))):
            a = mine[i] if i < len(mine) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                raise ValueError(
                    f"The template does not match the architecture saved in {file}: "
                    f"{_difference(what, a, b)}. {fix}"
                )
    raise ValueError(f"The template does not match the architecture saved in {file}. {fix}")


def _difference(what: str, mine: list | None, theirs: list | None) -> str:
    singular = what[:-1]
    if theirs is None:
        return f"the template has a {singular} {mine[0]!r} the file does not have"  # type: ignore[index]
    if mine is None or mine[0] != theirs[0]:
        found = "nothing" if mine is None else repr(mine[0])
        return f"the file's {singular} {theirs[0]!r} is, in the template, {found}"
    if what == "modules":
        return f"module {theirs[0]!r} is a {theirs[1]} in the file, a {mine[1]} in the template"
    if mine[1] != theirs[1]:
        return (
            f"{singular} {theirs[0]!r} has shape {tuple(theirs[1])} in the file and "
            f"{tuple(mine[1])} in the template"
        )
    return (
        f"{singular} {theirs[0]!r} is {theirs[2]} in the file and {mine[2]} in the template "
        f"(convert the template, e.g. template.to(torch.{theirs[2]}))"
    )


# -- paths --------------------------------------------------------------------------------


def save_path(path: ModelPath, file: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``path`` to ``file``: what :meth:`ModelPath.save` does.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.persistence import load_path, save_path
    >>> net = torch.nn.Linear(2, 3)
    >>> file = save_path(ModelPath.linear(net, torch.nn.Linear(2, 3), 4),
    ...                  tempfile.mkdtemp() + "/line.safetensors")
    >>> len(load_path(file, template=net))
    4
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict; got {type(metadata).__name__}.")
    if path.shard is not None:
        return _save_shard(path, Path(file), metadata)
    return _write_path(path, file, metadata)


def _write_path(
    path: ModelPath, file: str | os.PathLike, metadata: Mapping | None, **more: object
) -> Path:
    """One file of ``path``'s points; ``more`` goes in the header (a shard's record)."""
    tensors: dict[str, Tensor] = {"t": torch.as_tensor(np.asarray(path.t_, dtype=np.float64))}
    tensors.update({f"params/{k}": v for k, v in path.params.items()})
    tensors.update({f"batchnorm/{k}": v for k, v in path.batchnorm_buffers.items()})
    tensors.update({f"buffers/{k}": v for k, v in path.shared_buffers.items()})
    tensors.update({f"alignment/{k}": v for k, v in path.alignment.items()})
    header = {
        "kind": "path",
        "n_points": path.n_points,
        "n_params": path.n_params,
        "strategy": path.strategy,
        "output": describe_output(path.output),
        "frozen": sorted(path.frozen),
        "architecture": describe_architecture(path.template),
        "metadata": {**path.metadata, **dict(metadata or {})},
        **more,
    }
    return write_file(file, tensors, header)


# -- sharded paths: one file per rank and an index ------------------------------------


def index_file(file: str | os.PathLike) -> Path:
    """The index of a path saved in shards as ``file`` (Hugging Face's naming:
    ``path.safetensors`` → ``path.safetensors.index.json``).

    Examples
    --------
    >>> from geoconnect.persistence import index_file, shard_files
    >>> index_file("out/path.safetensors").name
    'path.safetensors.index.json'
    >>> [f.name for f in shard_files("out/path.safetensors", 2)]
    ['path-00001-of-00002.safetensors', 'path-00002-of-00002.safetensors']
    """
    file = Path(file)
    return file if file.name.endswith(_INDEX_SUFFIX) else file.with_name(file.name + _INDEX_SUFFIX)


def shard_files(file: str | os.PathLike, world_size: int) -> list[Path]:
    """The files of a path saved in ``world_size`` shards as ``file``, rank by rank."""
    file = Path(file)
    stem = file.name.removesuffix(_INDEX_SUFFIX).removesuffix(".safetensors")
    return [
        file.with_name(f"{stem}-{rank + 1:05d}-of-{world_size:05d}.safetensors")
        for rank in range(world_size)
    ]


_INDEX_SUFFIX = ".index.json"


def _save_shard(path: ModelPath, file: Path, metadata: Mapping | None) -> Path:
    """Write a rank's shard to its file, and rank 0 the index; return the index.

    Every rank of the path saves (collectively: they wait for each other when
    torch.distributed is initialised), so that the index names only written files.
    """
    import torch.distributed as dist

    shard = path.shard
    assert shard is not None
    files = shard_files(file, shard.world_size)
    record = {k: getattr(shard, k) for k in ("start", "stop", "n_points", "rank", "world_size")}
    _write_path(path, files[shard.rank], metadata, shard=record)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    index = index_file(file)
    if shard.rank == 0:
        from .distributed import block_bounds

        owner = {0: 0, shard.n_points - 1: 0}
        for rank, (start, stop) in enumerate(block_bounds(shard.n_points - 2, shard.world_size)):
            owner.update({point + 1: rank for point in range(start, stop)})
        weight_map = {f"points/{i}": files[owner[i]].name for i in range(shard.n_points)}
        content = {
            "metadata": {
                "format": _FORMAT,
                "kind": "path",
                "format_version": FORMAT_VERSION,
                "n_points": shard.n_points,
                "world_size": shard.world_size,
                "total_size": sum(f.stat().st_size for f in files if f.is_file()),
            },
            "weight_map": weight_map,
        }
        temporary = index.with_name(f".{index.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(content, indent=2))
        os.replace(temporary, index)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return index


def _read_index(index: Path) -> tuple[dict[str, Tensor], dict, list[Path]]:
    """A sharded path's files, read whole and put together as one file's tensors and
    header (the first shard's, for the whole path); and the files."""
    try:
        content = json.loads(index.read_text())
        meta, weight_map = content["metadata"], content["weight_map"]
        n_points, world_size = int(meta["n_points"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{index} is not the index of a path saved in shards ({exc!r}). geoconnect "
            "writes one when a shard of a distributed fit's path is saved."
        ) from None
    files = [index.with_name(name) for name in dict.fromkeys(weight_map.values())]
    if sorted(f.name for f in files) != sorted(f.name for f in shard_files(index, world_size)):
        raise ValueError(f"{index} names files that are not its {world_size} shards.")
    pieces = [read_file(f, "path") for f in files]
    architecture = pieces[0][1].get("architecture")
    for f, (_, header) in zip(files, pieces):
        record = header.get("shard")
        if not isinstance(record, dict) or record.get("n_points") != n_points:
            raise ValueError(f"{f} is not a shard of the {n_points}-point path {index} indexes.")
        if header.get("architecture") != architecture or record.get("world_size") != world_size:
            raise ValueError(
                f"{f} is a shard of another path than {files[0].name} (another architecture "
                f"or number of ranks): the shards {index} indexes must be one fit's."
            )
    return (*_whole_tensors(pieces, n_points), files)


def _whole_tensors(
    pieces: list[tuple[dict[str, Tensor], dict]], n_points: int
) -> tuple[dict[str, Tensor], dict]:
    """The shards' tensors as one path's: each stack assembled point by point."""
    from .path import Shard

    first_tensors, first_header = pieces[0]
    stacked = [k for k in first_tensors if k == "t" or k.startswith(("params/", "batchnorm/"))]
    tensors = {k: v for k, v in first_tensors.items() if k not in stacked}
    for key in stacked:
        tensors[key] = first_tensors[key].new_empty((n_points, *first_tensors[key].shape[1:]))
    seen: set[int] = set()
    for part, header in pieces:
        record = header["shard"]
        points = Shard(record["start"], record["stop"], n_points).points
        seen.update(points)
        for key in stacked:
            tensors[key][points] = part[key]
    if seen != set(range(n_points)):
        raise ValueError(f"The shards hold points {sorted(seen)}, not all {n_points}.")
    header = {k: v for k, v in first_header.items() if k != "shard"}
    return tensors, {**header, "n_points": n_points}


def load_path(
    file: str | os.PathLike,
    template: nn.Module,
    device: torch.device | str | None = None,
    output: Output = None,
) -> ModelPath:
    """Read a path :func:`save_path` wrote: what :meth:`ModelPath.load` does."""
    from .path import ModelPath

    if not isinstance(template, nn.Module):
        raise TypeError(
            f"template must be an nn.Module of the saved architecture; got "
            f"{type(template).__name__}. Pass a fresh instance of your model class."
        )
    file = Path(file)
    tensors, header, _ = _read_path_files(file)
    architecture = header.get("architecture")
    if not isinstance(architecture, dict) or "fingerprint" not in architecture:
        raise ValueError(f"{file} has a geoconnect header without an architecture record.")
    _check_template(architecture, template, file)
    try:
        names = [name for name, _, _ in architecture["parameters"]]
        params = {name: tensors[f"params/{name}"] for name in names}
        batchnorm = prefixed(tensors, "batchnorm/")
        path = ModelPath(
            template,
            params,
            batchnorm,
            t=tensors["t"].numpy(),
            strategy=header["strategy"],
            frozen=header["frozen"],
            output=_saved_output(header.get("output"), output, file),
        )
        with torch.no_grad():
            for name, buffer in path.shared_buffers.items():
                buffer.copy_(tensors[f"buffers/{name}"])
        path.alignment = prefixed(tensors, "alignment/")
        path.metadata = dict(header["metadata"])
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(
            f"{file} has a geoconnect header but not the record of a path ({exc!r} is "
            "missing or malformed). Save the path again."
        ) from None
    if device is None:
        device = next(iter(template.parameters())).device
    return path.to(device)


def _read_path_files(file: Path) -> tuple[dict[str, Tensor], dict, list[Path]]:
    """A saved path's tensors and header: of its file, or of the shards its index
    names (``file`` the index, or the name the shards were saved under)."""
    if _is_sharded(file):
        return _read_index(index_file(file))
    tensors, header = read_file(file, "path")
    return tensors, header, [file]


def _is_sharded(file: Path) -> bool:
    """Whether ``file`` is an index, or the name of a path saved only in shards."""
    return file.name.endswith(_INDEX_SUFFIX) or (not file.exists() and index_file(file).is_file())


def _saved_output(saved: object, given: Output, file: Path) -> Output:
    """The path's ``output``: the file's key or index, or the callable the caller gives."""
    if isinstance(saved, dict):  # a convention (probabilities, a binary logit) around one
        return convention(saved, _saved_output(saved.get("output"), given, file))
    if isinstance(saved, str) and saved.startswith("callable:"):
        if given is None:
            raise ValueError(
                f"{file} was saved from a path whose logits are read by the callable "
                f"{saved.removeprefix('callable:')}, which a file cannot hold: pass it "
                "again, ModelPath.load(file, template, output=that_callable)."
            )
        return given
    if given is not None and given != saved:
        raise ValueError(
            f"output={given!r} was given, but {file} records output={saved!r}; leave "
            "output out to use the file's."
        )
    return saved  # type: ignore[return-value]


# -- summaries ------------------------------------------------------------------------------


def file_info(file: str | os.PathLike) -> dict[str, Any]:
    """What a saved path or checkpoint holds, read without the model class.

    The file is checked whole (its digest), so a summary is only given of an intact
    file.

    Parameters
    ----------
    file : str or path-like

    Returns
    -------
    dict
        The file's header (``kind``, ``n_points``, ``architecture``, ``metadata``, …)
        and ``file``, ``bytes``, ``t`` (a path's positions) and ``euclidean_length``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.persistence import file_info
    >>> path = ModelPath.linear(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), 5)
    >>> info = file_info(path.save(tempfile.mkdtemp() + "/line.safetensors"))
    >>> info["kind"], info["n_points"], info["architecture"]["class"]
    ('path', 5, 'torch.nn.modules.linear.Linear')
    """
    from .evaluation import euclidean_length

    file = Path(file)
    if _is_sharded(file):
        tensors, header, files = _read_index(index_file(file))
        header["shards"] = [f.name for f in files]
    else:
        tensors, header = read_file(file)
        files = [file]
    info = {**header, "file": str(file), "bytes": sum(f.stat().st_size for f in files)}
    if header.get("kind") == "path":
        params = prefixed(tensors, "params/")
        info["t"] = tensors["t"].tolist()
        info["euclidean_length"] = euclidean_length(params, frozen=header.get("frozen", ()))
        info["aligned"] = any(k.startswith("alignment/") for k in tensors)
    return info


def format_info(info: dict[str, Any]) -> str:
    """:func:`file_info`'s summary as the lines ``geoconnect info`` prints.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.persistence import file_info, format_info
    >>> path = ModelPath.linear(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), 5)
    >>> print(format_info(file_info(path.save(tempfile.mkdtemp() + "/l.safetensors"))))
    ... # doctest: +ELLIPSIS
    file          .../l.safetensors (... bytes, digest verified)
    kind          path, format 1, written by geoconnect 0.1.0 (torch ...)
    architecture  torch.nn.modules.linear.Linear, fingerprint ...
                  modules 1, parameter tensors 2, buffers 0
    points        5 of 9 parameters each; strategy loop
    positions t   0, 0.25, 0.5, 0.75, 1
    lengths       Euclidean ...
    aligned       no
    """
    arch = info.get("architecture")
    if arch is None:  # a checkpoint records only its fit's fingerprint
        fingerprint = info.get("fingerprint", {}).get("architecture")
        arch = {"class": "(the fitted models')", "fingerprint": fingerprint}
    lines = [
        ("file", f"{info['file']} ({info['bytes']} bytes, digest verified)"),
        (
            "kind",
            f"{info['kind']}, format {info['format_version']}, written by geoconnect "
            f"{info['geoconnect_version']} (torch {info['torch_version']})",
        ),
        ("architecture", f"{arch['class']}, fingerprint {arch['fingerprint']}"),
    ]
    if "modules" in arch:
        counts = (
            f"modules {len(arch['modules'])}, parameter tensors {len(arch['parameters'])}, "
            f"buffers {len(arch['buffers'])}"
        )
        lines.append(("", counts))
    if info["kind"] == "path":
        lines += _path_lines(info)
    else:
        lines += _checkpoint_lines(info)
    return "\n".join(f"{key:<13} {value}".rstrip() for key, value in lines)


def _path_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    meta = dict(info.get("metadata", {}))
    lines = [
        (
            "points",
            f"{info['n_points']} of {info['n_params']} parameters each; "
            f"strategy {info['strategy']}",
        ),
        *(
            [("shards", f"{len(info['shards'])}: {', '.join(info['shards'])}")]
            if "shards" in info
            else []
        ),
        ("positions t", ", ".join(f"{t:.4g}" for t in info["t"])),
    ]
    lengths = [f"Euclidean {info['euclidean_length']:.6g}"]
    if meta.get("length") is not None:
        extra = [
            f"{label} {meta.pop(key):.6g}"
            for key, label in (("chord_length", "chords"), ("min_length", "shortest possible"))
            if meta.get(key) is not None
        ]
        lengths.insert(
            0,
            f"Fisher-Rao {meta.pop('length'):.6g} rad ({'; '.join([*extra, 'on the fit data'])})",
        )
    lines.append(("lengths", ", ".join(lengths)))
    if meta.get("divergence") is not None:
        energy = meta.pop("energy", None)
        text = str(meta.pop("divergence"))
        lines.append(("divergence", text + ("" if energy is None else f", energy {energy:.6g}")))
    if info.get("frozen"):
        lines.append(("frozen", ", ".join(info["frozen"])))
    lines.append(("aligned", "yes (permutations saved)" if info.get("aligned") else "no"))
    for i, (key, value) in enumerate(sorted(meta.items())):
        lines.append(("" if i else "metadata", f"{key}: {_short(value)}"))
    return lines


def _checkpoint_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    state = info.get("state", {})
    history = state.get("history", {}).get("energy", [])
    last = f", last energy {history[-1]:.6g}" if history else ""
    return [
        ("epochs", f"{len(history)} complete{last}"),
        (
            "level",
            f"{state.get('level', 0) + 1} (of {state.get('n_points')} points), "
            f"{state.get('level_epochs')} epochs into it",
        ),
        ("parameters", _short(info.get("fingerprint", {}).get("parameters", {}))),
    ]


def _short(value: object, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
