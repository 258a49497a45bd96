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
prefixes, plus the SigLIP vision tower and the projector. `multimodal_state_dict` renames the decoder
to the Gemma3ForCausalLM names and the vision part to `vision_tower.*` / `multi_modal_projector.*`
(transformers 5's layout, from any of the layouts checkpoints use), or leaves the vision part out for a
text-only HRMGemma. With model.vision set, the key map covers it too (VISION_KEYS, VISION_LAYER_KEYS).
The one tensor that is not copied as is: the projector's weight, which HF applies as x @ W [vision,
text] and our nn.Linear as x @ W^T, so it is transposed both ways. SigLIP's pooling head, which Gemma 3
never runs, is dropped.
Reading checkpoint directories and writing exports is in hf_import.py and hf_export.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hrm_mega.config import LMModelConfig
from hrm_mega.config.model import VisionConfig
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
# Gemma 3's image processor settings: import-hf keeps a multimodal checkpoint's, export-hf writes them back
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# Gemma3ForConditionalGeneration: text decoder prefixes (transformers 5 layout, then the 4.x one) -> ours
MULTIMODAL_TEXT_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
# ... and the vision part: every layout -> transformers 5's (what save_pretrained writes); longest first
MULTIMODAL_VISION_PREFIXES = {
    "model.vision_tower.vision_model.": "vision_tower.",
    "vision_tower.vision_model.": "vision_tower.",
    "model.vision_tower.": "vision_tower.",
    "vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "multi_modal_projector.": "multi_modal_projector.",
}
UNUSED_VISION_PREFIX = "vision_tower.head."  # SigLIP's attention-pooling head: Gemma 3 does not use it
VISION_KEYS = {
    "vision_tower.embeddings.patch_embedding.weight": "vision.tower.patch_embedding.weight",
    "vision_tower.embeddings.patch_embedding.bias": "vision.tower.patch_embedding.bias",
    "vision_tower.embeddings.position_embedding.weight": "vision.tower.position_embedding",
    "vision_tower.post_layernorm.weight": "vision.tower.post_layernorm.weight",
    "vision_tower.post_layernorm.bias": "vision.tower.post_layernorm.bias",
    "multi_modal_projector.mm_soft_emb_norm.weight": "vision.projector.norm.weight",
    "multi_modal_projector.mm_input_projection_weight": "vision.projector.proj.weight",  # transposed
}
TRANSPOSED = ("multi_modal_projector.mm_input_projection_weight",)
VISION_LAYER_KEYS = {
    f"vision_tower.encoder.layers.{{i}}.{name}.{kind}": f"vision.tower.layers.{{i}}.{name}.{kind}"
    for name in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )  # fmt: skip
    for kind in ("weight", "bias")
}


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
    if config.vision is not None:
        mapping.update(VISION_KEYS)
        for i in range(config.vision.num_layers):
            mapping.update({hf.format(i=i): ours.format(i=i) for hf, ours in VISION_LAYER_KEYS.items()})
    return mapping


def plain_gemma3_blocker(state: dict[str, torch.Tensor], config: LMModelConfig) -> str | None:
    """Why these weights are not exactly a Gemma3ForCausalLM, or None when they are.

    They are with h_cycles = l_cycles = 1, or with gated (or gated_rms) injection and every gate exactly
    zero: then each cycle recomputes H(L(x)) bit for bit and the extra cycles change nothing.
    """
    if config.h_cycles == 1 and config.l_cycles == 1:
        return None
    cycles = f"model.h_cycles={config.h_cycles}, model.l_cycles={config.l_cycles}"
    if config.injection == "add":
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


def multimodal_state_dict(hf_sd: dict[str, torch.Tensor], vision: bool = True) -> dict[str, torch.Tensor]:
    """A Gemma3ForConditionalGeneration state dict -> its text decoder under Gemma3ForCausalLM names, and
    (vision=True) its vision tower and projector under `vision_tower.` / `multi_modal_projector.`.

    With vision=False the vision part is left out (a text-only import). SigLIP's pooling head is always
    left out. Any other key is kept as is, so an unexpected one is still reported by from_hf_state_dict."""
    out = {}
    for key, tensor in hf_sd.items():
        renames = MULTIMODAL_TEXT_PREFIXES
        if key.startswith(tuple(MULTIMODAL_VISION_PREFIXES)):
            if not vision:
                continue
            renames = MULTIMODAL_VISION_PREFIXES
        prefix = next((p for p in renames if key.startswith(p)), None)
        key = key if prefix is None else renames[prefix] + key[len(prefix) :]
        if not key.startswith(UNUSED_VISION_PREFIX):
            out[key] = tensor
    return out


def text_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Gemma3ForConditionalGeneration state dict -> its text decoder under Gemma3ForCausalLM names."""
    return multimodal_state_dict(hf_sd, vision=False)


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: LMModelConfig) -> dict[str, torch.Tensor]:
    """A Gemma3ForCausalLM state dict (with model.vision: a multimodal_state_dict) -> a complete HRMGemma
    state dict (load it with strict=True)."""
    mapping, ours = key_map(config), _our_parameters(config)
    hf_sd = dict(hf_sd)
    if config.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # HF lists the tied head under its own name too
    for key in TRANSPOSED:
        if key in hf_sd:
            hf_sd[key] = hf_sd[key].t()
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
    """An HRMGemma state dict -> a Gemma3ForCausalLM state dict (exact only at N = T = 1, so required);
    with model.vision, plus the vision part under multimodal_state_dict's names (see hf_multimodal_state_dict)."""
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
    for key in TRANSPOSED:
        if key in out:
            out[key] = out[key].t()
    dropped = [k for k in ours if k not in mapping.values()]
    if any(not is_hrm_only(k) for k in dropped):
        raise ValueError(f"to_hf_state_dict: {dropped[0]} has no Gemma 3 counterpart")
    return out


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: Any, **hrm_fields: Any) -> LMModelConfig:
    """A Gemma3TextConfig, or a multimodal Gemma3Config (its text part, and its vision part as
    model.vision) -> LMModelConfig.

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
    if getattr(hf_config, "vision_config", None) is not None:
        fields["vision"] = vision_config_from_hf(hf_config)
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


def vision_config_from_hf(hf_config: Any, trainable: bool = False) -> VisionConfig:
    """A multimodal Gemma3Config's SigLIP tower and projector -> VisionConfig (model.vision)."""
    v = hf_config.vision_config
    if v.hidden_act != HF_ACTIVATION:
        raise ValueError(
            f"config_from_hf: vision_config.hidden_act={v.hidden_act!r}; expected {HF_ACTIVATION!r}"
        )
    if v.num_channels != 3:
        raise ValueError(f"config_from_hf: vision_config.num_channels={v.num_channels}; expected 3 (RGB)")
    if not isinstance(v.image_size, int) or not isinstance(v.patch_size, int):
        raise ValueError(
            f"config_from_hf: vision_config image_size={v.image_size}, patch_size={v.patch_size}; "
            "only square images and patches (one number each) are supported"
        )
    return VisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
        layer_norm_eps=v.layer_norm_eps, mm_tokens_per_image=hf_config.mm_tokens_per_image,
        image_token_id=hf_config.image_token_index, boi_token_id=hf_config.boi_token_index,
        eoi_token_id=hf_config.eoi_token_index, trainable=trainable,
    )  # fmt: skip


def hf_multimodal_config_from(config: LMModelConfig) -> Any:
    """The Gemma3Config (Gemma3ForConditionalGeneration) that an HRMGemma with model.vision computes at
    N = T = 1."""
    from transformers import Gemma3Config, SiglipVisionConfig

    v = config.vision
    if v is None:
        raise ValueError("hf_multimodal_config_from: the model has no vision encoder (model.vision)")
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=HF_ACTIVATION, layer_norm_eps=v.layer_norm_eps, vision_use_head=False,
    )  # fmt: skip
    return Gemma3Config(
        text_config=hf_config_from(config).to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=v.mm_tokens_per_image, image_token_index=v.image_token_id,
        boi_token_index=v.boi_token_id, eoi_token_index=v.eoi_token_id,
        tie_word_embeddings=config.tie_embeddings,
    )  # fmt: skip


# Gemma3ForConditionalGeneration's names for the Gemma3ForCausalLM ones, as transformers 5 saves them
SAVED_TEXT_PREFIXES = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def hf_multimodal_state_dict(
    our_sd: dict[str, torch.Tensor], config: LMModelConfig
) -> dict[str, torch.Tensor]:
    """An HRMGemma state dict with model.vision -> a Gemma3ForConditionalGeneration state dict, under the
    names transformers 5's save_pretrained writes (N = T = 1 required, as for to_hf_state_dict)."""
    out = {}
    for key, tensor in to_hf_state_dict(our_sd, config).items():
        prefix = next((p for p in SAVED_TEXT_PREFIXES if key.startswith(p)), None)
        out[key if prefix is None else SAVED_TEXT_PREFIXES[prefix] + key[len(prefix) :]] = tensor
    return out
