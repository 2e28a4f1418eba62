"""Path-parallel fitting on the CPU: seconds per epoch and bytes per step, by world size.

For the digits CNN (BatchNorm, 16 channels) and a wider one (64 channels), fits a
25-point path with ``GeodesicConnector(distributed=True)`` under torchrun (gloo) at
world sizes 1 and 2, one thread per rank, and, as the baseline in the same run, in one
process without ``distributed``, with one thread and with every core. Reports the
median seconds per epoch (the first epoch of each level left out), the ratio to the
one-process, one-thread baseline, and what each rank sent per step (the boundary
logits) and per epoch (its block's parameters), from ``communication_``.

    python benchmarks/distributed.py            # about 4 minutes on 2 CPU cores
    python benchmarks/distributed.py --quick    # a smoke run (seconds)

On a machine with G GPUs, ``--gpus G`` adds world sizes 1 … G over NCCL, one GPU per
rank (``cuda:LOCAL_RANK``).
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


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): fit, and write what rank 0 measured."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from geoconnect import GeodesicConnector
    from geoconnect.models import load_digits_split, make_cnn

    data = load_digits_split()
    a, b = make_cnn(width=args.width, seed=1), make_cnn(width=args.width, seed=2)
    distributed = "RANK" in os.environ
    geo = GeodesicConnector(
        max_iter=args.epochs,
        random_state=0,
        device="cuda" if args.cuda and not distributed else "auto" if args.cuda else "cpu",
        distributed=distributed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few epochs do not converge; not the point
        geo.fit(data.images_train, model_a=a, model_b=b)
    if distributed and dist.get_rank() != 0:
        return
    history = geo.history_
    # The first epoch of each level pays for warm-up (allocation, the strategy trial).
    steady = [
        s
        for i, s in enumerate(history["seconds"])
        if i > 0 and history["n_points"][i] == history["n_points"][i - 1]
    ]
    record = {
        "seconds_per_epoch": statistics.median(steady),
        "n_params": geo.path_.n_params,
        "energy": geo.energy_,
        "communication": getattr(geo, "communication_", None),
    }
    Path(args.worker).write_text(json.dumps(record))


def run(width: int, world_size: int, threads: int, epochs: int, cuda: bool) -> dict:
    """One configuration in fresh processes; world_size 0 is the plain single process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        options = [
            str(Path(__file__).resolve()),
            "--worker",
            str(out),
            "--width",
            str(width),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per run")
    parser.add_argument("--gpus", type=int, default=0, help="also NCCL world sizes 1 … G")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    epochs = 4 if args.quick else 12
    cores = os.cpu_count() or 1
    configs = [
        ("1 process, 1 thread (baseline)", 0, 1, False),
        (f"1 process, {cores} threads", 0, cores, False),
        ("torchrun, 1 rank × 1 thread", 1, 1, False),
        ("torchrun, 2 ranks × 1 thread", 2, 1, False),
    ]
    configs += [(f"torchrun, {g} GPU(s), NCCL", g, 1, True) for g in range(1, args.gpus + 1)]
    results = []
    for model, width in MODELS.items():
        baseline = None
        for label, world_size, threads, cuda in configs:
            record = run(width, world_size, threads, epochs, cuda)
            baseline = baseline or record["seconds_per_epoch"]
            results.append({"model": model, "config": label, **record})
            comm = record["communication"]
            per_step = comm["exchanged_bytes"] / comm["steps"] if comm else 0
            per_epoch = comm["shared_bytes"] / epochs if comm else 0
            print(
                f"{model:20s} {label:32s} {record['seconds_per_epoch']:7.3f} s/epoch "
                f"({baseline / record['seconds_per_epoch']:4.2f}× the baseline)  "
                f"P={record['n_params']:7d}  per step {per_step / 1e3:6.1f} kB  "
                f"per epoch {per_epoch / 1e6:6.2f} MB  energy {record['energy']:.5f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
