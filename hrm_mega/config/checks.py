"""Checks across config sections, run by Config.validate before any engine or process group starts.

Three levels, each a function of what is known at the time:

- check_sections: the config alone (layout against the model, pipeline limits, distillation, EMA, ...);
- check_world: the world size too (the data-parallel size and what it must divide);
- check_run: what starting `hrm-mega train` or `hrm-mega rl` needs: the dataset's manifest.json
  (data.path; when it is there) against the model, and for RL the rl section against the model and
  the layout.

Every message is one line naming the dotted field. The trainer still meets some of these conditions again
later (e.g. the stream refuses a bad partition split); the config is where they are first refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

from hrm_mega.config.layout import check_model_layout, resolve_layout, tp_split_sizes
from hrm_mega.config.model import LMModelConfig, PuzzleModelConfig
from hrm_mega.config.schema import ConfigError
from hrm_mega.config.sections import DataConfig, OptimConfig, ParallelConfig, RLConfig, TrainConfig


class RunSections(Protocol):
    """What these checks read of a Config (config/run.py, which calls them): its sections and task."""

    @property
    def model(self) -> PuzzleModelConfig | LMModelConfig: ...
    @property
    def parallel(self) -> ParallelConfig: ...
    @property
    def data(self) -> DataConfig: ...
    @property
    def optim(self) -> OptimConfig: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def rl(self) -> RLConfig: ...
    @property
    def task(self) -> str: ...


Command = Literal["train", "rl"]
COMMANDS: tuple[str, ...] = ("train", "rl")
# The rewards hrm_mega/rl/rewards.py registers (tests/test_config_errors.py keeps the two lists equal);
# other names must come from a module in rl.reward_modules, which only the RL trainer imports.
BUILTIN_REWARDS = (
    "answer_exact_match",
    "answer_format",
    "arithmetic_exact_match",
    "maze_path_length",
    "maze_valid",
    "sudoku_valid",
)


def check_sections(c: RunSections) -> None:
    """Checks that need the config only."""
    m, par, t = c.model, c.parallel, c.train
    if isinstance(m, PuzzleModelConfig) and par.pp > 1:
        raise ConfigError(
            f"parallel.pp={par.pp} is not supported for model.family=puzzle "
            "(a single CycleBlock cannot be split into stages); use parallel.tp or data parallelism"
        )
    if t.task not in ("auto", c.task):
        raise ConfigError(f"train.task={t.task} does not fit model.family={m.family} (use {c.task})")
    if c.task == "puzzle" and (t.cycles_range or t.distill_weight or t.activation_checkpointing):
        raise ConfigError(
            "train.cycles_range, train.distill_* and train.activation_checkpointing apply to train.task=lm only"
        )
    if t.global_batch % c.data.partitions:
        raise ConfigError(
            f"data.partitions={c.data.partitions} does not divide train.global_batch={t.global_batch}"
        )
    check_model_layout(c)
    if isinstance(m, LMModelConfig) and m.deep_supervision and (par.pp > 1 or t.activation_checkpointing):
        raise ConfigError(
            "model.deep_supervision is not available with parallel.pp > 1 or train.activation_checkpointing; "
            "unset one"
        )
    if par.pp > 1 and t.compile:
        raise ConfigError(
            "train.compile is not available with parallel.pp > 1 yet; unset it or use parallel.pp=1"
        )
    if c.optim.ema_decay > 0 and par.zero_stage == 3:
        raise ConfigError("optim.ema_decay > 0 is not supported with parallel.zero_stage=3; use stage 0-2")


def rollout_rows(c: RunSections) -> int:
    """The rows of one RL step: rl.prompts_per_step x rl.group_size (RL's train.global_batch)."""
    return c.rl.prompts_per_step * c.rl.group_size


def check_world(c: RunSections, world_size: int, command: Command | None = None) -> None:
    """Checks that need the world size: the layout, and the batch and partitions against dp."""
    dp = resolve_layout(c, world_size).dp
    d, t = c.data, c.train
    rl = command == "rl"
    batch = rollout_rows(c) if rl else t.global_batch
    if rl and c.rl.prompts_per_step % dp:
        raise ConfigError(
            f"rl.prompts_per_step={c.rl.prompts_per_step} must be a multiple of the "
            f"{dp} data-parallel ranks (each rank rolls out whole groups)"
        )
    if batch % dp:
        raise ConfigError(f"train.global_batch={batch} is not a multiple of the {dp} data-parallel ranks")
    local = batch // dp
    if local % (t.micro_batch or local):
        raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the per-rank batch {local}")
    if _streams_data(c, command):
        if d.partitions % dp:
            raise ConfigError(
                f"data.partitions={d.partitions} must be a multiple of the {dp} data-parallel ranks "
                "(each rank owns data.partitions / dp of them)"
            )
        if d.num_workers > d.partitions // dp:
            raise ConfigError(
                f"data.num_workers={d.num_workers} must be <= data.partitions / dp = {d.partitions // dp} "
                "(a worker serves at least one partition)"
            )


def _streams_data(c: RunSections, command: Command | None) -> bool:
    """Whether the run streams data.path's train split (LM RL generates its prompts instead)."""
    return not (command == "rl" and c.task == "lm")


def check_run(c: RunSections, command: Command) -> None:
    """Checks of starting `command` ("train" or "rl"): the dataset's manifest, and the rl section."""
    if command not in COMMANDS:
        raise ValueError(f"command={command!r} must be one of {', '.join(COMMANDS)}")
    if not c.data.path:
        raise ConfigError(
            "data.path is empty; build a dataset with `hrm-mega prep ...` and point data.path at it"
        )
    if command == "rl":
        check_rl(c)
    elif c.data.augment and isinstance(c.model, LMModelConfig):
        raise ConfigError("data.augment=true does not apply to text data; set data.augment=false")
    if c.data.sources:
        check_sources(c, command)
    check_manifest(c, command)
    if command == "train" and c.train.distill_weight > 0:
        check_teacher(c, read_teacher_model(c.train.distill_from))


def check_sources(c: RunSections, command: Command) -> None:
    """A mixture: language-model training only; every source a text dataset with the first source's
    sequence length and tokenizer, holding a sample per partition."""
    if not isinstance(c.model, LMModelConfig) or command != "train":
        raise ConfigError("data.sources (a weighted mixture) is for language-model training; use data.path")
    first = first_image = None
    for i, s in enumerate(c.data.sources):
        where = f"data.sources[{i}] ({s.name}: {s.path})"
        manifest = read_manifest_json(s.path)
        if manifest is None:
            raise ConfigError(f"{where}: no manifest.json there; build it with `hrm-mega prep text`")
        if manifest.get("task") not in ("text", "image_text"):
            raise ConfigError(
                f"{where} holds {manifest.get('task')!r} data; a mixture's sources are text (or image-text) "
                "datasets"
            )
        if manifest.get("task") == "image_text":
            check_image_data(c.model, manifest, where)
            image = manifest.get("extra", {}).get("image")
            if first_image is None:
                first_image = (i, image)
            elif image != first_image[1]:
                raise ConfigError(
                    f"{where}: its images are preprocessed otherwise than data.sources[{first_image[0]}]'s "
                    "(extra.image differs); build every image-text source with the same image options"
                )
        identity = (manifest.get("seq_len"), manifest.get("extra", {}).get("tokenizer_sha256"))
        if first is None:
            first = identity
        elif identity[0] != first[0]:
            raise ConfigError(f"{where}: seq_len {identity[0]} differs from data.sources[0]'s {first[0]}")
        elif identity[1] != first[1]:
            raise ConfigError(
                f"{where}: its tokenizer differs from data.sources[0]'s (tokenizer_sha256); a mixture "
                "has one tokenizer: build every source with `hrm-mega prep text --tokenizer` of the first"
            )
        samples = int(manifest.get("splits", {}).get(c.data.train_split, {}).get("num_samples", 0))
        if samples < c.data.partitions:
            raise ConfigError(
                f"{where}: data.partitions={c.data.partitions} exceeds its {samples} {c.data.train_split} samples"
            )


def check_rl(c: RunSections) -> None:
    """The rl section against the model, the layout and the batch (config only)."""
    rl, par, t, d = c.rl, c.parallel, c.train, c.data
    rows = rollout_rows(c)
    if t.micro_batch and rows % t.micro_batch:
        raise ConfigError(
            f"train.micro_batch={t.micro_batch} does not divide the {rows} rollouts of a step "
            f"(rl.prompts_per_step={rl.prompts_per_step} x rl.group_size={rl.group_size})"
        )
    if rows % d.partitions:
        raise ConfigError(
            f"data.partitions={d.partitions} does not divide the {rows} rollouts of a step; "
            "change rl.prompts_per_step or data.partitions"
        )
    if not t.init_from:
        raise ConfigError("RL post-training starts from a pretrained model: pass --init CKPT")
    if not rl.rewards:
        raise ConfigError(
            "rl.rewards is empty; name at least one reward, e.g. --set rl.rewards.sudoku_valid=1"
        )
    unknown = [name for name in rl.rewards if name not in BUILTIN_REWARDS and ":" not in name]
    if unknown and not rl.reward_modules:
        raise ConfigError(
            f"rl.rewards: unknown reward {unknown[0]!r}; known rewards: {', '.join(BUILTIN_REWARDS)} (or "
            "register your own with @register_reward in a module named in rl.reward_modules)"
        )
    if isinstance(c.model, PuzzleModelConfig):
        if rl.prompts != "dataset":
            raise ConfigError(
                f"rl.prompts={rl.prompts} applies to language models; puzzles use rl.prompts=dataset"
            )
        if rl.algorithm != "grpo":
            raise ConfigError(
                "rl.algorithm=ppo needs a value head, which puzzle models lack; use rl.algorithm=grpo"
            )
        if rl.kv_cache != "rectangular":
            raise ConfigError(
                f"rl.kv_cache={rl.kv_cache} applies to language models; puzzles keep no KV cache"
            )
        if d.augment:
            raise ConfigError("data.augment=true applies to pretraining; set data.augment=false for RL")
        if rl.prompts_per_step % d.partitions:
            raise ConfigError(
                f"data.partitions={d.partitions} does not divide rl.prompts_per_step={rl.prompts_per_step}"
            )
    else:
        if rl.prompts == "dataset":
            raise ConfigError(
                "rl.prompts=dataset applies to puzzles; language models use rl.prompts=arithmetic or jsonl"
            )
        if rl.algorithm == "ppo" and not c.model.value_head:
            raise ConfigError(
                "rl.algorithm=ppo needs a value head: an hrm_gemma model with model.value_head=true"
            )
        if par.pp > 1 and c.model.vision is not None:
            raise ConfigError(
                "RL of a model with model.vision is not available with parallel.pp > 1 yet (RL prompts are "
                "text, and the first pipeline stage's vision layer expects images); use parallel.pp=1"
            )
        if rl.halting == "sample" and rl.halt_threshold > 0:  # drawn halting: an action
            drawn = f"rl.halting=sample with rl.halt_threshold={rl.halt_threshold} (drawn halting)"
            if rl.algorithm == "ppo":
                raise ConfigError(
                    f"{drawn} is available with rl.algorithm=grpo only (its replayed forward has no "
                    "value head yet); or set rl.halting=greedy"
                )
            if par.pp > 1 or par.zero_stage == 3:
                raise ConfigError(
                    f"{drawn} is not available with parallel.pp > 1 or zero_stage 3 yet (stages recompute "
                    "every cycle, and ZeRO-3 ranks must gather the same layers); use rl.halting=greedy"
                )


def read_teacher_model(path: str) -> Any:
    """The model section of the checkpoint at train.distill_from (a training checkpoint, a model
    directory or a consolidated .safetensors file), read without its weights."""
    import yaml

    from hrm_mega.config.model import model_config_from_dict

    where, p = f"train.distill_from={path}", Path(path)
    try:
        if (p / "client" / "rank-00000.json").is_file():
            raw = json.loads((p / "client" / "rank-00000.json").read_text())["config"]
        elif (p / "config.yaml").is_file():
            raw = yaml.safe_load((p / "config.yaml").read_text())
        elif p.is_file() and p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(p, "pt") as f:
                raw = yaml.safe_load((f.metadata() or {})["config"])
        else:
            raise ConfigError(
                f"{where}: no teacher there; expected a training checkpoint (step-*/), a model directory "
                "(model.safetensors + config.yaml) or a .safetensors file from hrm-mega consolidate"
            )
        return model_config_from_dict(raw["model"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: its config cannot be read ({type(e).__name__}: {e})") from None


def check_teacher(c: RunSections, teacher: Any) -> None:
    """The distillation teacher's model against the student's: an hrm_gemma model with the student's
    vocabulary (the KL compares the two distributions token by token), whose sizes split over
    parallel.tp (it runs split like the student, training/tasks/lm.py Teacher)."""
    where = f"train.distill_from={c.train.distill_from}"
    if not isinstance(teacher, LMModelConfig) or teacher.vocab_size != c.model.vocab_size:
        raise ConfigError(
            f"{where}: the teacher must be an hrm_gemma model with the student's vocab_size "
            f"{c.model.vocab_size}, not a {teacher.family} model with vocab_size {teacher.vocab_size}"
        )
    tp = c.parallel.tp
    for name, value in tp_split_sizes(teacher).items():
        if value % tp:
            raise ConfigError(
                f"{where}: the teacher's model.{name}={value} is not divisible by parallel.tp={tp} "
                "(the teacher is split like the student); distil at a parallel.tp that divides it"
            )


def read_manifest_json(data_path: str) -> dict[str, Any] | None:
    """data.path's manifest.json as a dict, None if there is none here (the data layer reads it in full,
    and refuses a missing one, when the run starts)."""
    path = Path(data_path) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"data.path={data_path}: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"data.path={data_path}: {path} is not a JSON object")
    return manifest


IMAGE_FIELDS = ("image_size", "mm_tokens_per_image", "image_token_id", "boi_token_id", "eoi_token_id")


def check_image_data(m: Any, manifest: dict[str, Any], where: str) -> None:
    """An image-text dataset (`hrm-mega prep images`) against model.vision: the model has an image
    encoder, of the image size and tokens per image the rows were built for, with their token ids."""
    if not isinstance(m, LMModelConfig) or m.vision is None:
        raise ConfigError(
            f"{where} holds image-text data, but the model has no image encoder; set model.vision "
            "(e.g. --set model.vision.image_size=...)"
        )
    image = manifest.get("extra", {}).get("image")
    if not isinstance(image, dict):
        raise ConfigError(
            f"{where}: an image-text dataset without extra.image; rebuild it with `hrm-mega prep images`"
        )
    for name in IMAGE_FIELDS:
        if image.get(name) != getattr(m.vision, name):
            raise ConfigError(
                f"model.vision.{name}={getattr(m.vision, name)} but {where} was built with {name}={image.get(name)}"
            )


def check_manifest(c: RunSections, command: Command) -> None:
    """The dataset named by data.path against the model and the data section, when it is here."""
    d, m = c.data, c.model
    manifest = read_manifest_json(d.path) if d.path else None
    if manifest is None:  # the data layer refuses a missing dataset when the run reads it
        return
    task = manifest.get("task")
    where = f"{d.path}/manifest.json"
    vocab = manifest.get("vocab_size")
    if isinstance(vocab, int) and vocab > m.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than {where}'s vocab_size {vocab}")
    if isinstance(m, PuzzleModelConfig):
        if command == "rl" and task == "text":
            raise ConfigError(f"{d.path} holds text; a puzzle model needs a puzzle dataset")
        for name in ("seq_len", "num_puzzle_identifiers"):
            if name in manifest and manifest[name] != getattr(m, name):
                raise ConfigError(f"model.{name}={getattr(m, name)} but {where} has {name}={manifest[name]}")
        if d.augment and command == "train" and task != "sudoku":
            raise ConfigError(f"data.augment=true is only available for sudoku data, not {task!r}")
    elif task == "image_text" and command == "train":
        check_image_data(m, manifest, where)
    elif task != "text":
        if command == "rl":
            raise ConfigError(
                f"{d.path} holds {task!r} data; an hrm_gemma model needs the text dataset it was trained on "
                "(its tokenizer)"
            )
        raise ConfigError(
            f"{d.path} holds {task!r} data; train.task=lm needs a text dataset (build one with `hrm-mega prep text`)"
        )
    if (
        isinstance(m, LMModelConfig)
        and command == "train"
        and isinstance(manifest.get("seq_len"), int)
        and manifest["seq_len"] > m.max_position
    ):
        raise ConfigError(
            f"model.max_position={m.max_position} is shorter than {d.path}'s seq_len {manifest['seq_len']}"
        )
    if command == "rl" and isinstance(m, LMModelConfig):
        tokenizer = Path(d.path) / "tokenizer.model"
        if not tokenizer.is_file():
            raise ConfigError(
                f"{tokenizer} does not exist; data.path must be a dataset built by `hrm-mega prep text`"
            )
        return  # LM RL reads the tokenizer, not the rows
    split = manifest.get("splits", {}).get(d.train_split)
    if split is None:
        known = ", ".join(sorted(manifest.get("splits", {})))
        raise ConfigError(f"data.train_split={d.train_split!r} is not a split of {where} (has: {known})")
    samples = int(split.get("num_samples", 0))
    if samples < d.partitions:
        raise ConfigError(
            f"data.partitions={d.partitions} exceeds the {samples} samples of {d.path}/{d.train_split}; "
            "lower data.partitions (each partition needs a sample)"
        )
