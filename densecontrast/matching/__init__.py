"""Matchers: which key cell(s) of view 2 are positive for each query cell of view 1."""

from densecontrast.matching.matches import Matches, sample_points

__all__ = ["Matches", "sample_points"]
