"""geoconnect: low-loss paths between trained PyTorch networks along Fisher–Rao geodesics."""

from .connectors import CurveConnector, GeodesicConnector, LinearConnector, NEBConnector
from .evaluation import PathEvaluation
from .path import ModelPath

__all__ = [
    "CurveConnector",
    "GeodesicConnector",
    "LinearConnector",
    "ModelPath",
    "NEBConnector",
    "PathEvaluation",
]
__version__ = "0.1.0"
