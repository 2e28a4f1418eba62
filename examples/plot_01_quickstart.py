"""
Quickstart: the straight line against the geodesic
===================================================

Two small networks trained on the same data from different seeds reach about the same
accuracy, yet the networks on the straight line between their weights are bad
classifiers: the line crosses a *loss barrier*. A
[`GeodesicConnector`][geoconnect.GeodesicConnector] finds a path between the same two
networks along which the loss stays low.
"""

# %%
# Two networks, trained from two seeds
# ------------------------------------
# scikit-learn's 8×8 handwritten digits, standardised and split (nothing to
# download), and two 64-16-16-10 MLPs trained with Adam.
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=1), data.X_train, data.y_train, seed=1)
model_b = train_classifier(make_mlp(seed=2), data.X_train, data.y_train, seed=2)

# %%
# Connect them twice
# ------------------
# The straight line needs no fitting; the geodesic is fitted on the training inputs
# (no labels: it only compares the networks' predictions). Both paths have 25 points
# with the two trained networks at the ends.
line = LinearConnector(device="cpu").fit(data.X_train, model_a=model_a, model_b=model_b)
geodesic = GeodesicConnector(device="cpu", random_state=0)
geodesic.fit(data.X_train, model_a=model_a, model_b=model_b)
print(f"geodesic fit: {geodesic.n_iter_} epochs")

# %%
# Score both paths
# ----------------
# Labels are needed only now, to measure the paths. ``evaluate`` gives the loss and
# accuracy of every point; the *loss barrier* is the largest excess of the loss over
# the chord between the two ends' losses.
train = {
    "linear": line.evaluate(data.X_train, data.y_train),
    "geodesic": geodesic.evaluate(data.X_train, data.y_train),
}
test = {
    "linear": line.evaluate(data.X_test, data.y_test),
    "geodesic": geodesic.evaluate(data.X_test, data.y_test),
}
print(f"{'path':<10}{'test barrier':>14}{'min test acc':>14}{'FR length':>11}{'eucl. length':>14}")
for name, ev in test.items():
    print(
        f"{name:<10}{ev.barrier:>10.3f} nats{ev.min_accuracy:>14.1%}"
        f"{ev.length:>7.2f} rad{ev.euclidean_length:>14.2f}"
    )

# %%
# Loss and accuracy along both paths
# ----------------------------------
# Train data solid, test data dashed. The geodesic is longer in parameter space, but
# much shorter in the space of predictions, and its networks stay accurate.
from geoconnect.plotting import plot_loss_profile

loss_ax, accuracy_ax = plot_loss_profile(
    train, test, accuracy=True, title="Digits MLPs: straight line vs geodesic"
)

# %%
# Every point of the path is an ordinary network
# ----------------------------------------------
# ``geodesic.path_[i]`` is the i-th network, ``geodesic.path_.at(t)`` the network at
# a position t ∈ [0, 1] measured by Fisher–Rao arc length.
import torch

middle = geodesic.path_.at(0.5)
with torch.no_grad():
    logits = middle(torch.as_tensor(data.X_test))
print(
    f"the network half-way along the geodesic: test accuracy "
    f"{(logits.argmax(1).numpy() == data.y_test).mean():.1%}"
)
