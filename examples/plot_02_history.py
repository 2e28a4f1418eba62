"""
The optimisation, epoch by epoch
================================

A [`GeodesicConnector`][geoconnect.GeodesicConnector] starts from the straight line and moves
its free networks to lower the *energy*. This page follows the chain of points
(``curve="chain"``), whose energy is the sum of the divergences between neighbouring
networks' predictions and whose fit refines a coarse path; the default continuous
curve records the same three quantities (its energy in Fisher–Rao units, its length
as the chord sums on each batch's grid of ``t``), and ``plot_history`` draws either.
Its ``history_`` records, per epoch, the energy, the path's Fisher–Rao length (in the
space of predictive distributions) and its Euclidean length (in parameter space).
The first falls while the second rises: the path bends away from the line in
parameter space to stay short between predictions.
"""

# %%
# Fit a geodesic, and the line for reference
# ------------------------------------------
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=3), data.X_train, data.y_train, seed=3)
model_b = train_classifier(make_mlp(seed=4), data.X_train, data.y_train, seed=4)

line = LinearConnector(device="cpu").fit(data.X_train, model_a=model_a, model_b=model_b)
geodesic = GeodesicConnector(curve="chain", device="cpu", random_state=0)
geodesic.fit(data.X_train, model_a=model_a, model_b=model_b)

# %%
# The record
# ----------
# ``history_`` is a dict of per-epoch lists. Energy and the Fisher–Rao chord length
# (the chord sum at the points) are means over each epoch's batches as the path
# moved; the Euclidean length is measured at the end of the epoch. The fitted
# ``length_`` is the continuous length of the path returned, the networks between
# the points included, and is measured once, at the end. The fit stops early once
# the energy stops improving.
#
# By default (``coarse_to_fine=True``) the fit starts with a coarse path of 4 points
# and refines it to 7, 13 and finally 25, giving each cheap coarse level a few epochs;
# ``history_["n_points"]`` records each epoch's level. A coarse level's lengths are
# measured at its few points only, so they jump when points are added between them.
history = geodesic.history_
print(f"{'epoch':>5}{'points':>7}{'energy (nats)':>15}{'FR chords (rad)':>17}{'eucl. length':>14}")
for epoch in [*range(0, geodesic.n_iter_, 5), geodesic.n_iter_ - 1]:
    print(
        f"{epoch + 1:>5}{history['n_points'][epoch]:>7}{history['energy'][epoch]:>15.4f}"
        f"{history['chord_length'][epoch]:>17.3f}{history['euclidean_length'][epoch]:>14.2f}"
    )
print(
    f"\ngeodesic: Fisher–Rao length {geodesic.length_:.3f} rad (chords "
    f"{geodesic.chord_length_:.3f})\nstraight line: energy {line.energy_:.4f} nats, "
    f"Fisher–Rao length {line.length_:.3f} rad (chords {line.chord_length_:.3f}), "
    f"Euclidean length {line.euclidean_length_:.2f}"
)

# %%
# The three curves
# ----------------
# The dashed lines are the straight line's values, fitted on the same data; the
# dotted ones mark the refinements of the coarse-to-fine fit.
from geoconnect.plotting import plot_history

axes = plot_history(geodesic, baseline=line, title="Fitting a geodesic between two digits MLPs")

# %%
# Constant speed
# --------------
# A minimiser of the energy moves at constant speed: every segment covers the same
# Fisher–Rao distance. ``path_.t_`` holds the points' positions by arc length, which
# for a constant-speed path are close to ``i / (N − 1)``.
import numpy as np

uniform = np.linspace(0, 1, len(geodesic.path_))
print(
    f"largest gap between arc-length and uniform positions: "
    f"geodesic {np.abs(geodesic.path_.t_ - uniform).max():.3f}, "
    f"line {np.abs(line.path_.t_ - uniform).max():.3f}"
)
