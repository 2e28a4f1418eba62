"""A faithful re-implementation of the seed paper's algorithm, the speed baseline.

Tan, Long, Zhao and Laine, *Geodesic Mode Connectivity* (2023): N = 25 separate
networks, initialised on the straight line, the ends fixed; each step evaluates the
networks one after another on a batch and takes a plain SGD step (lr 0.1, batch 256)
on the sum of Jensen–Shannon divergences between neighbours' predictions. Interior
networks run in train mode (BatchNorm uses batch statistics and updates its running
averages); after the optimisation their statistics are recomputed on the data, as
``torch.optim.swa_utils.update_bn`` does.

The divergence is geoconnect's ``jensen_shannon`` (one implementation of each number);
everything else is the seed's structure, kept deliberately as it is.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from geoconnect import ModelPath
from geoconnect.divergences import jensen_shannon


def seed_geodesic(
    model_a: nn.Module,
    model_b: nn.Module,
    X: np.ndarray,
    *,
    n_points: int = 25,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
) -> ModelPath:
    """Run the seed algorithm; return the resulting path as a ``ModelPath`` for scoring."""
    run = seed_checkpoints(
        model_a,
        model_b,
        X,
        n_points=n_points,
        budgets=[epochs],
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    ((_, path, _),) = list(run)
    return path


def seed_checkpoints(
    model_a: nn.Module,
    model_b: nn.Module,
    X: np.ndarray,
    *,
    budgets: list[int],
    n_points: int = 25,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
) -> Iterator[tuple[int, ModelPath, dict]]:
    """One run of the seed algorithm, yielding ``(epochs, path, timing)`` at each budget.

    Plain SGD at a constant learning rate has no state that depends on the total
    number of epochs, so the path after ``e`` epochs of a long run is the path a
    fresh ``e``-epoch run returns. Each checkpoint is finished as a fresh run would
    be (copies of the interior networks, their BatchNorm statistics recomputed);
    the optimisation itself goes on from the live networks.

    ``timing`` holds ``seconds``: what a fresh run of that many epochs would have
    taken (the optimisation so far plus this checkpoint's finish, set-up included,
    checkpoints before it excluded), and ``epoch_seconds``: each epoch's time so far.
    """
    start = time.perf_counter()
    x_all = torch.as_tensor(X, dtype=torch.float32, device=device)
    t = np.linspace(0.0, 1.0, n_points)
    end_a = copy.deepcopy(model_a).to(device).eval()
    end_b = copy.deepcopy(model_b).to(device).eval()
    models = [end_a]
    for ti in t[1:-1]:
        m = copy.deepcopy(model_a).to(device)
        with torch.no_grad():
            for p, pa, pb in zip(m.parameters(), end_a.parameters(), end_b.parameters()):
                p.copy_((1 - ti) * pa + ti * pb)
        models.append(m.train())
    models.append(end_b)
    params = [p for m in models[1:-1] for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    spent, epoch_seconds = time.perf_counter() - start, []
    if 0 in budgets:  # the straight line, finished as the seed finishes a path
        path = _finish(model_a, models, x_all, batch_size, device)
        yield 0, path, {"seconds": time.perf_counter() - start, "epoch_seconds": []}
    for epoch in range(1, max(budgets) + 1):
        tic = time.perf_counter()
        order = torch.randperm(len(x_all), generator=generator).to(device)
        for start in range(0, len(x_all), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            x = x_all[idx]
            with torch.no_grad():
                out_a, out_b = end_a(x), end_b(x)
            outs = [out_a] + [m(x) for m in models[1:-1]] + [out_b]
            loss = sum(jensen_shannon(outs[i], outs[i + 1]).mean() for i in range(n_points - 1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - tic)
        spent += epoch_seconds[-1]
        if epoch in budgets:
            tic = time.perf_counter()
            path = _finish(model_a, models, x_all, batch_size, device)
            if device != "cpu":
                torch.cuda.synchronize(device)
            seconds = spent + time.perf_counter() - tic
            yield epoch, path, {"seconds": seconds, "epoch_seconds": list(epoch_seconds)}


def _finish(
    model_a: nn.Module, models: list[nn.Module], x_all: torch.Tensor, batch_size: int, device: str
) -> ModelPath:
    """The seed's last step on copies: BatchNorm statistics recomputed, then stacked."""
    models = [models[0]] + [copy.deepcopy(m) for m in models[1:-1]] + [models[-1]]
    loader = torch.utils.data.DataLoader(x_all, batch_size=batch_size)
    for m in models[1:-1]:
        update_bn(loader, m, device=device)
        m.eval()
    stacked = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        for name, _ in model_a.named_parameters()
    }
    bn_names = [n for n, b in model_a.named_buffers() if _is_bn_stat(model_a, n)]
    bn = {
        name: torch.stack([dict(m.named_buffers())[name].detach() for m in models])
        for name in bn_names
    }
    return ModelPath(models[0], stacked, bn)


def _is_bn_stat(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
