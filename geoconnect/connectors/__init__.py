"""The connectors: scikit-learn estimators that fit a path between two networks."""

from .curve import CurveConnector
from .geodesic import GeodesicConnector
from .linear import LinearConnector

__all__ = ["CurveConnector", "GeodesicConnector", "LinearConnector"]
