"""What unlabelled inputs add to a label-free geodesic fit, measured held out.

``GeodesicConnector`` needs no labels, so its ``X`` can hold every input a user has,
labelled or not. This run splits each pair's test inputs in two halves: the
continuous geodesic (``curve="bezier"``, its defaults) is fitted once on the
training inputs and once on them plus the first half (without its labels), and
both are scored on the second half: the continuous Fisher–Rao length and the loss
barrier there.

    python benchmarks/unlabelled.py                    # mlp, wide, layernorm
    python benchmarks/unlabelled.py --pairs mlp --json F.json
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from geoconnect import GeodesicConnector

try:  # run as a script from the repository root or from benchmarks/
    from methods import N_POINTS, make_pairs
except ImportError:  # pragma: no cover
    from benchmarks.methods import N_POINTS, make_pairs


def run_pair(pair) -> dict:
    half = len(pair.X_test) // 2
    extra, held_x, held_y = pair.X_test[:half], pair.X_test[half:], pair.y_test[half:]
    rows = {}
    for name, X in (
        ("fit inputs", pair.X_train),
        ("fit inputs + unlabelled", np.concatenate([pair.X_train, extra])),
    ):
        geo = GeodesicConnector(
            curve="bezier", n_points=N_POINTS, device="cpu", random_state=0, align=pair.align
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            geo.fit(X, model_a=pair.model_a, model_b=pair.model_b)
        held = geo.evaluate(held_x, held_y)
        rows[name] = {
            "n_inputs": len(X),
            "held_out_length": held.length,
            "held_out_barrier": held.barrier,
        }
        print(
            f"  {pair.name:26s} {name:24s} {len(X):5d} inputs  held out: length "
            f"{held.length:.3f}  barrier {held.barrier:.4f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="mlp,wide,layernorm")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    results = {pair.name: run_pair(pair) for pair in make_pairs(args.pairs.split(","))}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
