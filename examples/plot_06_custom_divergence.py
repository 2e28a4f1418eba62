"""
A divergence of your own
========================

The energy of the chain of points a [`GeodesicConnector`][geoconnect.GeodesicConnector]
fits with ``curve="chain"`` is a sum of divergences between neighbouring networks'
predictions. (The default continuous curve descends the Fisher–Rao energy itself,
which every built-in divergence has as its local form; a callable has none, so it
takes the chain.) Besides the built-in ones (``"jsd"``,
``"fisher_rao"``, ``"hellinger"``, ``"kl"``), ``divergence`` accepts any callable
``(logits_p, logits_q) -> tensor`` returning one value per sample: it receives logits
of shape ``(..., n_classes)`` and reduces over the last dimension only.

Here: the Bhattacharyya distance ``D_B(p, q) = −ln Σ_k √(p_k q_k)``, which for close
distributions is ``ds² / 8`` in the Fisher metric, like the Jensen–Shannon divergence —
so its minimisers are geodesics of the same metric.
"""

# %%
# The divergence, in log space
# ----------------------------
# Working from log-probabilities keeps it finite for saturated softmaxes:
# ``Σ_k √(p_k q_k) = exp(logsumexp((log p + log q) / 2))``.
import torch


def bhattacharyya(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits_p, dim=-1)
    log_q = torch.log_softmax(logits_q, dim=-1)
    return (-torch.logsumexp((log_p + log_q) / 2, dim=-1)).clamp_min(0.0)


p, q = torch.randn(4, 10), torch.randn(4, 10)
print("per-sample values:", bhattacharyya(p, q))
print(
    f"largest value for equal inputs: {bhattacharyya(p, p).max():.1e} (zero up to float32 rounding)"
)

# %%
# Fit with it, and with the default
# ---------------------------------
# ``length_`` is always the exact Fisher–Rao length, whatever the divergence, so the
# two paths compare directly.
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=5), data.X_train, data.y_train, seed=5)
model_b = train_classifier(make_mlp(seed=6), data.X_train, data.y_train, seed=6)

paths = {
    "linear": LinearConnector(device="cpu"),
    "jsd": GeodesicConnector(curve="chain", max_iter=50, device="cpu", random_state=0),
    "bhattacharyya": GeodesicConnector(
        curve="chain", divergence=bhattacharyya, max_iter=50, device="cpu", random_state=0
    ),
}
test = {}
for name, connector in paths.items():
    connector.fit(data.X_train, model_a=model_a, model_b=model_b)
    test[name] = connector.evaluate(data.X_test, data.y_test)
    print(
        f"{name:<14} Fisher–Rao length {connector.length_:.3f} rad, "
        f"test loss barrier {test[name].barrier:.3f} nats"
    )

# %%
# Loss along the three paths
# --------------------------
from geoconnect.plotting import plot_loss_profile

ax = plot_loss_profile(test, title="Test loss: two divergences, one geometry")


# %%
# A divergence must return one value per sample
# ---------------------------------------------
# A callable that reduces over the batch too is refused with a message saying so.
def mean_only(logits_p, logits_q):
    return bhattacharyya(logits_p, logits_q).mean()


try:
    GeodesicConnector(curve="chain", divergence=mean_only, max_iter=1, device="cpu").fit(
        data.X_train, model_a=model_a, model_b=model_b
    )
except ValueError as error:
    print(error)
