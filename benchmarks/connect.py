"""Time-to-connect, seconds per epoch and peak memory: geoconnect against the seed.

In one process and on the same model pairs and data, runs ``GeodesicConnector`` with
its defaults and a faithful re-implementation of the seed paper's algorithm
(``benchmarks/seed.py``: 25 separate networks evaluated one after another, plain SGD
at lr 0.1, batch 256), and reports ratios.

* time-to-connect: the wall-clock of the fastest fit whose test loss barrier is at
  most a tenth of the linear path's. geoconnect: a fresh fit per epoch budget
  (1, 2, 4, … 32). Seed: one run scored at 1, 2, 4, … epochs (plain SGD at a
  constant rate has no state tied to the total, so epoch e of a long run is where
  a fresh e-epoch run ends; each checkpoint is finished and timed as a fresh run
  would be), until it connects, reaches 1024 epochs or passes ``--seed-cap``
  seconds — then the ratio is a lower bound;
* seconds per epoch on N = 25 points: the two methods run in alternation, 3 epochs
  each per round, 7 rounds; medians of each method's median epoch
  (geoconnect's ``history_["seconds"]``, without coarse levels) and of the
  per-round ratios;
* peak memory: the high-water mark of CPU tensor memory during a one-epoch fit
  given the training set as a float32 tensor (the CPU allocator's records, via the
  torch profiler), against the target (N + 3) × parameters + one batch of
  activations per point.

Pairs: two 64-16-16-10 MLPs and two small BatchNorm CNNs, trained on scikit-learn's
digits from seeds 1 and 2.

    python benchmarks/connect.py            # full run (about 15 minutes on 2 cores)
    python benchmarks/connect.py --quick    # short ladder, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.evaluation import evaluate_path
from geoconnect.models import load_digits_split, make_cnn, make_mlp, train_classifier

try:  # run as a script from the repository root or from benchmarks/
    from seed import seed_checkpoints
except ImportError:  # pragma: no cover
    from benchmarks.seed import seed_checkpoints

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


def fit_geoconnect(
    pair: Pair, epochs: int, random_state: int = 0, **settings: object
) -> GeodesicConnector:
    """Exactly ``epochs`` epochs on N points (no early stopping), defaults otherwise."""
    conn = GeodesicConnector(
        n_points=N_POINTS,
        max_iter=epochs,
        n_iter_no_change=epochs,
        batch_size=BATCH_SIZE,
        device="cpu",
        random_state=random_state,
        **settings,
    )
    return conn.fit(pair.X_train, model_a=pair.model_a, model_b=pair.model_b)


def seed_run(pair: Pair, budgets: list[int]):
    return seed_checkpoints(
        pair.model_a,
        pair.model_b,
        pair.X_train,
        n_points=N_POINTS,
        budgets=budgets,
        batch_size=BATCH_SIZE,
    )


def peak_tensor_memory(fn: Callable[[], object]) -> int:
    """High-water mark (bytes) of CPU tensor memory allocated while ``fn`` runs.

    Replays the CPU allocator's own records, which the torch profiler collects: every
    allocation and free, in time order, counted from zero at the start (tensors that
    existed before ``fn`` are not counted, not even when freed). Temporaries inside an
    operator and inside ``vmap`` are seen too.
    """
    return max(live_tensor_bytes(fn), default=0)


def live_tensor_bytes(fn: Callable[[], object]) -> list[int]:
    """Live CPU tensor bytes after each allocation or free while ``fn`` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    return np.cumsum([size for _, size in sorted(changes)]).tolist()


def activation_bytes(pair: Pair) -> int:
    """Peak memory of one forward+backward of one network on one batch, less its params."""
    net = copy.deepcopy(pair.model_a).train()
    x = torch.as_tensor(pair.X_train[:BATCH_SIZE], dtype=torch.float32)

    def step() -> None:
        net(x).logsumexp(-1).mean().backward()
        net.zero_grad(set_to_none=True)

    return peak_tensor_memory(step)


def seconds_per_epoch(pair: Pair, rounds: int, epochs: int = 3) -> dict:
    """Seconds per epoch on N points, the two methods measured in alternation.

    Each round runs ``epochs`` epochs of each method (geoconnect without its coarse
    levels) and takes each one's median epoch; alternating keeps a shared machine's
    drift out of the ratio. Returns the medians over rounds and of the per-round
    ratios seed / geoconnect.
    """
    ours, seed, ratios = [], [], []
    for _ in range(rounds):
        conn = fit_geoconnect(pair, epochs, coarse_to_fine=False)
        ours.append(float(np.median(conn.history_["seconds"])))
        ((_, _, timing),) = list(seed_run(pair, [epochs]))
        seed.append(float(np.median(timing["epoch_seconds"])))
        ratios.append(seed[-1] / ours[-1])
    return {
        "geoconnect": float(np.median(ours)),
        "seed": float(np.median(seed)),
        "ratio": float(np.median(ratios)),
        "rounds": {"geoconnect": ours, "seed": seed},
    }


def connected(barrier: float, pair: Pair) -> bool:
    return barrier <= 0.1 * pair.linear_barrier


def run_geoconnect(pair: Pair, budgets: list[int]) -> dict:
    """A fresh fit per budget; seconds per epoch from the longest fit's own record."""
    fit_geoconnect(pair, 1)  # warm-up: strategy choice and lazy initialisation
    rows, longest = [], None
    for epochs in budgets:
        start = time.perf_counter()
        longest = fit_geoconnect(pair, epochs)
        seconds = time.perf_counter() - start
        barrier = evaluate_path(longest.path_, pair.X_test, pair.y_test).barrier
        rows.append({"epochs": epochs, "seconds": seconds, "barrier": barrier})
        report_row(pair, "geoconnect", rows[-1])
    history = longest.history_
    final = [s for s, n in zip(history["seconds"], history["n_points"]) if n == N_POINTS]
    return {"ladder": rows, "ladder_seconds_per_epoch": float(np.median(final))}


def run_seed(pair: Pair, budgets: list[int], cap_seconds: float) -> dict:
    """One long seed run scored at each budget, until it connects or passes the cap."""
    rows, epoch_seconds = [], [float("nan")]
    for epochs, path, timing in seed_run(pair, budgets):
        barrier = evaluate_path(path, pair.X_test, pair.y_test).barrier
        rows.append({"epochs": epochs, "seconds": timing["seconds"], "barrier": barrier})
        epoch_seconds = timing["epoch_seconds"]
        report_row(pair, "seed", rows[-1])
        if connected(barrier, pair) or timing["seconds"] > cap_seconds:
            break
    return {"ladder": rows, "ladder_seconds_per_epoch": float(np.median(epoch_seconds))}


def report_row(pair: Pair, method: str, row: dict) -> None:
    print(
        f"{pair.name:<16} {method:<10} epochs {row['epochs']:>4}  {row['seconds']:8.2f} s  "
        f"test barrier {row['barrier']:.4f} (linear {pair.linear_barrier:.4f})",
        flush=True,
    )


def run(ours_budgets: list[int], seed_budgets: list[int], cap_seconds: float, rounds: int) -> dict:
    torch.set_num_threads(2)
    pairs = make_pairs()
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "n_points": N_POINTS,
        "budgets": {"geoconnect": ours_budgets, "seed": seed_budgets},
        "pairs": {},
    }
    for pair in pairs:
        results = {
            "geoconnect": run_geoconnect(pair, ours_budgets),
            "seed": run_seed(pair, seed_budgets, cap_seconds),
        }
        # The training set is handed over as a float32 tensor, which neither method
        # copies: the target counts parameters and activations, not the data.
        held = dataclasses.replace(pair, X_train=torch.as_tensor(pair.X_train, dtype=torch.float32))
        results["geoconnect"]["peak_memory_bytes"] = peak_tensor_memory(
            lambda p=held: fit_geoconnect(p, 1)
        )
        results["seed"]["peak_memory_bytes"] = peak_tensor_memory(
            lambda p=held: list(seed_run(p, [1]))
        )
        for result in results.values():
            reached = [r["seconds"] for r in result["ladder"] if connected(r["barrier"], pair)]
            result["time_to_connect"] = min(reached, default=None)
        param_bytes = sum(p.numel() * p.element_size() for p in pair.model_a.parameters())
        act = activation_bytes(pair)
        report["pairs"][pair.name] = {
            "linear_barrier": pair.linear_barrier,
            "methods": results,
            "seconds_per_epoch": seconds_per_epoch(pair, rounds),
            "param_bytes": param_bytes,
            "activation_bytes": act,
            "memory_target_bytes": (N_POINTS + 3) * param_bytes + N_POINTS * act,
            # Adam keeps two moments per moving point: (N params + (N-2) gradients +
            # 2 (N-2) moments) = (4N - 6) x parameters, whatever the implementation.
            "memory_adam_floor_bytes": (4 * N_POINTS - 6) * param_bytes + N_POINTS * act,
        }
    return report


def summarise(report: dict) -> str:
    lines = [
        f"machine: {report['machine']}; N = {report['n_points']}; epoch budgets: "
        f"geoconnect {report['budgets']['geoconnect']}, seed up to {report['budgets']['seed'][-1]}",
        "",
        "| pair | time-to-connect geoconnect | seed | speed-up | s/epoch geoconnect | seed"
        " | speed-up | peak MB geoconnect | seed | target MB | with Adam's moments MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
            before = [r["seconds"] for r in seed["ladder"] if r["seconds"] < t_seed]
            if before:  # the seed connected somewhere after its last failed checkpoint
                speedup += f" (> {max(before) / t_ours:.0f}×)"
        seed_ttc = "not reached" if t_seed is None else f"{t_seed:.2f} s"
        if t_seed is not None:
            seed_ttc += f" ({seed['ladder'][-1]['epochs']} epochs)"
        mb = 1 / 2**20
        per_epoch = entry["seconds_per_epoch"]
        lines.append(
            f"| {name} | {ttc} | {seed_ttc} | {speedup} | {per_epoch['geoconnect']:.3f} "
            f"| {per_epoch['seed']:.3f} | {per_epoch['ratio']:.2f}× "
            f"| {ours['peak_memory_bytes'] * mb:.2f} | {seed['peak_memory_bytes'] * mb:.2f} "
            f"| {entry['memory_target_bytes'] * mb:.2f} "
            f"| {entry['memory_adam_floor_bytes'] * mb:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    # The ladder's fits stop at their budgets on purpose.
    warnings.simplefilter("ignore", ConvergenceWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short ladder (smoke test)")
    parser.add_argument("--json", help="also write the full report to this JSON file")
    parser.add_argument(
        "--seed-cap",
        type=float,
        default=900.0,
        help="stop the seed's run after this many seconds if it has not connected "
        "(default: %(default)s)",
    )
    args = parser.parse_args()
    ours = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32]
    seed = [1, 2, 4] if args.quick else [2**k for k in range(11)]  # up to 1024 epochs
    report = run(ours, seed, args.seed_cap, rounds=2 if args.quick else 7)
    print()
    print(summarise(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
