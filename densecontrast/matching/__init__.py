"""Matchers: which key cell(s) of view 2 are positive for each query cell of view 1.

Every matcher returns a :class:`Matches`. Geometry-based matchers (no features needed):
:func:`coordinate_match` (PixPro threshold), :func:`nearest_coordinate_match` (PixCon-Coord,
VICRegL location), :func:`location_match` (DenseSiam points), :func:`correspondence_match`
(LC-loss). Feature-based: :func:`similarity_match` (DenseCL, PixCon-Sim/SR, VICRegL L2).
"""

from densecontrast.matching.coordinate import (
    CoordinateMatcher,
    NearestCoordinateMatcher,
    cell_distance,
    center_distance,
    coordinate_match,
    nearest_coordinate_match,
)
from densecontrast.matching.correspondence import CorrespondenceMatcher, correspondence_match
from densecontrast.matching.location import LocationMatcher, location_match
from densecontrast.matching.matches import Matches, sample_points
from densecontrast.matching.similarity import SimilarityMatcher, similarity_match

__all__ = [
    "CoordinateMatcher",
    "CorrespondenceMatcher",
    "LocationMatcher",
    "Matches",
    "NearestCoordinateMatcher",
    "SimilarityMatcher",
    "cell_distance",
    "center_distance",
    "coordinate_match",
    "correspondence_match",
    "location_match",
    "nearest_coordinate_match",
    "sample_points",
    "similarity_match",
]
