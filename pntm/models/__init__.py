"""Model registry: name -> (config class, model class, parameter initialiser).

Every model is written once against the backend interface; its parameters are a nested dict of
NumPy arrays from ``init(config, seed)``, so checkpoints move between backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pntm.models.pntm import PNTM, PNTMConfig, init_params

__all__ = ["MODELS", "NAMES", "ModelSpec", "get"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_class: type
    model_class: type
    init: Callable[[Any, int], dict[str, Any]]
    description: str


MODELS: dict[str, ModelSpec] = {
    "pntm": ModelSpec(
        "pntm", PNTMConfig, PNTM, init_params, "Parallelizable Neural Turing Machine"
    ),
}
NAMES: tuple[str, ...] = tuple(MODELS)


def get(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(NAMES)}")
    return MODELS[name]
