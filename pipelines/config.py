"""Load stage configs: frozen dataclass defaults, overridden by a TOML file's section."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any, TypeVar

from schemas.errors import UserError

T = TypeVar("T")


def load_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def section(doc: dict[str, Any], dotted: str) -> dict[str, Any]:
    node: Any = doc
    for part in dotted.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Instantiate a frozen config dataclass from a TOML table, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in fields and not isinstance(values[k], dict))
    if unknown:
        raise UserError(f"unknown setting(s) {unknown} in [{where}]; known: {sorted(fields)}")
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            continue
        if isinstance(v, list):  # TOML arrays → tuples (configs are frozen and hashable)
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad setting in [{where}]: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
