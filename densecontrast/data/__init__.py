"""Datasets (synthetic scenes, image folders, multi-view pairs), multi-view collation and resumable data order."""

from densecontrast.data.collate import collate_views
from densecontrast.data.image_folder import ImageDataset
from densecontrast.data.multiview import MultiViewDataset
from densecontrast.data.sampling import SeededViews, ShardedSampler, step_batches
from densecontrast.data.synthetic import SyntheticScenes

__all__ = [
    "ImageDataset",
    "MultiViewDataset",
    "SeededViews",
    "ShardedSampler",
    "SyntheticScenes",
    "collate_views",
    "step_batches",
]
