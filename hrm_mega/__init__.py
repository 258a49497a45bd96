"""hrm-mega: a Megatron/DeepSpeed-class trainer for recursive-reasoning models (HRM, TRM, HRMGemma)."""

__version__ = "0.1.0"
