"""Rollouts for RL post-training, and the training-forward recomputation of their log-probs.

Both families sample `group_size` rollouts per prompt; rows are group-major (rows i*n .. i*n+n-1 hold
prompt i), the layout `advantages.group_advantages` expects.

Puzzles (RecursiveReasoner), `puzzle_rollout`. The policy is non-autoregressive: the ACT loop runs
segments from a fresh carry (as hrm_mega/inference/puzzle.py does) and, once a row halts, every cell is
sampled at once from that final segment's distribution: softmax(logits / temperature), or stablemax
when the model was trained with the stablemax loss (model.config.loss), so the policy is the
distribution the model was trained to put out. The actions of a row are its seq_len cells followed by
its halting decisions (one column per segment, halt_max_steps columns; see `mask`).

Halting (`halting=`):
    sample  (default) after segment m < halt_max_steps a running row halts with probability
            sigmoid(logit / halt_temperature), where logit is models.act.halt_logit: q_halt - q_continue
            (q_target bootstrap), q_halt (halt_only), or q_halt - logit(t) under model.halt_threshold t.
            At halt_temperature 1 this is the Boltzmann policy over the two Q-values; whatever the
            temperature its mode is the greedy rule. The decisions are actions with log-probs, so the
            policy gradient reaches the Q-head, and the samples of one puzzle use different numbers of
            segments; only then does halting-aware reward shaping (reward - lam * segments / max) tell
            samples of the same group apart. A lower halt_temperature makes the sampled policy closer
            to the greedy one that adaptive evaluation runs: at 1, rows halt on wrong answers so often
            that the expected reward barely depends on the halting bias (docs/benchmarks.md, Sudoku
            compute cost).
    greedy  the evaluation rule (q_says_halt): deterministic, so every sample of a puzzle runs the same
            segments and no decision is an action (compute shaping cannot change group advantages).
    fixed   every row runs halt_max_steps segments (the papers' evaluation).
The segment at halt_max_steps always ends a row; it is not a decision.

Randomness is keyed, not drawn from a stream: every draw is a function of (seed, the sample's key,
the sample's index in its group, the cell or segment), via models.keyed.keyed_uniform. Sample keys are
batch["sample_id"] when present (else the row index), so a puzzle gets the same rollouts on any rank
and in any batch position. Pass a seed that changes every step.

Language (HRMGemma), `lm_rollout`: autoregressive sampling through hrm_mega.inference.generate with
KV caches and per-token halting (max_cycles, halt_threshold), temperature, top-k and top-p. The
returned log-probs are those of the policy softmax(logits / temperature) over the ids below
vocab_limit, computed from the logits each decoding step reports; they do not include the top-k /
top-p truncation (the training forward cannot know it), so with truncation the sampler's probability
of a token is higher than the reported one. `kv_pool` (built from the config by `rollout_kv_pool`:
rl.kv_cache=paged) decodes into the paged cache's blocks instead of the rectangular cache, with the
same tokens.

With `halt_temperature` (rl.halting=sample and a halt_threshold) the LM's per-token halting is drawn
too: every position that produces a token draws its decisions from its halting head
(models.lm.HaltActions), and a token's log-prob is that of the joint action, halting decisions and
token (`halt_logprobs` holds the halting part).

Recomputation (`puzzle_policy`, `lm_policy`, or `recompute_policy` for either) runs the *training*
forward over the rollouts (for puzzles the same segments; for the LM `model.forward`, which runs every
block for all model.config.h_cycles, or with drawn halting `lm_replay`, which replays the recorded
cycles through `HRMGemma.infer`) and returns the actions' log-probs (with grad when grad is enabled),
the entropies and, with a value head, the values. Without halting (halt_threshold None, max_cycles =
h_cycles), or with drawn halting, and at top-k 0 / top-p 1 these equal the rollout's log-probs to float
rounding; with the threshold rule the LM's training forward runs more cycles than decoding did, and
`logprob_mismatch` measures the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal, TypeVar

import torch
import torch.nn.functional as F

from hrm_mega.inference.generate import stream_generate
from hrm_mega.models.act import halt_logit
from hrm_mega.models.keyed import keyed_uniform
from hrm_mega.models.lm import HaltActions
from hrm_mega.models.paged_kv_cache import BlockPool, pool_for
from hrm_mega.models.recurrence import Carry
from hrm_mega.models.vocab import gather_vocab, log_stablemax

if TYPE_CHECKING:
    from hrm_mega.config import RLConfig

Halting = Literal["sample", "greedy", "fixed"]
HALTING_MODES = ("sample", "greedy", "fixed")
_HALT_STREAM, _CELL_STREAM = 0, 1  # separate keyed streams for halting and cell draws
RolloutT = TypeVar("RolloutT", "PuzzleRollout", "LMRollout")


@dataclass
class PolicyOutput:
    """The training forward's view of a rollout's actions."""

    logprobs: torch.Tensor  # [N, A] fp32: log-prob of every action (0 where the rollout's mask is False)
    entropy: torch.Tensor  # [N, A] fp32, detached: entropy of each action's distribution (0 where masked)
    values: torch.Tensor | None = None  # [N, A] fp32 from the value head (LM with model.value_head)


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def action_logprobs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    distribution: str = "softmax",
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """logits [..., V] -> log-probs [..., V'] (fp32) of the sampling policy: softmax or stablemax of
    logits / temperature, over the first vocab_limit ids when given (V' = vocab_limit)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    x = logits.float() / temperature
    if distribution == "stablemax":
        return log_stablemax(x.double()).float()
    if distribution == "softmax":
        return F.log_softmax(x, dim=-1)
    raise ValueError(f"distribution={distribution!r} must be softmax or stablemax")


def full_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The whole vocabulary's logits: under tensor parallelism models return this rank's slice, which is
    gathered (every rank then computes the same log-probs; the gather's backward hands each rank the
    gradient of its own slice)."""
    return logits if logits.shape[-1] >= vocab_size else gather_vocab(logits)


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probs -> [...] entropy (0 * log 0 counts as 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


def logprob_mismatch(
    rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the training forward's log-probs are from the rollout's, over the masked actions:
    mean and max |difference|, and the k3 estimate of KL(rollout || train)."""
    m = mask.bool()
    diff = torch.where(m, train_logprobs.detach().float() - rollout_logprobs.float(), 0.0)
    count = m.sum().clamp_min(1)
    k3 = torch.exp(diff) - diff - 1
    return {
        "logprob_diff_mean_abs": diff.abs().sum() / count,
        "logprob_diff_max_abs": diff.abs().max() if diff.numel() else diff.new_zeros(()),
        "kl_rollout_train": k3.sum() / count,
    }


def _select(rollout: RolloutT, rows: torch.Tensor | slice) -> RolloutT:
    """The rollout restricted to `rows` (tensor fields and batch entries indexed on dim 0)."""
    changes = {}
    for f in fields(rollout):
        value = getattr(rollout, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value[rows]
        elif isinstance(value, dict):
            changes[f.name] = {k: v[rows] for k, v in value.items()}
    return replace(rollout, **changes)


# --------------------------------------------------------------------------------------------------
# Puzzles
# --------------------------------------------------------------------------------------------------


@dataclass
class PuzzleRollout:
    """`group_size` sampled solutions of each puzzle of a batch (group-major rows, N = puzzles * n)."""

    batch: dict[str, torch.Tensor]  # the puzzle batch with every row repeated group_size times
    tokens: torch.Tensor  # [N, seq_len] long: the sampled cells
    logprobs: torch.Tensor  # [N, seq_len + M] fp32: cells, then halting decisions 1..M (M = halt_max_steps)
    mask: torch.Tensor  # [N, seq_len + M] bool: which entries are actions (every cell; sampled decisions)
    segments: torch.Tensor  # [N] long: ACT segments run (halt_max_steps at most)
    group_size: int
    temperature: float
    halting: str
    distribution: str  # softmax | stablemax
    halt_temperature: float = 1.0  # halting decisions are drawn from sigmoid(halt logit / this)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def cell_logprobs(self) -> torch.Tensor:
        return self.logprobs[:, : self.seq_len]

    @property
    def halt_logprobs(self) -> torch.Tensor:
        return self.logprobs[:, self.seq_len :]

    def select(self, rows: torch.Tensor | slice) -> PuzzleRollout:
        """These rows only (e.g. a micro-batch for `puzzle_policy`)."""
        return _select(self, rows)


def _halt_logprob(logit: torch.Tensor, halt: torch.Tensor) -> torch.Tensor:
    return torch.where(halt, F.logsigmoid(logit), F.logsigmoid(-logit))


def _halt_entropy(logit: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logit)
    return -(p * F.logsigmoid(logit) + (1 - p) * F.logsigmoid(-logit))


def _repeat_rows(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    b = batch["inputs"].shape[0]
    return {
        k: v.repeat_interleave(n, dim=0)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b
    }


def puzzle_rollout(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    group_size: int,
    temperature: float = 1.0,
    halting: Halting = "sample",
    seed: int = 0,
    halt_temperature: float = 1.0,
) -> PuzzleRollout:
    """Samples `group_size` solutions per puzzle of `batch` (inputs [b, seq_len], puzzle_identifiers [b],
    optional sample_id [b] keying the draws; other [b, ...] entries are carried along) with the ACT loop
    and per-cell sampling from the halting segment (module docstring). `model`: a RecursiveReasoner
    (or an engine wrapping one). Runs under no_grad.

    Rows that halted keep running (their results are discarded) until every row has halted, as
    run_fixed does: the batch keeps its shape, so `puzzle_policy` recomputes the same numbers. Padding
    rows (batch["valid"] False) are rolled out too; leave them out of the loss through the mask."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if halting not in HALTING_MODES:
        raise ValueError(f"halting={halting!r} must be one of {', '.join(HALTING_MODES)}")
    if "inputs" not in batch or batch["inputs"].dim() != 2:
        raise ValueError("batch needs inputs [batch, seq_len] (and puzzle_identifiers [batch])")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if halt_temperature <= 0:
        raise ValueError(f"halt_temperature={halt_temperature} must be > 0")
    config = model.config
    distribution = config.loss
    max_steps = config.halt_max_steps
    b, seq_len = batch["inputs"].shape
    rows = _repeat_rows(batch, group_size)
    n_rows = b * group_size
    device = rows["inputs"].device
    keys = rows.get("sample_id", torch.arange(b, device=device).repeat_interleave(group_size)).long()
    draw = torch.arange(n_rows, device=device) % group_size  # the sample's index in its group

    segments = torch.zeros(n_rows, dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    halt_lp = torch.zeros(n_rows, max_steps, device=device)
    halt_mask = torch.zeros(n_rows, max_steps, dtype=torch.bool, device=device)
    with torch.no_grad():
        carry: Carry = model.initial_carry(n_rows)
        final_logits = None
        for m in range(max_steps):
            out = model(carry, rows)
            carry = out.carry
            running = ~done
            final_logits = (
                out.logits
                if final_logits is None
                else torch.where(running[:, None, None], out.logits, final_logits)
            )
            segments = torch.where(running, m + 1, segments)
            if m + 1 == max_steps or halting == "fixed":
                continue
            logit = halt_logit(config, out) / halt_temperature  # the sign, hence greedy, is unchanged
            if halting == "greedy":
                halt = logit > 0
            else:
                u = keyed_uniform(
                    seed, keys, draw, torch.full_like(keys, m), torch.full_like(keys, _HALT_STREAM)
                )
                halt = u < torch.sigmoid(logit.double())
                halt_lp[:, m] = torch.where(running, _halt_logprob(logit, halt), 0.0)
                halt_mask[:, m] = running
            done = done | (running & halt)
            if bool(done.all()):
                break

        logp = action_logprobs(full_vocab(final_logits, config.vocab_size), temperature, distribution)
        cell = torch.arange(seq_len, device=device)
        u = keyed_uniform(
            seed,
            *torch.broadcast_tensors(
                keys[:, None], draw[:, None], cell[None, :], torch.full((1, 1), _CELL_STREAM, device=device)
            ),
        )
        cdf = logp.double().exp().cumsum(dim=-1)  # inverse-CDF sampling with the keyed uniforms
        tokens = (cdf < (u * cdf[..., -1])[..., None]).sum(dim=-1).clamp_max(logp.shape[-1] - 1)
        cell_lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    cell_mask = torch.ones(n_rows, seq_len, dtype=torch.bool, device=device)
    return PuzzleRollout(
        batch=rows,
        tokens=tokens,
        logprobs=torch.cat((cell_lp.float(), halt_lp), dim=1),
        mask=torch.cat((cell_mask, halt_mask), dim=1),
        segments=segments,
        group_size=group_size,
        temperature=temperature,
        halting=halting,
        distribution=distribution,
        halt_temperature=halt_temperature,
    )


def puzzle_policy(
    model: torch.nn.Module, rollout: PuzzleRollout, segments: int | None = None
) -> PolicyOutput:
    """Recomputes a puzzle rollout's action log-probs with the training forward: the same segments from
    a fresh carry (every segment is a normal one-segment forward, so gradients flow as in ACT training),
    the cells from each row's last segment, each sampled halting decision from its segment's Q-head
    (at the rollout's halt_temperature).
    Put a `puzzle_emb` leaf into rollout.batch to collect puzzle-embedding gradients.

    `segments`: how many forwards to run (default: the rows' most; at least that). Under ZeRO-3 every
    forward gathers the weights, a collective, so every data-parallel rank must run as many: pass the
    most over all ranks. Segments after a row's last change none of its numbers."""
    config = model.config
    n_rows, seq_len = rollout.tokens.shape
    max_steps = config.halt_max_steps
    decisions = rollout.mask[:, seq_len:]
    if decisions.shape[1] != max_steps:
        raise ValueError(
            f"the rollout has {decisions.shape[1]} halting columns; the model's halt_max_steps is {max_steps}"
        )
    carry = model.initial_carry(n_rows)
    final_logits = None
    halt_lp, halt_ent = [], []
    for m in range(max(int(rollout.segments.max()), segments or 0)):
        out = model(carry, rollout.batch)
        carry = out.carry
        last = rollout.segments == m + 1
        final_logits = (
            out.logits if final_logits is None else torch.where(last[:, None, None], out.logits, final_logits)
        )
        logit = halt_logit(config, out) / rollout.halt_temperature
        halt_lp.append(torch.where(decisions[:, m], _halt_logprob(logit, last), 0.0))
        halt_ent.append(torch.where(decisions[:, m], _halt_entropy(logit.detach()), 0.0))
    pad = max_steps - len(halt_lp)
    zeros = torch.zeros(n_rows, pad, device=rollout.tokens.device)
    logp = action_logprobs(
        full_vocab(final_logits, config.vocab_size), rollout.temperature, rollout.distribution
    )
    cell_lp = logp.gather(-1, rollout.tokens[..., None]).squeeze(-1)
    with torch.no_grad():
        cell_ent = entropy_from_logprobs(logp)
    return PolicyOutput(
        logprobs=torch.cat((cell_lp, *[x[:, None] for x in halt_lp], zeros), dim=1),
        entropy=torch.cat((cell_ent, *[x[:, None] for x in halt_ent], zeros), dim=1),
    )


# --------------------------------------------------------------------------------------------------
# Language (HRMGemma)
# --------------------------------------------------------------------------------------------------


@dataclass
class LMRollout:
    """`group_size` sampled completions of each prompt (group-major rows, N = prompts * n)."""

    prompt_ids: torch.Tensor  # [N, P] long, left-padded (padding ids are 0)
    prompt_mask: torch.Tensor  # [N, P] long: 1 = prompt token
    completion_ids: torch.Tensor  # [N, T] long: new tokens, pad_id after a row's eos
    completion_mask: torch.Tensor  # [N, T] bool: real new tokens (the eos included)
    # [N, T] fp32: log-prob of each new token under softmax(logits / temperature), plus with drawn
    # halting that of the halting decisions of the position that produced it (halt_logprobs)
    logprobs: torch.Tensor
    cycles: torch.Tensor  # [N, T, G] long: H cycles each block ran for the position that produced the token
    finished: torch.Tensor  # [N] bool: the row emitted eos
    group_size: int
    temperature: float
    vocab_limit: int | None
    max_cycles: torch.Tensor | None = None  # [N] long: the rows' cycle limits (None: model.h_cycles)
    halt_threshold: torch.Tensor | None = None  # [N] fp32, or None: no early halting
    # Drawn halting (an action: halt_logprobs [N, T] its log-probs) at this temperature; None: the
    # threshold rule decided
    halt_temperature: float | None = None
    halt_logprobs: torch.Tensor | None = None

    def completion_lists(self, eos_id: int | None = None) -> list[list[int]]:
        """Each row's new tokens as a list (for a tokenizer's decode), without a trailing eos_id."""
        out = []
        for ids, real in zip(self.completion_ids.tolist(), self.completion_mask.tolist()):
            tokens = [t for t, r in zip(ids, real) if r]
            if eos_id is not None and tokens and tokens[-1] == eos_id:
                tokens.pop()
            out.append(tokens)
        return out

    def select(self, rows: torch.Tensor | slice) -> LMRollout:
        """These rows only (e.g. a micro-batch for `lm_policy`)."""
        return _select(self, rows)


def lm_rollout(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_cycles: int | torch.Tensor | None = None,
    halt_threshold: float | torch.Tensor | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    vocab_limit: int | None = None,
    kv_pool: BlockPool | None = None,
    halt_temperature: float | None = None,
) -> LMRollout:
    """Samples `group_size` completions per prompt with hrm_mega.inference.generate (KV caches, per-token
    halting). input_ids [b, P] with left padding marked by attention_mask [b, P] (see generate.left_pad);
    max_cycles / halt_threshold: a number or one per prompt [b]; `model`: an HRMGemma (an engine's
    .module). The other arguments are stream_generate's (kv_pool: see `rollout_kv_pool`;
    halt_temperature: the halting of every position that produces a token is drawn, an action whose
    log-prob joins the token's). Runs under no_grad.

    The draws come from one torch.Generator seeded with `seed` (generate's), so they depend on the batch
    a prompt is in: give every step and every data-parallel rank its own seed."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, prompt_len]")
    n = group_size
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    ids, mask = input_ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)

    def per_row(value: int | float | torch.Tensor | None) -> int | float | torch.Tensor | None:
        return value.repeat_interleave(n, dim=0) if isinstance(value, torch.Tensor) and value.dim() else value

    steps = stream_generate(
        model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, max_cycles=per_row(max_cycles),
        halt_threshold=per_row(halt_threshold), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_id=eos_id, pad_id=pad_id, vocab_limit=vocab_limit, kv_pool=kv_pool,
        halt_temperature=halt_temperature,
    )  # fmt: skip
    rows, device = ids.shape[0], ids.device
    # One column per decoding step, after an empty one (so max_new_tokens = 0 gives [N, 0] tensors).
    tokens = [ids.new_zeros((rows, 0))]
    active = [torch.zeros(rows, 0, dtype=torch.bool, device=device)]
    logprobs = [torch.zeros(rows, 0, device=device)]
    halt_logprobs = [torch.zeros(rows, 0, device=device)]
    cycles = [ids.new_zeros((rows, 0, len(model.blocks)))]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in steps:
        logits = full_vocab(step.logits, model.config.vocab_size)
        logp = action_logprobs(logits, temperature, vocab_limit=vocab_limit)
        safe = torch.where(step.active, step.tokens, 0)  # pad_id may lie outside vocab_limit
        token_lp = logp.gather(-1, safe[:, None]).squeeze(-1)
        tokens.append(step.tokens[:, None])
        active.append(step.active[:, None])
        cycles.append(step.cycles[:, None])
        logprobs.append(torch.where(step.active, token_lp, 0.0)[:, None])
        halt_lp = torch.zeros_like(token_lp) if step.halt_logprobs is None else step.halt_logprobs
        halt_logprobs.append(halt_lp[:, None])
        finished = step.finished
    limits, threshold = model.halting_limits(per_row(max_cycles), per_row(halt_threshold), rows, device)
    halt_lp = torch.cat(halt_logprobs, dim=1)
    return LMRollout(
        prompt_ids=ids.masked_fill(mask == 0, 0),
        prompt_mask=mask,
        completion_ids=torch.cat(tokens, dim=1),
        completion_mask=torch.cat(active, dim=1),
        logprobs=torch.cat(logprobs, dim=1) + halt_lp,
        cycles=torch.cat(cycles, dim=1),
        finished=finished,
        group_size=n,
        temperature=temperature,
        vocab_limit=vocab_limit,
        max_cycles=limits,
        halt_threshold=threshold,
        halt_temperature=halt_temperature,
        halt_logprobs=halt_lp,
    )


def rollout_kv_pool(rl: RLConfig, model: torch.nn.Module) -> BlockPool | None:
    """The BlockPool `lm_rollout` decodes into with rl.kv_cache=paged (rl.kv_block_size, rl.kv_resident_blocks,
    rl.kv_dtype), shaped for `model`; None (the rectangular cache) otherwise."""
    if rl.kv_cache != "paged":
        return None
    resident = rl.kv_resident_blocks or None  # 0: every block stays resident
    return pool_for(model, block_size=rl.kv_block_size, resident_blocks=resident, kv_dtype=rl.kv_dtype)


def lm_policy_inputs(rollout: LMRollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward's inputs for prompt + completion: ids [N, P+T] (0 at padding), positions
    (real tokens count from 0, as in generate) and doc_ids. The real tokens of a row are one document and
    the left padding and the padding after its end are others, so a real token attends to real tokens
    only: what an attention mask over the padding does, in the form pipeline stages pass along."""
    mask = torch.cat((rollout.prompt_mask.long(), rollout.completion_mask.long()), dim=1)
    ids = torch.cat((rollout.prompt_ids, rollout.completion_ids), dim=1).masked_fill(mask == 0, 0)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    starts = torch.ones_like(mask)
    starts[:, 1:] = (mask[:, 1:] != mask[:, :-1]).long()
    return ids, positions, starts.cumsum(dim=1)


def lm_policy(model: torch.nn.Module, rollout: LMRollout) -> PolicyOutput:
    """Recomputes an LM rollout's token log-probs (and values, with a value head) with the training
    forward over prompt + completion: position P-1+t's logits give new token t. A rollout with drawn
    halting is replayed instead (`lm_replay`): its actions are the halting decisions and the token."""
    if rollout.halt_temperature is not None:
        return lm_replay(model, rollout)
    ids, positions, doc_ids = lm_policy_inputs(rollout)
    logits, aux = model(ids, position_ids=positions, doc_ids=doc_ids)
    return lm_policy_from_logits(logits, aux.get("values"), rollout, model.config.vocab_size)


def lm_replay(model: torch.nn.Module, rollout: LMRollout) -> PolicyOutput:
    """The policy of a rollout with drawn halting: `HRMGemma.infer` over prompt + completion with each
    producing position's recorded cycles replayed (models.lm.HaltActions), the prompt's other positions
    under the threshold rule, as in decoding. Position P-1+t gives new token t and its halting
    decisions; the log-prob of the action is the sum of both. The halting entropy is not included in
    `entropy`, which stays the tokens'. No value head output (PPO is refused with drawn halting)."""
    prompt_len, new = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    ids, positions, _ = lm_policy_inputs(rollout)
    mask = torch.cat((rollout.prompt_mask.long(), rollout.completion_mask.long()), dim=1)
    window = slice(prompt_len - 1, prompt_len - 1 + new)
    where = torch.zeros_like(mask, dtype=torch.bool)
    where[:, window] = rollout.completion_mask
    replay = torch.zeros((rollout.cycles.shape[2], *mask.shape), dtype=torch.long, device=mask.device)
    replay[:, :, window] = rollout.cycles.permute(2, 0, 1)
    actions = HaltActions(where=where, temperature=rollout.halt_temperature, replay=replay)
    logits, _ = model.infer(
        ids, attention_mask=mask, position_ids=positions, max_cycles=rollout.max_cycles,
        halt_threshold=rollout.halt_threshold, halt_actions=actions,
    )  # fmt: skip
    out = lm_policy_from_logits(logits, None, rollout, model.config.vocab_size)
    halt_lp = torch.where(rollout.completion_mask, actions.logprob[:, window], 0.0)
    return PolicyOutput(out.logprobs + halt_lp, out.entropy)


def lm_policy_from_logits(
    logits: torch.Tensor, values: torch.Tensor | None, rollout: LMRollout, vocab_size: int
) -> PolicyOutput:
    """lm_policy from the training forward's outputs over lm_policy_inputs: logits [N, P+T, V or this TP
    rank's slice] and values [N, P+T] (or None). A pipeline's last stage calls it directly."""
    prompt_len, new = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    window = slice(prompt_len - 1, prompt_len - 1 + new)
    logits = full_vocab(logits[:, window], vocab_size)
    logp = action_logprobs(logits, rollout.temperature, vocab_limit=rollout.vocab_limit)
    real = rollout.completion_mask
    safe = torch.where(real, rollout.completion_ids, 0)
    token_lp = torch.where(real, logp.gather(-1, safe[..., None]).squeeze(-1), 0.0)
    with torch.no_grad():  # a metric: no graph over [N, T, vocab]
        entropy = torch.where(real, entropy_from_logprobs(logp), 0.0)
    if values is not None:
        values = torch.where(real, values[:, window], 0.0)
    return PolicyOutput(token_lp, entropy, values)


def recompute_policy(
    model: torch.nn.Module, rollout: PuzzleRollout | LMRollout, segments: int | None = None
) -> PolicyOutput:
    """`puzzle_policy` (with its `segments`) or `lm_policy`, by the rollout's kind."""
    if isinstance(rollout, PuzzleRollout):
        return puzzle_policy(model, rollout, segments)
    if isinstance(rollout, LMRollout):
        return lm_policy(model, rollout)
    raise ValueError(
        f"recompute_policy takes a PuzzleRollout or an LMRollout, not a {type(rollout).__name__}"
    )
