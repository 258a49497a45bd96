"""HRMGemma as a DeepSpeed PipelineModule: pipeline stages made of whole CycleBlocks.

The layer list is the model of models/lm.py cut at block boundaries:

    [embed] [block 0] ... [block G-1] [tail] [norm] [head = embed, tied]
     stage 0 ......................................... last stage

Each stage holds some CycleBlocks (parallel.pp_blocks, or an even split); the embedding goes with the
first and the trailing local layers, final norm and LM head (tied to the embedding with TiedLayerSpec, so
DeepSpeed sums the two copies' gradients) with the last. A CycleBlock runs whole, all its cycles, inside
its stage. What crosses a stage boundary is one tuple of tensors:

    (packed [b*s*h + k], position_ids [b, s], doc_ids [b, s], token_mask [b, s] int, cycles [1] int)

packed is the hidden state, flattened, followed by the running token sums of each block's halting terms
(lm.halting_token_sums: BCE, compute cost, expected cycles). The halting logits and targets stay on the
stage that made them; only these three numbers travel, and their gradient flows back with the hidden
state's. They ride inside the hidden tensor because DeepSpeed runs one backward pass per floating-point
tensor a stage sends: two tensors would run the stage's backward twice. The last stage turns logits and
sums into the loss (training/tasks/lm.py, PipelineLoss).

The number of H cycles N is part of every micro-batch's inputs (`cycles`, a one-element int tensor that
travels with the positions), not state of the stage modules: DeepSpeed calls each stage's forward itself,
so an input is the only argument a step can hand it. It needs no schedule-wide agreement (every stage
reads the N its micro-batch carries), and a call leaves nothing behind that could run the next step, or
an evaluation, at the wrong N. Integer tensors cost no backward pass.

Images (model.vision). The vision tower and projector are one more layer, `VisionLayer`, the first of
the first stage: images are encoded once per micro-batch where the token embeddings are made, and only
the merged residual stream travels on, as in HRMGemma.embed_with_images. The first stage's inputs then
end with the micro-batch's pixel_values [n_images, 3, S, S] (possibly none), and the tuple that crosses
stage boundaries with image_ids [b, s] (long; which image each token belongs to, -1 for text), which every
stage needs for Gemma 3's bidirectional image mask:

    (ids, position_ids, doc_ids, token_mask, cycles, pixel_values)            -> VisionLayer
    (ids, position_ids, doc_ids, token_mask, cycles, image_ids, features)     -> EmbeddingLayer (merges)
    (packed, position_ids, doc_ids, token_mask, cycles, image_ids)            -> CycleBlockLayer, ...

Every layer initialises its own parameters by their names in HRMGemma (init_parameters with a prefix),
so a pipeline model holds exactly the weights of HRMGemma(config).init_weights(seed), split by stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hrm_mega.config import LMModelConfig
from hrm_mega.models.layers import RMSNorm, column_linear, init_parameters, set_init
from hrm_mega.models.lm import (
    embed_scaled,
    halting_block,
    halting_token_sums,
    image_indices,
    rope_tables,
    sequence_context,
    tail_stack,
)
from hrm_mega.models.vision import ImageEncoder
from hrm_mega.models.vocab import tied_logits, vocab_embedding

Activations = tuple[torch.Tensor, ...]


def pipeline_inputs(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    token_mask: torch.Tensor,
    cycles: int,
    pixel_values: torch.Tensor | None = None,
) -> Activations:
    """A micro-batch's inputs for the first stage: ids, positions, doc_ids [b, s], token_mask [b, s]
    (sent as int64: pipelines send no bool), the H cycles N to run in every block, and for a model with
    images its pixel_values [n_images, 3, S, S] (n_images may be 0)."""
    if cycles < 1:
        raise ValueError(f"cycles={cycles} (H cycles) must be >= 1")
    n = torch.tensor([cycles], dtype=torch.long, device=input_ids.device)
    images = () if pixel_values is None else (pixel_values,)
    return input_ids, position_ids, doc_ids, token_mask.long(), n, *images


class VisionLayer(nn.Module):
    """First layer of a model with images: HRMGemma's `vision` (tower + projector). Encodes the
    micro-batch's images once and passes their features, and each token's image index, to the
    embedding layer, which puts them in place of the placeholders."""

    def __init__(self, config: LMModelConfig, seed: int) -> None:
        super().__init__()
        assert config.vision is not None
        self.config = config
        self.vision = ImageEncoder(config.vision, config.hidden_size)
        init_parameters(self, seed)  # names as in HRMGemma: vision.*

    def forward(self, inputs: Activations) -> Activations:
        input_ids, position_ids, doc_ids, token_mask, cycles, pixel_values = inputs
        assert self.config.vision is not None
        image_ids = image_indices(input_ids, self.config.vision)
        features = self.vision(pixel_values)  # [n, mm_tokens, h]
        return input_ids, position_ids, doc_ids, token_mask, cycles, image_ids, features


class EmbeddingLayer(nn.Module):
    """First stage: ids -> scaled embeddings. Tied to the last stage's head when embeddings are tied."""

    def __init__(self, config: LMModelConfig, seed: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.vision_config, self.vocab_size = config.vision, config.vocab_size
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        set_init(self.embed_tokens.weight, "trunc_normal", config.hidden_size**-0.5)
        init_parameters(self, seed)  # names as in HRMGemma: embed_tokens.weight

    def forward(self, inputs: Activations) -> Activations:
        input_ids, *rest = inputs
        if self.vision_config is None:
            return embed_scaled(self.embed_tokens, input_ids, self.hidden_size), *rest
        # after VisionLayer: rest = position_ids, doc_ids, token_mask, cycles, image_ids, features
        *rest, features = rest
        image_ids = rest[-1]
        v = self.vision_config
        if v.image_token_id >= self.vocab_size:  # as HRMGemma.embed: looked up as id 0
            input_ids = input_ids.masked_fill(input_ids == v.image_token_id, 0)
        x = embed_scaled(self.embed_tokens, input_ids, self.hidden_size)
        placeholders = image_ids >= 0
        if int(placeholders.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the micro-batch holds {int(placeholders.sum())} image placeholder tokens, but its "
                f"{features.shape[0]} images give {features.shape[0] * features.shape[1]}"
            )
        return x.masked_scatter(placeholders[..., None], features.to(x.dtype)), *rest


def tied_head(layer: EmbeddingLayer, inputs: Activations) -> Activations:
    """The tied LM head on the last stage: (normed hidden, sums[, values]) -> (logits slice, sums[, values])."""
    hidden, *rest = inputs
    return tied_logits(hidden, layer.embed_tokens.weight), *rest


class CycleBlockLayer(nn.Module):
    """HRMGemma's blocks.{index}: runs the CycleBlock and adds its halting terms to the running sums."""

    def __init__(self, config: LMModelConfig, index: int, seed: int) -> None:
        super().__init__()
        self.config, self.index = config, index
        # a one-entry ModuleDict, so the names are HRMGemma's: blocks.{index}.*
        self.blocks = nn.ModuleDict({str(index): halting_block(config)})
        init_parameters(self, seed)
        self.rope_local, self.rope_global = rope_tables(config)

    def forward(self, inputs: Activations) -> Activations:
        x, position_ids, doc_ids, token_mask, cycles, *images = inputs  # images: [image_ids] with vision
        sums = None
        if x.dim() == 1:  # packed by the previous CycleBlock (the embedding sends plain hidden states)
            x, sums = unpack(x, position_ids)
        ropes = (self.rope_local, self.rope_global)
        image_ids = images[0] if images else None
        ctx = sequence_context(self.config, ropes, x, position_ids, None, doc_ids, image_ids=image_ids)
        x, halt_logits, converged = self.blocks[str(self.index)](x, ctx, int(cycles))
        block_sums = halting_token_sums(halt_logits, converged, token_mask.to(halt_logits.dtype))
        block_sums = block_sums / self.config.num_groups  # lm_loss averages over blocks
        sums = block_sums if sums is None else sums + block_sums
        return pack(x, sums), position_ids, doc_ids, token_mask, cycles, *images


def pack(hidden: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """[b, s, h] hidden and [3] fp32 sums -> one flat tensor in the hidden dtype. Below fp32 each sum
    travels as two numbers, hi + lo, so it keeps about 16 bits (its gradient reaches both)."""
    if hidden.dtype == torch.float32:
        tail = sums
    else:
        hi = sums.to(hidden.dtype)
        tail = torch.cat((hi, (sums - hi.float()).to(hidden.dtype)))
    return torch.cat((hidden.flatten(), tail))


def unpack(packed: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack; ids [b, s] give the batch shape."""
    n = packed.numel() - (3 if packed.dtype == torch.float32 else 6)
    b, s = ids.shape
    hidden, tail = packed[:n].view(b, s, -1), packed[n:].float()
    return hidden, (tail if tail.numel() == 3 else tail[:3] + tail[3:])


class TailLayer(nn.Module):
    """HRMGemma's tail: the trailing local layers, run once."""

    def __init__(self, config: LMModelConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.tail = tail_stack(config)
        init_parameters(self, seed)
        self.rope_local, self.rope_global = rope_tables(config)

    def forward(self, inputs: Activations) -> Activations:
        packed, position_ids, doc_ids, *rest = inputs  # rest: token_mask, cycles[, image_ids]
        x, sums = unpack(packed, position_ids)
        ropes = (self.rope_local, self.rope_global)
        image_ids = rest[2] if len(rest) > 2 else None
        ctx = sequence_context(self.config, ropes, x, position_ids, None, doc_ids, image_ids=image_ids)
        return pack(self.tail(x, None, ctx), sums), position_ids, doc_ids, *rest


class FinalNormLayer(nn.Module):
    """HRMGemma's norm, and its value_head: with one, the values [b, s] (fp32) follow the sums (PPO's
    loss reads them on the last stage; pretraining does not)."""

    def __init__(self, config: LMModelConfig, seed: int) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight="gemma")
        self.value_head = nn.Linear(config.hidden_size, 1) if config.value_head else None
        if self.value_head is not None:
            set_init(self.value_head.weight, "constant", 0.0)
            set_init(self.value_head.bias, "constant", 0.0)
        init_parameters(self, seed)

    def forward(self, inputs: Activations) -> Activations:
        x, sums = unpack(inputs[0], inputs[1])
        hidden = self.norm(x)
        if self.value_head is None:
            return hidden, sums
        return hidden, sums, self.value_head(hidden).squeeze(-1).float()


class UntiedHeadLayer(nn.Module):
    def __init__(self, config: LMModelConfig, seed: int) -> None:
        super().__init__()
        self.lm_head = column_linear(config.hidden_size, config.vocab_size)
        init_parameters(self, seed)

    def forward(self, inputs: Activations) -> Activations:
        hidden, *rest = inputs
        return self.lm_head(hidden), *rest


def pipeline_layers(config: LMModelConfig, seed: int) -> list[Any]:
    """The LayerSpecs of the pipeline, in order (each is built only on the stage that holds it)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    c = config
    layers: list[Any] = [LayerSpec(VisionLayer, c, seed)] if c.vision is not None else []
    if c.tie_embeddings:
        layers.append(TiedLayerSpec("embed", EmbeddingLayer, c, seed, tied_weight_attr="embed_tokens.weight"))
    else:
        layers.append(LayerSpec(EmbeddingLayer, c, seed))
    layers += [LayerSpec(CycleBlockLayer, c, g, seed) for g in range(c.num_groups)]
    if c.num_tail_layers:
        layers.append(LayerSpec(TailLayer, c, seed))
    layers.append(LayerSpec(FinalNormLayer, c, seed))
    if c.tie_embeddings:
        layers.append(
            TiedLayerSpec(
                "embed", EmbeddingLayer, c, seed, forward_fn=tied_head, tied_weight_attr="embed_tokens.weight"
            )
        )
    else:
        layers.append(LayerSpec(UntiedHeadLayer, c, seed))
    return layers


def stage_boundaries(config: LMModelConfig, blocks_per_stage: list[int]) -> list[int]:
    """Layer indices where each stage starts (and the end): the embedding (and the vision layer before
    it) joins the first stage's blocks; the tail, norm and head join the last's."""
    first = 1 + int(config.vision is not None)
    total = first + config.num_groups + int(config.num_tail_layers > 0) + 2
    parts = [0]
    for n in blocks_per_stage[:-1]:
        parts.append(parts[-1] + n + (first if len(parts) == 1 else 0))
    return parts + [total]


def build_pipeline_module(
    config: LMModelConfig,
    seed: int,
    topology: Any,
    blocks_per_stage: list[int],
    loss_fn: Any,
    activation_checkpointing: bool,
) -> nn.Module:
    """The PipelineModule of this rank's stage, with stages cut at `blocks_per_stage`."""
    from deepspeed.pipe import PipelineModule

    parts = stage_boundaries(config, blocks_per_stage)

    class CycleBlockPipeline(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:  # stages of whole CycleBlocks
            stage = self._topo.get_coord(self.global_rank).pipe
            self.parts = parts
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    return CycleBlockPipeline(
        layers=pipeline_layers(config, seed),
        topology=topology,
        loss_fn=loss_fn,
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=_checkpoint,
        checkpointable_layers=["CycleBlockLayer", "TailLayer"],
        dynamic_shape=True,  # evaluation batches differ in size from training micro-batches
    )


def _checkpoint(function: Any, *args: Any) -> Any:
    """torch's activation checkpointing (DeepSpeed's default one needs its CUDA RNG tracker)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
