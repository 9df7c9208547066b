"""Loading configs: YAML files and dotted ``key=value`` overrides onto the schemas, checked
against the annotated types; unknown keys are an error that lists the valid ones."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vitpipe.config.schema import ConfigError, IngestConfig, PretrainConfig


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotated type, converting int->float and scalars in lists."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        last: ConfigError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                last = err
        raise last or ConfigError(f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):  # `key=a,b` on the command line: each part read as a YAML scalar
            value = [yaml.safe_load(part.strip()) for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML turns `size: 16` into an int; a string field still wants it
    raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    kinds = _field_types(cls)
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(prefix + k for k in kinds)}"
        )
    values = {}
    for name, value in data.items():
        kind = kinds[name]
        if dataclasses.is_dataclass(kind):
            values[name] = from_dict(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, prefix + name)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "data.mean=[0.5,0.5,0.5]"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> Any:
    """Dataclass defaults <- ``defaults`` (e.g. an objective's recipe) <- YAML file <- ``extra``
    (from CLI options) <- ``key=value`` overrides."""
    data: dict[str, Any] = merge(defaults or {}, read_yaml(path) if path else {})
    if extra:
        data = merge(data, extra)
    data = merge(data, parse_overrides(overrides or []))
    try:
        return from_dict(cls, data)
    except TypeError as err:  # e.g. a section given as a scalar
        raise ConfigError(str(err)) from None


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> None:
    from vitpipe.atomic import write_text_atomic

    write_text_atomic(Path(path), dump_yaml(config))


CONFIG_KINDS: dict[str, type] = {"pretrain": PretrainConfig, "ingest": IngestConfig}
