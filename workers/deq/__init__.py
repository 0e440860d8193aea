"""DEQ core shared by DECSC and DEQ-Unmix: fixed-point solvers and the ``DEQFixedPoint`` module."""

from .fixed_point import BACKWARDS, DEQFixedPoint, SolverConfig
from .solvers import METHODS, SolverStats, solve

__all__ = ["BACKWARDS", "METHODS", "DEQFixedPoint", "SolverConfig", "SolverStats", "solve"]
