"""The seed comparison on a GPU: ResNet-20 (×4 width, BatchNorm) on 32×32 inputs.

One prepared script for a session that is lent a GPU: trains two ResNet-20×4
networks from two seeds on synthetic 32×32 RGB images (10 classes, each a smooth
random template plus noise — nothing downloaded), then runs GeodesicConnector's
chain (``curve="chain"``) over a ladder of epoch budgets (float32, then
``mixed_precision=True``: bf16 autocast; each until it connects), the default
continuous geodesic likewise, and the seed algorithm (``benchmarks/seed.py``, one run
scored at 1, 2, 4, … epochs until it connects or passes ``--seed-cap`` seconds), and
prints time-to-connect, seconds per epoch and peak GPU memory, with ratios, and
whether bf16 keeps the path's quality. Sized
to stay under 5 minutes on one H100; not yet run on one (see benchmarks/README.md).

    python benchmarks/gpu.py            # on a CUDA machine
    python benchmarks/gpu.py --smoke    # tiny settings, any device: checks it runs
    python benchmarks/gpu.py --gpus G   # then every distributed method on 1 … G GPUs

``--gpus G`` runs ``benchmarks/distributed.py --gpus G --cpu 0`` afterwards: the
chain, the continuous geodesic and the loss-trained curve under torchrun over NCCL at
1 … G ranks (``--quick`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.evaluation import evaluate_path

try:
    from seed import seed_checkpoints
except ImportError:  # pragma: no cover
    from benchmarks.seed import seed_checkpoints


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(width: int = 4, n_classes: int = 10, blocks: int = 3) -> nn.Module:
    """ResNet-20 for 32×32 inputs (3 stages × 3 blocks), channels 16·width, 32·w, 64·w."""
    widths = [16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    c_in = widths[0]
    for stage, c_out in enumerate(widths):
        for block in range(blocks):
            layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and block == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


def synthetic_images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 3×size×size images: a smooth class template plus noise."""
    rng = np.random.default_rng(0)  # the templates are shared by every split
    coarse = rng.normal(size=(10, 3, 4, 4))
    templates = np.kron(coarse, np.ones((1, 1, size // 4, size // 4)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    X = templates[y] + 1.5 * rng.normal(size=(n, 3, size, size))
    return X.astype(np.float32), y.astype(np.int64)


def train(
    model: nn.Module, X: np.ndarray, y: np.ndarray, epochs: int, seed: int, device: torch.device
) -> nn.Module:
    torch.manual_seed(seed)
    model = model.to(device).train()
    X_t, y_t = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(X_t) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(X_t), generator=generator).to(device)
        for start in range(0, len(X_t) - 127, 128):
            idx = order[start : start + 128]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X_t[idx]), y_t[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def peak_bytes(fn, device: torch.device) -> int:
    """Peak CUDA memory (bytes) allocated while ``fn`` runs, above what was held before."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main() -> None:
    warnings.simplefilter("ignore", ConvergenceWarning)  # the ladder stops at budgets
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, any device")
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.add_argument(
        "--seed-cap", type=float, default=100.0, help="seconds before the seed run stops"
    )
    parser.add_argument("--gpus", type=int, default=0, help="then distributed.py on 1 … G GPUs")
    args = parser.parse_args()
    report(args)
    if args.gpus:
        scaling(args.gpus, quick=args.smoke)


def scaling(gpus: int, quick: bool) -> None:
    """Every distributed method at 1 … ``gpus`` ranks over NCCL (benchmarks/distributed.py)."""
    script = Path(__file__).resolve().parent / "distributed.py"
    command = [sys.executable, str(script), "--gpus", str(gpus), "--cpu", "0"]
    print(f"\n{' '.join(command[1:])}:", flush=True)
    subprocess.run(command + (["--quick"] if quick else []), check=True)


def report(args: argparse.Namespace) -> None:
    """The seed comparison on this machine's GPU (or CPU with ``--smoke``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        width, blocks, n_train, n_test, train_epochs = 1, 1, 512, 256, 1
        ours_budgets, seed_budgets = [1], [1, 2]
    else:
        width, blocks, n_train, n_test, train_epochs = 4, 3, 5000, 1000, 8
        ours_budgets, seed_budgets = [1, 2, 4, 8], [2**k for k in range(9)]
    torch.backends.cudnn.benchmark = True
    X_train, y_train = synthetic_images(n_train, seed=1)
    X_test, y_test = synthetic_images(n_test, seed=2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; ResNet-20 x{width}; {n_train} train / {n_test} test images")
    start = time.perf_counter()
    model_a = train(resnet20(width, blocks=blocks), X_train, y_train, train_epochs, 1, device)
    model_b = train(resnet20(width, blocks=blocks), X_train, y_train, train_epochs, 2, device)
    n_params = sum(p.numel() for p in model_a.parameters())
    print(f"trained both in {time.perf_counter() - start:.1f} s; {n_params:,} parameters")

    line = LinearConnector(n_points=25, device=device).fit(
        X_train, model_a=model_a, model_b=model_b
    )
    ev_line = line.evaluate(X_test, y_test)
    target = 0.1 * ev_line.barrier
    print(
        f"linear path: test barrier {ev_line.barrier:.4f}, "
        f"endpoint accuracy {ev_line.accuracy[0]:.3f} / {ev_line.accuracy[-1]:.3f}"
    )

    def ours(epochs: int, mixed_precision: bool = False, curve: str = "chain") -> GeodesicConnector:
        conn = GeodesicConnector(
            curve=curve,
            n_points=25,
            max_iter=epochs,
            n_iter_no_change=epochs,
            device=device,
            random_state=0,
            mixed_precision=mixed_precision,
        )
        return conn.fit(X_train, model_a=model_a, model_b=model_b)

    def seed_run(budgets: list[int]):
        return seed_checkpoints(model_a, model_b, X_train, budgets=budgets, device=str(device))

    def show(label: str, row: dict) -> None:
        print(
            f"{label:<10} epochs {row['epochs']:>3}  {row['seconds']:7.2f} s  "
            f"test barrier {row['barrier']:.4f}",
            flush=True,
        )

    def ladder(label: str, mixed_precision: bool, curve: str = "chain") -> dict:
        """Fresh fits at each budget until one connects; seconds per epoch of the last."""
        ours(1, mixed_precision, curve)  # warm-up: kernels, cuDNN autotuning, strategy choice
        rows, fitted = [], None
        for epochs in ours_budgets:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tic = time.perf_counter()
            fitted = ours(epochs, mixed_precision, curve)
            seconds = time.perf_counter() - tic
            barrier = evaluate_path(fitted.path_, X_test, y_test).barrier
            rows.append({"epochs": epochs, "seconds": seconds, "barrier": barrier})
            show(label, rows[-1])
            if barrier <= target:
                break
        history = fitted.history_
        levels = history.get("n_points", [25] * len(history["seconds"]))  # a curve: one
        per_epoch = [s for s, n in zip(history["seconds"], levels) if n == 25]
        return {"ladder": rows, "seconds_per_epoch": float(np.median(per_epoch))}

    report: dict = {"device": name, "n_params": n_params, "linear_barrier": ev_line.barrier}
    report["geoconnect"] = ladder("geoconnect", mixed_precision=False)
    report["bf16"] = ladder("bf16", mixed_precision=True)
    report["curve"] = ladder("curve", mixed_precision=False, curve="bezier")  # the default
    rows, epoch_seconds = [], [float("nan")]
    for epochs, path, timing in seed_run(seed_budgets):
        barrier = evaluate_path(path, X_test, y_test).barrier
        rows.append({"epochs": epochs, "seconds": timing["seconds"], "barrier": barrier})
        epoch_seconds = timing["epoch_seconds"]
        show("seed", rows[-1])
        if barrier <= target or timing["seconds"] > args.seed_cap:
            break
    report["seed"] = {"ladder": rows, "seconds_per_epoch": float(np.median(epoch_seconds))}
    report["geoconnect"]["peak_bytes"] = peak_bytes(lambda: ours(1), device)
    report["bf16"]["peak_bytes"] = peak_bytes(lambda: ours(1, True), device)
    report["seed"]["peak_bytes"] = peak_bytes(lambda: list(seed_run([1])), device)
    report["curve"]["peak_bytes"] = peak_bytes(lambda: ours(1, curve="bezier"), device)
    for method in ("geoconnect", "bf16", "seed", "curve"):
        reached = [r["seconds"] for r in report[method]["ladder"] if r["barrier"] <= target]
        report[method]["time_to_connect"] = min(reached, default=None)

    o, s = report["geoconnect"], report["seed"]
    print()
    if o["time_to_connect"] is None:
        print("time-to-connect: geoconnect did not reach a tenth of the linear barrier")
    elif s["time_to_connect"] is None:
        slowest = s["ladder"][-1]["seconds"]
        print(
            f"time-to-connect: geoconnect {o['time_to_connect']:.1f} s; seed not connected "
            f"within {slowest:.1f} s: ratio > {slowest / o['time_to_connect']:.1f}x"
        )
    else:
        print(
            f"time-to-connect: geoconnect {o['time_to_connect']:.1f} s, seed "
            f"{s['time_to_connect']:.1f} s: ratio "
            f"{s['time_to_connect'] / o['time_to_connect']:.1f}x"
        )
    print(
        f"seconds per epoch (median, 25 points): geoconnect {o['seconds_per_epoch']:.3f}, "
        f"seed {s['seconds_per_epoch']:.3f}: ratio "
        f"{s['seconds_per_epoch'] / o['seconds_per_epoch']:.2f}x"
    )
    print(
        f"peak GPU memory (one-epoch fit): geoconnect {o['peak_bytes'] / 2**30:.2f} GiB, "
        f"seed {s['peak_bytes'] / 2**30:.2f} GiB; parameters x 28 = "
        f"{28 * 4 * n_params / 2**30:.2f} GiB"
    )
    m = report["bf16"]
    ttc = "not reached" if m["time_to_connect"] is None else f"{m['time_to_connect']:.1f} s"
    print(
        f"mixed_precision=True (bf16): time-to-connect {ttc}, "
        f"best test barrier {min(r['barrier'] for r in m['ladder']):.4f} "
        f"(float32 {min(r['barrier'] for r in o['ladder']):.4f}); seconds per epoch "
        f"{m['seconds_per_epoch']:.3f}, {o['seconds_per_epoch'] / m['seconds_per_epoch']:.2f}x "
        f"float32's; peak {m['peak_bytes'] / 2**30:.2f} GiB"
    )
    c = report["curve"]
    ttc = "not reached" if c["time_to_connect"] is None else f"{c['time_to_connect']:.1f} s"
    print(
        f"the default continuous geodesic (curve='bezier'): time-to-connect {ttc}; seconds "
        f"per epoch {c['seconds_per_epoch']:.3f}; peak {c['peak_bytes'] / 2**30:.2f} GiB "
        "(the lines above: the chain, curve='chain')"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
