"""Time-to-connect, seconds per epoch and peak memory: geoconnect against the seed.

In one process and on the same model pairs and data, runs ``GeodesicConnector`` with
its defaults and a faithful re-implementation of the seed paper's algorithm
(``benchmarks/seed.py``: 25 separate networks evaluated one after another, plain SGD
at lr 0.1, batch 256), and reports ratios.

* time-to-connect: over a ladder of epoch budgets (a fresh fit per budget), the
  fastest fit whose test loss barrier is at most a tenth of the linear path's;
* seconds per epoch: the extra time per extra epoch between the two largest
  budgets (fixed costs cancel; ``seconds_per_epoch_overall`` in the JSON is plain
  fit time / epochs at the largest budget, geoconnect's coarse levels included);
* peak memory: the high-water mark of CPU tensor memory during a one-epoch fit
  (torch profiler), against the target (N + 3) × parameters + one batch of
  activations per point.

Pairs: two 64-16-16-10 MLPs and two small BatchNorm CNNs, trained on scikit-learn's
digits from seeds 1 and 2.

    python benchmarks/connect.py            # full run (a few minutes on 2 cores)
    python benchmarks/connect.py --quick    # short ladder, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from geoconnect import GeodesicConnector, LinearConnector, ModelPath
from geoconnect.evaluation import evaluate_path
from geoconnect.models import load_digits_split, make_cnn, make_mlp, train_classifier

try:  # run as a script from the repository root or from benchmarks/
    from seed import seed_geodesic
except ImportError:  # pragma: no cover
    from benchmarks.seed import seed_geodesic

N_POINTS = 25
BATCH_SIZE = 256


@dataclass
class Pair:
    name: str
    model_a: nn.Module
    model_b: nn.Module
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    linear_barrier: float = float("nan")


@dataclass
class Method:
    name: str
    fit: Callable[[Pair, int], ModelPath]  # (pair, epochs) -> fitted path
    ladder: list[dict] = field(default_factory=list)


def make_pairs() -> list[Pair]:
    split = load_digits_split()
    pairs = []
    for name, factory, X_train, X_test in [
        ("MLP 64-16-16-10", lambda s: make_mlp(seed=s), split.X_train, split.X_test),
        ("CNN + BatchNorm", lambda s: make_cnn(seed=s), split.images_train, split.images_test),
    ]:
        a = train_classifier(factory(1), X_train, split.y_train, seed=1, epochs=40)
        b = train_classifier(factory(2), X_train, split.y_train, seed=2, epochs=40)
        pair = Pair(name, a, b, X_train, X_test, split.y_train, split.y_test)
        line = LinearConnector(n_points=N_POINTS, device="cpu").fit(X_train, model_a=a, model_b=b)
        pair.linear_barrier = line.evaluate(X_test, split.y_test).barrier
        pairs.append(pair)
    return pairs


def fit_geoconnect(pair: Pair, epochs: int) -> ModelPath:
    conn = GeodesicConnector(
        n_points=N_POINTS,
        max_iter=epochs,
        n_iter_no_change=epochs,
        batch_size=BATCH_SIZE,
        device="cpu",
        random_state=0,
    )
    return conn.fit(pair.X_train, model_a=pair.model_a, model_b=pair.model_b).path_


def fit_seed(pair: Pair, epochs: int) -> ModelPath:
    return seed_geodesic(
        pair.model_a,
        pair.model_b,
        pair.X_train,
        n_points=N_POINTS,
        epochs=epochs,
        batch_size=BATCH_SIZE,
    )


def peak_tensor_memory(fn: Callable[[], object]) -> int:
    """High-water mark (bytes) of CPU tensor memory allocated while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The "[memory]" records are the allocator's own (allocations positive, frees
    # negative); operator events aggregate them and would count them twice.
    events = [
        (e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"
    ]
    events.sort()
    usage = np.cumsum([m for _, m in events]) if events else np.zeros(1)
    return int(max(0, usage.max()))


def activation_bytes(pair: Pair) -> int:
    """Peak memory of one forward+backward of one network on one batch, less its params."""
    net = copy.deepcopy(pair.model_a).train()
    x = torch.as_tensor(pair.X_train[:BATCH_SIZE], dtype=torch.float32)

    def step() -> None:
        net(x).logsumexp(-1).mean().backward()
        net.zero_grad(set_to_none=True)

    return peak_tensor_memory(step)


def marginal_seconds_per_epoch(rows: list[dict]) -> float:
    """Seconds per N-point epoch between the two largest budgets.

    The difference of two fits cancels what does not grow with the budget: model
    copies, the evaluation-strategy choice, geoconnect's coarse levels (a fixed
    number of epochs on 4–13 points) and the BatchNorm recomputation.
    """
    if len(rows) < 2:
        return rows[-1]["seconds"] / rows[-1]["epochs"]
    (a, b) = rows[-2], rows[-1]
    return (b["seconds"] - a["seconds"]) / (b["epochs"] - a["epochs"])


def run(budgets: list[int]) -> dict:
    torch.set_num_threads(2)
    pairs = make_pairs()
    methods = [Method("geoconnect", fit_geoconnect), Method("seed", fit_seed)]
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "n_points": N_POINTS,
        "budgets": budgets,
        "pairs": {},
    }
    for pair in pairs:
        entry: dict = {"linear_barrier": pair.linear_barrier, "methods": {}}
        fit_geoconnect(pair, 1)  # warm-up: strategy choice and lazy initialisation
        for method in methods:
            rows = []
            for epochs in budgets:
                start = time.perf_counter()
                path = method.fit(pair, epochs)
                seconds = time.perf_counter() - start
                barrier = evaluate_path(path, pair.X_test, pair.y_test).barrier
                rows.append({"epochs": epochs, "seconds": seconds, "barrier": barrier})
                print(
                    f"{pair.name:<16} {method.name:<10} epochs {epochs:>4}  "
                    f"{seconds:7.2f} s  test barrier {barrier:.4f} "
                    f"(linear {pair.linear_barrier:.4f})",
                    flush=True,
                )
            connected = [r for r in rows if r["barrier"] <= 0.1 * pair.linear_barrier]
            memory = peak_tensor_memory(lambda m=method, p=pair: m.fit(p, 1))
            entry["methods"][method.name] = {
                "ladder": rows,
                "time_to_connect": min((r["seconds"] for r in connected), default=None),
                "seconds_per_epoch": marginal_seconds_per_epoch(rows),
                "seconds_per_epoch_overall": rows[-1]["seconds"] / rows[-1]["epochs"],
                "peak_memory_bytes": memory,
            }
        n_params = sum(p.numel() * p.element_size() for p in pair.model_a.parameters())
        entry["param_bytes"] = n_params
        entry["activation_bytes"] = activation_bytes(pair)
        entry["memory_target_bytes"] = (N_POINTS + 3) * n_params + N_POINTS * entry[
            "activation_bytes"
        ]
        report["pairs"][pair.name] = entry
    return report


def summarise(report: dict) -> str:
    lines = [
        f"machine: {report['machine']}; N = {report['n_points']}; epoch ladder {report['budgets']}",
        "",
        "| pair | time-to-connect geoconnect | seed | speed-up | s/epoch geoconnect | seed"
        " | ratio | peak MB geoconnect | seed | target MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in report["pairs"].items():
        ours, seed = entry["methods"]["geoconnect"], entry["methods"]["seed"]
        t_ours, t_seed = ours["time_to_connect"], seed["time_to_connect"]
        if t_ours is None:
            ttc, speedup = "not reached", "—"
        elif t_seed is None:
            slowest = seed["ladder"][-1]["seconds"]
            ttc = f"{t_ours:.2f} s"
            speedup = f"> {slowest / t_ours:.0f}× (seed not connected in {slowest:.1f} s)"
        else:
            ttc, speedup = f"{t_ours:.2f} s", f"{t_seed / t_ours:.1f}×"
        seed_ttc = "not reached" if t_seed is None else f"{t_seed:.2f} s"
        mb = 1 / 2**20
        lines.append(
            f"| {name} | {ttc} | {seed_ttc} | {speedup} | {ours['seconds_per_epoch']:.3f} "
            f"| {seed['seconds_per_epoch']:.3f} "
            f"| {seed['seconds_per_epoch'] / ours['seconds_per_epoch']:.2f}× "
            f"| {ours['peak_memory_bytes'] * mb:.2f} | {seed['peak_memory_bytes'] * mb:.2f} "
            f"| {entry['memory_target_bytes'] * mb:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short ladder (smoke test)")
    parser.add_argument("--json", help="also write the full report to this JSON file")
    args = parser.parse_args()
    budgets = [1, 2] if args.quick else [2, 4, 8, 16, 32, 64]
    report = run(budgets)
    print()
    print(summarise(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
