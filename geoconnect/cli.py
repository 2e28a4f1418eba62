"""The ``geoconnect`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .evaluation import PathEvaluation
    from .models import DigitsSplit

__all__ = ["main", "run_demo", "show_info"]


def run_demo(
    output: str | Path = "geoconnect-demo.png",
    *,
    n_points: int = 25,
    seeds: tuple[int, int] = (1, 2),
    device: str = "auto",
    verbose: int = 0,
) -> dict[str, dict[str, float]]:
    """Train two digits MLPs from two seeds, connect them both ways, compare.

    Prints a table of the test loss barrier, the minimum test accuracy along the
    path, Fisher–Rao and Euclidean lengths and fit time for the straight line and
    the geodesic, and writes a PNG of test loss along both paths.

    Parameters
    ----------
    output : str or Path, default="geoconnect-demo.png"
        Where to write the figure.
    n_points : int, default=25
    seeds : tuple of int, default=(1, 2)
        Seeds of the two networks.
    device : str, default="auto"
    verbose : int, default=0
        Passed to :class:`GeodesicConnector`.

    Returns
    -------
    dict
        For "linear" and "geodesic": the numbers of the table.

    Examples
    --------
    >>> rows = run_demo("/tmp/demo.png")  # doctest: +SKIP
    """
    from .models import load_digits_split, make_mlp, train_classifier

    split = load_digits_split()
    print(
        "Training two 64-16-16-10 MLPs on scikit-learn's digits (seeds "
        f"{seeds[0]} and {seeds[1]}) ...",
        flush=True,
    )
    model_a = train_classifier(make_mlp(seed=seeds[0]), split.X_train, split.y_train, seed=seeds[0])
    model_b = train_classifier(make_mlp(seed=seeds[1]), split.X_train, split.y_train, seed=seeds[1])
    rows, evaluations = _demo_fits(split, model_a, model_b, n_points, device, verbose)
    _print_demo_table(rows, evaluations, n_points)
    _write_demo_figure(evaluations, Path(output))
    return rows


def _demo_fits(
    split: DigitsSplit,
    model_a: nn.Module,
    model_b: nn.Module,
    n_points: int,
    device: str,
    verbose: int,
) -> tuple[dict[str, dict[str, float]], dict[str, PathEvaluation]]:
    """The line and the geodesic between the two models: the table's numbers, and
    the evaluations on the test digits, by path."""
    from . import GeodesicConnector, LinearConnector

    connectors = {
        "linear": LinearConnector(n_points=n_points, device=device),
        "geodesic": GeodesicConnector(
            n_points=n_points, device=device, random_state=0, verbose=verbose
        ),
    }
    rows, evaluations = {}, {}
    for name, connector in connectors.items():
        start = time.perf_counter()
        connector.fit(split.X_train, model_a=model_a, model_b=model_b)
        seconds = time.perf_counter() - start
        ev = connector.evaluate(split.X_test, split.y_test)
        evaluations[name] = ev
        rows[name] = {
            "test loss barrier": ev.barrier,
            "min test accuracy": ev.min_accuracy,
            "Fisher-Rao length": ev.length,
            "Fisher-Rao chords": ev.chord_length,
            "Euclidean length": ev.euclidean_length,
            "fit seconds": seconds,
        }
    return rows, evaluations


def _print_demo_table(
    rows: dict[str, dict[str, float]], evaluations: dict[str, PathEvaluation], n_points: int
) -> None:
    ends = evaluations["linear"].accuracy[[0, -1]]
    print(f"\nEndpoint test accuracy: model_a {ends[0]:.1%}, model_b {ends[1]:.1%}\n")
    header = f"{'path':<10}{'barrier':>10}{'min acc':>10}{'FR length':>12}{'FR chords':>11}"
    header += f"{'eucl length':>13}{'fit s':>8}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:<10}{row['test loss barrier']:>10.4f}{row['min test accuracy']:>10.1%}"
            f"{row['Fisher-Rao length']:>12.3f}{row['Fisher-Rao chords']:>11.3f}"
            f"{row['Euclidean length']:>13.2f}"
            f"{row['fit seconds']:>8.2f}"
        )
    shortest = evaluations["linear"].min_length
    print(
        f"\nFR length: the Fisher-Rao length of the path, the networks between its points "
        f"included; FR chords: at its {n_points} points alone. No path between the two "
        f"models is shorter than {shortest:.3f} rad on the test "
        "inputs (the distance between their predictions)."
    )


def _write_demo_figure(evaluations: dict[str, PathEvaluation], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import plot_loss_profile

    axes = plot_loss_profile(
        evaluations,
        accuracy=True,
        title="Test loss along the linear and geodesic paths (digits MLPs)",
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    axes[0].figure.savefig(output, dpi=120)
    plt.close(axes[0].figure)
    print(f"\nFigure written to {output.resolve()}")


def show_info(file: str | Path, *, as_json: bool = False) -> int:
    """Print a saved path's or checkpoint's summary; return the exit status.

    Needs no model class: everything comes from the file's record, which is checked
    against its digest first. A file that cannot be read prints why, on stderr, and
    returns 1.

    Parameters
    ----------
    file : str or Path
        A file written by :meth:`geoconnect.ModelPath.save`, or a checkpoint.
    as_json : bool, default=False
        Print the whole record as JSON instead of the summary.

    Returns
    -------
    int
        0, or 1 when the file cannot be read.

    Examples
    --------
    >>> import tempfile, torch
    >>> from geoconnect import ModelPath
    >>> from geoconnect.cli import show_info
    >>> path = ModelPath.linear(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3), 5)
    >>> show_info(path.save(tempfile.mkdtemp() + "/line.safetensors"))  # doctest: +ELLIPSIS
    file          .../line.safetensors (... bytes, digest verified)
    ...
    0
    """
    import json

    from .persistence import file_info, format_info

    try:
        info = file_info(file)
    except (OSError, ValueError) as exc:
        print(f"geoconnect info: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if as_json else format_info(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geoconnect`` console command."""
    parser = argparse.ArgumentParser(
        prog="geoconnect",
        description="Low-loss paths between trained PyTorch networks along Fisher-Rao geodesics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="connect two digits MLPs with a line and a geodesic and compare"
    )
    demo.add_argument(
        "--output", "-o", default="geoconnect-demo.png", help="PNG to write (default: %(default)s)"
    )
    demo.add_argument("--n-points", type=int, default=25, help="points on each path")
    demo.add_argument("--device", default="auto", help="torch device (default: auto)")
    demo.add_argument(
        "--verbose", "-v", action="count", default=0, help="show the geodesic fit's progress"
    )
    info = commands.add_parser(
        "info",
        help="summarise a saved path or checkpoint (no model class needed)",
        description="Print what a file written by ModelPath.save or by checkpoint= holds: "
        "points, architecture and its fingerprint, divergence, lengths, metadata. The "
        "file's digest is checked first.",
    )
    info.add_argument("file", help="a .safetensors file geoconnect wrote")
    info.add_argument("--json", action="store_true", help="print the whole record as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return show_info(args.file, as_json=args.json)
    if args.command == "demo":
        if args.n_points < 2:
            parser.error("--n-points must be at least 2")
        run_demo(args.output, n_points=args.n_points, device=args.device, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
