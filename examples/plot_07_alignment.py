"""
Align, then connect: the seed paper's Figure 2 in miniature
===========================================================

Two networks trained from different seeds compute the same kind of function with
their hidden units in a different order, so the straight line between them runs
through networks whose units no longer line up — and crosses a high loss barrier.
Permuting model B's units to match model A's (*weight matching*, from Git Re-Basin,
Ainsworth et al. 2023) changes nothing about what B computes but lowers that barrier.
The Fisher–Rao geodesic between the aligned pair removes what is left of it.

This is the experiment of the seed paper's Figure 2 (a ResNet20 on CIFAR-10), in
miniature: small residual CNNs with BatchNorm on scikit-learn's 8×8 digits.
"""

# %%
# Two residual CNNs from two seeds
# --------------------------------
# [`make_resnet`][geoconnect.models.make_resnet]: a 3×3 stem, a residual block, a
# downsampling residual block with twice the channels, global average pooling and a
# linear layer; BatchNorm after every convolution.
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_resnet, train_classifier

data = load_digits_split()
images_train, images_test = data.images_train, data.images_test  # shape (n, 1, 8, 8)
model_a, model_b = (
    train_classifier(make_resnet(width=16, seed=s), images_train, data.y_train, epochs=15, seed=s)
    for s in (1, 2)
)

# %%
# Weight matching
# ---------------
# [`weight_matching`][geoconnect.align.weight_matching] returns a permuted copy of
# model B. The permutations — one per group of units, residual additions tying the
# units they add — are found by tracing the network with ``torch.fx``; each step of
# the coordinate descent is a linear assignment problem. The copy computes what B
# computes, BatchNorm statistics included, but lies much closer to A.
import torch

from geoconnect.align import weight_matching

aligned_b = weight_matching(model_a, model_b, random_state=0)


def distance(net_1, net_2):
    with torch.no_grad():
        return sum((p - q).square().sum() for p, q in zip(net_1.parameters(), net_2.parameters()))


x = torch.as_tensor(images_test)
with torch.no_grad():
    change = (aligned_b(x) - model_b(x)).abs().max().item()
print(f"largest change of B's logits after alignment: {change:.1e}")
print(
    f"‖θ_a − θ_b‖ = {distance(model_a, model_b) ** 0.5:.1f} before alignment, "
    f"{distance(model_a, aligned_b) ** 0.5:.1f} after"
)

# %%
# Three paths
# -----------
# The connectors align for you with ``align="weight_matching"``: their path then
# ends at the permuted copy of B (``path_[-1]``), which computes what B does. The
# lines' interior BatchNorm statistics are recomputed on the training images; the
# geodesic's fit needs no labels.
paths = {
    "linear": LinearConnector(n_points=9, device="cpu"),
    "linear, aligned": LinearConnector(
        n_points=9, device="cpu", align="weight_matching", random_state=0
    ),
    "geodesic, aligned": GeodesicConnector(
        n_points=9, device="cpu", align="weight_matching", random_state=0
    ),
}
for connector in paths.values():
    connector.fit(images_train, model_a=model_a, model_b=model_b)

train = {name: c.evaluate(images_train, data.y_train) for name, c in paths.items()}
test = {name: c.evaluate(images_test, data.y_test) for name, c in paths.items()}
print(f"{'path':<18} {'train barrier':>13} {'test barrier':>12} {'lowest test acc.':>16}")
for name in paths:
    print(
        f"{name:<18} {train[name].barrier:>13.3f} {test[name].barrier:>12.3f} "
        f"{test[name].min_accuracy:>16.1%}"
    )

# %%
# Loss and accuracy along each path
# ---------------------------------
# Train data solid, test data dashed. Alignment lowers the line's barrier; the
# geodesic between the aligned networks stays at the loss of its ends.
from geoconnect.plotting import plot_loss_profile

axes = plot_loss_profile(
    train, test, accuracy=True, title="Residual CNNs with BatchNorm on digit images"
)
