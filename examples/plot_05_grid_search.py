"""
In a Pipeline and in GridSearchCV
=================================

The connectors are scikit-learn estimators. The two networks are *fit parameters*
(``fit(X, y, model_a=..., model_b=...)``), so cross-validation passes them to every
fit untouched, and ``score`` is minus the loss barrier on held-out data — higher is
better — so a grid search picks the settings whose path has the lowest barrier on
data it was not fitted on.
"""

# %%
# Two networks
# ------------
from geoconnect import GeodesicConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=1), data.X_train, data.y_train, epochs=30, seed=1)
model_b = train_classifier(make_mlp(seed=2), data.X_train, data.y_train, epochs=30, seed=2)

# %%
# A grid search over the divergence and the number of points
# -----------------------------------------------------------
# Each candidate is fitted on two folds of the training inputs and scored by its
# loss barrier on the third. ``y`` is only used by the scoring: the fits are
# label-free. The fits are kept short so that the example runs quickly.
from sklearn.model_selection import GridSearchCV

search = GridSearchCV(
    GeodesicConnector(device="cpu", random_state=0),
    param_grid={"divergence": ["jsd", "fisher_rao"], "n_points": [5, 13]},
    cv=3,
)
search.fit(data.X_train, data.y_train, model_a=model_a, model_b=model_b)

results = search.cv_results_
print(f"{'divergence':<12}{'n_points':>9}{'mean held-out barrier (nats)':>31}")
for params, score in zip(results["params"], results["mean_test_score"]):
    print(f"{params['divergence']:<12}{params['n_points']:>9}{-score:>31.4f}")
print(f"\nbest: {search.best_params_}")
print(f"test loss barrier of the refitted best path: {-search.score(data.X_test, data.y_test):.4f}")

# %%
# The networks were not touched
# -----------------------------
# Every fit worked on copies, so the same two modules served all 13 fits.
import torch

x = torch.as_tensor(data.X_test[:5])
with torch.no_grad():
    same = torch.equal(search.best_estimator_.path_[0](x), model_a(x))
print(f"the path's first network computes what model_a computes: {same}")

# %%
# Inside a Pipeline
# -----------------
# ``transform`` gives every point's class probabilities side by side, so a path can
# feed a classifier: here a logistic regression stacks the path's networks into an
# ensemble. A Pipeline routes the networks to its step with ``step__model_a``.
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

pipe = Pipeline(
    [
        ("path", GeodesicConnector(n_points=5, device="cpu", random_state=0)),
        ("stack", LogisticRegression(max_iter=1000)),
    ]
)
pipe.fit(data.X_train, data.y_train, path__model_a=model_a, path__model_b=model_b)
print(
    f"{pipe['path'].get_feature_names_out()[:3]} ... "
    f"({len(pipe['path'].get_feature_names_out())} features)"
)
print(f"stacked path, test accuracy: {pipe.score(data.X_test, data.y_test):.1%}")

# %%
# The scores as a figure
# ----------------------
import matplotlib.pyplot as plt
import numpy as np

fig, ax = plt.subplots(figsize=(6.4, 3.4), constrained_layout=True)
labels = [f"{p['divergence']}, N={p['n_points']}" for p in results["params"]]
barriers = -np.asarray(results["mean_test_score"])
errors = np.asarray(results["std_test_score"])
ax.barh(labels, barriers, xerr=errors, color="tab:orange", capsize=3)
ax.set_xlabel("mean held-out loss barrier (nats), ± sd over 3 folds")
ax.set_title("GridSearchCV over the divergence and the number of points")
ax.grid(alpha=0.3, axis="x")
