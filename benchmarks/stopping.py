"""How the default stopping rule was chosen: fits traced epoch by epoch, rules replayed.

On the benchmark pairs of ``connect.py`` (digits MLPs and BatchNorm CNNs, N = 25),
one default fit of 100 epochs without early stopping is traced: after every epoch,
the level's path gets its BatchNorm statistics recomputed on the training data and
its test loss barrier measured, beside the epoch's energy and seconds. A stopping
rule only decides *when* to stop a trajectory that does not depend on it (the batch
order is fixed by ``random_state``), so every rule ``(tol, n_iter_no_change)`` is
replayed on the trace: where it stops, the seconds spent, and the barrier there,
against the 100-epoch barrier and the time-to-connect (the seconds until the
barrier is at most a tenth of the straight line's; also measured as ``connect.py``
does, by fresh fits of 1, 2, 4, … 32 epochs). Finally the defaults themselves are
fitted and timed as a user would.

    python benchmarks/stopping.py              # about 5 minutes on 2 cores
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
from geoconnect.evaluation import evaluate_path
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


def trace(pair: Pair) -> list[dict]:
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
                "barrier": evaluate_path(snapshot, pair.X_test, pair.y_test).barrier,
            }
        )

    settings = FitSettings(max_iter=MAX_ITER, tol=0.0, n_iter_no_change=10**9, on_epoch=on_epoch)
    # The batch order a GeodesicConnector(random_state=0) uses.
    order = GeodesicConnector(random_state=0)._batch_order()
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


def time_to_connect_ladder(pair: Pair) -> float:
    """Seconds of the shortest fresh fit (1, 2, 4, … epochs) that connects, as connect.py."""
    fit_geoconnect(pair, 1)  # warm-up
    for epochs in LADDER:
        start = time.perf_counter()
        conn = fit_geoconnect(pair, epochs)
        seconds = time.perf_counter() - start
        if connected(evaluate_path(conn.path_, pair.X_test, pair.y_test).barrier, pair):
            return seconds
    return float("nan")


def default_fit(pair: Pair) -> dict:
    start = time.perf_counter()
    conn = GeodesicConnector(device="cpu", random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        conn.fit(pair.X_train, model_a=pair.model_a, model_b=pair.model_b)
    seconds = time.perf_counter() - start
    barrier = evaluate_path(conn.path_, pair.X_test, pair.y_test).barrier
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"seconds": seconds, "epochs": conn.n_iter_, "barrier": barrier, "warned": warned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", ConvergenceWarning)
    results = {}
    for pair in make_pairs():
        records = trace(pair)
        seconds = np.cumsum([r["seconds"] for r in records])
        reference = records[-1]["barrier"]
        hit = [i for i, r in enumerate(records) if connected(r["barrier"], pair)]
        ttc_trace = float(seconds[hit[0]]) if hit else float("nan")
        ttc_ladder = time_to_connect_ladder(pair)
        print(
            f"\n{pair.name}: linear barrier {pair.linear_barrier:.3f}, barrier after "
            f"{MAX_ITER} epochs {reference:.4f}; time-to-connect {ttc_ladder:.2f} s "
            f"(ladder of fresh fits), {ttc_trace:.2f} s along the trace "
            f"(epoch {hit[0] + 1 if hit else '-'}); {seconds[-1]:.1f} s for all epochs"
        )
        print(f"{'tol':>8}{'patience':>10}{'epochs':>8}{'s':>8}{'/ttc':>7}{'barrier':>9}{'Δ':>8}")
        rows = []
        for tol in TOLS:
            for patience in PATIENCE:
                stop = replay(records, tol, patience)
                row = {
                    "tol": tol,
                    "patience": patience,
                    "epochs": stop + 1,
                    "seconds": float(seconds[stop]),
                    "ratio": float(seconds[stop]) / ttc_ladder,
                    "barrier": records[stop]["barrier"],
                }
                rows.append(row)
                print(
                    f"{tol:>8g}{patience:>10d}{row['epochs']:>8d}{row['seconds']:>8.2f}"
                    f"{row['ratio']:>7.2f}{row['barrier']:>9.4f}"
                    f"{row['barrier'] - reference:>+8.4f}"
                )
        default = default_fit(pair)
        print(
            f"defaults as fitted: {default['epochs']} epochs, {default['seconds']:.2f} s "
            f"({default['seconds'] / ttc_ladder:.2f}× time-to-connect), barrier "
            f"{default['barrier']:.4f} ({default['barrier'] - reference:+.4f} against "
            f"{MAX_ITER} epochs), ConvergenceWarning: {default['warned']}"
        )
        results[pair.name] = {
            "linear_barrier": pair.linear_barrier,
            "reference_barrier": reference,
            "time_to_connect_ladder": ttc_ladder,
            "time_to_connect_trace": ttc_trace,
            "trace": records,
            "replays": rows,
            "default": default,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
