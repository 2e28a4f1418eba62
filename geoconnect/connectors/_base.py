"""Estimator logic shared by the connectors: inputs, evaluation, prediction."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .._data import StreamData, TensorData, as_data, check_labels
from .._device import resolve_device
from .._models import check_model, check_same_architecture, has_batchnorm
from ..evaluation import (
    PathEvaluation,
    arc_length_positions,
    euclidean_length,
    evaluate_path,
    fisher_rao_length,
    path_statistics,
)
from ..path import ModelPath

# Batch size for evaluation passes of estimators without a batch_size parameter.
_EVAL_BATCH_SIZE = 256


@dataclass
class FitInputs:
    """Validated fit inputs: copies of the models on the device, and the data."""

    device: torch.device
    model_a: nn.Module
    model_b: nn.Module
    data: TensorData | StreamData | None
    n_classes: int
    dtype: torch.dtype


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _BaseConnector(TransformerMixin, BaseEstimator):
    """Shared behaviour of :class:`LinearConnector` and :class:`GeodesicConnector`."""

    # -- fitting helpers ---------------------------------------------------------------

    def _fit_inputs(
        self, X: object, y: object, model_a: object, model_b: object, *, require_X: bool
    ) -> FitInputs:
        owner = type(self).__name__
        model_a = check_model(model_a, "model_a", owner)
        model_b = check_model(model_b, "model_b", owner)
        check_same_architecture(model_a, model_b)
        device = resolve_device(self.device, owner)
        # Copies: fit never touches the user's modules (no .to(), no .eval()).
        copy_a = copy.deepcopy(model_a).to(device).eval()
        copy_b = copy.deepcopy(model_b).to(device).eval()
        dtype = _float_dtype(copy_a)
        data = None
        if X is None:
            if require_X:
                raise ValueError(f"{owner}.fit needs X: the data to fit the path on.")
            if y is not None:
                raise ValueError("y was given without X; pass X too, or neither.")
            n_classes = -1
        else:
            data = as_data(X, y, device=device, dtype=dtype)
            n_classes = _probe_model(copy_a, data, "model_a")
            _probe_model(copy_b, data, "model_b")
            if isinstance(data, TensorData):
                check_labels(data.y, n_classes)
                if data.x.ndim == 2:
                    self.n_features_in_ = int(data.x.shape[1])
        return FitInputs(device, copy_a, copy_b, data, n_classes, dtype)

    def _set_path_summary(
        self, path: ModelPath, data: TensorData | StreamData | None, divergence: object
    ) -> None:
        """Set ``path_``, ``length_``, ``energy_``, ``euclidean_length_`` from data."""
        self.path_ = path
        self.euclidean_length_ = euclidean_length(path)
        if data is None:
            self.length_ = None
            self.energy_ = None
            return
        stats = path_statistics(
            path, data, batch_size=self._eval_batch_size(), divergence=divergence
        )
        self.length_ = fisher_rao_length(stats.segment_fisher_rao_sq)
        self.energy_ = float(np.sum(stats.segment_costs))
        path.t_ = arc_length_positions(stats.segment_fisher_rao_sq)
        self.n_classes_ = int(path.logits(_first_batch(data)[:1]).shape[-1])
        self.classes_ = np.arange(self.n_classes_)

    def _eval_batch_size(self) -> int:
        return int(getattr(self, "batch_size", _EVAL_BATCH_SIZE))

    # -- using a fitted path ---------------------------------------------------------

    def _data(self, X: object, y: object = None) -> TensorData | StreamData:
        check_is_fitted(self, "path_")
        path = self.path_
        data = as_data(X, y, device=path.device, dtype=_float_dtype(path.template))
        _probe_model(path.template, data, "the path's models", params=path)
        return data

    def evaluate(self, X: object, y: object = None) -> PathEvaluation:
        """Loss and accuracy of every point on (X, y), with barriers and lengths.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader
            Inputs; a Dataset/DataLoader yields ``(x, y)`` and ``y`` stays None.
        y : array-like of shape (n_samples,)
            Class indices.

        Returns
        -------
        PathEvaluation
            Arrays ``t``, ``loss``, ``accuracy``; floats ``barrier``,
            ``accuracy_barrier``, ``length``, ``euclidean_length``.
        """
        self._data(X, y)  # validation with clear messages
        return evaluate_path(self.path_, X, y, batch_size=self._eval_batch_size())

    def score(self, X: object, y: object = None, sample_weight: None = None) -> float:
        """Minus the loss barrier on (X, y): higher is better, 0 is the best.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader
        y : array-like of shape (n_samples,)
        sample_weight : None
            Not supported; present for scikit-learn's scorer signature.

        Returns
        -------
        float
        """
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by score.")
        return -self.evaluate(X, y).barrier

    def predict_proba(self, X: object) -> np.ndarray:
        """Class probabilities of the path as an ensemble: the mean over its points.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        data = self._data(X)
        stats = path_statistics(
            self.path_, data, batch_size=self._eval_batch_size(), with_proba=True
        )
        return stats.proba.numpy()  # type: ignore[union-attr]

    def predict(self, X: object) -> np.ndarray:
        """Class predicted by the path as an ensemble (argmax of :meth:`predict_proba`).

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    @torch.no_grad()
    def transform(self, X: object) -> np.ndarray:
        """Every point's class probabilities, side by side.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader

        Returns
        -------
        ndarray of shape (n_samples, n_points * n_classes)
            Column ``i * n_classes + k`` is point i's probability of class k.
        """
        data = self._data(X)
        blocks = []
        for batch in data.batches(self._eval_batch_size()):
            proba = torch.softmax(self.path_.logits(batch.x).double(), -1)  # (N, B, C)
            blocks.append(proba.permute(1, 0, 2).reshape(proba.shape[1], -1).cpu())
        return torch.cat(blocks).numpy()

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Names of :meth:`transform`'s columns: ``point{i}_class{k}``.

        Returns
        -------
        ndarray of str of shape (n_points * n_classes,)
        """
        check_is_fitted(self, "path_")
        return np.asarray(
            [f"point{i}_class{k}" for i in range(len(self.path_)) for k in range(self.n_classes_)],
            dtype=object,
        )


def _first_batch(data: TensorData | StreamData) -> torch.Tensor:
    return data.head(2)


@torch.no_grad()
def _probe_model(
    model: nn.Module,
    data: TensorData | StreamData,
    name: str,
    params: ModelPath | None = None,
) -> int:
    """Run ``model`` on two samples; turn a failure into a clear ``ValueError``.

    Returns the number of classes.
    """
    x = data.head(2)
    if has_batchnorm(model) and x.shape[0] < 2:
        x = x.repeat(2, *([1] * (x.ndim - 1)))
    try:
        out = params.logits(x, points=[0])[0] if params is not None else model(x)
    except Exception as exc:
        raise ValueError(
            f"{name} cannot be applied to X: a batch of shape {tuple(x.shape)} "
            f"(dtype {x.dtype}) raised {type(exc).__name__}: {exc}. X must have shape "
            "(n_samples, *input_shape) with the input shape the models expect."
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{name} must map a batch of X to logits of shape (batch, n_classes); for a "
            f"batch of shape {tuple(x.shape)} it returned {shape}."
        )
    if out.shape[1] < 2:
        raise ValueError(
            f"{name} returns {out.shape[1]} logit per sample; a classifier needs at "
            "least 2 classes (use two logits for a binary problem)."
        )
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} returns NaN or infinite logits on X.")
    return int(out.shape[1])
