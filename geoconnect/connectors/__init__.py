"""The connectors: scikit-learn estimators that fit a path between two networks."""

from .geodesic import GeodesicConnector
from .linear import LinearConnector

__all__ = ["GeodesicConnector", "LinearConnector"]
