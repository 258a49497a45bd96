"""RL post-training (GRPO, PPO) on the pretraining machinery: the same engine, layouts, checkpoints with
exact resume, SIGTERM handling, non-finite guard and logging: RLTask is a Task the one Trainer runs.

One step (`RLTask.train_step`):

    rollouts = environment.rollout()             no grad: group_size samples for each of this rank's
                                                 prompts, their rewards (registry, compute shaping)
    old = training forward over the rollouts     no grad: the log-probs (and values) the ratios start from;
                                                 skipped for GRPO with one iteration (old = new, detached)
    ref = frozen initial weights' log-probs      only when rl.beta > 0
    advantages                                   GRPO: group-relative; PPO: GAE on the value head, whitened
    repeat rl.iterations times:
        for each micro-batch: loss = clipped policy loss [+ beta * k3 KL] [+ value loss]; backward
        one optimizer step (skipped on every rank if any rank's loss is not finite)

Every loss term is normalised by a count over the whole step (all micro-batches and ranks), and every
draw is keyed by (seed, step, sample), so a step gives the same loss at any data-parallel size and a
resumed run continues exactly. The model family's Environment (rl_puzzle.py, rl_lm.py) supplies the
prompts, the rollouts and their rewards, and its evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hrm_mega.config import Config, ConfigError, pipeline_stage_blocks
from hrm_mega.config.checks import read_manifest_json, rollout_rows
from hrm_mega.distributed import (
    all_finite,
    all_reduce,
    all_reduce_sums,
    data_parallel_group,
    pipeline_group,
    pipeline_topology,
)
from hrm_mega.models.lm_pipeline import build_pipeline_module, pipeline_inputs
from hrm_mega.rl.advantages import gae as gae_advantages
from hrm_mega.rl.advantages import group_advantages, masked_moments, std_from_moments, whiten
from hrm_mega.rl.losses import loss_normalizer, policy_loss, value_loss
from hrm_mega.rl.rewards import get_reward
from hrm_mega.rl.rollout import (
    LMRollout,
    PolicyOutput,
    PuzzleRollout,
    lm_policy_from_logits,
    lm_policy_inputs,
    logprob_mismatch,
    recompute_policy,
)
from hrm_mega.training import engine as ds
from hrm_mega.training.evaluation import eval_mode
from hrm_mega.training.metrics import add_micro_batch, keep_records_up_to
from hrm_mega.training.task import Task, load_init_weights
from hrm_mega.training.tasks.lm import StepGuard
from hrm_mega.training.tasks.rl_layout import RolloutCopy, needs_rollout_copy

if TYPE_CHECKING:
    from hrm_mega.training.trainer import Trainer

# Per-call means of policy_loss / value_loss that combine over micro-batches and ranks weighted by actions.
WEIGHTED_KEYS = (
    "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "kl_mean",
    "value_clip_frac", "value_mean", "return_mean",
)  # fmt: skip
# Step shares (already divided by the step's normaliser): they add up over micro-batches and ranks.
SHARE_KEYS = ("loss", "pg_loss", "kl", "value_loss")
MISMATCH_KEYS = ("logprob_diff_mean_abs", "kl_rollout_train")
PPO_KEYS = ("value_loss", "value_clip_frac", "value_mean", "return_mean")  # logged for PPO only


@dataclass
class Rollouts:
    """One step's rollouts on this rank, scored. Rows are group-major (see hrm_mega/rl/rollout.py)."""

    rollout: PuzzleRollout | LMRollout
    logprobs: torch.Tensor  # [N, A] the sampler's log-probs of the actions
    mask: torch.Tensor  # [N, A] bool: which entries are actions
    rewards: torch.Tensor  # [N] the total reward after compute shaping
    parts: dict[str, torch.Tensor]  # [N] each named reward before weighting
    compute: torch.Tensor  # [N] compute used: ACT segments, or mean H cycles per token
    row_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] more per-row values to average
    # per row, for rl.log_rollouts: the LM's prompt and completion texts (puzzles: none)
    texts: list[dict[str, str]] = field(default_factory=list)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 62-bit seed for the draws of one step, the same on every rank and after a resume."""
    return int(np.random.default_rng([seed, step, stream]).integers(2**62))


def rollout_batch_config(config: Config) -> Config:
    """The config with train.global_batch = rl.prompts_per_step * rl.group_size, the rows of a step (the
    pretraining recipe's batch does not apply); load_config has checked it (command="rl")."""
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, global_batch=rollout_rows(config))
    )


def check_same_tokenizer(source: Config, config: Config) -> None:
    """Refuses a text dataset whose tokenizer differs from the one the --init model was trained with (when
    that run's dataset is still there to compare): token ids would silently mean other pieces."""

    def tokenizer_hash(data_path: str) -> str | None:
        manifest = read_manifest_json(data_path) if data_path else None
        return (manifest or {}).get("extra", {}).get("tokenizer_sha256")

    theirs, ours = tokenizer_hash(source.data.path), tokenizer_hash(config.data.path)
    if theirs and ours and theirs != ours:
        raise ConfigError(
            f"data.path={config.data.path} has another tokenizer than {source.data.path}, the dataset "
            f"--init {config.train.init_from} was trained on; point data.path at that dataset"
        )


class Environment(ABC):
    """What RL needs from a model family: prompts, scored rollouts, and an evaluation. The puzzle one is
    training/tasks/rl_puzzle.py, the language-model one training/tasks/rl_lm.py."""

    compute_metric: str = "mean_compute"  # the name of the logged mean compute per rollout

    def __init__(self, config: Config) -> None:
        self.config = config

    def read_data(self, manifest: dict[str, Any]) -> None:
        """What the environment reads from the dataset beyond its manifest (e.g. a tokenizer)."""
        return None

    @abstractmethod
    def build_stream(self, trainer: Trainer) -> Any:
        """The prompt stream (resumable, like a pretraining stream)."""

    @abstractmethod
    def rollout(self, trainer: Trainer, prompts: int, model: torch.nn.Module) -> Rollouts:
        """This rank's rollouts of the current step (trainer.step) for `prompts` prompts, scored, sampled
        from `model` (the whole policy on this rank: the training module or the rollout copy)."""

    @abstractmethod
    def max_actions(self) -> int:
        """The constant action count per row (dr_grpo's max_len)."""

    @abstractmethod
    def evaluate(self, trainer: Trainer, model: torch.nn.Module) -> dict[str, float]:
        """The evaluation of `model` (as in rollout), keyed for metrics.jsonl."""

    def load_state(self, trainer: Trainer, prompts: int) -> None:
        """After a resume at trainer.step, with `prompts` prompts per rank and step."""
        return None

    def summary_lines(self) -> list[str]:
        return []


class RLTask(Task):
    """GRPO or PPO around the pretraining Trainer, for the model family's Environment.

    At every layout. With pipeline stages the gradient pass is DeepSpeed's pipeline schedule
    (`_pipeline_update`: the RL loss on the last stage); with pipeline stages or ZeRO-3 the no-grad work
    (rollouts, evaluation, old and reference log-probs) runs on a rollout copy of the whole model
    resharded from the training layout (rl_layout.py)."""

    command = "rl"
    init_label = "--init "
    keep_fresh = ("value_head.",)  # PPO on a pretrained LM adds a value head
    reference: torch.nn.Module | None = None
    rollout_copy: RolloutCopy | None = None
    _counts: tuple[int, int] = (0, 0)
    _rollout_log_started = False

    def __init__(self, config: Config, environment: type[Environment]) -> None:
        super().__init__(rollout_batch_config(config))
        self.env = environment(self.config)
        self.pipeline = self.config.parallel.pp > 1

    def read_data(self) -> dict[str, Any]:
        manifest = super().read_data()
        self.env.read_data(manifest)
        return manifest

    def initial_model(self, trainer: Trainer) -> torch.nn.Module:
        model = super().initial_model(trainer)  # train.init_from is required for RL (load_config)
        check_same_tokenizer(self.init_config, self.config)
        return model

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        """The model to train: the whole model (pp = 1), or this rank's pipeline stage; either from
        --init. Where that is not a whole model on every rank (pp > 1, ZeRO-3), also the rollout copy,
        taken before DeepSpeed partitions anything (it keeps the reference's share of these weights)."""
        c = self.config
        if self.pipeline:
            self.pipeline_loss = RLPipelineLoss()
            model = build_pipeline_module(
                c.model, c.train.seed, pipeline_topology(), pipeline_stage_blocks(c), self.pipeline_loss,
                c.train.activation_checkpointing,
            ).to(trainer.world.device)  # fmt: skip
            label = f"{self.init_label}{c.train.init_from}"
            self.fresh_keys, self.init_config = load_init_weights(model, c, self.keep_fresh, label)
            check_same_tokenizer(self.init_config, c)
        else:
            model = super().build_model(trainer)
        if needs_rollout_copy(c):
            self.rollout_copy = RolloutCopy(c, trainer.world, model, keep_reference=c.rl.beta > 0)
        return model

    def policy_model(self, trainer: Trainer) -> torch.nn.Module:
        """The whole current policy on this rank, for no-grad work: the training module, or the rollout
        copy refreshed from it (collective, once per step)."""
        if self.rollout_copy is None:
            return trainer.model
        return self.rollout_copy.policy(trainer.model, trainer.step)

    def setup(self, trainer: Trainer) -> None:
        c = self.config
        rl = c.rl
        for module in rl.reward_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(
                    f"rl.reward_modules: cannot import {module!r} ({e}); is it on PYTHONPATH?"
                ) from None
        for name in rl.rewards:
            get_reward(name)  # names from rl.reward_modules fail here, before any rollout
        self.dp_size = trainer.world.dp_size
        self.local_prompts = rl.prompts_per_step // self.dp_size
        if rl.beta > 0 and self.rollout_copy is None:  # the frozen initial weights (also after a resume)
            self.reference = self.initial_model(trainer).eval().requires_grad_(False)
        if self.pipeline:  # skips non-finite steps inside DeepSpeed's schedule (as pretraining does)
            clip = c.optim.grad_clip if c.parallel.zero_stage == 0 else None  # see engine.deepspeed_config
            self.guard = StepGuard(ds.client_optimizer(trainer.engine), clip, trainer.world)

    def build_stream(self, trainer: Trainer) -> Any:
        return self.env.build_stream(trainer)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        return self.env.evaluate(trainer, self.policy_model(trainer))

    def load_state(self, trainer: Trainer, client: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.env.load_state(trainer, self.local_prompts)

    def summary_lines(self, trainer: Trainer) -> list[str]:
        rl = self.config.rl
        lines = [
            f"  RL {rl.algorithm}: {rl.prompts_per_step} prompts x {rl.group_size} samples per step, "
            f"{rl.iterations} optimizer step(s) per batch; rewards {rl.rewards}, compute cost "
            f"{rl.compute_cost_lambda}; beta {rl.beta} "
            f"({'reference model loaded' if self.config.rl.beta > 0 else 'no reference model'})",
            f"  init from {self.config.train.init_from}",
        ]
        if self.fresh_keys:
            lines.append(f"  freshly initialised (not in the init checkpoint): {', '.join(self.fresh_keys)}")
        if self.rollout_copy is not None:
            lines.append(
                "  rollouts, evaluation, old and reference log-probs on a whole-model copy per rank "
                f"(tensor-parallel over tp {self.config.parallel.tp}), resharded from the training layout"
            )
        return [*lines, *self.env.summary_lines()]

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, trainer: Trainer) -> dict[str, float]:
        rl = self.config.rl
        lr = trainer.set_lr()
        t0 = time.perf_counter()
        policy_model = self.policy_model(trainer)
        with torch.no_grad(), eval_mode(policy_model):
            batch = self.env.rollout(trainer, self.local_prompts, policy_model)
        t_rollout = time.perf_counter() - t0
        self._log_rollouts(trainer, batch)

        trained = self._trained_rows(batch)
        if self.pipeline:  # DeepSpeed's schedule runs its fixed number of micro-batches: over all rows
            every = torch.arange(batch.rewards.shape[0], device=batch.mask.device)
            chunks = list(every.tensor_split(trainer.engine.gradient_accumulation_steps()))
        else:
            micro = self.config.train.micro_batch or trainer.local_batch
            chunks = self._chunks(trainer.world, trained, micro)
        max_len = self.env.max_actions()
        share = loss_normalizer(rl.aggregation, batch.mask[trained], max_len) if len(trained) else 0.0
        normalizer = max(all_reduce_sums({"share": share})["share"], 1.0)
        need_old = rl.iterations > 1 or rl.algorithm == "ppo"
        segments = self._segments(trainer, batch)
        # No-grad forwards: on the rollout copy where there is one (it holds the policy until the
        # reference is put into it), else through the engine and the reference module.
        no_grad_policy = policy_model if self.rollout_copy is not None else EngineView(trainer.engine)
        with torch.no_grad():
            old = self._policy(no_grad_policy, batch, chunks, segments) if need_old else None
            reference = self.reference
            if self.rollout_copy is not None and rl.beta > 0:
                reference = self.rollout_copy.reference()
            ref = self._policy(reference, batch, chunks, segments) if reference is not None else None
        advantages, returns = self._advantages(batch, old)
        data = StepData(batch, old, ref, advantages, returns, normalizer)

        mismatch = [f"mismatch/{k}" for k in (*MISMATCH_KEYS, "actions")]
        sums = dict.fromkeys((*SHARE_KEYS, *WEIGHTED_KEYS, *mismatch, "actions", "finite"), 0.0)
        if old is not None:
            self._add_mismatch(sums, batch, old.logprobs[trained], trained)
        if self.pipeline:
            grad_norms, skipped = self._pipeline_update(trainer, data, chunks, trained, sums)
        else:
            grad_norms, skipped = self._engine_update(trainer, data, chunks, segments, sums)
        t_train = time.perf_counter() - t0 - t_rollout
        trained_share = torch.zeros(batch.rewards.shape[0]).index_fill_(0, trained.cpu(), 1.0)
        batch.row_metrics["trained_fraction"] = trained_share
        seconds = {"rollout_s": t_rollout, "train_s": t_train}
        return self._step_metrics(batch, sums, grad_norms, skipped, lr, seconds)

    def _engine_update(
        self, trainer: Trainer, data: StepData, chunks: list[torch.Tensor], segments: int | None,
        sums: dict[str, float],
    ) -> tuple[list[float], int]:  # fmt: skip
        """rl.iterations optimizer steps through the engine, micro-batch by micro-batch (pp = 1). Returns
        the gradient norms and the number of skipped (non-finite) steps; adds the loss metrics to sums."""
        policy = EngineView(trainer.engine)
        n_micro = trainer.world.dp_size * len(chunks)  # micro-batches run by all ranks together
        # DeepSpeed averages gradients over dp x its configured accumulation steps (which can differ from
        # len(chunks) when groups are dropped); the losses below are already shares of the whole step's
        # normaliser, so that division is undone (as in training/tasks/lm.py).
        undo_average = float(trainer.world.dp_size * trainer.engine.gradient_accumulation_steps())
        grad_norms, skipped = [], 0
        for iteration in range(self.config.rl.iterations):
            finite = 0.0
            for i, rows in enumerate(chunks):
                trainer.start_micro_batch(i, len(chunks))  # the count can differ from DeepSpeed's own
                if len(rows):
                    new = recompute_policy(policy, data.batch.rollout.select(rows), segments)
                    loss, metrics = self._loss(data, rows, new)
                    if data.old is None and iteration == 0:
                        self._add_mismatch(sums, data.batch, new.logprobs, rows)
                    scale = undo_average
                else:  # no rows of this rank are left, but every rank joins the micro-batch's collectives
                    loss, metrics, scale = _no_rows_loss(policy, data.batch, segments), None, 0.0
                if all_finite(loss):
                    trainer.engine.backward(loss * scale)
                    finite += 1.0
                if metrics is not None:
                    _add_loss_metrics(sums, loss, metrics)
            ok = all_reduce_sums({"finite": finite})["finite"] == n_micro
            grad_norms.append(trainer.apply_update(ok))
            skipped += int(not ok)
        return grad_norms, skipped

    def _pipeline_update(
        self, trainer: Trainer, data: StepData, chunks: list[torch.Tensor], trained: torch.Tensor,
        sums: dict[str, float],
    ) -> tuple[list[float], int]:  # fmt: skip
        """rl.iterations optimizer steps through DeepSpeed's pipeline schedule (pp > 1): every stage's
        ranks feed the micro-batches' rows (the first stage reads the inputs, the last their row indices),
        and the last stage computes the same loss as _engine_update from its logits (and values). Groups
        that rl.drop_uniform_groups leaves out still run their forward, with their actions masked out of
        the loss (the schedule's micro-batch count is fixed), which leaves the loss as it would be. The
        metric sums are the last stage's, broadcast to the other stages of its pipeline."""
        rl, engine, world = self.config.rl, trainer.engine, trainer.world
        if rl.drop_uniform_groups:
            keep = torch.zeros(data.batch.mask.shape[0], dtype=torch.bool, device=trained.device)
            keep[trained] = True
            data = dataclasses.replace(
                data, batch=dataclasses.replace(data.batch, mask=data.batch.mask & keep[:, None])
            )
        scale = float(world.dp_size * engine.gradient_accumulation_steps())  # as undo_average above
        vocab_size = self.config.model.vocab_size
        micro_batches = [self._stage_inputs(data.batch.rollout, rows) for rows in chunks]
        grad_norms, skipped = [], 0
        for iteration in range(rl.iterations):

            def loss(logits: torch.Tensor, values: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
                new = lm_policy_from_logits(logits, values, data.batch.rollout.select(rows), vocab_size)
                total, metrics = self._loss(data, rows, new)
                if data.old is None and iteration == 0:  # noqa: B023 (called within this iteration)
                    self._add_mismatch(sums, data.batch, new.logprobs, rows)
                _add_loss_metrics(sums, total, metrics)
                return total * scale

            self.pipeline_loss.start(loss)
            engine.train_batch(iter(micro_batches))
            finite = not self.guard.skipped
            trainer.count_update(applied=finite)
            if not finite:
                grad_norms.append(float("nan"))
            elif self.guard.clip is not None:
                grad_norms.append(self.guard.grad_norm)
            else:
                grad_norms.append(float(engine.get_global_grad_norm()))
            skipped += int(not finite)
        layout = world.layout
        assert layout is not None
        last = ((layout.pp - 1) * layout.dp + world.dp_rank) * layout.tp + world.tp_rank
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=world.device)
        torch.distributed.broadcast(values, src=last, group=pipeline_group())
        sums.update(zip(sums, values.tolist()))
        return grad_norms, skipped

    def _stage_inputs(self, rollout: LMRollout, rows: torch.Tensor) -> tuple:
        """(the first stage's inputs, the last stage's labels) of one micro-batch: the training forward's
        inputs over its rows (lm_policy_inputs) at model.h_cycles, and the row indices."""
        ids, positions, doc_ids = lm_policy_inputs(rollout.select(rows))
        mask = torch.ones_like(ids)  # the halting sums' token mask; RL reads no halting term
        return pipeline_inputs(ids, positions, doc_ids, mask, self.config.model.h_cycles), rows

    def _segments(self, trainer: Trainer, batch: Rollouts) -> int | None:
        """Puzzles under ZeRO-3: the most ACT segments any data-parallel rank's rollouts ran, so that every
        rank runs that many forwards (each gathers the weights) when recomputing its own. None otherwise."""
        if self.config.parallel.zero_stage != 3 or not isinstance(batch.rollout, PuzzleRollout):
            return None
        most = batch.rollout.segments.max().to(trainer.world.device, torch.float32).reshape(1)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=data_parallel_group())
        return int(most.item())

    def _log_rollouts(self, trainer: Trainer, batch: Rollouts) -> None:
        """Every rl.log_rollouts-th step: each rollout as a line of rollouts.jsonl (rank 0 writes them all,
        by their row over the whole step; group-major: prompt i's samples are rows i*n .. i*n+n-1). On
        the first write after a (re)start, lines of later steps (to be run again) are dropped, as
        metrics.jsonl's are."""
        every, step = self.config.rl.log_rollouts, trainer.step + 1  # the step metrics.jsonl logs
        if not every or step % every:
            return
        ro, n = batch.rollout, batch.rewards.shape[0]
        if isinstance(ro, LMRollout):
            tokens = {"completion_ids": ro.completion_lists(), "finished": ro.finished.tolist()}
        else:
            tokens = {"tokens": ro.tokens.tolist(), "segments": ro.segments.tolist()}
        rewards = {"reward": batch.rewards, **{f"reward/{k}": v for k, v in batch.parts.items()}}
        first = trainer.world.dp_rank * n
        local = [
            {"step": step, "row": first + i, **(batch.texts[i] if batch.texts else {}),
             **{k: v[i] for k, v in tokens.items()}, **{k: float(v[i]) for k, v in rewards.items()}}
            for i in range(n)
        ]  # fmt: skip
        gathered: list[Any] = [None] * trainer.world.dp_size
        torch.distributed.all_gather_object(gathered, local, group=data_parallel_group())
        if trainer.world.rank != 0:
            return
        path = trainer.run_dir / "rollouts.jsonl"
        if not self._rollout_log_started:
            keep_records_up_to(path, trainer.step)
            self._rollout_log_started = True
        with path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for part in gathered for r in part)

    def _trained_rows(self, batch: Rollouts) -> torch.Tensor:
        """The rows the update trains on: all of them, or with rl.drop_uniform_groups (GRPO) those of
        groups whose rewards differ. A group of equal rewards has zero advantages, so it adds nothing to
        the policy gradient; leaving it out saves its training forward and keeps it out of the loss's
        normaliser (DAPO's dynamic sampling, without refilling the batch)."""
        rl = self.config.rl
        rows = torch.arange(batch.rewards.shape[0], device=batch.mask.device)
        if not rl.drop_uniform_groups:
            return rows
        groups = batch.rewards.view(-1, rl.group_size)
        differ = (groups != groups[:, :1]).any(dim=1)
        return rows[differ.repeat_interleave(rl.group_size).to(rows.device)]

    def _chunks(self, world: ds.World, rows: torch.Tensor, micro: int) -> list[torch.Tensor]:
        """`rows` in micro-batches of at most `micro`, as many on every rank (some may be empty): each
        micro-batch ends in a gradient all-reduce that every data-parallel rank must join."""
        most = len(rows)  # without dropped groups every rank has the same rows
        if self.config.rl.drop_uniform_groups:
            counts = torch.zeros(world.dp_size, dtype=torch.float64)
            counts[world.dp_rank] = len(rows)
            most = int(all_reduce(counts).max())
        return list(torch.tensor_split(rows, max(math.ceil(most / micro), 1)))

    def _policy(
        self, model: Any, batch: Rollouts, chunks: list[torch.Tensor], segments: int | None = None
    ) -> PolicyOutput:
        """The training forward's log-probs (and values) over the rows of `chunks`, micro-batch by
        micro-batch, placed at their row indices (rows outside the chunks hold zeros)."""
        mask = batch.mask
        logprobs, entropy = (torch.zeros(mask.shape, device=mask.device) for _ in range(2))
        values = None
        for rows in chunks:
            if len(rows) == 0:
                continue
            part = recompute_policy(model, batch.rollout.select(rows), segments)
            logprobs[rows], entropy[rows] = part.logprobs, part.entropy
            if part.values is not None:
                values = torch.zeros(mask.shape, device=mask.device) if values is None else values
                values[rows] = part.values
        return PolicyOutput(logprobs, entropy, values)

    def _advantages(
        self, batch: Rollouts, old: PolicyOutput | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GRPO: one advantage per row [N]. PPO: per action [N, A] by GAE on the old values (the sequence
        reward on the last action), whitened over the whole step, and the value targets."""
        rl = self.config.rl
        if rl.algorithm == "grpo":
            batch_std = None
            if rl.scale == "batch":
                batch_std = std_from_moments(all_reduce(masked_moments(batch.rewards)))
            return group_advantages(batch.rewards, rl.group_size, rl.scale, batch_std=batch_std), None
        assert old is not None and old.values is not None
        mask = batch.mask
        last = mask.long().cumsum(dim=1).argmax(dim=1)  # the row's last action (its first max)
        token_rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        token_rewards[torch.arange(mask.shape[0], device=mask.device), last] = batch.rewards.float()
        token_rewards = torch.where(mask, token_rewards, 0.0)
        advantages, returns = gae_advantages(token_rewards, old.values, mask, gamma=rl.gamma, lam=rl.lam)
        moments = all_reduce(masked_moments(advantages, mask))
        return whiten(advantages, mask, moments=moments), returns

    def _loss(
        self, data: StepData, rows: torch.Tensor, new: PolicyOutput
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rl = self.config.rl
        batch, old, ref = data.batch, data.old, data.ref
        mask = batch.mask[rows]
        common = {
            "aggregation": rl.aggregation,
            "normalizer": data.normalizer,
            "max_len": self.env.max_actions(),
        }
        old_logprobs = new.logprobs.detach() if old is None else old.logprobs[rows]
        loss, metrics = policy_loss(
            new.logprobs, old_logprobs, data.advantages[rows], mask, eps_low=rl.eps_low, eps_high=rl.eps_high,
            ref_logprobs=None if ref is None else ref.logprobs[rows], beta=rl.beta,
            kl_estimator=rl.kl_estimator, entropy=new.entropy,
            **common,
        )  # fmt: skip
        if rl.algorithm == "ppo":
            assert old is not None and old.values is not None and data.returns is not None
            v_loss, v_metrics = value_loss(
                new.values, old.values[rows], data.returns[rows], mask, clip_range=rl.value_clip or None,
                coef=rl.value_coef, **common,
            )  # fmt: skip
            loss = loss + v_loss
            metrics |= {k: v for k, v in v_metrics.items() if k != "actions"}
        return loss, metrics

    @staticmethod
    def _add_mismatch(
        sums: dict[str, float], batch: Rollouts, logprobs: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Adds how far the training forward's `logprobs` of `rows` are from the sampler's (weighted by
        actions), and the actions they cover."""
        mask = batch.mask[rows]
        actions = float(mask.sum())
        m = logprob_mismatch(batch.logprobs[rows], logprobs.detach(), mask)
        for k in MISMATCH_KEYS:
            sums[f"mismatch/{k}"] += float(m[k]) * actions
        sums["mismatch/actions"] += actions

    def _step_metrics(
        self,
        batch: Rollouts,
        sums: dict[str, float],
        grad_norms: list[float],
        skipped: int,
        lr: float,
        seconds: dict[str, float],
    ) -> dict[str, float]:
        rl = self.config.rl
        rewards = batch.rewards.double()
        local = {
            **sums,
            "actions_once": float(batch.mask.sum()),
            "count": float(rewards.numel()), "r_sum": float(rewards.sum()), "r_sq": float((rewards**2).sum()),
            **{f"reward/{n}": float(v.double().sum()) for n, v in batch.parts.items()},
            self.env.compute_metric: float(batch.compute.double().sum()),
            **{n: float(v.double().sum()) for n, v in batch.row_metrics.items()},
            **seconds,
        }  # fmt: skip
        total = all_reduce_sums(local)
        count, actions = total["count"], max(total["actions"], 1.0)
        out = {k: total[k] / rl.iterations for k in SHARE_KEYS} | {
            k: total[k] / actions for k in WEIGHTED_KEYS
        }
        out |= {
            f"mismatch/{k}": total[f"mismatch/{k}"] / max(total["mismatch/actions"], 1.0)
            for k in MISMATCH_KEYS
        }
        unused = (PPO_KEYS if rl.algorithm != "ppo" else ()) + (("kl", "kl_mean") if rl.beta <= 0 else ())
        out = {k: v for k, v in out.items() if k not in unused}
        if skipped:
            out["loss"] = float("nan")
        mean = total["r_sum"] / count
        var = max(total["r_sq"] / count - mean * mean, 0.0) * count / max(count - 1, 1)  # unbiased
        out |= {"reward_mean": mean, "reward_std": math.sqrt(var)}
        per_row = [f"reward/{n}" for n in batch.parts] + [self.env.compute_metric, *batch.row_metrics]
        out |= {k: total[k] / count for k in per_row}
        grad_norm = float("nan") if skipped else float(np.nanmean(grad_norms))
        out |= {"lr": lr, "grad_norm": grad_norm, "skipped_steps": skipped}
        out |= {k: total[k] / self.dp_size for k in seconds}  # mean over ranks
        out["rollout_share"] = out["rollout_s"] / max(out["rollout_s"] + out["train_s"], 1e-9)
        self._counts = (int(count), int(total["actions_once"]))
        return out

    def step_counts(self) -> tuple[int, int]:
        return self._counts


@dataclass
class StepData:
    """What every micro-batch's loss of a step reads (rows indexed like `batch`)."""

    batch: Rollouts
    old: PolicyOutput | None  # the old policy's log-probs and values (None: GRPO, one iteration)
    ref: PolicyOutput | None  # the reference's log-probs (rl.beta > 0)
    advantages: torch.Tensor  # [N] (GRPO) or [N, A] (PPO)
    returns: torch.Tensor | None  # [N, A] PPO's value targets
    normalizer: float  # the step's loss normaliser over all ranks and micro-batches


class RLPipelineLoss:
    """The PipelineModule's loss on the last stage: its outputs (logit slice, halting sums[, values]) and
    a micro-batch's labels, here its row indices, go to the step's loss function (`start`)."""

    def __init__(self) -> None:
        self.loss: Any = None

    def start(self, loss: Any) -> None:
        """loss(logits, values or None, rows) -> this micro-batch's loss, for the next train_batch."""
        self.loss = loss

    def __call__(self, outputs: tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
        logits, _, *values = outputs
        return self.loss(logits, values[0] if values else None, rows)


def _add_loss_metrics(sums: dict[str, float], loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
    """Adds one micro-batch's loss terms (shares of the step's) and per-action means (weighted by its
    actions) to the step's sums."""
    actions = float(metrics["actions"])  # WEIGHTED_KEYS are per-action means
    terms = {k: float(metrics[k]) for k in SHARE_KEYS[1:] if k in metrics}
    terms |= {k: float(metrics[k]) * actions for k in WEIGHTED_KEYS if k in metrics}
    add_micro_batch(sums, loss, {"loss": float(loss.detach()), **terms}, {"actions": actions})


def _no_rows_loss(policy: Any, batch: Rollouts, segments: int | None = None) -> torch.Tensor:
    """A finite loss through the engine's forward (one row's log-probs), for a rank whose share of a
    micro-batch is empty: backpropagated times zero, it gives the all-reduce zero gradients."""
    new = recompute_policy(policy, batch.rollout.select(slice(0, 1)), segments)
    return torch.where(batch.mask[:1], new.logprobs, 0.0).sum()


class EngineView:
    """The engine's forward (DeepSpeed's hooks) with the wrapped module's attributes (config,
    initial_carry, blocks): what hrm_mega.rl.rollout's recompute functions read. DeepSpeed's engine has
    a `config` of its own, so it cannot stand in for the model directly."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine.module, name)
