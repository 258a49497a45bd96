"""Training: DeepSpeed engine set-up, the ACT pretraining loop, checkpoints and logging."""
