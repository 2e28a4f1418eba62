"""Saved paths: round trips, exports, pickling, the refusal of bad files, `geoconnect info`."""

from __future__ import annotations

import ast
import copy
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from zoo import build, build_pair, kinds

import geoconnect
from geoconnect import GeodesicConnector, LinearConnector, ModelPath
from geoconnect.cli import main
from geoconnect.distributed import PathGroup
from geoconnect.evaluation import euclidean_length
from geoconnect.persistence import describe_architecture, file_info, format_info, read_file

PACKAGE = Path(geoconnect.__file__).parent


class Tied(nn.Module):
    """An autoencoder-like net whose decoder reuses the encoder's weight."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.encode = nn.Linear(4, 4, bias=False)
        self.decode = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.encode.weight.copy_(torch.randn(4, 4, generator=generator))
        self.decode.weight = self.encode.weight

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x)))


def fitted_path(kind: str, *, align: str | None = None, strategy: str = "auto") -> tuple:
    """A short geodesic fit between two zoo models: (path, X, model class builder)."""
    a, b, X = build_pair(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geo = GeodesicConnector(
            n_points=5, max_iter=2, device="cpu", random_state=0, align=align, strategy=strategy
        ).fit(X, model_a=a, model_b=b)
    return geo.path_, X


def same_logits(path: ModelPath, other: ModelPath, x: torch.Tensor) -> bool:
    return torch.equal(path.logits(x, strategy="loop"), other.logits(x, strategy="loop"))


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", kinds("batchnorm")[:3] + kinds(without=("batchnorm",))[:2])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_saved_path_loads_with_the_same_logits_at_every_point(tmp_path, kind, strategy):
    path, X = fitted_path(kind)
    path.strategy = strategy
    file = path.save(tmp_path / "path.safetensors")
    loaded = ModelPath.load(file, template=build(kind, seed=7))
    x = torch.as_tensor(X)
    assert loaded.strategy == strategy
    assert torch.equal(loaded.logits(x), path.logits(x))
    assert np.array_equal(loaded.t_, path.t_)
    assert loaded.frozen == path.frozen
    for name, stack in path.batchnorm_buffers.items():
        assert torch.equal(loaded.batchnorm_buffers[name], stack)
    for i in range(len(path)):  # every point, as a module
        assert torch.equal(loaded[i](x), path[i](x))


def test_the_round_trip_keeps_the_alignment_and_the_fit_record(tmp_path):
    path, X = fitted_path("image-cnn-batchnorm", align="weight_matching")
    assert path.alignment, "weight matching found permutations"
    file = path.save(tmp_path / "aligned.safetensors", metadata={"run": 3})
    loaded = ModelPath.load(file, template=build("image-cnn-batchnorm"))
    assert loaded.alignment.keys() == path.alignment.keys()
    for group, perm in path.alignment.items():
        assert torch.equal(loaded.alignment[group], perm)
    assert loaded.metadata["run"] == 3
    assert loaded.metadata["divergence"] == "jsd"
    assert loaded.metadata["length"] == pytest.approx(path.metadata["length"])
    assert "run" not in path.metadata  # save's metadata goes to the file only
    assert same_logits(loaded, path, torch.as_tensor(X))


def test_tied_weights_survive_a_round_trip(tmp_path):
    path = ModelPath.linear(Tied(1), Tied(2), 5)
    loaded = ModelPath.load(path.save(tmp_path / "tied.safetensors"), template=Tied(3))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.logits(x), path.logits(x))
    module = loaded[2]
    assert module.decode.weight is module.encode.weight


def test_shared_buffers_come_from_the_file_not_the_template(tmp_path):
    a, b, X = build_pair("tabular-residual-integer-buffer")
    path = ModelPath.linear(a, b, 4)
    template = build("tabular-residual-integer-buffer", seed=5)  # other buffer values
    differs = [
        name
        for name, value in template.named_buffers()
        if not torch.equal(value, dict(a.named_buffers())[name])
    ]
    assert differs, "the template's buffers differ from model_a's"
    loaded = ModelPath.load(path.save(tmp_path / "p.safetensors"), template=template)
    assert same_logits(loaded, path, torch.as_tensor(X))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_points=st.integers(2, 9),
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_law_load_inverts_save_for_any_mlp(tmp_path, n_points, sizes, dtype, seed):
    def mlp(s):
        torch.manual_seed(s)
        layers = [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:])]
        return nn.Sequential(*layers).to(dtype)

    with torch.random.fork_rng():
        path = ModelPath.linear(mlp(seed), mlp(seed + 1), n_points)
        path.t_ = np.sort(np.random.default_rng(seed).random(n_points))
        loaded = ModelPath.load(path.save(tmp_path / "law.safetensors"), template=mlp(0))
    assert torch.equal(loaded.parameters_vector(), path.parameters_vector())
    assert loaded.parameters_vector().dtype == dtype
    assert np.array_equal(loaded.t_, path.t_)


def test_load_places_the_path_on_the_device_asked_for(tmp_path):
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 4)
    file = path.save(tmp_path / "p.safetensors")
    loaded = ModelPath.load(file, template=nn.Linear(3, 2), device="cpu")
    assert loaded.device.type == "cpu"
    assert loaded.template.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_path_saved_on_the_cpu_evaluates_identically_on_cuda(tmp_path):
    path, X = fitted_path("tabular-mlp")
    file = path.save(tmp_path / "p.safetensors")
    on_gpu = ModelPath.load(file, template=build("tabular-mlp"), device="cuda")
    x = torch.as_tensor(X)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.logits(x.cuda()).cpu(), path.logits(x))
    back = ModelPath.load(on_gpu.save(tmp_path / "q.safetensors"), template=build("tabular-mlp"))
    assert torch.equal(back.parameters_vector(), path.parameters_vector())


# -- the template check ---------------------------------------------------------------------


class Wider(nn.Module):
    def __init__(self, hidden: int = 8, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.hidden = nn.Linear(4, hidden)
        self.act = activation()
        self.out = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.out(self.act(self.hidden(x)))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (Wider(16), r"parameter 'hidden.weight' has shape \(8, 4\) in the file and \(16, 4\)"),
        (Wider(8).double(), r"'hidden.weight' is float32 in the file and float64 .*torch.float32"),
        (Wider(8, nn.Tanh), r"module 'act' is a torch.nn.modules.activation.ReLU in the file"),
        (nn.Linear(4, 3), r"the file's parameter 'hidden.weight' is, in the template, 'weight'"),
    ],
)
def test_a_template_of_another_architecture_is_refused_naming_the_first_difference(
    tmp_path, template, message
):
    file = ModelPath.linear(Wider(), Wider(), 3).save(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=message) as info:
        ModelPath.load(file, template=template)
    assert "w.safetensors" in str(info.value)


def test_a_template_that_is_not_a_module_is_a_type_error(tmp_path):
    file = ModelPath.linear(Wider(), Wider(), 3).save(tmp_path / "w.safetensors")
    with pytest.raises(TypeError, match=r"template must be an nn.Module"):
        ModelPath.load(file, template=Wider().state_dict())


def test_the_fingerprint_depends_on_the_architecture_not_the_values():
    assert (
        describe_architecture(Wider())["fingerprint"]
        == (describe_architecture(Wider())["fingerprint"])
    )
    assert (
        describe_architecture(Wider())["fingerprint"]
        != (describe_architecture(Wider(9))["fingerprint"])
    )


# -- bad files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small BatchNorm path's file and its bytes."""
    a, b, _ = build_pair("tabular-batchnorm1d-dropout")
    path = ModelPath.linear(a, b, 3)
    file = path.save(tmp_path_factory.mktemp("saved") / "p.safetensors", metadata={"n": 1})
    return path, file.read_bytes()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_law_a_truncated_file_is_refused_naming_it(tmp_path, saved, data):
    _, content = saved
    cut = data.draw(st.integers(0, len(content) - 1), label="cut")
    file = tmp_path / "cut.safetensors"
    file.write_bytes(content[:cut])
    with pytest.raises(ValueError, match=r"cut.safetensors"):
        ModelPath.load(file, template=build("tabular-batchnorm1d-dropout"))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_law_a_changed_byte_is_refused_or_changes_nothing(tmp_path, saved, data):
    """Any one byte altered: the load fails naming the file, or gives the saved path."""
    path, content = saved
    offset = data.draw(st.integers(0, len(content) - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    altered = bytearray(content)
    altered[offset] ^= flip
    file = tmp_path / "altered.safetensors"
    file.write_bytes(bytes(altered))
    try:
        loaded = ModelPath.load(file, template=build("tabular-batchnorm1d-dropout"))
    except ValueError as exc:
        assert "altered.safetensors" in str(exc)
        return
    # Only bytes that do not carry content can change unnoticed (the header's padding).
    assert torch.equal(loaded.parameters_vector(), path.parameters_vector())
    for name, stack in path.batchnorm_buffers.items():
        assert torch.equal(loaded.batchnorm_buffers[name], stack)
    assert loaded.metadata == {"n": 1} and np.array_equal(loaded.t_, path.t_)


def test_files_of_other_formats_are_refused_with_what_they_are(tmp_path):
    template = build("tabular-mlp")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt is not a readable safetensors file"):
        ModelPath.load(text, template=template)
    pickled = tmp_path / "model.pt"
    torch.save(template.state_dict(), pickled)
    with pytest.raises(ValueError, match=r"model.pt is not a readable safetensors file"):
        ModelPath.load(pickled, template=template)
    weights = tmp_path / "weights.safetensors"
    save_file(dict(template.state_dict()), str(weights))
    with pytest.raises(ValueError, match=r"not one geoconnect wrote .*load_file"):
        ModelPath.load(weights, template=template)
    with pytest.raises(FileNotFoundError, match="No such file"):
        ModelPath.load(tmp_path / "missing.safetensors", template=template)


def test_save_refuses_metadata_that_is_not_json(tmp_path):
    path = ModelPath.linear(nn.Linear(2, 2), nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        path.save(tmp_path / "p.safetensors", metadata={"model": nn.Linear(2, 2)})
    assert not list(tmp_path.iterdir()), "nothing written, no temporary file left"


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path):
    path = ModelPath.linear(nn.Linear(2, 2), nn.Linear(2, 2), 3)
    file = path.save(tmp_path / "p.safetensors")
    before = file.read_bytes()
    with pytest.raises(TypeError):
        path.save(file, metadata={"bad": object()})
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_save_into_a_missing_directory_is_a_clear_os_error(tmp_path):
    path = ModelPath.linear(nn.Linear(2, 2), nn.Linear(2, 2), 3)
    with pytest.raises(OSError, match=r"Could not write .*missing"):
        path.save(tmp_path / "missing" / "p.safetensors")


def test_the_package_never_unpickles():
    """No pickle.load(s) and no torch.load without weights_only=True in geoconnect."""
    found = []
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names]
                module = getattr(node, "module", None) or ""
                if "pickle" in names or module.startswith("pickle") or "dill" in names:
                    found.append(f"{source.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    safe = any(
                        k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    if not safe:
                        found.append(f"{source.name}:{node.lineno} torch.load")
    assert not found, found


# -- export -----------------------------------------------------------------------------------


def test_export_gives_a_module_whose_state_dict_loads_into_the_users_class(digits_pair):
    a, b = digits_pair.copies()
    geo = LinearConnector(n_points=5, device="cpu").fit(digits_pair.X, model_a=a, model_b=b)
    from geoconnect.models import make_mlp

    x = torch.as_tensor(digits_pair.X_test[:32])
    for point in (0, 2, -1, 0.25, 0.5, 1.0):
        exported = geo.path_.export(point)
        mine = make_mlp(seed=99)
        mine.load_state_dict(exported.state_dict())
        mine.eval()
        assert torch.equal(mine(x), exported(x))
    assert torch.equal(geo.path_.export(2)(x), geo.path_.logits(x)[2])
    assert torch.equal(geo.path_.export(-1)(x), b(x))


def test_an_export_shares_nothing_with_the_path():
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 3)
    before = path.parameters_vector().clone()
    exported = path.export(1)
    with torch.no_grad():
        exported.weight.add_(1.0)
    assert torch.equal(path.parameters_vector(), before)
    assert all(p.requires_grad for p in exported.parameters())  # ready to fine-tune
    assert not exported.training


def test_exporting_between_batchnorm_points_needs_X_and_recomputes_statistics():
    a, b, X = build_pair("image-cnn-batchnorm")
    path = ModelPath.linear(a, b, 3)
    with pytest.raises(ValueError, match="Pass X to recompute them"):
        path.export(0.25)
    module = path.export(0.25, X)
    stats = [m.running_mean for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert stats and not torch.equal(stats[0], path.batchnorm_buffers["1.running_mean"][0])


@pytest.mark.parametrize("point", [True, "0.5", None, [1]])
def test_export_refuses_what_is_neither_an_index_nor_a_position(point):
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 3)
    with pytest.raises(TypeError, match=r"point must be an int .* or a float"):
        path.export(point)


# -- pickling ------------------------------------------------------------------------------


def test_a_pickled_connector_predicts_the_same_and_holds_cpu_tensors(small_pair):
    a, b = small_pair.copies()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geo = GeodesicConnector(curve="chain", n_points=5, max_iter=3, device="cpu", random_state=0)
        geo.fit(small_pair.X, model_a=a, model_b=b)
    state = geo.__getstate__()  # the chain keeps its optimiser's moments for warm_start
    tensors = [v for v in state["_fit_moments"].values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    path_state = state["path_"].__getstate__()
    assert all(v.device.type == "cpu" for v in path_state["params"].values())
    again = pickle.loads(pickle.dumps(geo))
    np.testing.assert_array_equal(
        again.predict_proba(small_pair.X), geo.predict_proba(small_pair.X)
    )
    assert again.history_ == geo.history_


def test_getstate_does_not_move_the_estimators_own_path(small_pair):
    a, b = small_pair.copies()
    geo = LinearConnector(n_points=3, device="cpu").fit(small_pair.X, model_a=a, model_b=b)
    params = geo.path_.params
    geo.__getstate__()
    assert geo.path_.params is params
    twin = copy.deepcopy(geo)
    assert twin.path_ is not geo.path_
    assert torch.equal(twin.path_.parameters_vector(), geo.path_.parameters_vector())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_connector_fitted_on_cuda_unpickles_on_the_cpu(small_pair):
    a, b = small_pair.copies()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geo = GeodesicConnector(n_points=5, max_iter=3, device="cuda", random_state=0)
        geo.fit(small_pair.X, model_a=a, model_b=b)
    again = pickle.loads(pickle.dumps(geo))
    assert again.path_.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in again._fit_moments.values())
    np.testing.assert_allclose(
        again.predict_proba(small_pair.X), geo.predict_proba(small_pair.X), atol=1e-5
    )
    assert copy.deepcopy(geo).path_.device.type == "cuda"


# -- geoconnect info -----------------------------------------------------------------------


def test_info_summarises_a_saved_path_without_the_model_class(tmp_path, capsys):
    path, _ = fitted_path("image-cnn-batchnorm", align="weight_matching")
    file = path.save(tmp_path / "p.safetensors", metadata={"dataset": "noise"})
    assert main(["info", str(file)]) == 0
    out = capsys.readouterr().out
    assert "digest verified" in out
    assert describe_architecture(path.template)["fingerprint"] in out
    assert f"points        5 of {path.n_params} parameters each" in out
    assert "divergence    jsd" in out and "Fisher-Rao" in out
    assert "aligned       yes" in out and "dataset: noise" in out


def test_info_json_is_the_whole_record(tmp_path, capsys):
    path = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 4)
    file = path.save(tmp_path / "p.safetensors")
    assert main(["info", "--json", str(file)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_points"] == 4 and record["kind"] == "path"
    assert record["euclidean_length"] == pytest.approx(file_info(file)["euclidean_length"])
    from geoconnect.evaluation import euclidean_length

    assert record["euclidean_length"] == pytest.approx(euclidean_length(path))


def test_info_on_a_bad_file_says_why_and_fails(tmp_path, capsys):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(b"\x00" * 12)
    assert main(["info", str(file)]) == 1
    assert "bad.safetensors is not a readable safetensors file" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "none.safetensors")]) == 1


def test_read_file_checks_the_kind(tmp_path):
    file = ModelPath.linear(nn.Linear(3, 2), nn.Linear(3, 2), 4).save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="is a geoconnect path file, not a checkpoint file"):
        read_file(file, "checkpoint")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_path_saved_in_shards_loads_as_the_whole_path(tmp_path, world_size):
    # Each rank's shard writes its own file, rank 0 the index (Hugging Face's layout).
    pair = random_pair((4, 8, 3), n_samples=32, seed=5)
    for model in (pair.model_a, pair.model_b):  # per-point BatchNorm statistics too
        model.insert(1, nn.BatchNorm1d(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two epochs do not converge
        whole = (
            GeodesicConnector(curve="chain", n_points=7, max_iter=2, device="cpu")
            .fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
            .path_
        )
    assert whole.batchnorm_buffers
    for rank in reversed(range(world_size)):  # rank 0, which writes the index, last
        shard = PathGroup(rank=rank, world_size=world_size).keep_block(whole)
        index = shard.save(tmp_path / "path.safetensors", metadata={"run": 3})
    assert index == tmp_path / "path.safetensors.index.json"
    assert sorted(p.name for p in tmp_path.glob("path-*")) == [
        f"path-{r + 1:05d}-of-{world_size:05d}.safetensors" for r in range(world_size)
    ]
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(weight_map) == 7 and weight_map["points/0"].startswith("path-00001")
    for name in (index, tmp_path / "path.safetensors"):  # the index, or the saved name
        loaded = ModelPath.load(name, template=pair.model_a)
        assert torch.equal(loaded.parameters_vector(), whole.parameters_vector())
        np.testing.assert_array_equal(loaded.t_, whole.t_)
        assert loaded.shard is None and loaded.metadata["run"] == 3
        for key, value in whole.batchnorm_buffers.items():
            assert torch.equal(loaded.batchnorm_buffers[key], value)
    info = file_info(index)
    assert info["n_points"] == 7 and len(info["shards"]) == world_size
    assert info["euclidean_length"] == pytest.approx(euclidean_length(whole), rel=1e-12)
    assert f"shards        {world_size}:" in format_info(info)


def test_a_shard_missing_or_of_another_path_is_named(tmp_path):
    pair = random_pair((4, 8, 3), n_samples=32, seed=5)
    whole = ModelPath.linear(pair.model_a, pair.model_b, 7)
    for rank in (1, 0):
        index = (
            PathGroup(rank=rank, world_size=2).keep_block(whole).save(tmp_path / "p.safetensors")
        )
    other = ModelPath.linear(pair.model_a, pair.model_b, 9)
    PathGroup(rank=1, world_size=2).keep_block(other).save(tmp_path / "q.safetensors")
    (tmp_path / "q-00002-of-00002.safetensors").replace(tmp_path / "p-00002-of-00002.safetensors")
    with pytest.raises(
        ValueError, match=r"p-00002-of-00002\.safetensors is not a shard of the 7-point"
    ):
        ModelPath.load(index, template=pair.model_a)
    wider = random_pair((4, 9, 3), n_samples=32, seed=5)
    other = ModelPath.linear(wider.model_a, wider.model_b, 7)
    PathGroup(rank=1, world_size=2).keep_block(other).save(tmp_path / "r.safetensors")
    (tmp_path / "r-00002-of-00002.safetensors").replace(tmp_path / "p-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"p-00002-of-00002\.safetensors is a shard of another"):
        ModelPath.load(index, template=pair.model_a)
    (tmp_path / "p-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="p-00002-of-00002"):
        ModelPath.load(index, template=pair.model_a)
    (tmp_path / "notes.index.json").write_text("{}")
    with pytest.raises(ValueError, match="not the index of a path saved in shards"):
        ModelPath.load(tmp_path / "notes.index.json", template=pair.model_a)
