"""X / y / Dataset / DataLoader → batches on a device.

Two kinds of source:

* :class:`TensorData` — arrays and tensors, or a mapping of names to equal-length
  arrays and tensors (keyword arguments of the models' forward), held whole (on the
  device when small enough), batched by index. Indices let the connectors cache the
  endpoints' outputs per sample.
* :class:`StreamData` — a ``Dataset`` or ``DataLoader`` yielding ``x``, ``(x, y)``,
  a mapping, or ``(mapping, y)``, streamed batch by batch.

A batch's inputs are one tensor or a mapping of tensors: :mod:`geoconnect._inputs`
handles both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._inputs import Inputs, concat, is_mapping, move, n_rows, rows

# Arrays up to this size are moved to the device once rather than batch by batch.
_DEVICE_RESIDENT_BYTES = 1 << 30


@dataclass
class Batch:
    x: Inputs
    y: Tensor | None
    index: Tensor | None  # row indices into a TensorData, None when streamed


class TensorData:
    """An in-memory data set: ``x`` of shape (n_samples, *input_shape) or a mapping of
    such tensors, and optional ``y``."""

    def __init__(self, x: Inputs, y: Tensor | None, device: torch.device):
        tensors = [x] if isinstance(x, Tensor) else list(x.values())
        nbytes = sum(t.element_size() * t.nelement() for t in tensors)
        self.device = device
        self.x = move(x, device) if nbytes <= _DEVICE_RESIDENT_BYTES else x
        #: Where the held tensors are: the device, or the CPU for a large data set.
        self.home = tensors[0].device if nbytes > _DEVICE_RESIDENT_BYTES else device
        self.y = None if y is None else y.to(self.home)
        self.n_samples = n_rows(x)

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Yield batches; shuffled with ``generator`` when one is given."""
        if generator is None:
            order = None
        else:
            order = torch.randperm(self.n_samples, generator=generator)
            order = order.to(self.home)
        starts = list(range(0, self.n_samples, batch_size))
        if len(starts) > 1 and self.n_samples - starts[-1] == 1:
            # A batch of one breaks BatchNorm's batch statistics: fold it into the last.
            starts.pop()
        ends = starts[1:] + [self.n_samples]
        for start, stop in zip(starts, ends):
            if order is None:
                index = torch.arange(start, stop, device=self.home)
                xb = rows(self.x, slice(start, stop))
                yb = None if self.y is None else self.y[start:stop]
            else:
                index = order[start:stop]
                xb = rows(self.x, index)
                yb = None if self.y is None else self.y[index]
            yield Batch(
                move(xb, self.device, non_blocking=True),
                None if yb is None else yb.to(self.device, non_blocking=True),
                index.to(self.device),
            )

    def head(self, n: int) -> Inputs:
        return move(rows(self.x, slice(0, n)), self.device)


def split_off(
    data: TensorData, fraction: float, generator: torch.Generator
) -> tuple[TensorData, TensorData]:
    """``data`` split at random into the rest and a held-out ``fraction`` of its rows
    (at least two of each, so BatchNorm has batch statistics on both).

    Examples
    --------
    >>> import torch
    >>> from geoconnect._data import TensorData, split_off
    >>> data = TensorData(torch.arange(20.0).reshape(10, 2), None, torch.device("cpu"))
    >>> kept, held = split_off(data, 0.2, torch.Generator().manual_seed(0))
    >>> kept.n_samples, held.n_samples
    (8, 2)
    """
    n = data.n_samples
    held = min(max(2, round(fraction * n)), n - 2)
    if held < 2:
        raise ValueError(
            f"X has {n} samples: too few to hold out a validation fraction of "
            f"{fraction} (at least two samples each side). Pass more samples, or "
            "validation_fraction=None."
        )
    order = torch.randperm(n, generator=generator).to(data.home)
    parts = []
    for index in (order[held:].sort().values, order[:held].sort().values):
        y = None if data.y is None else data.y[index]
        parts.append(TensorData(rows(data.x, index), y, data.device))
    return parts[0], parts[1]


_EMPTY_STREAM = (
    "X is empty: the Dataset/DataLoader yielded no batch. If X is an iterable that was "
    "already consumed (e.g. by an earlier fit), make its __iter__ return a fresh "
    "iterator each time it is called."
)


class StreamData:
    """A ``Dataset`` or ``DataLoader`` yielding ``x`` or ``(x, y)``, ``x`` a tensor or a
    mapping of tensors."""

    def __init__(self, source: Dataset | DataLoader, device: torch.device, dtype: torch.dtype):
        self.source = source
        self.device = device
        self.dtype = dtype
        self.n_samples = _stream_length(source)
        if _one_shot(source.dataset if isinstance(source, DataLoader) else source):
            raise ValueError(
                _ONE_SHOT.format(how="its __iter__ returns the same iterator each time")
            )
        # Set once a pass has yielded a batch: a later pass that yields none means X is
        # a one-shot iterable (its __iter__ returns the same, exhausted iterator).
        self._yielded = False

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        if isinstance(self.source, DataLoader):
            loader = self.source
        else:
            loader = DataLoader(
                self.source,
                batch_size=batch_size,
                shuffle=generator is not None,
                generator=generator,
            )
        n_batches = 0
        for item in loader:
            if isinstance(item, (tuple, list)):
                if len(item) == 0:
                    raise ValueError("X yielded an empty batch; it must yield x or (x, y).")
                x = item[0]
                y = item[1] if len(item) > 1 else None
            else:
                x, y = item, None
            x = _check_stream_inputs(x, self.dtype)
            if y is not None:
                y = _stream_labels(y)
                if y.shape[0] != n_rows(x):
                    raise ValueError(
                        f"X yielded a batch of {n_rows(x)} inputs with {y.shape[0]} "
                        "labels; each batch must have as many labels as inputs."
                    )
                y = y.to(self.device, dtype=torch.long)
            n_batches += 1
            self._yielded = True  # before the yield: a caller may stop after one batch
            yield Batch(move(x, self.device, non_blocking=True), y, None)
        if n_batches == 0 and self._yielded:
            raise ValueError(
                _ONE_SHOT.format(how="it yielded batches on an earlier pass but none now")
            )

    def head(self, n: int) -> Inputs:
        for batch in self.batches(n):
            return rows(batch.x, slice(0, n))
        raise ValueError(_EMPTY_STREAM)

    def materialise(self, batch_size: int = 256) -> TensorData:
        """Gather every batch into one in-memory :class:`TensorData`."""
        xs, ys = [], []
        for batch in self.batches(batch_size):
            xs.append(batch.x)
            ys.append(batch.y)
        if not xs:
            raise ValueError(_EMPTY_STREAM)
        labelled = [y is not None for y in ys]
        if any(labelled) and not all(labelled):
            raise ValueError("X yielded some batches with labels and some without.")
        y = torch.cat(ys) if all(labelled) else None  # type: ignore[arg-type]
        return TensorData(concat(xs), y, self.device)


_ONE_SHOT = (
    "X could be iterated only once: {how}, and fit needs several passes over X "
    "(probing the models, fitting, evaluating). Make the dataset's __iter__ return a "
    "fresh iterator each time it is called (e.g. write it as a generator), or use a "
    "map-style Dataset."
)


def _one_shot(dataset: object) -> bool:
    """Whether iterating ``dataset`` twice gives the same iterator: then a pass that
    stops early (a probe reading one batch) would be continued, not restarted, by the
    next, which would silently miss the first batches."""
    if not isinstance(dataset, IterableDataset):
        return False
    try:
        return iter(dataset) is iter(dataset)
    except TypeError:
        return False


def _stream_length(source: Dataset | DataLoader) -> int | None:
    dataset = source.dataset if isinstance(source, DataLoader) else source
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    if n == 0:
        raise ValueError("X is empty: the Dataset/DataLoader has no samples.")
    return n


def _check_stream_inputs(x: object, dtype: torch.dtype) -> Inputs:
    """A streamed batch's inputs, checked: a tensor, or a mapping of equal-length ones."""
    if not isinstance(x, Mapping):
        return _check_stream_tensor(x, dtype)
    checked = {key: _check_stream_tensor(value, dtype, key) for key, value in x.items()}
    _check_mapping(checked, "X yielded a batch whose")
    return checked


def _check_stream_tensor(x: object, dtype: torch.dtype, key: str | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError):
            what = "a batch that is" if key is None else f"a batch whose {key!r} is"
            raise TypeError(
                f"X yielded {what} not a tensor or array; a Dataset/DataLoader must yield "
                "x or (x, y) with x a tensor or a mapping of tensors. Got "
                f"{type(x).__name__}."
            ) from None
    if x.is_floating_point():
        original, x = x, x.to(dtype)
        if not torch.isfinite(x).all():
            what = "A batch of X" if key is None else f"X[{key!r}] in a batch"
            raise _nonfinite_error(original, dtype, what)
    return x


def _stream_labels(y: object) -> Tensor:
    """The labels of a streamed batch as a 1-D tensor; strings get a clear error."""
    if not isinstance(y, Tensor):
        values = [y] if isinstance(y, (str, bytes)) else y
        if isinstance(values, np.ndarray) and values.dtype.kind in "USO":
            values = values.ravel().tolist()
        if isinstance(values, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in values):
            shown = ", ".join(repr(v) for v in list(values)[:3])
            raise ValueError(
                f"X yielded string labels ({shown}, …); y must hold integer class indices "
                "0 … n_classes−1. Encode them with sklearn.preprocessing.LabelEncoder: fit "
                "it on the labels and have the Dataset return "
                "encoder.transform([label])[0] for each sample."
            )
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"X yielded labels of type {type(y).__name__} that are not numbers; y must "
                "hold integer class indices 0 … n_classes−1."
            ) from None
    return y.reshape(-1)


def _nonfinite_error(source: Tensor | np.ndarray, dtype: torch.dtype, what: str) -> ValueError:
    """The error for X that is not finite once cast to the models' ``dtype``.

    Either X holds NaN or infinity, or it is finite in its own dtype (float64, int64)
    and overflows in ``dtype``: then say so, with the sizes.
    """
    if isinstance(source, Tensor):  # via float64: numpy has no bfloat16
        array = source.detach().to(torch.float64).cpu().numpy()
    else:
        array = source
    if array.dtype.kind in "fiub" and bool(np.isfinite(array).all()):
        largest = float(np.abs(array.astype(np.float64, copy=False)).max())
        limit = float(torch.finfo(dtype).max)
        name = str(dtype).removeprefix("torch.")
        return ValueError(
            f"{what} has values beyond the range of {name}, the models' dtype: its "
            f"largest |value| is {largest:.4g} but {name}'s largest is {limit:.4g}, so "
            f"they become infinite when cast to {name}. Rescale X (e.g. with "
            "sklearn.preprocessing.StandardScaler) or use float64 models (model.double())."
        )
    return ValueError(
        f"{what} contains NaN or infinity. Remove or impute those values before fitting."
    )


def as_data(
    X: object,
    y: object = None,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> TensorData | StreamData:
    """Validate ``X`` (and ``y``) and wrap them as a batch source on ``device``.

    Never modifies ``X`` or ``y``: they are read, converted to ``dtype`` (a copy) when
    needed, and otherwise shared.
    """
    if X is None:
        raise ValueError("X is required: pass an array of shape (n_samples, *input_shape).")
    if isinstance(X, (TensorData, StreamData)):
        if y is not None:
            raise ValueError("y must be None when X is already a batch source.")
        return X
    if isinstance(X, (Dataset, DataLoader)):
        if y is not None:
            raise ValueError(
                "y must be None when X is a Dataset or DataLoader; yield (x, y) pairs "
                "from it instead."
            )
        return StreamData(X, device, dtype)
    if is_mapping(X):
        return TensorData(_mapping_inputs(X, dtype), _as_labels(y, _mapping_length(X)), device)
    x = _array_inputs(X, dtype)
    return TensorData(x, _as_labels(y, x.shape[0]), device)


def _array_inputs(X: object, dtype: torch.dtype) -> Tensor:
    """An array-like or tensor X as one checked tensor: floats (and bools) in ``dtype``,
    integer tensors kept as they are."""
    x, source = _array_tensor(X, dtype)
    if x.ndim < 2:
        raise ValueError(
            f"X must have shape (n_samples, *input_shape); got shape {tuple(x.shape)}. "
            "Reshape a single feature with X.reshape(-1, 1) or a single sample with "
            "X.reshape(1, -1)."
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"X is empty: found array with 0 samples (shape {tuple(x.shape)}); at least "
            "one sample is required."
        )
    if isinstance(X, Tensor) and (x.is_floating_point() or x.dtype == torch.bool):
        # Integer *tensors* are kept as they are (token ids for an embedding layer).
        x = x.to(dtype)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise _nonfinite_error(source, x.dtype, "X")
    return x


def _array_tensor(X: object, dtype: torch.dtype) -> tuple[Tensor, Tensor | np.ndarray]:
    """X as a tensor, and the tensor or array it was read from (for error messages)."""
    # X is only ever read, so it is converted at most once: no copy when it already
    # is a tensor of the right dtype (a dataset can be most of the memory a fit uses).
    if isinstance(X, Tensor):
        x = X.detach()
        return x, x
    try:
        array = np.asarray(X)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"X must be an array-like, tensor, Dataset or DataLoader; got "
            f"{type(X).__name__} ({exc})."
        ) from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(
            f"X must hold numbers; got an array of dtype {array.dtype}. Convert it "
            "with np.asarray(X, dtype=np.float32)."
        )
    # Arrays become ``dtype`` here, in one conversion (a copy only when the dtype
    # differs); a read-only array is copied by ``torch.tensor``, which never warns.
    convert = torch.as_tensor if array.flags.writeable else torch.tensor
    return convert(array, dtype=dtype), array


def _mapping_inputs(X: Mapping, dtype: torch.dtype) -> dict[str, Tensor]:
    """A mapping X as keyword tensors: floats in ``dtype``, integers and bools kept."""
    if not X:
        raise ValueError(
            "X is an empty mapping; a mapping X holds the models' keyword arguments, e.g. "
            '{"input_ids": ids, "attention_mask": mask}.'
        )
    inputs = {}
    for key, value in X.items():
        if not isinstance(key, str):
            raise TypeError(
                f"A mapping X must have str keys (the names of the models' forward "
                f"arguments); got the key {key!r} of type {type(key).__name__}."
            )
        inputs[key] = _keyword_tensor(key, value, dtype)
    _check_mapping(inputs, "X's")
    return inputs


def _keyword_tensor(key: str, value: object, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        tensor = source = value.detach()
    else:
        try:
            source = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"X[{key!r}] must be an array or tensor; got {exc}.") from None
        if source.dtype == object or not (
            np.issubdtype(source.dtype, np.number) or source.dtype == bool
        ):
            raise TypeError(f"X[{key!r}] must hold numbers; got an array of dtype {source.dtype}.")
        tensor = torch.as_tensor(source) if source.flags.writeable else torch.tensor(source)
    if tensor.ndim < 1:
        raise ValueError(
            f"X[{key!r}] is a scalar; every entry of a mapping X must have the samples "
            "along its first axis, shape (n_samples, ...)."
        )
    if tensor.is_floating_point():  # integer token ids and boolean masks keep their dtype
        tensor = tensor.to(dtype)
        if not torch.isfinite(tensor).all():
            raise _nonfinite_error(source, dtype, f"X[{key!r}]")
    return tensor


def _mapping_length(X: Mapping) -> int:
    return int(np.shape(next(iter(X.values())))[0])


def _check_mapping(inputs: dict[str, Tensor], whose: str) -> None:
    """Refuse a mapping of inputs whose entries differ in length, or have no samples."""
    lengths = {key: int(value.shape[0]) if value.ndim else 0 for key, value in inputs.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key!r} has {n}" for key, n in lengths.items())
        raise ValueError(
            f"{whose} entries must all have the same number of samples (first axis), but "
            f"{shown}. Pass one row per sample in every entry."
        )
    if not next(iter(lengths.values())):
        raise ValueError(f"{whose} entries are empty: at least one sample is required.")


def _as_labels(y: object, n_samples: int) -> Tensor | None:
    if y is None:
        return None
    array = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array.ravel()
    if array.ndim != 1:
        raise ValueError(f"y must be a 1-D array of class indices; got shape {array.shape}.")
    if array.shape[0] != n_samples:
        raise ValueError(
            f"y has {array.shape[0]} labels but X has {n_samples} samples; they must "
            "have the same length."
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(
            f"y must hold integer class indices 0 … n_classes−1; got dtype {array.dtype}. "
            "Encode string labels with sklearn.preprocessing.LabelEncoder."
        )
    if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
        raise ValueError(
            "y must hold integer class indices 0 … n_classes−1; it contains "
            "non-integer, NaN or infinite values."
        )
    return torch.tensor(array.astype(np.int64))


def check_labels(y: Tensor | None, n_classes: int) -> None:
    """Raise when labels fall outside the model's ``n_classes`` outputs."""
    if y is None or y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"y holds labels in [{low}, {high}] but the models output {n_classes} "
            f"classes, so labels must lie in [0, {n_classes - 1}]. Encode them with "
            "sklearn.preprocessing.LabelEncoder or use models with more outputs."
        )
