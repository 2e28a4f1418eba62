"""
The loss plane: where the two paths go
======================================

The plane through the two trained networks θ_a, θ_b and the geodesic's point
farthest from the straight line shows the loss landscape both paths cross. The
straight line runs through a ridge of high loss; the geodesic goes around it.
"""

# %%
# Two networks and two paths
# --------------------------
from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=1), data.X_train, data.y_train, seed=1)
model_b = train_classifier(make_mlp(seed=2), data.X_train, data.y_train, seed=2)
line = LinearConnector(device="cpu").fit(data.X_train, model_a=model_a, model_b=model_b)
geodesic = GeodesicConnector(device="cpu", random_state=0)
geodesic.fit(data.X_train, model_a=model_a, model_b=model_b)

# %%
# The plane
# ---------
# Every grid point of the plane is a network, evaluated on the test data (here 25 × 25
# networks). The horizontal axis runs from θ_a to θ_b; the vertical one is
# orthogonal to it, towards the geodesic's farthest point; both are in parameter
# units (Euclidean norm). The geodesic's other points are drawn by their projections
# onto the plane.
from geoconnect.plotting import plot_loss_plane

ax = plot_loss_plane(
    {"linear": line, "geodesic": geodesic},
    data.X_test,
    data.y_test,
    resolution=25,
    title="Test loss on the plane through θ_a, θ_b and the geodesic",
)

# %%
# How far the geodesic strays
# ---------------------------
# ``path_.parameters_vector()`` holds every point's parameters, one row per point.

theta = geodesic.path_.parameters_vector()
chord = theta[-1] - theta[0]
offsets = theta - theta[0]
along = offsets @ chord / chord.norm() ** 2
away = (offsets - along[:, None] * chord).norm(dim=1)
i = int(away.argmax())
print(
    f"‖θ_b − θ_a‖ = {chord.norm():.2f}; the geodesic's point {i} of {len(theta)} is "
    f"{away[i]:.2f} away from the line ({float(away[i] / chord.norm()):.0%} of it)"
)
