"""Every path method on the same pairs, in one run: the table behind "Choosing a method".

For each pair of trained networks, every method of geoconnect connects them with its
defaults, and the paths are scored on held-out data:

* test loss barrier and accuracy barrier, Fisher–Rao length (on the test data, and
  on the training data the fits saw) and Euclidean length, whether the method needs
  labels, the default fit's seconds;
* time-to-target: the wall-clock of the fastest fit whose test loss barrier is at
  most a tenth of the straight line's. Trained methods are fitted afresh at 1, 2, 4,
  … ``--max-epochs`` epochs (early stopping off) until one reaches it; a method
  that needs no training reaches it with its one fit or not at all;
* model evaluations: network-sample forward-and-backward passes spent training, up
  to the target (interior points × samples × epochs for the chain and the elastic
  band; samples × epochs for a curve on the loss, × the grid's inner networks for
  the default geodesic's chords; none for the line). The passes every method
  spends on BatchNorm statistics and on scoring are not counted; REPAIR's measuring
  passes are forward only and given apart.

Pairs (scikit-learn's digits, trained from seeds 1 and 2): two 64-16-16-10 MLPs,
two 64-64-64-10 MLPs, the same with LayerNorm before each ReLU, and two BatchNorm
CNNs (``make_cnn``), connected as trained; two residual CNNs (``make_resnet``) with
every method connecting the weight-matched pair (``align="weight_matching"``), so
there "linear" is the aligned line and "unaligned linear" the line as trained.
``--pairs mnist1d`` adds two MLPs on MNIST-1D (the ``bench`` extra).

"geodesic" is ``GeodesicConnector()``'s default, the continuous geodesic; "geodesic,
chain" the chain of points. The default geodesic is also fitted with 4× its epochs,
and the summary checks it against issue #34's bars: a length on the fit inputs at
most every other method's with the same ends, a test barrier at most the
loss-trained Bezier's + 0.005, a time-to-target at most twice the Bezier's, a
default fit within twice its own time-to-target, and a test barrier within 0.01 of
the longer fit's.

    python benchmarks/methods.py                # full run (about 30 minutes on 2 cores)
    python benchmarks/methods.py --quick        # the MLP pair and a short ladder
    python benchmarks/methods.py --figure F.png --json F.json
    python benchmarks/methods.py --from-json F.json   # the table of an earlier run
    python benchmarks/methods.py --pairs mlp,cnn --method geodesic --no-ladder
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from geoconnect import CurveConnector, GeodesicConnector, LinearConnector, NEBConnector
from geoconnect.curves import CHORD_PIECES, ENERGY_T_PER_BATCH
from geoconnect.evaluation import PathEvaluation
from geoconnect.models import (
    load_digits_split,
    make_cnn,
    make_mlp,
    make_resnet,
    train_classifier,
)

N_POINTS = 25


@dataclass
class Pair:
    key: str
    name: str
    model_a: nn.Module
    model_b: nn.Module
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    align: str | None = None
    target: float = float("nan")  # a tenth of the (aligned, for the resnet) line's barrier


@dataclass
class Method:
    name: str
    make: Callable[..., object]  # (align, **budget settings) -> estimator
    labels: bool
    trained: bool
    pairs: tuple[str, ...] = field(default=("mlp", "wide", "layernorm", "cnn", "resnet", "mnist1d"))


def _common(align: str | None) -> dict:
    return {"n_points": N_POINTS, "device": "cpu", "random_state": 0, "align": align}


METHODS = [
    Method("linear", lambda align, **kw: LinearConnector(**_common(align)), False, False),
    Method(
        "linear + REPAIR",
        lambda align, **kw: LinearConnector(repair=True, **_common(align)),
        False,
        False,
    ),
    Method(
        "aligned linear",
        lambda align, **kw: LinearConnector(**_common("weight_matching")),
        False,
        False,
        pairs=("mlp", "wide", "layernorm", "cnn", "mnist1d"),
    ),
    Method(
        "unaligned linear",
        lambda align, **kw: LinearConnector(**_common(None)),
        False,
        False,
        pairs=("resnet",),
    ),
    # the default: the continuous geodesic (a Bezier curve, three bends)
    Method("geodesic", lambda align, **kw: GeodesicConnector(**_common(align), **kw), False, True),
    Method(
        "geodesic, chain",
        lambda align, **kw: GeodesicConnector(curve="chain", **_common(align), **kw),
        False,
        True,
    ),
    Method(
        "Bezier",
        lambda align, **kw: CurveConnector(curve="bezier", **_common(align), **kw),
        True,
        True,
    ),
    Method(
        "polychain",
        lambda align, **kw: CurveConnector(curve="polychain", **_common(align), **kw),
        True,
        True,
    ),
    Method("NEB", lambda align, **kw: NEBConnector(**_common(align), **kw), True, True),
]


def make_pairs(names: list[str]) -> list[Pair]:
    split = load_digits_split()
    recipes = {
        "mlp": ("MLP 64-16-16-10", lambda s: make_mlp(seed=s), split.X_train, split.X_test, 40),
        "wide": (
            "MLP 64-64-64-10",
            lambda s: make_mlp((64, 64, 64, 10), seed=s),
            split.X_train,
            split.X_test,
            40,
        ),
        "layernorm": (
            "LayerNorm MLP 64-64-64-10",
            lambda s: make_mlp((64, 64, 64, 10), seed=s, layer_norm=True),
            split.X_train,
            split.X_test,
            40,
        ),
        "cnn": (
            "CNN + BatchNorm",
            lambda s: make_cnn(seed=s),
            split.images_train,
            split.images_test,
            40,
        ),
        "resnet": (
            "residual CNN, aligned",
            lambda s: make_resnet(width=16, seed=s),
            split.images_train,
            split.images_test,
            15,
        ),
    }
    pairs = []
    for key in names:
        if key == "mnist1d":
            pairs.append(_mnist1d_pair())
            continue
        name, factory, X_train, X_test, epochs = recipes[key]
        a, b = (
            train_classifier(factory(s), X_train, split.y_train, seed=s, epochs=epochs)
            for s in (1, 2)
        )
        align = "weight_matching" if key == "resnet" else None
        pairs.append(Pair(key, name, a, b, X_train, X_test, split.y_train, split.y_test, align))
    return pairs


def _mnist1d_pair() -> Pair:
    """Two 40-64-64-10 MLPs on MNIST-1D (Greydanus, 2020), generated offline by the
    ``mnist1d`` package (``pip install -e ".[bench]"``): 4000 training and 1000 test
    signals of 40 samples, harder than digits for their size."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # pragma: no cover
        raise SystemExit('the mnist1d pair needs: pip install -e ".[bench]"') from error
    data = make_dataset(get_dataset_args())  # seeded by its arguments: the same every run
    X_train, X_test = (np.asarray(data[k], dtype=np.float32) for k in ("x", "x_test"))
    y_train, y_test = (np.asarray(data[k], dtype=np.int64) for k in ("y", "y_test"))
    a, b = (
        train_classifier(make_mlp((40, 64, 64, 10), seed=s), X_train, y_train, seed=s, epochs=40)
        for s in (1, 2)
    )
    return Pair("mnist1d", "MNIST-1D MLP 40-64-64-10", a, b, X_train, X_test, y_train, y_test)


def fit(method: Method, pair: Pair, **settings: object) -> tuple[object, float]:
    """One fit of ``method`` on ``pair``; the estimator and its wall-clock."""
    estimator = method.make(pair.align, **settings)
    y = pair.y_train if method.labels else None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the ladder's short fits
        estimator.fit(pair.X_train, y, model_a=pair.model_a, model_b=pair.model_b)
    return estimator, time.perf_counter() - start


def evaluations(estimator: object, n_samples: int) -> int:
    """Network-sample forward-and-backward passes the fit spent training."""
    history = getattr(estimator, "history_", None)
    if history is None:
        return 0
    if "n_points" in history:  # a chain of points, the interior trained on every sample
        return int(n_samples * sum(n - 2 for n in history["n_points"]))
    if "loss" in history:  # a curve on the loss: one network per sample
        return int(n_samples * len(history["loss"]))
    # a curve on the energy: its grid's inner networks per sample (the chords; the
    # ends are forward only; split, the two whose chord holds the sample), or a
    # forward-mode pass per sample at each of its t
    per_sample = {"chord": CHORD_PIECES, "split": 2}.get(estimator.energy, ENERGY_T_PER_BATCH)
    return int(n_samples * len(history["energy"]) * per_sample)


def repair_forwards(estimator: object) -> int:
    """REPAIR's network evaluations of one sample, as ``repair()`` counted them."""
    return int(estimator.path_.metadata["repair_forwards"])


def score(estimator: object, pair: Pair) -> PathEvaluation:
    return estimator.evaluate(pair.X_test, pair.y_test)


def time_to_target(method: Method, pair: Pair, max_epochs: int) -> dict:
    """The fastest fresh fit (doubling epoch budgets) whose test barrier meets the
    target; ``None`` entries when none up to ``max_epochs`` does."""
    epochs, ladder = 1, []
    while epochs <= max_epochs:
        estimator, seconds = fit(method, pair, max_iter=epochs, n_iter_no_change=epochs)
        barrier = score(estimator, pair).barrier
        ladder.append({"epochs": epochs, "seconds": seconds, "barrier": barrier})
        if barrier <= pair.target:
            return {
                "seconds": seconds,
                "epochs": epochs,
                "evaluations": evaluations(estimator, len(pair.y_train)),
                "ladder": ladder,
            }
        epochs *= 2
    return {"seconds": None, "epochs": None, "evaluations": None, "ladder": ladder}


def run_pair(pair: Pair, max_epochs: int, methods: list[str] | None = None) -> dict:
    rows, evaluations_by_method = {}, {}
    for method in METHODS:
        if pair.key not in method.pairs:
            continue
        if methods is not None and method.name not in methods and method.name != "linear":
            continue  # the line sets the target
        fit(method, pair, **({"max_iter": 1} if method.trained else {}))  # warm-up
        estimator, seconds = fit(method, pair)
        ev = score(estimator, pair)
        row = {
            "barrier": ev.barrier,
            "accuracy_barrier": ev.accuracy_barrier,
            "fisher_rao_length": ev.length,
            "fit_fisher_rao_length": estimator.length_,
            # the continuous length of the path (runs before it was one: chord sums)
            "length_kind": "continuous",
            "fisher_rao_chord_length": ev.chord_length,
            "fit_chord_length": estimator.chord_length_,
            "euclidean_length": ev.euclidean_length,
            "labels": method.labels,
            "default_seconds": seconds,
            "default_epochs": getattr(estimator, "n_iter_", 0),
            "default_evaluations": evaluations(estimator, len(pair.y_train)),
        }
        if method.name == "linear":
            pair.target = 0.1 * ev.barrier
        if method.name == "geodesic":  # the default: did it stop where more epochs gain nothing?
            epochs = 4 * max(row["default_epochs"], 1)
            longer, _ = fit(method, pair, max_iter=epochs, n_iter_no_change=epochs)
            row["longer_fit"] = {
                "epochs": epochs,
                "barrier": score(longer, pair).barrier,
                "fit_fisher_rao_length": longer.length_,
            }
        if getattr(estimator, "repair", False):
            row["repair_forwards"] = repair_forwards(estimator)
        if method.trained and max_epochs == 0:  # --no-ladder
            row["target"] = {"seconds": None, "epochs": None, "evaluations": None, "run": False}
        elif method.trained:
            row["target"] = time_to_target(method, pair, max_epochs)
        else:
            reached = ev.barrier <= pair.target
            row["target"] = {
                "seconds": seconds if reached else None,
                "epochs": 0 if reached else None,
                "evaluations": 0 if reached else None,
            }
        rows[method.name] = row
        evaluations_by_method[method.name] = ev
        print(f"  {pair.name:24s} {method.name:16s} {_brief(row)}", flush=True)
    return {"rows": rows, "target": pair.target, "evaluations": evaluations_by_method}


def _brief(row: dict) -> str:
    target = row["target"]["seconds"]
    reached = "not reached" if target is None else f"{target:.2f} s"
    return (
        f"barrier {row['barrier']:.4f}  acc {row['accuracy_barrier']:.4f}  "
        f"FR {row['fisher_rao_length']:.3f}  fit {row['default_seconds']:.2f} s  "
        f"target {reached}"
    )


def table(results: dict) -> str:
    """One markdown table: every pair, every method (from the JSON-able results)."""
    continuous = all(
        row.get("length_kind") == "continuous"
        for result in results.values()
        for row in result["rows"].values()
    )
    length = "Fisher–Rao length" if continuous else "Fisher–Rao chord sum at the points"
    lines = [
        "| pair (target) | method | test loss barrier | accuracy barrier | "
        f"{length}, test (train) | Euclidean length | labels | default fit | "
        "time-to-target | evaluations to target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair_name, result in results.items():
        first = True
        for name, row in result["rows"].items():
            pair = f"{pair_name} (≤ {result['target']:.4f})" if first else ""
            first = False
            lines.append(f"| {pair} | {name} | " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


def _cells(row: dict) -> list[str]:
    target = row["target"]
    if target["seconds"] is None:
        to_target, spent = "not reached" if target.get("run", True) else "not run", "—"
    else:
        epochs = f" ({target['epochs']} ep.)" if target["epochs"] else ""
        to_target = f"{target['seconds']:.2f} s{epochs}"
        spent = f"{target['evaluations']:,}" if target["evaluations"] else "0"
    if "repair_forwards" in row:
        spent += f" (+{row['repair_forwards']:,} fwd)"
    epochs = f", {row['default_epochs']} ep." if row["default_epochs"] else ""
    return [
        f"{row['barrier']:.4f}",
        f"{row['accuracy_barrier']:.4f}",
        f"{row['fisher_rao_length']:.3f} ({row['fit_fisher_rao_length']:.3f})",
        f"{row['euclidean_length']:.2f}",
        "yes" if row["labels"] else "no",
        f"{row['default_seconds']:.2f} s{epochs}",
        to_target,
        spent,
    ]


#: The default geodesic's bars (issue #34): a test loss barrier at most the
#: loss-trained Bezier curve's plus this (nats) ...
BAR_BARRIER = 0.005
#: ... a time-to-target at most this multiple of the Bezier curve's ...
BAR_TIME = 2.0
#: ... and a default fit's test barrier within this (nats) of a fit with 4× its epochs.
BAR_LONGER = 0.01
#: Rows whose path ends elsewhere (the other side of weight matching): not compared.
OTHER_ENDS = ("aligned linear", "unaligned linear")


def default_checks(results: dict) -> str:
    """The default geodesic against every other method with its ends, per pair: its
    length on the fit inputs, its test barrier, its time-to-target, and where its
    default fit stops."""
    lines = []
    for pair_name, result in results.items():
        rows = result["rows"]
        if not {"geodesic", "Bezier"} <= set(rows):
            continue
        geo, bez = rows["geodesic"], rows["Bezier"]
        others = {n: r for n, r in rows.items() if n != "geodesic" and n not in OTHER_ENDS}
        rival = min(others, key=lambda n: others[n]["fit_fisher_rao_length"])
        length, best = geo["fit_fisher_rao_length"], others[rival]["fit_fisher_rao_length"]
        bar = bez["barrier"] + BAR_BARRIER
        parts = [
            f"fit length {length:.3f} vs {rival} {best:.3f} "
            + ("ok" if length <= best else "MISSED"),
            f"test barrier {geo['barrier']:.4f} vs {bar:.4f} " + _ok(geo["barrier"] <= bar),
        ]
        to_target, bezier_to_target = geo["target"]["seconds"], bez["target"]["seconds"]
        if to_target and bezier_to_target:
            ratio = to_target / bezier_to_target
            parts.append(f"time-to-target {ratio:.2f}× the Bezier's " + _ok(ratio <= BAR_TIME))
            stop = geo["default_seconds"] / to_target
            parts.append(f"default fit {stop:.2f}× its time-to-target " + _ok(stop <= BAR_TIME))
        longer = geo.get("longer_fit")
        if longer:
            gap = geo["barrier"] - longer["barrier"]
            parts.append(
                f"barrier {gap:+.4f} vs a {longer['epochs']}-epoch fit " + _ok(gap <= BAR_LONGER)
            )
        lines.append(f"{pair_name}: " + "; ".join(parts))
    return "\n".join(lines)


def _ok(met: bool) -> str:
    return "ok" if met else "MISSED"


def speedups(results: dict) -> str:
    """The geodesic's time-to-target against the Bezier curve's, per pair."""
    lines = []
    for name, result in results.items():
        rows = result["rows"]
        if not {"geodesic", "Bezier"} <= set(rows):
            continue
        geo, bez = rows["geodesic"]["target"], rows["Bezier"]["target"]
        if geo["seconds"] and bez["seconds"]:
            lines.append(
                f"{name}: time-to-target geodesic {geo['seconds']:.2f} s, Bezier "
                f"{bez['seconds']:.2f} s (Bezier {geo['seconds'] / bez['seconds']:.1f}× faster)"
            )
    return "\n".join(lines)


def figure(results: dict, file: str) -> None:
    """Test loss along every path, one panel per pair, one colour per method across
    panels; a log scale, so that the low paths stay apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {m.name: f"C{k}" for k, m in enumerate(METHODS)}
    columns = min(3, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax, (name, result) in zip(axes.flat, results.items()):
        for method, ev in result["evaluations"].items():
            t = np.linspace(0.0, 1.0, len(ev.loss))
            ax.plot(t, ev.loss, color=colours[method], lw=1.5, label=f"{method} ({ev.barrier:.3f})")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("position on the path, t = i / (N − 1)")
        ax.set_ylabel("test loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (test barrier)", title_fontsize=7)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP pair, ladder to 8")
    parser.add_argument("--max-epochs", type=int, default=64)
    parser.add_argument("--figure", help="write the figure of test loss along every path")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--from-json", help="print the table of an earlier run's JSON")
    parser.add_argument(
        "--method",
        action="append",
        help="a method to run (repeatable; default all; the line runs always)",
    )
    parser.add_argument("--pairs", help="comma-separated pairs (mlp,wide,layernorm,cnn,resnet)")
    parser.add_argument(
        "--no-ladder", action="store_true", help="the default fits only, no time-to-target"
    )
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            serial = json.load(handle)
        print(table(serial), speedups(serial), default_checks(serial), sep="\n\n")
        return
    torch.set_num_threads(2)
    names = ["mlp"] if args.quick else ["mlp", "wide", "layernorm", "cnn", "resnet"]
    names = args.pairs.split(",") if args.pairs else names
    methods = args.method
    max_epochs = 8 if args.quick else args.max_epochs
    max_epochs = 0 if args.no_ladder else max_epochs
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    results = {}
    for pair in make_pairs(names):
        results[pair.name] = run_pair(pair, max_epochs, methods)
    serial = {
        name: {k: v for k, v in result.items() if k != "evaluations"}
        for name, result in results.items()
    }
    if args.json:  # first: a summary that fails must not lose the run
        with open(args.json, "w") as handle:
            json.dump(serial, handle, indent=2)
    print()
    print(table(serial), speedups(serial), default_checks(serial), sep="\n\n")
    if args.figure:
        figure(results, args.figure)


if __name__ == "__main__":
    main()
