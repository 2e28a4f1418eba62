"""The first fit in a fresh process against a second identical fit in the same process.

A first fit pays for what a process does once: imports that torch makes lazily,
allocator warm-up, the evaluation strategy's trial. On the digits BatchNorm CNN pair
(``make_cnn``, 9 points, ``max_iter=1``, no coarse levels, CPU) this runs the two fits
in each of ``--processes`` fresh processes and reports the median ratio first/second.

    python benchmarks/first_fit.py               # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, time, warnings
from geoconnect import GeodesicConnector
from geoconnect.models import load_digits_split, make_cnn
warnings.simplefilter("ignore")
data = load_digits_split()
a, b = make_cnn(seed=1), make_cnn(seed=2)
times = []
for _ in range(2):
    tic = time.perf_counter()
    GeodesicConnector(
        n_points=9, max_iter=1, coarse_to_fine=False, random_state=0, device="cpu"
    ).fit(data.images_train, model_a=a, model_b=b)
    times.append(time.perf_counter() - tic)
print(json.dumps(times))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=5)
    args = parser.parse_args()
    runs = []
    for _ in range(args.processes):
        done = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ratios = [first / second for first, second in runs]
    print(
        f"first fit {statistics.median(r[0] for r in runs):.3f} s, second "
        f"{statistics.median(r[1] for r in runs):.3f} s (medians of {len(runs)} processes); "
        f"ratio first/second: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
