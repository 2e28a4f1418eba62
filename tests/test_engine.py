"""The fitting engine's contract: a transaction, a budget, a deterministic strategy."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from geoconnect import GeodesicConnector, LinearConnector, fitting
from geoconnect.divergences import jensen_shannon
from geoconnect.fitting import coarse_to_fine_schedule
from geoconnect.models import load_digits_split, make_mobilenet, train_classifier


def geodesic(**params) -> GeodesicConnector:
    """The chain (this file tests its engine, fitting.py)."""
    return GeodesicConnector(
        **{"curve": "chain", "n_points": 5, "device": "cpu", "random_state": 0, **params}
    )


def fit(conn, pair, X=None):
    return conn.fit(pair.X if X is None else X, model_a=pair.model_a, model_b=pair.model_b)


# -- a fit is a transaction ---------------------------------------------------------


def fitted_state(conn) -> dict:
    return {
        "path": conn.path_,
        "params": conn.path_.parameters_vector().clone(),
        "history": {k: list(v) for k, v in conn.history_.items()},
        "n_iter": conn.n_iter_,
        "n_classes": conn.n_classes_,
        "n_features": conn.n_features_in_,
        "energy": conn.energy_,
        "strategy": conn.strategy_,
    }


def assert_unchanged(conn, before: dict, X) -> None:
    assert conn.path_ is before["path"]
    assert torch.equal(conn.path_.parameters_vector(), before["params"])
    assert conn.history_ == before["history"]
    assert conn.n_iter_ == before["n_iter"]
    assert conn.n_classes_ == before["n_classes"]
    assert conn.n_features_in_ == before["n_features"]
    assert conn.energy_ == before["energy"]
    assert conn.strategy_ == before["strategy"]


def test_a_refit_whose_divergence_fails_leaves_the_previous_fit_intact(small_pair):
    conn = fit(geodesic(max_iter=3), small_pair)
    before, transformed = fitted_state(conn), conn.transform(small_pair.X)

    def failing(p, q):
        raise RuntimeError("the divergence failed")

    conn.set_params(divergence=failing)
    with pytest.raises(RuntimeError, match="the divergence failed"):
        fit(conn, small_pair)
    assert_unchanged(conn, before, small_pair.X)
    np.testing.assert_array_equal(conn.transform(small_pair.X), transformed)


def test_a_refit_on_bad_data_keeps_n_features_in_and_the_path(small_pair):
    conn = fit(geodesic(max_iter=3), small_pair)
    before = fitted_state(conn)
    wider = np.hstack([small_pair.X, small_pair.X])  # 10 features for 5-input models
    with pytest.raises(ValueError, match="model_a cannot be applied to X"):
        fit(conn, small_pair, X=wider)
    assert_unchanged(conn, before, small_pair.X)


def test_a_fresh_estimator_whose_fit_fails_stays_unfitted(small_pair):
    conn = geodesic(max_iter=3)
    with pytest.raises(ValueError):
        fit(conn, small_pair, X=np.hstack([small_pair.X, small_pair.X]))
    fitted = [name for name in vars(conn) if name.endswith("_") and not name.startswith("_")]
    assert fitted == []


def test_a_failed_linear_refit_leaves_the_previous_fit_intact(small_pair):
    line = LinearConnector(n_points=5, device="cpu").fit(
        small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b
    )
    path, length = line.path_, line.length_
    with pytest.raises(ValueError):
        line.fit(small_pair.X[:, :3], model_a=small_pair.model_a, model_b=small_pair.model_b)
    assert line.path_ is path and line.length_ == length and line.n_features_in_ == 5


def test_warm_start_never_mutates_a_history_the_user_holds(small_pair):
    conn = fit(geodesic(max_iter=3, warm_start=True), small_pair)
    held = conn.history_
    copy = {k: list(v) for k, v in held.items()}
    fit(conn, small_pair)
    assert held == copy
    assert len(conn.history_["energy"]) == conn.n_iter_ > len(held["energy"])


@pytest.mark.parametrize("coarse_to_fine", [True, False])
def test_ctrl_c_keeps_the_learned_path_and_says_how_many_epochs_ran(small_pair, coarse_to_fine):
    calls = []

    def interrupting(p, q):  # the user presses Ctrl-C during the 4th epoch's step
        if p.requires_grad:  # a step's call (not the initial path's energy)
            calls.append(1)
            if len(calls) == 4 * 2:  # 40 samples in batches of 32: 2 steps an epoch
                raise KeyboardInterrupt
        return jensen_shannon(p, q)

    conn = geodesic(
        n_points=9, max_iter=20, batch_size=32, divergence=interrupting,
        coarse_to_fine=coarse_to_fine,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"after 3 complete epoch\(s\) \(n_iter_ = 3\)"):
        fit(conn, small_pair)
    assert conn.n_iter_ == len(conn.history_["energy"]) == 3
    assert len(conn.path_) == 9
    line = LinearConnector(n_points=9, device="cpu").fit(
        small_pair.X, model_a=small_pair.model_a, model_b=small_pair.model_b
    )
    assert not torch.equal(conn.path_.parameters_vector(), line.path_.parameters_vector())


# -- max_iter is the budget ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n_points=st.integers(2, 60), max_iter=st.integers(1, 300), coarse=st.booleans())
def test_the_levels_of_a_fit_spend_at_most_max_iter_epochs(n_points, max_iter, coarse):
    levels = coarse_to_fine_schedule(n_points, max_iter, coarse)
    assert sum(epochs for _, epochs in levels) == max_iter
    assert levels[-1][0] == n_points and levels[-1][1] >= 1
    sizes = [size for size, _ in levels]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_max_iter_1_runs_one_epoch_and_warns_that_it_did_not_converge(small_pair):
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        conn = fit(geodesic(n_points=25, max_iter=1), small_pair)
    assert conn.n_iter_ <= 1
    assert conn.history_["n_points"] == [25]


def test_a_fit_that_converges_does_not_warn(small_pair):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        conn = fit(geodesic(max_iter=200, tol=0.5, n_iter_no_change=1), small_pair)
    assert conn.n_iter_ < 200


# -- the energy rising: an unstable descent, or a plateau's wobble ---------------------


def fit_with_energies(pair, monkeypatch, energies: list[float]) -> list[str]:
    """A fit whose epochs record ``energies`` (the path does not move); its warnings."""
    scripted = iter(energies)

    def epoch(state, bar):
        energy = next(scripted)
        fitting._record_epoch(state, energy, 0.0, 0.0, bar)
        return energy

    monkeypatch.setattr(fitting, "_run_epoch", epoch)
    conn = geodesic(max_iter=len(energies), tol=0.0, coarse_to_fine=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(conn, pair)
    assert conn.n_iter_ == len(energies)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_energy_climbing_back_to_where_the_level_began_warns_of_an_unstable_descent(
    small_pair, monkeypatch
):
    # three rises, to twice the lowest and most of the way back to the first epoch
    messages = fit_with_energies(small_pair, monkeypatch, [1.0, 0.5, 0.6, 0.8, 0.95])
    assert len(messages) == 1
    assert "rose for 3 epochs running (to 0.95 in epoch 5)" in messages[0]
    assert "Lower learning_rate_init (now 0.003)" in messages[0]


def test_a_descent_that_rises_from_its_first_epoch_warns(small_pair, monkeypatch):
    messages = fit_with_energies(small_pair, monkeypatch, [1.0, 1.2, 1.6, 2.0])
    assert len(messages) == 1 and "rose for 3 epochs running" in messages[0]


def test_a_wobble_near_convergence_is_not_called_unstable(small_pair, monkeypatch):
    # A digits MLP's default fit: 0.024 down to 0.0044, then up seven epochs running to
    # 0.0068 (1.5x the lowest, an eighth of the way back) with no barrier left.
    energies = [0.024, 0.012, 0.007, 0.0044, 0.0046, 0.0048, 0.0051, 0.0053, 0.0054]
    messages = fit_with_energies(small_pair, monkeypatch, [*energies, 0.0056, 0.0068, 0.0054])
    assert messages == []


@pytest.mark.parametrize("max_iter", [2, 8, 30])
def test_n_iter_never_exceeds_max_iter_with_coarse_to_fine(small_pair, max_iter):
    conn = fit(geodesic(n_points=25, max_iter=max_iter, tol=0.0), small_pair)
    assert conn.n_iter_ <= max_iter
    assert conn.history_["n_points"][-1] == 25


# -- the strategy is a value ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_pinned_strategy_is_used_and_recorded(small_pair, strategy):
    conn = fit(geodesic(max_iter=2, strategy=strategy), small_pair)
    assert conn.strategy_ == conn.path_.strategy == strategy


def test_both_strategies_fit_the_same_path_to_rounding(small_pair):
    loop = fit(geodesic(max_iter=4, strategy="loop", tol=0.0), small_pair)
    vmap = fit(geodesic(max_iter=4, strategy="vmap", tol=0.0), small_pair)
    torch.testing.assert_close(
        loop.path_.parameters_vector(), vmap.path_.parameters_vector(), rtol=1e-4, atol=1e-5
    )


def test_mixed_precision_refuses_a_pinned_vmap(small_pair):
    with pytest.raises(ValueError, match="mixed_precision=True needs strategy='loop' or 'auto'"):
        fit(geodesic(mixed_precision=True, strategy="vmap"), small_pair)


_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, warnings
    import numpy as np, torch
    from torch import nn
    from geoconnect import GeodesicConnector

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    kind = sys.argv[1]

    def net(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if kind == "batchnorm":
                return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                     nn.Linear(16, 4))
            return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    X = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    conn = GeodesicConnector(curve="chain", n_points=11, max_iter=6, batch_size=64, device="cpu",
                             random_state=7)
    conn.fit(X, model_a=net(1).eval(), model_b=net(2).eval())
    digest = hashlib.sha256(conn.path_.parameters_vector().numpy().tobytes())
    for stack in conn.path_.batchnorm_buffers.values():
        digest.update(stack.numpy().tobytes())
    print(conn.strategy_, digest.hexdigest())
    """
)


@pytest.mark.parametrize("kind", ["dense", "batchnorm"])
def test_processes_run_at_once_with_one_random_state_fit_bitwise_identical_paths(tmp_path, kind):
    script = tmp_path / "fit.py"
    script.write_text(_SCRIPT)
    # Five at once on this machine's cores: the processes slow each other down, which
    # a timing-based choice of strategy would see.
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(5)
    ]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()
        outputs.append(out.decode().strip())
    assert len(set(outputs)) == 1, outputs
    assert outputs[0].split()[0] == ("loop" if kind == "batchnorm" else "vmap")
    assert len(hashlib.sha256().hexdigest()) == len(outputs[0].split()[1])


def test_a_diverging_fit_returns_the_path_it_started_from(digits_pair):
    # An absurd step size throws the points far away; the fit must not hand that back.
    line = LinearConnector(n_points=7, device="cpu").fit(
        digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b
    )
    geo = GeodesicConnector(
        curve="chain",
        n_points=7,
        learning_rate_init=5.0,
        max_iter=3,
        coarse_to_fine=False,
        device="cpu",
        random_state=0,
    )
    with pytest.warns(RuntimeWarning, match="The path returned is the one the fit started from"):
        geo.fit(digits_pair.X, model_a=digits_pair.model_a, model_b=digits_pair.model_b)
    torch.testing.assert_close(
        geo.path_.parameters_vector(), line.path_.parameters_vector(), rtol=0, atol=0
    )
    assert geo.energy_ == pytest.approx(line.energy_, rel=1e-6)
    assert geo.n_iter_ == 3 == len(geo.history_["energy"])  # the record is kept


def test_a_batchnorm_heavy_depthwise_pair_ends_below_the_line_at_default_settings():
    # make_mobilenet: inverted residuals, depthwise convolutions, squeeze-excitation and
    # thirteen BatchNorm layers, where a step size too large for the parameters shows.
    data = load_digits_split()
    X, y = data.images_train[:384], data.y_train[:384]
    a, b = (
        train_classifier(make_mobilenet(width=8, seed=s), X, y, epochs=20, seed=s) for s in (1, 2)
    )
    line = LinearConnector(n_points=9).fit(X, model_a=a, model_b=b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 20 epochs: a budget
        geo = GeodesicConnector(curve="chain", n_points=9, max_iter=20, random_state=0).fit(
            X, model_a=a, model_b=b
        )
    assert geo.energy_ < line.energy_
    test_line = line.evaluate(data.images_test, data.y_test)
    test_geo = geo.evaluate(data.images_test, data.y_test)
    assert test_geo.barrier < 0.5 * test_line.barrier
