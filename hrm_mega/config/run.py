"""Typed run configuration: YAML files mapped onto dataclasses, `--set a.b=c` overrides, validation.

A run config has one section per concern (model, parallel, data, optim, train, log, rl). YAML files may
name a `base:` file (relative to themselves) whose values they override. Unknown keys are rejected
with a did-you-mean hint, and every check names the dotted field and the fix in one line.

`load_config` validates everything that the config decides, before any engine starts: each section,
the checks across sections, with `world_size` the layout and batch arithmetic, and with `command`
("train" or "rl") the dataset's manifest and the rl section (checks.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hrm_mega.config.checks import Command, check_run, check_sections, check_world
from hrm_mega.config.layout import resolve_layout
from hrm_mega.config.model import LMModelConfig, PuzzleModelConfig, model_config_from_dict
from hrm_mega.config.schema import ConfigError, build, reject_unknown
from hrm_mega.config.sections import DataConfig, LogConfig, OptimConfig, ParallelConfig, RLConfig, TrainConfig
from hrm_mega.resources import recipes_dir


@dataclass
class Config:
    model: PuzzleModelConfig | LMModelConfig = field(default_factory=PuzzleModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    @property
    def task(self) -> str:
        """What the trainer runs: "puzzle" (ACT segments) or "lm" (next-token prediction)."""
        return "lm" if isinstance(self.model, LMModelConfig) else "puzzle"

    def validate(self, world_size: int | None = None, command: Command | None = None) -> Config:
        """Checks every section and the sections against each other; with `world_size` also the layout
        and what dp must divide; with `command` ("train" or "rl") also what starting that run needs
        (data.path's manifest.json, the rl section). Returns self; raises a one-line ConfigError."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if world_size is not None:
            resolve_layout(self, world_size)  # first: a wrong world size is the likelier mistake
        check_sections(self)
        if command is not None:
            check_run(self, command)
        if world_size is not None:
            check_world(self, world_size, command)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    command: Command | None = None,
) -> Config:
    """Loads a YAML file (following `base:` links), applies `a.b=c` overrides and validates (see
    Config.validate for `world_size` and `command`)."""
    return read_config(path, overrides).validate(world_size, command)


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """load_config without the validation, for a caller that checks something else first (then
    calls Config.validate)."""
    raw = _read_yaml_with_bases(find_config(path)) if path is not None else {}
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Builds a Config from nested dicts, rejecting unknown keys (does not validate)."""
    raw = dict(raw)
    model = model_config_from_dict(dict(raw.pop("model", {}) or {}))
    sections = {f.name: f for f in dataclasses.fields(Config)}
    reject_unknown(raw, sections, prefix="")
    kwargs: dict[str, Any] = {"model": model}
    for name, value in raw.items():
        kwargs[name] = build(type(sections[name].default_factory()), value or {}, name)  # type: ignore[misc]
    return Config(**kwargs)


def find_config(path: str | Path) -> Path:
    """A YAML file, or else a recipe shipped with the package named by its file name or its path under
    configs/, with or without .yaml: `hrm_sudoku_tiny`, `puzzle/hrm_sudoku_tiny.yaml`."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    name = given.as_posix().removesuffix(".yaml").removeprefix("configs/")
    shipped = recipes_dir()
    matches = [
        p for p in sorted(shipped.rglob(f"{given.name.removesuffix('.yaml')}.yaml"))
        if p.relative_to(shipped).with_suffix("").as_posix().endswith(name)
    ]  # fmt: skip
    if len(matches) > 1:
        names = ", ".join(p.relative_to(shipped).with_suffix("").as_posix() for p in matches)
        raise ConfigError(f"recipe {path} is ambiguous: {names}")
    if not matches:
        raise ConfigError(
            f"config file {given} does not exist, and no shipped recipe has that name (hrm-mega config --list)"
        )
    return matches[0]


def recipe_names() -> list[str]:
    """The shipped recipes, as paths under configs/ without .yaml (each also loads by its file name)."""
    shipped = recipes_dir()
    return sorted(p.relative_to(shipped).with_suffix("").as_posix() for p in shipped.rglob("*.yaml"))


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
    return deep_merge(_read_yaml_with_bases(path.parent / base, (*seen, path)), data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mappings merged key by key; neither is changed."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
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


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every field whose value differs between two config dicts
    (Config.to_dict), in field order; a field missing on one side counts as changed."""
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "deepspeed":
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def save_resolved(config: Config, path: str | Path) -> Path:
    """Writes the fully resolved config, so that a run can be reproduced from its directory alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    return path
