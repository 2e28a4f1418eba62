"""The speed baseline is what benchmarks/README.md says it is."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
seed = pytest.importorskip("seed")

from geoconnect.evaluation import evaluate_path  # noqa: E402
from geoconnect.models import make_cnn  # noqa: E402


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 300)


def test_a_checkpoint_of_a_long_seed_run_is_the_fresh_run_of_that_length(images):
    X, _ = images
    a, b = make_cnn(seed=1), make_cnn(seed=2)
    runs = list(seed.seed_checkpoints(a, b, X, budgets=[1, 3], n_points=5, batch_size=128))
    assert [epochs for epochs, _, _ in runs] == [1, 3]
    fresh = seed.seed_geodesic(a, b, X, n_points=5, epochs=3, batch_size=128)
    checkpoint = runs[-1][1]
    torch.testing.assert_close(checkpoint.parameters_vector(), fresh.parameters_vector())
    for name, stats in fresh.batchnorm_buffers.items():
        torch.testing.assert_close(checkpoint.batchnorm_buffers[name], stats)
    timing = runs[-1][2]
    assert len(timing["epoch_seconds"]) == 3
    assert timing["seconds"] >= sum(timing["epoch_seconds"])


def test_the_seed_keeps_its_ends_and_moves_its_interior(images):
    X, y = images
    a, b = make_cnn(seed=1), make_cnn(seed=2)
    before = [p.detach().clone() for p in a.parameters()]
    path = seed.seed_geodesic(a, b, X, n_points=5, epochs=2, batch_size=128)
    for p, q in zip(a.parameters(), before):
        torch.testing.assert_close(p, q)  # the user's model is untouched
    line = seed.seed_geodesic(a, b, X, n_points=5, epochs=0, batch_size=128)
    ev, ev_line = evaluate_path(path, X, y), evaluate_path(line, X, y)
    np.testing.assert_allclose(ev.loss[[0, -1]], ev_line.loss[[0, -1]], rtol=1e-6)
    moved = (path.parameters_vector() - line.parameters_vector()).abs().amax(dim=1)
    assert moved[0] == moved[-1] == 0
    assert (moved[1:-1] > 0).all()


connect = pytest.importorskip("connect")


def test_peak_memory_counts_what_is_alive_together_and_nothing_before():
    before = torch.ones(1000, 1000)  # allocated before: not counted

    def work():
        a = torch.ones(500, 1000)  # 2 MB
        b = a * 2  # 2 MB more: 4 MB alive together
        del a
        c = b + 1  # 4 MB again
        del b, c
        torch.ones(250, 1000).sum()  # 1 MB, below the mark
        del before_ref[0]  # freeing an older tensor changes nothing

    before_ref = [before]
    del before
    live = connect.live_tensor_bytes(work)
    assert max(live) == pytest.approx(4_000_000, rel=1e-3)
    assert abs(live[-1]) < 1000  # all freed
    assert connect.peak_tensor_memory(lambda: torch.ones(10, 1000)) == pytest.approx(
        40_000, rel=1e-2
    )


def test_the_user_guides_methods_table_is_the_latest_runs():
    """The "Choosing a method" table is printed from benchmarks/results/methods.json,
    not typed: ``python benchmarks/methods.py --from-json`` reproduces it."""
    import json

    methods = pytest.importorskip("methods")
    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "benchmarks" / "results" / "methods.json").read_text())
    guide = (root / "docs" / "user-guide.md").read_text()
    assert methods.table(results) in guide
    for result in results.values():  # each trained method's target is a tenth of the line's
        assert result["target"] == pytest.approx(0.1 * result["rows"]["linear"]["barrier"])


def test_the_methods_benchmark_counts_a_chains_and_a_curves_evaluations():
    methods = pytest.importorskip("methods")

    class Fitted:
        def __init__(self, history):
            self.history_ = history

    assert methods.evaluations(Fitted({"n_points": [5, 9, 9]}), 10) == 10 * (3 + 7 + 7)
    assert methods.evaluations(Fitted({"loss": [1.0, 0.5]}), 10) == 20
    assert methods.evaluations(object(), 10) == 0


def test_the_scaling_pages_tables_are_the_latest_run():
    """The "Scaling out" tables are printed from benchmarks/results/distributed.json,
    not typed: ``python benchmarks/distributed.py --from-json`` reproduces them."""
    import json

    distributed = pytest.importorskip("distributed")
    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "benchmarks" / "results" / "distributed.json").read_text())
    page = (root / "docs" / "scaling.md").read_text()
    for table in distributed.tables(results).strip().split("\n\n"):
        assert table + "\n" in page
    methods = {r["method"] for r in results}
    assert methods == {"chain", "neb", "geodesic", "curve"}
