"""A sweep: many configurations of the one config tree, from a grid or a seeded random sample.

A spec names fields by their path in the tree (``train.learning_rate``) and is refused, before
any work, when a path is not a field or a value is not allowed there, naming both.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from faceflow.config import DataConfig, FaceflowConfig


class SpecError(ValueError):
    """A sweep spec that cannot be expanded into valid configurations."""


class RandomRange(BaseModel):
    """A number drawn uniformly from [low, high], or log-uniformly with ``log``; an int if both ends are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> RandomRange:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low}")
        return self


class RandomSearch(BaseModel):
    """``samples`` configurations, each field drawn from its choices or range with ``seed``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(4, ge=1, le=1000, description="Configurations to draw.")
    seed: int = Field(0, ge=0, description="Seed of the draws.")
    fields: dict[str, list[Any] | RandomRange] = Field(
        default_factory=dict, description="Field path -> a list of choices, or a {low, high, log} range."
    )


# Sweeps compare validation log p, so their runs keep validation faces (a tenth of them).
SWEEP_BASE = {"data": {"validation_fraction": 0.1}}


class SweepSpec(BaseModel):
    """What to sweep: a base configuration, then a grid (every combination) and/or a random search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: dict[str, Any] = Field(
        default_factory=lambda: dict(SWEEP_BASE),
        description="Config tree values every configuration starts from (nested, as in show-config's output).",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Field path (e.g. train.learning_rate) -> values; every combination is run."
    )
    random: RandomSearch | None = Field(None, description="Configurations drawn at random, after the grid's.")


def _set(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with the dotted ``path`` set to ``value``."""
    head, _, rest = path.partition(".")
    copied = dict(tree)
    copied[head] = _set(copied.get(head, {}), rest, value) if rest else value
    return copied


def _field_paths(model: type[BaseModel] = FaceflowConfig, prefix: str = "") -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _field_paths(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def _draw(choice: list[Any] | RandomRange, rng: np.random.Generator) -> Any:
    if isinstance(choice, list):
        return choice[int(rng.integers(len(choice)))]
    value = math.exp(rng.uniform(math.log(choice.low), math.log(choice.high))) if choice.log else rng.uniform(choice.low, choice.high)
    return round(value) if float(choice.low).is_integer() and float(choice.high).is_integer() and not choice.log else float(value)


def varied_values(spec: SweepSpec) -> list[dict[str, Any]]:
    """Each configuration's swept values, field path -> value: the grid's combinations, then the random draws."""
    known = _field_paths()
    named = list(spec.grid) + (list(spec.random.fields) if spec.random else [])
    unknown = sorted(set(named) - known)
    if unknown:
        raise SpecError(f"sweep spec names {', '.join(unknown)}: not fields of the config tree (see faceflow show-config)")
    combos = [dict(zip(spec.grid, values, strict=True)) for values in itertools.product(*spec.grid.values())] if spec.grid else []
    if spec.random is not None:
        rng = np.random.default_rng(spec.random.seed)
        combos += [{path: _draw(choice, rng) for path, choice in spec.random.fields.items()} for _ in range(spec.random.samples)]
    return combos or [{}]


def expand(spec: SweepSpec) -> list[tuple[dict[str, Any], FaceflowConfig]]:
    """(swept values, validated configuration) for every configuration of the sweep; refuses bad ones by field."""
    configs = []
    for number, values in enumerate(varied_values(spec), start=1):
        tree = dict(spec.base)
        for path, value in values.items():
            tree = _set(tree, path, value)
        try:
            configs.append((values, FaceflowConfig.model_validate(tree)))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in problem['loc']) or 'config'}: {problem['msg']}" for problem in error.errors()
            )
            raise SpecError(f"sweep configuration {number} ({values or 'the base'}) is invalid: {problems}") from None
    if not any(config.data.validation_fraction for _, config in configs):
        raise SpecError(f"a sweep ranks by validation log p: set base.data.validation_fraction above 0 (now {DataConfig().validation_fraction})")
    return configs


def read_spec(path: Path) -> SweepSpec:
    """A spec from a YAML or JSON file; every problem names the file."""
    name = repr(str(path))
    if not path.is_file():
        raise SpecError(f"sweep spec {name} does not exist or is not a file")
    try:
        loaded = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise SpecError(f"sweep spec {name} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    try:
        return SweepSpec.model_validate(loaded or {})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in problem['loc']) or 'spec'}: {problem['msg']}" for problem in error.errors())
        raise SpecError(f"sweep spec {name}: {problems}") from None
