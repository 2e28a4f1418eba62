"""
Every path method, side by side
===============================

geoconnect ships the Fisher–Rao geodesic and the other ways the literature connects
two networks, all in one estimator API: the straight line, the line after weight
matching (Ainsworth et al. 2023), the line with REPAIR (Jordan et al. 2023),
Bezier curves and polygonal chains trained on the loss (Garipov et al. 2018) and
the nudged elastic band (Draxler et al. 2018). They share the data handling,
BatchNorm treatment, evaluation and plots, so their numbers compare directly.

Here every method connects the same two MLPs trained on scikit-learn's digits, with
its default settings, and is scored on held-out digits. ``benchmarks/methods.py``
runs the same comparison on two more pairs (BatchNorm CNNs, aligned residual CNNs)
and times each method to the barrier target; its table is in the user guide,
"Choosing a method".
"""

# %%
# Two MLPs from two seeds
# -----------------------
# The pair of ``benchmarks/methods.py``: 64-16-16-10 ReLU networks, 40 epochs each.
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a, model_b = (
    train_classifier(make_mlp(seed=s), data.X_train, data.y_train, epochs=40, seed=s)
    for s in (1, 2)
)

# %%
# Seven paths
# -----------
# The geodesic and the lines need no labels; the curves and the elastic band are
# trained on the loss, so their ``fit`` takes ``y``.
import time

from geoconnect import CurveConnector, GeodesicConnector, LinearConnector, NEBConnector

common = {"n_points": 25, "device": "cpu", "random_state": 0}
methods = {
    "linear": (LinearConnector(**common), False),
    "linear + REPAIR": (LinearConnector(repair=True, **common), False),
    "aligned linear": (LinearConnector(align="weight_matching", **common), False),
    "geodesic": (GeodesicConnector(**common), False),
    "Bezier": (CurveConnector(curve="bezier", **common), True),
    "polychain": (CurveConnector(curve="polychain", **common), True),
    "NEB": (NEBConnector(**common), True),
}
seconds = {}
for name, (connector, labels) in methods.items():
    start = time.perf_counter()
    connector.fit(data.X_train, data.y_train if labels else None, model_a=model_a, model_b=model_b)
    seconds[name] = time.perf_counter() - start

# %%
# The table
# ---------
# Loss and accuracy barriers on the test digits, the paths' Fisher–Rao length (on
# the test digits) and Euclidean length in parameter space, and the fit's
# wall-clock.
test = {name: c.evaluate(data.X_test, data.y_test) for name, (c, _) in methods.items()}
print(
    f"{'method':<16} {'loss barrier':>12} {'acc. barrier':>12} {'Fisher–Rao':>10} "
    f"{'Euclidean':>9} {'labels':>6} {'fit':>7}"
)
for name, (_, labels) in methods.items():
    ev = test[name]
    print(
        f"{name:<16} {ev.barrier:>12.4f} {ev.accuracy_barrier:>12.2%} {ev.length:>10.3f} "
        f"{ev.euclidean_length:>9.2f} {'yes' if labels else 'no':>6} {seconds[name]:>6.2f}s"
    )

# %%
# Loss along every path
# ---------------------
# The seed paper's Figure 2 with every method: test loss (top, on a log scale so
# that the low paths stay apart) and accuracy (bottom) against the position on
# each path.
from geoconnect.plotting import plot_loss_profile

axes = plot_loss_profile(test, accuracy=True, title="64-16-16-10 MLPs on digits: test data")
axes[0].set_yscale("log")

# %%
# What it shows
# -------------
# On this pair weight matching alone removes the line's barrier, and so do the
# geodesic (without labels, and the shortest path with the line's ends), the curves and the
# elastic band; the loss-trained curves are the quickest of the trained methods, but
# need ``y``. REPAIR would raise this narrow pair's line barrier: its
# guard sees that without labels (the loss barrier against the ends' predicted
# classes rises), warns, and keeps the plain line, so its row is the line's; on the
# wider MLPs of the benchmark REPAIR lowers the barrier and its path is returned.
# The user guide's "Choosing a method" has the table for six pairs, with each
# method's time to a tenth of the line's barrier.
repaired = methods["linear + REPAIR"][0].path_.metadata
print(f"REPAIR kept: {repaired['repair']}; label-free barrier {repaired['repair_barrier']}")
