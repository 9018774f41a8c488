"""Small helpers the reference scripts' loops call: launch, command line, checkpoints, logging (``docs/training.md``).

No trainer to subclass and no callbacks: each ``examples/<method>/train.py`` writes its loop out.
"""

from densecontrast.engine.checkpoint import (
    CHECKPOINT_NAME,
    export_backbone,
    load_checkpoint,
    load_training_state,
    resolve_resume,
    save_checkpoint,
    save_training_state,
)
from densecontrast.engine.cli import (
    AMP_DTYPES,
    RunError,
    add_common_args,
    backbone_options,
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
    wrap_ddp,
)
from densecontrast.engine.run_log import RunLog

__all__ = [
    "AMP_DTYPES",
    "CHECKPOINT_NAME",
    "DistInfo",
    "PreemptionHandler",
    "RunError",
    "RunLog",
    "add_common_args",
    "backbone_options",
    "build_pretraining_loader",
    "checkpointable_args",
    "cleanup",
    "export_backbone",
    "init_distributed",
    "load_checkpoint",
    "load_training_state",
    "parse_with_presets",
    "resolve_resume",
    "save_checkpoint",
    "save_training_state",
    "schedule_length",
    "skipped_images",
    "start_run",
    "wrap_ddp",
]
