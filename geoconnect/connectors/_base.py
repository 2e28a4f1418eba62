"""Estimator logic shared by the connectors: inputs, evaluation, prediction."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_feature_names_in,
    _get_feature_names,
    check_array,
    check_is_fitted,
    column_or_1d,
    validate_data,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._data import StreamData, TensorData, as_data, check_labels
from .._device import resolve_device
from .._inputs import (
    BinaryLogit,
    Inputs,
    Output,
    Probabilities,
    adapt_output,
    call,
    check_keywords,
    describe,
    extract_logits,
    is_mapping,
    n_rows,
    named_tensors,
    repeat_rows,
)
from .._model_checks import check_model, check_same_architecture, float_dtype, has_batchnorm
from ..distributed import PathGroup
from ..divergences import Divergence
from ..evaluation import (
    PathEvaluation,
    euclidean_length,
    evaluate_path,
    path_length,
    path_statistics,
    shard_barriers,
)
from ..fitting import FitSettings
from ..models import default_model_factory
from ..path import ModelPath
from ..persistence import describe_architecture, tensor_digest

# Batch size for evaluation passes of estimators without a batch_size parameter.
_EVAL_BATCH_SIZE = 256


#: A fitted attribute that the fit leaves unset (and removes if a previous fit set it).
_UNSET = object()


@dataclass
class FitInputs:
    """Validated fit inputs: copies of the models on the device, the data, and what
    the validation learnt about X and y (assigned only when the fit succeeds)."""

    device: torch.device
    model_a: nn.Module
    model_b: nn.Module
    data: TensorData | StreamData | None
    n_classes: int
    dtype: torch.dtype
    features: dict[str, object] = field(default_factory=dict)
    label_classes: np.ndarray | None = None
    #: The permutations ``align`` applied to model_b's units, by group; empty without.
    alignment: dict[str, torch.Tensor] = field(default_factory=dict)
    #: How the path reads logits off the models' output: ``output``, or converting
    #: probabilities or a binary logit (see :func:`geoconnect._inputs.adapt_output`).
    output: Output = None


class _BaseConnector(TransformerMixin, BaseEstimator):
    """Shared behaviour of :class:`LinearConnector` and :class:`GeodesicConnector`."""

    # The constraints every connector shares; each adds its own.
    _parameter_constraints: dict = {
        "n_points": [Interval(Integral, 2, None, closed="left")],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "model_factory": [callable, None],
        "align": [StrOptions({"weight_matching"}), None],
        "output": [None, str, Integral, callable],
    }

    # -- pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickle on the CPU: an estimator fitted on a GPU unpickles on any machine.

        ``pickle`` runs code when it reads a file: unpickle only files you trust, and
        share a fitted path with ``path_.save(file)`` (safetensors), which
        :meth:`ModelPath.load` reads without running any. ``copy.deepcopy`` keeps
        the devices.
        """
        return {key: _on_cpu(value) for key, value in super().__getstate__().items()}

    def __deepcopy__(self, memo: dict) -> _BaseConnector:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # -- the transaction ---------------------------------------------------------------

    def _fit_transaction(
        self, X: object, y: object, model_a: object, model_b: object
    ) -> _BaseConnector:
        """Every connector's ``fit``: validate, compute the fitted attributes in
        ``_fit`` on the fit's own torch RNG, then assign them all at once."""
        self._validate_params()
        with self._own_torch_rng():
            attributes = self._fit(X, y, model_a, model_b)
        self._assign_fitted(attributes)
        return self

    def _fit(self, X: object, y: object, model_a: object, model_b: object) -> dict[str, object]:
        """The fit's work: the fitted attributes, computed but not set (each connector's)."""
        raise NotImplementedError

    def _assign_fitted(self, attributes: dict[str, object]) -> None:
        """Set every fitted attribute at once; ``_UNSET`` ones are removed.

        The only place a fit writes to the estimator, called once at its very end: a
        fit that raises before leaves a previous fit exactly as it was.
        """
        for name, value in attributes.items():
            if value is _UNSET:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, value)

    def _path_attributes(
        self,
        path: ModelPath,
        inputs: FitInputs,
        divergence: Divergence,
    ) -> dict[str, object]:
        """The fitted attributes of a finished path: its summary on the fit data.

        Sets the path's positions ``t_`` by Fisher–Rao arc length (the path is the
        fit's own, not yet the estimator's).
        """
        attributes: dict[str, object] = {
            "path_": path,
            "euclidean_length_": euclidean_length(path),
            "_label_classes": inputs.label_classes,
            **inputs.features,
        }
        # on top of what the fit's own steps recorded on its path (REPAIR's sites)
        path.metadata = {**path.metadata, "connector": type(self).__name__}
        if inputs.data is None:
            attributes.update(
                length_=None,
                chord_length_=None,
                length_error_=None,
                min_length_=None,
                energy_=None,
                n_classes_=_UNSET,
                classes_=_UNSET,
            )
            return attributes
        attributes.update(self._measured_attributes(path, inputs, inputs.data, divergence))
        return attributes

    def _measured_attributes(
        self,
        path: ModelPath,
        inputs: FitInputs,
        data: TensorData | StreamData,
        divergence: Divergence,
    ) -> dict[str, object]:
        """The attributes measured on the fit data: the lengths, the energy, the
        classes; sets ``path.t_`` and records the numbers in the path's metadata."""
        stats = path_statistics(
            path,
            data,
            batch_size=self._eval_batch_size(),
            divergence=divergence,
            keep_logits=True,  # the length measurement's chords
        )
        # _measured_attributes, _path_attributes, _fit, fit, the caller
        stats.warn_if_nonfinite(stacklevel=5)
        measured = path_length(
            path,
            data,
            batch_size=self._eval_batch_size(),
            chord_squared=stats.segment_fisher_rao_sq,
            point_logits=stats.logits,
        )
        path.t_ = measured.positions
        n_classes = inputs.n_classes
        classes = inputs.label_classes
        attributes: dict[str, object] = {
            "length_": measured.length,
            "chord_length_": measured.chord_length,
            "length_error_": measured.error,
            "min_length_": measured.min_length,
            "energy_": float(np.sum(stats.segment_costs)),
            "n_classes_": n_classes,
            "classes_": np.arange(n_classes) if classes is None else classes,
        }
        path.metadata.update(
            divergence=_divergence_name(getattr(self, "divergence", "jsd")),
            length=measured.length,
            chord_length=measured.chord_length,
            min_length=measured.min_length,
            energy=attributes["energy_"],
            n_classes=n_classes,
        )
        return attributes

    @contextlib.contextmanager
    def _own_torch_rng(self) -> Iterator[None]:
        """Run the fit on a fork of torch's global RNG, seeded from ``random_state``.

        Torch draws from its global generator behind the user's back (every
        DataLoader iteration draws a base seed; a shuffling one its order). In a fork
        those draws follow ``random_state`` and the caller's RNG is left as it was.
        """
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    def _line(self, inputs: FitInputs) -> ModelPath:
        """The straight line between the models, its ends checked against them."""
        path = ModelPath.linear(inputs.model_a, inputs.model_b, self.n_points, inputs.device)
        path.output = inputs.output
        path.alignment = {k: v.to(inputs.device) for k, v in inputs.alignment.items()}
        if inputs.data is not None:
            _check_ends(path, inputs)
        return path

    # -- fitting helpers ---------------------------------------------------------------

    def _fit_inputs(
        self, X: object, y: object, model_a: object, model_b: object, *, require_X: bool
    ) -> FitInputs:
        """Validate fit's inputs; train the two models when neither is given.

        Returns copies of the models on the device (the user's modules are never
        touched), the data as a batch source, and the feature and label attributes
        for the fit to assign at its end; sets nothing on the estimator.
        """
        owner = type(self).__name__
        train = self._check_models(model_a, model_b)
        device = resolve_device(self._device_name(), owner)
        if X is None:
            if require_X or train:
                raise ValueError(
                    f"{owner}.fit needs X: the data to "
                    + ("train the two models and " if train else "")
                    + "fit the path on, an array of shape (n_samples, *input_shape)."
                )
            if y is not None:
                raise ValueError("y was given without X; pass X too, or neither.")
            copy_a = copy.deepcopy(model_a).to(device).eval()
            copy_b = copy.deepcopy(model_b).to(device).eval()
            copy_b, alignment = self._align_models(copy_a, copy_b, None)
            features = {"n_features_in_": _UNSET, "feature_names_in_": _UNSET}
            dtype = float_dtype(copy_a)
            return FitInputs(
                device, copy_a, copy_b, None, -1, dtype, features, None, alignment, self.output
            )
        X, features = self._validate_fit_X(X)
        classes = None
        if train:
            copy_a, copy_b, data, classes = self._train_models(X, y, device)
        else:
            # Copies: fit never touches the user's modules (no .to(), no .eval()).
            copy_a = copy.deepcopy(model_a).to(device).eval()
            copy_b = copy.deepcopy(model_b).to(device).eval()
            data = as_data(X, y, device=device, dtype=float_dtype(copy_a))
        check_keywords(copy_a, data.head(1), "model_a")
        n_classes, output = _probe_model(copy_a, data, "model_a", self.output)
        _, output_b = _probe_model(copy_b, data, "model_b", self.output)
        if type(output_b) is not type(output):
            raise ValueError(
                f"model_a's outputs read as {_reading(output)} but model_b's as "
                f"{_reading(output_b)}; the two ends must be of one architecture with "
                "one output convention."
            )
        copy_b, alignment = self._align_models(copy_a, copy_b, data, output)
        if isinstance(data, TensorData):
            check_labels(data.y, n_classes)
            if data.n_samples < 2 and has_batchnorm(copy_a):
                raise ValueError(
                    "X has one sample, and the models have BatchNorm layers, whose "
                    "statistics need at least two. Pass more samples."
                )
        dtype = float_dtype(copy_a)
        return FitInputs(
            device, copy_a, copy_b, data, n_classes, dtype, features, classes, alignment, output
        )

    def _device_name(self) -> str | torch.device:
        """The device parameter to resolve: ``cuda:LOCAL_RANK`` for a distributed fit
        on GPUs under ``device="auto"``."""
        distributed = getattr(self, "distributed", False)
        if distributed and self.device == "auto" and torch.cuda.is_available():
            return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        return self.device

    # -- distributed fits (the connectors with a ``distributed`` parameter) ------------

    def _check_distributed(self) -> None:
        """Refuse, before any work, what a distributed fit cannot do."""
        if not getattr(self, "distributed", False):
            return
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
            raise ValueError(
                "distributed=True needs an int random_state, so that every rank draws "
                f"the same batches; got {self.random_state!r}. Set random_state=0 (any "
                "int, the same on every rank)."
            )

    def _process_group(self, inputs: FitInputs, fingerprint: dict) -> PathGroup | None:
        """The ranks of a distributed fit, checked to fit the same thing; or None."""
        if not getattr(self, "distributed", False):
            return None
        group = PathGroup.from_environment(inputs.device)
        group.check_same("models, X or parameters", json.dumps(fingerprint, sort_keys=True))
        return group

    def _fingerprint(self, path: ModelPath, data: TensorData | StreamData) -> dict:
        """What tells this fit from another: parameters, architecture, ends, start, X."""
        ignored = ("verbose", "device", "checkpoint")
        parameters = {
            name: _describe(value)
            for name, value in self.get_params(deep=False).items()
            if name not in ignored
        }
        ends = {f"params/{k}": v[[0, -1]] for k, v in path.params.items()}
        ends.update({f"batchnorm/{k}": v[[0, -1]] for k, v in path.batchnorm_buffers.items()})
        ends.update({f"buffers/{k}": v for k, v in path.shared_buffers.items()})
        fingerprint = {
            "parameters": parameters,
            "architecture": describe_architecture(path.template)["fingerprint"],
            "models": tensor_digest(ends),
            "start": tensor_digest(path.interior()),
            "data": _data_digest(data),
        }
        return fingerprint

    def _check_models(self, model_a: object, model_b: object) -> bool:
        """Check the two models (both or neither); True when fit must train them."""
        owner = type(self).__name__
        if (model_a is None) != (model_b is None):
            given, missing = ("model_a", "model_b") if model_b is None else ("model_b", "model_a")
            raise ValueError(
                f"{owner}.fit got {given} but not {missing}: pass both model_a and "
                "model_b, or neither (then fit trains two models on (X, y) itself, "
                "from model_factory)."
            )
        if model_a is None:
            return True
        check_same_architecture(
            check_model(model_a, "model_a", owner), check_model(model_b, "model_b", owner)
        )
        return False

    def _align_models(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        data: TensorData | StreamData | None,
        output: Output = None,
    ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Apply ``align`` to the copy of model_b; check on data that it still agrees.

        Returns the aligned copy and the permutations (none without ``align``).
        """
        if getattr(self, "align", None) is None:
            return model_b, {}
        from ..align import weight_matching

        aligned, permutations = weight_matching(
            model_a,
            model_b,
            random_state=getattr(self, "random_state", None),
            return_permutations=True,
        )
        aligned.eval()
        if data is not None:
            with torch.no_grad():
                x = data.head(64)
                before = extract_logits(call(model_b, x), output)
                after = extract_logits(call(aligned, x), output)
            if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max()):
                raise ValueError(
                    f"align={self.align!r}: the permutation structure derived for "
                    f"{type(model_b).__name__} changes what model_b computes, so it is "
                    "wrong for this network. Align model_b yourself with "
                    "geoconnect.align.weight_matching(model_a, model_b, spec=...) and an "
                    "explicit PermutationSpec, and fit with align=None."
                )
        return aligned, permutations

    def _validate_fit_X(self, X: object) -> tuple[object, dict[str, object]]:
        """Validate fit's X; return it and its feature attributes, set on nothing.

        A 2-D array-like or tensor gives ``n_features_in_`` (and
        ``feature_names_in_`` for a DataFrame with string column names); other
        inputs give neither, and the fit removes any a previous fit left.
        """
        features: dict[str, object] = {"n_features_in_": _UNSET, "feature_names_in_": _UNSET}
        if X is None or isinstance(X, (Dataset, DataLoader)) or is_mapping(X):
            return X, features
        if isinstance(X, torch.Tensor):
            if X.ndim == 2:
                features["n_features_in_"] = int(X.shape[1])
            return X, features
        names = _get_feature_names(X)
        X = self._check_array(X)
        if X.ndim == 2:
            features["n_features_in_"] = int(X.shape[1])
            if names is not None:
                features["feature_names_in_"] = names
        return X, features

    def _check_array(self, X: object) -> np.ndarray:
        """scikit-learn's checks of an array-like X of any number of dimensions."""
        _check_numeric_dtype(X)
        return check_array(X, allow_nd=True, dtype="numeric", input_name="X", estimator=self)

    def _validate_X(self, X: object) -> object:
        """Validate X of a fitted estimator against the fit's ``n_features_in_``.

        Tensors, Datasets and DataLoaders are validated by
        :func:`~geoconnect._data.as_data`; a 2-D tensor's width is checked here.
        """
        if X is None or isinstance(X, (Dataset, DataLoader)) or is_mapping(X):
            return X
        if isinstance(X, torch.Tensor):
            if X.ndim == 2 and hasattr(self, "n_features_in_"):
                if X.shape[1] != self.n_features_in_:
                    raise ValueError(
                        f"X has {X.shape[1]} features, but {type(self).__name__} is "
                        f"expecting {self.n_features_in_} features as input."
                    )
            return X
        try:
            ndim = np.ndim(X)
        except (TypeError, ValueError):  # ragged or odd input: let check_array say so
            ndim = 2
        if ndim > 2:
            return self._check_array(X)
        _check_numeric_dtype(X)
        return validate_data(self, X, reset=False, dtype="numeric")

    def _train_models(
        self, X: object, y: object, device: torch.device
    ) -> tuple[nn.Module, nn.Module, TensorData, np.ndarray]:
        """Train two models from ``model_factory`` with two seeds from random_state."""
        owner = type(self).__name__
        data, labels = self._labelled_data(X, y, device)
        if not isinstance(data.x, torch.Tensor):
            raise ValueError(
                f"{owner}.fit trains its two models only on an array X; X is a mapping of "
                "keyword inputs. Pass model_a and model_b, the two networks to connect."
            )
        check_classification_targets(labels)
        classes, encoded = np.unique(labels, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                f"y has 1 class ({classes[0]!r}); training the two models needs at least "
                "2 classes. Pass y with two or more classes, or pass model_a and model_b."
            )
        data.y = torch.as_tensor(encoded.reshape(-1), dtype=torch.long, device=data.x.device)
        factory = default_model_factory if self.model_factory is None else self.model_factory
        if not callable(factory):
            raise TypeError(
                f"The 'model_factory' parameter of {owner} must be a callable "
                f"model_factory(X, y, seed) -> trained nn.Module, or None. Got "
                f"{type(factory).__name__} instead."
            )
        rng = check_random_state(self.random_state)
        seeds = rng.randint(np.iinfo(np.int32).max, size=2)
        x_train, y_train = data.x.to(device), data.y.to(device)
        models = []
        for name, seed in zip(("model_a", "model_b"), seeds):
            model = factory(x_train, y_train, int(seed))
            model = check_model(model, f"model_factory's {name}", owner)
            models.append(copy.deepcopy(model).to(device).eval())
        check_same_architecture(*models)
        return models[0], models[1], data, classes

    def _labelled_data(
        self, X: object, y: object, device: torch.device
    ) -> tuple[TensorData, np.ndarray]:
        """X in memory, and the labels to train the models on (from y or from X)."""
        owner = type(self).__name__
        if y is None and not isinstance(X, (Dataset, DataLoader)):
            raise ValueError(
                f"{owner} requires y to be passed, but the target y is None. Without "
                "model_a and model_b, fit trains two models on (X, y): pass y (class "
                "labels), or pass both models."
            )
        if isinstance(X, (Dataset, DataLoader)):
            data = as_data(X, y, device=device).materialise()
            if data.y is None:
                raise ValueError(
                    f"{owner} requires y to be passed, but the target y is None: X yields "
                    "no labels. Without model_a and model_b, fit trains two models on "
                    "(X, y); yield (x, y) pairs from X, or pass both models."
                )
            labels = data.y.cpu().numpy()
        else:
            labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
            labels = column_or_1d(np.asarray(labels), warn=True)
            data = as_data(X, None, device=device)
            if labels.shape[0] != data.n_samples:
                raise ValueError(
                    f"y has {labels.shape[0]} labels but X has {data.n_samples} samples; "
                    "they must have the same length."
                )
        return data, labels

    def _eval_batch_size(self) -> int:
        return int(getattr(self, "batch_size", _EVAL_BATCH_SIZE))

    # -- using a fitted path ---------------------------------------------------------

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Without model_a and model_b, fit trains two classifiers on (X, y).
        tags.target_tags.required = True
        tags.input_tags.three_d_array = True
        # transform returns float64 probabilities whatever X's dtype (the networks
        # have their own): only float64 input comes back as float64.
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags

    def _data(self, X: object, y: object = None) -> TensorData | StreamData:
        check_is_fitted(self, "path_")
        path = self.path_
        X = self._validate_X(X)
        y = self._encode_labels(y)
        data = as_data(X, y, device=path.device, dtype=float_dtype(path.template))
        check_keywords(path.template, data.head(1), "the path's models")
        _probe_model(path.template, data, "the path's models", path.output, params=path)
        return data

    def _encode_labels(self, y: object) -> object:
        """Map labels to class indices when fit trained the models on its own labels."""
        classes = getattr(self, "_label_classes", None)
        if y is None or classes is None:
            return y
        labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        labels = column_or_1d(labels)
        index = np.searchsorted(classes, labels).clip(0, classes.size - 1)
        unknown = classes[index] != labels
        if np.any(unknown):
            raise ValueError(
                f"y contains labels the path was not fit on: {labels[unknown][:5].tolist()}"
                f"; fit saw classes_ = {classes.tolist()}."
            )
        return index

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

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.evaluate(X, y).loss.shape
        (5,)
        """
        return self._evaluate(X, y)

    def _evaluate(self, X: object, y: object, lengths: bool = True) -> PathEvaluation:
        data = self._data(X, y)
        if self.path_.shard is not None and not lengths:  # barriers across the ranks
            return shard_barriers(self.path_, data, batch_size=self._eval_batch_size())
        return evaluate_path(
            self.path_, data, None, batch_size=self._eval_batch_size(), lengths=lengths
        )

    def score(self, X: object, y: object = None, sample_weight: None = None) -> float:
        """Minus the loss barrier on (X, y): higher is better, 0 is the best.

        ``-inf`` when the barrier is NaN (some point's loss is not finite; a
        ``RuntimeWarning`` names the points), so a broken path never outranks a sound
        one in a grid search.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader
        y : array-like of shape (n_samples,)
        sample_weight : None
            Not supported; present for scikit-learn's scorer signature.

        Returns
        -------
        float

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.score(X, y) <= 0.0
        True
        """
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by score.")
        barrier = self._evaluate(X, y, lengths=False).barrier
        # A broken path (NaN barrier) ranks below every sound one, in any comparison.
        return -barrier if np.isfinite(barrier) else -np.inf

    def predict_proba(self, X: object) -> np.ndarray:
        """Class probabilities of the path as an ensemble: the mean over its points.

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader

        Returns
        -------
        ndarray of shape (n_samples, n_classes)

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.predict_proba(X).shape
        (20, 3)
        """
        return self._point_probabilities(X).mean(1).numpy()

    def predict(self, X: object) -> np.ndarray:
        """Class predicted by the path as an ensemble (argmax of :meth:`predict_proba`).

        Parameters
        ----------
        X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader

        Returns
        -------
        ndarray of shape (n_samples,)

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.predict(X).shape
        (20,)
        """
        index = self.predict_proba(X).argmax(axis=1)
        return self.classes_[index] if hasattr(self, "classes_") else index

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

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.transform(X).shape
        (20, 15)
        """
        proba = self._point_probabilities(X)
        return proba.reshape(proba.shape[0], -1).numpy()

    @torch.no_grad()
    def _point_probabilities(self, X: object) -> torch.Tensor:
        """Every point's class probabilities on X: (n_samples, n_points, n_classes).

        The one pass behind :meth:`transform` and :meth:`predict_proba`, in float64.
        """
        data = self._data(X)
        self.path_.check_whole("predict with")
        blocks = []
        for batch in data.batches(self._eval_batch_size()):
            proba = torch.softmax(self.path_.logits(batch.x).double(), -1)  # (N, B, C)
            blocks.append(proba.permute(1, 0, 2).cpu())
        return torch.cat(blocks)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Names of :meth:`transform`'s columns: ``point{i}_class{k}``.

        Returns
        -------
        ndarray of str of shape (n_points * n_classes,)

        Examples
        --------
        >>> import torch
        >>> from geoconnect import LinearConnector
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
        >>> line.get_feature_names_out()[:2].tolist()
        ['point0_class0', 'point0_class1']
        """
        check_is_fitted(self, "path_")
        if input_features is not None:  # only validated: the outputs are not features
            _check_feature_names_in(self, input_features)
        if not hasattr(self, "n_classes_"):
            raise ValueError(
                "The number of classes is unknown: this LinearConnector was fit without "
                "X. Fit it with X to name transform's columns."
            )
        return np.asarray(
            [f"point{i}_class{k}" for i in range(len(self.path_)) for k in range(self.n_classes_)],
            dtype=object,
        )


#: The optimisation parameters of every trained connector, validated alike.
OPTIMISATION_CONSTRAINTS: dict = {
    "solver": [StrOptions({"adam", "sgd"})],
    "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, 1, closed="left")],
    "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
}


def communication(group: PathGroup | None) -> object:
    """A distributed fit's ``communication_``: this rank, the number of ranks and what
    it sent (:attr:`PathGroup.counts`); ``_UNSET`` for a fit in one process."""
    if group is None:
        return _UNSET
    return {"rank": group.rank, "world_size": group.world_size, **group.counts}


def check_points_per_rank(n_points: int, group: PathGroup | None, what: str = "point") -> None:
    """Refuse a path-parallel fit that leaves some rank without an interior ``what``."""
    if group is not None and n_points - 2 < group.world_size:
        raise ValueError(
            f"distributed=True splits the {n_points - 2} interior {what}s of "
            f"n_points={n_points} across {group.world_size} ranks, which leaves some rank "
            f"without one. Set n_points ≥ {group.world_size + 2}, or launch fewer processes."
        )


def optimisation_settings(estimator: Any, **more: Any) -> FitSettings:
    """The engine's settings from a trained connector's optimisation parameters;
    ``more`` adds settings, or replaces them (a resolved ``"auto"``)."""
    values = {
        "solver": estimator.solver,
        "learning_rate": estimator.learning_rate_init,
        "max_iter": estimator.max_iter,
        "batch_size": estimator.batch_size,
        "tol": estimator.tol,
        "n_iter_no_change": estimator.n_iter_no_change,
    }
    return FitSettings(**{**values, **more})


class _LossConnector(_BaseConnector):
    """The connectors trained on the labelled loss (the curves, the elastic band):
    their shared constraints, labelled inputs, settings and batch-order generator."""

    _parameter_constraints: dict = {
        **_BaseConnector._parameter_constraints,
        **OPTIMISATION_CONSTRAINTS,
    }

    def _labelled_inputs(
        self, X: object, y: object, model_a: object, model_b: object, *, why: str
    ) -> FitInputs:
        """The fit's inputs, refused without labels; ``why`` says what needs them."""
        inputs = self._fit_inputs(X, y, model_a, model_b, require_X=True)
        if getattr(inputs.data, "y", None) is None and not hasattr(inputs.data, "source"):
            raise ValueError(
                f"{type(self).__name__} {why}, so it needs labels: pass y (class "
                "indices), or yield (x, y) from a Dataset. The label-free path is "
                "GeodesicConnector's."
            )
        return inputs

    def _settings(self) -> FitSettings:
        return optimisation_settings(self)

    @contextlib.contextmanager
    def _ranks(
        self, path: ModelPath, inputs: FitInputs
    ) -> Iterator[tuple[FitSettings, PathGroup | None]]:
        """The fit's settings and its process group (None in one process): with
        ``distributed``, the ranks checked to fit the same thing, and inside, their
        warnings given once, by rank 0."""
        distributed = getattr(self, "distributed", False)
        fingerprint = self._fingerprint(path, inputs.data) if distributed else {}  # type: ignore[arg-type]
        labels = getattr(inputs.data, "y", None)
        if distributed and labels is not None:  # the loss's labels: the same on every rank
            fingerprint["labels"] = tensor_digest({"y": labels})
        group = self._process_group(inputs, fingerprint)
        settings = self._settings()
        if group is None:
            yield settings, None
            return
        with group.warnings_once():
            yield (
                replace(settings, group=group, verbose=settings.verbose * (group.rank == 0)),
                group,
            )

    def _generator(self) -> torch.Generator:
        """The generator of the batch order and the fit's other draws, from
        ``random_state``."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _check_ends(path: ModelPath, inputs: FitInputs) -> None:
    """Warn, naming what differs, when an end of the path does not compute its model.

    The path's points share model_a's module (its hooks, plain attributes and every
    buffer that is not a BatchNorm statistic); what model_b has of its own is lost.
    """
    assert inputs.data is not None
    x = _probe_batch(inputs.data, 8, inputs.model_a)
    ends = path.logits(x, points=[0, -1], strategy="loop")
    for end, name, model in (
        (ends[0], "model_a", inputs.model_a),
        (ends[1], "model_b", inputs.model_b),
    ):
        expected = extract_logits(call(model, x), path.output)
        if torch.equal(end, expected):
            continue
        scale = max(float(expected.nan_to_num(0.0, 0.0, 0.0).abs().max()), 1.0)
        if torch.allclose(end, expected, rtol=1e-5, atol=1e-6 * scale, equal_nan=True):
            continue
        gap = float((end - expected).nan_to_num(0.0).abs().max())
        warnings.warn(
            f"The path's {'first' if name == 'model_a' else 'last'} point does not compute "
            f"what {name} computes (largest logit difference {gap:.3g} on the first "
            f"samples of X): {_differences(inputs.model_a, inputs.model_b)}. Every point "
            "of a path shares model_a's module: its hooks, plain attributes and buffers "
            "that are not BatchNorm statistics. Make them equal in both models, or make "
            "them parameters.",
            UserWarning,
            stacklevel=5,  # _check_ends, _line, _fit, fit, the caller
        )


def _reading(output: Output) -> str:
    if isinstance(output, BinaryLogit):
        return "one binary logit"
    return "probabilities" if isinstance(output, Probabilities) else "logits"


def _differences(model_a: nn.Module, model_b: nn.Module) -> str:
    """What model_b has that a path built from model_a's module does not reproduce."""
    found = []
    buffers_b = dict(model_b.named_buffers())
    for name, buffer in model_a.named_buffers():
        other = buffers_b.get(name)
        if other is not None and not torch.equal(buffer, other.to(buffer.device)):
            found.append(f"buffer {name!r}")
    modules_b = dict(model_b.named_modules())
    for name, module in model_a.named_modules():
        other = modules_b.get(name)
        if other is None:
            continue
        label = name or type(module).__name__
        if len(other._forward_hooks) + len(other._forward_pre_hooks) != len(
            module._forward_hooks
        ) + len(module._forward_pre_hooks):
            found.append(f"the hooks of {label!r}")
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training":
                continue
            if _plain(value) and _plain(vars(other).get(attr)) and value != vars(other)[attr]:
                found.append(f"attribute {label}.{attr} ({value!r} against {vars(other)[attr]!r})")
    return "differing " + ", ".join(found[:5]) if found else "nothing found to differ"


def _on_cpu(value: object) -> object:
    """Tensors, in dicts at any depth, moved to the CPU (a path moves itself)."""
    if isinstance(value, torch.Tensor):
        return value.to("cpu")
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    return value


def _divergence_name(divergence: object) -> str:
    """A divergence as a file records it: its name, or a callable's qualified name."""
    if isinstance(divergence, str):
        return divergence
    return f"{getattr(divergence, '__module__', '?')}.{getattr(divergence, '__qualname__', '?')}"


def _plain(value: object) -> bool:
    return isinstance(value, (bool, int, float, str, tuple)) and not isinstance(value, torch.Tensor)


def _check_numeric_dtype(X: object) -> None:
    dtype = getattr(X, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind in "USV":
        raise TypeError(
            f"X must hold numbers; got an array of dtype {dtype}. Convert it with "
            "np.asarray(X, dtype=np.float32)."
        )


def _probe_batch(data: TensorData | StreamData, n: int, model: nn.Module) -> Inputs:
    """The first ``n`` samples of X; two at least for a model with BatchNorm."""
    x = data.head(n)
    if has_batchnorm(model) and n_rows(x) < 2:
        x = repeat_rows(x, 2)
    return x


@torch.no_grad()
def _probe_model(
    model: nn.Module,
    data: TensorData | StreamData,
    name: str,
    output: Output,
    params: ModelPath | None = None,
) -> tuple[int, Output]:
    """Run ``model`` (or the path's first point) on the first samples of X.

    Returns the number of classes and how to read logits off the model's output:
    ``output``, or for a model (not a path) whose rows are probabilities or one
    binary logit, ``output`` wrapped to convert them (:func:`adapt_output`). A
    failure is a clear ``ValueError``.
    """
    x = _probe_batch(data, 2, model)
    try:
        raw = params.logits(x, points=[0])[0] if params is not None else call(model, x)
    except Exception as exc:
        expected = (
            "(n_samples, *input_shape) with the input shape the models expect"
            if isinstance(x, torch.Tensor)
            else "a mapping of the keyword arguments the models' forward takes"
        )
        raise ValueError(
            f"{name} cannot be applied to X: {describe(x)} raised "
            f"{type(exc).__name__}: {exc}. X must be {expected}."
        ) from None
    if params is not None:
        _check_logits(raw, x, name, output)
        return int(raw.shape[1]), output
    logits = extract_logits(raw, output)
    _check_logits(logits, x, name, output)
    adapted = adapt_output(logits, output)
    if adapted is not output:
        logits = extract_logits(raw, adapted)
    # NaN on later rows of X is reported along the path (a warning, NaN numbers and
    # score −inf), not refused here.
    _check_finite(logits, name, adapted)
    return int(logits.shape[1]), adapted


def _check_logits(out: torch.Tensor, x: Inputs, name: str, output: Output) -> None:
    """Refuse what is no batch of logits (or one column, a binary logit)."""
    if out.ndim != 2:
        raise ValueError(
            f"{name} must map a batch of X to logits of shape (batch, n_classes); for "
            f"{describe(x)} its logits have shape {tuple(out.shape)}"
            + (
                ". Pass output= to say where the logits are in its output (geoconnect "
                "connects classifiers; regression is not supported yet)."
                if output is None
                else f" (read by output={output!r})."
            )
        )
    if out.shape[0] != n_rows(x):
        raise ValueError(
            f"{name}'s logits have shape {tuple(out.shape)} for {describe(x)}: one row per "
            "sample is needed, (batch, n_classes)."
            + ("" if output is None else f" Check output={output!r}.")
        )
    if out.shape[1] < 1:
        raise ValueError(f"{name} returns no logit per sample; a classifier needs some.")


def _check_finite(logits: torch.Tensor, name: str, output: Output) -> None:
    """Refuse NaN and infinite logits; ``−inf`` only where a probability was zero."""
    if isinstance(output, Probabilities) and not isinstance(output, BinaryLogit):
        bad = torch.isnan(logits) | (logits == math.inf)
        if bool(bad.any()) or not bool(torch.isfinite(logits).any(-1).all()):
            raise ValueError(f"{name} returns NaN or infinite probabilities on X.")
        return
    if not torch.isfinite(logits).all():
        raise ValueError(f"{name} returns NaN or infinite logits on X.")


def _describe(value: object) -> object:
    """A parameter's value as a checkpoint's fingerprint records it (JSON)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.random.RandomState):
        return "a RandomState instance"
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def _data_digest(data: TensorData | StreamData) -> str:
    """A digest of X: all of it in memory, or a stream's first batch and length."""
    if isinstance(data, TensorData):
        return tensor_digest(named_tensors(data.x, "x"))
    # Reading a shuffling DataLoader draws from torch's generator: a fit with a
    # checkpoint must draw what one without draws, so the reading draws from a fork.
    with torch.random.fork_rng(devices=[]):
        head = data.head(256)
    return tensor_digest(named_tensors(head, "head"), f"a stream of {data.n_samples} samples")
