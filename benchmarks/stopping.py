"""How the default stopping rule was chosen: fits traced epoch by epoch, rules replayed.

On the benchmark pairs of ``connect.py`` (digits MLPs and BatchNorm CNNs, N = 25),
default fits of 100 epochs without early stopping are traced, one per batch order
(``random_state`` 0, 1, 2): after every epoch of the full path, the path gets its
BatchNorm statistics recomputed on the training data and its test loss barrier,
accuracy barrier and the confidence of its worst point measured, beside the epoch's
energy and seconds. A stopping rule only decides *when* to stop a trajectory that
does not depend on it, so every rule ``(tol, n_iter_no_change)`` is replayed on
every trace: where it stops and the barrier there, against that trace's 100-epoch
barrier. The time-to-connect (the seconds of the shortest fresh fit of 1, 2, 4, …
32 epochs whose barrier is at most a tenth of the straight line's) is measured as
``connect.py`` does, and the defaults are fitted and timed as a user would.

The *oracle* is the best any stopping rule could do: the first epoch whose barrier
is within 0.01 nats of the trace's 100-epoch barrier, timed as a default fit that
stopped there would be (the default fit's seconds outside its epochs, plus the
trace's epochs up to it). When the oracle itself takes more than twice the
time-to-connect, no stopping rule meets both halves of that target on the pair.

    python benchmarks/stopping.py              # about 10 minutes on 2 cores
    python benchmarks/stopping.py --json FILE  # also every trace and replay
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from geoconnect import GeodesicConnector, ModelPath
from geoconnect._data import as_data
from geoconnect.divergences import jensen_shannon
from geoconnect.evaluation import evaluate_path, excess_over_chord
from geoconnect.fitting import FitSettings, FitState, fit_path

try:  # run as a script from the repository root or from benchmarks/
    from connect import BATCH_SIZE, N_POINTS, Pair, connected, fit_geoconnect, make_pairs
except ImportError:  # pragma: no cover
    from benchmarks.connect import (
        BATCH_SIZE,
        N_POINTS,
        Pair,
        connected,
        fit_geoconnect,
        make_pairs,
    )

TOLS = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 0.0]
PATIENCE = [1, 2, 3, 5, 10]
MAX_ITER = 100
LADDER = [1, 2, 4, 8, 16, 32]
SEEDS = [0, 1, 2]
#: How close to the 100-epoch barrier a fit must stop (nats).
QUALITY = 0.01


def measure(path: ModelPath, pair: Pair) -> dict:
    """Test loss and accuracy barrier; the worst point's confidence against the ends'."""
    result = evaluate_path(path, pair.X_test, pair.y_test)
    worst = int(np.argmax(excess_over_chord(result.loss)))  # where the barrier is
    with torch.no_grad():
        x = torch.as_tensor(pair.X_test, dtype=torch.float32)
        confidence = path.logits(x).softmax(-1).amax(-1).mean(1).double().numpy()
    return {
        "barrier": result.barrier,
        "accuracy_barrier": result.accuracy_barrier,
        "worst_t": float(result.t[worst]),
        "confidence": float(confidence[worst]),
        # the chord's confidence there: the ends' interpolated as the barrier's chord is
        "end_confidence": float(confidence[worst] - excess_over_chord(confidence)[worst]),
    }


def trace(pair: Pair, seed: int) -> list[dict]:
    """A default 100-epoch fit, no early stopping; per epoch its energy, time, barrier."""
    device = torch.device("cpu")
    data = as_data(pair.X_train, device=device)
    path = ModelPath.linear(pair.model_a, pair.model_b, N_POINTS, device)
    records: list[dict] = []

    def on_epoch(state: FitState) -> None:
        level = state.path
        with torch.no_grad():
            snapshot = ModelPath(
                level.template,
                {k: v.detach().clone() for k, v in level.params.items()},
                {k: v.clone() for k, v in level.batchnorm_buffers.items()},
                strategy=level.strategy,
            )
        snapshot.recompute_batchnorm(data, batch_size=BATCH_SIZE)
        records.append(
            {
                "n_points": level.n_points,
                "energy": state.history["energy"][-1],
                "seconds": state.history["seconds"][-1],
                **measure(snapshot, pair),
            }
        )

    settings = FitSettings(max_iter=MAX_ITER, tol=0.0, n_iter_no_change=10**9, on_epoch=on_epoch)
    # The batch order a GeodesicConnector(random_state=seed) uses.
    order = GeodesicConnector(random_state=seed)._batch_order()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_path(path, data, jensen_shannon, settings, None, order)
    return records


def replay(records: list[dict], tol: float, patience: int) -> int:
    """The epoch index where the rule stops (the engine's rule, on the last level)."""
    best, stale = np.inf, 0
    for i, record in enumerate(records):
        if record["n_points"] != N_POINTS:
            continue
        stale = 0 if record["energy"] < best * (1.0 - tol) else stale + 1
        best = min(best, record["energy"])
        if stale >= patience:
            return i
    return len(records) - 1


def time_to_connect_ladder(pair: Pair, seed: int) -> float:
    """Seconds of the shortest fresh fit (1, 2, 4, … epochs) that connects, as connect.py."""
    fit_geoconnect(pair, 1, seed)  # warm-up
    for epochs in LADDER:
        start = time.perf_counter()
        conn = fit_geoconnect(pair, epochs, seed)
        seconds = time.perf_counter() - start
        if connected(evaluate_path(conn.path_, pair.X_test, pair.y_test).barrier, pair):
            return seconds
    return float("nan")


def default_fit(pair: Pair, seed: int) -> dict:
    start = time.perf_counter()
    conn = GeodesicConnector(device="cpu", random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        conn.fit(pair.X_train, model_a=pair.model_a, model_b=pair.model_b)
    seconds = time.perf_counter() - start
    barrier = evaluate_path(conn.path_, pair.X_test, pair.y_test).barrier
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {
        "seconds": seconds,
        # what the fit spends outside its epochs: set-up, the ends, the final measures
        "overhead_seconds": seconds - sum(conn.history_["seconds"]),
        "epochs": conn.n_iter_,
        "barrier": barrier,
        "warned": warned,
    }


def oracle(records: list[dict], overhead: float) -> dict:
    """The earliest stop within QUALITY of the 100-epoch barrier, and what it costs."""
    reference = records[-1]["barrier"]
    seconds = np.cumsum([r["seconds"] for r in records])
    for i, record in enumerate(records):
        if record["n_points"] == N_POINTS and record["barrier"] <= reference + QUALITY:
            return {"epochs": i + 1, "seconds": overhead + float(seconds[i])}
    raise AssertionError("the last epoch is within QUALITY of itself")


def connect_epoch(records: list[dict], pair: Pair) -> int | None:
    """The first epoch of the full path whose barrier is at most a tenth of the line's."""
    hits = [i + 1 for i, r in enumerate(records) if r["n_points"] == N_POINTS]
    hits = [i for i in hits if connected(records[i - 1]["barrier"], pair)]
    return hits[0] if hits else None


def run_seed(pair: Pair, seed: int) -> dict:
    records = trace(pair, seed)
    ttc = time_to_connect_ladder(pair, seed)
    default = default_fit(pair, seed)
    best = oracle(records, default["overhead_seconds"])
    rows = []
    for tol in TOLS:
        for patience in PATIENCE:
            stop = replay(records, tol, patience)
            rows.append(
                {
                    "tol": tol,
                    "patience": patience,
                    "epochs": stop + 1,
                    "barrier": records[stop]["barrier"],
                }
            )
    return {
        "seed": seed,
        "reference_barrier": records[-1]["barrier"],
        "connect_epoch": connect_epoch(records, pair),
        "time_to_connect_ladder": ttc,
        "oracle": {**best, "ratio": best["seconds"] / ttc},
        "default": {**default, "ratio": default["seconds"] / ttc},
        "trace": records,
        "replays": rows,
    }


def print_pair(pair: Pair, runs: list[dict]) -> None:
    def median(get) -> float:
        return float(np.median([get(run) for run in runs]))

    print(
        f"\n{pair.name}: linear barrier {pair.linear_barrier:.3f}; medians over batch orders "
        f"{[run['seed'] for run in runs]}"
    )
    for run in runs:
        worst = run["trace"][run["connect_epoch"] - 1] if run["connect_epoch"] else None
        print(
            f"  order {run['seed']}: 100-epoch barrier {run['reference_barrier']:.4f}; "
            f"connects at epoch {run['connect_epoch']} (time-to-connect "
            f"{run['time_to_connect_ladder']:.2f} s)"
            + (
                f", where the worst point's accuracy dip is {worst['accuracy_barrier']:.3f} "
                f"and its confidence {worst['confidence']:.3f} against the ends' "
                f"{worst['end_confidence']:.3f}"
                if worst
                else ""
            )
            + f"; oracle stop at epoch {run['oracle']['epochs']} "
            f"({run['oracle']['ratio']:.2f}× time-to-connect); defaults stop at epoch "
            f"{run['default']['epochs']} with {run['default']['barrier']:.4f} "
            f"({run['default']['ratio']:.2f}×, ConvergenceWarning: {run['default']['warned']})"
        )
    print(
        f"  median: 100-epoch barrier {median(lambda r: r['reference_barrier']):.4f}; oracle "
        f"{median(lambda r: r['oracle']['ratio']):.2f}× time-to-connect; defaults "
        f"{median(lambda r: r['default']['ratio']):.2f}× with barrier "
        f"{median(lambda r: r['default']['barrier'] - r['reference_barrier']):+.4f} against "
        f"{MAX_ITER} epochs"
    )
    print(f"{'tol':>8}{'patience':>10}{'epochs':>8}{'barrier':>9}{'Δ':>8}   (medians)")
    for k, row in enumerate(runs[0]["replays"]):
        stops = [(run["replays"][k], run["reference_barrier"]) for run in runs]
        epochs = float(np.median([stop["epochs"] for stop, _ in stops]))
        barrier = float(np.median([stop["barrier"] for stop, _ in stops]))
        delta = float(np.median([stop["barrier"] - reference for stop, reference in stops]))
        print(f"{row['tol']:>8g}{row['patience']:>10d}{epochs:>8g}{barrier:>9.4f}{delta:>+8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument(
        "--seeds", default=",".join(map(str, SEEDS)), help="batch orders (random_state)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", ConvergenceWarning)
    results = {}
    for pair in make_pairs():
        runs = [run_seed(pair, int(seed)) for seed in args.seeds.split(",")]
        print_pair(pair, runs)
        results[pair.name] = {"linear_barrier": pair.linear_barrier, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
