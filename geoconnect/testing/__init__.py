"""Property tests for divergences, distances and model paths, built on hypothesis.

``check_divergence`` runs hypothesis searches for the properties a divergence
declares (symmetry, a bound, the triangle inequality, its local constant against the
Fisher metric, and the laws every divergence obeys) and names the broken ones with a
minimal counter-example; ``infer_power`` measures whether a function is a distance
(power 1) or behaves like a squared one (power 2), which ``check_divergence`` does
when the power is not given. :mod:`geoconnect.testing.strategies` holds the
strategies it is built from, for your own tests.

This subpackage needs hypothesis, which the rest of geoconnect does not:
``pip install "geoconnect[testing]"``.

Examples
--------
>>> import math
>>> from geoconnect.divergences import fisher_rao
>>> from geoconnect.testing import check_divergence
>>> checked = check_divergence(fisher_rao, triangle=True, upper_bound=math.pi,
...                            local_constant=1.0, max_examples=10)  # a distance
>>> "triangle" in checked
True
"""

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised by a test with it hidden
    raise ImportError(
        "geoconnect.testing needs hypothesis, which is not installed. Install it with "
        "pip install 'geoconnect[testing]' (or pip install hypothesis)."
    ) from error

from . import strategies
from ._checks import PROPERTIES, DivergenceCheckError, check_divergence, infer_power

__all__ = ["PROPERTIES", "DivergenceCheckError", "check_divergence", "infer_power", "strategies"]
