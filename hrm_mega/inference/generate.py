"""Text generation for HRMGemma: prefill, then streaming decode against a KV cache, with per-token halting.

    steps = stream_generate(model, ids, attention_mask=mask, max_new_tokens=64, max_cycles=8,
                            halt_threshold=0.9, top_p=0.95, seed=0)
    for step in steps:             # one DecodeStep per new token (a token for every row)
        ...                        # step.tokens [b], step.cycles [b, G], step.active, step.finished

`generate(...)` runs the same loop to the end and returns a `Generation`.

- Prompts are a batch with left padding (`left_pad` builds one from token lists): every row's last
  prompt token is the last column, so each step appends one column. Positions count real tokens only,
  so a row computes exactly what it would alone.
- Halting (see models/lm.py): every block of every position runs at most `max_cycles` H cycles, and
  stops earlier where its halting head reaches `halt_threshold`. Both may be one value per row.
  `max_cycles` may exceed the trained h_cycles. With `halt_temperature` (RL) the positions that
  produce new tokens draw their halting instead (models.lm.HaltActions: P(halt) = sigmoid((halt logit
  - logit(halt_threshold)) / halt_temperature), keyed by seed, row and position), and each step
  reports the log-probability of its decisions; the prompt's other positions keep the threshold rule.
- Sampling: greedy (argmax), or softmax sampling at `temperature` restricted to the `top_k` most likely
  tokens and to the smallest set whose probability reaches `top_p`. A torch.Generator seeded with
  `seed` draws every sample, so the same seed gives the same tokens.
- A row finishes when it emits `eos_id`; later steps give it `pad_id` (inactive). The loop ends when
  every row has finished or after `max_new_tokens` steps.
- `kv_pool` (a models.paged_kv_cache.BlockPool) puts the cache in fixed-size blocks of that pool, which
  may keep only some blocks resident and offload the rest; the tokens are the same. Without it the
  cache is the rectangular KVCache.
- `use_cache=False` recomputes the whole sequence at every step (the reference the cache is tested
  against); the cached path computes only the new positions, and only of the rows still running: a
  finished row leaves the batch and its cache (row compaction). Sampling still draws for every row, so
  the same seed gives the same tokens whichever rows have finished. Rows that repeat a prompt with the
  same halting limits (an RL group's samples) share one prefill, whose cache rows are then copied
  (not with drawn halting: the last prompt position draws per row).

Cycles reported for a token are those of the forward that produced it: the H cycles each block ran on
the position whose logits the token was drawn from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from hrm_mega.models.fast_layers import fast_layers
from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.lm import HaltActions, HRMGemma
from hrm_mega.models.paged_kv_cache import BlockPool, PagedKVCache
from hrm_mega.models.vocab import gather_vocab


@dataclass
class DecodeStep:
    """The token of one decoding step for every row."""

    index: int  # 0 for the first new token
    tokens: torch.Tensor  # [b] long; pad_id where the row is inactive
    cycles: (
        torch.Tensor
    )  # [b, G] long: H cycles per block on the position that produced the token; 0 if inactive
    logits: torch.Tensor  # [b, vocab] fp32: the model's next-token logits (before vocab_limit)
    active: torch.Tensor  # [b] bool: the row produced a real token in this step
    finished: torch.Tensor  # [b] bool: the row is done after this step
    # [b] fp32: log-prob of the drawn halting decisions of the position that produced the token (0
    # without halt_temperature, or if inactive)
    halt_logprobs: torch.Tensor | None = None


@dataclass
class Generation:
    tokens: torch.Tensor  # [b, n] new tokens (n <= max_new_tokens); pad_id after a row's eos
    cycles: torch.Tensor  # [b, n, G] long: H cycles per block for every new token (0 after eos)
    lengths: torch.Tensor  # [b] long: new tokens per row, its eos included

    def mean_cycles(self) -> float:
        """Mean H cycles per block over the real new tokens (nan if there are none)."""
        steps = torch.arange(self.tokens.shape[1], device=self.lengths.device)
        real = steps[None, :] < self.lengths[:, None]  # [b, n]
        return self.cycles[real].float().mean().item() if bool(real.any()) else float("nan")


def left_pad(
    prompts: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [b, s], attention_mask [b, s]) with the padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def sample_token(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [b, vocab] -> token ids [b]: argmax, or a sample after temperature, top-k and top-p."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # of the strictly more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))  # the most likely token always stays
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def stream_generate(
    model: HRMGemma,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    max_cycles: int | torch.Tensor | None = None,
    halt_threshold: float | torch.Tensor | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    vocab_limit: int | None = None,
    use_cache: bool = True,
    pixel_values: torch.Tensor | None = None,
    kv_pool: BlockPool | None = None,
    halt_temperature: float | None = None,
) -> Iterator[DecodeStep]:
    """Checks the arguments, then returns an iterator of one DecodeStep per new token (module docstring).

    input_ids [b, s] prompts with left padding marked by attention_mask [b, s] (1 = token; default: no
    padding); max_cycles: an int or one per row [b] (default: model.config.h_cycles); halt_threshold:
    None (no early halting) or a probability, or one per row [b]; vocab_limit: generate only ids below
    it (a tokenizer smaller than the model's padded vocabulary). pixel_values [n_images, 3, S, S]: the
    images of the prompts' placeholder runs (a model with model.vision; HRMGemma.forward's order), read
    once in the prefill: the cache keeps what the tokens after them need. halt_temperature: draw the
    halting of the positions that produce tokens (needs a halt_threshold below 1; module docstring).
    """
    if not isinstance(model, HRMGemma):
        raise ValueError(f"generation needs an HRMGemma language model, not a {type(model).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, prompt_len >= 1]")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vision = model.config.vision
    _check_prompts(
        input_ids, attention_mask, model.config.vocab_size, vision.image_token_id if vision else None
    )
    _check_sampling(max_new_tokens, greedy, temperature, top_k, top_p)
    if vocab_limit is not None and not 0 < vocab_limit <= model.config.vocab_size:
        raise ValueError(
            f"vocab_limit={vocab_limit} must be in [1, model.vocab_size={model.config.vocab_size}]"
        )
    cycles_t, threshold_t = model.halting_limits(
        max_cycles, halt_threshold, input_ids.shape[0], input_ids.device
    )
    halting = {"max_cycles": cycles_t, "halt_threshold": threshold_t}
    if halt_temperature is not None:
        if halt_temperature <= 0:
            raise ValueError(f"halt_temperature={halt_temperature} must be > 0")
        if threshold_t is None or bool((threshold_t >= 1).any()):
            raise ValueError(f"drawn halting needs a halt_threshold below 1, not {halt_threshold}")
    draws = None if halt_temperature is None else HaltDraws(seed, halt_temperature)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if vocab_limit is not None:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        return sample_token(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)  # fmt: skip

    return _decode(model, input_ids, attention_mask.long(), max_new_tokens, halting, pick, eos_id, pad_id,
                   use_cache, pixel_values, kv_pool, draws)  # fmt: skip


@dataclass
class HaltDraws:
    """Drawn halting for a generation: the HaltActions of each forward, keyed by row and position."""

    seed: int
    temperature: float

    def actions(self, rows: torch.Tensor, positions: torch.Tensor, where: torch.Tensor) -> HaltActions:
        """rows [b]: the rows' indices in the generation; positions [b, s]; where [b, s] bool."""
        keys = (rows[:, None].long() << 32) | positions.long()
        return HaltActions(where=where, temperature=self.temperature, seed=self.seed, keys=keys)


def generate(model: HRMGemma, input_ids: torch.Tensor, **options: Any) -> Generation:
    """Runs `stream_generate` (same arguments) to the end: new tokens, cycles per token and row lengths."""
    b = input_ids.shape[0] if input_ids.dim() == 2 else 0
    tokens, cycles = [], []
    lengths = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    for step in stream_generate(model, input_ids, **options):
        tokens.append(step.tokens)
        cycles.append(step.cycles)
        lengths += step.active
    if not tokens:
        empty = input_ids.new_zeros((b, 0))
        return Generation(empty, empty.new_zeros((b, 0, len(model.blocks))), lengths)
    return Generation(torch.stack(tokens, dim=1), torch.stack(cycles, dim=1), lengths)


def _decode(
    model: HRMGemma,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    halting: dict[str, torch.Tensor | None],
    pick: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int | None,
    pad_id: int,
    use_cache: bool,
    pixel_values: torch.Tensor | None = None,
    kv_pool: BlockPool | None = None,
    draws: HaltDraws | None = None,
) -> Iterator[DecodeStep]:
    if max_new_tokens == 0:
        return
    if not use_cache:
        yield from _decode_with(
            None, model, ids, mask, max_new_tokens, halting, pick, eos_id, pad_id, pixel_values, draws
        )
    elif kv_pool is None:
        yield from _decode_with(KVCache(), model, ids, mask, max_new_tokens, halting, pick, eos_id, pad_id,
                                pixel_values, draws)  # fmt: skip
    else:
        paged = PagedKVCache(kv_pool)
        try:
            yield from _decode_with(paged, model, ids, mask, max_new_tokens, halting, pick, eos_id, pad_id,
                                    pixel_values, draws)  # fmt: skip
        finally:  # the pool outlives this generation: give its blocks back
            paged.release()


def _decode_with(
    cache: KVCache | PagedKVCache | None,
    model: HRMGemma,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    halting: dict[str, torch.Tensor | None],
    pick: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int | None,
    pad_id: int,
    pixel_values: torch.Tensor | None,
    draws: HaltDraws | None = None,
) -> Iterator[DecodeStep]:
    ids = ids.masked_fill(mask == 0, 0)  # any id at padding positions (nothing attends to them) must embed
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)  # padding takes position 0; it is never attended
    next_position = mask.sum(dim=1)  # [b]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    running = torch.arange(ids.shape[0], device=ids.device)  # the rows the cache holds
    # Cached forwards run each attention block as one flat function (models/fast_layers.py: the same
    # numbers, a third of the operations), its weights prepared here, once per generation.
    flat = fast_layers(model).active if cache is not None else nullcontext
    # The rectangular cache's forwards run in inference mode (less bookkeeping per operation than no_grad);
    # their tensors stay in this function, and what leaves it (a DecodeStep) is made outside.
    no_grad = torch.inference_mode if isinstance(cache, KVCache) else torch.no_grad
    # around each call only: a generator suspended inside `with no_grad()` would leak it to the caller
    every = torch.arange(ids.shape[0], device=ids.device)
    # With drawn halting: the last prompt position draws (it produces the first token), as does every
    # fed token; without a cache every forward reruns the sequence, and the keyed draws repeat exactly.
    draw_at = torch.zeros_like(mask, dtype=torch.bool)
    draw_at[:, -1] = True
    acts = None if draws is None else draws.actions(every, positions, draw_at)
    acted = every  # the rows of `acts`
    with no_grad(), flat():
        if isinstance(cache, KVCache) and pixel_values is None and draws is None:
            logits, cycles = _shared_prefill(model, cache, ids, mask, positions, halting)
        else:
            logits, cycles = model.infer(
                ids, pixel_values=pixel_values, attention_mask=mask, position_ids=positions, cache=cache,
                halt_actions=acts, **halting,
            )  # fmt: skip
    vocab_size = model.config.vocab_size
    for index in range(max_new_tokens):
        active = ~finished
        step_logits = logits[:, -1].float().clone()  # (a normal tensor, not inference mode's)
        if step_logits.shape[-1] < vocab_size:  # a tensor-parallel rank's slice: every rank samples alike
            step_logits = gather_vocab(step_logits)
        tokens = torch.where(active, pick(step_logits), pad_id)
        step_cycles = torch.where(active[:, None], cycles[:, :, -1].T, 0)  # [b, G]
        halt_lp = None
        if acts is not None:  # (made outside inference mode, like step_logits)
            halt_lp = torch.zeros(ids.shape[0], device=ids.device)
            halt_lp = torch.where(active, halt_lp.index_copy(0, acted, acts.logprob[:, -1].float()), 0.0)
        if eos_id is not None:
            finished = finished | (tokens == eos_id)
        yield DecodeStep(index, tokens, step_cycles, step_logits, active, finished.clone(), halt_lp)
        if index + 1 == max_new_tokens or bool(finished.all()):
            return
        # Feed the new tokens; finished rows feed padding (id 0), which nothing attends to.
        fed = torch.where(finished, 0, tokens)[:, None]
        new_positions = next_position[:, None]
        next_position = next_position + 1
        with no_grad(), flat():
            if cache is not None:
                if bool(finished[running].any()):  # row compaction: finished rows leave the batch
                    running, kept = running[~finished[running]], (~finished[running]).nonzero().squeeze(1)
                    cache.select(kept)
                    halting = {k: None if v is None else v.index_select(0, kept) for k, v in halting.items()}
                # the rows the cache holds all feed a real token: no attention mask
                if draws is not None:
                    feeds, acted = new_positions[running], running
                    acts = draws.actions(running, feeds, torch.ones_like(feeds, dtype=torch.bool))
                if running.shape[0] == ids.shape[0]:
                    logits, cycles = model.infer(
                        fed, position_ids=new_positions, cache=cache, halt_actions=acts, **halting
                    )
                    continue
                part, part_cycles = model.infer(
                    fed[running], position_ids=new_positions[running], cache=cache, halt_actions=acts,
                    **halting,
                )  # fmt: skip
                logits = part.new_zeros((ids.shape[0], *part.shape[1:])).index_copy_(0, running, part)
                cycles = part_cycles.new_zeros((part_cycles.shape[0], ids.shape[0], *part_cycles.shape[2:]))
                cycles.index_copy_(1, running, part_cycles)
            else:
                new_mask = (~finished).long()[:, None]
                ids = torch.cat((ids, fed), dim=1)
                mask = torch.cat((mask, new_mask), dim=1)
                positions = torch.cat((positions, new_positions), dim=1)
                if draws is not None:  # the produced tokens' positions: the prompt's last and after
                    draw_at = torch.cat((draw_at, new_mask.bool()), dim=1)
                    acts = draws.actions(every, positions, draw_at)
                logits, cycles = model.infer(
                    ids, pixel_values=pixel_values, attention_mask=mask, position_ids=positions,
                    halt_actions=acts, **halting,
                )  # fmt: skip


def _shared_prefill(
    model: HRMGemma,
    cache: KVCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    halting: dict[str, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' forward, once per distinct row: rows with the same prompt (and halting limits), such
    as an RL group's samples, share one prefill, whose cache rows and last logits are then copied to each.
    Each row computes what it would in the full batch, up to the GEMM's rounding for another row count
    (on the CPU none: MKL gives a row the same bits for any count from 4 rows, which a prompt of 4 or
    more tokens has; bench/rl_throughput.py --compare-rollout checks the samples bit for bit).
    Returns the last position's logits [b, 1, vocab] and cycles [G, b, 1]."""
    b = ids.shape[0]
    limits = [halting["max_cycles"][:, None]]
    if halting["halt_threshold"] is not None:
        limits.append(halting["halt_threshold"].view(torch.int32).long()[:, None])  # its bits
    _, inverse = torch.cat([ids, mask, *limits], dim=1).unique(dim=0, return_inverse=True)
    distinct = int(inverse.max()) + 1
    if distinct == b:
        logits, cycles = model.infer(ids, attention_mask=mask, position_ids=positions, cache=cache, **halting)
        return logits[:, -1:], cycles[:, :, -1:]
    # each distinct row's first occurrence, in batch order
    first = torch.full((distinct,), b, device=ids.device).scatter_reduce_(
        0, inverse, torch.arange(b, device=ids.device), reduce="amin"
    )
    first, order = first.sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(distinct, device=ids.device)
    rows = rank[inverse]  # [b]: each row's index among the distinct ones
    part = {k: None if v is None else v[first] for k, v in halting.items()}
    logits, cycles = model.infer(
        ids[first], attention_mask=mask[first], position_ids=positions[first], cache=cache, **part
    )
    cache.select(rows)
    return logits[:, -1:].index_select(0, rows), cycles[:, :, -1:].index_select(1, rows)


def _check_prompts(
    ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, image_id: int | None = None
) -> None:
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must be left padding: each row 0s (padding), then 1s (prompt)")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("every prompt needs at least one token (a row of attention_mask is all 0)")
    real = ids[mask.bool()]
    if image_id is not None:  # the image placeholder may be the id after the vocabulary (Gemma 3's)
        real = real[real != image_id]
    if bool(((real < 0) | (real >= vocab_size)).any()):
        raise ValueError(f"input_ids holds ids outside the model's vocabulary [0, {vocab_size})")


def _check_sampling(max_new_tokens: int, greedy: bool, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if greedy and (temperature != 1.0 or top_k != 0 or top_p != 1.0):
        raise ValueError("greedy decoding takes no temperature, top_k or top_p; drop them or greedy")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy decoding for argmax)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
