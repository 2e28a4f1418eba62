"""Checkpoints: a fit killed at any epoch resumes to the uninterrupted fit's path, bitwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset
from zoo import build_pair

import geoconnect.fitting as fitting
from geoconnect import GeodesicConnector, ModelPath
from geoconnect._data import as_data
from geoconnect.checkpoint import Checkpoint
from geoconnect.divergences import jensen_shannon
from geoconnect.fitting import FitSettings, fit_path
from geoconnect.persistence import file_info, read_file

FILE = Checkpoint.FILENAME


class Crash(Exception):
    """Stands for the process dying: raised in place of an epoch."""


def fit(pair_or_models, X, checkpoint=None, *, crash_after=None, monkeypatch=None, **params):
    """A quiet geodesic fit; ``crash_after`` epochs of it, then Crash."""
    model_a, model_b = pair_or_models
    params = {
        **{"curve": "chain", "n_points": 9, "max_iter": 24, "device": "cpu", "random_state": 0},
        **params,
    }
    if crash_after is not None:
        run_epoch, calls = fitting._run_epoch, []

        def dying(state, bar):
            if len(calls) == crash_after:
                raise Crash
            calls.append(1)
            return run_epoch(state, bar)

        monkeypatch.setattr(fitting, "_run_epoch", dying)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GeodesicConnector(checkpoint=checkpoint, **params).fit(
                X, model_a=model_a, model_b=model_b
            )
    finally:
        if crash_after is not None:
            monkeypatch.undo()


def identical(a: GeodesicConnector, b: GeodesicConnector) -> bool:
    same_path = torch.equal(a.path_.parameters_vector(), b.path_.parameters_vector())
    same_bn = all(
        torch.equal(v, b.path_.batchnorm_buffers[k]) for k, v in a.path_.batchnorm_buffers.items()
    )
    return same_path and same_bn and a.history_["energy"] == b.history_["energy"]


@pytest.fixture(scope="module")
def mlp_pair(digits_pair):
    return digits_pair.copies(), digits_pair.X


@pytest.fixture(scope="module")
def reference(mlp_pair):
    models, X = mlp_pair
    return fit(models, X)


# -- resuming ---------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(crash_after=st.integers(0, 23))
def test_law_a_fit_that_dies_after_any_epoch_resumes_to_the_same_path(
    tmp_path_factory, monkeypatch, mlp_pair, reference, crash_after
):
    """The schedule's levels 4 → 7 → 9 points are crossed: levels 0–1 end at epochs 4, 6."""
    models, X = mlp_pair
    directory = tmp_path_factory.mktemp("ckpt")
    with pytest.raises(Crash):
        fit(models, X, directory, crash_after=crash_after, monkeypatch=monkeypatch)
    if crash_after:
        saved = file_info(directory / FILE)["state"]
        assert len(saved["history"]["energy"]) == crash_after
    resumed = fit(models, X, directory)
    assert identical(resumed, reference)
    assert resumed.n_iter_ == reference.n_iter_


def test_a_fit_that_stopped_early_resumes_to_the_same_stop(tmp_path, monkeypatch, mlp_pair):
    models, X = mlp_pair
    params = {"max_iter": 200, "tol": 0.05, "n_iter_no_change": 3}
    uninterrupted = fit(models, X, **params)
    assert uninterrupted.n_iter_ < 200, "early stopping ended it"
    with pytest.raises(Crash):
        fit(models, X, tmp_path, crash_after=uninterrupted.n_iter_ - 1, monkeypatch=monkeypatch,
            **params)  # fmt: skip
    assert identical(fit(models, X, tmp_path, **params), uninterrupted)
    # The last checkpoint is the stop: a refit resumes at the end and runs no epoch.
    with pytest.raises(Crash):  # there is no epoch for it to die in
        fit(models, X, tmp_path, crash_after=0, monkeypatch=monkeypatch, **params)
        raise Crash
    again = fit(models, X, tmp_path, **params)
    assert identical(again, uninterrupted)


@pytest.mark.parametrize("kind", ["image-resnet-batchnorm", "tabular-residual-integer-buffer"])
def test_resuming_is_exact_for_batchnorm_and_buffers(tmp_path, monkeypatch, kind):
    a, b, X = build_pair(kind)
    params = {"n_points": 6, "max_iter": 8, "batch_size": 8}
    uninterrupted = fit((a, b), X, **params)
    with pytest.raises(Crash):
        fit((a, b), X, tmp_path, crash_after=5, monkeypatch=monkeypatch, **params)
    assert identical(fit((a, b), X, tmp_path, **params), uninterrupted)


def test_resuming_is_exact_for_a_shuffling_dataloader(tmp_path, monkeypatch, small_pair):
    """A DataLoader draws its order from torch's global generator, which is restored."""
    loader = DataLoader(TensorDataset(torch.as_tensor(small_pair.X)), batch_size=8, shuffle=True)
    params = {"n_points": 5, "max_iter": 10, "coarse_to_fine": False}
    uninterrupted = fit(small_pair.copies(), loader, **params)
    with pytest.raises(Crash):
        fit(small_pair.copies(), loader, tmp_path, crash_after=4, monkeypatch=monkeypatch,
            **params)  # fmt: skip
    assert identical(fit(small_pair.copies(), loader, tmp_path, **params), uninterrupted)


def test_verbose_and_device_may_change_between_a_fit_and_its_resumption(
    tmp_path, monkeypatch, mlp_pair, reference, capsys
):
    models, X = mlp_pair
    with pytest.raises(Crash):
        fit(models, X, tmp_path, crash_after=10, monkeypatch=monkeypatch)
    resumed = fit(models, X, str(tmp_path), verbose=2)
    assert identical(resumed, reference)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == reference.n_iter_ - 10  # only the epochs it ran


# -- the SIGKILL test -------------------------------------------------------------------------

CHILD = """
import sys, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
from geoconnect import GeodesicConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier
split = load_digits_split()
a = train_classifier(make_mlp(seed=1), split.X_train, split.y_train, epochs=5, seed=1)
b = train_classifier(make_mlp(seed=2), split.X_train, split.y_train, epochs=5, seed=2)
X = split.X_train.repeat(4, axis=0)  # slower epochs: the kill lands mid-fit
checkpoint = sys.argv[1] if sys.argv[1] != "-" else None
geo = GeodesicConnector(curve="chain", n_points=9, max_iter=40, tol=0.0, device="cpu",
                        random_state=0, checkpoint=checkpoint, verbose=2)
geo.fit(X, model_a=a, model_b=b)
geo.path_.save(sys.argv[2])
"""


def run_child(checkpoint: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, checkpoint, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def test_a_fit_killed_with_sigkill_resumes_to_the_uninterrupted_path(tmp_path):
    directory = tmp_path / "ckpt"
    child = run_child(str(directory), tmp_path / "never.safetensors")
    for line in child.stdout:  # type: ignore[union-attr]
        if line.startswith("epoch") and int(line.split()[1]) >= 7:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    killed_at = len(read_file(directory / FILE, "checkpoint")[1]["state"]["history"]["energy"])
    # The epoch's line is printed before its checkpoint is written: 6 or 7 are saved.
    assert 6 <= killed_at < 40, "the kill landed mid-fit"
    resumed = run_child(str(directory), tmp_path / "resumed.safetensors")
    uninterrupted = run_child("-", tmp_path / "uninterrupted.safetensors")
    for process in (resumed, uninterrupted):
        process.communicate(timeout=300)
        assert process.returncode == 0
    from geoconnect.models import make_mlp

    one = ModelPath.load(tmp_path / "resumed.safetensors", template=make_mlp())
    two = ModelPath.load(tmp_path / "uninterrupted.safetensors", template=make_mlp())
    assert torch.equal(one.parameters_vector(), two.parameters_vector())
    assert np.array_equal(one.t_, two.t_)


# -- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def other_fit_checkpoint(tmp_path, monkeypatch, small_pair):
    with pytest.raises(Crash):
        fit(small_pair.copies(), small_pair.X, tmp_path, crash_after=3, monkeypatch=monkeypatch,
            n_points=5)  # fmt: skip
    return tmp_path, (tmp_path / FILE).read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_points": 7}, "parameter n_points is 5 there and 7 now"),
        ({"learning_rate_init": 0.1}, "parameter learning_rate_init is auto there and 0.1 now"),
        ({"random_state": 1}, "parameter random_state is 0 there and 1 now"),
        ({"models": True}, r"model_a or model_b \(the path's ends\) differs"),
        ({"X": True}, "X differs"),
    ],
)
def test_a_checkpoint_of_another_fit_is_refused_and_kept(
    other_fit_checkpoint, small_pair, change, message
):
    directory, before = other_fit_checkpoint
    models, X, params = small_pair.copies(), small_pair.X, {"n_points": 5}
    if change.pop("models", False):
        models = (models[1], models[0])
    if change.pop("X", False):
        X = X + 1.0
    params.update(change)
    with pytest.raises(ValueError, match=message) as info:
        fit(models, X, directory, **params)
    assert "delete" in str(info.value) and FILE in str(info.value)
    assert (directory / FILE).read_bytes() == before, "never overwritten"


def test_a_corrupted_checkpoint_is_refused_and_kept(other_fit_checkpoint, small_pair):
    directory, before = other_fit_checkpoint
    (directory / FILE).write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match=r"not a readable safetensors file.*delete"):
        fit(small_pair.copies(), small_pair.X, directory, n_points=5)
    assert (directory / FILE).read_bytes() == before[: len(before) // 2]


def test_a_saved_path_in_place_of_the_checkpoint_is_refused(tmp_path, small_pair):
    a, b = small_pair.copies()
    ModelPath.linear(a, b, 5).save(tmp_path / FILE)
    with pytest.raises(ValueError, match="is a geoconnect path file, not a checkpoint file"):
        fit((a, b), small_pair.X, tmp_path, n_points=5)


def test_a_checkpoint_that_is_a_file_is_refused_before_any_work(tmp_path, small_pair):
    target = tmp_path / "taken"
    target.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        fit(small_pair.copies(), small_pair.X, target)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_checkpoint_directory_that_is_not_writable_is_refused(tmp_path, small_pair):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"cannot be used.*Permission denied"):
            fit(small_pair.copies(), small_pair.X, locked)
    finally:
        locked.chmod(0o700)


def test_a_checkpoint_that_is_not_a_path_is_refused(small_pair):
    with pytest.raises(ValueError, match="'checkpoint' parameter"):
        fit(small_pair.copies(), small_pair.X, 3)


def test_a_failed_fit_with_a_checkpoint_leaves_the_estimator_as_it_was(tmp_path, small_pair):
    geo = fit(small_pair.copies(), small_pair.X, tmp_path / "a", n_points=5)
    path = geo.path_
    geo.set_params(n_points=7)
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "b").write_text("")
        geo.set_params(checkpoint=tmp_path / "b").fit(
            small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b
        )
    assert geo.path_ is path


def test_the_checkpoint_is_written_atomically(tmp_path, monkeypatch, small_pair):
    """Every epoch replaces the file whole: no temporary file is left, each one reads."""
    seen = []
    write = Checkpoint.write

    def spy(self, tensors, state):
        write(self, tensors, state)
        seen.append(len(read_file(self.file, "checkpoint")[1]["state"]["history"]["energy"]))
        assert [p.name for p in self.directory.iterdir()] == [FILE]

    monkeypatch.setattr(Checkpoint, "write", spy)
    geo = fit(small_pair.copies(), small_pair.X, tmp_path, n_points=5, max_iter=6)
    assert seen == list(range(1, geo.n_iter_ + 1))


# -- warm start keeps the moments ---------------------------------------------------------------


def test_a_warm_start_continues_adams_moments(small_pair):
    """Two fits of 4 epochs continuing one generator = one fit of 8, bitwise."""
    a, b = small_pair.copies()
    data = as_data(small_pair.X, device=torch.device("cpu"))
    options = {"coarse_to_fine": False, "tol": 0.0}

    def run(epochs, path, previous, generator):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit_path(
                path, data, jensen_shannon, FitSettings(max_iter=epochs, **options), previous,
                generator,
            )  # fmt: skip

    whole = ModelPath.linear(a, b, 6)
    run(8, whole, None, torch.Generator().manual_seed(0))
    halves, generator = ModelPath.linear(a, b, 6), torch.Generator().manual_seed(0)
    first = run(4, halves, None, generator)
    assert first.moments, "the fit hands its moments on"
    run(4, halves, first, generator)
    assert torch.equal(halves.parameters_vector(), whole.parameters_vector())
    fresh = ModelPath.linear(a, b, 6)
    generator = torch.Generator().manual_seed(0)
    run(4, fresh, None, generator)
    run(4, fresh, None, generator)  # the same, with new moments
    assert not torch.equal(fresh.parameters_vector(), whole.parameters_vector())


def test_the_connectors_warm_start_passes_its_moments_on(small_pair, monkeypatch):
    loaded = []
    original = fitting._load_moments
    monkeypatch.setattr(fitting, "_load_moments", lambda *args: loaded.append(1) or original(*args))
    geo = fit(small_pair.copies(), small_pair.X, n_points=5, max_iter=3, warm_start=True)
    assert not loaded
    geo.fit(small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert loaded == [1]


def test_info_summarises_a_checkpoint(tmp_path, small_pair, capsys):
    from geoconnect.cli import main

    fit(small_pair.copies(), small_pair.X, tmp_path, n_points=5, max_iter=6)
    assert main(["info", str(tmp_path / FILE)]) == 0
    out = capsys.readouterr().out
    assert "kind          checkpoint" in out and "epochs        6 complete" in out


# -- the continuous geodesic ------------------------------------------------------------------


def _curve_fit(models, X, checkpoint, *, crash_after=None, monkeypatch=None, **params):
    """A Bezier geodesic's fit; ``crash_after`` epochs of it, then Crash."""
    import geoconnect.curves as curves

    if crash_after is not None:
        run, calls = curves._CurveEpoch.run, []

        def dying(self):
            if len(calls) == crash_after:
                raise Crash
            calls.append(1)
            return run(self)

        monkeypatch.setattr(curves._CurveEpoch, "run", dying)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GeodesicConnector(
                curve="bezier",
                n_points=7,
                max_iter=6,
                device="cpu",
                random_state=0,
                checkpoint=checkpoint,
                **params,
            ).fit(X, model_a=models[0], model_b=models[1])
    finally:
        if crash_after is not None:
            monkeypatch.undo()


@pytest.mark.parametrize("crash_after", [0, 2, 5])
def test_a_curve_fit_that_dies_resumes_to_the_same_curve(
    tmp_path, monkeypatch, mlp_pair, crash_after
):
    models, X = mlp_pair
    X = X[:400]
    reference = _curve_fit(models, X, tmp_path / "uninterrupted")
    with pytest.raises(Crash):
        _curve_fit(models, X, tmp_path / "ckpt", crash_after=crash_after, monkeypatch=monkeypatch)
    if crash_after:
        saved = file_info(tmp_path / "ckpt" / FILE)["state"]
        assert len(saved["history"]["energy"]) == crash_after
    resumed = _curve_fit(models, X, tmp_path / "ckpt")
    assert identical(resumed, reference)
    for name, stack in reference.curve_.control.params.items():
        assert torch.equal(resumed.curve_.control.params[name], stack)
    again = _curve_fit(models, X, tmp_path / "ckpt")  # a finished fit resumes at its end
    assert identical(again, reference) and again.n_iter_ == reference.n_iter_


def test_an_adaptive_curve_fit_resumes_at_its_divided_rate(tmp_path, monkeypatch, mlp_pair):
    # tol=0.5 and n_iter_no_change=1: the rate is divided after epochs 2 and 3 and the
    # fit stops after 4; killed after 3, the checkpoint carries the divisions made.
    models, X = mlp_pair
    X = X[:400]
    adaptive = {
        "learning_rate": "adaptive",
        "tol": 0.5,
        "n_iter_no_change": 1,
        "relative_step": False,  # the absolute 3e-3 whose plateaus the comment counts
    }
    reference = _curve_fit(models, X, tmp_path / "uninterrupted", **adaptive)
    assert reference.n_iter_ == 4
    with pytest.raises(Crash):
        _curve_fit(models, X, tmp_path / "ckpt", crash_after=3, monkeypatch=monkeypatch, **adaptive)
    assert file_info(tmp_path / "ckpt" / FILE)["state"]["cuts"] == 2
    resumed = _curve_fit(models, X, tmp_path / "ckpt", **adaptive)
    for name, stack in reference.curve_.control.params.items():
        assert torch.equal(resumed.curve_.control.params[name], stack)


def test_a_curve_checkpoint_is_refused_by_a_chain_fit(tmp_path, monkeypatch, mlp_pair):
    models, X = mlp_pair
    with pytest.raises(Crash):
        _curve_fit(models, X[:400], tmp_path, crash_after=2, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="parameter curve is bezier there and chain now"):
        fit(models, X[:400], tmp_path)
