"""Gemma 3 (Hugging Face transformers `Gemma3ForCausalLM`) <-> HRMGemma: configs and state dicts.

One explicit key map, HF name -> ours, with `{i}` the HF layer index and `{layer}` where that layer
lives in HRMGemma: HF layer i is position j = i mod (k+1) of group g = i div (k+1); j < k is
`blocks.{g}.L.layers.{j}`, j = k is the group's global layer `blocks.{g}.H.layers.0`, and layers past
the last complete group are `tail.layers.{j}`. No tensor is permuted: both sides use the rotate-half
RoPE convention and the same [out, in] linear layout, so every weight is copied as is.

HRMGemma's own parameters (the CycleBlock gates, halting heads, value head) have no HF counterpart.
Import fills them with their initial constants (all zero: the imported model is exactly Gemma 3);
export drops them, which is exact only with h_cycles = l_cycles = 1 (or all gates zero, see
`plain_gemma3_blocker`) and is refused otherwise.

A multimodal Gemma3ForConditionalGeneration checkpoint holds the same text decoder under other
prefixes; `text_state_dict` renames it to the Gemma3ForCausalLM names and leaves the vision tower out.
Reading checkpoint directories and writing exports is in hf_import.py and hf_export.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hrm_mega.config import LMModelConfig
from hrm_mega.models.lm import HRMGemma, is_hrm_only

TOP_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",  # only when the head is not tied to the embedding
}
LAYER_KEYS = {
    "model.layers.{i}.self_attn.q_proj.weight": "{layer}.mixer.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "{layer}.mixer.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "{layer}.mixer.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "{layer}.mixer.o_proj.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "{layer}.mixer.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "{layer}.mixer.k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "{layer}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "{layer}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "{layer}.mlp.down_proj.weight",
    # sandwich norms, in the order TransformerBlock keeps them
    "model.layers.{i}.input_layernorm.weight": "{layer}.norms.0.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "{layer}.norms.1.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "{layer}.norms.2.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "{layer}.norms.3.weight",
}
HF_ACTIVATION = "gelu_pytorch_tanh"
# Gemma3ForConditionalGeneration: text decoder prefixes (transformers 5 layout, then the 4.x one) -> ours
MULTIMODAL_TEXT_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
MULTIMODAL_VISION_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "vision_tower.",
    "multi_modal_projector.",
)


def layer_prefix(i: int, config: LMModelConfig) -> str:
    """Where HF layer i lives in HRMGemma."""
    g, j = divmod(i, config.group_size)
    if g >= config.num_groups:
        return f"tail.layers.{i - config.num_groups * config.group_size}"
    return f"blocks.{g}.H.layers.0" if j == config.local_per_global else f"blocks.{g}.L.layers.{j}"


def key_map(config: LMModelConfig) -> dict[str, str]:
    """Every HF key of a Gemma3ForCausalLM of this shape -> our key (the tied lm_head excluded)."""
    mapping = {
        hf: ours for hf, ours in TOP_KEYS.items() if hf != "lm_head.weight" or not config.tie_embeddings
    }
    for i in range(config.num_layers):
        layer = layer_prefix(i, config)
        for hf, ours in LAYER_KEYS.items():
            mapping[hf.format(i=i)] = ours.format(layer=layer)
    return mapping


def plain_gemma3_blocker(state: dict[str, torch.Tensor], config: LMModelConfig) -> str | None:
    """Why these weights are not exactly a Gemma3ForCausalLM, or None when they are.

    They are with h_cycles = l_cycles = 1, or with gated injection and every gate exactly zero: then each
    cycle recomputes H(L(x)) bit for bit and the extra cycles change nothing.
    """
    if config.h_cycles == 1 and config.l_cycles == 1:
        return None
    cycles = f"model.h_cycles={config.h_cycles}, model.l_cycles={config.l_cycles}"
    if config.injection != "gated":
        return f"{cycles} with model.injection={config.injection} feeds z_H back into every cycle"
    for name, tensor in state.items():
        if name.rsplit(".", 1)[-1] in ("gate_LL", "gate_LH", "gate_HH") and bool(tensor.any()):
            return f"{cycles} and {name} is nonzero, so the cycles change the output"
    return None


def _our_parameters(config: LMModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters by name, on the meta device (shapes and init rules, no storage)."""
    with torch.device("meta"):
        return dict(HRMGemma(config).named_parameters())


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def text_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Gemma3ForConditionalGeneration state dict -> its text decoder under Gemma3ForCausalLM names.

    The vision tower and projector are left out; any other key is kept as is (so an unexpected one is
    still reported by from_hf_state_dict)."""
    out = {}
    for key, tensor in hf_sd.items():
        if key.startswith(MULTIMODAL_VISION_PREFIXES):
            continue
        prefix = next((p for p in MULTIMODAL_TEXT_PREFIXES if key.startswith(p)), None)
        out[key if prefix is None else MULTIMODAL_TEXT_PREFIXES[prefix] + key[len(prefix) :]] = tensor
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: LMModelConfig) -> dict[str, torch.Tensor]:
    """A Gemma3ForCausalLM state dict -> a complete HRMGemma state dict (load it with strict=True)."""
    mapping, ours = key_map(config), _our_parameters(config)
    hf_sd = dict(hf_sd)
    if config.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # HF lists the tied head under its own name too
    for key in hf_sd:
        if key not in mapping:
            raise ValueError(
                f"from_hf_state_dict: unexpected key {key} for a {config.num_layers}-layer Gemma 3"
            )
    out = _take(
        hf_sd,
        [(hf_key, our_key, ours[our_key].shape) for hf_key, our_key in mapping.items()],
        "from_hf_state_dict",
        "{src} has shape {got} but {dst} needs {want}; does the config match the checkpoint?",
    )
    dtype = out["embed_tokens.weight"].dtype
    for name, param in ours.items():
        if name in out:
            continue
        rule = getattr(param, "_hrm_init", None)
        if not is_hrm_only(name) or rule is None or rule.kind != "constant":
            raise ValueError(f"from_hf_state_dict: {name} has no Gemma 3 source and no constant init")
        out[name] = torch.full(param.shape, rule.value, dtype=dtype)
    if len(out) != len(ours):
        raise ValueError(f"from_hf_state_dict: built {len(out)} tensors, HRMGemma has {len(ours)}")
    return out


def _take(
    sd: dict[str, torch.Tensor], moves: list[tuple[str, str, torch.Size]], name: str, mismatch: str
) -> dict[str, torch.Tensor]:
    """{dst: sd[src]} for each (src, dst, shape) move; a missing src or another shape raises, the latter
    with `mismatch` formatted with src, dst, got and want."""
    out: dict[str, torch.Tensor] = {}
    for src, dst, want in moves:
        if src not in sd:
            raise ValueError(f"{name}: missing key {src}")
        if sd[src].shape != want:
            got = tuple(sd[src].shape)
            raise ValueError(f"{name}: " + mismatch.format(src=src, dst=dst, got=got, want=tuple(want)))
        out[dst] = sd[src]
    return out


def to_hf_state_dict(our_sd: dict[str, torch.Tensor], config: LMModelConfig) -> dict[str, torch.Tensor]:
    """An HRMGemma state dict -> a Gemma3ForCausalLM state dict (exact only at N = T = 1, so required)."""
    if config.h_cycles != 1 or config.l_cycles != 1:
        raise ValueError(
            f"to_hf_state_dict: model.h_cycles={config.h_cycles}, model.l_cycles={config.l_cycles}; "
            "a plain Gemma3ForCausalLM computes the model only at h_cycles=l_cycles=1"
        )
    mapping, ours = key_map(config), _our_parameters(config)
    for key in our_sd:
        if key not in ours:
            raise ValueError(f"to_hf_state_dict: unexpected key {key} for this HRMGemma config")
    out = _take(
        our_sd,
        [(our_key, hf_key, ours[our_key].shape) for hf_key, our_key in mapping.items()],
        "to_hf_state_dict",
        "{src} has shape {got}, expected {want}",
    )
    if config.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    dropped = [k for k in ours if k not in mapping.values()]
    if any(not is_hrm_only(k) for k in dropped):
        raise ValueError(f"to_hf_state_dict: {dropped[0]} has no Gemma 3 counterpart")
    return out


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: Any, **hrm_fields: Any) -> LMModelConfig:
    """A Gemma3TextConfig (or a multimodal Gemma3Config's text part) -> LMModelConfig.

    hrm_fields set the HRM-only fields (h_cycles, l_cycles, halting, value_head, ...); the Gemma fields
    come from the HF config, which must describe a model HRMGemma computes exactly.
    """
    hf = getattr(hf_config, "text_config", None) or hf_config
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(hf, name, None) is not None:
            raise ValueError(
                f"config_from_hf: {name}={getattr(hf, name)} is not supported (Gemma 3 has none)"
            )
    if getattr(hf, "attention_bias", False) or getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("config_from_hf: attention_bias and use_bidirectional_attention must be false")
    if hf.hidden_activation != HF_ACTIVATION:
        raise ValueError(
            f"config_from_hf: hidden_activation={hf.hidden_activation!r}; expected {HF_ACTIVATION!r}"
        )
    k = _local_per_global(list(hf.layer_types))
    local, full = hf.rope_parameters["sliding_attention"], hf.rope_parameters["full_attention"]
    local_type, full_type = local.get("rope_type", "default"), full.get("rope_type", "default")
    if local_type != "default" or full_type not in ("default", "linear"):
        raise ValueError(
            f"config_from_hf: rope types sliding={local_type!r} full={full_type!r}; "
            "supported: default for sliding layers, default or linear for full layers"
        )
    rope_scaling = float(full.get("factor", 1.0)) if full_type == "linear" else 1.0
    fields = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim, query_pre_attn_scalar=int(hf.query_pre_attn_scalar),
        sliding_window=hf.sliding_window, local_per_global=k, rope_local_base=float(local["rope_theta"]),
        rope_global_base=float(full["rope_theta"]), rope_scaling=rope_scaling, rms_norm_eps=hf.rms_norm_eps,
        max_position=hf.max_position_embeddings, tie_embeddings=bool(hf.tie_word_embeddings),
    )  # fmt: skip
    unknown = [name for name in hrm_fields if name not in {f.name for f in dataclasses.fields(LMModelConfig)}]
    if unknown:
        raise ValueError(f"config_from_hf: unknown LMModelConfig field {unknown[0]}")
    config = LMModelConfig(**{**fields, **hrm_fields})
    config.validate()
    return config


def _local_per_global(layer_types: list[str]) -> int:
    """k for a layer_types list of the form (k sliding, 1 full) repeated, then up to k sliding."""
    if "full_attention" not in layer_types:
        raise ValueError("config_from_hf: layer_types has no full_attention layer")
    k = layer_types.index("full_attention")
    expected = [
        "full_attention" if (i + 1) % (k + 1) == 0 else "sliding_attention" for i in range(len(layer_types))
    ]
    if k == 0 or layer_types != expected:
        raise ValueError(
            f"config_from_hf: layer_types is not a repeated pattern of k sliding layers then 1 full layer "
            f"(first full layer at index {k})"
        )
    return k


def hf_config_from(config: LMModelConfig) -> Any:
    """The Gemma3TextConfig of the Gemma 3 that HRMGemma computes at N = T = 1."""
    from transformers import Gemma3TextConfig

    full: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_global_base}
    if config.rope_scaling != 1.0:
        full = {"rope_type": "linear", "factor": config.rope_scaling, "rope_theta": config.rope_global_base}
    return Gemma3TextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
        layer_types=[f"{'full' if kind == 'global' else 'sliding'}_attention" for kind in config.layer_kinds],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base},
            "full_attention": full,
        },
        rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position,
        tie_word_embeddings=config.tie_embeddings, hidden_activation=HF_ACTIVATION,
        final_logit_softcapping=None, attn_logit_softcapping=None,
    )  # fmt: skip
