"""How the GeodesicConnector defaults were chosen: a sweep on digits MLP pairs.

For each pair of 64-16-16-10 MLPs trained from two seeds, fits geodesics with N = 25
under each solver / learning rate / epoch budget, and prints the test loss barrier as
a fraction of the linear path's, and the drop of the minimum accuracy along the path
below the worse endpoint (percentage points). Medians over the pairs.

    python benchmarks/defaults.py
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

PAIRS = [(1, 2), (3, 4), (5, 6)]
SETTINGS = [
    ("sgd", 0.1, 20),  # the paper's
    ("sgd", 0.5, 20),
    *[("adam", lr, it) for lr, it in itertools.product([1e-3, 3e-3, 1e-2, 3e-2], [10, 30, 100])],
]


def main() -> None:
    torch.set_num_threads(2)
    split = load_digits_split()
    results: dict[tuple, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}
    for seed_a, seed_b in PAIRS:
        a = train_classifier(make_mlp(seed=seed_a), split.X_train, split.y_train, seed=seed_a)
        b = train_classifier(make_mlp(seed=seed_b), split.X_train, split.y_train, seed=seed_b)
        line = LinearConnector(device="cpu").fit(split.X_train, model_a=a, model_b=b)
        ev_line = line.evaluate(split.X_test, split.y_test)
        worse_end = min(ev_line.accuracy[0], ev_line.accuracy[-1])
        for solver, lr, max_iter in SETTINGS:
            geo = GeodesicConnector(
                solver=solver,
                learning_rate_init=lr,
                max_iter=max_iter,
                tol=0.0,
                device="cpu",
                random_state=0,
            )
            start = time.perf_counter()
            geo.fit(split.X_train, model_a=a, model_b=b)
            seconds = time.perf_counter() - start
            ev = geo.evaluate(split.X_test, split.y_test)
            results[(solver, lr, max_iter)].append(
                (ev.barrier / ev_line.barrier, 100 * (worse_end - ev.min_accuracy), seconds)
            )
    print(
        f"{'solver':<6}{'lr':>8}{'epochs':>8}{'barrier/linear':>16}{'acc drop pts':>14}"
        f"{'fit s':>8}   (medians over {len(PAIRS)} pairs; worst pair in brackets)"
    )
    for setting, rows in results.items():
        arr = np.asarray(rows)
        print(
            f"{setting[0]:<6}{setting[1]:>8g}{setting[2]:>8d}"
            f"{np.median(arr[:, 0]):>9.3f} [{arr[:, 0].max():.3f}]"
            f"{np.median(arr[:, 1]):>7.2f} [{arr[:, 1].max():.2f}]{np.median(arr[:, 2]):>8.2f}"
        )


if __name__ == "__main__":
    main()
