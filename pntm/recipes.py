"""Per-task training recipes: the settings ``pntm train --task NAME`` uses unless told otherwise.

A recipe overrides the defaults of :class:`pntm.train.TrainConfig` and of the P-NTM config for
one task. Every value here was chosen by the experiments logged in ``docs/research-log.md`` and
checked with ``scripts/length_generalization.py`` (``docs/results.md``); ``why`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pntm import tasks
from pntm.models.pntm import PNTMConfig
from pntm.train import TrainConfig

__all__ = ["RECIPES", "Recipe", "get"]


@dataclass(frozen=True)
class Recipe:
    task: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    model: dict[str, Any] = field(default_factory=dict)  # PNTMConfig fields
    why: str = ""

    def __post_init__(self) -> None:
        for what, cls, values in (
            ("training", TrainConfig, self.train),
            ("model", PNTMConfig, self.model),
        ):
            known = {f.name for f in fields(cls)} - {"task", "vocab_size", "seed"}
            unknown = set(values) - known
            if unknown:
                raise ValueError(
                    f"recipe for {self.task!r}: unknown {what} fields {sorted(unknown)}"
                )

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The recipe's training config, with ``overrides`` (``None`` values ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        base = {"task": self.task, "train_length": tasks.get(self.task).default_train_length}
        return TrainConfig(**{**base, **self.train, **given})

    def model_config(self, **overrides: Any) -> PNTMConfig:
        given = {k: v for k, v in overrides.items() if v is not None}
        task = tasks.get(self.task)
        base = {"content": task.needs_content, **self.model}
        return PNTMConfig(vocab_size=task.vocab_size, **{**base, **given})

    def describe(self) -> str:
        """The settings that differ from the global defaults, ``key=value`` separated by
        spaces (``-`` when none)."""
        items = {**self.train, **self.model}
        return " ".join(f"{k}={v}" for k, v in items.items()) or "-"


# A constant-speed head is the discrete machine most tasks need; the velocity prior starts
# training next to it (SPEC §7: it turns cycle navigation and duplicate from 0% into exact).
_VELOCITY = {"velocity_prior": 2.0}

RECIPES: dict[str, Recipe] = {
    r.task: r
    for r in (
        Recipe("parity", model=_VELOCITY, why="velocity prior: seed 2 exact (SPEC §7)"),
        Recipe("cycle_navigation", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("modular_arithmetic", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("copy", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("reverse", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("duplicate", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("associative_recall", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("binary_addition", model=_VELOCITY, why="velocity prior (SPEC §7)"),
        Recipe("binary_multiplication", model=_VELOCITY, why="velocity prior (SPEC §7)"),
    )
}
assert set(RECIPES) == set(tasks.NAMES), "every task needs a recipe"


def get(task: str) -> Recipe:
    tasks.get(task)  # the error for an unknown task names the known ones
    return RECIPES[task]
