"""Shared fixtures: a trained digits MLP pair and cheap random-MLP pairs.

Fixtures are kept cheap: the one trained pair is built once per session (a few
seconds on one CPU core) and every test works on copies or leaves it untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from geoconnect.models import load_digits_split, make_mlp, train_classifier

# The suite runs on 2 shared cores and its networks are tiny: one intra-op thread is
# ~10x faster than several fighting over oversubscribed cores.
torch.set_num_threads(1)


@dataclass
class Pair:
    """Two classifiers of one architecture and data to connect them on."""

    model_a: nn.Module
    model_b: nn.Module
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def copies(self) -> tuple[nn.Module, nn.Module]:
        return copy.deepcopy(self.model_a), copy.deepcopy(self.model_b)


def random_mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    """An untrained ReLU MLP from a seed, without touching the global RNG."""
    with torch.random.fork_rng():
        return make_mlp(sizes, seed=seed)


def random_pair(
    sizes: tuple[int, ...] = (5, 8, 3), n_samples: int = 40, seed: int = 0, scale: float = 1.0
) -> Pair:
    """Two random MLPs and Gaussian inputs with labels in range; all from ``seed``."""
    a = random_mlp(sizes, 2 * seed)
    b = random_mlp(sizes, 2 * seed + 1)
    if scale != 1.0:
        with torch.no_grad():
            for p in list(a.parameters()) + list(b.parameters()):
                p.mul_(scale)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n_samples)
    return Pair(a.eval(), b.eval(), X, y)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, standardised and split (bundled, no download)."""
    return load_digits_split()


@pytest.fixture(scope="session")
def digits_pair(digits) -> Pair:
    """Two 64-16-16-10 MLPs trained on digits from two seeds (shared: do not modify)."""
    a = train_classifier(make_mlp(seed=1), digits.X_train, digits.y_train, epochs=20, seed=1)
    b = train_classifier(make_mlp(seed=2), digits.X_train, digits.y_train, epochs=20, seed=2)
    return Pair(a, b, digits.X_train, digits.y_train, digits.X_test, digits.y_test)


@pytest.fixture
def small_pair() -> Pair:
    """Two random 5-8-3 MLPs and 40 Gaussian samples with labels (fresh per test)."""
    return random_pair()
