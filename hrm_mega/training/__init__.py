"""Training: DeepSpeed engine set-up, the ACT pretraining loop and logging. Checkpoint I/O is in
hrm_mega.checkpoint."""
