"""Config dataclasses from plain dicts (JSON in checkpoints), refusing keys they do not know."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], data: dict[str, Any], what: str) -> ConfigT:
    """``cls(**data)``, with a clear error naming unknown keys (``what`` names the config)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)
