"""The model section of a run config, one dataclass per model family: PuzzleModelConfig
(RecursiveReasoner) and LMModelConfig (HRMGemma).

This module and schema.py are all of the config that remote-code Hugging Face exports ship (next to the
model code that reads them); nothing here knows about training, data or RL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from hrm_mega.config.schema import ConfigError, build, positive, suggest


def swiglu_intermediate(hidden: int, expansion: float, multiple: int = 256) -> int:
    """HRM's SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256."""
    inter = round(expansion * hidden * 2 / 3)
    return -(inter // -multiple) * multiple


@dataclass
class PuzzleModelConfig:
    """RecursiveReasoner: the HRM-ACT-v1 / TRM puzzle model (docs/architecture.md)."""

    family: Literal["puzzle"] = "puzzle"
    # Data-dependent sizes; recipes state them and training checks them against the manifest.
    vocab_size: int = 11
    seq_len: int = 81
    num_puzzle_identifiers: int = 1
    # Transformer
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    rms_norm_eps: float = 1e-5
    pos_encoding: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = 10000.0
    token_mixer: Literal["attention", "mlp"] = "attention"  # TRM's attention-free "mlp_t" variant
    # Recurrence: a CycleBlock with an L module run l_cycles times per H update, h_cycles times.
    h_layers: int = 4
    l_layers: int = 4
    h_cycles: int = 2
    l_cycles: int = 2
    shared_net: bool = False  # TRM: one network serves as both L and H
    grad_mode: Literal["one_step", "last_cycle", "full"] = "one_step"
    injection: Literal["add", "gated", "gated_rms"] = "add"
    # Puzzle embedding prefix: puzzle_emb_ndim values spread over puzzle_emb_len positions.
    puzzle_emb_ndim: int = 512
    puzzle_emb_len: int = 0  # 0 = ceil(puzzle_emb_ndim / hidden_size), as HRM; TRM uses 16
    # ACT
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    q_target: Literal["bootstrap", "halt_only"] = "bootstrap"
    # Where q_halt is read: "first" = a linear head on position 0 (HRM, TRM); "cells" = a per-cell MLP
    # that estimates whether each answer cell is right, q_halt = logit(prod of those probabilities)
    # (docs/configs.md, "Halting"; halt_only targets).
    q_head: Literal["first", "cells"] = "first"
    # Inference's halting rule (adaptive evaluation, RL rollouts; training halts by the q_target's rule):
    # 0 = the q_target's (q_halt > 0, or q_halt > q_continue); in (0, 1): halt once sigmoid(q_halt) >
    # halt_threshold (higher: more segments, fewer early mistakes).
    halt_threshold: float = 0.0
    loss: Literal["stablemax", "softmax"] = "stablemax"

    @property
    def prefix_len(self) -> int:
        if self.puzzle_emb_len > 0:
            return self.puzzle_emb_len
        return -(self.puzzle_emb_ndim // -self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        positive(self, "model", "vocab_size", "seq_len", "num_puzzle_identifiers", "hidden_size", "num_heads")
        positive(self, "model", "h_cycles", "l_cycles", "l_layers", "halt_max_steps")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.hidden_size/num_heads={self.head_dim} must be even for rope")
        if not self.shared_net and self.h_layers < 1:
            raise ConfigError("model.h_layers must be >= 1 unless model.shared_net=true (TRM)")
        if self.expansion <= 0:
            raise ConfigError(f"model.expansion={self.expansion} must be > 0")
        if self.puzzle_emb_ndim < 0 or self.puzzle_emb_len < 0:
            raise ConfigError("model.puzzle_emb_ndim and model.puzzle_emb_len must be >= 0")
        if self.puzzle_emb_ndim > self.prefix_len * self.hidden_size:
            raise ConfigError(
                f"model.puzzle_emb_ndim={self.puzzle_emb_ndim} does not fit in model.puzzle_emb_len="
                f"{self.puzzle_emb_len} positions of model.hidden_size={self.hidden_size}"
            )
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ConfigError(f"model.halt_exploration_prob={self.halt_exploration_prob} must be in [0, 1]")
        if not 0.0 <= self.halt_threshold < 1.0:
            raise ConfigError(
                f"model.halt_threshold={self.halt_threshold} must be in [0, 1) (0: the q_target's rule)"
            )
        if self.q_head == "cells" and self.q_target != "halt_only":
            raise ConfigError(
                "model.q_head=cells estimates q_halt only; set model.q_target=halt_only (or model.q_head=first)"
            )
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps} must be > 0")


@dataclass
class VisionConfig:
    """HRMGemma's image encoder (model.vision): a SigLIP vision tower and Gemma 3's multimodal projector.

    Defaults are Gemma 3 4B-27B's (SigLIP So400m at 896 px, patch 14; 256 tokens per image) and its token
    ids. An image is one run of mm_tokens_per_image image_token_id placeholders in a row; the features
    replace their embeddings (docs/architecture.md, "Vision").
    """

    image_size: int = 896  # pixels per side of the (square) input image
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6  # the tower's LayerNorms and the projector's RMSNorm
    # Tokens per image: the patch grid average-pooled to sqrt(mm_tokens_per_image) per side.
    mm_tokens_per_image: int = 256
    image_token_id: int = 262144  # the placeholder an image's features replace (may be >= vocab_size)
    boi_token_id: int = 255999  # <start_of_image>, an ordinary text token before each image
    eoi_token_id: int = 256000  # <end_of_image>, after it
    # false: the vision tower is frozen (Gemma 3's recipe); the projector is always trained.
    trainable: bool = False

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    def validate(self, text_vocab_size: int | None = None) -> None:
        positive(self, "model.vision", "image_size", "patch_size", "hidden_size", "intermediate_size")
        positive(self, "model.vision", "num_layers", "num_heads", "mm_tokens_per_image")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.patch_size={self.patch_size} does not divide model.vision.image_size={self.image_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.vision.num_heads={self.num_heads} does not divide model.vision.hidden_size={self.hidden_size}"
            )
        if self.tokens_per_side**2 != self.mm_tokens_per_image:
            raise ConfigError(f"model.vision.mm_tokens_per_image={self.mm_tokens_per_image} must be a square")
        if self.patches_per_side % self.tokens_per_side:
            raise ConfigError(
                f"model.vision.mm_tokens_per_image={self.mm_tokens_per_image}: its side {self.tokens_per_side} "
                f"must divide the {self.patches_per_side} patches per side (image_size / patch_size)"
            )
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"model.vision.layer_norm_eps={self.layer_norm_eps} must be > 0")
        ids = {"image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
               "eoi_token_id": self.eoi_token_id}  # fmt: skip
        if len(set(ids.values())) != 3 or min(ids.values()) < 0:
            raise ConfigError(f"model.vision token ids {ids} must be distinct and >= 0")
        for name in ("boi_token_id", "eoi_token_id"):
            if text_vocab_size is not None and ids[name] >= text_vocab_size:
                raise ConfigError(
                    f"model.vision.{name}={ids[name]} must be < model.vocab_size={text_vocab_size} (it is embedded)"
                )


@dataclass
class LMModelConfig:
    """HRMGemma: the Gemma 3 text decoder with each local-global group wrapped in a CycleBlock (docs/architecture.md).

    Defaults are Gemma 3 1B at N = T = 1, i.e. exactly Gemma 3; recipes under configs/lm/ set the rest.
    """

    family: Literal["hrm_gemma"] = "hrm_gemma"
    vocab_size: int = 262144
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_layers: int = 26
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: int = 256  # attention scores are scaled by query_pre_attn_scalar**-0.5
    sliding_window: int = 512  # local layers see keys at distance < sliding_window
    # Packed training rows (several documents a row): "documents" attends within each document
    # separately, with no [seq, seq] mask and no score across documents (models/attention.py,
    # DocumentRuns); "mask" builds the dense document mask (the reference; more memory and work).
    packed_attention: Literal["documents", "mask"] = "documents"
    local_per_global: int = 5  # the layer pattern: this many local layers, then one global layer
    rope_local_base: float = 10000.0
    rope_global_base: float = 1000000.0
    rope_scaling: float = 1.0  # linear RoPE scaling factor of the global layers (1 = none; 8 for 4B+)
    rms_norm_eps: float = 1e-6
    max_position: int = 32768
    tie_embeddings: bool = True
    # Recurrence: every group runs its local layers (L) l_cycles times per global-layer (H) update, h_cycles times.
    h_cycles: int = 1
    l_cycles: int = 1
    # "full" backpropagates through every cycle (exact gradient; at N = T = 1 all modes coincide);
    # "one_step" / "last_cycle" keep training memory flat in the number of cycles.
    grad_mode: Literal["one_step", "last_cycle", "full"] = "full"
    # gated (zero-init) keeps an imported Gemma 3 exact; gated_rms feeds the states back RMS-normalised
    # (bounded however many cycles run, so the state can converge; exact at zero gates): models/recurrence.py
    injection: Literal["add", "gated", "gated_rms"] = "gated"
    # Starting value of every injection gate (gated): 0 keeps an imported Gemma 3 exact, but cycles of a
    # model trained from scratch then start as copies of one pass; 1 (the `add` sums, trainable) makes
    # every cycle read the previous one's state from the first step (docs/benchmarks.md, cycles scaling).
    gate_init: float = 0.0
    # Truncated backprop (grad_mode full only): differentiate the last grad_cycles H cycles of every
    # block, the earlier ones run under no_grad; 0 = every cycle.
    grad_cycles: int = 0
    # Deep supervision across cycles (training): the next-token CE is the mean over the readouts after
    # every H cycle of the last CycleBlock (each through the tail, norm and head), not the last one only.
    # Data with due cycles (prep text --due-field) trains each target from its due cycle on (lm_loss).
    deep_supervision: bool = False
    # Halting: a head per CycleBlock predicts "converged" (the next H update would change z_H by less
    # than halt_tolerance, relative); training adds its BCE and an expected-compute cost.
    # halt_target "correct" (with deep_supervision): on labelled tokens (not hidden targets) the last
    # CycleBlock's head is trained on "the readout after this cycle predicts the label, and so does every
    # later one" (HRM's Q-halt target, per token), the others keep "converged" (lm_loss).
    halt_target: Literal["converged", "correct"] = "converged"
    halt_tolerance: float = 0.01
    halt_loss_weight: float = 0.1
    compute_cost_weight: float = 0.01
    value_head: bool = False  # a scalar head on the final hidden states (PPO critic)
    # Images (model.vision.*): a SigLIP tower and projector whose features replace image placeholder
    # tokens in the one residual stream; absent (null) = a text-only model.
    vision: VisionConfig | None = None

    @property
    def group_size(self) -> int:
        return self.local_per_global + 1

    @property
    def num_groups(self) -> int:
        """Complete local-global groups; each becomes one CycleBlock."""
        return self.num_layers // self.group_size

    @property
    def num_tail_layers(self) -> int:
        """Trailing local layers after the last global one (Gemma 3 1B: 26 = 4 x 6 + 2)."""
        return self.num_layers % self.group_size

    @property
    def layer_kinds(self) -> list[str]:
        """The kind of every layer, in order: "local" or "global"."""
        return ["global" if (i + 1) % self.group_size == 0 else "local" for i in range(self.num_layers)]

    def validate(self) -> None:
        positive(self, "model", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        positive(self, "model", "num_kv_heads", "head_dim", "query_pre_attn_scalar", "sliding_window")
        positive(self, "model", "local_per_global", "max_position", "h_cycles", "l_cycles")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rope")
        if self.num_layers < self.group_size:
            raise ConfigError(
                f"model.num_layers={self.num_layers} is fewer than one local-global group "
                f"(model.local_per_global+1={self.group_size})"
            )
        for name in ("rope_local_base", "rope_global_base", "rope_scaling", "rms_norm_eps", "halt_tolerance"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.grad_cycles < 0 or (self.grad_cycles and self.grad_mode != "full"):
            raise ConfigError(
                f"model.grad_cycles={self.grad_cycles} must be >= 0, and > 0 only with model.grad_mode=full "
                f"(got {self.grad_mode})"
            )
        if not math.isfinite(self.gate_init) or (self.gate_init and self.injection == "add"):
            raise ConfigError(
                f"model.gate_init={self.gate_init} must be finite, and non-zero only with model.injection "
                "gated or gated_rms"
            )
        for name in ("halt_loss_weight", "compute_cost_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")
        if self.halt_target == "correct" and not self.deep_supervision:
            raise ConfigError(
                "model.halt_target=correct needs model.deep_supervision=true (the readouts after every "
                "cycle it compares with the labels)"
            )
        if self.vision is not None:
            self.vision.validate(self.vocab_size)


MODEL_FAMILIES: dict[str, type[PuzzleModelConfig] | type[LMModelConfig]] = {
    "puzzle": PuzzleModelConfig,
    "hrm_gemma": LMModelConfig,
}


def model_config_from_dict(raw: dict[str, Any]) -> PuzzleModelConfig | LMModelConfig:
    """The model section of its family (model.family, default puzzle) from a dict; not validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"model must be a mapping, got {type(raw).__name__}")
    family = raw.get("family", "puzzle")
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"model.family={family!r} is unknown{suggest(family, MODEL_FAMILIES)}")
    return build(MODEL_FAMILIES[family], raw, "model")
