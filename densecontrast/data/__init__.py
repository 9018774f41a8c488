"""Datasets (synthetic scenes, image folders, multi-view pairs) and the multi-view collate function."""

from densecontrast.data.collate import collate_views
from densecontrast.data.image_folder import ImageDataset
from densecontrast.data.multiview import MultiViewDataset
from densecontrast.data.synthetic import SyntheticScenes

__all__ = ["ImageDataset", "MultiViewDataset", "SyntheticScenes", "collate_views"]
