"""Mapping nested dicts (YAML) onto config dataclasses: type coercion, unknown keys with a did-you-mean hint.

Standard library only: this module ships inside remote-code Hugging Face exports with the model config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the field."""


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """An instance of the dataclass `cls` from `values` (coerced to the field types, unknown keys
    rejected; not validated). `prefix` is the section name used in messages, e.g. "model"."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(values, fields, prefix=prefix + ".")
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
        return [_coerce(v, item_type, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            return value  # the section's validate() says what the mapping should hold
        _, value_type = typing.get_args(hint)
        return {k: _coerce(v, value_type, f"{dotted}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):  # a list of sections, e.g. data.sources
        if isinstance(value, hint):
            return value
        return build(hint, value, dotted)
    if origin in (typing.Union, types.UnionType):
        # an optional section (e.g. model.vision: VisionConfig | None) is built when it is given
        sections = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if value is not None and len(sections) == 1 and type(None) in typing.get_args(hint):
            return _coerce(value, sections[0], dotted)
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


def reject_unknown(values: dict[str, Any], known: dict[str, Any], prefix: str) -> None:
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key}{suggest(key, known, prefix)}")


def suggest(word: str, options: Any, prefix: str = "") -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def positive(section: Any, name: str, *fields: str) -> None:
    """Every named field of `section` is >= 1 (`name` is the section's name in messages)."""
    for f in fields:
        value = getattr(section, f)
        if value < 1:
            raise ConfigError(f"{name}.{f}={value} must be >= 1")
