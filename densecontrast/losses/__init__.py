"""Dense and global self-supervised losses; every dense loss reads :class:`~densecontrast.matching.Matches`.

One file per family: ``dense_infonce`` (DenseCL / PixCon, memory-efficient with a queue),
``global_losses`` (MoCo v2 InfoNCE, BYOL, SimSiam negative cosine), ``pixcontrast``
(multi-positive InfoNCE), ``pixpro`` (pixel-propagation consistency), ``local_contrastive``
(LC-loss) and ``dense_simsiam`` (DenseSiam PixSim and RegionSim); ``reduction`` holds the shared
weighted mean over valid queries.
"""

from densecontrast.losses.dense_infonce import DenseInfoNCE, dense_info_nce
from densecontrast.losses.dense_simsiam import (
    DenseSimSiamLoss,
    RegionSimLoss,
    dense_simsiam_loss,
    region_embeddings,
    region_sim_loss,
)
from densecontrast.losses.global_losses import BYOLLoss, InfoNCE, NegativeCosine, byol_loss, info_nce, negative_cosine
from densecontrast.losses.local_contrastive import LocalContrastiveLoss, local_contrastive_loss
from densecontrast.losses.pixcontrast import PixContrastLoss, pix_contrast
from densecontrast.losses.pixpro import PixProConsistencyLoss, pixpro_consistency_loss
from densecontrast.losses.reduction import weighted_mean

__all__ = [
    "BYOLLoss",
    "DenseInfoNCE",
    "DenseSimSiamLoss",
    "InfoNCE",
    "LocalContrastiveLoss",
    "NegativeCosine",
    "PixContrastLoss",
    "PixProConsistencyLoss",
    "RegionSimLoss",
    "byol_loss",
    "dense_info_nce",
    "dense_simsiam_loss",
    "info_nce",
    "local_contrastive_loss",
    "negative_cosine",
    "pix_contrast",
    "pixpro_consistency_loss",
    "region_embeddings",
    "region_sim_loss",
    "weighted_mean",
]
