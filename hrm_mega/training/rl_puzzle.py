"""RL post-training of the puzzle family (RecursiveReasoner): GRPO over sampled solutions.

Prompts are puzzles of the train split (data.path), streamed like pretraining data (partitioned,
resumable); labels are read by a reward only if the reward wants them (sudoku_valid does not). A rollout
runs the ACT loop from a fresh carry and samples every cell from the halting segment, with the halting
decisions sampled from the Q-head (rl.halting=sample) so that they are actions too and compute shaping
(rl.compute_cost_lambda) can teach the model to stop earlier. The puzzle-embedding table is not trained
here (it lives outside the engine; pretraining's sparse sign-SGD owns it).
"""

from __future__ import annotations

from typing import Any

from hrm_mega.config import ConfigError
from hrm_mega.data.stream import SampleStream
from hrm_mega.models.puzzle import RecursiveReasoner
from hrm_mega.rl.rewards import combine_rewards, compute_fraction, shape_for_compute
from hrm_mega.rl.rollout import puzzle_rollout
from hrm_mega.training.puzzle import evaluate_puzzles
from hrm_mega.training.rl import RLTrainer, Rollouts, step_seed

_ROLLOUT_STREAM = 0x726F6C6C  # "roll": the seed stream of the rollout draws


class PuzzleRLTrainer(RLTrainer):
    model: RecursiveReasoner

    def manifest_fields(self) -> tuple[str, ...]:
        return ("seq_len", "num_puzzle_identifiers")

    def check_data(self) -> dict[str, Any]:
        manifest = super().check_data()
        c = self.config
        if manifest.get("task") == "text":
            raise ConfigError(f"{c.data.path} holds text; a puzzle model needs a puzzle dataset")
        if c.rl.prompts != "dataset":
            raise ConfigError(
                f"rl.prompts={c.rl.prompts} applies to language models; puzzles use rl.prompts=dataset"
            )
        if c.rl.algorithm != "grpo":
            raise ConfigError(
                "rl.algorithm=ppo needs a value head, which puzzle models lack; use rl.algorithm=grpo"
            )
        if c.data.augment:
            raise ConfigError("data.augment=true applies to pretraining; set data.augment=false for RL")
        if c.rl.prompts_per_step % c.data.partitions:
            raise ConfigError(
                f"data.partitions={c.data.partitions} does not divide "
                f"rl.prompts_per_step={c.rl.prompts_per_step}"
            )
        return manifest

    def build_stream(self) -> SampleStream:
        d, t = self.config.data, self.config.train
        return SampleStream(
            d.path, d.train_split, seed=t.seed, global_batch=self.config.rl.prompts_per_step,
            partitions=d.partitions, dp_rank=self.world.dp_rank, dp_size=self.world.dp_size,
            num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, corrupt_policy=d.corrupt_policy,
        )  # fmt: skip

    def max_actions(self) -> int:
        return self.config.model.seq_len + self.config.model.halt_max_steps

    def compute_metric_name(self) -> str:
        return "mean_segments"

    def rollout(self) -> Rollouts:
        rl, m = self.config.rl, self.config.model
        prompts = {k: v.to(self.world.device) for k, v in self.stream.take(range(self.local_prompts)).items()}
        ro = puzzle_rollout(
            self.model, prompts, group_size=rl.group_size, temperature=rl.temperature, halting=rl.halting,
            seed=step_seed(self.config.train.seed, self.step, _ROLLOUT_STREAM),
        )  # fmt: skip
        total, parts = combine_rewards(
            rl.rewards, tokens=ro.tokens, inputs=ro.batch["inputs"], labels=ro.batch["labels"],
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

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate_all(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for mode in self.config.train.eval_modes:
            for key, value in evaluate_puzzles(
                self.model, self.config, self.world, mode, ema=self.ema
            ).items():
                results[f"eval_{mode}/{key}"] = value
        return results

    def summary_lines(self) -> list[str]:
        rl = self.config.rl
        return [*super().summary_lines(), f"  puzzles from {self.config.data.path}; halting {rl.halting}"]
