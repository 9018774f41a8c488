"""densecontrast: dense self-supervised contrastive pre-training with exact view geometry.

Subpackages and modules, each usable alone: :mod:`~densecontrast.geometry` (view geometry),
:mod:`~densecontrast.transforms` (augmentations that record it), :mod:`~densecontrast.matching`
(matchers and the ``Matches`` result), :mod:`~densecontrast.weighting` (PixCon-SR),
:mod:`~densecontrast.losses`, :mod:`~densecontrast.heads`, :mod:`~densecontrast.queue`,
:mod:`~densecontrast.ema`, :mod:`~densecontrast.schedules`, :mod:`~densecontrast.distributed`,
:mod:`~densecontrast.data`, :mod:`~densecontrast.eval`, :mod:`~densecontrast.engine` and the
optional :mod:`~densecontrast.viz` (matplotlib).
"""

from densecontrast.geometry import ViewGeometry, in_box_mask
from densecontrast.matching import Matches

__version__ = "0.1.0"

__all__ = ["Matches", "ViewGeometry", "__version__", "in_box_mask"]
