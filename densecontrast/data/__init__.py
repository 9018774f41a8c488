"""Datasets (synthetic scenes, image folders, multi-view pairs), multi-view collation and resumable data order."""

from densecontrast.data.collate import collate_views
from densecontrast.data.dead_leaves import DeadLeavesScenes
from densecontrast.data.image_folder import ImageDataset
from densecontrast.data.multiview import MultiViewDataset, MultiViewIterableDataset
from densecontrast.data.photos import photos_available, sample_photos
from densecontrast.data.sampling import SeededViews, ShardedSampler, step_batches
from densecontrast.data.synthetic import SyntheticScenes

__all__ = [
    "DeadLeavesScenes",
    "ImageDataset",
    "MultiViewDataset",
    "MultiViewIterableDataset",
    "SeededViews",
    "ShardedSampler",
    "SyntheticScenes",
    "collate_views",
    "photos_available",
    "sample_photos",
    "step_batches",
]
