"""Task registry: ``get(name)`` and ``TASKS`` (name -> class), in the order of SPEC §6."""

from __future__ import annotations

from pntm.tasks.arithmetic import BinaryAddition, BinaryMultiplication
from pntm.tasks.base import Batch, Task
from pntm.tasks.memorization import AssociativeRecall, Copy, Duplicate, Reverse
from pntm.tasks.state_tracking import CycleNavigation, ModularArithmetic, Parity

__all__ = ["NAMES", "TASKS", "Batch", "Task", "get"]

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        Parity,
        CycleNavigation,
        ModularArithmetic,
        Copy,
        Reverse,
        Duplicate,
        AssociativeRecall,
        BinaryAddition,
        BinaryMultiplication,
    )
}
NAMES: tuple[str, ...] = tuple(TASKS)


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(NAMES)}")
    return TASKS[name]()
