"""scikit-learn's own estimator checks, on every connector (CPU, small settings).

Without model_a and model_b each fit trains two small MLPs from ``model_factory``
(the default) on the check's data, then connects them — so every check exercises the
whole estimator. A check that cannot pass is listed in ``EXPECTED_FAILED_CHECKS``
with its reason; keep that list short and honest.
"""

from __future__ import annotations

import pytest
from sklearn.base import clone
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from geoconnect import CurveConnector, GeodesicConnector, LinearConnector, NEBConnector

ESTIMATORS = [
    LinearConnector(n_points=3, device="cpu"),
    LinearConnector(n_points=3, device="cpu", repair=True),
    GeodesicConnector(max_iter=2, n_points=3, device="cpu", random_state=0),
    CurveConnector(max_iter=2, n_points=3, n_bends=1, device="cpu", random_state=0),
    NEBConnector(max_iter=2, n_points=3, device="cpu", random_state=0),
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


# scikit-learn runs these in its own suite but not in check_estimator: the output
# container (set_output), column names, and feature names of DataFrame input.
OUTPUT_CHECKS = [
    "check_set_output_transform",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
    "check_transformer_get_feature_names_out",
    "check_transformer_get_feature_names_out_pandas",
    "check_dataframe_column_names_consistency",
]


@pytest.mark.filterwarnings("ignore:X (does not have valid|has) feature names")
@pytest.mark.parametrize("check_name", OUTPUT_CHECKS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_set_output_and_feature_names(estimator, check_name):
    pytest.importorskip("pandas")
    getattr(estimator_checks, check_name)(type(estimator).__name__, clone(estimator))
