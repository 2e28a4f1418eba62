"""Path-parallel fitting: torchrun with gloo on the CPU gives the single-process path.

Each test launches ``torch.distributed.run`` (torchrun) on tests/distributed_worker.py
with two or three CPU ranks, and compares what rank 0 saved with the same fit in one
process (also one thread, so both run the same kernels).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker
import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from geoconnect import CurveConnector, GeodesicConnector, ModelPath, NEBConnector
from geoconnect.distributed import PathGroup, RankLostError, block_bounds
from geoconnect.evaluation import evaluate_path
from geoconnect.models import load_digits_split, make_cnn

WORKER = Path(distributed_worker.__file__)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def torchrun(out: Path, world_size: int, *options: str) -> subprocess.CompletedProcess:
    """The worker on ``world_size`` CPU ranks, one thread each."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world_size}",
        str(WORKER),
        str(out),
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def launch(tmp_path: Path, world_size: int, *options: str) -> dict:
    """What rank 0 of the worker saved; ``world_size=0``: the fit in this process."""
    if world_size == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the ranks' kernels
        try:
            return distributed_worker.fit(distributed_worker.parse(["-", "--single", *options]))
        finally:
            torch.set_num_threads(threads)
    out = tmp_path / f"ws{world_size}.pt"
    done = torchrun(out, world_size, *options)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize(
    ("world_size", "options"),
    [
        (2, ("--kind", "mlp")),
        (2, ("--kind", "mlp", "--n-points", "4")),
        (3, ("--kind", "mlp", "--no-coarse")),
        (2, ("--kind", "cnn")),
        (3, ("--kind", "cnn", "--n-points", "13")),
    ],
    ids=["mlp-2", "mlp-2-a-point-each", "mlp-3-one-level", "batchnorm-cnn-2", "batchnorm-cnn-3"],
)
def test_the_distributed_path_is_the_single_process_path(tmp_path, world_size, options):
    # SGD: the same gradients give the same path, to the last bit in practice.
    single = launch(tmp_path, 0, *options)
    split = launch(tmp_path, world_size, *options)
    torch.testing.assert_close(split["params"], single["params"], rtol=1e-5, atol=1e-5)
    assert split["energy"] == pytest.approx(single["energy"], rel=1e-5)
    assert split["length"] == pytest.approx(single["length"], rel=1e-5)
    assert split["history"]["n_points"] == single["history"]["n_points"]
    assert split["history"]["energy"] == pytest.approx(single["history"]["energy"], rel=1e-5)
    # While it fits, rank 0 holds its block of each level and the two ends, no more.
    held = {tuple(h) for h in split["held"]}
    assert len(held) == len(set(split["history"]["n_points"]))
    for local, whole in held:
        assert local == 2 + block_bounds(whole - 2, world_size)[0][1] < whole


@pytest.mark.parametrize(
    ("world_size", "options"),
    [(2, ("--kind", "mlp")), (3, ("--kind", "cnn", "--n-points", "13"))],
    ids=["mlp-2", "batchnorm-cnn-3"],
)
def test_an_elastic_band_split_by_images_is_the_single_process_band(tmp_path, world_size, options):
    # SGD: each rank moves its block of images with the same forces.
    options = ("--method", "neb", *options)
    single = launch(tmp_path, 0, *options)
    split = launch(tmp_path, world_size, *options, "--all-ranks")
    torch.testing.assert_close(split["params"], single["params"], rtol=1e-5, atol=1e-5)
    assert split["history"]["loss"] == pytest.approx(single["history"]["loss"], rel=1e-5)
    assert split["length"] == pytest.approx(single["length"], rel=1e-5)
    out = tmp_path / f"ws{world_size}.pt"
    for rank in range(1, world_size):
        assert torch.equal(torch.load(f"{out}.rank{rank}")["params"], split["params"])
    # Per step each rank sends its two edge images: two networks' parameters.
    sent = split["communication"]
    assert sent["exchanged_bytes"] == sent["steps"] * 2 * split["n_params"] * 4


def test_the_shards_the_ranks_save_load_as_the_gathered_path(tmp_path):
    # gather=False: each rank keeps its block and saves it; one process loads them.
    options = ("--kind", "cnn", "--max-iter", "3")
    gathered = launch(tmp_path, 2, *options, "--save", str(tmp_path / "whole.safetensors"))
    file = tmp_path / "split.safetensors"
    split = launch(tmp_path, 2, *options, "--no-gather", "--save", str(file))
    assert gathered["shard"] is None and gathered["refused"] is None
    assert split["shard"] == [0, 4, 9, 0, 2]  # rank 0: interior points 0–3 of 7
    assert "rank 0's shard of a 9-point path" in split["refused"]  # evaluate refuses
    assert split["score"] == gathered["score"] < 0  # score: the ranks' points gathered
    assert split["length"] == gathered["length"] and split["energy"] == gathered["energy"]
    template = make_cnn(width=16, seed=0)
    loaded = ModelPath.load(file, template=template)
    whole = ModelPath.load(tmp_path / "whole.safetensors", template=template)
    assert torch.equal(loaded.parameters_vector(), gathered["params"])
    data = load_digits_split()
    X, y = data.images_test[:200], data.y_test[:200]
    mine, theirs = evaluate_path(loaded, X, y), evaluate_path(whole, X, y)
    np.testing.assert_array_equal(mine.loss, theirs.loss)
    np.testing.assert_array_equal(mine.accuracy, theirs.accuracy)
    assert mine.length == theirs.length and mine.barrier == theirs.barrier


def test_with_adam_the_distributed_fit_reaches_the_same_numbers(tmp_path):
    # Adam divides by the gradients' running size, which magnifies rounding
    # differences (those between thread counts too); the fit's numbers still agree.
    options = ("--kind", "cnn", "--solver", "adam", "--learning-rate", "0.003")
    single = launch(tmp_path, 0, *options)
    split = launch(tmp_path, 2, *options)
    assert split["energy"] == pytest.approx(single["energy"], rel=1e-3)
    assert split["length"] == pytest.approx(single["length"], rel=1e-3)
    torch.testing.assert_close(split["params"], single["params"], rtol=0, atol=1e-2)


def test_bytes_per_step_do_not_grow_with_the_model(tmp_path):
    small = launch(tmp_path, 2, "--width", "8", "--no-coarse", "--max-iter", "2")
    large = launch(tmp_path, 2, "--width", "64", "--no-coarse", "--max-iter", "2")
    assert large["n_params"] > 10 * small["n_params"]
    # Per step: one all_gather of the two boundary points' logits (batch × classes);
    # and one per batch of the two measurements of the energy (start and end).
    exchanges = [run["steps"] + 2 * (192 // 64) for run in (small, large)]
    assert [run["counts"]["all_gather_calls"] for run in (small, large)] == exchanges
    assert large["counts"]["all_gather"] == small["counts"]["all_gather"]
    assert small["counts"]["all_gather"] == exchanges[0] * 2 * 64 * 10 * 4
    # Parameters travel as rank 0's last point, once an epoch (to rank 1, for the
    # Euclidean length), and as the blocks, once, at the end: never the whole path
    # an epoch. (9 points: 7 interior.)
    for run in (small, large):
        assert run["counts"]["broadcast"] == (2 * 1 + 7) * run["n_params"] * 4


def test_a_rank_that_fails_makes_every_rank_fail_without_hanging(tmp_path):
    out = tmp_path / "never.pt"
    done = torchrun(out, 2, "--fail-rank", "1")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "rank 1 fails on purpose" in output
    assert not out.exists()


def test_rank_0_gives_each_warning_once_and_names_the_ranks_of_one_that_not_all_gave(
    tmp_path,
):
    out = tmp_path / "warned.pt"
    done = torchrun(out, 2, "--warnings", "--warn-rank", "1")  # 6 epochs: max_iter runs out
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0 = json.loads(Path(f"{out}.rank0.json").read_text())
    rank1 = json.loads(Path(f"{out}.rank1.json").read_text())
    assert rank1 == []
    categories = [category for category, _ in rank0]
    assert categories.count("ConvergenceWarning") == 1
    assert ["UserWarning", "rank 1 alone warns (on rank 1 only)"] in rank0
    assert len(rank0) == len({message for _, message in rank0})  # nothing twice


def test_a_distributed_fit_that_crashed_resumes_from_its_checkpoints(tmp_path):
    # Rank 1 fails in the third epoch (three steps per epoch); the refit resumes from
    # the last epoch both ranks wrote and ends with the uninterrupted path.
    directory = tmp_path / "checkpoints"
    options = ("--kind", "cnn", "--checkpoint", str(directory))
    crashed = torchrun(tmp_path / "crashed.pt", 2, *options, "--fail-rank", "1", "--fail-step", "8")
    assert crashed.returncode != 0 and "rank 1 fails on purpose" in crashed.stdout + crashed.stderr
    files = sorted(p.name for p in directory.iterdir())
    assert files == [f"checkpoint-rank{r}-of2-{s}.safetensors" for r in (0, 1) for s in "ab"]
    resumed = launch(tmp_path, 2, *options)
    assert resumed["steps"] < 6 * 3  # it did not start again
    single = launch(tmp_path, 0, "--kind", "cnn")
    torch.testing.assert_close(resumed["params"], single["params"], rtol=1e-5, atol=1e-5)
    assert resumed["history"]["energy"] == pytest.approx(single["history"]["energy"], rel=1e-5)


# -- data-parallel curves: each rank its own batches and t, the gradients added up ------


CURVES = [
    (2, ("--method", "geodesic", "--kind", "mlp")),
    (3, ("--method", "geodesic", "--kind", "cnn", "--energy", "jvp")),
    (2, ("--method", "curve", "--kind", "mlp")),
    (3, ("--method", "curve", "--kind", "cnn")),
    # 7 batches (the last of 16): the last step's batch is cut into two parts of 8
    (2, ("--method", "geodesic", "--kind", "cnn", "--n-samples", "208")),
]


@pytest.mark.parametrize(
    ("world_size", "options"),
    CURVES,
    ids=[
        "geodesic-mlp-2",
        "geodesic-jvp-batchnorm-cnn-3",
        "curve-mlp-2",
        "curve-batchnorm-cnn-3",
        "geodesic-batchnorm-cnn-2-short-last-step",
    ],
)
def test_a_data_parallel_curve_is_one_process_taking_the_ranks_batches_in_turn(
    tmp_path, world_size, options
):
    # SGD: the same summed gradients give the same curve.
    single = launch(tmp_path, 0, *options, "--batches-per-step", str(world_size))
    split = launch(tmp_path, world_size, *options, "--all-ranks")
    torch.testing.assert_close(split["params"], single["params"], rtol=1e-6, atol=1e-6)
    key = "energy" if "geodesic" in options else "loss"
    assert split["history"][key] == pytest.approx(single["history"][key], rel=1e-6)
    assert split["length"] == pytest.approx(single["length"], rel=1e-6)
    # Every rank ends with the same path, to the bit.
    out = tmp_path / f"ws{world_size}.pt"
    for rank in range(1, world_size):
        assert torch.equal(torch.load(f"{out}.rank{rank}")["params"], split["params"])
    # A step of one batch per rank: an epoch of B batches is ⌈B / W⌉ steps.
    batches = -(-int(dict(zip(options, options[1:])).get("--n-samples", 192)) // 32)
    assert split["steps"] == -(-batches // world_size) * len(split["history"][key])


def test_a_data_parallel_curve_differs_from_one_process_taking_one_batch_a_step(tmp_path):
    # The comparison above can fail: W ranks are not one process's usual fit.
    options = ("--method", "geodesic", "--kind", "mlp")
    usual = launch(tmp_path, 0, *options)
    split = launch(tmp_path, 2, *options)
    assert (split["params"] - usual["params"]).abs().max() > 1e-4


def test_with_adam_a_data_parallel_curve_reaches_the_same_numbers(tmp_path):
    # Adam divides by the gradients' running size, which magnifies the rounding of
    # three ranks' sums (in practice the curve agrees to 1e-6 or better).
    options = ("--method", "geodesic", "--kind", "cnn", "--solver", "adam")
    options += ("--learning-rate", "0.003", "--energy", "jvp")
    single = launch(tmp_path, 0, *options, "--batches-per-step", "3")
    split = launch(tmp_path, 3, *options)
    torch.testing.assert_close(split["params"], single["params"], rtol=0, atol=1e-4)
    assert split["history"]["energy"] == pytest.approx(single["history"]["energy"], rel=1e-5)
    assert split["length"] == pytest.approx(single["length"], rel=1e-4)


def test_a_data_parallel_step_sends_the_bends_gradients_once(tmp_path):
    split = launch(tmp_path, 2, "--method", "geodesic", "--kind", "mlp", "--max-iter", "2")
    bends = 3 * split["n_bends_params"] * 4  # three float32 bends
    sent = split["communication"]
    assert sent["world_size"] == 2 and sent["steps"] == split["steps"] == 6
    # Per step one bucket (the gradients and the rows), per epoch the three sums.
    assert sent["reduced_bytes"] == 6 * (bends + 4) + 2 * 3 * 8
    assert sent["shared_bytes"] == bends  # the bends from rank 0, once at the end
    assert split["counts"]["all_reduce"] == sent["reduced_bytes"]
    assert split["counts"]["all_reduce_calls"] == 6 + 2


# -- two nodes, and ranks that die ------------------------------------------------------


def two_nodes(out: Path, *options: str) -> list[subprocess.CompletedProcess]:
    """The worker launched as on two nodes of one rank each: two torchrun agents that
    meet at a c10d rendezvous on localhost. Fails the test if they have not both
    ended within two minutes (a hang)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
    command += ["--nproc_per_node=1", "--rdzv-backend=c10d"]
    command += [f"--rdzv-endpoint=localhost:{_free_port()}", str(WORKER), str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=120)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        pytest.fail("a node of the launch was still running after 120 s: it hung")
    return [
        subprocess.CompletedProcess(command, node.returncode, output, "")
        for node, output in zip(nodes, outputs, strict=True)
    ]


@pytest.mark.parametrize("method", ["geodesic", "chain"])
def test_two_nodes_on_localhost_give_the_single_node_result(tmp_path, method):
    options = ("--method", method, "--kind", "cnn", "--max-iter", "3")
    nodes = two_nodes(tmp_path / "nodes.pt", *options)
    assert [node.returncode for node in nodes] == [0, 0], nodes[0].stdout[-3000:]
    one_node = launch(tmp_path, 2, *options)
    assert torch.equal(torch.load(tmp_path / "nodes.pt")["params"], one_node["params"])


@pytest.mark.parametrize("method", ["geodesic", "curve", "chain", "neb"])
def test_a_killed_rank_makes_the_others_stop_naming_it(tmp_path, method):
    # Rank 1 is SIGKILLed in its third step, as by the out-of-memory killer: no
    # exception, no goodbye. Rank 0, on the other "node", finds it out at its next
    # collective and raises at once, naming rank 1 and its process.
    out = tmp_path / "never.pt"
    nodes = two_nodes(out, "--method", method, "--kill-rank", "1", "--fail-step", "3")
    assert all(node.returncode != 0 for node in nodes)
    output = nodes[0].stdout + nodes[1].stdout
    said = [line for line in output.splitlines() if "RankLostError" in line] or [output[-3000:]]
    assert "RankLostError: distributed fit: rank 1 (pid " in output, said
    assert "so rank 0 stops too" in output
    assert not out.exists()


def test_a_distributed_curve_that_crashed_resumes_from_its_checkpoints(tmp_path):
    # Rank 1 fails in the third epoch (three steps an epoch); the refit resumes from
    # the last epoch both ranks wrote and ends with the uninterrupted curve.
    directory = tmp_path / "checkpoints"
    options = ("--method", "geodesic", "--kind", "cnn", "--checkpoint", str(directory))
    crashed = torchrun(tmp_path / "crashed.pt", 2, *options, "--fail-rank", "1", "--fail-step", "8")
    assert crashed.returncode != 0 and "rank 1 fails on purpose" in crashed.stdout + crashed.stderr
    files = sorted(p.name for p in directory.iterdir())
    assert files == [f"checkpoint-rank{r}-of2-{s}.safetensors" for r in (0, 1) for s in "ab"]
    resumed = launch(tmp_path, 2, *options)
    assert 0 < resumed["steps"] < 6 * 3  # it did not start again
    whole = launch(tmp_path, 2, "--method", "geodesic", "--kind", "cnn")
    assert torch.equal(resumed["params"], whole["params"])
    assert resumed["history"]["energy"] == whole["history"]["energy"]


@given(n_interior=st.integers(0, 60), world_size=st.integers(1, 8))
def test_blocks_are_contiguous_balanced_and_cover_the_interior(n_interior, world_size):
    bounds = block_bounds(n_interior, world_size)
    assert len(bounds) == world_size
    assert bounds[0][0] == 0 and bounds[-1][1] == n_interior
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    # The reported segments cover each of the level's segments exactly once.
    owned = [PathGroup(rank, world_size).owned_segments(n_interior) for rank in range(world_size)]
    covered = [s for part in owned for s in range(part.start, part.stop)]
    if n_interior >= world_size:
        assert covered == list(range(n_interior + 1))


def test_a_group_geoconnect_initialised_is_taken_down_when_the_script_ends(tmp_path):
    # atexit runs its handlers last-registered first: one registered before the fit
    # runs after geoconnect's, and sees whether the group is still up.
    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, torch, torch.distributed as dist\n"
        "from geoconnect import GeodesicConnector\n"
        "atexit.register(lambda: print('initialised at exit:', dist.is_initialized()))\n"
        "a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)\n"
        "GeodesicConnector(curve='chain', n_points=5, max_iter=1, device='cpu', random_state=0,\n"
        "                  distributed=True).fit(torch.randn(16, 4), model_a=a, model_b=b)\n"
        "print('initialised after the fit:', dist.is_initialized())\n"
    )
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialised after the fit: True" in done.stdout  # the script may still use it
    assert "initialised at exit: False" in done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONNECTORS = [
    lambda **kw: GeodesicConnector(curve="chain", n_points=5, **kw),
    lambda **kw: GeodesicConnector(curve="bezier", n_points=5, **kw),
    lambda **kw: CurveConnector(n_points=5, **kw),
    lambda **kw: NEBConnector(n_points=5, **kw),
]


@pytest.mark.parametrize("make", CONNECTORS, ids=["chain", "geodesic-curve", "curve", "neb"])
def test_without_a_process_group_distributed_says_how_to_launch(monkeypatch, make):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    geo = make(max_iter=1, device="cpu", random_state=0, distributed=True)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"torchrun --nproc_per_node=2"):
        geo.fit(torch.randn(16, 4), torch.randint(0, 3, (16,)), model_a=a, model_b=b)
    assert not hasattr(geo, "path_")


@pytest.mark.parametrize("make", CONNECTORS, ids=["chain", "geodesic-curve", "curve", "neb"])
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"random_state": None}, "int random_state"),
        ({"random_state": np.random.RandomState(0)}, "int random_state"),
    ],
)
def test_distributed_refuses_what_it_cannot_do(make, params, message):
    geo = make(max_iter=1, device="cpu", distributed=True, **params)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=message):
        geo.fit(torch.randn(16, 4), torch.randint(0, 3, (16,)), model_a=a, model_b=b)
    assert not hasattr(geo, "path_")


def test_an_elastic_band_refuses_to_grow_across_ranks():
    neb = NEBConnector(n_points=6, insert_points=1, device="cpu", random_state=0, distributed=True)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"insert_points=1 .* distributed=True"):
        neb.fit(torch.randn(16, 4), torch.randint(0, 3, (16,)), model_a=a, model_b=b)
    assert not hasattr(neb, "path_")


@pytest.mark.parametrize("method", ["curve", "neb"])
def test_ranks_given_different_labels_all_refuse(tmp_path, method):
    done = torchrun(tmp_path / "never.pt", 2, "--method", method, "--labels-differ")
    assert done.returncode != 0
    assert "the ranks were given different models, X or parameters" in done.stdout + done.stderr


@pytest.mark.parametrize("method", ["chain", "neb"])
def test_a_path_split_across_more_ranks_than_interior_points_is_refused(tmp_path, method):
    done = torchrun(tmp_path / "never.pt", 2, "--method", method, "--n-points", "3")
    assert done.returncode != 0
    assert "which leaves some rank without one. Set n_points ≥ 4" in done.stdout + done.stderr


def test_a_failed_collective_names_the_rank_whose_process_ended():
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    here = socket.gethostname()
    members = [(here, os.getpid()), (here, int(ended.stdout))]
    group = PathGroup(rank=0, world_size=2, members=members)
    with pytest.raises(RankLostError, match=r"rank 1 \(pid \d+\) is gone") as caught:
        with group.naming_the_lost("adding up across the ranks"):
            raise RuntimeError("Connection reset by peer")
    assert isinstance(caught.value.__cause__, RuntimeError)
    # Nobody gone and no sign of a lost connection: the error as it was.
    alive = PathGroup(rank=0, world_size=2, members=[(here, os.getpid())] * 2)
    with pytest.raises(RuntimeError, match=r"^sizes differ$"):
        with alive.naming_the_lost("adding up"):
            raise RuntimeError("sizes differ")
    with pytest.raises(RankLostError, match="another rank stopped answering"):
        with alive.naming_the_lost("adding up"):
            raise RuntimeError("Timed out waiting 300000ms")
    away = PathGroup(rank=0, world_size=3, members=[(here, os.getpid()), ("b", 1), ("b", 2)])
    with pytest.raises(RankLostError, match=r"another host stopped answering \(ranks 1 and 2\)"):
        with away.naming_the_lost("adding up"):
            raise RuntimeError("Connection closed by peer")


@pytest.mark.parametrize(
    "params", [{"curve": "chain"}, {"curve": "bezier", "distributed": True}], ids=str
)
def test_gather_false_is_refused_where_no_chain_is_split(params):
    # Only a distributed chain's points are split; elsewhere it would mean nothing.
    geo = GeodesicConnector(
        n_points=5, max_iter=1, device="cpu", random_state=0, gather=False, **params
    )
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(
        ValueError, match=r"gather=False .* needs distributed=True and curve='chain'"
    ):
        geo.fit(torch.randn(16, 4), model_a=a, model_b=b)
    assert not hasattr(geo, "path_")


def test_a_shard_outside_its_process_group_refuses_to_be_scored():
    # A shard is scored by every rank of its fit together; alone, it says how to load.
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    line = GeodesicConnector(curve="chain", n_points=7, max_iter=1, device="cpu")
    with pytest.warns(Warning):
        line.fit(X, model_a=a, model_b=b)
    line.path_ = PathGroup(rank=1, world_size=2).keep_block(line.path_)
    with pytest.raises(ValueError, match=r"rank 1's shard .* \(here: no process group\)"):
        line.score(X, y)
    with pytest.raises(ValueError, match="Cannot evaluate this path: it is rank 1's shard"):
        line.evaluate(X, y)
    with pytest.raises(ValueError, match="Cannot predict with this path"):
        line.predict_proba(X)
