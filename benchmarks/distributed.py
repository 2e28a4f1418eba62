"""Distributed fitting on the CPU: seconds per epoch and bytes per step, by world size.

For every method with a distributed mode — the geodesic chain and the elastic band
(their points split across ranks), the continuous geodesic (``GeodesicConnector``'s
default curve) and the loss-trained Bezier curve (``CurveConnector``), both
data-parallel — and for the digits CNN (BatchNorm, 16 channels) and a wider one (64
channels), fits the pair with ``distributed=True`` under torchrun (gloo) at world sizes
1 and 2, one thread per rank, and, as the baseline in the same run, in one process
without ``distributed``, with one thread and with every core. Reports the median seconds
per epoch (the first epoch, and for the chain each level's first, left out), the ratio
to the one-process, one-thread baseline, and what rank 0 sent per step and per epoch,
from ``communication_``: a chain's boundary logits per step and its block's parameters
per epoch (a band: its edge images per step); a curve's all-reduced gradients (the
bends' size) per step.

A data-parallel curve's epoch is one pass over the data with one batch per rank a
step: W ranks take 1/W of the steps each, so the epoch is the work that falls; its
optimisation (a step of ``W × batch_size`` inputs) is that of one process taking the
ranks' batches in turn, not one process's usual fit.

    python benchmarks/distributed.py --json benchmarks/results/distributed.json
    python benchmarks/distributed.py --quick    # a smoke run
    python benchmarks/distributed.py --methods chain --models wide   # a part

On a machine with G GPUs, ``--gpus G`` adds world sizes 1 … G over NCCL, one GPU per
rank (``cuda:LOCAL_RANK``); ``benchmarks/gpu.py --gpus G`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

MODELS = {"digits CNN (16 ch)": 16, "wide CNN (64 ch)": 64}
#: The memory runs' MLP pair 64-H-H-10 (H = 2304: 5.5 M parameters) and rows.
MEMORY_HIDDEN, MEMORY_ROWS = 2304, 512
#: The methods with a distributed mode, and their epochs per run (full, --quick).
METHODS = {"chain": (12, 4), "geodesic": (8, 3), "curve": (8, 3), "neb": (12, 4)}


def _connector(method: str, epochs: int, device: str, distributed: bool):
    from geoconnect import CurveConnector, GeodesicConnector, NEBConnector

    common = {"max_iter": epochs, "random_state": 0, "device": device, "distributed": distributed}
    if method == "curve":
        return CurveConnector(**common)
    if method == "neb":
        return NEBConnector(**common)
    return GeodesicConnector(curve="chain" if method == "chain" else "bezier", **common)


def _steady_seconds(history: dict) -> float:
    """The median epoch, leaving out the first (warm-up: allocation, the strategy
    trial) and, for a chain, each coarse-to-fine level's first."""
    levels = history.get("n_points")
    steady = [
        s
        for i, s in enumerate(history["seconds"])
        if i > 0 and (levels is None or levels[i] == levels[i - 1])
    ]
    return statistics.median(steady)


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): fit, and write what rank 0 measured."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist
    from connect import peak_tensor_memory

    from geoconnect.models import load_digits_split, make_cnn, make_mlp

    data = load_digits_split()
    if args.mlp:  # the memory runs: a wide MLP pair on a few rows, one epoch
        a, b = (make_mlp((64, args.mlp, args.mlp, 10), seed=s) for s in (1, 2))
        X, y = data.X_train[:MEMORY_ROWS], data.y_train[:MEMORY_ROWS]
    else:
        a, b = make_cnn(width=args.width, seed=1), make_cnn(width=args.width, seed=2)
        X, y = data.images_train, data.y_train
    distributed = "RANK" in os.environ
    device = "cuda" if args.cuda and not distributed else "auto" if args.cuda else "cpu"
    connector = _connector(args.method, args.epochs, device, distributed)
    if args.mlp and args.method == "chain":
        connector.set_params(coarse_to_fine=False)  # the full path from the first epoch
    y = y if args.method in ("curve", "neb") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few epochs do not converge; not the point
        fit = lambda: connector.fit(X, y, model_a=a, model_b=b)  # noqa: E731
        peak = peak_tensor_memory(fit) if args.mlp else fit()
    if distributed and dist.get_rank() != 0:
        return  # rank 0 holds the largest block: its peak is the largest
    record = {
        "seconds_per_epoch": _steady_seconds(connector.history_) if not args.mlp else None,
        "epochs": connector.n_iter_,
        "n_params": connector.path_.n_params,
        "length": connector.length_,
        "communication": getattr(connector, "communication_", None),
        "peak_bytes": peak if args.mlp else None,
    }
    Path(args.worker).write_text(json.dumps(record))


def run(
    method: str, width: int, world_size: int, threads: int, epochs: int, cuda: bool, mlp: int = 0
) -> dict:
    """One configuration in fresh processes; world_size 0 is the plain single process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        options = [
            str(Path(__file__).resolve()),
            "--worker",
            str(out),
            "--method",
            method,
            "--width",
            str(width),
            "--mlp",
            str(mlp),
            "--epochs",
            str(epochs),
            "--threads",
            str(threads),
            *(["--cuda"] if cuda else []),
        ]
        if world_size == 0:
            command = [sys.executable, *options]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world_size}",
                *options,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        return json.loads(out.read_text())


def _sent(record: dict) -> tuple[float, float]:
    """Bytes rank 0 sent per step and per epoch (0, 0 for one process)."""
    comm, epochs = record["communication"], record["epochs"]
    if not comm:
        return 0.0, 0.0
    if comm["exchanged_bytes"]:  # a chain: boundary logits a step, its block an epoch
        return comm["exchanged_bytes"] / comm["steps"], comm["shared_bytes"] / epochs
    per_step = comm["reduced_bytes"] / comm["steps"]  # a curve: the gradients a step
    return per_step, (comm["reduced_bytes"] + comm["shared_bytes"]) / epochs


def measure(
    method: str, model: str, width: int, configs: list, epochs: int, repeats: int
) -> list[dict]:
    """Every configuration of one method and model, ``repeats`` times in alternation
    (the machine's drift falls on all alike); the median run of each, printed."""
    runs: dict[str, list[dict]] = {label: [] for label, *_ in configs}
    for _ in range(repeats):
        for label, world_size, threads, cuda in configs:
            runs[label].append(run(method, width, world_size, threads, epochs, cuda))
    results, baseline = [], None
    for label, records in runs.items():
        record = sorted(records, key=lambda r: r["seconds_per_epoch"])[(len(records) - 1) // 2]
        baseline = baseline or record["seconds_per_epoch"]
        ratio = baseline / record["seconds_per_epoch"]
        all_runs = [r["seconds_per_epoch"] for r in records]
        results.append(
            {"method": method, "model": model, "config": label, **record, "speedup": ratio}
        )
        results[-1]["runs_seconds_per_epoch"] = all_runs
        per_step, per_epoch = _sent(record)
        print(
            f"{method:9s} {model:19s} {label:31s} {record['seconds_per_epoch']:7.3f} "
            f"s/epoch ({ratio:4.2f}× the baseline)  P={record['n_params']:6d}  "
            f"per step {per_step / 1e3:7.1f} kB  per epoch {per_epoch / 1e6:6.2f} MB  "
            f"length {record['length']:.4f}",
            flush=True,
        )
    return results


def memory(methods: list[str], quick: bool) -> list[dict]:
    """Peak tensor memory per rank of a 25-point path of two wide MLPs, by world size:
    one process (the baseline), and torchrun at 1 and 2 ranks (rank 0, which holds
    the largest block); one epoch on ``MEMORY_ROWS`` rows."""
    hidden = 256 if quick else MEMORY_HIDDEN
    configs = [("1 process (baseline)", 0), ("torchrun, 1 rank", 1), ("torchrun, 2 ranks", 2)]
    results = []
    for method in methods:
        if method not in ("chain", "neb"):
            continue  # a data-parallel curve holds on every rank what one process holds
        baseline = None
        for label, world_size in configs:
            record = run(method, 16, world_size, 1, 1, False, mlp=hidden)
            baseline = baseline or record["peak_bytes"]
            ratio = record["peak_bytes"] / baseline
            model = f"MLP 64-{hidden}-{hidden}-10"
            results.append({"method": method, "model": model, "config": f"memory, {label}"})
            results[-1].update(record, peak_ratio=ratio)
            print(
                f"{method:6s} {model} (P={record['n_params']:,}), 25 points, {label:22s} "
                f"peak {record['peak_bytes'] / 2**20:8.1f} MiB per rank ({ratio:.2f}×)",
                flush=True,
            )
    return results


_NAMES = {
    "chain": "chain",
    "neb": "`NEBConnector`",
    "geodesic": "continuous geodesic",
    "curve": "`CurveConnector`",
}


def tables(results: list[dict]) -> str:
    """The run's two Markdown tables, as "Scaling out" gives them: seconds per epoch,
    and peak memory per rank (``--from-json FILE`` prints them)."""
    speed = [
        "| method, model | configuration | s / epoch | vs. 1 process, 1 thread | per step "
        "| per epoch |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    memory = ["| method, model | configuration | peak per rank | vs. 1 process |"]
    memory.append("| --- | --- | ---: | ---: |")
    shown = None
    for r in sorted(results, key=lambda r: list(_NAMES).index(r["method"])):
        new = (r["method"], r["model"]) != shown
        shown = (r["method"], r["model"])
        name = f"{_NAMES[r['method']]}, {r['model'].split(' (')[0]} (P = {r['n_params']:,})"
        label = r["config"].replace(" (baseline)", "")
        if r.get("peak_bytes"):
            peak = f"{r['peak_bytes'] / 2**20:,.0f} MiB"
            label = label.removeprefix("memory, ")
            memory.append(f"| {name if new else ''} | {label} | {peak} | {r['peak_ratio']:.2f}× |")
            continue
        step, epoch = _sent(r)
        sent = f"{step / 1e3:.1f} kB | {epoch / 1e6:.2f} MB" if step else "— | —"
        speed.append(
            f"| {name if new else ''} | {label} | {r['seconds_per_epoch']:.3f} | "
            f"{r['speedup']:.2f}× | {sent} |"
        )
    return "\n".join(speed) + "\n\n" + "\n".join(memory) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3-4 epochs per run")
    parser.add_argument("--gpus", type=int, default=0, help="also NCCL world sizes 1 … G")
    parser.add_argument("--cpu", type=int, default=1, help="0: only the GPU configurations")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--models", default="digits,wide", help="digits, wide or both")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--from-json", help="print the tables of a run's --json file")
    parser.add_argument(
        "--merge", action="store_true", help="replace only this run's records in --json"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each configuration, in alternation"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="chain", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--mlp", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory", action="store_true", help="peak memory per rank of the path-parallel fits"
    )
    parser.add_argument("--epochs", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        print(tables(json.loads(Path(args.from_json).read_text())), end="")
        return
    if args.worker:
        worker(args)
        return
    if args.memory:
        results = memory(args.methods.split(","), quick=args.quick)
        if args.json:
            write(Path(args.json), results, merge=args.merge)
        return
    cores = os.cpu_count() or 1
    configs = [
        ("1 process, 1 thread (baseline)", 0, 1, False),
        (f"1 process, {cores} threads", 0, cores, False),
        ("torchrun, 1 rank × 1 thread", 1, 1, False),
        ("torchrun, 2 ranks × 1 thread", 2, 1, False),
    ][: 4 if args.cpu else 0]
    configs += [(f"torchrun, {g} GPU(s), NCCL", g, 1, True) for g in range(1, args.gpus + 1)]
    models = {m: w for m, w in MODELS.items() if m.split()[0] in args.models.split(",")}
    results = []
    for method in args.methods.split(","):
        epochs = METHODS[method][1 if args.quick else 0]
        for model, width in models.items():
            results += measure(method, model, width, configs, epochs, args.repeats)
    if args.json:
        write(Path(args.json), results, merge=args.merge)


def write(file: Path, results: list[dict], merge: bool) -> None:
    """The run's records to ``file``; with ``merge``, in place of the same method,
    model and configuration's records of an earlier run there, the others kept."""
    key = lambda r: (r["method"], r["model"], r["config"])  # noqa: E731
    if merge and file.exists():
        new = {key(r) for r in results}
        results = [r for r in json.loads(file.read_text()) if key(r) not in new] + results
    file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
