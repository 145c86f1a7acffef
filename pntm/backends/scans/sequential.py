"""The two scan primitives as plain loops over time, written against the backend interface.

The ``numpy`` backend runs these in float64 (their hand-written reverse mode is
:mod:`pntm.backends.scans.reference`); framework backends run them with ``scan="sequential"``,
differentiated by their own autodiff: the plain-loop baseline the parallel scans are measured
against (``scripts/bench_scan.py``, ``scripts/bench_kernels.py``).
"""

from __future__ import annotations

import numpy as np

from pntm.backends.base import Array, Backend, home_delta, move_head, read_step

FRAMEWORKS = ("numpy", "torch", "mlx")
DESCRIPTION = "plain loops over time"


def linear_scan(ops: Backend, a: Array, b: Array, h0: Array | None = None) -> Array:
    """``h_t = a_t h_{t-1} + b_t`` along axis 1, one step at a time (``h_0`` zeros if None)."""
    h, out = (ops.zeros_like(b[:, 0]) if h0 is None else h0), []
    for a_t, b_t in zip(ops.unstack(a, 1), ops.unstack(b, 1), strict=True):
        h = a_t * h + b_t
        out.append(h)
    return ops.stack(out, 1)


def head_scan(
    ops: Backend,
    shift: Array,
    gate: Array,
    n_slots: int,
    start: Array | None = None,
    lag: int | tuple[int, ...] = 0,
) -> Array:
    """Every head distribution ``w_t = (1 - g_t) (s_t ⊛ w_{t-1}) + g_t delta_{-lag}`` (B, T, K,
    N), one step at a time in slot space (:func:`pntm.backends.base.move_head`, the step
    form's)."""
    if start is None:
        home = np.broadcast_to(home_delta(n_slots, lag), (*gate.shape[::2], n_slots))
        start = ops.asarray(home.copy())
    position, out = start, []
    for s_t, g_t in zip(ops.unstack(shift, 1), ops.unstack(gate, 1), strict=True):
        position = move_head(ops, position, s_t, g_t, lag)
        out.append(position)
    return ops.stack(out, 1)


def memory_scan_states(
    ops: Backend,
    w: Array,
    erase: Array,
    add: Array,
    rho: Array,
    m0: Array | None = None,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
) -> tuple[Array, list[Array]]:
    """Every read ``r_t`` (B, T, K, D) and every state ``[M_0, ..., M_T]``."""
    memory = ops.zeros_like(w[:, 0, ..., None] * add[:, 0, :, None, :]) if m0 is None else m0
    T = w.shape[1]
    steps = [
        ops.unstack(x, 1) if x is not None else [None] * T
        for x in (w, erase, add, rho, key, beta, gamma)
    ]
    states, reads = [memory], []
    for w_t, e_t, a_t, rho_t, key_t, beta_t, gamma_t in zip(*steps, strict=True):
        memory = ops.decay_write(memory, w_t, e_t, a_t)
        reads.append(read_step(ops, memory, rho_t, key_t, beta_t, gamma_t))
        states.append(memory)
    return ops.stack(reads, 1), states


def memory_scan_read(
    ops: Backend,
    w: Array,
    erase: Array,
    add: Array,
    rho: Array,
    m0: Array,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
) -> tuple[Array, Array]:
    """Reads ``r`` (B, T, K, D) and the final memory (B, K, N, D)."""
    reads, states = memory_scan_states(ops, w, erase, add, rho, m0, key, beta, gamma)
    return reads, states[-1]
