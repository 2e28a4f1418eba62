"""One rank of a distributed fit, run by tests/test_distributed.py under torchrun.

``python -m torch.distributed.run --nproc_per_node=W tests/distributed_worker.py OUT
[options]`` fits a small pair with ``distributed=True`` (or, with ``--single``, in one
process) and has rank 0 save what the tests compare: the path's parameters, the fitted
numbers, the history, and the bytes each kind of collective sent. Every collective call
of ``torch.distributed`` is wrapped to count them. ``--method`` picks the fit: the
geodesic chain (its points split across ranks), the continuous geodesic
(``"geodesic"``, data-parallel), the loss-trained ``CurveConnector``
(data-parallel) or the elastic band (``"neb"``, its images split across ranks);
``--batches-per-step W`` makes one process's curve take W batches a step, as W ranks
do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import warnings


def _count_collectives(counts: dict[str, int]) -> None:
    import torch.distributed as dist

    def wrap(name: str, size) -> None:
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + size(*args)
            counts[f"{name}_calls"] = counts.get(f"{name}_calls", 0) + 1
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def nbytes(tensor) -> int:
        return tensor.element_size() * tensor.nelement()

    wrap("all_gather", lambda out, tensor, *rest: nbytes(tensor))
    wrap("broadcast", lambda tensor, *rest: nbytes(tensor))
    wrap("all_reduce", lambda tensor, *rest: nbytes(tensor))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", choices=["chain", "geodesic", "curve", "neb"], default="chain")
    parser.add_argument("--energy", default="chord", help="the continuous geodesic's estimate")
    parser.add_argument("--batches-per-step", type=int, default=1)
    parser.add_argument("--kill-rank", type=int, default=-1, help="SIGKILL this rank ...")
    parser.add_argument("--all-ranks", action="store_true", help="every rank saves OUT.rankR")
    parser.add_argument("--kind", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--n-samples", type=int, default=192)
    parser.add_argument("--labels-differ", action="store_true", help="rank 1's labels shifted")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--solver", default="sgd")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--max-iter", type=int, default=6)
    parser.add_argument("--n-points", type=int, default=9)
    parser.add_argument("--no-coarse", action="store_true")
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=3)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--no-gather", action="store_true", help="gather=False")
    parser.add_argument("--save", default=None, help="every rank saves path_ here")
    parser.add_argument(
        "--warnings", action="store_true", help="save what each rank warns (OUT.rankR.json)"
    )
    parser.add_argument("--warn-rank", type=int, default=-1, help="this rank alone warns")
    return parser.parse_args(argv)


def _inject(args: argparse.Namespace, steps: list[int], held: list[list[int]]) -> None:
    """Count the fit's steps, and fail, die or warn at one on one rank, as asked; a
    chain's steps record the points the rank holds, and the level's."""
    import geoconnect.curves as curves
    import geoconnect.fitting as fitting

    rank = int(os.environ["RANK"])
    import geoconnect.neb as neb

    owner, name = {
        "chain": (fitting, "train_step"),
        "neb": (neb, "_step"),
    }.get(args.method, (curves._CurveEpoch, "_step"))
    original = getattr(owner, name)

    def step(*step_args):
        steps[0] += 1
        if args.method == "chain":
            path = step_args[0].path
            held.append([path.n_points, path.whole_points])
        if steps[0] == args.fail_step and rank == args.fail_rank:
            raise RuntimeError(f"rank {args.fail_rank} fails on purpose")
        if steps[0] == args.fail_step and rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # no exception, no goodbye: as the OOM killer
        if steps[0] == 1 and rank == args.warn_rank:
            warnings.warn(f"rank {args.warn_rank} alone warns", UserWarning, stacklevel=2)
        return original(*step_args)

    setattr(owner, name, step)


@contextlib.contextmanager
def _batches_in_turn(n: int):
    """Inside, one process's curve fits take ``n`` batches a step, as ``n`` ranks do."""
    import dataclasses

    import geoconnect.connectors.curve as curve
    import geoconnect.connectors.geodesic as geodesic

    originals = {module: module.fit_curve for module in (curve, geodesic)}
    for module, original in originals.items():

        def fit_curve(curve_, data, settings, *rest, _original=original, **kwargs):
            settings = dataclasses.replace(settings, batches_per_step=n)
            return _original(curve_, data, settings, *rest, **kwargs)

        module.fit_curve = fit_curve
    try:
        yield
    finally:
        for module, original in originals.items():
            module.fit_curve = original


def _connector(args: argparse.Namespace):
    from geoconnect import CurveConnector, GeodesicConnector, NEBConnector

    common = {
        "solver": args.solver,
        "learning_rate_init": args.learning_rate,
        "max_iter": args.max_iter,
        "batch_size": 64 if args.method in ("chain", "neb") else 32,
        "random_state": 0,
        "device": "cpu",
        "distributed": not args.single,
        "n_points": args.n_points,
    }
    if args.method == "curve":
        return CurveConnector(**common)
    if args.method == "neb":
        return NEBConnector(**common)
    if args.method == "geodesic":
        return GeodesicConnector(
            **common, energy=args.energy, checkpoint=args.checkpoint, relative_step=False
        )
    return GeodesicConnector(
        curve="chain",
        coarse_to_fine=not args.no_coarse,
        checkpoint=args.checkpoint,
        gather=not args.no_gather,
        **common,
    )


def fit(args: argparse.Namespace) -> dict:
    """The worker's fit; what rank 0 saves (every rank returns it)."""
    import torch

    from geoconnect.models import load_digits_split, make_cnn, make_mlp

    counts: dict[str, int] = {}
    steps, held = [0], []
    if not args.single:
        _count_collectives(counts)
        _inject(args, steps, held)

    data = load_digits_split()
    if args.kind == "mlp":
        X = torch.as_tensor(data.X_train[: args.n_samples], dtype=torch.float32)
        a = make_mlp((64, args.width, args.width, 10), seed=1)
        b = make_mlp((64, args.width, args.width, 10), seed=2)
    else:
        X = torch.as_tensor(data.images_train[: args.n_samples], dtype=torch.float32)
        a, b = make_cnn(width=args.width, seed=1), make_cnn(width=args.width, seed=2)
    labelled = args.method in ("curve", "neb")
    y = torch.as_tensor(data.y_train[: args.n_samples]) if labelled else None
    if args.labels_differ and os.environ.get("RANK") == "1":
        y = (y + 1) % 10
    geo = _connector(args)
    with warnings.catch_warnings(record=True) as caught:
        # convergence after a few epochs is not the point, unless warnings are
        warnings.simplefilter("always" if args.warnings else "ignore")
        with _batches_in_turn(args.batches_per_step):
            geo.fit(X, y, model_a=a, model_b=b)
    refused = score = None
    if args.save:
        geo.path_.save(args.save)
        labels = torch.as_tensor(data.y_train[: args.n_samples])
        score = geo.score(X, labels)  # a shard's: across the ranks
        try:
            geo.evaluate(X, labels)
        except ValueError as exc:
            refused = str(exc)
    if args.warnings:
        given = [[w.category.__name__, str(w.message)] for w in caught]
        with open(f"{args.out}.rank{os.environ.get('RANK', 0)}.json", "w") as f:
            json.dump(given, f)
    return {
        "params": geo.path_.parameters_vector(),
        "energy": geo.energy_,
        "length": geo.length_,
        "history": geo.history_,
        "n_params": geo.path_.n_params,
        "n_bends_params": geo.curve_.control.n_params if hasattr(geo, "curve_") else None,
        "communication": getattr(geo, "communication_", None),
        "counts": counts,
        "steps": steps[0],
        "held": held,
        "shard": None if geo.path_.shard is None else list(vars(geo.path_.shard).values()),
        "refused": refused,
        "score": score,
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)  # the kernels of the single-process reference, also one thread
    args = parse()
    result = fit(args)
    if args.single or int(os.environ["RANK"]) == 0:
        torch.save(result, args.out)
    if args.all_ranks:
        torch.save(result, f"{args.out}.rank{os.environ['RANK']}")


if __name__ == "__main__":
    main()
