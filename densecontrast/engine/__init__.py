"""Small helpers the reference scripts' training loops call: launch, command line, checkpoints, logging.

No trainer to subclass and no callbacks: each ``examples/<method>/train.py`` writes its loop out
and calls these plain functions and small objects. See ``docs/training.md``.

* :mod:`~densecontrast.engine.launch`: ``init_distributed`` (torchrun / SLURM), ``seed_everything``,
  ``wrap_ddp``, ``PreemptionHandler``, ``cleanup``.
* :mod:`~densecontrast.engine.cli`: ``add_common_args``, ``parse_with_presets``, ``start_run``,
  ``build_pretraining_loader``, ``schedule_length``, ``checkpointable_args``, ``AMP_DTYPES``.
* :mod:`~densecontrast.engine.checkpoint`: atomic ``save_checkpoint``, weights-only
  ``load_checkpoint``, ``save_training_state`` / ``load_training_state``, ``resolve_resume``,
  RNG states, ``export_backbone``.
* :mod:`~densecontrast.engine.run_log`: ``RunLog`` (console, progress bar, JSON lines, TensorBoard).
"""

from densecontrast.engine.checkpoint import (
    CHECKPOINT_NAME,
    export_backbone,
    gather_rng_states,
    load_checkpoint,
    load_training_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)
from densecontrast.engine.cli import (
    AMP_DTYPES,
    add_common_args,
    build_pretraining_loader,
    checkpointable_args,
    parse_with_presets,
    schedule_length,
    skipped_images,
    start_run,
)
from densecontrast.engine.launch import (
    DistInfo,
    PreemptionHandler,
    cleanup,
    init_distributed,
    seed_everything,
    wrap_ddp,
)
from densecontrast.engine.run_log import RunLog

__all__ = [
    "AMP_DTYPES",
    "CHECKPOINT_NAME",
    "DistInfo",
    "PreemptionHandler",
    "RunLog",
    "add_common_args",
    "build_pretraining_loader",
    "checkpointable_args",
    "cleanup",
    "export_backbone",
    "gather_rng_states",
    "init_distributed",
    "load_checkpoint",
    "load_training_state",
    "parse_with_presets",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_training_state",
    "schedule_length",
    "seed_everything",
    "set_rng_state",
    "skipped_images",
    "start_run",
    "wrap_ddp",
]
