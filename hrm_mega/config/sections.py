"""The run sections of a config besides the model: parallel layout, data, optimizer, training loop, logging
and RL post-training. Each validates its own fields; checks across sections live in checks.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hrm_mega.config.schema import ConfigError, positive

# DeepSpeed config keys that hrm-mega derives from its own fields: set there, so that validation holds.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "amp": "train.precision",
    "optimizer": "the optim section",
    "scheduler": "the optim section",
    "zero_allow_untested_optimizer": "optim.name",
    "pipeline": "parallel.pp",
    "zero_optimization.stage": "parallel.zero_stage",
}


def check_deepspeed_passthrough(extra: Any) -> None:
    """parallel.deepspeed is a mapping that sets none of the keys hrm-mega owns (DEEPSPEED_OWNED)."""
    if not isinstance(extra, dict):
        raise ConfigError(f"parallel.deepspeed must be a mapping of DeepSpeed config keys, got {extra!r}")
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("parallel.deepspeed.zero_optimization must be a mapping")
    keys = [*extra, *(f"zero_optimization.{k}" for k in zero)]
    for key in keys:
        if key in DEEPSPEED_OWNED:
            raise ConfigError(
                f"parallel.deepspeed.{key} is derived from {DEEPSPEED_OWNED[key]}; set that instead"
            )


# What data.shard_url may start with: webdataset's gopen schemes (hrm_mega/data/remote.py reads them).
SHARD_URL_SCHEMES = (
    "pipe:",
    "http://",
    "https://",
    "gs://",
    "ais://",
    "sftp://",
    "scp://",
    "ftps://",
    "hf://",
    "file:",
)


def check_shard_url(template: str, field: str = "data.shard_url") -> None:
    """A shard_url names every shard ({name}) through a scheme the reader knows; else one line."""
    if "{name}" not in template:
        raise ConfigError(f"{field}={template!r} has no {{name}} (the shard's file name) in it")
    if not template.startswith(SHARD_URL_SCHEMES):
        scheme = template.split(":", 1)[0]
        raise ConfigError(
            f"{field}={template!r}: unknown scheme {scheme!r}; use pipe:COMMAND, http(s)://, gs://, or "
            "another webdataset scheme"
        )


@dataclass
class ParallelConfig:
    """Parallel layout. dp is derived: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    pp_blocks: list[int] = field(default_factory=list)  # CycleBlocks per pipeline stage; [] = even split
    zero_stage: int = 0
    timeout_minutes: float = 10.0  # distributed collectives give up after this
    # Merged into the generated DeepSpeed config (saved as <out_dir>/ds_config.json), e.g.
    # {steps_per_print: 100, zero_optimization: {overlap_comm: true}}; keys that other fields own are refused.
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        positive(self, "parallel", "tp", "pp")
        check_deepspeed_passthrough(self.deepspeed)
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
class DataSource:
    """One dataset of a weighted mixture (data.sources)."""

    path: str = ""  # dataset directory with manifest.json
    weight: float = 1.0  # share of the samples, relative to the other sources' weights
    name: str = ""  # in metrics (data/NAME/..., eval/NAME/...); default: the directory's name
    # false: read the rows in the order they were written, every epoch (a source sorted easy to hard:
    # `prep puzzle-text --sort difficulty`, then `prep text --keep-order`); no shuffling
    shuffle: bool = True
    shard_url: str = ""  # where this source's shards are read from, as data.shard_url for data.path


@dataclass
class CurriculumStage:
    """Source weights up to a step (data.curriculum): a stage holds for the steps before `until_step`,
    or before the step that has read `until_tokens` (global_batch x seq_len tokens a step)."""

    until_step: int = 0  # 0 (and until_tokens 0): to the end of the run (the last stage only)
    until_tokens: int = 0  # the boundary in tokens read instead; one unit for the whole curriculum
    weights: dict[str, float] = field(default_factory=dict)  # source name -> weight; unnamed sources get 0
    anneal: Literal["switch", "linear"] = "switch"  # linear: from the previous stage's weights to these


@dataclass
class DataConfig:
    path: str = ""  # dataset directory with manifest.json (see docs/data_format.md)
    # A weighted mixture of text datasets instead of one (language models; docs/data.md). data.path is then
    # set to the first source's (its tokenizer and vocabulary are the run's).
    sources: list[DataSource] = field(default_factory=list)
    # Stages of source weights over the steps, in place of the sources' own weights (docs/data.md).
    curriculum: list[CurriculumStage] = field(default_factory=list)
    # A source read to its end: start its next epoch (counted), or end the run after that step.
    source_end: Literal["repeat", "stop"] = "repeat"
    # On the rows of prompt/answer datasets (prep text --prompt-field/--answer-field), the loss and the
    # eval loss cover the answers only, as TRL's completion-only loss; false: every document token.
    answer_only_loss: bool = True
    train_split: str = "train"
    eval_split: str = "test"
    partitions: int = 1  # logical streams; fixed so that data order does not depend on the DP size
    num_workers: int = 0
    shuffle_buffer: int = 1000
    corrupt_policy: Literal["skip", "fail"] = "fail"
    # Where the shards are read from, the manifest staying in data.path: a template with {split} and {name},
    # e.g. "pipe:cat /mnt/x/{split}/{name}" or "https://host/x/{split}/{name}" (docs/data.md). "": data.path.
    shard_url: str = ""
    read_retries: int = 3  # further attempts at a remote shard that fails or arrives damaged
    augment: bool = False  # on-the-fly augmentation keyed by sample id

    def validate(self) -> None:
        positive(self, "data", "partitions")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.read_retries < 0:
            raise ConfigError("data.num_workers, data.shuffle_buffer and data.read_retries must be >= 0")
        if self.shard_url:
            check_shard_url(self.shard_url)
            if self.sources:
                raise ConfigError(
                    "data.shard_url applies to data.path; give each source its own data.sources[i].shard_url"
                )
        if self.sources:
            self._validate_sources()
        elif self.curriculum:
            raise ConfigError("data.curriculum needs data.sources (the stages weigh the sources)")

    def _validate_sources(self) -> None:
        names = []
        for i, s in enumerate(self.sources):
            if not s.path:
                raise ConfigError(f"data.sources[{i}].path is empty")
            if not math.isfinite(s.weight) or s.weight < 0:
                raise ConfigError(f"data.sources[{i}].weight={s.weight} must be a number >= 0")
            if s.shard_url:
                check_shard_url(s.shard_url, f"data.sources[{i}].shard_url")
            s.name = s.name or Path(s.path.rstrip("/")).name
            if s.name in names:
                raise ConfigError(
                    f"data.sources[{i}].name={s.name!r} repeats an earlier source's; name them apart"
                )
            names.append(s.name)
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: the weights sum to 0; give at least one source a weight > 0")
        previous = 0
        unit = "until_tokens" if any(st.until_tokens for st in self.curriculum) else "until_step"
        for i, stage in enumerate(self.curriculum):
            where = f"data.curriculum[{i}]"
            last = i == len(self.curriculum) - 1
            if stage.until_step and stage.until_tokens or (unit == "until_tokens" and stage.until_step):
                raise ConfigError(
                    f"{where}: until_step and until_tokens mix; give every stage's boundary in one unit"
                )
            until = getattr(stage, unit)
            if until <= previous and not (last and until == 0):
                raise ConfigError(f"{where}.{unit}={until} must be above the previous stage's {previous}")
            previous = until
            if not isinstance(stage.weights, dict):
                raise ConfigError(f"{where}.weights must map source names to weights, got {stage.weights!r}")
            unknown = [n for n in stage.weights if n not in names]
            if unknown:
                raise ConfigError(
                    f"{where}.weights names {unknown[0]!r}, not a source (sources: {', '.join(names)})"
                )
            if (
                any(not math.isfinite(w) or w < 0 for w in stage.weights.values())
                or sum(stage.weights.values()) <= 0
            ):
                raise ConfigError(f"{where}.weights must be numbers >= 0 with a positive sum")
            if i == 0 and stage.anneal == "linear":
                raise ConfigError(f"{where}.anneal=linear needs a stage before it to anneal from")
        self.path = self.sources[0].path  # the sources win over a recipe's data.path


@dataclass
class OptimConfig:
    name: Literal["adam_atan2", "adamw"] = "adam_atan2"
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    # AdamATan2's update scale `a`: 1 is the adam-atan2 package that HRM and TRM train with; the demo
    # recipe keeps the 1.27 it was tuned with (hrm_mega/optim/adam_atan2.py).
    adam_atan2_scale: float = 1.0
    grad_clip: float = 1.0  # 0 disables clipping; the paper puzzle recipes set 0, as HRM and TRM
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    ema_decay: float = 0.0  # 0 disables EMA; TRM uses 0.999
    # Learning-rate multipliers (times optim.lr, on the same schedule) for the CycleBlocks' injection gates
    # (gate_LL/LH/HH) and the halting heads (HRMGemma's halt_head, the puzzle model's q_head or
    # cell_head): parameters that start at a fixed value and that the shared LR may move too slowly
    # (docs/benchmarks.md).
    gate_lr_mult: float = 1.0
    halt_lr_mult: float = 1.0

    def validate(self) -> None:
        for name in ("gate_lr_mult", "halt_lr_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"optim.{name}={value} must be a number > 0")
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
        if not self.adam_atan2_scale > 0:
            raise ConfigError(f"optim.adam_atan2_scale={self.adam_atan2_scale} must be > 0")
        if self.name != "adam_atan2" and self.adam_atan2_scale != 1.0:
            raise ConfigError(
                f"optim.adam_atan2_scale={self.adam_atan2_scale} applies only to optim.name=adam_atan2, "
                f"not {self.name}"
            )


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
    compile: bool = False  # torch.compile the model and AdamATan2's update (the first steps compile)
    activation_checkpointing: bool = False  # HRMGemma: recompute each CycleBlock in backward
    eval_interval: int = 0  # 0 = only at the end
    eval_modes: list[str] = field(default_factory=lambda: ["fixed", "adaptive"])
    eval_max_samples: int = 0  # 0 = the whole eval split
    checkpoint_interval: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 3  # abort after this many non-finite losses in a row
    # A resume refuses other training data than the checkpoint's (other shards under data.path, or another
    # data.path, train_split, partitions, shuffle_buffer or augment) unless this is true; the new data is
    # then read from its start.
    allow_data_change: bool = False
    # task lm: draw the H cycles of each step uniformly from [lo, hi] (same on every rank), so the model
    # stays robust when cycles are raised at test time; [] trains at model.h_cycles.
    cycles_range: list[int] = field(default_factory=list)
    # task lm: distil from a teacher (any checkpoint `hrm-mega eval` reads, same vocabulary):
    # loss += distill_weight * T^2 * KL(teacher || student) at temperature T on the labelled tokens.
    distill_from: str = ""
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def validate(self) -> None:
        positive(self, "train", "global_batch", "steps", "keep_checkpoints", "max_nonfinite_steps")
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
    tensorboard: bool = False  # event files in <out_dir>/tensorboard
    progress_bar: bool = True  # on a terminal; elsewhere (Slurm) a plain line per logged step

    def validate(self) -> None:
        positive(self, "log", "log_interval")
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
    # LM: the rollouts' KV cache: rectangular (one tensor per layer and cycle step; faster on CPU) or
    # paged (blocks of kv_block_size positions in a pool, models/paged_kv_cache.py; the same tokens).
    kv_cache: Literal["rectangular", "paged"] = "rectangular"
    kv_block_size: int = 16  # paged: positions per block
    kv_resident_blocks: int = 0  # paged: blocks kept on the model's device, the rest offloaded; 0 = all
    kv_dtype: Literal["model", "int8"] = "model"  # paged: int8 stores keys/values with a scale per token
    # Halting during rollouts. Puzzles: of the ACT loop (sample: a Boltzmann policy over the Q-head, whose
    # decisions are actions; greedy: the evaluation rule; fixed: every row runs halt_max_steps segments).
    # LM with a halt_threshold: sample draws the per-token halting of every position that produces a
    # token (an action, replayed by the policy forward); greedy and fixed keep the threshold rule.
    halting: Literal["sample", "greedy", "fixed"] = "sample"
    # halting sample: P(halt) = sigmoid(halting logit / halt_temperature) (LM: the head's logit less
    # logit(halt_threshold)); below 1 the sampled policy is closer to the greedy rule evaluation runs.
    halt_temperature: float = 1.0
    # Loss: ratio clipped to [1 - eps_low, 1 + eps_high]; beta * k3 KL to a frozen copy of the initial
    # weights (beta 0: no reference model is loaded); aggregation over the actions of the step.
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    # k3_ratio: k3 x pi/pi_old, whose gradient is that of KL(pi || ref) (TRL's use_bias_correction_kl);
    # k3: the plain k3, whose gradient is that of KL(ref || pi) (hrm_mega/rl/losses.py, docs/rl.md).
    kl_estimator: Literal["k3_ratio", "k3"] = "k3_ratio"
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
    # A name is a registered reward or any importable function as module:function.
    rewards: dict[str, float] = field(default_factory=dict)
    reward_modules: list[str] = field(default_factory=list)  # imported first: their @register_reward runs
    reward_timeout: float = 60.0  # seconds a reward call may take (0: no limit); over it, the run stops
    compute_cost_lambda: float = 0.0
    # Prompts: dataset (puzzles: the train split of data.path), arithmetic (LM: generated a+b=, a-b=,
    # a*b= questions in the corpus format, operands of 1..arithmetic_max_digits digits, keyed by seed) or
    # jsonl (LM: records of prompt_file, with eval_prompt_file held out; docs/rl.md).
    prompts: Literal["dataset", "arithmetic", "jsonl"] = "dataset"
    prompt_file: str = ""  # jsonl: one JSON object per line with prompt_field and answer_field
    eval_prompt_file: str = ""  # jsonl: the held-out questions (its first eval_prompts records)
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # the reference answer rewards get as `answers`; other fields: `metadata`
    # What the model sees: the prompt put into this template, e.g. Gemma's chat turns
    # "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n" (rewards get the bare prompt).
    prompt_template: str = "{prompt}"
    arithmetic_ops: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    arithmetic_max_digits: int = 4
    arithmetic_train_pool: int = 0  # 0: new train questions every step; N: cycle through a fixed N of them
    eval_prompts: int = 200  # LM: held-out questions, never used for training, answered greedily
    # Every N-th step's rollouts (prompt, completion and its token ids, rewards) as lines of
    # <log.out_dir>/rollouts.jsonl, from all ranks; 0 = none.
    log_rollouts: int = 0

    def validate(self) -> None:
        positive(
            self, "rl", "prompts_per_step", "group_size", "iterations", "max_new_tokens", "rollout_chunk"
        )
        positive(self, "rl", "arithmetic_max_digits", "eval_prompts", "kv_block_size")
        if self.kv_resident_blocks < 0:
            raise ConfigError(f"rl.kv_resident_blocks={self.kv_resident_blocks} must be >= 0 (0: no offload)")
        if self.kv_cache != "paged" and (self.kv_resident_blocks or self.kv_dtype != "model"):
            raise ConfigError("rl.kv_resident_blocks and rl.kv_dtype=int8 need rl.kv_cache=paged")
        if self.reward_timeout < 0:
            raise ConfigError(f"rl.reward_timeout={self.reward_timeout} must be >= 0 (0: no limit)")
        if self.log_rollouts < 0:
            raise ConfigError(f"rl.log_rollouts={self.log_rollouts} must be >= 0 (0: none)")
        try:
            filled = self.prompt_template.format(prompt="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"rl.prompt_template={self.prompt_template!r}: not a format string with one field "
                f"{{prompt}} ({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}"
            ) from None
        if "\0" not in filled:
            raise ConfigError(f"rl.prompt_template={self.prompt_template!r} must contain {{prompt}}")
        if self.prompts == "jsonl":
            for name in ("prompt_file", "eval_prompt_file"):
                path = getattr(self, name)
                if not path:
                    raise ConfigError(
                        f"rl.prompts=jsonl needs rl.{name} (a JSONL file of prompt/answer records)"
                    )
                if not Path(path).is_file():
                    raise ConfigError(f"rl.{name}={path}: no such file")
        if self.arithmetic_train_pool < 0:
            raise ConfigError(
                f"rl.arithmetic_train_pool={self.arithmetic_train_pool} must be >= 0 (0 = no pool)"
            )
        if self.halt_temperature <= 0:
            raise ConfigError(f"rl.halt_temperature={self.halt_temperature} must be > 0")
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
