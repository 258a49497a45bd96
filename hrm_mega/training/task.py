"""The Task interface: what differs between puzzle, language-model and RL training, handed to the one
Trainer (training/trainer.py) as torchtitan hands its trainer a train spec.

A task owns its dataset, its model build, its stream, one optimizer step, its metrics, its evaluation
and the extra state its checkpoints carry (its config checks are in hrm_mega/config/checks.py, run by
load_config before anything starts). The Trainer owns the engine, the loop, the
learning-rate schedule, the non-finite guard, EMA, checkpoints and logging. Task methods get the trainer
so that they can reach those (trainer.engine, trainer.world, trainer.stream, trainer.step, ...).

A new task is one new file under training/tasks/ and one line in TASKS below.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import torch

from hrm_mega.config import Config, ConfigError
from hrm_mega.data.shards import read_manifest
from hrm_mega.data.stream import SampleStream
from hrm_mega.models import build_model
from hrm_mega.optim import EMA
from hrm_mega.training.engine import World


class TrainerView(Protocol):
    """What a task may use of the Trainer that runs it (training/trainer.py implements it). Spelled out
    here so that this module needs nothing from the trainer's, which builds tasks."""

    config: Config
    task: Task
    world: World
    run_dir: Path
    manifest: dict[str, Any]
    model: torch.nn.Module
    engine: Any  # the DeepSpeed engine (training/engine.py: initialize)
    ema: EMA | None
    stream: Any  # what the task's build_stream returned
    local_batch: int
    step: int

    def set_lr(self) -> float: ...
    def start_micro_batch(self, index: int, count: int) -> None: ...
    def apply_update(self, all_finite: bool) -> float: ...
    def count_update(self, applied: bool) -> None: ...
    def evaluate(self) -> dict[str, float]: ...


# The registry: a task name -> "module:class", imported on use so that a run loads only its own task's
# code. config.task names the pretraining task; RL post-training is the "rl" task, run on the
# Environment registered as "rl/{config.task}" (prompts, rollouts and rewards of that model family).
TASKS = {
    "puzzle": "hrm_mega.training.tasks.puzzle:PuzzleTask",
    "lm": "hrm_mega.training.tasks.lm:LMTask",
    "rl": "hrm_mega.training.tasks.rl:RLTask",
    "rl/puzzle": "hrm_mega.training.tasks.rl_puzzle:PuzzleEnvironment",
    "rl/lm": "hrm_mega.training.tasks.rl_lm:TextEnvironment",
}


def registered(name: str) -> Any:
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_task(config: Config, rl: bool = False) -> Task:
    """The task of the config (config.task: puzzle | lm), or RL post-training of that model family."""
    if rl:
        return registered("rl")(config, registered(f"rl/{config.task}"))
    return registered(config.task)(config)


class Task(ABC):
    config: Config
    manifest: dict[str, Any]  # the dataset's manifest.json, read by read_data
    command: str = "train"  # the hrm-mega command: names the run, selects the config checks (train | rl)
    # Whether a checkpoint resumes at another data-parallel size (not when replicas keep their own state,
    # like the puzzle task's ACT rows in flight).
    reshards_data_parallel: bool = True
    # train.init_from: how errors name it, and parameters the source may lack (a value head added for
    # PPO keeps its initialisation; fresh_keys lists them after initial_model).
    init_label: str = "train.init_from="
    keep_fresh: tuple[str, ...] = ()
    fresh_keys: tuple[str, ...] = ()
    init_config: Config | None = None  # the train.init_from model's config

    def __init__(self, config: Config) -> None:
        self.config = config

    # --- set-up, in the order the Trainer calls it ----------------------------------------------------

    def read_data(self) -> dict[str, Any]:
        """The dataset's manifest (load_config has checked it against the config)."""
        self.manifest = read_manifest(self.config.data.path)
        return self.manifest

    def build_model(self, trainer: TrainerView) -> torch.nn.Module:
        """The model to train: initial_model, compiled when train.compile."""
        model = self.initial_model(trainer)
        if self.config.train.compile:
            model.compile()  # in place: parameter names, and so checkpoints, are unchanged
        return model

    def initial_model(self, trainer: TrainerView) -> torch.nn.Module:
        """The model on this rank's device: initialised from the seed, then from train.init_from."""
        c = self.config
        model = build_model(c.model).init_weights(c.train.seed).to(trainer.world.device)
        if c.train.init_from:
            label = f"{self.init_label}{c.train.init_from}"
            self.fresh_keys, self.init_config = load_init_weights(model, c, self.keep_fresh, label)
        return model

    def setup(self, trainer: TrainerView) -> None:
        """Set-up that needs the engine (e.g. optimizers living outside it, a teacher)."""
        return None

    def build_stream(self, trainer: TrainerView) -> Any:
        """The training stream (partitioned, deterministic given the seed, resumable): this rank's share of
        the train split, or anything with SampleStream's progress / state_dict / load_state_dict / close."""
        return self.sample_stream(trainer, self.config.train.global_batch)

    def sample_stream(self, trainer: TrainerView, global_batch: int, transform: Any = None) -> SampleStream:
        """This rank's share of the train split, `global_batch` rows per step over all ranks."""
        d, w = self.config.data, trainer.world
        return SampleStream(
            d.path, d.train_split, seed=self.config.train.seed, global_batch=global_batch,
            partitions=d.partitions, dp_rank=w.dp_rank, dp_size=w.dp_size, num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer, corrupt_policy=d.corrupt_policy, transform=transform,
            shard_url=d.shard_url, read_retries=d.read_retries,
        )  # fmt: skip

    # --- training ----------------------------------------------------------------------------------

    @abstractmethod
    def train_step(self, trainer: TrainerView) -> dict[str, float]:
        """One optimizer step (trainer.step is advanced by the Trainer); returns global metrics."""

    @abstractmethod
    def step_counts(self) -> tuple[int, int]:
        """(samples, tokens) consumed by the last step, for samples/s and tokens/s."""

    def set_lr_scale(self, scale: float) -> None:
        """The step's learning-rate multiplier, for optimizers outside the engine (sparse embeddings)."""
        return None

    def after_optimizer_step(self) -> None:
        """Updates outside the engine that happen with every applied optimizer step."""
        return None

    @abstractmethod
    def evaluate(self, trainer: TrainerView) -> dict[str, float]:
        """Every evaluation of the task, keyed for metrics.jsonl."""

    # --- checkpoints and the summary ---------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Task state for checkpoints: (JSON-able client state, tensors)."""
        return {}, {}

    def load_state(
        self, trainer: TrainerView, client: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Restores what state() saved."""
        return None

    def summary_lines(self, trainer: TrainerView) -> list[str]:
        return []


def load_init_weights(
    model: torch.nn.Module, config: Config, keep_fresh: tuple[str, ...] = (), label: str | None = None
) -> tuple[tuple[str, ...], Config]:
    """Copies train.init_from into the freshly built model strictly (every key, every shape), except
    that parameters under the `keep_fresh` prefixes which the source lacks (a value head added for PPO)
    keep their initialisation. Returns those keys and the source's config. A resumed run then overwrites
    all with its checkpoint. `label`: how errors name the source (default: train.init_from=PATH).

    `model` may be any layout's share of the config's model: a tensor-parallel rank's slices, or a
    pipeline stage (names as in the single-process model after the stage's prefix). The keys and whole
    shapes are checked against the whole model (built on the meta device), so a stage also refuses a
    source with other or more layers than this config's."""
    from hrm_mega.checkpoint.consolidate import load_state

    label = label or f"train.init_from={config.train.init_from}"
    state, source_config = load_state(config.train.init_from)
    if source_config.model.family != config.model.family:
        raise ConfigError(
            f"{label} holds a {source_config.model.family} model; "
            f"this recipe is model.family={config.model.family}"
        )
    fresh = copy_whole_weights(model, config.model, state, label, keep_fresh)
    return fresh, source_config


def copy_whole_weights(
    model: torch.nn.Module,
    model_config: Any,
    state: dict[str, torch.Tensor],
    label: str,
    keep_fresh: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """Copies `state` (the whole single-process model's weights of `model_config`) into `model`, this
    rank's share of that model (TP slices, a pipeline stage), strictly as load_init_weights describes;
    returns the keep_fresh keys the state lacks."""
    from hrm_mega.checkpoint.model_dir import CheckpointError
    from hrm_mega.checkpoint.universal import full_shape, model_name, tp_share
    from hrm_mega.distributed import tp_rank, tp_size

    with torch.device("meta"):
        whole = build_model(model_config)
    persistent = set(whole.state_dict())
    expected = {n: full_shape(p, tp_size()) for n, p in whole.named_parameters()}
    expected |= {n: tuple(b.shape) for n, b in whole.named_buffers() if n in persistent}
    fresh = tuple(k for k in expected if k.startswith(keep_fresh) and k not in state) if keep_fresh else ()
    missing = [k for k in expected if k not in state and k not in fresh]
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{label}: missing key {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{label}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected in all)"
        )
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{label}: {key} has shape {tuple(state[key].shape)}, the model expects {shape}"
            )
    local_persistent = set(model.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (key := model_name(name)) not in fresh:
                p.copy_(tp_share(state[key], p, (tp_size(), tp_rank())))
        for name, b in model.named_buffers():
            if name in local_persistent:
                b.copy_(state[model_name(name)])
    return fresh
