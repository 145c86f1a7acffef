"""The framework parallel path (SPEC §4.2): chunked scans in framework operations, written once
against the backend interface (the ``mlx`` and ``torch`` backends).

Each scan is one differentiable operation with its own backward (``Backend.custom_vjp``: an
``mx.custom_function`` on MLX, a ``torch.autograd.Function`` on PyTorch).

Both scans, ``h_t = a_t h_{t-1} + b_t`` (:func:`scan_forward`) and the memory recurrence with
its reads (:func:`memory_scan_forward`), use one two-level scheme. Time is cut into ``C`` chunks
of ``L ~ sqrt(T)`` steps and the work is vectorized *across* chunks:

1. one pass over the ``L`` in-chunk positions, all chunks at once, gives each chunk's summary:
   the product of its decays and its state started from zero;
2. the same scan over the ``C`` summaries (recursively) gives the true state at each chunk start;
3. a second pass recomputes the states from those starts (and, for the memory, reads them).

Only products and sums appear: exact where ``a = 0`` (a reset gate of 1, a zero of a shift
spectrum, an erase-times-weight of 1), no logarithm, no division, and with ``|a| <= 1`` nothing
can overflow, so the scans hold at any length. Complex inputs work unchanged (the head recurrence
runs in Fourier space). About ``3 sqrt(T)`` Python-level steps instead of ``T``.

The backward of the linear scan is the same scan run backwards in time. The memory scan keeps
only the ``C`` chunk-start states (and the per-chunk decay products) for its backward, which
recomputes the states inside chunks (in groups of chunks bounded by ``max_group_elements``), runs
``G_t = (read gradient)_t + F_{t+1} ⊙ G_{t+1}`` with the same two-level scheme and applies
SPEC §4.3: peak memory is one group of states, never ``O(T N D log T)``.
"""

from __future__ import annotations

import math

from pntm.backends.base import Array, Backend, read_step, read_step_vjp

FRAMEWORKS = ("torch", "mlx", "numpy")
DESCRIPTION = "chunked parallel scans in framework operations"

#: elements of recomputed memory states one backward group may hold (float32: 4 bytes each)
MAX_GROUP_ELEMENTS = 1 << 26
#: on a CPU, per-step work (elements) worth one Python-level step: chunks are added only until
#: each step touches about this much, since more chunks cost extra passes and cache misses
CPU_STEP_ELEMENTS = 1 << 15


# ---------------------------------------------------------------------- linear scan


def chunk_len(T: int, step_elements: int = 1, target_step_elements: int | None = None) -> int:
    """In-chunk length ``L``.

    ``L ~ sqrt(T)`` balances the Python-level steps of the two in-chunk passes against the
    chunk count: right where every step is cheap to launch many of (GPUs). With
    ``target_step_elements`` (CPUs), use only as many chunks as it takes for one step over all
    chunks to touch that many elements (``step_elements`` per chunk): one chunk skips the
    summary pass altogether.
    """
    sqrt_len = max(1, math.isqrt(max(T - 1, 0)) + 1)
    if target_step_elements is None:
        return sqrt_len
    max_chunks = -(-T // sqrt_len)
    chunks = min(max_chunks, max(1, -(-target_step_elements // max(step_elements, 1))))
    return -(-T // chunks)


def _chunk(ops: Backend, x: Array, L: int) -> Array:
    """(B, T, ...) -> (B, C, L, ...), zero-padded at the end of time to ``C * L`` steps."""
    T = x.shape[1]
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    if pad:
        x = ops.concat([x] + [ops.zeros_like(x[:, :1])] * pad, 1)
    return ops.reshape(x, (x.shape[0], n_chunks, L, *x.shape[2:]))


def _unchunk(ops: Backend, per_step: list[Array], T: int) -> Array:
    """``L`` arrays (B, C, ...) -> (B, T, ...)."""
    x = ops.stack(per_step, 2)
    return ops.reshape(x, (x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]))[:, :T]


def _chunk_summaries(steps) -> tuple[Array, Array]:
    """Fold ``(a_l, b_l)`` over a chunk: the decay product and the state started from zero."""
    prod = local = None
    for a_l, b_l in steps:
        local = b_l if local is None else a_l * local + b_l
        prod = a_l if prod is None else a_l * prod
    return prod, local


def scan_forward(
    ops: Backend, a: Array, b: Array, h0: Array | None = None, chunk: int | None = None
) -> Array:
    """``h_t = a_t h_{t-1} + b_t`` along axis 1, as plain array operations (no autodiff).

    Chunk summaries in one pass over in-chunk positions (all chunks at once), the chunk-start
    states by the same scan over the summaries (recursively), then a second pass.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"linear_scan needs a and b of one shape, got {a.shape} and {b.shape}")
    T = b.shape[1]
    L = min(chunk or chunk_len(T), T)
    a_c, b_c = _chunk(ops, a, L), _chunk(ops, b, L)
    first = ops.zeros_like(b[:, 0]) if h0 is None else h0
    if a_c.shape[1] > 1:
        prod, local = _chunk_summaries((a_c[:, :, l], b_c[:, :, l]) for l in range(L))
        ends = scan_forward(ops, prod, local, first)
        starts = ops.concat([first[:, None], ends[:, :-1]], 1)
    else:
        starts = first[:, None]
    h, out = starts, []
    for l in range(L):
        h = a_c[:, :, l] * h + b_c[:, :, l]
        out.append(h)
    return _unchunk(ops, out, T)


def scan_backward(
    ops: Backend, a: Array, h: Array, h0: Array | None, d_h: Array, chunk: int | None = None
) -> tuple[Array, Array, Array]:
    """Gradients ``(da, db, dh0)`` of :func:`scan_forward` for the cotangent ``d_h``.

    ``g_t = d_h_t + conj(a_{t+1}) g_{t+1}`` is the same scan run backwards in time; then
    ``db = g``, ``da_t = g_t conj(h_{t-1})``, ``dh0 = conj(a_1) g_1`` (cotangents of complex
    values are ``dL/dRe + i dL/dIm``, the convention of both PyTorch and MLX).
    """
    a_next = ops.concat([ops.conj(a[:, 1:]), ops.zeros_like(a[:, :1])], 1)
    g = ops.flip(scan_forward(ops, ops.flip(a_next, 1), ops.flip(d_h, 1), chunk=chunk), 1)
    first = ops.zeros_like(h[:, :1]) if h0 is None else h0[:, None]
    prev = ops.concat([first, h[:, :-1]], 1)
    return g * ops.conj(prev), g, ops.conj(a[:, 0]) * g[:, 0]


# ---------------------------------------------------------------------- memory scan with reads


class _Chunked:
    """Per-step inputs cut into (B, C, L, ...) chunks (see :func:`_chunk`), kept as ``L``
    arrays (B, C, ...) so that a step costs no indexing."""

    def __init__(self, ops: Backend, L: int, **inputs: Array | None) -> None:
        self.T, self.L = next(x for x in inputs.values() if x is not None).shape[1], L
        self.x = {
            n: None if x is None else ops.unstack(_chunk(ops, x, L), 2) for n, x in inputs.items()
        }
        self.C = -(-self.T // L)

    def at(self, name: str, l: int, chunks: slice = slice(None)) -> Array | None:
        x = self.x[name]
        if x is None:
            return None
        return x[l] if chunks == slice(None) else x[l][:, chunks]

    def content(self, l: int, chunks: slice = slice(None)):
        return tuple(self.at(n, l, chunks) for n in ("key", "beta", "gamma"))


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
    chunk: int | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Reads ``r`` (B, T, K, D), final state, and what the backward keeps: the chunk-start
    states and the per-chunk decay products, both (B, C, K, N, D)."""
    L = min(chunk or chunk_len(w.shape[1]), w.shape[1])
    x = _Chunked(ops, L, w=w, erase=erase, add=add, rho=rho, key=key, beta=beta, gamma=gamma)
    if x.C > 1:  # w = 0 on the padded steps: decay 1, no write
        w_0 = x.at("w", 0)[..., None]
        ones = ops.ones_like(w_0 * x.at("add", 0)[..., None, :])
        prod, local = _chunk_summaries(
            (
                ops.decay_mul(ones, x.at("w", l), x.at("erase", l)),
                x.at("w", l)[..., None] * x.at("add", l)[..., None, :],
            )
            for l in range(L)
        )
        ends = scan_forward(ops, prod, local, m0)
        starts = ops.concat([m0[:, None], ends[:, :-1]], 1)
    else:
        starts = m0[:, None]
        prod = ops.ones_like(starts)
    memory, reads = starts, []
    for l in range(L):
        memory = ops.decay_write(memory, x.at("w", l), x.at("erase", l), x.at("add", l))
        reads.append(read_step(ops, memory, x.at("rho", l), *x.content(l)))
    return _unchunk(ops, reads, x.T), memory[:, -1], starts, prod


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
    chunk: int | None = None,
    max_group_elements: int = MAX_GROUP_ELEMENTS,
) -> dict[str, Array | None]:
    """Gradients of :func:`memory_scan_forward`'s ``(r, M_T)`` for cotangents
    ``(d_read, d_final)``: a dict with ``w, erase, add, rho, m0`` (and ``key, beta, gamma``)."""
    L = min(chunk or chunk_len(w.shape[1]), w.shape[1])
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
            states.append(ops.decay_write(states[-1], w_l, e_l, a_l))

        def inject(g: Array | None, l: int, chunks: slice = chunks, states: list = states):
            """Add the read's gradient at step l to ``g`` (dL/dM_l); the other read grads."""
            rho_l, d_read_l = x.at("rho", l, chunks), x.at("d_read", l, chunks)
            if key is None:  # location reads: dM += rho dr^T, fused
                d_rho = ops.matmul(states[l + 1], d_read_l[..., None])[..., 0]
                g = (
                    rho_l[..., None] * d_read_l[..., None, :]
                    if g is None
                    else ops.outer_add(g, rho_l, d_read_l)
                )
                return g, (d_rho, None, None, None)
            d_mem, *rest = read_step_vjp(ops, states[l + 1], rho_l, d_read_l, *x.content(l, chunks))
            return (d_mem if g is None else g + d_mem), rest

        # dL/dM at the end of each chunk of the group, arriving from later chunks
        if c1 - c0 > 1:
            local = None  # reverse pass with no carry-in: what each chunk sends to its start
            for l in reversed(range(L)):
                w_l, e_l, _ = step(l)
                local = ops.decay_mul(inject(local, l)[0], w_l, e_l)
            back = scan_forward(
                ops, ops.flip(prod[:, c0 + 1 : c1], 1), ops.flip(local[:, 1:], 1), carry
            )
            ends = ops.flip(ops.concat([carry[:, None], back], 1), 1)
        else:
            ends = carry[:, None]

        g = ends
        grads: dict[str, list[Array]] = {n: [] for n in names}
        for l in reversed(range(L)):
            w_l, e_l, a_l = step(l)
            g, (d_rho, d_key, d_beta, d_gamma) = inject(g, l)  # G_t
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
            g = ops.decay_mul(g, w_l, e_l)
        carry = g[:, 0]
        for n in names:
            pieces[n].append(ops.stack(grads[n][::-1], 2))
    out: dict[str, Array | None] = {}
    for n in names:
        full = ops.concat(pieces[n][::-1], 1) if len(pieces[n]) > 1 else pieces[n][0]
        out[n] = ops.reshape(full, (batch, C * L, *full.shape[3:]))[:, : x.T]
    out["m0"] = carry
    return out


# ---------------------------------------------------------------------- the two primitives


def _chunk_for(ops: Backend, shape) -> int:
    """CPUs want few, cache-sized chunks; accelerators as many as the sqrt(T) rule allows."""
    per_step = shape[0] * math.prod(shape[2:])
    return chunk_len(shape[1], per_step, CPU_STEP_ELEMENTS if ops.on_cpu else None)


def linear_scan(ops: Backend, a: Array, b: Array, h0: Array) -> Array:
    """:func:`scan_forward` as one operation whose backward is :func:`scan_backward`."""
    op = ops.custom_vjp(_linear_forward, _linear_backward, 1, chunk=_chunk_for(ops, b.shape))
    return op(a, b, h0)


def _linear_forward(ops, a, b, h0, *, chunk):
    h = scan_forward(ops, a, b, h0, chunk)
    return h, h  # the output, and the residual the backward needs


def _linear_backward(ops, inputs, residuals, cotangents, *, chunk):
    a, _, h0 = inputs
    return scan_backward(ops, a, residuals[0], h0, cotangents[0], chunk)


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
    """:func:`memory_scan_forward` as one operation whose backward is
    :func:`memory_scan_backward`: only the chunk-start states are kept between the two."""
    chunk = _chunk_for(ops, (*w.shape, add.shape[-1]))
    op = ops.custom_vjp(_memory_forward, _memory_backward, 2, chunk=chunk)
    return op(w, erase, add, rho, m0, key, beta, gamma)


def _memory_forward(ops, w, erase, add, rho, m0, key, beta, gamma, *, chunk):
    return memory_scan_forward(ops, w, erase, add, rho, m0, key, beta, gamma, chunk)


def _memory_backward(ops, inputs, residuals, cotangents, *, chunk):
    w, erase, add, rho, _, key, beta, gamma = inputs
    starts, prod = residuals
    g = memory_scan_backward(
        ops, w, erase, add, rho, starts, prod, *cotangents, key, beta, gamma, chunk
    )
    return tuple(g.get(n) for n in ("w", "erase", "add", "rho", "m0", "key", "beta", "gamma"))
