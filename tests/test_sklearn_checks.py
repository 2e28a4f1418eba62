"""scikit-learn's own estimator checks, on both connectors (CPU, small settings).

Without model_a and model_b each fit trains two small MLPs from ``model_factory``
(the default) on the check's data, then connects them — so every check exercises the
whole estimator. A check that cannot pass is listed in ``EXPECTED_FAILED_CHECKS``
with its reason; keep that list short and honest.
"""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from geoconnect import GeodesicConnector, LinearConnector

ESTIMATORS = [
    LinearConnector(n_points=3, device="cpu"),
    GeodesicConnector(max_iter=2, n_points=3, device="cpu", random_state=0),
]

EXPECTED_FAILED_CHECKS = {
    "check_methods_subset_invariance": (
        "float32 networks: torch's CPU matrix products round differently for "
        "different batch sizes, so transform on a subset of rows differs from the "
        "full batch in the 7th significant digit (~1e-7 absolute), just over the "
        "check's atol=1e-7. Predictions are unaffected."
    ),
}


def expected_failed_checks(estimator) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
