"""
A convolutional network with BatchNorm
======================================

Networks with BatchNorm carry running statistics (the mean and variance of each
channel) besides their weights. Those cannot be interpolated: the statistics of a
network half-way between two others are not half-way between theirs. geoconnect
recomputes each interior point's statistics on data, as
``torch.optim.swa_utils.update_bn`` does — so ``LinearConnector`` needs ``X`` for
such networks, and a ``GeodesicConnector`` fits with batch statistics and then
recomputes them on its training inputs.
"""

# %%
# Two small CNNs on 8×8 digit images
# ----------------------------------
# [`make_cnn`][geoconnect.models.make_cnn]: two 3×3 convolutions, each followed by
# BatchNorm and ReLU, then global average pooling and a linear layer.
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_cnn, train_classifier

data = load_digits_split()
images_train, images_test = data.images_train, data.images_test  # shape (n, 1, 8, 8)
model_a = train_classifier(make_cnn(width=8, seed=1), images_train, data.y_train, epochs=15, seed=1)
model_b = train_classifier(make_cnn(width=8, seed=2), images_train, data.y_train, epochs=15, seed=2)
print(model_a)

# %%
# Connect them
# ------------
# Both connectors take image tensors like any other input. The line's interior
# statistics are recomputed on ``images_train``.
line = LinearConnector(n_points=9, device="cpu")
line.fit(images_train, model_a=model_a, model_b=model_b)
geodesic = GeodesicConnector(n_points=9, device="cpu", random_state=0)
geodesic.fit(images_train, model_a=model_a, model_b=model_b)

test = {
    "linear": line.evaluate(images_test, data.y_test),
    "geodesic": geodesic.evaluate(images_test, data.y_test),
}
for name, ev in test.items():
    print(
        f"{name:<9} test loss barrier {ev.barrier:.3f} nats, "
        f"lowest test accuracy {ev.min_accuracy:.1%}"
    )

# %%
# What interpolated statistics would have shown
# ---------------------------------------------
# For comparison, the middle of the line with its BatchNorm statistics interpolated
# too — the shortcut geoconnect refuses to take.
import torch

middle = line.path_[4]  # statistics recomputed on data
naive = line.path_[4]
with torch.no_grad():
    for (name, buffer), a, b in zip(naive.named_buffers(), model_a.buffers(), model_b.buffers()):
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_((a + b) / 2)
    x = torch.as_tensor(images_test)
    for label, net in [("recomputed", middle), ("interpolated", naive)]:
        accuracy = (net(x).argmax(1).numpy() == data.y_test).mean()
        print(f"middle of the line, statistics {label:<12}: test accuracy {accuracy:.1%}")

# %%
# Loss along both paths
# ---------------------
from geoconnect.plotting import plot_loss_profile

train = {
    "linear": line.evaluate(images_train, data.y_train),
    "geodesic": geodesic.evaluate(images_train, data.y_train),
}
axes = plot_loss_profile(train, test, accuracy=True, title="CNNs with BatchNorm on digit images")
