"""Model code, written for a single device; parallelism is applied from outside (see docs/architecture.md)."""

from __future__ import annotations

from torch import nn

from hrm_mega.config import LMModelConfig, PuzzleModelConfig


def build_model(config: PuzzleModelConfig | LMModelConfig) -> nn.Module:
    """The model of a recipe's `model:` section: a RecursiveReasoner (puzzle) or an HRMGemma (hrm_gemma).
    Parameters are left uninitialised (call `init_weights(seed)` or load a state dict)."""
    if config.family == "hrm_gemma":
        from hrm_mega.models.lm import HRMGemma

        return HRMGemma(config)
    from hrm_mega.models.puzzle import RecursiveReasoner

    return RecursiveReasoner(config)
