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
    for _ in range(epochs):
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
    return ModelPath(end_a, stacked, bn)


def _is_bn_stat(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
