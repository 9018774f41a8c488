"""densecontrast: dense self-supervised contrastive pre-training with exact view geometry."""

from densecontrast.geometry import ViewGeometry

__version__ = "0.1.0"

__all__ = ["ViewGeometry", "__version__"]
