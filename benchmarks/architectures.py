"""Default settings on a BatchNorm-heavy, depthwise network: never worse than the line.

Trains two ``make_mobilenet`` networks (inverted residuals with depthwise convolutions
and squeeze-excitation, thirteen BatchNorm layers) on the digits from two seeds and
fits a ``GeodesicConnector`` with its defaults, then prints the energy and test loss
barrier of the straight line and of the geodesic, the epochs and the wall-clock.

    python benchmarks/architectures.py          # about 4 minutes on 2 CPU cores
    python benchmarks/architectures.py --quick  # width 8, 384 images, 20 epochs
"""

from __future__ import annotations

import argparse
import time
import warnings

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mobilenet, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    data = load_digits_split()
    width, n = (8, 384) if args.quick else (16, len(data.images_train))
    X, y = data.images_train[:n], data.y_train[:n]
    a, b = (
        train_classifier(make_mobilenet(width=width, seed=s), X, y, epochs=15, seed=s)
        for s in (1, 2)
    )
    line = LinearConnector().fit(X, model_a=a, model_b=b)
    tic = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        geo = GeodesicConnector(random_state=0, **({"max_iter": 20} if args.quick else {}))
        geo.fit(X, model_a=a, model_b=b)
    seconds = time.perf_counter() - tic
    for name, connector in (("linear", line), ("geodesic", geo)):
        evaluation = connector.evaluate(data.images_test, data.y_test)
        print(
            f"{name:9s} energy {connector.energy_:.4f}  test loss barrier "
            f"{evaluation.barrier:.4f} nats  worst accuracy {evaluation.min_accuracy:.1%}"
        )
    print(f"geodesic: {geo.n_iter_} epochs in {seconds:.1f} s; warnings:")
    for warning in caught:
        print(f"  {type(warning.message).__name__}: {str(warning.message)[:100]}")


if __name__ == "__main__":
    main()
