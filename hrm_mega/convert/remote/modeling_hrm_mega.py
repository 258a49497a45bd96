"""Hugging Face model classes around hrm-mega's own model code, shipped next to this file.

There is no model math here. lm.py, puzzle.py and the files they import are hrm-mega's model sources,
copied by `hrm-mega export-hf` with their imports made relative; this file only adapts them to the
transformers API (from_pretrained, the Auto classes, generate):

- HRMGemmaForCausalLM: AutoModelForCausalLM. Returns logits [b, s, vocab] (and the per-cycle halting
  logits), `loss` = next-token cross-entropy when `labels` are given. With `max_cycles` and/or
  `halt_threshold` it runs HRMGemma's inference forward with per-token halting instead (`infer`), also
  through generate(): `model.generate(ids, max_cycles=8, halt_threshold=0.9)`. generate() decodes against
  a KV cache (HRMGemmaCache: hrm-mega's KVCache, one slot per (layer, cycle step)): the prompt is
  prefilled once and every later step computes only the new token. `generate(..., use_cache=False)`
  recomputes the whole sequence per step instead, with the same tokens (the reference the cache is
  tested against).
- RecursiveReasonerModel: AutoModel. One forward is one ACT segment on a puzzle batch; pass the returned
  z_H/z_L back in to run the next segment, and stop when q_halt_logits > q_continue_logits (HRM) or
  q_halt_logits > 0 (TRM), or after halt_max_steps segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_hrm_mega import HRMMegaConfig
from .distributed import tp_size  # noqa: F401 (see below)
from .kv_cache import KVCache
from .layers import RotaryEmbedding
from .lm import HRMGemma, lm_loss
from .model import model_config_from_dict
from .puzzle import RecursiveReasoner
from .recurrence import Carry

# transformers copies into its module cache only the files that `from .name import` lines reach. The
# model code imports `distributed` as a module (`from . import distributed`), which that scan misses,
# hence the import of tp_size above.


def model_config(config: HRMMegaConfig, family: str) -> Any:
    """The hrm-mega model config from the HF config, checked the way hrm-mega checks a recipe."""
    model = model_config_from_dict(config.hrm_model)
    if model.family != family:
        raise ValueError(f"config.json: hrm_model.family={model.family!r}, this class needs {family!r}")
    model.validate()
    return model


class HRMMegaPreTrainedModel(PreTrainedModel):
    config_class = HRMMegaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights are initialised by hrm-mega's own rules in __init__ (or loaded); transformers only has to
        # refill the RoPE tables, which are not saved (non-persistent buffers).
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(module.head_dim, module.cos.shape[0], module.base, module.scaling)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)


@dataclass
class HRMGemmaOutput(ModelOutput):
    loss: torch.Tensor | None = None  # next-token cross-entropy
    logits: torch.Tensor | None = None  # [b, s, vocab]
    halt_logits: torch.Tensor | None = None  # [blocks, h_cycles, b, s]: halting head after every H update
    values: torch.Tensor | None = None  # [b, s], with the value head
    cycles: torch.Tensor | None = None  # [blocks, b, s]: H cycles run per token, with per-token halting
    cache: HRMGemmaCache | None = None  # the KV cache, extended by this call (cached decoding)


class HRMGemmaCache(KVCache):
    """generate()'s KV cache: hrm-mega's KVCache (one slot per layer and cycle step, the halting rules of
    kv_cache.py), with the two methods transformers' generation loop calls on a cache."""

    is_croppable = False  # assisted decoding would have to roll the cache back: not supported

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues the beam beam_idx[i] (rows may repeat)."""
        self.select(beam_idx)


class HRMGemmaForCausalLM(HRMMegaPreTrainedModel, GenerationMixin):
    def __init__(self, config: HRMMegaConfig) -> None:
        super().__init__(config)
        self.model = HRMGemma(model_config(config, "hrm_gemma"))
        self.model.init_weights(seed=0)  # a no-op on the meta device, where from_pretrained builds
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_cycles: int | torch.Tensor | None = None,
        halt_threshold: float | torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cache: HRMGemmaCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,  # other arguments generate() passes, unused
    ) -> HRMGemmaOutput:
        """input_ids [b, s] (or inputs_embeds [b, s, h], already scaled by sqrt(hidden)); attention_mask
        [b, s] hides padding keys; position_ids [b, s] default to 0..s-1; labels [b, s] are aligned with
        the inputs (the model shifts them), -100 ignored. pixel_values [n_images, 3, S, S] (a model with
        images): one image per run of image placeholder tokens in input_ids, row by row (HRMGemma.forward).
        token_type_ids [b, s] (Gemma3Processor's batches hold it: 1 on image placeholders) adds nothing,
        since the placeholders place the images; it must mark exactly them.

        max_cycles (>= 1, may exceed the trained h_cycles) and halt_threshold (a probability in (0, 1]),
        each an int/float or one per row [b]: every block runs at most max_cycles H cycles per token and
        stops a token's cycles once its halting head reaches halt_threshold (HRMGemma.infer).

        cache (an HRMGemmaCache, empty or holding P earlier positions): input_ids [b, s] are the positions
        after the cached ones, attention_mask covers all of them [b, P + s] (transformers' convention),
        pixel_values only those of these positions. The forward is the inference one (HRMGemma.infer;
        without max_cycles/halt_threshold: h_cycles in every block, no halting, which is the training
        forward's result), it extends the cache and returns it. use_cache (without a cache) starts one."""
        vision = self.model.config.vision
        marked = token_type_ids is not None and input_ids is not None and vision is not None
        if marked and not torch.equal(token_type_ids.bool(), input_ids == vision.image_token_id):
            raise ValueError(
                f"token_type_ids must be 1 exactly on the image placeholders (id {vision.image_token_id})"
            )
        if use_cache and cache is None:
            cache = HRMGemmaCache()
        if cache is not None:
            return self._cached_forward(
                input_ids, cache, attention_mask, position_ids, max_cycles, halt_threshold, pixel_values,
                unsupported=inputs_embeds is not None or labels is not None,
            )  # fmt: skip
        if max_cycles is not None or halt_threshold is not None:
            if inputs_embeds is not None or labels is not None:
                raise ValueError(
                    "max_cycles/halt_threshold (inference with halting) take input_ids, no labels"
                )
            logits, cycles = self.model.infer(
                input_ids, attention_mask=attention_mask, position_ids=position_ids, max_cycles=max_cycles,
                halt_threshold=halt_threshold, pixel_values=pixel_values,
            )  # fmt: skip
            return HRMGemmaOutput(logits=logits, cycles=cycles)
        logits, aux = self.model(
            input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            pixel_values=pixel_values,
        )  # fmt: skip
        loss = None if labels is None else lm_loss(logits, labels, aux, self.model.config)["ce"]
        return HRMGemmaOutput(
            loss=loss, logits=logits, halt_logits=aux["halt_logits"], values=aux.get("values")
        )

    def _cached_forward(
        self,
        input_ids: torch.Tensor | None,
        cache: HRMGemmaCache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        max_cycles: int | torch.Tensor | None,
        halt_threshold: float | torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        unsupported: bool,
    ) -> HRMGemmaOutput:
        if unsupported or input_ids is None:
            raise ValueError("a KV cache (cache/use_cache) takes input_ids, no inputs_embeds or labels")
        s = input_ids.shape[1]
        if attention_mask is not None:
            if attention_mask.shape[1] != cache.length + s:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} positions; with a KV cache it covers the "
                    f"{cache.length} cached ones and the {s} new ones"
                )
            if position_ids is None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]
            attention_mask = attention_mask[:, -s:]
        logits, cycles = self.model.infer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, max_cycles=max_cycles,
            halt_threshold=halt_threshold, pixel_values=pixel_values, cache=cache,
        )  # fmt: skip
        return HRMGemmaOutput(logits=logits, cycles=cycles, cache=cache)

    # generate(): the cache is hrm-mega's own (HRMGemmaCache), started here at the first step and handed
    # back by every forward (transformers keeps the output's `cache` for the next step).

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache has one slot per layer; a cycle step needs its own

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HRMGemmaCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        inputs: dict[str, Any] = {"attention_mask": attention_mask}
        passed = ["max_cycles", "halt_threshold"]
        if use_cache is False:  # every step re-reads the whole sequence, images included
            position_ids = None
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            inputs |= {"input_ids": input_ids, "position_ids": position_ids}
            passed.append("pixel_values")
        else:
            if cache is None:
                cache = HRMGemmaCache()
            if cache.length == 0:  # the prefill reads the images; their tokens are cached after it
                passed.append("pixel_values")
            # positions after the cached ones: the whole prompt first, then one new token per step
            inputs |= {"input_ids": input_ids[:, cache.length :], "cache": cache}
        return inputs | {k: kwargs[k] for k in passed if kwargs.get(k) is not None}


@dataclass
class RecursiveReasonerOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [b, seq_len, vocab]: the answer tokens
    q_halt_logits: torch.Tensor | None = None  # [b]
    q_continue_logits: torch.Tensor | None = None  # [b]
    z_H: torch.Tensor | None = None  # [b, prefix + seq_len, hidden]: the carry for the next segment
    z_L: torch.Tensor | None = None


class RecursiveReasonerModel(HRMMegaPreTrainedModel):
    main_input_name = "inputs"

    def __init__(self, config: HRMMegaConfig) -> None:
        super().__init__(config)
        self.model = RecursiveReasoner(model_config(config, "puzzle"))
        self.model.init_weights(seed=0)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        inputs: torch.Tensor,
        puzzle_identifiers: torch.Tensor | None = None,
        z_H: torch.Tensor | None = None,
        z_L: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RecursiveReasonerOutput:
        """One ACT segment. inputs [b, seq_len] token ids; puzzle_identifiers [b] (default 0); z_H, z_L
        the carry of the previous segment (default: a fresh start from H_init/L_init)."""
        if puzzle_identifiers is None:
            puzzle_identifiers = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
        if (z_H is None) != (z_L is None):
            raise ValueError("pass both z_H and z_L (the previous segment's carry) or neither")
        carry = self.model.initial_carry(inputs.shape[0]) if z_H is None else Carry(z_H, z_L)
        out = self.model(carry, {"inputs": inputs, "puzzle_identifiers": puzzle_identifiers})
        return RecursiveReasonerOutput(
            logits=out.logits, q_halt_logits=out.q_halt, q_continue_logits=out.q_continue,
            z_H=out.carry.z_H, z_L=out.carry.z_L,
        )  # fmt: skip
