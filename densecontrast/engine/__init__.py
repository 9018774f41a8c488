"""Training-loop infrastructure shared by the reference scripts: launch, logging, checkpoints, optimizers."""
