"""RL post-training of HRMGemma: GRPO or PPO (value head) on generated arithmetic questions or the
user's JSONL prompts.

data.path is the text dataset the model was pretrained on; RL reads its tokenizer (and checks it is the
model's), not its rows. Prompts come from hrm_mega.rl.prompts (ArithmeticPrompts, or JsonlPrompts with
rl.prompts=jsonl), put into rl.prompt_template for the model. A rollout decodes with KV caches
and per-token halting (rl.max_cycles, rl.halt_threshold), temperature, top-k and top-p, in chunks of
rl.rollout_chunk prompts whose draws are seeded by (seed, step, chunk): the same prompt gets the same
completions at any data-parallel size. rl.kv_cache=paged decodes them into the paged KV cache
(rollout_kv_pool) instead of the rectangular one, with the same tokens. Completions are decoded to
text for the rewards.

Evaluation answers the held-out questions greedily (with the same halting settings; the rectangular
cache whatever rl.kv_cache says) and reports exact accuracy (arithmetic: also per operation and the
answer-format rate) and the mean H cycles per generated token.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hrm_mega.config import ConfigError
from hrm_mega.data.shards import dataset_tokenizer
from hrm_mega.distributed import all_reduce_sums
from hrm_mega.inference.generate import generate, left_pad
from hrm_mega.rl.prompts import ArithmeticPrompts, JsonlPrompts, Question
from hrm_mega.rl.rewards import (
    answer_exact_match,
    answer_format,
    arithmetic_exact_match,
    combine_rewards,
    compute_fraction,
    shape_for_compute,
)
from hrm_mega.rl.rollout import LMRollout, lm_rollout, rollout_kv_pool
from hrm_mega.training.evaluation import eval_mode
from hrm_mega.training.tasks.rl import Environment, Rollouts, step_seed
from hrm_mega.training.tasks.rl_layout import gather_over_pipeline, stages

if TYPE_CHECKING:
    from hrm_mega.training.trainer import Trainer

EVAL_BATCH = 64
OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}  # for the per-operation accuracy metrics


class TextEnvironment(Environment):
    compute_metric = "mean_cycles"
    stream: ArithmeticPrompts | JsonlPrompts

    def read_data(self, manifest: dict[str, Any]) -> None:
        """The dataset's tokenizer (load_config has checked that there is one)."""
        c = self.config
        tokenizer = dataset_tokenizer(c.data.path, manifest)
        import sentencepiece as spm

        self.tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer))
        self.vocab_limit = self.tokenizer.get_piece_size()
        if self.vocab_limit > c.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={c.model.vocab_size} is smaller than the tokenizer's {self.vocab_limit}"
            )
        self.bos_id, self.eos_id = self.tokenizer.bos_id(), self.tokenizer.eos_id()
        self.pad_id = max(self.tokenizer.pad_id(), 0)

    def build_stream(self, trainer: Trainer) -> ArithmeticPrompts | JsonlPrompts:
        rl, seed = self.config.rl, self.config.train.seed
        if rl.prompts == "jsonl":
            try:
                self.stream = JsonlPrompts(
                    rl.prompt_file, rl.eval_prompt_file, seed=seed, per_step=rl.prompts_per_step,
                    eval_count=rl.eval_prompts, prompt_field=rl.prompt_field, answer_field=rl.answer_field,
                )  # fmt: skip
            except ValueError as e:
                raise ConfigError(str(e)) from None
            return self.stream
        self.stream = ArithmeticPrompts(
            seed, rl.arithmetic_ops, rl.arithmetic_max_digits, rl.eval_prompts, rl.prompts_per_step,
            rl.arithmetic_train_pool,
        )  # fmt: skip
        check_prompt_boundary(
            self.tokenizer, self.stream.eval_set, f"{self.config.data.path}/tokenizer.model"
        )
        return self.stream

    def questions(self, step: int, start: int, count: int) -> list[Question]:
        """This step's questions as (prompt, answer, metadata); arithmetic ones have no metadata."""
        return [(*q, {})[:3] for q in self.stream.train_questions(step, start, count)]

    def load_state(self, trainer: Trainer, prompts: int) -> None:
        self.stream.handed_out = trainer.step * prompts

    def max_actions(self) -> int:
        return self.config.rl.max_new_tokens

    def halting(self) -> dict[str, Any]:
        """Evaluation's halting: the threshold rule (greedy)."""
        rl = self.config.rl
        return {"max_cycles": rl.max_cycles or None, "halt_threshold": rl.halt_threshold or None}

    def rollout_halting(self) -> dict[str, Any]:
        """The rollouts' halting: with rl.halting=sample and a halt_threshold it is drawn (an action)."""
        drawn = self.config.rl.halting == "sample" and self.config.rl.halt_threshold > 0
        return {**self.halting(), "halt_temperature": self.config.rl.halt_temperature if drawn else None}

    def encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts in rl.prompt_template, tokenized after a BOS and left-padded."""
        template = self.config.rl.prompt_template
        encoded = [[self.bos_id, *self.tokenizer.encode(template.format(prompt=p))] for p in prompts]
        ids, mask = left_pad(encoded, pad_id=self.pad_id)
        return ids.to(device), mask.to(device)

    def rollout(self, trainer: Trainer, prompts: int, model: torch.nn.Module) -> Rollouts:
        """This replica's rollouts, in chunks of rl.rollout_chunk prompts seeded by their first prompt's
        index in the step. With pipeline stages each stage's rank rolls out and scores a contiguous run
        of the chunks, and the runs are gathered: every stage gets the same rows in the same order, one
        draw of each sample (as one process would)."""
        rl = self.config.rl
        start = trainer.world.dp_rank * prompts
        questions = self.questions(trainer.step, start, prompts)
        firsts = list(range(0, len(questions), rl.rollout_chunk))
        count = stages(trainer.world)
        if count == 1:
            return self._rollout_chunks(trainer, model, questions, start, firsts)
        mine = [int(f) for f in np.array_split(firsts, count)[trainer.world.pp_rank]]  # may be none
        part = self._rollout_chunks(trainer, model, questions, start, mine) if mine else None
        parts = [p for p in gather_over_pipeline(part, trainer.world) if p is not None]
        return concat_rollouts(parts, rl.max_new_tokens)

    def _rollout_chunks(
        self,
        trainer: Trainer,
        model: torch.nn.Module,
        questions: list[Question],
        start: int,
        firsts: list[int],
    ) -> Rollouts:
        """The scored rollouts of the chunks starting at questions[first] for each of `firsts`."""
        rl, device = self.config.rl, trainer.world.device
        chunks, asked = [], []
        kv_pool = rollout_kv_pool(rl, model)  # rl.kv_cache=paged; one pool for the chunks (None: rectangular)
        for first in firsts:
            part = questions[first : first + rl.rollout_chunk]
            ids, mask = self.encode([q[0] for q in part], device)
            seed = step_seed(self.config.train.seed, trainer.step, start + first)
            chunks.append(lm_rollout(
                model, ids, attention_mask=mask, group_size=rl.group_size,
                max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                seed=seed, eos_id=self.eos_id, pad_id=self.pad_id, vocab_limit=self.vocab_limit,
                kv_pool=kv_pool, **self.rollout_halting(),
            ))  # fmt: skip
            asked += part
        ro = concat_lm_rollouts(chunks, rl.max_new_tokens)
        completions = [self.tokenizer.decode(t) for t in ro.completion_lists(self.eos_id)]
        repeat = [q for q in asked for _ in range(rl.group_size)]
        total, parts = combine_rewards(
            rl.rewards, timeout=rl.reward_timeout, prompts=[q[0] for q in repeat], completions=completions,
            finished=ro.finished, answers=[q[1] for q in repeat], metadata=[q[2] for q in repeat],
        )  # fmt: skip
        budget = rl.max_cycles or self.config.model.h_cycles
        fraction = compute_fraction(ro.cycles, budget, ro.completion_mask)
        rewards = shape_for_compute(total.to(device), fraction, rl.compute_cost_lambda)
        return Rollouts(
            rollout=ro, logprobs=ro.logprobs, mask=ro.completion_mask, rewards=rewards,
            parts={k: v.to(device) for k, v in parts.items()}, compute=fraction * budget,
            row_metrics={"completion_tokens": ro.completion_mask.sum(dim=1).float()},
            texts=[{"prompt": q[0], "completion": c} for q, c in zip(repeat, completions)],
        )  # fmt: skip

    # --- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, model: torch.nn.Module) -> dict[str, float]:
        """Greedy answers to this rank's share of the held-out questions; summed over ranks. Reports exact
        accuracy, and the mean H cycles per generated token; arithmetic also per operation
        (eval/exact_accuracy_add, _sub, _mul) and the answer-format rate."""
        rl, world = self.config.rl, trainer.world
        arithmetic = rl.prompts == "arithmetic"
        share, shares = world.dp_rank * stages(world) + world.pp_rank, world.dp_size * stages(world)
        mine = [(*q, {})[:3] for q in self.stream.eval_set[share::shares]]  # a share per replica and stage
        ops = list(OP_NAMES.values())
        op_keys = [f"{k}_{op}" for op in ops for k in "nr"]  # n_/r_: questions, right answers
        sums = dict.fromkeys(("questions", "exact", "format", "cycles", "tokens", *op_keys), 0.0)
        with eval_mode(model):
            for first in range(0, len(mine), EVAL_BATCH):
                part = mine[first : first + EVAL_BATCH]
                prompts, answers = [q[0] for q in part], [q[1] for q in part]
                ids, mask = self.encode(prompts, trainer.world.device)
                gen = generate(
                    model, ids, attention_mask=mask, max_new_tokens=rl.max_new_tokens, greedy=True,
                    eos_id=self.eos_id, pad_id=self.pad_id, vocab_limit=self.vocab_limit, **self.halting(),
                )  # fmt: skip
                rows = list(zip(gen.tokens.tolist(), gen.lengths.tolist()))
                texts = [self.tokenizer.decode([t for t in row[:n] if t != self.eos_id]) for row, n in rows]
                finished = torch.tensor([n > 0 and row[n - 1] == self.eos_id for row, n in rows])
                match = arithmetic_exact_match if arithmetic else answer_exact_match
                exact = match(prompts=prompts, completions=texts, answers=answers)
                real = torch.arange(gen.tokens.shape[1])[None, :] < gen.lengths.cpu()[:, None]
                sums["questions"] += len(part)
                sums["exact"] += float(exact.sum())
                sums["format"] += float(answer_format(completions=texts, finished=finished).sum())
                sums["cycles"] += float(gen.cycles.cpu()[real].float().mean(dim=-1).sum())  # per token
                sums["tokens"] += float(real.sum())
                for prompt, right in zip(prompts, exact.tolist()) if arithmetic else ():
                    sums[f"n_{OP_NAMES[operation(prompt)]}"] += 1
                    sums[f"r_{OP_NAMES[operation(prompt)]}"] += float(right)
        # over every replica and stage; the TP ranks of one answer the same questions alike: one counts
        s = all_reduce_sums(
            sums if world.tp_rank == 0 else dict.fromkeys(sums, 0.0), torch.distributed.group.WORLD
        )
        per_op = {f"eval/exact_accuracy_{op}": s[f"r_{op}"] / s[f"n_{op}"] for op in ops if s[f"n_{op}"]}
        out = {
            "eval/exact_accuracy": s["exact"] / max(s["questions"], 1.0),
            **per_op,
            "eval/answer_format": s["format"] / max(s["questions"], 1.0),
            "eval/mean_cycles": s["cycles"] / max(s["tokens"], 1.0),
            "eval/questions": s["questions"],
        }
        if not arithmetic:  # answer_format scores a single integer: an arithmetic answer
            del out["eval/answer_format"]
        return out

    def summary_lines(self) -> list[str]:
        rl = self.config.rl
        tokenizer = f"tokenizer {self.config.data.path}/tokenizer.model"
        if rl.prompts == "jsonl":
            return [
                f"  prompts {rl.prompt_file} ({len(self.stream.records)} records), "
                f"{len(self.stream.eval_set)} held out from {rl.eval_prompt_file}; {tokenizer}"
            ]
        return [
            f"  arithmetic prompts ({' '.join(rl.arithmetic_ops)}, up to {rl.arithmetic_max_digits} digits), "
            f"{rl.eval_prompts} held out; {tokenizer}",
        ]


def check_prompt_boundary(tokenizer: Any, questions: list[tuple[str, str]], where: str) -> None:
    """Refuses a tokenizer that merges a prompt's last piece with its answer (e.g. '=-' in '3-5=-2'):
    the model never saw the prompt's own pieces followed by such an answer, so it cannot produce it, and
    those questions would count as wrong whatever the model knows. `tokenizer`: a SentencePiece
    processor; `questions`: (prompt, answer) pairs."""
    for prompt, answer in questions:
        alone, joined = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
        if joined[: len(alone)] != alone:
            merged = tokenizer.id_to_piece(joined[len(alone) - 1])
            raise ConfigError(
                f"{where} merges the end of the prompt {prompt!r} with its answer {answer!r} into the "
                f"piece {merged!r}, so such answers cannot follow the prompt; rebuild the dataset with "
                "`hrm-mega prep text ... --atomic-symbols =` and pretrain on it"
            )


def operation(prompt: str) -> str:
    """The operator of an `a<op>b=` question (a leading '-' would be a sign, but operands are >= 0)."""
    return next(c for c in prompt if c in OP_NAMES)


def concat_rollouts(parts: list[Rollouts], new_tokens: int) -> Rollouts:
    """Stacks the scored rollouts of several ranks (their LMRollouts as concat_lm_rollouts does)."""
    ro = concat_lm_rollouts([p.rollout for p in parts], new_tokens)
    return Rollouts(
        rollout=ro, logprobs=ro.logprobs, mask=ro.completion_mask,
        rewards=torch.cat([p.rewards for p in parts]),
        parts={k: torch.cat([p.parts[k] for p in parts]) for k in parts[0].parts},
        compute=torch.cat([p.compute for p in parts]),
        row_metrics={k: torch.cat([p.row_metrics[k] for p in parts]) for k in parts[0].row_metrics},
        texts=[t for p in parts for t in p.texts],
    )  # fmt: skip


def concat_lm_rollouts(parts: list[LMRollout], new_tokens: int) -> LMRollout:
    """Stacks rollouts of several generate calls: prompts left-padded to one width, completions (and
    their log-probs, cycles) right-padded to `new_tokens` columns, as masked entries."""
    width = max(p.prompt_ids.shape[1] for p in parts)

    def left(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0))

    def right(t: torch.Tensor) -> torch.Tensor:
        pad = (0, 0, 0, new_tokens - t.shape[1]) if t.dim() == 3 else (0, new_tokens - t.shape[1])
        return torch.nn.functional.pad(t, pad)

    return dataclasses.replace(
        parts[0],
        prompt_ids=torch.cat([left(p.prompt_ids) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask.long()).bool() for p in parts]),
        logprobs=torch.cat([right(p.logprobs) for p in parts]),
        cycles=torch.cat([right(p.cycles) for p in parts]),
        finished=torch.cat([p.finished for p in parts]),
        **{
            name: torch.cat([getattr(p, name) for p in parts])
            for name in ("max_cycles", "halt_threshold")
            if getattr(parts[0], name) is not None
        },
        **(
            {"halt_logprobs": torch.cat([right(p.halt_logprobs) for p in parts])}
            if parts[0].halt_logprobs is not None
            else {}
        ),
    )
