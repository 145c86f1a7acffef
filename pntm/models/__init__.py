"""Model registry: name -> model class (the contract is :class:`pntm.models.base.Model`).

Every model is written once against the backend interface; its parameters are a nested dict of
NumPy arrays from ``init_params(config, seed)``, so checkpoints move between backends.
"""

from __future__ import annotations

from pntm.models.base import Model, ModelConfig
from pntm.models.lstm import LSTM
from pntm.models.ntm import NTM
from pntm.models.pntm import PNTM
from pntm.models.transformer import Transformer

__all__ = ["MODELS", "NAMES", "Model", "ModelConfig", "get"]

MODELS: dict[str, type[Model]] = {cls.name: cls for cls in (PNTM, NTM, LSTM, Transformer)}
NAMES: tuple[str, ...] = tuple(MODELS)


def get(name: str) -> type[Model]:
    """The model class called ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(NAMES)}")
    return MODELS[name]
