"""Typed run configuration: YAML files mapped onto dataclasses, `--set a.b=c` overrides, validation.

A run config has one section per concern (model, parallel, data, optim, train, log). YAML files may
name a `base:` file (relative to themselves) whose values they override. Unknown keys are rejected
with a did-you-mean hint, and every check names the dotted field and the fix in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the field."""


def swiglu_intermediate(hidden: int, expansion: float, multiple: int = 256) -> int:
    """HRM's SwiGLU width: round(expansion * hidden * 2/3) rounded up to a multiple of 256. Derived from
    the config alone (the model builds it, and the layout checks need it: tensor parallelism splits it)."""
    inter = round(expansion * hidden * 2 / 3)
    return -(inter // -multiple) * multiple


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class PuzzleModelConfig:
    """RecursiveReasoner: the HRM-ACT-v1 / TRM puzzle model (DESIGN section 5)."""

    family: Literal["puzzle"] = "puzzle"
    # Data-dependent sizes; recipes state them and training checks them against the manifest.
    vocab_size: int = 11
    seq_len: int = 81
    num_puzzle_identifiers: int = 1
    # Transformer
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    rms_norm_eps: float = 1e-5
    pos_encoding: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = 10000.0
    token_mixer: Literal["attention", "mlp"] = "attention"  # TRM's attention-free "mlp_t" variant
    # Recurrence: a CycleBlock with an L module run l_cycles times per H update, h_cycles times.
    h_layers: int = 4
    l_layers: int = 4
    h_cycles: int = 2
    l_cycles: int = 2
    shared_net: bool = False  # TRM: one network serves as both L and H
    grad_mode: Literal["one_step", "last_cycle", "full"] = "one_step"
    injection: Literal["add", "gated"] = "add"
    # Puzzle embedding prefix: puzzle_emb_ndim values spread over puzzle_emb_len positions.
    puzzle_emb_ndim: int = 512
    puzzle_emb_len: int = 0  # 0 = ceil(puzzle_emb_ndim / hidden_size), as HRM; TRM uses 16
    # ACT
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    q_target: Literal["bootstrap", "halt_only"] = "bootstrap"
    loss: Literal["stablemax", "softmax"] = "stablemax"

    @property
    def prefix_len(self) -> int:
        if self.puzzle_emb_len > 0:
            return self.puzzle_emb_len
        return -(self.puzzle_emb_ndim // -self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        _positive(
            self, "model", "vocab_size", "seq_len", "num_puzzle_identifiers", "hidden_size", "num_heads"
        )
        _positive(self, "model", "h_cycles", "l_cycles", "l_layers", "halt_max_steps")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.hidden_size/num_heads={self.head_dim} must be even for rope")
        if not self.shared_net and self.h_layers < 1:
            raise ConfigError("model.h_layers must be >= 1 unless model.shared_net=true (TRM)")
        if self.expansion <= 0:
            raise ConfigError(f"model.expansion={self.expansion} must be > 0")
        if self.puzzle_emb_ndim < 0 or self.puzzle_emb_len < 0:
            raise ConfigError("model.puzzle_emb_ndim and model.puzzle_emb_len must be >= 0")
        if self.puzzle_emb_ndim > self.prefix_len * self.hidden_size:
            raise ConfigError(
                f"model.puzzle_emb_ndim={self.puzzle_emb_ndim} does not fit in model.puzzle_emb_len="
                f"{self.puzzle_emb_len} positions of model.hidden_size={self.hidden_size}"
            )
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ConfigError(f"model.halt_exploration_prob={self.halt_exploration_prob} must be in [0, 1]")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps} must be > 0")


@dataclass
class LMModelConfig:
    """HRMGemma: the Gemma 3 text decoder with each local-global group wrapped in a CycleBlock (DESIGN 5).

    Defaults are Gemma 3 1B at N = T = 1, i.e. exactly Gemma 3; recipes under configs/lm/ set the rest.
    """

    family: Literal["hrm_gemma"] = "hrm_gemma"
    vocab_size: int = 262144
    hidden_size: int = 1152
    intermediate_size: int = 6912
    num_layers: int = 26
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: int = 256  # attention scores are scaled by query_pre_attn_scalar**-0.5
    sliding_window: int = 512  # local layers see keys at distance < sliding_window
    local_per_global: int = 5  # the layer pattern: this many local layers, then one global layer
    rope_local_base: float = 10000.0
    rope_global_base: float = 1000000.0
    rope_scaling: float = 1.0  # linear RoPE scaling factor of the global layers (1 = none; 8 for 4B+)
    rms_norm_eps: float = 1e-6
    max_position: int = 32768
    tie_embeddings: bool = True
    # Recurrence: every group runs its local layers (L) l_cycles times per global-layer (H) update, h_cycles times.
    h_cycles: int = 1
    l_cycles: int = 1
    # "full" backpropagates through every cycle (exact gradient; at N = T = 1 all modes coincide);
    # "one_step" / "last_cycle" keep training memory flat in the number of cycles.
    grad_mode: Literal["one_step", "last_cycle", "full"] = "full"
    injection: Literal["add", "gated"] = "gated"  # gated (zero-init) keeps an imported Gemma 3 exact
    # Halting: a head per CycleBlock predicts "converged" (the next H update would change z_H by less
    # than halt_tolerance, relative); training adds its BCE and an expected-compute cost.
    halt_tolerance: float = 0.01
    halt_loss_weight: float = 0.1
    compute_cost_weight: float = 0.01
    value_head: bool = False  # a scalar head on the final hidden states (PPO critic)

    @property
    def group_size(self) -> int:
        return self.local_per_global + 1

    @property
    def num_groups(self) -> int:
        """Complete local-global groups; each becomes one CycleBlock."""
        return self.num_layers // self.group_size

    @property
    def num_tail_layers(self) -> int:
        """Trailing local layers after the last global one (Gemma 3 1B: 26 = 4 x 6 + 2)."""
        return self.num_layers % self.group_size

    @property
    def layer_kinds(self) -> list[str]:
        """The kind of every layer, in order: "local" or "global"."""
        return ["global" if (i + 1) % self.group_size == 0 else "local" for i in range(self.num_layers)]

    def validate(self) -> None:
        _positive(self, "model", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        _positive(self, "model", "num_kv_heads", "head_dim", "query_pre_attn_scalar", "sliding_window")
        _positive(self, "model", "local_per_global", "max_position", "h_cycles", "l_cycles")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rope")
        if self.num_layers < self.group_size:
            raise ConfigError(
                f"model.num_layers={self.num_layers} is fewer than one local-global group "
                f"(model.local_per_global+1={self.group_size})"
            )
        for name in ("rope_local_base", "rope_global_base", "rope_scaling", "rms_norm_eps", "halt_tolerance"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        for name in ("halt_loss_weight", "compute_cost_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")


@dataclass
class ParallelConfig:
    """Parallel layout. dp is derived: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    pp_blocks: list[int] = field(default_factory=list)  # CycleBlocks per pipeline stage; [] = even split
    zero_stage: int = 0
    timeout_minutes: float = 10.0  # distributed collectives give up after this

    def validate(self) -> None:
        _positive(self, "parallel", "tp", "pp")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be one of 0, 1, 2, 3")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} cannot combine with parallel.pp={self.pp}; "
                "DeepSpeed pipeline parallelism supports ZeRO stage 0 or 1"
            )
        if self.timeout_minutes <= 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0")


@dataclass
class DataConfig:
    path: str = ""  # dataset directory with manifest.json (see docs/data_format.md)
    train_split: str = "train"
    eval_split: str = "test"
    partitions: int = 1  # logical streams; fixed so that data order does not depend on the DP size
    num_workers: int = 0
    shuffle_buffer: int = 1000
    corrupt_policy: Literal["skip", "fail"] = "fail"
    augment: bool = False  # on-the-fly augmentation keyed by sample id

    def validate(self) -> None:
        _positive(self, "data", "partitions")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")


@dataclass
class OptimConfig:
    name: Literal["adam_atan2", "adamw"] = "adam_atan2"
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    ema_decay: float = 0.0  # 0 disables EMA; TRM uses 0.999

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ConfigError(f"optim.lr_min_ratio={self.lr_min_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay={self.ema_decay} must be in [0, 1)")


@dataclass
class TrainConfig:
    task: Literal["auto", "puzzle", "lm"] = "auto"  # auto: puzzle for model.family=puzzle, lm for hrm_gemma
    seed: int = 0
    # Start a fresh run from these weights (any checkpoint `hrm-mega eval` reads, e.g. an `import-hf`
    # model directory); the recipe may change what leaves shapes alone, such as the cycle counts.
    init_from: str = ""
    global_batch: int = 768
    micro_batch: int = 0  # 0 = global_batch / dp (no gradient accumulation)
    steps: int = 1000  # optimizer steps; one step is one ACT segment
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile the model (fuses norms/activations; the first steps compile)
    activation_checkpointing: bool = False  # HRMGemma: recompute each CycleBlock in backward
    eval_interval: int = 0  # 0 = only at the end
    eval_modes: list[str] = field(default_factory=lambda: ["fixed", "adaptive"])
    eval_max_samples: int = 0  # 0 = the whole eval split
    checkpoint_interval: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 3  # abort after this many non-finite losses in a row
    # task lm: draw the H cycles of each step uniformly from [lo, hi] (same on every rank), so the model
    # stays robust when cycles are raised at test time; [] trains at model.h_cycles.
    cycles_range: list[int] = field(default_factory=list)
    # task lm: distil from a teacher (any checkpoint `hrm-mega eval` reads, same vocabulary):
    # loss += distill_weight * T^2 * KL(teacher || student) at temperature T on the labelled tokens.
    distill_from: str = ""
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def validate(self) -> None:
        _positive(self, "train", "global_batch", "steps", "keep_checkpoints", "max_nonfinite_steps")
        if self.micro_batch < 0:
            raise ConfigError(f"train.micro_batch={self.micro_batch} must be >= 0")
        if self.micro_batch and self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.micro_batch={self.micro_batch} does not divide train.global_batch={self.global_batch}"
            )
        for mode in self.eval_modes:
            if mode not in ("fixed", "adaptive"):
                raise ConfigError(f"train.eval_modes has {mode!r}; use 'fixed' and/or 'adaptive'")
        if self.cycles_range and (
            len(self.cycles_range) != 2 or not 1 <= self.cycles_range[0] <= self.cycles_range[1]
        ):
            raise ConfigError(
                f"train.cycles_range={self.cycles_range} must be [lo, hi] with 1 <= lo <= hi, or []"
            )
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ConfigError("train.distill_weight must be >= 0 and train.distill_temperature > 0")
        if self.distill_weight > 0 and not self.distill_from:
            raise ConfigError("train.distill_weight > 0 needs train.distill_from (a teacher checkpoint)")


@dataclass
class LogConfig:
    out_dir: str = "runs/default"
    log_interval: int = 10
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "hrm-mega"
    progress_bar: bool = True

    def validate(self) -> None:
        _positive(self, "log", "log_interval")
        if not self.out_dir:
            raise ConfigError("log.out_dir must not be empty")


@dataclass
class RLConfig:
    """RL post-training (`hrm-mega rl`, docs/rl.md). Read only by the RL trainer.

    A step rolls out group_size samples for each of prompts_per_step prompts (so the step has
    prompts_per_step * group_size rows; train.global_batch is set to that), scores them with the named
    rewards, and takes `iterations` optimizer steps on them against the log-probs of the policy that sampled.
    """

    algorithm: Literal["grpo", "ppo"] = "grpo"  # ppo needs an hrm_gemma model with model.value_head=true
    prompts_per_step: int = 8  # over all data-parallel ranks
    group_size: int = 8  # samples per prompt; GRPO's advantages compare the samples of one prompt
    iterations: int = 1  # optimizer steps on each batch of rollouts (ratios against the old log-probs)
    # Sampling. LM: temperature, top-k/top-p, up to max_new_tokens new tokens, decoded with KV caches and
    # per-token halting (max_cycles 0 = model.h_cycles; halt_threshold 0 = no early halting).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    max_cycles: int = 0
    halt_threshold: float = 0.0
    rollout_chunk: int = 1  # LM prompts per generate call; the draws are seeded per chunk
    # Puzzles: halting of the ACT loop during rollouts (sample: a Boltzmann policy over the Q-head, whose
    # decisions are actions; greedy: the evaluation rule; fixed: every row runs halt_max_steps segments).
    halting: Literal["sample", "greedy", "fixed"] = "sample"
    # Loss: ratio clipped to [1 - eps_low, 1 + eps_high]; beta * k3 KL to a frozen copy of the initial
    # weights (beta 0: no reference model is loaded); aggregation over the actions of the step.
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl_estimator: Literal["k3"] = "k3"
    aggregation: Literal["token_mean", "seq_mean_token_mean", "dr_grpo"] = "token_mean"
    # GRPO: reward minus the group mean, divided by the group's std, the step's std, or nothing (Dr. GRPO).
    scale: Literal["group", "batch", "none"] = "group"
    # GRPO: leave groups whose samples all got the same reward (zero advantages) out of the update: no
    # training forward for them, and they do not count in the loss's normaliser (DAPO's dynamic sampling,
    # without refilling the batch).
    drop_uniform_groups: bool = False
    # PPO: GAE over the completion tokens, advantages whitened over the step, clipped value loss.
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2  # 0 = no value clipping
    value_coef: float = 0.1
    # Rewards by registered name (hrm_mega/rl/rewards.py) with their weights; then
    # reward -= compute_cost_lambda * compute used / budget (ACT segments, or H cycles per token).
    rewards: dict[str, float] = field(default_factory=dict)
    reward_modules: list[str] = field(default_factory=list)  # imported first: their @register_reward runs
    compute_cost_lambda: float = 0.0
    # Prompts: dataset (puzzles: the train split of data.path) or arithmetic (LM: generated a+b=, a-b=,
    # a*b= questions in the corpus format, operands of 1..arithmetic_max_digits digits, keyed by seed).
    prompts: Literal["dataset", "arithmetic"] = "dataset"
    arithmetic_ops: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    arithmetic_max_digits: int = 4
    arithmetic_train_pool: int = 0  # 0: new train questions every step; N: cycle through a fixed N of them
    eval_prompts: int = 200  # LM: held-out questions, never used for training, answered greedily

    def validate(self) -> None:
        _positive(
            self, "rl", "prompts_per_step", "group_size", "iterations", "max_new_tokens", "rollout_chunk"
        )
        _positive(self, "rl", "arithmetic_max_digits", "eval_prompts")
        if self.arithmetic_train_pool < 0:
            raise ConfigError(
                f"rl.arithmetic_train_pool={self.arithmetic_train_pool} must be >= 0 (0 = no pool)"
            )
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError("rl.temperature must be > 0, rl.top_p in (0, 1] and rl.top_k >= 0")
        if self.max_cycles < 0 or not 0.0 <= self.halt_threshold < 1.0:
            raise ConfigError("rl.max_cycles must be >= 0 and rl.halt_threshold in [0, 1) (0 = no halting)")
        if not 0.0 <= self.eps_low < 1.0 or self.eps_high < 0:
            raise ConfigError(
                f"rl.eps_low={self.eps_low} must be in [0, 1) and rl.eps_high={self.eps_high} >= 0"
            )
        for name in ("beta", "value_clip", "value_coef", "compute_cost_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name}={getattr(self, name)} must be >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"rl.gamma={self.gamma} and rl.lam={self.lam} must be in [0, 1]")
        if self.drop_uniform_groups and self.algorithm != "grpo":
            raise ConfigError(
                "rl.drop_uniform_groups applies to rl.algorithm=grpo (PPO's advantages are per token)"
            )
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ConfigError("rl.group_size must be >= 2 for rl.algorithm=grpo (advantages compare a group)")
        if not isinstance(self.rewards, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in self.rewards.items()
        ):
            raise ConfigError(
                f"rl.rewards={self.rewards!r} must map reward names to weights, e.g. {{sudoku_valid: 1.0}}"
            )
        bad = [op for op in self.arithmetic_ops if op not in ("+", "-", "*")]
        if bad or not self.arithmetic_ops:
            raise ConfigError(f"rl.arithmetic_ops={self.arithmetic_ops} must be a non-empty list of +, -, *")


MODEL_FAMILIES: dict[str, type] = {"puzzle": PuzzleModelConfig, "hrm_gemma": LMModelConfig}
ModelConfig = PuzzleModelConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=PuzzleModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def task(self) -> str:
        """What the trainer runs: "puzzle" (ACT segments) or "lm" (next-token prediction)."""
        return "lm" if self.model.family == "hrm_gemma" else "puzzle"

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if self.model.family == "puzzle" and self.parallel.pp > 1:
            raise ConfigError(
                f"parallel.pp={self.parallel.pp} is not supported for model.family=puzzle "
                "(a single CycleBlock cannot be split into stages); use parallel.tp or data parallelism"
            )
        if self.train.task not in ("auto", self.task):
            raise ConfigError(
                f"train.task={self.train.task} does not fit model.family={self.model.family} (use {self.task})"
            )
        if self.task == "puzzle" and (
            self.train.cycles_range or self.train.distill_weight or self.train.activation_checkpointing
        ):
            raise ConfigError(
                "train.cycles_range, train.distill_* and train.activation_checkpointing apply to train.task=lm only"
            )
        if self.train.global_batch % self.data.partitions:
            raise ConfigError(
                f"data.partitions={self.data.partitions} does not divide train.global_batch={self.train.global_batch}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML file (following `base:` links), applies `a.b=c` overrides and validates."""
    raw = _read_yaml_with_bases(Path(path)) if path is not None else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw).validate()


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Builds a Config from nested dicts, rejecting unknown keys (does not validate)."""
    raw = dict(raw)
    model_raw = dict(raw.pop("model", {}) or {})
    family = model_raw.get("family", "puzzle")
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"model.family={family!r} is unknown{_suggest(family, MODEL_FAMILIES)}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    _reject_unknown(raw, sections, prefix="")
    kwargs = {"model": _build(MODEL_FAMILIES[family], model_raw, "model")}
    for name, value in raw.items():
        kwargs[name] = _build(sections[name].default_factory(), value or {}, name)  # type: ignore[misc]
    return Config(**kwargs)


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_read_yaml_with_bases(path.parent / base, (*seen, path)), data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set {item!r}: key must be SECTION.FIELD, e.g. train.steps")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({first}); quote strings that start with "
            "*, &, ! or contain ': ', e.g. --set \"rl.arithmetic_ops=['+', '*']\""
        ) from None


def _build(instance_or_cls: Any, values: dict[str, Any], prefix: str) -> Any:
    cls = instance_or_cls if isinstance(instance_or_cls, type) else type(instance_or_cls)
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(values, fields, prefix=prefix + ".")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} must be one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [v for v in str(value).split(",") if v]
        (item_type,) = typing.get_args(hint)[:1]
        return [_coerce(v, item_type, dotted) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{dotted}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{dotted}={value!r} must be an integer")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{dotted}={value!r} must be an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{dotted}={value!r} must be an integer")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{dotted}={value!r} must be a number") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{dotted} must be a string")
        return str(value)
    return value


def _reject_unknown(values: dict[str, Any], known: dict[str, Any], prefix: str) -> None:
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key}{_suggest(key, known, prefix)}")


def _suggest(word: str, options: Any, prefix: str = "") -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def _positive(section: Any, name: str, *fields: str) -> None:
    for f in fields:
        value = getattr(section, f)
        if value < 1:
            raise ConfigError(f"{name}.{f}={value} must be >= 1")


def save_resolved(config: Config, path: str | Path) -> Path:
    """Writes the fully resolved config, so that a run can be reproduced from its directory alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    return path
