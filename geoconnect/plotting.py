"""Figures of paths: loss along paths, the optimisation's history, the loss plane.

Every function draws with matplotlib, takes ``ax=`` to draw into existing axes, and
returns what it drew on. The numbers drawn come from :mod:`geoconnect.evaluation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .divergences import SPECS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .evaluation import PathEvaluation
    from .path import ModelPath

__all__ = ["plot_history", "plot_loss_plane", "plot_loss_profile"]


def _evaluations(value: object, name: str) -> dict[str, PathEvaluation]:
    from .evaluation import PathEvaluation

    if value is None:
        return {}
    if isinstance(value, PathEvaluation):
        return {"path": value}
    if isinstance(value, Mapping) and all(isinstance(v, PathEvaluation) for v in value.values()):
        if not value:
            raise ValueError(f"{name} is an empty mapping: give at least one PathEvaluation.")
        return {str(k): v for k, v in value.items()}
    raise TypeError(
        f"{name} must be a PathEvaluation or a mapping of label to PathEvaluation "
        f"(e.g. {{'linear': line.evaluate(X, y)}}); got {type(value).__name__}."
    )


def _positions(ev: PathEvaluation, position: str) -> np.ndarray:
    if position == "index":
        return np.asarray(ev.t)
    if ev.t_arc is None:
        raise ValueError(
            "position='arc' needs the evaluations' Fisher–Rao arc-length positions "
            "(t_arc), which this PathEvaluation lacks; use position='index' or an "
            "evaluation from connector.evaluate(X, y)."
        )
    return np.asarray(ev.t_arc)


def plot_loss_profile(
    evaluations: PathEvaluation | Mapping[str, PathEvaluation],
    test: PathEvaluation | Mapping[str, PathEvaluation] | None = None,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    accuracy: bool = False,
    position: Literal["index", "arc"] = "index",
    title: str | None = None,
) -> Any:
    """Loss (and accuracy) along one or more paths against the position on the path.

    The seed paper's Figure 2 (right): one colour per path, train data solid and test
    data dashed; each legend entry gives the path's loss barrier on that data.

    Parameters
    ----------
    evaluations : PathEvaluation or mapping of str to PathEvaluation
        The paths on the first data set (e.g. train), e.g. ``{"linear": ev_line,
        "geodesic": ev_geo}``; a single evaluation is labelled ``"path"``.
    test : PathEvaluation or mapping of str to PathEvaluation, optional
        The same paths on a second data set (e.g. test), drawn dashed in the colour of
        the entry of ``evaluations`` with the same label.
    ax : matplotlib Axes, or a pair of Axes when ``accuracy=True``, optional
        Where to draw; a new figure when omitted.
    accuracy : bool, default=False
        Also draw the accuracy, in a second panel below the loss.
    position : {"index", "arc"}, default="index"
        Horizontal axis: ``t = i / (N − 1)``, the positions the barrier uses, or the
        points' Fisher–Rao arc-length positions on that data (``t_arc``).
    title : str, optional
        Title of the (loss) panel.

    Returns
    -------
    matplotlib.axes.Axes or ndarray of two Axes
        The loss axes; with ``accuracy=True``, ``[loss_axes, accuracy_axes]``.

    Examples
    --------
    >>> from geoconnect.evaluation import PathEvaluation
    >>> from geoconnect.plotting import plot_loss_profile
    >>> line = PathEvaluation.from_arrays([0.1, 0.9, 0.2], [1.0, 0.6, 1.0])
    >>> geo = PathEvaluation.from_arrays([0.1, 0.15, 0.2], [1.0, 1.0, 1.0])
    >>> ax = plot_loss_profile({"linear": line, "geodesic": geo})
    >>> ax.get_ylabel()
    'cross-entropy loss (nats)'
    >>> loss_ax, acc_ax = plot_loss_profile({"linear": line}, {"linear": line}, accuracy=True)
    >>> acc_ax.get_ylabel()
    'accuracy (%)'
    """
    first = _evaluations(evaluations, "evaluations")
    second = _evaluations(test, "test")
    if position not in ("index", "arc"):
        raise ValueError(f"position must be 'index' or 'arc'; got {position!r}.")
    loss_ax, acc_ax = _profile_axes(ax, accuracy)
    names = ("train", "test") if second else ("", "")
    colors: dict[str, str] = {}
    for group, style, name in ((first, "-", names[0]), (second, "--", names[1])):
        for label, ev in group.items():
            _draw_profile(loss_ax, acc_ax, label, ev, style, name, position, colors)
    xlabel = (
        "position on the path, t = i / (N − 1)"
        if position == "index"
        else "position by Fisher–Rao arc length (fraction of the length)"
    )
    loss_ax.set_ylabel("cross-entropy loss (nats)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="best", fontsize="small")
    if title:
        loss_ax.set_title(title)
    if acc_ax is None:
        loss_ax.set_xlabel(xlabel)
        return loss_ax
    acc_ax.set_xlabel(xlabel)
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="best", fontsize="small")
    return np.asarray([loss_ax, acc_ax], dtype=object)


def _profile_axes(ax: Axes | Sequence[Axes] | None, accuracy: bool) -> tuple[Axes, Axes | None]:
    """The loss axes and the accuracy axes (None without ``accuracy``): ``ax``'s,
    checked, or a new figure's."""
    import matplotlib.pyplot as plt

    if ax is None:
        if accuracy:
            _, axes = plt.subplots(
                2, 1, figsize=(6.4, 5.2), sharex=True, constrained_layout=True,
                height_ratios=(3, 2),
            )  # fmt: skip
            return axes[0], axes[1]
        _, loss_ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
        return loss_ax, None
    if accuracy:
        if not (isinstance(ax, (Sequence, np.ndarray)) and len(ax) == 2):
            raise ValueError(
                "With accuracy=True, ax must be a pair of Axes (loss, accuracy), e.g. "
                "plt.subplots(2, 1, sharex=True)[1]; got a single Axes."
            )
        return ax[0], ax[1]
    if isinstance(ax, (Sequence, np.ndarray)):
        raise ValueError("ax must be a single Axes unless accuracy=True.")
    return ax, None


def _draw_profile(
    loss_ax: Axes,
    acc_ax: Axes | None,
    label: str,
    ev: PathEvaluation,
    style: str,
    name: str,
    position: str,
    colors: dict[str, str],
) -> None:
    """One path's loss (and accuracy) curve, in the colour of its label so far."""
    x = _positions(ev, position)
    suffix = f", {name}" if name else ""
    kwargs: dict[str, Any] = {"linestyle": style, "marker": "o", "markersize": 3}
    if label in colors:
        kwargs["color"] = colors[label]
    (line,) = loss_ax.plot(
        x, ev.loss, label=f"{label}{suffix} (barrier {ev.barrier:.3g} nats)", **kwargs
    )
    colors.setdefault(label, line.get_color())
    if acc_ax is not None:
        kwargs["color"] = colors[label]
        acc_ax.plot(
            x,
            100 * np.asarray(ev.accuracy),
            label=f"{label}{suffix} (min {100 * ev.min_accuracy:.1f}%)",
            **kwargs,
        )


def _history(source: object) -> tuple[dict[str, list[float]], object]:
    history = getattr(source, "history_", source)
    divergence = getattr(source, "divergence", None)
    if not hasattr(source, "history_") and hasattr(source, "get_params"):
        raise ValueError(
            f"This {type(source).__name__} has no history_: plot_history needs a fitted "
            "GeodesicConnector. Call fit(X, model_a=..., model_b=...) first."
        )
    keys = ("energy", "chord_length", "euclidean_length")
    curve_keys = ("energy", "length", "euclidean_length")  # a curve's
    if not isinstance(history, Mapping) or not (
        all(k in history for k in keys) or all(k in history for k in curve_keys)
    ):
        raise TypeError(
            "plot_history needs a fitted GeodesicConnector or its history_, a dict with "
            f"the per-epoch lists {list(keys)} (a chain's) or {list(curve_keys)} (a "
            f"curve's); got {type(source).__name__}."
        )
    if len(history["energy"]) == 0:
        raise ValueError(
            "The history is empty: the fit ran no epoch (a path of 2 points has no "
            "interior to optimise)."
        )
    return dict(history), divergence


def _levels(n_points: object, n_epochs: int) -> list[tuple[int, int, int]]:
    """Runs of epochs with one number of points: (first, last, n_points), 0-based."""
    if n_points is None or len(n_points) != n_epochs:  # type: ignore[arg-type]
        return []
    runs: list[tuple[int, int, int]] = []
    for i, n in enumerate(n_points):  # type: ignore[union-attr]
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], i, int(n))
        else:
            runs.append((i, i, int(n)))
    return runs


def plot_history(
    connector: object,
    *,
    baseline: object = None,
    ax: Sequence[Axes] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """Energy, Fisher–Rao length and Euclidean length over the optimisation.

    The seed paper's Figure 2 (left): as the energy falls, the path's length in the
    space of predictive distributions (Fisher–Rao) falls while its length in
    parameter space (Euclidean) rises — the path bends away from the straight line.
    The Fisher–Rao panel is the chord sum at the points per epoch
    (``history_["chord_length"]``), or for a curve (``curve="bezier"``, the
    default) the epoch's mean of the chord sums on each batch's grid of ``t``
    (``history_["length"]``), whose energy is the Fisher–Rao energy in rad²; a
    fitted connector's continuous ``length_``, the networks between the points
    included, is marked at the last epoch. When the
    history records a coarse-to-fine fit (``history_["n_points"]`` changes),
    the coarse levels are shaded, dotted lines mark each refinement and the x label
    lists the levels' numbers of points; a coarse level's numbers are those of its
    coarser polygon, measured at its points only, so the lengths can jump when
    points are added.

    Parameters
    ----------
    connector : GeodesicConnector or dict
        A fitted connector, or its ``history_`` (per-epoch lists ``energy``,
        ``chord_length`` — ``length`` for a curve — and ``euclidean_length``).
    baseline : LinearConnector, optional
        A straight line between the same models, fitted on the same X: its
        ``length_``, ``euclidean_length_`` (and ``energy_``, for the JSD) are drawn as
        dashed horizontal references.
    ax : sequence of three matplotlib Axes, optional
        Where to draw energy, Fisher–Rao length and Euclidean length; a new figure of
        three panels when omitted.
    title : str, optional
        Title of the figure.

    Returns
    -------
    ndarray of three matplotlib Axes
        Energy, Fisher–Rao length, Euclidean length.

    Examples
    --------
    >>> from geoconnect.plotting import plot_history
    >>> history = {"energy": [0.5, 0.3, 0.25], "chord_length": [2.0, 1.6, 1.5],
    ...            "euclidean_length": [10.0, 11.0, 11.5]}
    >>> axes = plot_history(history)
    >>> [a.get_ylabel() for a in axes]
    ['energy', 'Fisher–Rao chord length (rad)', 'Euclidean length (‖Δθ‖₂)']
    """
    import matplotlib.pyplot as plt

    history, divergence = _history(connector)
    if ax is None:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.3), constrained_layout=True)
    else:
        if not (isinstance(ax, (Sequence, np.ndarray)) and len(ax) == 3):
            raise ValueError(
                "ax must be three Axes (energy, Fisher–Rao length, Euclidean length), "
                "e.g. plt.subplots(1, 3)[1]."
            )
        axes = list(ax)
        fig = axes[0].figure
    epochs = np.arange(1, len(history["energy"]) + 1)
    curve = "chord_length" not in history  # a curve's record: its Fisher–Rao energy
    panels = _history_panels(curve)
    levels = _levels(history.get("n_points"), len(epochs))
    length = getattr(connector, "length_", None)
    for axis, (key, ylabel, panel_title, attr) in zip(axes, panels):
        axis.plot(epochs, history[key], marker="o", markersize=3, label="geodesic fit")
        _shade_levels(axis, levels)
        reference = getattr(baseline, attr, None) if baseline is not None and attr else None
        if key == "energy" and (curve or divergence not in (None, "jsd")):
            reference = None  # the line's energy_ is a JSD sum: not comparable
        if reference is not None:
            axis.axhline(reference, color="0.35", linestyle="--", label="straight line")
        measured = key == panels[1][0] and length is not None
        if measured:
            axis.plot(epochs[-1:], [length], "*", color="C3", ms=10, label="length_ (continuous)")
        axis.set_ylabel(ylabel)
        if key == "energy":
            panel_title = _energy_title(curve, divergence) or panel_title
        axis.set_title(panel_title, fontsize="medium")
        axis.grid(alpha=0.3)
        if reference is not None or measured:
            axis.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return np.asarray(axes, dtype=object)


def _history_panels(curve: bool) -> list[tuple[str, str, str, str]]:
    """Per panel: the history's key, the y label, the title and the attribute of
    the baseline (the straight line) drawn as reference."""
    chords = (
        ("length", "Fisher–Rao length (rad)", "chord sums on the batches' grids of t", "length_")
        if curve
        else (
            "chord_length",
            "Fisher–Rao chord length (rad)",
            "chord sum at the points",
            "chord_length_",
        )
    )
    return [
        ("energy", "energy", "energy (Σ segment divergences)", "energy_"),
        chords,
        (
            "euclidean_length",
            "Euclidean length (‖Δθ‖₂)",
            "length in parameter space",
            "euclidean_length_",
        ),
    ]


def _energy_title(curve: bool, divergence: object) -> str | None:
    """The energy panel's title with its units, where they are known: a curve's is
    Fisher–Rao; the chain's sums a built-in divergence's values."""
    if curve:
        return "energy (Fisher–Rao, rad²)"
    spec = SPECS.get(divergence) if isinstance(divergence, str) else None
    return None if spec is None else f"energy ({spec.label}, {spec.units})"


def _shade_levels(axis: Axes, levels: list[tuple[int, int, int]]) -> None:
    """Shade the coarse levels of a coarse-to-fine fit, a dotted line at each
    refinement, and say so in the x label."""
    if len(levels) <= 1:
        axis.set_xlabel("epoch")
        return
    axis.axvspan(0.5, levels[-1][0] + 0.5, color="0.92", zorder=0)
    for first, _, _ in levels[1:]:
        axis.axvline(first + 0.5, color="0.6", linestyle=":", linewidth=1)
    coarse = ", ".join(str(n) for _, _, n in levels[:-1])
    axis.set_xlabel(f"epoch (shaded: coarse, N = {coarse})")


# -- the loss plane ---------------------------------------------------------------------


def _as_path(value: object, label: str) -> ModelPath:
    from .path import ModelPath

    path = getattr(value, "path_", value)
    if not isinstance(path, ModelPath):
        raise TypeError(
            f"paths[{label!r}] must be a ModelPath or a fitted connector (with path_); "
            f"got {type(value).__name__}."
        )
    return path


def _unflatten(path: ModelPath, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of ``parameters_vector()`` layout back into stacked named parameters."""
    params, start = {}, 0
    for name, stack in path.params.items():
        shape = stack.shape[1:]
        size = int(np.prod(shape)) if len(shape) else 1
        block = vectors[:, start : start + size]
        params[name] = block.reshape(vectors.shape[0], *shape).to(stack.dtype).contiguous()
        start += size
    return params


def _grid_losses(
    path: ModelPath,
    vectors: torch.Tensor,
    X: object,
    y: object,
    *,
    batchnorm_X: object,
    batch_size: int,
    chunk: int = 64,
) -> np.ndarray:
    """Loss of each parameter vector, evaluated as points of throw-away paths."""
    from .evaluation import evaluate_path
    from .path import ModelPath

    losses = []
    for start in range(0, vectors.shape[0], chunk):
        block = vectors[start : start + chunk]
        k = block.shape[0]
        if k == 1:  # a path has at least two points
            block = block.repeat(2, 1)
        params = _unflatten(path, block.to(path.device))
        bn = {
            name: stack[:1].repeat((block.shape[0],) + (1,) * (stack.ndim - 1)).clone()
            for name, stack in path.batchnorm_buffers.items()
        }
        grid_path = ModelPath(path.template, params, bn)
        if bn:
            grid_path.recompute_batchnorm(
                batchnorm_X, points=range(block.shape[0]), batch_size=batch_size
            )
        losses.append(evaluate_path(grid_path, X, y, batch_size=batch_size).loss[:k])
    return np.concatenate(losses)


def plot_loss_plane(
    paths: object,
    X: object,
    y: object,
    *,
    resolution: int = 21,
    margin: float = 0.25,
    batchnorm_X: object = None,
    batch_size: int = 256,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Loss over the plane through θ_a, θ_b and the path point farthest from the line.

    The seed paper's Figure 1 (left), computed: the plane's first axis is the
    direction from θ_a to θ_b, the second the direction, orthogonal to it, towards
    the interior point (of any of ``paths``) farthest from the straight line. Each
    grid point of the plane is a network whose mean cross-entropy on (X, y) is
    coloured on a log scale; the paths' points are drawn by their orthogonal
    projections on the plane. Only that farthest point and the ends lie exactly in
    the plane: a geodesic's other points may lie off it, so their own losses can be
    lower than the plane's loss under their projections.

    Parameters
    ----------
    paths : ModelPath, fitted connector, or mapping of str to either
        Paths that share their ends, e.g. ``{"linear": line, "geodesic": geo}``; one
        path is labelled ``"path"``. At least one point must lie off the line.
    X : array-like of shape (n_samples, *input_shape), tensor, Dataset or DataLoader
        Inputs the loss is computed on.
    y : array-like of shape (n_samples,)
        Class indices.
    resolution : int, default=21
        Grid points along each axis of the plane (the cost is ``resolution²``
        evaluations of the network on X).
    margin : float, default=0.25
        Extra room around the paths, as a fraction of the extent on each axis.
    batchnorm_X : array-like, tensor, Dataset or DataLoader, optional
        Data on which each grid network's BatchNorm statistics are recomputed
        (interpolated statistics are wrong); default ``X``. Unused for networks
        without BatchNorm.
    batch_size : int, default=256
        Batch size of the evaluation passes.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import torch
    >>> from geoconnect import GeodesicConnector, LinearConnector
    >>> from geoconnect.plotting import plot_loss_plane
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> geo = GeodesicConnector(n_points=5, max_iter=5, device="cpu", random_state=0)
    >>> geo = geo.fit(X, model_a=a, model_b=b)
    >>> line = LinearConnector(n_points=5, device="cpu").fit(X, model_a=a, model_b=b)
    >>> ax = plot_loss_plane({"linear": line, "geodesic": geo}, X, y, resolution=5)
    >>> ax.get_xlabel()
    'along θ_b − θ_a (parameter units, ‖·‖₂)'
    """
    import matplotlib.pyplot as plt

    named = _named_paths(paths)
    if not (isinstance(resolution, (int, np.integer)) and resolution >= 2):
        raise ValueError(f"resolution must be an int ≥ 2; got {resolution!r}.")
    if not margin >= 0:
        raise ValueError(f"margin must be ≥ 0; got {margin!r}.")
    vectors = _shared_end_vectors(named)
    theta_a, theta_b = next(iter(vectors.values()))[[0, -1]]
    u, w, span = _plane_basis(vectors, theta_a, theta_b)
    coords = {
        k: torch.stack([(v - theta_a) @ u, (v - theta_a) @ w], 1).numpy()
        for k, v in vectors.items()
    }
    everything = np.concatenate(list(coords.values()))
    lo, hi = everything.min(0), everything.max(0)
    room = margin * (hi - lo)
    xs = np.linspace(lo[0] - room[0], hi[0] + room[0], resolution)
    ys = np.linspace(lo[1] - room[1], hi[1] + room[1], resolution)
    gx, gy = np.meshgrid(xs, ys)
    grid = (
        theta_a[None]
        + torch.as_tensor(gx.ravel())[:, None] * u[None]
        + torch.as_tensor(gy.ravel())[:, None] * w[None]
    )
    with torch.no_grad():
        loss = _grid_losses(
            next(iter(named.values())),
            grid,
            X,
            y,
            batchnorm_X=X if batchnorm_X is None else batchnorm_X,
            batch_size=batch_size,
        ).reshape(gx.shape)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    _draw_plane(ax, gx, gy, loss, coords, span)
    if title:
        ax.set_title(title)
    return ax


def _named_paths(paths: object) -> dict[str, ModelPath]:
    """``paths`` as a non-empty mapping of names to ModelPaths."""
    if isinstance(paths, Mapping):
        if not paths:
            raise ValueError("paths is an empty mapping: give at least one path.")
        return {str(k): _as_path(v, str(k)) for k, v in paths.items()}
    return {"path": _as_path(paths, "path")}


def _shared_end_vectors(named: dict[str, ModelPath]) -> dict[str, torch.Tensor]:
    """Each path's points as float64 parameter vectors, checked to share the first
    path's architecture and ends."""
    vectors = {k: p.parameters_vector().detach().double().cpu() for k, p in named.items()}
    reference_name = next(iter(named))
    theta_a, theta_b = vectors[reference_name][0], vectors[reference_name][-1]
    for name, v in vectors.items():
        if v.shape[1] != theta_a.numel():
            raise ValueError(
                f"paths[{name!r}] has {v.shape[1]} parameters per point, "
                f"paths[{reference_name!r}] {theta_a.numel()}: the paths must connect "
                "the same architecture."
            )
        scale = float(theta_a.abs().max()) + float(theta_b.abs().max()) + 1.0
        if not (
            torch.allclose(v[0], theta_a, atol=1e-5 * scale)
            and torch.allclose(v[-1], theta_b, atol=1e-5 * scale)
        ):
            raise ValueError(
                f"paths[{name!r}] does not share its ends with paths[{reference_name!r}]: "
                "the plane is defined by one pair of models θ_a, θ_b."
            )
    return vectors


def _plane_basis(
    vectors: dict[str, torch.Tensor], theta_a: torch.Tensor, theta_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The plane's orthonormal directions — along θ_b − θ_a, and towards the point
    of the paths farthest from that line — and the line's length."""
    chord = theta_b - theta_a
    span = float(chord.norm())
    if span == 0.0:
        raise ValueError("θ_a and θ_b are the same point: there is no line to draw a plane on.")
    u = chord / span
    best, direction = 0.0, None
    for v in vectors.values():
        rel = v - theta_a
        residual = rel - (rel @ u)[:, None] * u
        distances = residual.norm(dim=1)
        i = int(distances.argmax())
        if float(distances[i]) > best:
            best, direction = float(distances[i]), residual[i]
    # float32 paths put a linear path's points off the line by rounding errors only
    if direction is None or best <= 1e-5 * (span + float(theta_a.norm())):
        raise ValueError(
            "Every point of the paths lies on the straight line θ_a–θ_b, so no plane is "
            "defined: include a path with a point off the line, such as a fitted "
            "GeodesicConnector's."
        )
    return u, direction / best, span


def _draw_plane(
    ax: Axes,
    gx: np.ndarray,
    gy: np.ndarray,
    loss: np.ndarray,
    coords: dict[str, np.ndarray],
    span: float,
) -> None:
    """The loss contours on a log scale, the paths, and the two ends."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    floor = max(float(np.nanmin(loss)), 1e-4)
    top = max(float(np.nanmax(loss)), floor * 1.01)
    levels = np.geomspace(floor, top, 16)
    filled = ax.contourf(
        gx, gy, np.clip(loss, floor, top), levels=levels, norm=LogNorm(floor, top), cmap="viridis"
    )
    ax.contour(gx, gy, np.clip(loss, floor, top), levels=levels[::3], colors="white",
               linewidths=0.5, alpha=0.6)  # fmt: skip
    colorbar = ax.figure.colorbar(filled, ax=ax)
    colorbar.set_label("cross-entropy loss (nats, log scale)")
    colorbar.ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%.2g"))
    palette = ["#ff7f0e", "#ffffff", "#e377c2", "#17becf", "#bcbd22"]
    for j, (name, xy) in enumerate(coords.items()):
        ax.plot(xy[:, 0], xy[:, 1], marker="o", markersize=3.5, linewidth=1.8,
                color=palette[j % len(palette)], label=name)  # fmt: skip
    ax.plot([0.0, span], [0.0, 0.0], linestyle="none", marker="*", markersize=13,
            color="#d62728", markeredgecolor="black", label="θ_a, θ_b")  # fmt: skip
    ax.annotate("θ_a", (0.0, 0.0), textcoords="offset points", xytext=(-6, -14), color="white")
    ax.annotate("θ_b", (span, 0.0), textcoords="offset points", xytext=(-6, -14), color="white")
    ax.set_xlabel("along θ_b − θ_a (parameter units, ‖·‖₂)")
    ax.set_ylabel("orthogonal, towards the farthest point (‖·‖₂)")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
