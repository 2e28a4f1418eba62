"""What measuring the continuous length costs a fit, and what it finds.

Every connector's ``length_`` is the Fisher–Rao length of the path it returns, the
networks between its points included (:func:`geoconnect.evaluation.path_length`),
measured once at the end of the fit. This run fits every method with its defaults
on the benchmark pairs of ``methods.py`` and reports, per fit:

* the seconds the measurement took, and what it adds to the rest of the fit
  (target: at most 15 % of a default geodesic fit; every method's is reported);
* ``length_`` with its error, the chord sum at the points (``chord_length_``, what
  ``length_`` used to be), the shortest possible length (``min_length_``) and the
  resolution the measurement needed;

and, for the default geodesic on two pairs, the chord sum and the length estimate
against the resolution (the figure of the user guide's "Chord sums and the length").

    python benchmarks/lengths.py                       # all five pairs (about 10 min)
    python benchmarks/lengths.py --quick               # the MLP pair
    python benchmarks/lengths.py --json F.json --figure F.png
    python benchmarks/lengths.py --from-json F.json    # the table of an earlier run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch

import geoconnect.connectors._base as connector_base
from geoconnect._data import as_data
from geoconnect.evaluation import path_length

try:  # run as a script from the repository root or from benchmarks/
    from methods import METHODS, fit, make_pairs
except ImportError:  # pragma: no cover
    from benchmarks.methods import METHODS, fit, make_pairs

#: The largest share of a trained method's default fit the measurement may add.
TARGET = 0.15
RESOLUTIONS = (1, 2, 4, 8, 16, 32, 64)


class MeasurementClock:
    """Times every call of the connectors' length measurement during a fit."""

    def __init__(self):
        self.seconds = 0.0
        self.result = None

    def __enter__(self) -> MeasurementClock:
        def timed(*args, **kwargs):
            tic = time.perf_counter()
            self.result = path_length(*args, **kwargs)
            self.seconds += time.perf_counter() - tic
            return self.result

        connector_base.path_length = timed
        return self

    def __exit__(self, *exc) -> None:
        connector_base.path_length = path_length


def run_pair(pair) -> dict:
    rows = {}
    for method in METHODS:
        if pair.key not in method.pairs:
            continue
        fit(method, pair, **({"max_iter": 1} if method.trained else {}))  # warm-up
        with MeasurementClock() as clock:
            estimator, seconds = fit(method, pair)
        rest = seconds - clock.seconds
        rows[method.name] = {
            "trained": method.trained,
            "fit_seconds": seconds,
            "measure_seconds": clock.seconds,
            "added": clock.seconds / rest if rest > 0 else None,
            "length": estimator.length_,
            "length_error": estimator.length_error_,
            "chord_length": estimator.chord_length_,
            "min_length": estimator.min_length_,
            "subdivisions": clock.result.subdivisions,
            "converged": clock.result.converged,
            "n_samples": clock.result.n_samples,
        }
        if method.name == "geodesic" and pair.key in ("mlp", "cnn"):  # the figure's panels
            rows[method.name]["resolution"] = resolution_curve(estimator, pair)
        if method.name == "geodesic" and len(pair.X_train) > clock.result.n_samples:
            # the same measurement on every fit input, against the subset's
            everything = path_length(
                estimator.path_,
                as_data(pair.X_train, device="cpu"),
                batch_size=getattr(estimator, "batch_size", 256),
                max_samples=None,
            )
            rows[method.name]["all_inputs"] = {
                "length": everything.length,
                "length_error": everything.error,
                "n_samples": everything.n_samples,
            }
        row = rows[method.name]
        added = "—" if row["added"] is None else f"{row['added']:.1%}"
        print(
            f"  {pair.name:26s} {method.name:16s} fit {seconds:6.2f} s  measure "
            f"{clock.seconds:5.2f} s ({added})  length {row['length']:.3f} ± "
            f"{row['length_error']:.3f}  chords {row['chord_length']:.3f}  min "
            f"{row['min_length']:.3f}  m {row['subdivisions']}",
            flush=True,
        )
    return rows


def resolution_curve(estimator, pair) -> dict:
    """The chord sum and the length estimate with every segment cut into m pieces."""
    data = as_data(pair.X_train, device="cpu")
    batch_size = getattr(estimator, "batch_size", 256)
    chords, estimates = [], []
    for m in RESOLUTIONS[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rtol=0: never "converged"
            measured = path_length(
                estimator.path_, data, batch_size=batch_size, rtol=0.0, max_subdivisions=m
            )
        chords.append(measured.refined_chord_length)
        estimates.append(measured.length)
    return {
        "pieces": list(RESOLUTIONS),
        "chord_sum": [estimator.chord_length_, *chords],
        "estimate": [None, *estimates],
    }


def table(results: dict) -> str:
    lines = [
        "| pair | method | default fit | measuring | added | `length_` (± error) | "
        "`chord_length_` | `min_length_` | length / min | pieces per segment |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair_name, rows in results["pairs"].items():
        first = True
        for name, row in rows.items():
            added = "—" if not row["trained"] or row["added"] is None else f"{row['added']:.1%}"
            lines.append(
                f"| {pair_name if first else ''} | {name} | {row['fit_seconds']:.2f} s | "
                f"{row['measure_seconds']:.2f} s | {added} | {row['length']:.3f} "
                f"(± {row['length_error']:.3f}) | {row['chord_length']:.3f} | "
                f"{row['min_length']:.3f} | {row['length'] / row['min_length']:.1f}× | "
                f"≤ {row['subdivisions']} |"
            )
            first = False
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """The target is the default geodesic's; every trained method's share besides."""

    def worst(names: set[str] | None) -> tuple[float, str, str]:
        return max(
            (row["added"], pair, name)
            for pair, rows in results["pairs"].items()
            for name, row in rows.items()
            if row["trained"] and row["added"] is not None and (names is None or name in names)
        )

    share, pair, _ = worst({"geodesic"})
    ok = "met" if share <= TARGET else "MISSED"
    every = worst(None)
    return (
        f"Largest share of a default geodesic fit spent measuring: {share:.1%} ({pair}); "
        f"target ≤ {TARGET:.0%}: {ok}. Of any trained method's default fit: "
        f"{every[0]:.1%} ({every[2]} on {every[1]}: its fit is short, and the "
        "measurement's cost does not depend on the fit's)."
    )


def sampling(results: dict) -> str:
    """The default geodesic's length on the measured subset against all fit inputs."""
    lines = []
    for name, rows in results["pairs"].items():
        row = rows.get("geodesic")
        if row is None or "all_inputs" not in row:
            continue
        full = row["all_inputs"]
        lines.append(
            f"{name}: geodesic length_ {row['length']:.4f} on {row['n_samples']} inputs, "
            f"{full['length']:.4f} ± {full['length_error']:.4f} on all {full['n_samples']} "
            f"({row['length'] / full['length'] - 1:+.1%})"
        )
    return "\n".join(lines)


def figure(results: dict, file: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        name: rows["geodesic"]["resolution"]
        for name, rows in results["pairs"].items()
        if "geodesic" in rows and "resolution" in rows["geodesic"]
    }
    fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), squeeze=False)
    for ax, (name, curve) in zip(axes.flat, curves.items()):
        row = results["pairs"][name]["geodesic"]
        pieces = np.asarray(curve["pieces"])
        ax.plot(pieces, curve["chord_sum"], "o-", label="chord sum (lower bound)")
        ax.plot(pieces[1:], curve["estimate"][1:], "s--", label="length estimate")
        ax.axhspan(
            row["length"] - row["length_error"],
            row["length"] + row["length_error"],
            color="C2",
            alpha=0.25,
            label=f"length_ ± error ({row['length']:.3f})",
        )
        ax.axhline(row["min_length"], color="0.3", ls=":", label="min_length (no path shorter)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pieces per segment between the 25 points")
        ax.set_ylabel("Fisher–Rao length (rad), fit inputs")
        ax.set_title(f"default geodesic, {name}", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP pair only")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--figure", help="write the resolution figure")
    parser.add_argument("--from-json", help="print the table of an earlier run's JSON")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            results = json.load(handle)
        print(table(results), verdict(results), sampling(results), sep="\n\n")
        return
    torch.set_num_threads(2)
    names = ["mlp"] if args.quick else ["mlp", "wide", "layernorm", "cnn", "resnet"]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    results = {
        "environment": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "pairs": {},
    }
    for pair in make_pairs(names):
        results["pairs"][pair.name] = run_pair(pair)
    print()
    print(table(results), verdict(results), sampling(results), sep="\n\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.figure:
        figure(results, args.figure)


if __name__ == "__main__":
    main()
