"""Helpers the alignment tests share: random permutations, and comparing two networks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from geoconnect.align import PermutationSpec


def random_permutation(spec: PermutationSpec, model: nn.Module, seed: int) -> dict:
    """A random permutation of every group of ``spec``'s units in ``model``."""
    rng = np.random.default_rng(seed)
    return {p: rng.permutation(n) for p, n in spec.sizes(model).items()}


def assert_same_function(m1: nn.Module, m2: nn.Module, x: torch.Tensor) -> None:
    """The two networks' eval-mode outputs on ``x`` agree to 1e-5."""
    with torch.no_grad():
        torch.testing.assert_close(m1.eval()(x), m2.eval()(x), rtol=1e-5, atol=1e-5)


def parameter_distance(m1: nn.Module, m2: nn.Module) -> float:
    """The Euclidean distance between the two networks' parameters."""
    with torch.no_grad():
        squares = [
            (p.double() - q.double()).square().sum()
            for p, q in zip(m1.parameters(), m2.parameters())
        ]
    return float(sum(squares)) ** 0.5
