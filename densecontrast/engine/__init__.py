"""Training-loop infrastructure shared by the reference scripts: launch, logging, checkpoints, optimizers.

Modelled on the helpers of torchvision's classification reference scripts, packaged so that each
``examples/<method>/train.py`` stays short. See ``docs/training.md`` for how the pieces fit.

* :mod:`~densecontrast.engine.launch`: ``init_distributed``, ``setup_for_distributed``,
  ``seed_everything``, ``PreemptionHandler``, ``cleanup``.
* :mod:`~densecontrast.engine.metrics`: ``SmoothedValue``, ``MetricLogger``, ``JsonlWriter``,
  ``TensorBoardWriter``, ``progress_bar``.
* :mod:`~densecontrast.engine.checkpoint`: atomic ``save_checkpoint``, weights-only
  ``load_checkpoint``, ``rng_state`` / ``set_rng_state``, ``resolve_resume``, ``export_backbone``.
* :mod:`~densecontrast.engine.optim`: ``LARS``, ``param_groups_weight_decay``, ``scale_lr``,
  ``WarmupCosineScheduler``.
* :mod:`~densecontrast.engine.backbones`: ``build_backbone`` (ResNets, ``TinyConvNet``),
  ``convert_sync_batchnorm``.
"""

from densecontrast.distributed import unwrap_model
from densecontrast.engine.backbones import BACKBONES, ResNetTrunk, TinyConvNet, build_backbone, convert_sync_batchnorm
from densecontrast.engine.checkpoint import (
    checkpoint_path,
    export_backbone,
    gather_rng_states,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    save_on_main,
    set_rng_state,
)
from densecontrast.engine.launch import (
    DistInfo,
    PreemptionHandler,
    cleanup,
    init_distributed,
    is_main_process,
    seed_everything,
    setup_for_distributed,
)
from densecontrast.engine.metrics import JsonlWriter, MetricLogger, SmoothedValue, TensorBoardWriter, progress_bar
from densecontrast.engine.optim import LARS, WarmupCosineScheduler, param_groups_weight_decay, scale_lr

__all__ = [
    "BACKBONES",
    "LARS",
    "DistInfo",
    "JsonlWriter",
    "MetricLogger",
    "PreemptionHandler",
    "ResNetTrunk",
    "SmoothedValue",
    "TensorBoardWriter",
    "TinyConvNet",
    "WarmupCosineScheduler",
    "build_backbone",
    "checkpoint_path",
    "cleanup",
    "convert_sync_batchnorm",
    "export_backbone",
    "gather_rng_states",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "param_groups_weight_decay",
    "progress_bar",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_on_main",
    "scale_lr",
    "seed_everything",
    "set_rng_state",
    "setup_for_distributed",
    "unwrap_model",
]
