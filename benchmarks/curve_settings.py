"""The continuous geodesic's settings, tried on the benchmark pairs.

``GeodesicConnector(curve="bezier" | "polychain")`` descends a curve's Fisher–Rao
energy, estimated as its ``energy`` parameter says (see the user guide's "The
continuous geodesic"). This run fits it with each setting given on each
pair and records, per fit: the continuous length on the fit inputs (``length_`` ±
``length_error_``) and on the test inputs, the test loss barrier, the epochs, the
seconds and the epochs' energies (how stable the descent was). The default chain
and the default loss-trained Bezier curve (``CurveConnector``) are fitted too, as
the bar to clear: issue #33 asks for a length on the fit inputs at most 0.9× the
shorter of the two, with a test barrier at most the loss-trained curve's + 0.005.

    python benchmarks/curve_settings.py --pairs mlp,wide --json F.json \\
        --setting '{"curve": "bezier", "n_bends": 1, "learning_rate_init": 0.03}'

With ``--epochs 8,16,32`` each setting is fitted afresh at each of those budgets,
early stopping off (its trajectory: how fast it gets where, and whether it then
overfits its inputs); ``--chord-pieces`` sets the grid of ``energy="chord"``
(``geoconnect.curves.CHORD_PIECES``) for the run. A setting may name its own
``random_state`` (the draws of ``t`` and the batch order; default 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch

import geoconnect.curves
from geoconnect import CurveConnector, GeodesicConnector

try:  # run as a script from the repository root or from benchmarks/
    from methods import N_POINTS, make_pairs
except ImportError:  # pragma: no cover
    from benchmarks.methods import N_POINTS, make_pairs

BASELINES = {
    "default chain": lambda align: GeodesicConnector(
        n_points=N_POINTS, device="cpu", random_state=0, align=align
    ),
    "default CurveConnector": lambda align: CurveConnector(
        n_points=N_POINTS, device="cpu", random_state=0, align=align
    ),
}


def run(estimator, pair, labels: bool) -> dict:
    tic = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimator.fit(
            pair.X_train,
            pair.y_train if labels else None,
            model_a=pair.model_a,
            model_b=pair.model_b,
        )
    seconds = time.perf_counter() - tic
    test = estimator.evaluate(pair.X_test, pair.y_test)
    history = estimator.history_
    return {
        "length": estimator.length_,
        "length_error": estimator.length_error_,
        "test_length": test.length,
        "test_barrier": test.barrier,
        "epochs": estimator.n_iter_,
        "seconds": seconds,
        "energy": history.get("energy", history.get("loss")),
        "warnings": sorted(
            {
                str(w.message).split(":")[0][:80]
                for w in caught
                if w.category is not DeprecationWarning
            }
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", default="mlp,wide,layernorm,cnn,resnet", help="and mnist1d (the bench extra)"
    )
    parser.add_argument("--setting", action="append", required=True, help="JSON parameters")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--epochs", help="budgets, e.g. 8,16,32: each setting's trajectory")
    parser.add_argument("--chord-pieces", type=int, help="the chord grid (default 8)")
    parser.add_argument(
        "--no-baselines", action="store_true", help="the settings only (no bar to clear)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.chord_pieces:
        geoconnect.curves.CHORD_PIECES = args.chord_pieces
    settings = [json.loads(s) for s in args.setting]
    if args.epochs:  # a trajectory: each budget run to its end
        settings = [
            {**s, "max_iter": int(e), "n_iter_no_change": int(e)}
            for s in settings
            for e in args.epochs.split(",")
        ]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    results: dict = {"chord_pieces": geoconnect.curves.CHORD_PIECES}
    for pair in make_pairs(args.pairs.split(",")):
        rows = {}
        bar = barrier = float("nan")
        if not args.no_baselines:
            for name, make in BASELINES.items():
                rows[name] = run(make(pair.align), pair, labels=name == "default CurveConnector")
            bar = 0.9 * min(rows[name]["length"] for name in BASELINES)
            barrier = rows["default CurveConnector"]["test_barrier"] + 0.005
        if args.epochs:  # one-time costs out of the timings, as methods.py does
            run(GeodesicConnector(curve="bezier", max_iter=1, align=pair.align), pair, False)
        for setting in settings:
            geo = GeodesicConnector(  # a setting may name its own random_state
                **{"n_points": N_POINTS, "device": "cpu", "random_state": 0, **setting},
                align=pair.align,
            )
            rows[json.dumps(setting, sort_keys=True)] = run(geo, pair, labels=False)
        for name, row in rows.items():
            if name not in BASELINES:
                row["meets_33"] = row["length"] <= bar and row["test_barrier"] <= barrier
            print(
                f"{pair.key:9s} {name:70s} length {row['length']:.3f} ± "
                f"{row['length_error']:.3f}  test {row['test_length']:.3f}  barrier "
                f"{row['test_barrier']:.4f}  {row['epochs']:3d} ep. {row['seconds']:6.1f} s"
                f"  {'meets #33' if row.get('meets_33') else ''}",
                flush=True,
            )
        results[pair.name] = {"bar": bar, "barrier_bar": barrier, "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
