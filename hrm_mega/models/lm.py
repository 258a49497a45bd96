"""HRMGemma: the Gemma 3 text decoder, with every local-global group wrapped in a CycleBlock.

Gemma 3 is a stack of layers in the pattern k local (sliding-window) layers, then 1 global layer
(k = local_per_global = 5). HRMGemma groups the layers the same way and runs each group as a CycleBlock
with L = the k local layers and H = the global layer:

    x = embed(ids) * sqrt(hidden)                              # scale cast to the weight dtype, as Gemma
    for each group g = 0..G-1:                                 # G = num_layers // (k+1)
        z_H = z_L = 0
        repeat N = cycles times:                               # forward's argument, default h_cycles
            repeat T = l_cycles times:  z_L = L_g(x + g_LL * z_L + g_LH * z_H)
            z_H = H_g(z_L + g_HH * z_H)
            halt_logit[g, n] = halt_head_g(rmsnorm(z_H))       # "would another cycle change z_H?"
        x = z_H
    x = tail(x)                                                # trailing local layers, run once
    logits = norm(x) @ embed.weight^T                          # tied head, no softcapping

Every layer is a sandwich-norm block (1+w RMSNorm) with GQA, QK-norm, scale query_pre_attn_scalar**-0.5
and a gelu-tanh GeGLU. Local layers attend causally within `sliding_window` with RoPE base 1e4;
global layers attend causally to everything with RoPE base 1e6 and optional linear scaling.

Exactness. The gates start at zero, so every cycle computes exactly H_g(L_g(x)): with zero gates (or
with N = T = 1, whatever the gates) the model *is* Gemma 3, and a pretrained checkpoint imports unchanged
(hrm_mega.convert.hf_gemma) and can then be given more cycles.

Trailing partial group. When num_layers is not a multiple of k+1 (1B: 26 = 4 x 6 + 2; 4B: 34 = 5 x 6 + 4;
27B: 62 = 10 x 6 + 2) the leftover layers are all local and have no global layer to act as H. They form
`tail`, a plain BlockStack run once after the last CycleBlock, with no recurrence and no halting head.
(A CycleBlock with no H would be TRM's shared form, which is a different model.)

Halting. After every H update the block's halting head reads rms_norm(z_H) (weightless: the residual
stream of a Gemma model has a large, depth-dependent scale) and predicts, per token, whether the state
has converged. The target for the reading after update n is whether update n+1 changes z_H by less
than halt_tolerance relative to its norm, i.e. whether stopping after update n would have lost nothing.
That is the decision the head makes at inference, and it is defined for every cycle but the last
(whose reading has no target). Training adds the BCE of these predictions and a compute cost (the
expected fraction of optional cycles run if a token stops when the head fires) to the next-token loss;
see `lm_loss`. Training forwards (`forward`) run all N cycles in every block. With
model.halt_target=correct (and deep supervision) the last block's head is trained instead on whether
the readout after update n predicts the label and every later readout does too, on labelled tokens:
a state need not stop moving for its answer to be settled (docs/benchmarks.md, trace).

Cycles are an argument, never state. `forward(..., cycles=N)` runs N H cycles in every block (default:
config.h_cycles; training may draw N per step, evaluation may raise it), and `infer(..., max_cycles=)`
caps them per row. No call changes what the next one runs, and the outputs report what ran:
aux["cycles_used"] [G] counts each block's H updates, `infer`'s cycles [G, b, s] each token's.

Inference with per-token halting (`infer`). Each block runs at most max_cycles H cycles (per batch row;
default config.h_cycles; it may exceed it). After H update n (n = 0, 1, ...) a token stops cycling in
the block when sigmoid(halt_logit) >= halt_threshold (its row's), or when n + 1 = max_cycles; padding
tokens stop after their first cycle. A token that stopped ("halted") after c cycles is frozen for the
rest of the block: its z_H and z_L, and the input of every layer of the block, keep the values of the
token's last run of that layer. Keys and values are a function of a layer's input and the position, so
at every later step a halted token offers the keys/values of its last computed step of that layer (L
step c*T - 1 of a local layer, H step c - 1 of the global layer): the rule the KV cache applies to
earlier positions (hrm_mega/models/kv_cache.py). The block passes z_H on once every token has halted.
With halting off (halt_threshold None) and max_cycles = h_cycles no real token is ever frozen and
`infer` computes exactly `forward` (padding positions differ, but nothing attends to them). A token
reads keys of positions <= its own only, and whether it halts depends on those positions only, so a
sequence gives the same logits whether it runs in one call or in chunks (prefill, then one token at a
time) against a KVCache.

Halting as an action (RL, `HaltActions`). At chosen tokens (those that produce a sampled token) the
decision after each update is drawn from the halting head rather than taken by the threshold rule, and
the log-probability of the decisions taken is returned, summed over blocks. A rollout records the
cycles each such token ran; `infer` over the whole sequence with those cycles replayed computes the
same halting (the freezing rule above makes one call equal prefill-then-decode) and, with grad, the
log-probabilities a policy gradient needs.

Document-causal masking. Packed training rows hold several documents; `forward(doc_ids=...)` lets a
token attend only to earlier tokens of its own document (a document is a maximal run of equal ids in the
row), with the sliding window still applied on local layers. Without explicit position_ids the
positions restart at 0 at the start of every document, so each document is computed exactly as if it
ran alone.

Pipeline stages hold whole CycleBlocks (`blocks` is a ModuleDict keyed by group index, so names are
stable under a split): the embedding goes with the first stage, `tail`, `norm` and the head with the
last. Attention calls take (x, rope, mask, kv_cache) for the positions being computed, with masks in the
KV-cache convention (queries are the last q_len of the keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hrm_mega import distributed
from hrm_mega.config.model import LMModelConfig, VisionConfig
from hrm_mega.models.attention import DocumentRuns
from hrm_mega.models.attention import attention_mask as causal_mask
from hrm_mega.models.block import BlockStack, SeqContext, TransformerBlock, attention_block
from hrm_mega.models.keyed import keyed_uniform
from hrm_mega.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    column_linear,
    init_parameters,
    rms_norm,
    set_init,
)
from hrm_mega.models.recurrence import Carry, CycleBlock
from hrm_mega.models.vision import ImageEncoder
from hrm_mega.models.vocab import (
    cross_entropy,
    label_is_argmax,
    linear_cross_entropy,
    tied_logits,
    vocab_embedding,
)

if TYPE_CHECKING:
    from hrm_mega.models.kv_cache import KVCache

ROPE_TABLE_LEN = 8192  # initial cos/sin table length; RotaryEmbedding grows it when positions go further
HRM_ONLY_PARAMS = ("gate_LL", "gate_LH", "gate_HH", "halt_head", "value_head")


def is_hrm_only(name: str) -> bool:
    """Whether a parameter exists only in HRMGemma (gates and heads), not in Gemma 3."""
    return any(part in HRM_ONLY_PARAMS for part in name.split("."))


@dataclass
class HaltActions:
    """Per-token halting as an action of a policy (RL; module docstring, "Halting as an action").

    At the tokens of `where` [b, s] (bool) the decision after H update n, wherever another update may
    run (n + 1 < max_cycles), is drawn instead of taken by the threshold rule: halt with probability

        P(halt) = sigmoid((halt_logit - logit(t)) / temperature)        t: the row's halt_threshold

    so the greedy choice (P >= 1/2) is the threshold rule itself. The draw for block g, update n is
    keyed_uniform(seed, keys, g * 2**16 + n) (keys [b, s] int64, e.g. row and position): it depends on
    neither the batch's other rows nor how the sequence is split into calls. With `replay` [G, b, s]
    (the cycles each block ran for each token, from a rollout) the decisions are those that ran that
    many cycles. `logprob` [b, s] (fp32, with grad when grad is enabled) accumulates each action token's
    log-probability of its decisions over the blocks; infer starts it at zero."""

    where: torch.Tensor
    temperature: float = 1.0
    seed: int = 0
    keys: torch.Tensor | None = None
    replay: torch.Tensor | None = None
    logprob: torch.Tensor | None = None

    def decide(
        self, group: int, n: int, logit: torch.Tensor, threshold: torch.Tensor, open_: torch.Tensor
    ) -> torch.Tensor:
        """Halt [b, s] (bool) after update n of block `group` from its halting logits [b, s] and the
        rows' thresholds [b]; adds the log-prob of the decisions taken where `open_` [b, s] (the token
        ran update n and may run another) to `logprob`."""
        shift = torch.log(threshold) - torch.log1p(-threshold)  # logit(t) [b]
        x = (logit - shift[:, None]) / self.temperature
        if self.replay is not None:
            halt = self.replay[group] == n + 1
        else:
            assert self.keys is not None, "sampled halting needs draw keys"
            u = keyed_uniform(self.seed, self.keys, torch.full_like(self.keys, (group << 16) + n))
            halt = u < torch.sigmoid(x.double())
        chosen = torch.where(halt, F.logsigmoid(x), F.logsigmoid(-x))
        taken = torch.where(open_ & self.where, chosen, 0.0)
        self.logprob = taken if self.logprob is None else self.logprob + taken
        return halt


class HaltingCycleBlock(CycleBlock):
    """A gated CycleBlock around one local-global group that reads a halting head after every H update.

    It starts from a zero state on every call: a language model's sequence is one segment, so no carry
    crosses calls. Its forward therefore takes (x, ctx, cycles) and returns the halting readouts besides
    z_H: one reading per H update that ran.
    """

    def __init__(
        self,
        L: BlockStack,
        H: BlockStack,
        *,
        hidden_size: int,
        l_cycles: int,
        grad_mode: str,
        injection: str,
        halt_tolerance: float,
        eps: float,
        gate_init: float = 0.0,
        grad_cycles: int = 0,
    ) -> None:
        super().__init__(
            L, H, hidden_size=hidden_size, l_cycles=l_cycles, grad_mode=grad_mode, injection=injection,
            gate_init=gate_init, grad_cycles=grad_cycles,
        )  # fmt: skip
        self.halt_tolerance, self.eps = halt_tolerance, eps
        self.recompute = False  # activation checkpointing: keep only the input, recompute in backward
        self.halt_head = nn.Linear(hidden_size, 1)
        set_init(self.halt_head.weight, "constant", 0.0)  # starts undecided: sigmoid(0) = 0.5
        set_init(self.halt_head.bias, "constant", 0.0)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, ctx: SeqContext, cycles: int, states: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [b, s, h], N = cycles -> (z_H [b, s, h], halt_logits [N, b, s] fp32, converged [N-1, b, s]).
        `states`, if given, receives z_H after every H update (deep supervision reads them)."""
        halt_logits, converged = [], []
        previous: list[torch.Tensor] = []

        def read_halting(n: int, z_H: torch.Tensor) -> None:
            if states is not None:
                states.append(z_H)
            halt_logits.append(self.halt_head(rms_norm(z_H, self.eps)).squeeze(-1).float())
            if previous:  # target of the previous reading: did this update change z_H?
                converged.append(self._converged(previous[-1], z_H))
            previous[:] = [z_H.detach()]

        zeros = torch.zeros_like(x)
        z_H, _ = super().forward(x, Carry(zeros, zeros), ctx, cycles, after_slow_update=read_halting)
        converged_t = (
            torch.stack(converged) if converged else x.new_zeros((0, *x.shape[:2]), dtype=torch.bool)
        )
        return z_H, torch.stack(halt_logits), converged_t

    def infer(
        self,
        x: torch.Tensor,
        ctx: SeqContext,
        *,
        max_cycles: torch.Tensor,
        halt_threshold: torch.Tensor | None,
        padding: torch.Tensor | None,
        cache: KVCache | None,
        name: str,
        actions: HaltActions | None = None,
        group: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with per-token halting (module docstring). x: [b, s, h]; max_cycles [b] long;
        halt_threshold [b] fp32 or None (no early halting); padding [b, s] bool (stops after one cycle);
        cache: keys/values of earlier positions, read and extended under the layer names `{name}.L.i`
        and `{name}.H.i`; actions: the tokens whose halting is a sampled (or replayed) action, for this
        block as number `group` (HaltActions). Returns z_H [b, s, h] and the H cycles each token ran
        [b, s] (long)."""
        b, s, _ = x.shape
        z_H = z_L = torch.zeros_like(x)
        running = torch.ones(b, s, dtype=torch.bool, device=x.device)
        cycles = torch.zeros(b, s, dtype=torch.long, device=x.device)
        frozen: dict[str, torch.Tensor] = {}  # layer name -> its input in each token's latest run
        ran = 0  # H cycles this call ran (for the tokens that were still running)
        for n in range(int(max_cycles.max())):
            # [b, s, 1]; None while every token runs (the merges below would return their first argument)
            keep = None if n == 0 or bool(running.all()) else running[..., None]
            for t in range(self.l_cycles):
                fast = self._run_stack(self.L, f"{name}.L", self.fast_input(x, z_L, z_H), keep, frozen,
                                       ctx, cache, step=n * self.l_cycles + t)  # fmt: skip
                z_L = fast if keep is None else torch.where(keep, fast, z_L)
            slow = self._run_stack(
                self.slow, f"{name}.H", self.slow_input(z_H, z_L), keep, frozen, ctx, cache, step=n
            )
            z_H = slow if keep is None else torch.where(keep, slow, z_H)
            cycles += running
            stop = n + 1 >= max_cycles[:, None]  # [b, 1]
            if halt_threshold is not None:
                logit = self.halt_head(rms_norm(z_H, self.eps)).squeeze(-1).float()
                halt = torch.sigmoid(logit) >= halt_threshold[:, None]
                if actions is not None:  # a decision only where another cycle may run
                    drawn = actions.decide(group, n, logit, halt_threshold, running & ~stop)
                    halt = torch.where(actions.where, drawn, halt)
                stop = stop | halt
            if padding is not None:
                stop = stop | padding
            running = running & ~stop
            ran = n + 1
            if not bool(running.any()):
                break
        if cache is not None:  # slots of steps this call did not reach get the new tokens' last K/V
            for i in range(len(self.L.layers)):
                cache.fill_unrun(f"{name}.L.{i}", ran * self.l_cycles - 1, s)
            for i in range(len(self.slow.layers)):
                cache.fill_unrun(f"{name}.H.{i}", ran - 1, s)
        return z_H, cycles

    def _run_stack(
        self,
        stack: BlockStack,
        name: str,
        hidden: torch.Tensor,
        keep: torch.Tensor | None,
        frozen: dict[str, torch.Tensor],
        ctx: SeqContext,
        cache: KVCache | None,
        step: int,
    ) -> torch.Tensor:
        """Runs `stack` at cycle step `step`; tokens outside `keep` (None: every token runs) get their
        frozen layer inputs back, so the keys/values they offer are their last computed ones."""
        for i, layer in enumerate(stack.layers):
            key = f"{name}.{i}"
            if key in frozen and keep is not None:
                hidden = torch.where(keep, hidden, frozen[key])
            frozen[key] = hidden
            slot = None if cache is None else cache.slot(key, step, layer.mixer.window)
            hidden = layer(hidden, ctx, kv_cache=slot)
        return hidden

    @torch.no_grad()
    def _converged(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Per token: ||new - old|| < tolerance * ||old|| (norms over the hidden dim, in fp32)."""
        change = (new.float() - old.float()).norm(dim=-1)
        return change < self.halt_tolerance * old.float().norm(dim=-1)


class HRMGemma(nn.Module):
    def __init__(self, config: LMModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = c = config
        self.embed_tokens = vocab_embedding(c.vocab_size, c.hidden_size)
        set_init(self.embed_tokens.weight, "trunc_normal", 1.0 / math.sqrt(c.hidden_size))
        self.vision = ImageEncoder(c.vision, c.hidden_size) if c.vision is not None else None
        self.rope_local, self.rope_global = self._ropes()

        self.blocks = nn.ModuleDict({str(g): halting_block(c) for g in range(c.num_groups)})
        self.tail = tail_stack(c) if c.num_tail_layers else None
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, weight="gemma")
        self.lm_head = None if c.tie_embeddings else column_linear(c.hidden_size, c.vocab_size)
        self.value_head = nn.Linear(c.hidden_size, 1) if c.value_head else None
        if self.value_head is not None:
            set_init(self.value_head.weight, "constant", 0.0)
            set_init(self.value_head.bias, "constant", 0.0)

    def _ropes(self) -> tuple[RotaryEmbedding, RotaryEmbedding]:
        return rope_tables(self.config)

    def materialize(self, device: torch.device | str) -> HRMGemma:
        """`to_empty(device)` for a model built on the meta device, keeping the parameters' init rules
        (to_empty replaces the meta parameters, and with them the rules set_init attached). Follow it with
        init_weights(seed)."""
        rules = {name: p._hrm_init for name, p in self.named_parameters()}  # type: ignore[attr-defined]
        self.to_empty(device=device)
        for name, p in self.named_parameters():
            p._hrm_init = rules[name]  # type: ignore[attr-defined]
        return self

    def init_weights(self, seed: int) -> HRMGemma:
        """Fills every parameter by its init rule (deterministic by name) and rebuilds the RoPE tables,
        so a model built on the meta device and then `materialize`d is complete."""
        init_parameters(self, seed)
        device = self.embed_tokens.weight.device
        with device:
            self.rope_local, self.rope_global = self._ropes()
        return self

    # ---------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [b, s, h]; the sqrt(hidden) scale is rounded to the weight dtype first, as Gemma does.
        An image placeholder id past the vocabulary is looked up as id 0 (its embedding is replaced by the
        image's features when the images are given)."""
        v = self.config.vision
        if v is not None and v.image_token_id >= self.config.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == v.image_token_id, 0)
        return embed_scaled(self.embed_tokens, input_ids, self.config.hidden_size)

    def embed_with_images(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings [b, s, h] with every image's features in place of its placeholder tokens, and
        the image index of each token [b, s] (None without pixel_values; see `image_indices`).

        The images are encoded once here, so every CycleBlock and every cycle reads the same merged
        stream. pixel_values [n_images, 3, S, S] are the images in the order their placeholder runs
        appear in the batch, row by row (row 0's images left to right, then row 1's, ...)."""
        x = self.embed(input_ids)
        if pixel_values is None:
            return x, None
        if self.vision is None:
            raise ValueError(
                "pixel_values were given, but this HRMGemma has no vision encoder (model.vision)"
            )
        image_ids = image_indices(input_ids, self.config.vision)
        features = self.vision(pixel_values)  # [n, mm_tokens, h]
        placeholders = image_ids >= 0
        n_tokens, n_features = int(placeholders.sum()), features.shape[0] * features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"the batch holds {n_tokens} image placeholder tokens (id {self.config.vision.image_token_id}), "
                f"but {features.shape[0]} images give {n_features} (model.vision.mm_tokens_per_image="
                f"{features.shape[1]} each)"
            )
        x = x.masked_scatter(placeholders[..., None], features.to(x.dtype))
        return x, image_ids

    def seq_context(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        doc_ids: torch.Tensor | None = None,
        past_valid: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> SeqContext:
        """RoPE tables and masks for one forward (see `sequence_context`)."""
        return sequence_context(
            self.config, (self.rope_local, self.rope_global), x, position_ids, attention_mask, doc_ids,
            past_valid, image_ids,
        )  # fmt: skip

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (already normed) -> logits, with the tied or separate LM head (this rank's
        vocabulary slice under tensor parallelism: models/vocab.py)."""
        if self.lm_head is None:
            return tied_logits(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cycles: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Causal LM forward (training semantics: every block runs all N = `cycles` H cycles, default
        config.h_cycles).

        input_ids [b, s], or inputs_embeds [b, s, h] (already scaled); position_ids [b, s] or [s]
        (default 0..s-1, or restarting at every document with doc_ids) drive RoPE; attention_mask [b, s]
        (1 = token, 0 = padding) hides padding keys; doc_ids [b, s] (packed rows) keeps attention within
        each document. Masks are by index, RoPE by position id.

        Images (a model with model.vision): pixel_values [n_images, 3, S, S] (S = model.vision.image_size,
        preprocessed as Gemma 3 does: data/images.py) go with input_ids in which each image is a run of
        mm_tokens_per_image placeholders (model.vision.image_token_id), normally between <start_of_image>
        and <end_of_image> (vision.image_token_ids). The images are taken in the order of their runs,
        row by row: row 0's images left to right, then row 1's, and so on; a row may hold none. Each
        image's features replace its placeholders' embeddings, and the tokens of one image attend to each
        other both ways (all other attention stays causal; doc_ids and padding masks still apply). Labels
        at placeholder positions should be -100: nothing predicts an image.

        Returns logits [b, s, vocab] and aux: halt_logits [G, N, b, s] (fp32), converged [G, N-1, b, s]
        (the halting targets), cycles_used [G] long (the H updates each block ran, counted from its
        halting readings), and values [b, s] (fp32) with the value head.

        labels [b, s] (aligned with the inputs, as lm_loss takes them) at parallel.tp = 1: the output's
        next-token CE is computed here, chunk by chunk through the head (vocab.linear_cross_entropy),
        and returned summed over the labelled targets as aux["ce_sum"], with None for the logits, which
        are never built. Under TP the logits are returned as without labels.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("HRMGemma.forward: pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and input_ids is None:
            raise ValueError(
                "HRMGemma.forward: pixel_values need input_ids (their placeholders place the images)"
            )
        cycles = self.config.h_cycles if cycles is None else int(cycles)
        if inputs_embeds is None:
            x, image_ids = self.embed_with_images(input_ids, pixel_values)
        else:
            x, image_ids = inputs_embeds, None
        ctx = self.seq_context(x, position_ids, attention_mask, doc_ids, image_ids=image_ids)
        halt_logits, converged = [], []
        # Deep supervision (model.deep_supervision, training forwards): the last block's z_H after every
        # H update but the last is read out through the rest of the model, for the loss at every cycle.
        states: list[torch.Tensor] | None = (
            [] if self.config.deep_supervision and torch.is_grad_enabled() else None
        )
        for g, block in enumerate(self.blocks.values()):
            if block.recompute and torch.is_grad_enabled():
                x, block_halt, block_converged = checkpoint(block, x, ctx, cycles, use_reentrant=False)
            else:
                last = g == len(self.blocks) - 1
                x, block_halt, block_converged = block(x, ctx, cycles, states if last else None)
            halt_logits.append(block_halt)
            converged.append(block_converged)
        if self.tail is not None:
            x = self.tail(x, None, ctx)
        hidden = self.norm(x)
        aux = {
            "halt_logits": torch.stack(halt_logits),
            "converged": torch.stack(converged),
            "cycles_used": torch.tensor([h.shape[0] for h in halt_logits], dtype=torch.long),
        }
        if states and len(states) > 1:
            tail = self.tail if self.tail is not None else (lambda z, _, __: z)
            aux["cycle_logits"] = torch.stack([self.head(self.norm(tail(z, None, ctx))) for z in states[:-1]])
        if self.value_head is not None:
            aux["values"] = self.value_head(hidden).squeeze(-1).float()
        if labels is not None and distributed.tp_size() == 1:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            aux["ce_sum"] = linear_cross_entropy(hidden, weight, next_token_targets(labels))
            return None, aux
        return self.head(hidden), aux

    def infer(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        max_cycles: int | torch.Tensor | None = None,
        halt_threshold: float | torch.Tensor | None = None,
        cache: KVCache | None = None,
        halt_actions: HaltActions | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference forward with per-token halting (module docstring).

        Without a cache this is the full-sequence reference. With a KVCache, input_ids [b, s] are the
        positions after the cached ones (a prompt, a chunk of one, or one new token per row); the cache
        is read and extended. attention_mask [b, s] (1 = token, 0 = padding) for these positions;
        position_ids [b, s] or [s] (default: continuing after the cache); max_cycles: an int or one per
        row [b], >= 1 (default: config.h_cycles); halt_threshold: None (no early halting) or a
        probability in (0, 1], or one per row [b]. pixel_values: the images of these positions, as in
        `forward`; every image must lie wholly within one call (a prompt's prefill), since its tokens
        attend to each other both ways. halt_actions: the tokens whose halting decisions are drawn or
        replayed (HaltActions; it needs a halt_threshold below 1), its `logprob` set on return.

        Returns logits [b, s, vocab] and cycles [G, b, s]: the H cycles each block ran for each token.
        """
        b, s = input_ids.shape
        device = input_ids.device
        cycles_t, threshold_t = self.halting_limits(max_cycles, halt_threshold, b, device)
        if halt_actions is not None:
            if threshold_t is None or bool((threshold_t >= 1).any()):
                raise ValueError(f"halting actions need a halt_threshold below 1, not {halt_threshold}")
            halt_actions.logprob = None
        x, image_ids = self.embed_with_images(input_ids, pixel_values)
        past_valid = None if cache is None else cache.valid  # None before the first call
        ctx = self.seq_context(x, position_ids, attention_mask, past_valid=past_valid, image_ids=image_ids)
        padding = None if attention_mask is None else ~attention_mask.bool()
        if cache is not None:
            cache.start(torch.ones(b, s, dtype=torch.bool, device=device) if padding is None else ~padding)
        cycles = []
        for i, (g, block) in enumerate(self.blocks.items()):
            x, block_cycles = block.infer(
                x, ctx, max_cycles=cycles_t, halt_threshold=threshold_t, padding=padding, cache=cache,
                name=f"blocks.{g}", actions=halt_actions, group=i,
            )  # fmt: skip
            cycles.append(block_cycles)
        if halt_actions is not None and halt_actions.logprob is None:  # every block ran one cycle
            halt_actions.logprob = torch.zeros(b, s, device=device)
        if self.tail is not None:
            for i, layer in enumerate(self.tail.layers):
                slot = None if cache is None else cache.slot(f"tail.{i}", 0, layer.mixer.window)
                x = layer(x, ctx, kv_cache=slot)
        return self.head(self.norm(x)), torch.stack(cycles)

    def halting_limits(
        self,
        max_cycles: int | torch.Tensor | None,
        halt_threshold: float | torch.Tensor | None,
        batch: int,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`infer`'s max_cycles and halt_threshold as checked per-row tensors: [b] long, [b] fp32 or None."""
        if max_cycles is None:
            max_cycles = self.config.h_cycles
        cycles = per_row(max_cycles, batch, "max_cycles", torch.long, device)
        if bool((cycles < 1).any()):
            raise ValueError(f"max_cycles={cycles.tolist()} must be >= 1")
        if halt_threshold is None:
            return cycles, None
        threshold = per_row(halt_threshold, batch, "halt_threshold", torch.float32, device)
        if bool(((threshold <= 0) | (threshold > 1)).any()):
            raise ValueError(f"halt_threshold={threshold.tolist()} must be in (0, 1]")
        return cycles, threshold

    def parameter_counts(self) -> dict[str, int]:
        """total; gemma (what a Gemma3ForCausalLM, or with model.vision a Gemma3ForConditionalGeneration,
        of the same shape holds); hrm_only (gates and heads); vision (the image encoder, part of gemma)."""
        total = hrm = vision = 0
        for name, p in self.named_parameters():
            total += p.numel()
            hrm += p.numel() if is_hrm_only(name) else 0
            vision += p.numel() if name.startswith("vision.") else 0
        return {"total": total, "gemma": total - hrm, "hrm_only": hrm, "vision": vision}


# --------------------------------------------------------------------------------------------------
# Building blocks, shared with the pipeline-parallel form (models/lm_pipeline.py)
# --------------------------------------------------------------------------------------------------


def gemma_layer(config: LMModelConfig, kind: str) -> TransformerBlock:
    """One Gemma 3 layer: local (sliding window, RoPE base 1e4) or global."""
    c = config
    return attention_block(
        c.hidden_size, c.num_heads, c.intermediate_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
        norm_placement="sandwich", norm_weight="gemma", eps=c.rms_norm_eps, causal=True,
        window=c.sliding_window if kind == "local" else None, qk_norm=True,
        scale=c.query_pre_attn_scalar**-0.5, activation="gelu_tanh", kind=kind,
    )  # fmt: skip


def halting_block(config: LMModelConfig) -> HaltingCycleBlock:
    """One local-global group as a CycleBlock: L = the local layers, H = the global layer."""
    c = config
    L = BlockStack([gemma_layer(c, "local") for _ in range(c.local_per_global)])
    H = BlockStack([gemma_layer(c, "global")])
    return HaltingCycleBlock(
        L, H, hidden_size=c.hidden_size, l_cycles=c.l_cycles, grad_mode=c.grad_mode, injection=c.injection,
        halt_tolerance=c.halt_tolerance, eps=c.rms_norm_eps, gate_init=c.gate_init, grad_cycles=c.grad_cycles,
    )  # fmt: skip


def tail_stack(config: LMModelConfig) -> BlockStack:
    """The trailing local layers of a partial group, run once."""
    return BlockStack([gemma_layer(config, "local") for _ in range(config.num_tail_layers)])


def rope_tables(config: LMModelConfig) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    """(local, global) RoPE tables."""
    c = config
    n = min(c.max_position, ROPE_TABLE_LEN)
    local = RotaryEmbedding(c.head_dim, n, base=c.rope_local_base)
    return local, RotaryEmbedding(c.head_dim, n, base=c.rope_global_base, scaling=c.rope_scaling)


def embed_scaled(embedding: nn.Module, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """embedding(ids) * sqrt(hidden), the scale rounded to the weight dtype first, as Gemma does."""
    return embedding(input_ids) * torch.tensor(math.sqrt(hidden_size), dtype=embedding.weight.dtype)


def sequence_context(
    config: LMModelConfig,
    ropes: tuple[RotaryEmbedding, RotaryEmbedding],
    x: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None = None,
    past_valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
) -> SeqContext:
    """RoPE tables and masks for one forward, shared by every layer and every cycle.

    x [b, s, h] are the positions being computed. past_valid [b, P] (with a KV cache) flags which of
    the P cached positions before them are real tokens; masks then cover the cached keys too: all P
    for global layers, the last min(P, window-1) (what a local layer's cache keeps) for local ones.
    image_ids [b, s] (`image_indices`: >= 0 on an image's tokens, -1 elsewhere) lets the tokens of one
    image attend to each other both ways. That is Gemma 3's mask: (causal OR same image) on global
    layers, and that AND the window on local ones, where the window bounds only how far back a key may
    be (window-1 positions); later tokens of the same image are always seen.
    """
    b, s, _ = x.shape
    past = 0 if past_valid is None else past_valid.shape[1]
    for name, t in (("attention_mask", attention_mask), ("doc_ids", doc_ids), ("image_ids", image_ids)):
        if t is not None and t.shape != (b, s):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{b}, {s}]")
    if past_valid is not None and past_valid.shape[0] != b:
        raise ValueError(f"the KV cache holds {past_valid.shape[0]} rows but the input has {b}")
    if doc_ids is not None and past:
        raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
    if position_ids is None:
        position_ids = (
            document_positions(doc_ids)
            if doc_ids is not None
            else torch.arange(past, past + s, device=x.device)
        )
    elif position_ids.shape[-1] != s:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; expected [batch, {s}] or [{s}]"
        )
    ropes_at = {"local": ropes[0](position_ids), "global": ropes[1](position_ids)}
    windows = {"local": config.sliding_window, "global": None}
    no_masks = attention_mask is None and doc_ids is None and past_valid is None and image_ids is None
    if no_masks:  # the kernel, or Attention's causal and banded forms, apply causal and window
        return SeqContext(ropes=ropes_at, masks=dict.fromkeys(windows))
    if doc_ids is not None and attention_mask is None and config.packed_attention == "documents":
        starts = document_starts(doc_ids)  # per-document attention: no [s, s] mask (DocumentRuns)
        runs = {
            kind: DocumentRuns.build(starts, window=w, image_ids=image_ids) for kind, w in windows.items()
        }
        return SeqContext(ropes=ropes_at, masks=runs)
    valid = None  # [b, past + s]: which keys are real tokens
    if attention_mask is not None or past_valid is not None:
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, s, dtype=torch.bool, device=x.device)
        )
        if past_valid is not None:
            valid = torch.cat((past_valid, valid), dim=1)
    same_doc = None
    if doc_ids is not None:
        documents = document_starts(doc_ids).cumsum(dim=1)  # [b, s]: index of each token's document
        same_doc = documents[:, :, None] == documents[:, None, :]  # [b, s, s]
    same_image = None
    if image_ids is not None:
        is_image = (image_ids >= 0)[:, :, None]
        same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & is_image  # [b, s, s]
    masks = {}
    for kind, window in windows.items():
        keys = s + (past if window is None else min(past, window - 1))
        mask = causal_mask(s, keys, causal=True, window=window, device=x.device)  # [s, keys]
        if same_image is not None:  # images never span calls, so only this call's keys (the last s) count
            both_ways = same_image
            if window is not None:  # keys at most window-1 back; later keys of the image are never cut
                index = torch.arange(s, device=x.device)
                both_ways = both_ways & (index[None, :] > index[:, None] - window)
            mask = mask | F.pad(both_ways, (keys - s, 0), value=False)  # [b, s, keys]
        if same_doc is not None:
            mask = mask & same_doc  # [b, s, s]
        if valid is not None:
            # Padding keys are hidden; each query keeps itself so no softmax row is empty (pad outputs
            # are garbage but finite, and no real token attends to them).
            itself = causal_mask(s, keys, causal=True, window=1, device=x.device)
            mask = (mask & valid[:, None, valid.shape[1] - keys :]) | itself  # [b, s, keys]
        masks[kind] = mask if mask.dim() == 2 else mask.unsqueeze(1)  # [s, keys] or [b, 1, s, keys]
    return SeqContext(ropes=ropes_at, masks=masks)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, s] bool, True where a document (a maximal run of equal ids) begins."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, s] position of every token within its document (0 at each start)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_index = torch.where(document_starts(doc_ids), index, 0).cummax(dim=1).values
    return index - start_index


def image_indices(input_ids: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """[b, s] ids -> [b, s] long: on every image placeholder the index of its image within the row (each
    mm_tokens_per_image placeholders of a row, in order, are one image), -1 on every other token."""
    placeholders = input_ids == vision.image_token_id
    per_row = placeholders.sum(dim=1)
    partial = (per_row % vision.mm_tokens_per_image).nonzero()
    if len(partial):
        row = int(partial[0, 0])
        raise ValueError(
            f"row {row} holds {int(per_row[row])} image placeholder tokens (id {vision.image_token_id}), not a "
            f"multiple of model.vision.mm_tokens_per_image={vision.mm_tokens_per_image}; is an image cut off?"
        )
    index = torch.div(placeholders.cumsum(dim=1) - 1, vision.mm_tokens_per_image, rounding_mode="floor")
    return torch.where(placeholders, index, -1)


def per_row(
    value: float | torch.Tensor, batch: int, name: str, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A number, or one per row, as a [batch] tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected a number or one per row [{batch}]")
    return t


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    aux: dict[str, torch.Tensor],
    config: LMModelConfig,
    token_mask: torch.Tensor | None = None,
    normalizers: tuple[float, float] | None = None,
    due: torch.Tensor | None = None,
    halt_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Next-token CE + halt_loss_weight * halting BCE + compute_cost_weight * compute cost.

    labels [b, s] are aligned with the inputs (position i predicts labels[i+1]); -100 is ignored.
    token_mask [b, s] (True = real token) restricts the halting terms; default: every token.
    normalizers (labelled tokens, token_mask tokens): what the summed terms are divided by instead of
    this batch's own counts. A trainer passes the counts of the whole step (all ranks and micro-batches),
    so the loss is the same token mean at any data-parallel size and micro-batching.

    Deep supervision (aux["cycle_logits"], model.deep_supervision): the CE is the mean over the readouts
    after H cycles 1..N of each readout's CE. due [b, s] (aligned with labels, like them; the data's
    `due`, prep text --due-field) says from which cycle a target is trained: the readout after cycle
    n < N sees only the targets with due <= n (0: all), so a target that takes d steps to work out is
    not asked of the cycles before d; the last readout (the model's output) is trained on every target,
    as without deep supervision, which is all a model run at N = 1 has. Without model.deep_supervision
    `due` is unused.

    The halting BCE compares each reading but the last, halt_logits[:, :-1], with `converged` (with
    model.halt_target=correct, the last block's with correct_halting_targets on the tokens labelled in
    halt_labels, default `labels`). The
    compute cost is the expected fraction of optional cycles (the N-1 after the first) that a token
    runs if it stops at the first reading whose halt probability fires:
        E[cycles] = 1 + sum_n prod_{m<=n} (1 - p_m),   cost = (E[cycles] - 1) / (N - 1)   (0 when N = 1).
    """
    targets = next_token_targets(labels)
    # Deep supervision: the mean of the CE read out after every H cycle 1..N (the last is `logits`, or
    # aux["ce_sum"] when the forward computed it through the head: logits None).
    readouts = [*aux.get("cycle_logits", []), logits]
    due_targets = None if due is None or not config.deep_supervision else F.pad(due[:, 1:], (0, 1))
    last = len(readouts)
    ce_sum = (
        sum(
            aux["ce_sum"]
            if r is None
            else cross_entropy(  # vocab-parallel under TP
                r,
                targets if due_targets is None or n == last else targets.masked_fill(due_targets > n, -100),
                "softmax",
            ).sum()
            for n, r in enumerate(readouts, start=1)
        )
        / last
    )
    mask = torch.ones_like(labels, dtype=torch.bool) if token_mask is None else token_mask
    counts = normalizers or (float((targets != -100).sum()), float(mask.sum()))
    if config.halt_target == "correct" and len(readouts) > 1:
        if logits is None:
            raise ValueError("model.halt_target=correct needs the logits: call the model without labels")
        decided = targets if halt_labels is None else F.pad(halt_labels[:, 1:], (0, 1), value=-100)
        aux = {**aux, "converged": correct_halting_targets(readouts, decided, aux["converged"])}
    return lm_loss_terms(ce_sum, halting_sums(aux, mask), config, counts)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [b, s] aligned with the inputs -> the target of each position: labels[:, i + 1], -100 last.
    The labels move left, not the logits: slicing logits[:, :-1] would copy the [b, s, V] tensor to
    flatten it and fill a zero one for its gradient."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


@torch.no_grad()
def correct_halting_targets(
    readouts: list[torch.Tensor], targets: torch.Tensor, converged: torch.Tensor
) -> torch.Tensor:
    """model.halt_target=correct: the last CycleBlock's halting targets [N-1, b, s] become, on labelled
    tokens, "the readout after this cycle predicts the label and so does every later one" (stopping
    here loses nothing the full run gets right); unlabelled tokens and other blocks keep `converged`.
    readouts: the logits after H cycles 1..N; targets [b, s] (shifted labels, -100 = none)."""
    right = torch.stack([label_is_argmax(r, targets) for r in readouts])  # [N, b, s]
    stays_right = right.flip(0).int().cumprod(0).flip(0).bool()  # right at n and at every later cycle
    last = torch.where(targets != -100, stays_right[:-1], converged[-1])
    return torch.cat([converged[:-1], last[None]])


def halting_sums(aux: dict[str, torch.Tensor], token_mask: torch.Tensor) -> torch.Tensor:
    """Every CycleBlock's halting terms summed over the masked tokens (halting_token_sums), averaged over
    the blocks: what a pipeline's stages add up and pass along."""
    halt_logits, converged = aux["halt_logits"], aux["converged"]  # [G, N, b, s], [G, N-1, b, s]
    mask, groups = token_mask.to(halt_logits.dtype), halt_logits.shape[0]
    return sum(halting_token_sums(halt_logits[g], converged[g], mask) for g in range(groups)) / groups


def lm_loss_terms(
    ce_sum: torch.Tensor, halting_sums: torch.Tensor, config: LMModelConfig, normalizers: tuple[float, float]
) -> dict[str, torch.Tensor]:
    """lm_loss from its sums: the summed CE over labelled targets and the halting terms summed over the
    masked tokens (halting_token_sums, averaged over blocks), divided by `normalizers` (labelled tokens,
    masked tokens). The last pipeline stage, which only sees these sums, calls this directly."""
    n_labelled, n_masked = normalizers
    ce = ce_sum / max(n_labelled, 1.0)
    halt_bce, cost, mean_cycles = halting_sums / max(n_masked, 1.0)
    loss = ce + config.halt_loss_weight * halt_bce + config.compute_cost_weight * cost
    return {
        "loss": loss,
        "ce": ce,
        "halt_bce": halt_bce,
        "compute_cost": cost,
        "expected_cycles": mean_cycles.detach(),
    }


def halting_token_sums(
    halt_logits: torch.Tensor, converged: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One CycleBlock's halting terms summed over the masked tokens: [halt BCE, compute cost, expected
    cycles]. halt_logits [N, b, s], converged [N-1, b, s], mask [b, s] (float). lm_loss averages them
    over blocks and tokens; a pipeline stage sums its own blocks' and passes on only these numbers.

    The BCE is the mean over the N-1 readings with a target; with N = 1 both loss terms are 0 (kept in
    the graph, so every stage's halting head takes part in backward) and a token runs 1 cycle."""
    n = halt_logits.shape[0]
    if n > 1:
        decisions = halt_logits[:-1]
        bce = F.binary_cross_entropy_with_logits(
            decisions, converged.to(decisions.dtype), reduction="none"
        ).mean(dim=0)
        keep_going = torch.cumprod(1 - torch.sigmoid(decisions), dim=0)  # P(cycle n+2 runs), n = 0..N-2
        expected = 1 + keep_going.sum(dim=0)  # [b, s]
        cost = (expected - 1) / (n - 1)
    else:
        bce = cost = halt_logits[0] * 0.0
        expected = torch.ones_like(mask)
    return torch.stack([(bce * mask).sum(), (cost * mask).sum(), (expected.detach() * mask).sum()])
