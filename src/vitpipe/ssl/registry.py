"""Objective names -> their specs. An objective registers through the ``vitpipe.objectives``
entry-point group (``name = "module:SPEC"`` in its package's pyproject.toml), so installing a
package adds `vitpipe pretrain NAME` with no change to vitpipe; vitpipe's own objectives are
declared there too (and registered from ``BUILT_IN`` when vitpipe runs from a source tree
without its installed metadata).

Everything that builds an objective or reads a run's config goes through here, so a run is
always rebuilt the way its own objective says, never from ``config.model`` by hand.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from vitpipe.config import ConfigError, PretrainConfig, from_dict, load_config, read_yaml, with_section
from vitpipe.ssl.objective import Objective, ObjectiveSpec

GROUP = "vitpipe.objectives"
BUILT_IN = {name: f"vitpipe.ssl.objectives.{name}.objective:SPEC"
            for name in ("mae", "jepa", "clip", "igpt", "classify", "dino")}
OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Make ``spec`` known to every command (also usable from outside the package)."""
    if (spec.section is None) != (spec.section_type is None):
        raise ValueError(f"objective {spec.name}: section and section_type go together")
    OBJECTIVES[spec.name] = spec
    return spec


def discover() -> None:
    """Register vitpipe's objectives, then every installed one. A third-party entry point that fails
    to load, is not an ``ObjectiveSpec`` of its own name, or takes a built-in's name is left out
    with one ``warning:`` line on stderr: one broken plugin must not stop every command."""
    for name, target in BUILT_IN.items():
        register(EntryPoint(name, target, GROUP).load())
    for point in entry_points(group=GROUP):
        if point.name in BUILT_IN:
            if point.value != BUILT_IN[point.name]:
                print(f"warning: objective plugin {point.name!r} ({point.value}) takes a built-in name; ignored",
                      file=sys.stderr)
            continue
        try:
            spec = point.load()
            if not isinstance(spec, ObjectiveSpec) or spec.name != point.name:
                raise TypeError(f"{point.value} is not an ObjectiveSpec named {point.name!r}")
            register(spec)
        except Exception as err:  # noqa: BLE001 - any failure of someone else's package
            print(f"warning: objective plugin {point.name!r} could not be loaded ({err.__class__.__name__}: {err})",
                  file=sys.stderr)


discover()


def get(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def config_class(name: str) -> type:
    """The config dataclass of objective ``name``: shared sections + its own."""
    spec = get(name)
    return with_section(spec.name, spec.section, spec.section_type)


def pretrain_config(name: str, path: str | Path | None = None, overrides: list[str] | None = None,
                    extra: dict[str, Any] | None = None) -> PretrainConfig:
    """Defaults <- the objective's recipe <- YAML <- CLI options <- ``key=value``."""
    return load_config(config_class(name), path, overrides, {**(extra or {}), "objective": name},
                       defaults=get(name).defaults)


def run_config(path: str | Path) -> PretrainConfig:
    """A saved, resolved config (RUN/config.yaml), rebuilt with its own objective's schema."""
    data = read_yaml(path)
    name = data.get("objective", "mae")
    spec = get(name)
    known = {"objective", "data", "model", "optim", "train", spec.section}
    if spec.section and isinstance(data.get(spec.section), dict):
        data[spec.section] = {spec.renamed.get(key, key): value for key, value in data[spec.section].items()}
    try:
        return from_dict(config_class(name), {k: v for k, v in data.items() if k in known or k not in _sections()})
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None


def _sections() -> set[str]:
    """Every registered objective's section name: a run config written before sections were
    per objective carries the others' too, which are dropped on reading."""
    return {spec.section for spec in OBJECTIVES.values() if spec.section}


def build_objective(config: PretrainConfig, artifacts: dict[str, bytes] | None = None) -> Objective:
    spec = get(config.objective)
    try:
        return spec.build(config, artifacts or {})
    except ValueError as err:  # shape mismatches found while building (e.g. image vs patch size)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
