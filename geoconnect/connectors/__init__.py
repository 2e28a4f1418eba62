"""The connectors: scikit-learn estimators that fit a path between two networks."""

from .curve import CurveConnector
from .geodesic import GeodesicConnector
from .linear import LinearConnector
from .neb import NEBConnector

__all__ = ["CurveConnector", "GeodesicConnector", "LinearConnector", "NEBConnector"]
