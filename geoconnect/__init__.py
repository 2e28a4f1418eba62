"""geoconnect: low-loss paths between trained PyTorch networks along Fisher–Rao geodesics."""

from .connectors import CurveConnector, GeodesicConnector, LinearConnector
from .evaluation import PathEvaluation
from .path import ModelPath

__all__ = ["CurveConnector", "GeodesicConnector", "LinearConnector", "ModelPath", "PathEvaluation"]
__version__ = "0.1.0"
