"""The fit's optimisers take torch.optim's steps, bitwise, without torch.optim."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import geoconnect._optim as optim
from geoconnect._optim import SGD, Adam

shapes = st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), min_size=1, max_size=3)


def _run(make, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    params = [p.clone() for p in params]
    optimizer = make(params)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
    return params


def _problem(shapes, seed: int, n_steps: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=g) for s in shapes]
    scale = 10.0 ** torch.randint(-9, 1, (1,), generator=g).item()  # tiny gradients too
    grads = [[torch.randn(*s, generator=g) * scale for s in shapes] for _ in range(n_steps)]
    return params, grads


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**16), n_steps=st.integers(1, 6))
def test_adam_takes_torchs_fused_steps_bitwise(shapes, seed, n_steps):
    params, grads = _problem(shapes, seed, n_steps)
    mine = _run(lambda ps: Adam(ps, lr=3e-3), params, grads)
    torchs = _run(lambda ps: torch.optim.Adam(ps, lr=3e-3, fused=True), params, grads)
    for a, b in zip(mine, torchs):
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**16), n_steps=st.integers(1, 6))
def test_adam_without_the_fused_kernel_takes_torchs_single_tensor_steps(shapes, seed, n_steps):
    params, grads = _problem(shapes, seed, n_steps)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim, "_FUSED_DEVICES", ())  # as on a device without the kernel
        mine = _run(lambda ps: Adam(ps, lr=3e-3), params, grads)
    torchs = _run(
        lambda ps: torch.optim.Adam(ps, lr=3e-3, foreach=False, fused=False), params, grads
    )
    for a, b in zip(mine, torchs):
        assert torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**16), n_steps=st.integers(1, 4))
def test_sgd_takes_torchs_steps_bitwise(shapes, seed, n_steps):
    params, grads = _problem(shapes, seed, n_steps)
    mine = _run(lambda ps: SGD(ps, lr=0.1), params, grads)
    torchs = _run(lambda ps: torch.optim.SGD(ps, lr=0.1), params, grads)
    for a, b in zip(mine, torchs):
        assert torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(
    shapes=shapes,
    seed=st.integers(0, 2**16),
    n_steps=st.integers(1, 4),
    fused=st.booleans(),
    solver=st.sampled_from([Adam, SGD]),
)
def test_scales_step_each_tensor_as_its_own_optimiser_at_lr_times_scale(
    shapes, seed, n_steps, fused, solver
):
    params, grads = _problem(shapes, seed, n_steps)
    scales = [0.5 + i for i in range(len(params))]
    with pytest.MonkeyPatch.context() as patch:
        if not fused:
            patch.setattr(optim, "_FUSED_DEVICES", ())
        together = _run(lambda ps: solver(ps, lr=3e-3, scales=scales), params, grads)
        apart = [
            _run(lambda ps, s=s: solver(ps, lr=3e-3 * s), [p], [[step[i]] for step in grads])[0]
            for i, (p, s) in enumerate(zip(params, scales))
        ]
    for a, b in zip(together, apart):
        assert torch.equal(a, b)


def test_adam_continues_from_its_moments_as_if_never_stopped():
    params, grads = _problem([(3, 4)], 0, 6)
    straight = _run(lambda ps: Adam(ps, lr=1e-2), params, grads)
    first = [p.clone() for p in params]
    adam = Adam(first, lr=1e-2)
    for step in grads[:3]:
        first[0].grad = step[0].clone()
        adam.step()
    again = Adam(first, lr=1e-2)
    again.load_moments(adam.moments())
    for step in grads[3:]:
        first[0].grad = step[0].clone()
        again.step()
    assert torch.equal(first[0], straight[0])


def test_a_fit_does_not_import_torch_dynamo_or_sympy():
    # torch.optim.Optimizer imports torch._dynamo (about 2 s) and backward(gradient=)
    # imports sympy (0.7 s) on first use: a process's first fit would wait for them.
    code = (
        "import sys, torch, warnings; warnings.simplefilter('ignore');"
        "from geoconnect import GeodesicConnector;"
        "GeodesicConnector(n_points=5, max_iter=1, device='cpu', random_state=0).fit("
        "torch.randn(32, 4), model_a=torch.nn.Linear(4, 3), model_b=torch.nn.Linear(4, 3));"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
