"""The framework parallel path (SPEC §4.2), written once against the backend interface.

Used by the MLX and PyTorch backends, which only wire :func:`memory_scan_forward` and
:func:`memory_scan_backward` into their autodiff as one operation with its own backward.

* :func:`chunked_linear_scan` — ``h_t = a_t h_{t-1} + b_t``: a Hillis–Steele scan inside chunks
  of ``LINEAR_CHUNK`` steps, then the same scan, recursively, over the chunk-end states, and a
  final ``h = H_local + A_local * carry``. Only products and sums: exact where ``a = 0`` (a reset
  gate of 1, a zero of a shift spectrum), no logarithm, no division, and since ``|a| <= 1`` in
  P-NTM nothing can overflow. Works on complex arrays (the head recurrence in Fourier space).
  Framework autodiff differentiates it; its tensors are ``O(B T K N)``, small.

* :func:`memory_scan_forward` / :func:`memory_scan_backward` — the memory recurrence with its
  reads, whose states are ``N x D`` per head and step and must never all be kept. Time is cut into
  ``C`` chunks of ``L`` steps (``L ~ sqrt(T)``) and the work is vectorized *across* chunks:

  1. one pass over the ``L`` in-chunk positions, all chunks at once, gives each chunk's summary:
     the product ``P_c`` of its decays and its state ``Mloc_c`` started from zero;
  2. a linear scan over the ``C`` chunk summaries gives the true state at each chunk start;
  3. a second pass recomputes the states from those starts and reads them.

  Only the ``C`` chunk-start states (and ``P_c``) are saved for the backward, which recomputes
  the states inside chunks (in groups of chunks, bounded by ``max_group_elements``), runs the
  reverse recurrence ``G_t = (read gradient)_t + F_{t+1} ⊙ G_{t+1}`` with the same two-level
  scheme, and applies SPEC §4.3. Python-level steps: about ``2 L`` forward, ``3 L`` backward.
"""

from __future__ import annotations

import math
from typing import Any

from pntm.backends.base import Array, Backend, read_step, read_step_vjp

LINEAR_CHUNK = 64
#: elements of recomputed memory states one backward group may hold (float32: 4 bytes each)
MAX_GROUP_ELEMENTS = 1 << 26


def _along(axis: int, sl: slice) -> tuple:
    return (slice(None),) * axis + (sl,)


# ---------------------------------------------------------------------- linear scan


def _hillis_steele(ops: Backend, a: Array, b: Array, axis: int) -> tuple[Array, Array]:
    """Inclusive scan of the pairs ``(a, b)`` along ``axis``; returns (prod a, h)."""
    n = a.shape[axis]
    step = 1
    while step < n:
        head, hi, lo = _along(axis, slice(None, step)), _along(axis, slice(step, None)), _along(
            axis, slice(None, -step)
        )
        b = ops.concat([b[head], a[hi] * b[lo] + b[hi]], axis)
        a = ops.concat([a[head], a[hi] * a[lo]], axis)
        step *= 2
    return a, b


def _scan_pairs(ops: Backend, a: Array, b: Array, chunk: int) -> Array:
    T = b.shape[1]
    if T <= chunk:
        return _hillis_steele(ops, a, b, 1)[1]
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    if pad:
        a = ops.concat([a, ops.ones_like(a[:, :pad])], 1)
        b = ops.concat([b, ops.zeros_like(b[:, :pad])], 1)
    batch, rest = b.shape[0], tuple(b.shape[2:])
    a = ops.reshape(a, (batch, n_chunks, chunk, *rest))
    b = ops.reshape(b, (batch, n_chunks, chunk, *rest))
    prod_a, local = _hillis_steele(ops, a, b, 2)
    ends = _scan_pairs(ops, prod_a[:, :, -1], local[:, :, -1], chunk)
    carry = ops.concat([ops.zeros_like(ends[:, :1]), ends[:, :-1]], 1)
    h = local + prod_a * carry[:, :, None]
    return ops.reshape(h, (batch, n_chunks * chunk, *rest))[:, :T]


def chunked_linear_scan(
    ops: Backend, a: Array, b: Array, h0: Array | None = None, chunk: int = LINEAR_CHUNK
) -> Array:
    """``h_t = a_t h_{t-1} + b_t`` along axis 1 (see the module docstring)."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"linear_scan needs a and b of one shape, got {a.shape} and {b.shape}")
    if h0 is not None:  # fold the initial state into the first input
        b = ops.concat([(a[:, 0] * h0 + b[:, 0])[:, None], b[:, 1:]], 1)
    return _scan_pairs(ops, a, b, chunk)


# ---------------------------------------------------------------------- memory scan with reads


def memory_chunk_len(T: int) -> int:
    """In-chunk length ``L``: ``~sqrt(T)`` balances the two passes against the chunk count."""
    return max(1, math.isqrt(max(T - 1, 0)) + 1)


class _Chunked:
    """The per-step inputs padded to ``C * L`` steps and viewed as ``(B, C, L, ...)``."""

    def __init__(self, ops: Backend, chunk_len: int, **inputs: Array | None) -> None:
        T = next(x for x in inputs.values() if x is not None).shape[1]
        self.T, self.L = T, chunk_len
        self.C = -(-T // chunk_len)
        pad = self.C * chunk_len - T
        self.x: dict[str, Any] = {}
        for name, x in inputs.items():
            if x is None:
                self.x[name] = None
                continue
            if pad:  # w = 0 on padded steps: decay 1 and no write, so the state passes through
                x = ops.concat([x] + [ops.zeros_like(x[:, :1])] * pad, 1)
            self.x[name] = ops.reshape(x, (x.shape[0], self.C, chunk_len, *x.shape[2:]))

    def at(self, name: str, l: int, chunks: slice = slice(None)) -> Array | None:
        x = self.x[name]
        return None if x is None else x[:, chunks, l]

    def content(self, l: int, chunks: slice = slice(None)):
        return tuple(self.at(n, l, chunks) for n in ("key", "beta", "gamma"))

    def unchunk(self, ops: Backend, per_step: list[Array]) -> Array:
        """Stack ``L`` arrays of shape (B, C, ...) to (B, T, ...)."""
        x = ops.stack(per_step, 2)
        return ops.reshape(x, (x.shape[0], self.C * self.L, *x.shape[3:]))[:, : self.T]


def _decay(w_l: Array, e_l: Array) -> Array:
    return 1 - w_l[..., None] * e_l[..., None, :]


def _write(w_l: Array, a_l: Array) -> Array:
    return w_l[..., None] * a_l[..., None, :]


def memory_scan_forward(
    ops: Backend,
    w: Array,
    erase: Array,
    add: Array,
    rho: Array,
    m0: Array,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
    chunk_len: int | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Reads ``r`` (B, T, K, D), final state, and what the backward keeps: the chunk-start
    states and the per-chunk decay products, both (B, C, K, N, D)."""
    L = min(chunk_len or memory_chunk_len(w.shape[1]), w.shape[1])
    x = _Chunked(ops, L, w=w, erase=erase, add=add, rho=rho, key=key, beta=beta, gamma=gamma)
    if x.C > 1:
        prod = local = None
        for l in range(L):
            decay = _decay(x.at("w", l), x.at("erase", l))
            write = _write(x.at("w", l), x.at("add", l))
            local = write if local is None else decay * local + write
            prod = decay if prod is None else decay * prod
        ends = chunked_linear_scan(ops, prod, local, m0)
        starts = ops.concat([m0[:, None], ends[:, :-1]], 1)
    else:
        starts = m0[:, None]
        prod = ops.ones_like(starts)
    memory, reads = starts, []
    for l in range(L):
        memory = _decay(x.at("w", l), x.at("erase", l)) * memory + _write(
            x.at("w", l), x.at("add", l)
        )
        reads.append(read_step(ops, memory, x.at("rho", l), *x.content(l)))
    return x.unchunk(ops, reads), memory[:, -1], starts, prod


def memory_scan_backward(
    ops: Backend,
    w: Array,
    erase: Array,
    add: Array,
    rho: Array,
    starts: Array,
    prod: Array,
    d_read: Array,
    d_final: Array | None,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
    chunk_len: int | None = None,
    max_group_elements: int = MAX_GROUP_ELEMENTS,
) -> dict[str, Array | None]:
    """Gradients of :func:`memory_scan_forward`'s ``(r, M_T)`` for cotangents
    ``(d_read, d_final)``: a dict with ``w, erase, add, rho, m0`` (and ``key, beta, gamma``)."""
    L = min(chunk_len or memory_chunk_len(w.shape[1]), w.shape[1])
    x = _Chunked(
        ops, L, w=w, erase=erase, add=add, rho=rho, key=key, beta=beta, gamma=gamma, d_read=d_read
    )
    batch, C = starts.shape[0], x.C
    per_chunk = batch * L * int(math.prod(starts.shape[2:]))
    group = max(1, min(C, max_group_elements // max(per_chunk, 1)))
    names = ["w", "erase", "add", "rho"] + (["key", "beta", "gamma"] if key is not None else [])
    pieces: dict[str, list[Array]] = {n: [] for n in names}
    carry = ops.zeros_like(starts[:, 0]) if d_final is None else d_final  # dL/dM at group end
    for c1 in range(C, 0, -group):
        c0 = max(0, c1 - group)
        chunks = slice(c0, c1)

        def step(l: int, chunks: slice = chunks):
            return x.at("w", l, chunks), x.at("erase", l, chunks), x.at("add", l, chunks)

        # states inside the group's chunks, recomputed from the saved chunk starts
        states = [starts[:, chunks]]
        for l in range(L):
            w_l, e_l, a_l = step(l)
            states.append(_decay(w_l, e_l) * states[-1] + _write(w_l, a_l))

        def read_grads(l: int, chunks: slice = chunks, states: list = states):
            return read_step_vjp(
                ops, states[l + 1], x.at("rho", l, chunks), x.at("d_read", l, chunks),
                *x.content(l, chunks),
            )

        # dL/dM at the end of each chunk of the group, arriving from later chunks
        if c1 - c0 > 1:
            local = None  # reverse pass with no carry-in: what each chunk sends to its start
            for l in reversed(range(L)):
                w_l, e_l, _ = step(l)
                injected = read_grads(l)[0]
                local = _decay(w_l, e_l) * (injected if local is None else local + injected)
            back = chunked_linear_scan(
                ops, ops.flip(prod[:, c0 + 1 : c1], 1), ops.flip(local[:, 1:], 1), carry
            )
            ends = ops.flip(ops.concat([carry[:, None], back], 1), 1)
        else:
            ends = carry[:, None]

        g = ends
        grads: dict[str, list[Array]] = {n: [] for n in names}
        for l in reversed(range(L)):
            w_l, e_l, a_l = step(l)
            d_mem, d_rho, d_key, d_beta, d_gamma = read_grads(l)
            g = g + d_mem  # G_t
            g_prev = g * states[l]
            grads["w"].append(
                ops.matmul(g, a_l[..., None])[..., 0] - ops.matmul(g_prev, e_l[..., None])[..., 0]
            )
            grads["erase"].append(-ops.matmul(w_l[..., None, :], g_prev)[..., 0, :])
            grads["add"].append(ops.matmul(w_l[..., None, :], g)[..., 0, :])
            grads["rho"].append(d_rho)
            if key is not None:
                grads["key"].append(d_key)
                grads["beta"].append(d_beta)
                grads["gamma"].append(d_gamma)
            g = _decay(w_l, e_l) * g
        carry = g[:, 0]
        for n in names:
            pieces[n].append(ops.stack(grads[n][::-1], 2))
    out: dict[str, Array | None] = {}
    for n in names:
        full = ops.concat(pieces[n][::-1], 1) if len(pieces[n]) > 1 else pieces[n][0]
        out[n] = ops.reshape(full, (batch, C * L, *full.shape[3:]))[:, : x.T]
    out["m0"] = carry
    return out
