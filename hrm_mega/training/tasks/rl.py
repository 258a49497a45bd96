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
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hrm_mega.config import Config, ConfigError
from hrm_mega.config.checks import read_manifest_json, rollout_rows
from hrm_mega.distributed import all_finite, all_reduce, all_reduce_sums
from hrm_mega.rl.advantages import gae as gae_advantages
from hrm_mega.rl.advantages import group_advantages, masked_moments, std_from_moments, whiten
from hrm_mega.rl.losses import loss_normalizer, policy_loss, value_loss
from hrm_mega.rl.rewards import get_reward
from hrm_mega.rl.rollout import LMRollout, PolicyOutput, PuzzleRollout, logprob_mismatch, recompute_policy
from hrm_mega.training import engine as ds
from hrm_mega.training.evaluation import eval_mode
from hrm_mega.training.metrics import add_micro_batch
from hrm_mega.training.task import Task

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
    def rollout(self, trainer: Trainer, prompts: int) -> Rollouts:
        """This rank's rollouts of the current step (trainer.step) for `prompts` prompts, scored."""

    @abstractmethod
    def max_actions(self) -> int:
        """The constant action count per row (dr_grpo's max_len)."""

    @abstractmethod
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """The evaluation, keyed for metrics.jsonl."""

    def load_state(self, trainer: Trainer, prompts: int) -> None:
        """After a resume at trainer.step, with `prompts` prompts per rank and step."""
        return None

    def summary_lines(self) -> list[str]:
        return []


class RLTask(Task):
    """GRPO or PPO around the pretraining Trainer, for the model family's Environment."""

    command = "rl"
    init_label = "--init "
    keep_fresh = ("value_head.",)  # PPO on a pretrained LM adds a value head
    reference: torch.nn.Module | None = None
    _counts: tuple[int, int] = (0, 0)

    def __init__(self, config: Config, environment: type[Environment]) -> None:
        super().__init__(rollout_batch_config(config))
        self.env = environment(self.config)

    def read_data(self) -> dict[str, Any]:
        manifest = super().read_data()
        self.env.read_data(manifest)
        return manifest

    def initial_model(self, trainer: Trainer) -> torch.nn.Module:
        model = super().initial_model(trainer)  # train.init_from is required for RL (load_config)
        check_same_tokenizer(self.init_config, self.config)
        return model

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
        if rl.beta > 0:  # the frozen reference: the initial weights, rebuilt (also after a resume)
            self.reference = self.initial_model(trainer).eval().requires_grad_(False)

    def build_stream(self, trainer: Trainer) -> Any:
        return self.env.build_stream(trainer)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        return self.env.evaluate(trainer)

    def load_state(self, trainer: Trainer, client: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.env.load_state(trainer, self.local_prompts)

    def summary_lines(self, trainer: Trainer) -> list[str]:
        rl = self.config.rl
        lines = [
            f"  RL {rl.algorithm}: {rl.prompts_per_step} prompts x {rl.group_size} samples per step, "
            f"{rl.iterations} optimizer step(s) per batch; rewards {rl.rewards}, compute cost "
            f"{rl.compute_cost_lambda}; beta {rl.beta} "
            f"({'reference model loaded' if self.reference else 'no reference model'})",
            f"  init from {self.config.train.init_from}",
        ]
        if self.fresh_keys:
            lines.append(f"  freshly initialised (not in the init checkpoint): {', '.join(self.fresh_keys)}")
        return [*lines, *self.env.summary_lines()]

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, trainer: Trainer) -> dict[str, float]:
        rl = self.config.rl
        lr = trainer.set_lr()
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(trainer.model):
            batch = self.env.rollout(trainer, self.local_prompts)
        t_rollout = time.perf_counter() - t0

        micro = self.config.train.micro_batch or trainer.local_batch
        trained = self._trained_rows(batch)
        chunks = self._chunks(trainer.world, trained, micro)
        n_micro = trainer.world.dp_size * len(chunks)  # micro-batches run by all ranks together
        # DeepSpeed averages gradients over dp x its configured accumulation steps (which can differ from
        # len(chunks) when groups are dropped); the losses below are already shares of the whole step's
        # normaliser, so that division is undone (as in training/tasks/lm.py).
        undo_average = float(trainer.world.dp_size * trainer.engine.gradient_accumulation_steps())
        max_len = self.env.max_actions()
        share = loss_normalizer(rl.aggregation, batch.mask[trained], max_len) if len(trained) else 0.0
        normalizer = max(all_reduce_sums({"share": share})["share"], 1.0)
        need_old = rl.iterations > 1 or rl.algorithm == "ppo"
        policy = EngineView(trainer.engine)
        with torch.no_grad():
            old = self._policy(policy, batch, chunks) if need_old else None
            ref = self._policy(self.reference, batch, chunks) if self.reference is not None else None
        advantages, returns = self._advantages(batch, old)

        mismatch = [f"mismatch/{k}" for k in (*MISMATCH_KEYS, "actions")]
        sums = dict.fromkeys((*SHARE_KEYS, *WEIGHTED_KEYS, *mismatch, "actions", "finite"), 0.0)
        grad_norms, skipped = [], 0
        if old is not None:
            self._add_mismatch(sums, batch, old.logprobs[trained], trained)
        for iteration in range(rl.iterations):
            finite = 0.0
            for i, rows in enumerate(chunks):
                trainer.start_micro_batch(i, len(chunks))  # the count can differ from DeepSpeed's own
                if len(rows):
                    new = recompute_policy(policy, batch.rollout.select(rows))
                    loss, metrics = self._loss(batch, rows, new, old, ref, advantages, returns, normalizer)
                    if old is None and iteration == 0:
                        self._add_mismatch(sums, batch, new.logprobs, rows)
                    scale = undo_average
                else:  # no rows of this rank are left, but every rank joins the micro-batch's collectives
                    loss, metrics, scale = _no_rows_loss(policy, batch), None, 0.0
                if all_finite(loss):
                    trainer.engine.backward(loss * scale)
                    finite += 1.0
                if metrics is not None:
                    actions = float(metrics["actions"])  # WEIGHTED_KEYS are per-action means
                    terms = {k: float(metrics[k]) for k in SHARE_KEYS[1:] if k in metrics}
                    terms |= {k: float(metrics[k]) * actions for k in WEIGHTED_KEYS if k in metrics}
                    add_micro_batch(sums, loss, {"loss": float(loss.detach()), **terms}, {"actions": actions})
            ok = all_reduce_sums({"finite": finite})["finite"] == n_micro
            grad_norms.append(trainer.apply_update(ok))
            skipped += int(not ok)
        t_train = time.perf_counter() - t0 - t_rollout
        trained_share = torch.zeros(batch.rewards.shape[0]).index_fill_(0, trained.cpu(), 1.0)
        batch.row_metrics["trained_fraction"] = trained_share
        seconds = {"rollout_s": t_rollout, "train_s": t_train}
        return self._step_metrics(batch, sums, grad_norms, skipped, lr, seconds)

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

    def _policy(self, model: Any, batch: Rollouts, chunks: list[torch.Tensor]) -> PolicyOutput:
        """The training forward's log-probs (and values) over the rows of `chunks`, micro-batch by
        micro-batch, placed at their row indices (rows outside the chunks hold zeros)."""
        mask = batch.mask
        logprobs, entropy = (torch.zeros(mask.shape, device=mask.device) for _ in range(2))
        values = None
        for rows in chunks:
            if len(rows) == 0:
                continue
            part = recompute_policy(model, batch.rollout.select(rows))
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
        self,
        batch: Rollouts,
        rows: torch.Tensor,
        new: PolicyOutput,
        old: PolicyOutput | None,
        ref: PolicyOutput | None,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        normalizer: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rl = self.config.rl
        mask = batch.mask[rows]
        common = {"aggregation": rl.aggregation, "normalizer": normalizer, "max_len": self.env.max_actions()}
        old_logprobs = new.logprobs.detach() if old is None else old.logprobs[rows]
        loss, metrics = policy_loss(
            new.logprobs, old_logprobs, advantages[rows], mask, eps_low=rl.eps_low, eps_high=rl.eps_high,
            ref_logprobs=None if ref is None else ref.logprobs[rows], beta=rl.beta,
            kl_estimator=rl.kl_estimator, entropy=new.entropy,
            **common,
        )  # fmt: skip
        if rl.algorithm == "ppo":
            assert old is not None and old.values is not None and returns is not None
            v_loss, v_metrics = value_loss(
                new.values, old.values[rows], returns[rows], mask, clip_range=rl.value_clip or None,
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
        unused = (PPO_KEYS if rl.algorithm != "ppo" else ()) + (
            ("kl", "kl_mean") if self.reference is None else ()
        )
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


def _no_rows_loss(policy: Any, batch: Rollouts) -> torch.Tensor:
    """A finite loss through the engine's forward (one row's log-probs), for a rank whose share of a
    micro-batch is empty: backpropagated times zero, it gives the all-reduce zero gradients."""
    new = recompute_policy(policy, batch.rollout.select(slice(0, 1)))
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
