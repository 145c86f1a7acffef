"""AdamW and global-norm clipping, written once against the backend interface.

The optimizer state is a plain tree of arrays (plus a step count), so it is checkpointed and
moved between backends like the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pntm.backends.base import Backend
from pntm.tree import tree_leaves, tree_map


@dataclass(frozen=True)
class AdamW:
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def init(self, ops: Backend, params: Any) -> dict[str, Any]:
        zeros = tree_map(ops.zeros_like, params)
        return {"step": 0, "m": zeros, "v": tree_map(ops.zeros_like, params)}

    def update(
        self, ops: Backend, params: Any, grads: Any, state: dict[str, Any], lr: float | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """One AdamW step (decoupled weight decay); returns new params and state."""
        lr = self.lr if lr is None else lr
        step = state["step"] + 1
        m = tree_map(lambda m, g: self.beta1 * m + (1 - self.beta1) * g, state["m"], grads)
        v = tree_map(lambda v, g: self.beta2 * v + (1 - self.beta2) * g * g, state["v"], grads)
        c1, c2 = 1 - self.beta1**step, 1 - self.beta2**step

        def apply(p, m, v):
            update = (m / c1) / (ops.sqrt(v / c2) + self.eps)
            return p - lr * (update + self.weight_decay * p)

        return tree_map(apply, params, m, v), {"step": step, "m": m, "v": v}


def clip_by_global_norm(ops: Backend, grads: Any, max_norm: float) -> tuple[Any, float]:
    """Scale ``grads`` so that their joint L2 norm is at most ``max_norm``; returns the norm."""
    total = sum(ops.sum(g * g) for g in tree_leaves(grads))  # on the device: one sync below
    norm = math.sqrt(float(ops.to_numpy(total)))
    if norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        grads = tree_map(lambda g: g * scale, grads)
    return grads, norm
