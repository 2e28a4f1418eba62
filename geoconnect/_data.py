"""X / y / Dataset / DataLoader → batches on a device.

Two kinds of source:

* :class:`TensorData` — arrays and tensors, held whole (on the device when it is
  small enough), batched by index. Indices let the connectors cache the endpoints'
  outputs per sample.
* :class:`StreamData` — a ``Dataset`` or ``DataLoader``, streamed batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# Arrays up to this size are moved to the device once rather than batch by batch.
_DEVICE_RESIDENT_BYTES = 1 << 30


@dataclass
class Batch:
    x: Tensor
    y: Tensor | None
    index: Tensor | None  # row indices into a TensorData, None when streamed


class TensorData:
    """An in-memory data set: ``x`` of shape (n_samples, *input_shape), optional ``y``."""

    def __init__(self, x: Tensor, y: Tensor | None, device: torch.device):
        nbytes = x.element_size() * x.nelement()
        self.device = device
        self.x = x.to(device) if nbytes <= _DEVICE_RESIDENT_BYTES else x
        self.y = None if y is None else y.to(self.x.device)
        self.n_samples = int(x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Yield batches; shuffled with ``generator`` when one is given."""
        if generator is None:
            order = None
        else:
            order = torch.randperm(self.n_samples, generator=generator)
            order = order.to(self.x.device)
        starts = list(range(0, self.n_samples, batch_size))
        if len(starts) > 1 and self.n_samples - starts[-1] == 1:
            # A batch of one breaks BatchNorm's batch statistics: fold it into the last.
            starts.pop()
        ends = starts[1:] + [self.n_samples]
        for start, stop in zip(starts, ends):
            if order is None:
                index = torch.arange(start, stop, device=self.x.device)
                xb = self.x[start:stop]
                yb = None if self.y is None else self.y[start:stop]
            else:
                index = order[start:stop]
                xb = self.x[index]
                yb = None if self.y is None else self.y[index]
            yield Batch(
                xb.to(self.device, non_blocking=True),
                None if yb is None else yb.to(self.device, non_blocking=True),
                index.to(self.device),
            )

    def head(self, n: int) -> Tensor:
        return self.x[:n].to(self.device)


_EMPTY_STREAM = (
    "X is empty: the Dataset/DataLoader yielded no batch. If X is an iterable that was "
    "already consumed (e.g. by an earlier fit), make its __iter__ return a fresh "
    "iterator each time it is called."
)


class StreamData:
    """A ``Dataset`` or ``DataLoader`` yielding ``x`` or ``(x, y)``."""

    def __init__(self, source: Dataset | DataLoader, device: torch.device, dtype: torch.dtype):
        self.source = source
        self.device = device
        self.dtype = dtype
        self.n_samples = _stream_length(source)
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
            x = _check_stream_tensor(x, self.dtype)
            if y is not None:
                y = _stream_labels(y)
                if y.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"X yielded a batch of {x.shape[0]} inputs with {y.shape[0]} "
                        "labels; each batch must have as many labels as inputs."
                    )
                y = y.to(self.device, dtype=torch.long)
            n_batches += 1
            self._yielded = True  # before the yield: a caller may stop after one batch
            yield Batch(x.to(self.device, non_blocking=True), y, None)
        if n_batches == 0 and self._yielded:
            raise ValueError(
                "X could be iterated only once: it yielded batches on an earlier pass but "
                "none now, and fit needs several passes over X (probing the models, "
                "fitting, evaluating). Make the dataset's __iter__ return a fresh iterator "
                "each time it is called (e.g. write it as a generator), or use a "
                "map-style Dataset."
            )

    def head(self, n: int) -> Tensor:
        for batch in self.batches(n):
            return batch.x[:n]
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
        return TensorData(torch.cat(xs), y, self.device)


def _stream_length(source: Dataset | DataLoader) -> int | None:
    dataset = source.dataset if isinstance(source, DataLoader) else source
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    if n == 0:
        raise ValueError("X is empty: the Dataset/DataLoader has no samples.")
    return n


def _check_stream_tensor(x: object, dtype: torch.dtype) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError):
            raise TypeError(
                "X yielded a batch that is not a tensor or array; a Dataset/DataLoader "
                f"must yield x or (x, y) with x a tensor. Got {type(x).__name__}."
            ) from None
    if x.is_floating_point():
        original, x = x, x.to(dtype)
        if not torch.isfinite(x).all():
            raise _nonfinite_error(original, dtype, "A batch of X")
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
    # X is only ever read, so it is converted at most once: no copy when it already
    # is a tensor of the right dtype (a dataset can be most of the memory a fit uses).
    if isinstance(X, Tensor):
        x = source = X.detach()
    else:
        try:
            array = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"X must be an array-like, tensor, Dataset or DataLoader; got "
                f"{type(X).__name__} ({exc})."
            ) from None
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise TypeError(
                f"X must hold numbers; got an array of dtype {array.dtype}. Convert it "
                "with np.asarray(X, dtype=np.float32)."
            )
        # Arrays become ``dtype`` here, in one conversion (a copy only when the dtype
        # differs); a read-only array is copied by ``torch.tensor``, which never warns.
        convert = torch.as_tensor if array.flags.writeable else torch.tensor
        x = convert(array, dtype=dtype)
        source = array
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
    return TensorData(x, _as_labels(y, x.shape[0]), device)


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
