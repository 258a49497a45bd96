"""RL post-training of the puzzle family (RecursiveReasoner): GRPO over sampled solutions.

Prompts are puzzles of the train split (data.path), streamed like pretraining data (partitioned,
resumable); labels are read by a reward only if the reward wants them (sudoku_valid does not). A rollout
runs the ACT loop from a fresh carry and samples every cell from the halting segment, with the halting
decisions sampled from the Q-head (rl.halting=sample) so that they are actions too and compute shaping
(rl.compute_cost_lambda) can teach the model to stop earlier. The puzzle-embedding table is not trained
here (it lives outside the engine; pretraining's sparse sign-SGD owns it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hrm_mega.data.stream import SampleStream
from hrm_mega.rl.rewards import combine_rewards, compute_fraction, shape_for_compute
from hrm_mega.rl.rollout import puzzle_rollout
from hrm_mega.training.tasks.puzzle import evaluate_puzzles
from hrm_mega.training.tasks.rl import Environment, Rollouts, step_seed

if TYPE_CHECKING:
    from hrm_mega.training.trainer import Trainer

_ROLLOUT_STREAM = 0x726F6C6C  # "roll": the seed stream of the rollout draws


class PuzzleEnvironment(Environment):
    compute_metric = "mean_segments"

    def build_stream(self, trainer: Trainer) -> SampleStream:
        return trainer.task.sample_stream(trainer, self.config.rl.prompts_per_step)

    def max_actions(self) -> int:
        return self.config.model.seq_len + self.config.model.halt_max_steps

    def rollout(self, trainer: Trainer, prompts: int, model: torch.nn.Module) -> Rollouts:
        rl, m = self.config.rl, self.config.model
        batch = {k: v.to(trainer.world.device) for k, v in trainer.stream.take(range(prompts)).items()}
        ro = puzzle_rollout(
            model, batch, group_size=rl.group_size, temperature=rl.temperature, halting=rl.halting,
            seed=step_seed(self.config.train.seed, trainer.step, _ROLLOUT_STREAM),
            halt_temperature=rl.halt_temperature,
        )  # fmt: skip
        total, parts = combine_rewards(
            rl.rewards, timeout=rl.reward_timeout, tokens=ro.tokens, inputs=ro.batch["inputs"], labels=ro.batch["labels"],
            segments=ro.segments,
        )  # fmt: skip
        fraction = compute_fraction(ro.segments, m.halt_max_steps)
        rewards = shape_for_compute(total, fraction, rl.compute_cost_lambda)
        # Diagnostics against the labels (never part of the reward unless a reward reads them).
        solved = (ro.tokens == ro.batch["labels"]).all(dim=1).float()
        return Rollouts(
            rollout=ro, logprobs=ro.logprobs, mask=ro.mask, rewards=rewards, parts=parts,
            compute=ro.segments.float(), row_metrics={"sample_exact_accuracy": solved},
        )  # fmt: skip

    def evaluate(self, trainer: Trainer, model: torch.nn.Module) -> dict[str, float]:
        """evaluate_puzzles of `model` in every mode of train.eval_modes, keyed eval_{mode}/{metric}."""
        results: dict[str, float] = {}
        for mode in trainer.config.train.eval_modes:
            metrics = evaluate_puzzles(model, trainer.config, trainer.world, mode, trainer.ema)
            results |= {f"eval_{mode}/{key}": value for key, value in metrics.items()}
        return results

    def summary_lines(self) -> list[str]:
        return [f"  puzzles from {self.config.data.path}; halting {self.config.rl.halting}"]
