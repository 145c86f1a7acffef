"""Fused CPU kernels for P-NTM's scans, compiled by numba, on PyTorch tensors and MLX arrays
(``docs/design.md``: "Heads", "Memory and reads", "The backward", "Fused CPU kernels").

The framework path (``chunked``) runs a Python loop of whole-batch operations that each read and
write all ``B K N D`` numbers of the memory from main memory. Here one task per (batch, memory)
keeps its ``N x D`` memory in a local array, in cache, across all ``T`` steps and streams each
step's inputs once.

* ``block_scan`` (location reads): one block's recurrences in one kernel: the write and read
  heads in slot space, ``w_t = (1 - g_t) (s_t ⊛ w_{t-1}) + g_t delta_home`` (``O(N (2S+1))`` per
  step, no Fourier transform), then the memory write and the read. The head distributions
  live in two N-vectors: the ``(B, T, K, N)`` arrays of the unfused path (and their gradients)
  never exist. A head with a single nonzero slot (every hard head) writes and reads one
  column of the memory, ``O(D)``.
* ``memory_scan_read`` and ``head_scan``: the same pieces as separate operations (content reads,
  whose softmax spans all slots, run this way).
* ``linear_scan``: the Fourier route's complex recurrence ``h_t = a_t h_{t-1} + b_t``, for the
  interface's completeness (the model runs the head recurrence in slot space here).
* Backward by recomputation: the forward keeps the memory (and the heads) every ``chunk`` steps,
  ``O(B K (T/chunk) N D)`` numbers, never ``O(T N D)``; the backward walks the chunks from the
  last, recomputes a chunk's states and runs the reverse-time recurrence
  ``G_t = (read gradient)_t + F_{t+1} ⊙ G_{t+1}``, every input gradient of a step in one pass
  over the memory. In a chunk of one-slot writes the states are walked back by undoing each
  write (its old column logged) instead of being stored.
* The memory is held as ``D x N`` (slots contiguous): every inner loop runs over the slots,
  the long axis, and vectorizes.
* Float32 and float64 run in their own precision; float16 and bfloat16 inputs are computed in
  float32 and returned in their dtype. Tasks run on numba's thread pool (:func:`threads`).
* Compiled once per dtype and cached on disk (``cache=True``): the first training run of a
  fresh installation compiles for about 12 s (measured here); ``pntm backends`` compiles nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

_raw_threads = os.environ.get("NUMBA_NUM_THREADS")
if _raw_threads is not None and not (_raw_threads.isdigit() and int(_raw_threads) > 0):
    # numba's own refusal at import does not name the variable
    raise ValueError(f"NUMBA_NUM_THREADS={_raw_threads!r}: numba needs a number of threads >= 1")

import numba  # noqa: E402 - after the check above
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from pntm.backends.base import COSINE_EPS, Array, Backend, step_block  # noqa: E402

FRAMEWORKS = ("torch", "mlx")
DEFAULT_CHUNK = 16  # steps between checkpoints (and the backward's recompute span)
#: channels of the head scan per task: enough work per task, and tasks for every core
LINEAR_BLOCK = 64
#: only reassociation (vectorized sums) and fused multiply-adds: no "no NaN/Inf" assumption, so
#: a diverging model still shows its NaN to the training loop's divergence check
_MATH = {"reassoc", "contract"}
# No inline="always": numba's own inliner mishandled a helper with an early return inside a loop
# (wrong results, seen here); LLVM inlines the small helpers anyway.
_JIT = dict(fastmath=_MATH, cache=True, nogil=True)

# numba's OpenMP pool shares the process with PyTorch's own OpenMP runtime: with both loaded,
# measured here, numba.set_num_threads had no effect and a 2-thread scan ran 2.5x slower than
# on one thread. The workqueue pool has no such conflict and no spinning workers (nothing
# to thrash a loaded machine); NUMBA_THREADING_LAYER still overrides it.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


#: numba's threading layers (``NUMBA_THREADING_LAYER``)
_LAYERS = ("default", "safe", "forksafe", "threadsafe", "tbb", "omp", "workqueue")


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, where a setting numba would reject at the first
    kernel's launch (mid-training) can be read now."""
    layer = os.environ.get("NUMBA_THREADING_LAYER")
    if layer is not None and layer not in _LAYERS:
        return f"NUMBA_THREADING_LAYER={layer!r} is not one of numba's: {', '.join(_LAYERS)}"
    return None


def describe() -> str:
    return (
        f"numba {numba.__version__} CPU kernels on {threads()} thread(s), one task per "
        "batch·memory: a block's two heads (in slot space, no FFT) and its memory with location "
        "reads in one kernel, the head distributions never stored; with content reads, the "
        "heads and the memory scan each fused; state in cache, checkpoints every "
        f"{DEFAULT_CHUNK} steps, backward by recomputation; controller in the framework"
        + ("; with MLX, its large dense-layer multiplies by NumPy's BLAS" if BLAS_FOR_MLX else "")
    )


# ====================================================================== threads

_threads: int | None = None


def max_threads() -> int:
    """The threads numba's pool has (every core, or NUMBA_NUM_THREADS)."""
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n: int | None) -> None:
    """The kernels' threads in this process (None: back to the default of :func:`threads`)."""
    global _threads
    if n is not None and not 1 <= n <= max_threads():
        raise ValueError(
            f"kernel threads must be 1..{max_threads()} (numba's pool on this machine), got {n}"
        )
    _threads = n


def threads() -> int:
    """The kernels' threads: :func:`set_threads`'s value (``pntm.backends.set_threads``, the
    ``--threads`` option), else PyTorch's intra-op threads where PyTorch is loaded (a library
    user's ``torch.set_num_threads`` holds), else every core of numba's pool."""
    if _threads is not None:
        return _threads
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, min(max_threads(), torch.get_num_threads()))
    return max_threads()


# ====================================================================== memory scan: kernels


@njit(**_JIT)
def _fill(x, value):
    """``x[...] = value``. Kernels with ``parallel=True`` call this (and :func:`_copy`) instead
    of writing slice assignments: numba turns a slice assignment inside a ``prange`` body into
    a nested parallel loop, and some of those (``r[:] = 0`` in a branch, seen here) were
    silently dropped."""
    flat = x.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = value


@njit(**_JIT)
def _copy(src, dst):
    """``dst[...] = src`` for C-contiguous arrays of one shape (see :func:`_fill`)."""
    s, d = src.reshape(-1), dst.reshape(-1)
    for i in range(s.shape[0]):
        d[i] = s[i]


@njit(**_JIT)
def _transpose(src, dst):
    """``dst = src^T`` for 2-D arrays: a memory between the model's ``N x D`` layout and the
    kernels' ``D x N`` one."""
    rows, cols = src.shape
    for i in range(rows):
        for j in range(cols):
            dst[j, i] = src[i, j]


@njit(**_JIT)
def _final_cotangent(d_final, b, k, D, N, zero):
    """``dL/dM_T`` of memory (b, k) as a ``D x N`` state: ``d_final[b, k]``, or zeros where
    ``d_final`` is empty."""
    G = np.empty((D, N), d_final.dtype)
    if d_final.shape[0] > 0:
        _transpose(d_final[b, k], G)
    else:
        _fill(G, zero)
    return G


@njit(**_JIT)
def _write(M, w, e, a):
    """``M <- (1 - w e^T) ⊙ M + w a^T`` on the ``D x N`` state."""
    D, N = M.shape
    for d in range(D):
        ed, ad = e[d], a[d]
        for i in range(N):
            m = M[d, i]
            M[d, i] = m + w[i] * (ad - ed * m)


@njit(**_JIT)
def _write_from(M, w, e, a, out):
    """``out <- (1 - w e^T) ⊙ M + w a^T``: the next state in another buffer, in one pass."""
    D, N = M.shape
    for d in range(D):
        ed, ad = e[d], a[d]
        for i in range(N):
            m = M[d, i]
            out[d, i] = m + w[i] * (ad - ed * m)


@njit(**_JIT)
def _read(M, weights, r, zero):
    D, N = M.shape
    for d in range(D):
        acc = zero
        for i in range(N):
            acc += weights[i] * M[d, i]
        r[d] = acc


@njit(**_JIT)
def _write_read(M, w, e, a, rho, r, zero):
    """The write, and the location read ``r = rho^T M`` of the new state, in one pass."""
    D, N = M.shape
    for d in range(D):
        ed, ad = e[d], a[d]
        acc = zero
        for i in range(N):
            m = M[d, i]
            m = m + w[i] * (ad - ed * m)
            M[d, i] = m
            acc += rho[i] * m
        r[d] = acc


@njit(**_JIT)
def _single(x, zero):
    """The slot of ``x``'s one nonzero entry; -1 if it has none, -2 if it has several (a hard
    head is one-hot: its write and read touch one slot). Counted without branches, so that
    the loop vectorizes (a scan with an early exit ran at 3.4 cycles per slot, measured)."""
    count = 0
    where = 0
    for i in range(x.shape[0]):
        nonzero = x[i] != zero
        count += nonzero
        where += i * nonzero
    if count > 1:
        return -2
    return where if count == 1 else -1


@njit(**_JIT)
def _sparse_write(M, i, wi, e, a):
    """The write of a head on one slot ``i`` with weight ``wi``: one column of the state."""
    for d in range(M.shape[0]):
        m = M[d, i]
        M[d, i] = m + wi * (a[d] - e[d] * m)


@njit(**_JIT)
def _write_read_step(M, w_t, rho_t, e_t, a_t, r_t, zero):
    """One step of the memory with a location read: a write (read) whose weights have a single
    nonzero slot, a hard head's, touches that one column, O(D) instead of O(N D); otherwise
    the write and the read run over the whole state in one pass."""
    D = M.shape[0]
    i_w, i_r = _single(w_t, zero), _single(rho_t, zero)
    if i_w == -2 and i_r == -2:
        _write_read(M, w_t, e_t, a_t, rho_t, r_t, zero)
        return
    if i_w == -2:
        _write(M, w_t, e_t, a_t)
    elif i_w >= 0:
        _sparse_write(M, i_w, w_t[i_w], e_t, a_t)
    if i_r == -2:
        _read(M, rho_t, r_t, zero)
    elif i_r >= 0:
        for d in range(D):
            r_t[d] = rho_t[i_r] * M[d, i_r]
    else:
        _fill(r_t, zero)


@njit(parallel=True, **_JIT)
def _location_forward(w, erase, add, rho, m0, chunk, zero, reads, final, ckpt):
    """:func:`_content_forward`'s outputs for location reads (:func:`_write_read_step`)."""
    B, T, K, N = w.shape
    D = add.shape[3]
    save = ckpt.shape[2] > 0
    for task in prange(B * K):
        b, k = task // K, task % K
        M = np.empty((D, N), w.dtype)
        _transpose(m0[b, k], M)
        for t in range(T):
            if save and t % chunk == 0:
                _copy(M, ckpt[b, k, t // chunk])
            _write_read_step(
                M, w[b, t, k], rho[b, t, k], erase[b, t, k], add[b, t, k], reads[b, t, k], zero
            )
        _transpose(M, final[b, k])


@njit(**_JIT)
def _chunk_states(M0, w_chunk, e_chunk, a_chunk, steps, states, log, slots, zero):
    """A chunk's states recomputed from its first, ``M0``, for :func:`_step_back_location`,
    with each step's written slot in ``slots`` (:func:`_single`). Where every write of the
    chunk touches at most one slot, only the state at the chunk's end is kept, in
    ``states[0]``, with each step's old column in ``log``: the backward walks the states back
    by undoing the writes (returns True). Otherwise ``states[l]`` is the state before step l
    (returns False)."""
    D = M0.shape[0]
    sparse = True
    for l in range(steps):
        slots[l] = _single(w_chunk[l], zero)
        if slots[l] == -2:
            sparse = False
    if not sparse:
        _copy(M0, states[0])
        for l in range(steps):
            _write_from(states[l], w_chunk[l], e_chunk[l], a_chunk[l], states[l + 1])
        return False
    M = states[0]
    _copy(M0, M)
    for l in range(steps):
        i_w = slots[l]
        if i_w >= 0:
            for d in range(D):
                log[l, d] = M[d, i_w]
            _sparse_write(M, i_w, w_chunk[l, i_w], e_chunk[l], a_chunk[l])
    return True


@njit(**_JIT)
def _step_back_location(
    G, states, log, slots, l, sparse, w_t, rho_t, e_t, a_t, dr, d_w_t, d_rho_t, d_e, d_a, zero
):
    """The reverse of step ``l`` of a chunk (:func:`_chunk_states`) with a location read:
    ``G_t = rho_t dr_t^T + F_{t+1} ⊙ G_{t+1}``, the step's gradients, then ``G <- F_t ⊙ G_t``.

    One-slot writes (``sparse``): the dense work left is ``d_rho_t = M_t dr_t`` and
    ``d_w_t(i) = G_t(:, i) . (a_t - e_t ⊙ M_{t-1}(:, i))`` in one pass (``M_t = M_{t-1}`` off
    the written column, redone after the undo); the rest touches the written and read columns.
    """
    D, N = G.shape
    _fill(d_w_t, zero)
    _fill(d_rho_t, zero)
    if not sparse:
        M = states[l + 1]
        for d in range(D):
            drd = dr[d]
            for i in range(N):
                d_rho_t[i] += M[d, i] * drd
        _step_back(G, states[l], w_t, e_t, a_t, rho_t, dr, d_w_t, d_e, d_a, zero)
        return
    M = states[0]  # M_t, walked back to M_{t-1} below
    i_w, i_r = slots[l], _single(rho_t, zero)
    if i_r >= 0:
        for d in range(D):
            G[d, i_r] += rho_t[i_r] * dr[d]
    elif i_r == -2:
        for d in range(D):
            drd = dr[d]
            for i in range(N):
                G[d, i] += rho_t[i] * drd
    for d in range(D):
        ed, ad, drd = e_t[d], a_t[d], dr[d]
        for i in range(N):
            m = M[d, i]
            d_rho_t[i] += m * drd
            d_w_t[i] += G[d, i] * (ad - ed * m)
    if i_w < 0:
        _fill(d_e, zero)
        _fill(d_a, zero)
    else:
        wi = w_t[i_w]
        acc = zero
        for d in range(D):
            m = log[l, d]
            M[d, i_w] = m  # M_{t-1}
            g = G[d, i_w]
            acc += g * (a_t[d] - e_t[d] * m)
            d_a[d] = wi * g
            d_e[d] = -wi * g * m
            G[d, i_w] = g - e_t[d] * wi * g
        d_w_t[i_w] = acc


@njit(parallel=True, **_JIT)
def _location_backward(
    w, erase, add, rho, chunk, zero, ckpt, d_read, d_final, d_w, d_erase, d_add, d_rho, d_m0
):
    """Every input gradient of :func:`_location_forward` for the cotangents ``d_read`` and
    ``d_final`` (empty: zero), from the checkpoints ``ckpt``: per chunk from the last, its
    states recomputed (:func:`_chunk_states`), then its steps reversed
    (:func:`_step_back_location`)."""
    B, T, K, N = w.shape
    D = add.shape[3]
    n_chunks = ckpt.shape[2]
    for task in prange(B * K):
        b, k = task // K, task % K
        G = _final_cotangent(d_final, b, k, D, N, zero)  # dL/dM at the current step
        states = np.empty((chunk + 1, D, N), w.dtype)
        log = np.empty((chunk, D), w.dtype)
        slots = np.empty(chunk, np.int64)  # each step's written slot (_single)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            steps = min(chunk, T - t0)
            sparse = _chunk_states(
                ckpt[b, k, c], w[b, t0 : t0 + steps, k], erase[b, t0 : t0 + steps, k],
                add[b, t0 : t0 + steps, k], steps, states, log, slots, zero,
            )  # fmt: skip
            for l in range(steps - 1, -1, -1):
                t = t0 + l
                _step_back_location(
                    G, states, log, slots, l, sparse, w[b, t, k], rho[b, t, k], erase[b, t, k],
                    add[b, t, k], d_read[b, t, k], d_w[b, t, k], d_rho[b, t, k],
                    d_erase[b, t, k], d_add[b, t, k], zero,
                )  # fmt: skip
        _transpose(G, d_m0[b, k])


@njit(**_JIT)
def _content_weights(M, rho, key, beta, gamma, mixed, cosine, content, norm_m, zero, one, eps):
    """``mixed = (1 - gamma) rho + gamma softmax_i(beta cos(key, M_i))`` (``read_step`` in
    :mod:`pntm.backends.base`), with its intermediates; returns the key's regularised norm."""
    D, N = M.shape
    for i in range(N):
        cosine[i] = zero
        norm_m[i] = zero
    for d in range(D):
        kd = key[d]
        for i in range(N):
            m = M[d, i]
            cosine[i] += m * kd
            norm_m[i] += m * m
    kk = zero
    for d in range(D):
        kk += key[d] * key[d]
    norm_k = np.sqrt(kk + eps)
    for i in range(N):
        norm_m[i] = np.sqrt(norm_m[i] + eps)
        cosine[i] = cosine[i] / (norm_m[i] * norm_k)
    top = beta * cosine[0]
    for i in range(1, N):
        top = max(top, beta * cosine[i])
    total = zero
    for i in range(N):
        content[i] = np.exp(beta * cosine[i] - top)
        total += content[i]
    for i in range(N):
        content[i] = content[i] / total
        mixed[i] = (one - gamma) * rho[i] + gamma * content[i]
    return norm_k


@njit(parallel=True, **_JIT)
def _content_forward(
    w, erase, add, rho, m0, key, beta, gamma, chunk, zero, one, eps, reads, final, ckpt
):
    """Reads (B, T, K, D) with content addressing, the final memory (B, K, N, D) and, with
    ``ckpt`` (B, K, ceil(T/chunk), D, N) not empty, the state before every ``chunk``-th step.
    The softmax of a read spans every slot, so each step runs over the whole memory."""
    B, T, K, N = w.shape
    D = add.shape[3]
    save = ckpt.shape[2] > 0
    for task in prange(B * K):
        b, k = task // K, task % K
        M = np.empty((D, N), w.dtype)
        mixed = np.empty(N, w.dtype)
        cosine = np.empty(N, w.dtype)
        soft = np.empty(N, w.dtype)
        norm_m = np.empty(N, w.dtype)
        _transpose(m0[b, k], M)
        for t in range(T):
            if save and t % chunk == 0:
                _copy(M, ckpt[b, k, t // chunk])
            _write(M, w[b, t, k], erase[b, t, k], add[b, t, k])
            _content_weights(
                M, rho[b, t, k], key[b, t, k], beta[b, t, k], gamma[b, t, k],
                mixed, cosine, soft, norm_m, zero, one, eps,
            )  # fmt: skip
            _read(M, mixed, reads[b, t, k], zero)
        _transpose(M, final[b, k])


@njit(**_JIT)
def _step_back(G, M_prev, w, e, a, mixed, dr, d_w, d_e, d_a, zero):
    """One reverse step for a read with weights ``mixed``: ``G += mixed dr^T`` (now ``G_t``), the
    write's input gradients, then ``G <- F_t ⊙ G_t`` (``dL/dM_{t-1}`` before the read at t-1).
    ``d_w`` must arrive zeroed."""
    D, N = G.shape
    for d in range(D):
        ed, ad, drd = e[d], a[d], dr[d]
        acc_e = zero
        acc_a = zero
        for i in range(N):
            mp = M_prev[d, i]
            g = G[d, i] + mixed[i] * drd
            d_w[i] += g * (ad - ed * mp)
            wg = w[i] * g
            acc_a += wg
            acc_e += wg * mp
            G[d, i] = g - ed * wg
        d_e[d] = -acc_e
        d_a[d] = acc_a


@njit(parallel=True, **_JIT)
def _content_backward(
    w, erase, add, rho, key, beta, gamma, chunk, zero, one, eps, ckpt, d_read, d_final,
    d_w, d_erase, d_add, d_rho, d_key, d_beta, d_gamma, d_m0,
):  # fmt: skip
    """Every input gradient of :func:`_content_forward` for the cotangents ``d_read`` and
    ``d_final`` (empty: zero), from the checkpoints ``ckpt``: per chunk from the last, its
    states recomputed, then the reverse steps (``read_step_vjp`` in
    :mod:`pntm.backends.base`, then :func:`_step_back`)."""
    B, T, K, N = w.shape
    D = add.shape[3]
    n_chunks = ckpt.shape[2]
    for task in prange(B * K):
        b, k = task // K, task % K
        G = _final_cotangent(d_final, b, k, D, N, zero)  # dL/dM at the current step
        states = np.empty((chunk + 1, D, N), w.dtype)
        mixed = np.empty(N, w.dtype)
        cosine = np.empty(N, w.dtype)
        soft = np.empty(N, w.dtype)
        norm_m = np.empty(N, w.dtype)
        d_mixed = np.empty(N, w.dtype)
        inv = np.empty(N, w.dtype)
        shrink = np.empty(N, w.dtype)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            steps = min(chunk, T - t0)
            _copy(ckpt[b, k, c], states[0])
            for l in range(steps):
                _write_from(
                    states[l], w[b, t0 + l, k], erase[b, t0 + l, k], add[b, t0 + l, k],
                    states[l + 1],
                )  # fmt: skip
            for l in range(steps - 1, -1, -1):
                t = t0 + l
                M = states[l + 1]
                dr = d_read[b, t, k]
                d_w_t = d_w[b, t, k]
                _fill(d_w_t, zero)
                g_t = gamma[b, t, k]
                beta_t = beta[b, t, k]
                key_t = key[b, t, k]
                norm_k = _content_weights(
                    M, rho[b, t, k], key_t, beta_t, g_t,
                    mixed, cosine, soft, norm_m, zero, one, eps,
                )  # fmt: skip
                _fill(d_mixed, zero)
                for d in range(D):
                    drd = dr[d]
                    for i in range(N):
                        d_mixed[i] += M[d, i] * drd
                # the softmax and the mix
                d_g = zero
                dot = zero
                for i in range(N):
                    d_rho[b, t, k, i] = (one - g_t) * d_mixed[i]
                    d_g += d_mixed[i] * (soft[i] - rho[b, t, k, i])
                    dot += soft[i] * g_t * d_mixed[i]
                d_b = zero
                cos_dcos = zero
                for i in range(N):
                    d_logit = soft[i] * (g_t * d_mixed[i] - dot)
                    d_b += d_logit * cosine[i]
                    d_cos = beta_t * d_logit
                    cos_dcos += d_cos * cosine[i]
                    inv[i] = d_cos / (norm_m[i] * norm_k)
                    shrink[i] = d_cos * cosine[i] / (norm_m[i] * norm_m[i])
                d_gamma[b, t, k] = d_g
                d_beta[b, t, k] = d_b
                # the cosine's gradient into the memory and the key
                for d in range(D):
                    kd = key_t[d]
                    acc = zero
                    for i in range(N):
                        m = M[d, i]
                        acc += inv[i] * m
                        G[d, i] += inv[i] * kd - shrink[i] * m
                    d_key[b, t, k, d] = acc - cos_dcos * kd / (norm_k * norm_k)
                _step_back(
                    G, states[l], w[b, t, k], erase[b, t, k], add[b, t, k], mixed, dr,
                    d_w_t, d_erase[b, t, k], d_add[b, t, k], zero,
                )  # fmt: skip
        _transpose(G, d_m0[b, k])


# ====================================================================== linear scan: kernels


@njit(parallel=True, **_JIT)
def _linear_forward(a, b, h0, block, h):
    """``h_t = a_t h_{t-1} + b_t`` for (B, T, R) inputs, ``h0`` (B, R)."""
    B, T, R = b.shape
    n_blocks = (R + block - 1) // block
    for task in prange(B * n_blocks):
        n, r0 = task // n_blocks, (task % n_blocks) * block
        r1 = min(R, r0 + block)
        carry = np.empty(r1 - r0, h.dtype)
        _copy(h0[n, r0:r1], carry)
        for t in range(T):
            a_t, b_t, h_t = a[n, t, r0:r1], b[n, t, r0:r1], h[n, t, r0:r1]
            for r in range(r1 - r0):
                carry[r] = a_t[r] * carry[r] + b_t[r]
                h_t[r] = carry[r]


@njit(parallel=True, **_JIT)
def _linear_backward(a, h, h0, d_h, block, d_a, d_b, d_h0):
    """``g_t = d_h_t + conj(a_{t+1}) g_{t+1}``; ``d_b = g``, ``d_a_t = g_t conj(h_{t-1})``,
    ``d_h0 = conj(a_1) g_1`` (cotangents of complex values: ``dL/dRe + i dL/dIm``)."""
    B, T, R = h.shape
    n_blocks = (R + block - 1) // block
    for task in prange(B * n_blocks):
        n, r0 = task // n_blocks, (task % n_blocks) * block
        r1 = min(R, r0 + block)
        g = np.empty(r1 - r0, d_h.dtype)
        _copy(d_h[n, T - 1, r0:r1], g)
        for t in range(T - 1, -1, -1):
            prev = h0[n, r0:r1] if t == 0 else h[n, t - 1, r0:r1]
            a_t, da_t, db_t = a[n, t, r0:r1], d_a[n, t, r0:r1], d_b[n, t, r0:r1]
            if t < T - 1:
                d_h_t = d_h[n, t, r0:r1]
                a_next = a[n, t + 1, r0:r1]
                for r in range(r1 - r0):
                    g[r] = d_h_t[r] + np.conj(a_next[r]) * g[r]
            for r in range(r1 - r0):
                db_t[r] = g[r]
                da_t[r] = g[r] * np.conj(prev[r])
            if t == 0:
                for r in range(r1 - r0):
                    d_h0[n, r0 + r] = np.conj(a_t[r]) * g[r]


# ====================================================================== head scan: kernels


@njit(**_JIT)
def _extend(x, S, ext):
    """``ext[m] = x[(m - S) mod N]`` for m in 0..N+2S-1: the circular neighbourhood of every
    slot as one contiguous window (``x[(i + S - j) mod N] = ext[i + 2S - j]``)."""
    N = x.shape[0]
    for m in range(S):  # the 2S wrapped entries (an integer modulo per entry costs ~25 cycles)
        ext[m] = x[(m - S) % N]
        ext[N + S + m] = x[m % N]
    for i in range(N):
        ext[S + i] = x[i]


@njit(**_JIT)
def _head_start(start, b, k, home, zero, one, out):
    """``w_0``: ``start[b, k]``, or the home slot's one-hot where ``start`` is empty."""
    if start.shape[0] > 0:
        _copy(start[b, k], out)
    else:
        _fill(out, zero)
        out[home] = one


@njit(**_JIT)
def _head_step(prev, s_t, g, home, ext, out, zero, one):
    """``out = (1 - g) (s_t ⊛ prev) + g delta_home``: O(N (2S+1)), in vectorized passes.
    ``out`` may be ``prev`` (a step in place): ``prev`` is read into ``ext`` first."""
    N, J = prev.shape[0], s_t.shape[0]
    S = J // 2
    _extend(prev, S, ext)
    keep = one - g
    _fill(out, zero)
    for j in range(J):
        coef = keep * s_t[j]
        window = ext[2 * S - j : 2 * S - j + N]  # a view: no negative-index checks
        for i in range(N):
            out[i] += coef * window[i]
    out[home] += g


@njit(**_JIT)
def _head_step_back(d_w_t, carry, prev, s_t, g, home, ext, c, c_ext, d_s, zero, one):
    """The reverse of :func:`_head_step` for the cotangent ``d_w_t`` of its output and
    ``carry``, what arrives from step t+1: with ``c = d_w_t + carry``,
    ``d_s(j) = (1 - g) sum_i c(i) prev(i + S - j)`` (into ``d_s``),
    ``d_g = c(home) - sum_i c(i) (s ⊛ prev)(i)`` (returned), and the new ``carry``, the
    cotangent of ``prev``: ``(1 - g)`` times the correlation ``sum_j s(j) c(p + j - S)``."""
    N, J = prev.shape[0], s_t.shape[0]
    S = J // 2
    for i in range(N):
        c[i] = d_w_t[i] + carry[i]
    _extend(prev, S, ext)
    _extend(c, S, c_ext)
    keep = one - g
    d_g = c[home]
    for j in range(J):
        acc = zero
        window = ext[2 * S - j : 2 * S - j + N]
        for i in range(N):
            acc += c[i] * window[i]
        d_s[j] = keep * acc
        d_g -= s_t[j] * acc
    _fill(carry, zero)
    for j in range(J):
        coef = keep * s_t[j]
        window = c_ext[j : j + N]
        for p in range(N):
            carry[p] += coef * window[p]
    return d_g


@njit(parallel=True, **_JIT)
def _head_forward(shift, gate, start, homes, zero, one, w):
    """Every ``w_t = (1 - g_t) (s_t ⊛ w_{t-1}) + g_t delta_home`` in slot space; ``start``
    (B, K, N) or empty (the home); ``homes`` (K,) the home slot of each head."""
    B, T, K, J = shift.shape
    N = w.shape[3]
    for task in prange(B * K):
        b, k = task // K, task % K
        ext = np.empty(N + J - 1, w.dtype)
        first = np.empty(N, w.dtype)
        _head_start(start, b, k, homes[k], zero, one, first)
        for t in range(T):
            prev = first if t == 0 else w[b, t - 1, k]
            _head_step(prev, shift[b, t, k], gate[b, t, k], homes[k], ext, w[b, t, k], zero, one)


@njit(parallel=True, **_JIT)
def _head_backward(shift, gate, start, homes, w, d_w, zero, one, d_shift, d_gate, d_start):
    """Gradients of :func:`_head_forward` for the cotangent ``d_w``, from its output ``w``
    (:func:`_head_step_back` from the last step); ``d_start`` the carry left at step 0."""
    B, T, K, J = shift.shape
    N = w.shape[3]
    for task in prange(B * K):
        b, k = task // K, task % K
        ext = np.empty(N + J - 1, w.dtype)
        c_ext = np.empty(N + J - 1, w.dtype)
        carry = np.empty(N, w.dtype)  # dL/dw_t arriving from step t+1
        c = np.empty(N, w.dtype)
        first = np.empty(N, w.dtype)
        _head_start(start, b, k, homes[k], zero, one, first)
        _fill(carry, zero)
        for t in range(T - 1, -1, -1):
            prev = first if t == 0 else w[b, t - 1, k]
            d_gate[b, t, k] = _head_step_back(
                d_w[b, t, k], carry, prev, shift[b, t, k], gate[b, t, k], homes[k], ext, c,
                c_ext, d_shift[b, t, k], zero, one,
            )  # fmt: skip
        if d_start.shape[0] > 0:
            _copy(carry, d_start[b, k])


# ====================================================================== one block: kernels


@njit(parallel=True, **_JIT)
def _block_forward(
    shift_w, gate_w, shift_r, gate_r, erase, add, start_w, start_r, m0, homes_w, homes_r,
    chunk, zero, one, reads, final, last_w, last_r, ckpt, ckpt_w, ckpt_r,
):  # fmt: skip
    """One block's recurrences fused: both heads (:func:`_head_step`) and the memory with its
    location read (:func:`_write_read_step`), step by step; the head distributions live in
    two N-vectors and never reach main memory. Saves the memory and both heads every
    ``chunk`` steps."""
    B, T, K, J = shift_w.shape
    N, D = m0.shape[2], m0.shape[3]
    save = ckpt.shape[2] > 0
    for task in prange(B * K):
        b, k = task // K, task % K
        M = np.empty((D, N), m0.dtype)
        _transpose(m0[b, k], M)
        ext = np.empty(N + J - 1, m0.dtype)
        w_t = np.empty(N, m0.dtype)
        rho_t = np.empty(N, m0.dtype)
        _head_start(start_w, b, k, homes_w[k], zero, one, w_t)
        _head_start(start_r, b, k, homes_r[k], zero, one, rho_t)
        for t in range(T):
            if save and t % chunk == 0:
                c = t // chunk
                _copy(M, ckpt[b, k, c])
                _copy(w_t, ckpt_w[b, k, c])
                _copy(rho_t, ckpt_r[b, k, c])
            _head_step(w_t, shift_w[b, t, k], gate_w[b, t, k], homes_w[k], ext, w_t, zero, one)
            _head_step(rho_t, shift_r[b, t, k], gate_r[b, t, k], homes_r[k], ext, rho_t, zero, one)
            _write_read_step(M, w_t, rho_t, erase[b, t, k], add[b, t, k], reads[b, t, k], zero)
        _transpose(M, final[b, k])
        _copy(w_t, last_w[b, k])
        _copy(rho_t, last_r[b, k])


@njit(parallel=True, **_JIT)
def _block_backward(
    shift_w, gate_w, shift_r, gate_r, erase, add, start_w, start_r, homes_w, homes_r, chunk,
    zero, one, ckpt, ckpt_w, ckpt_r, d_read, d_final, d_last_w, d_last_r,
    d_shift_w, d_gate_w, d_shift_r, d_gate_r, d_erase, d_add, d_m0, d_start_w, d_start_r,
):  # fmt: skip
    """Every input gradient of :func:`_block_forward`: per chunk from the last, both heads and
    the memory recomputed from the checkpoints, then each step reversed: the memory
    (:func:`_step_back_location`) gives the cotangents of the step's two head distributions,
    which go straight into the heads' reverse steps (:func:`_head_step_back`)."""
    B, T, K, J = shift_w.shape
    N, D = ckpt.shape[4], ckpt.shape[3]
    n_chunks = ckpt.shape[2]
    for task in prange(B * K):
        b, k = task // K, task % K
        dtype = ckpt.dtype
        G = _final_cotangent(d_final, b, k, D, N, zero)
        carry_w = np.empty(N, dtype)
        carry_r = np.empty(N, dtype)
        if d_last_w.shape[0] > 0:
            _copy(d_last_w[b, k], carry_w)
            _copy(d_last_r[b, k], carry_r)
        else:
            _fill(carry_w, zero)
            _fill(carry_r, zero)
        states = np.empty((chunk + 1, D, N), dtype)
        log = np.empty((chunk, D), dtype)
        slots = np.empty(chunk, np.int64)
        ws = np.empty((chunk + 1, N), dtype)  # the heads in the chunk: ws[l] before step l
        rhos = np.empty((chunk + 1, N), dtype)
        ext = np.empty(N + J - 1, dtype)
        c_ext = np.empty(N + J - 1, dtype)
        c = np.empty(N, dtype)
        d_w_t = np.empty(N, dtype)
        d_rho_t = np.empty(N, dtype)
        for ch in range(n_chunks - 1, -1, -1):
            t0 = ch * chunk
            steps = min(chunk, T - t0)
            _copy(ckpt_w[b, k, ch], ws[0])
            _copy(ckpt_r[b, k, ch], rhos[0])
            for l in range(steps):
                t = t0 + l
                _head_step(ws[l], shift_w[b, t, k], gate_w[b, t, k], homes_w[k], ext, ws[l + 1],
                           zero, one)  # fmt: skip
                _head_step(rhos[l], shift_r[b, t, k], gate_r[b, t, k], homes_r[k], ext,
                           rhos[l + 1], zero, one)  # fmt: skip
            sparse = _chunk_states(
                ckpt[b, k, ch], ws[1 : steps + 1], erase[b, t0 : t0 + steps, k],
                add[b, t0 : t0 + steps, k], steps, states, log, slots, zero,
            )  # fmt: skip
            for l in range(steps - 1, -1, -1):
                t = t0 + l
                _step_back_location(
                    G, states, log, slots, l, sparse, ws[l + 1], rhos[l + 1], erase[b, t, k],
                    add[b, t, k], d_read[b, t, k], d_w_t, d_rho_t, d_erase[b, t, k],
                    d_add[b, t, k], zero,
                )  # fmt: skip
                d_gate_w[b, t, k] = _head_step_back(
                    d_w_t, carry_w, ws[l], shift_w[b, t, k], gate_w[b, t, k], homes_w[k], ext,
                    c, c_ext, d_shift_w[b, t, k], zero, one,
                )  # fmt: skip
                d_gate_r[b, t, k] = _head_step_back(
                    d_rho_t, carry_r, rhos[l], shift_r[b, t, k], gate_r[b, t, k], homes_r[k],
                    ext, c, c_ext, d_shift_r[b, t, k], zero, one,
                )  # fmt: skip
        _transpose(G, d_m0[b, k])
        if d_start_w.shape[0] > 0:
            _copy(carry_w, d_start_w[b, k])
        if d_start_r.shape[0] > 0:
            _copy(carry_r, d_start_r[b, k])


# ====================================================================== framework glue


def _output(shape, dtype) -> np.ndarray:
    """Every buffer a kernel writes comes from here (the tests fill it with NaN, so that an
    element a kernel fails to write shows up)."""
    return np.empty(shape, dtype)


_COMPUTE = {  # the dtype a framework dtype is computed in, by name
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float32,
    "bfloat16": np.float32,
    "complex64": np.complex64,
    "complex128": np.complex128,
}


def _dtype_name(x: Array) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def _check_dtypes(named: dict[str, Array], kinds: tuple[str, ...]) -> str:
    """The one dtype name the inputs share, checked against ``kinds``."""
    names = {n: _dtype_name(x) for n, x in named.items() if x is not None}
    for n, dtype in names.items():
        if dtype not in kinds:
            raise ValueError(f"numba_cpu kernels take {', '.join(kinds)} for {n}, got {dtype}")
    if len(set(names.values())) > 1:
        raise ValueError(f"the scan's inputs must share one dtype, got {names}")
    return next(iter(names.values()))


def _to_numpy(ops: Backend, x: Array | None, dtype: Any, ndim: int = 4) -> np.ndarray:
    """A C-contiguous NumPy array of ``dtype`` (zero-copy where the framework allows); for None
    an empty array of ``ndim`` axes (a kernel's "not given")."""
    if x is None:
        return np.empty((0,) * ndim, dtype)
    if ops.framework == "torch":
        import torch

        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return np.ascontiguousarray(x.cpu().numpy(), dtype)
    if _dtype_name(x) in ("float16", "bfloat16"):
        import mlx.core as mx

        x = x.astype(mx.float32)
    return np.ascontiguousarray(np.asarray(x), dtype)


def _from_numpy(ops: Backend, x: np.ndarray, like: Array | None = None) -> Array:
    """``x`` as a framework array of ``like``'s dtype and device (None: as it is, on the CPU)."""
    if ops.framework == "torch":
        import torch

        out = torch.from_numpy(x)
        return out if like is None else out.to(device=like.device, dtype=like.dtype)
    import mlx.core as mx

    # mx.array of a float64 NumPy array is float32 unless told: name the dtype
    out = mx.array(x, dtype=getattr(mx, x.dtype.name))
    return out if like is None or like.dtype == out.dtype else out.astype(like.dtype)


def _needs_backward(ops: Backend, inputs) -> bool:
    """Whether a backward may follow, so that the forward keeps its checkpoints: PyTorch says
    (grad mode and an input that requires a gradient); MLX cannot tell, so always."""
    if ops.framework != "torch":
        return True
    import torch

    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def _scalars(dtype) -> tuple[Any, Any, Any]:
    """``zero``, ``one`` and the cosine's epsilon in the kernel's dtype: a Python float literal
    in a kernel would promote float32 arithmetic to float64."""
    return dtype(0), dtype(1), dtype(COSINE_EPS)


# ====================================================================== memory scan: operation


def _memory_forward_op(ops, w, erase, add, rho, m0, key, beta, gamma, *, chunk, save):
    dtype = _COMPUTE[_dtype_name(w)]
    x = [_to_numpy(ops, v, dtype) for v in (w, erase, add, rho, m0)]
    B, T, K, N = w.shape
    D = add.shape[-1]
    reads = _output((B, T, K, D), dtype)
    final = _output((B, K, N, D), dtype)
    ckpt = _output((B, K, -(-T // chunk) if save else 0, D, N), dtype)
    zero, one, eps = _scalars(dtype)
    numba.set_num_threads(threads())
    if key is None:
        _location_forward(*x, chunk, zero, reads, final, ckpt)
    else:
        content = [
            _to_numpy(ops, key, dtype),
            *(_to_numpy(ops, v, dtype, 3) for v in (beta, gamma)),
        ]
        _content_forward(*x, *content, chunk, zero, one, eps, reads, final, ckpt)
    return (
        _from_numpy(ops, reads, add),
        _from_numpy(ops, final, m0),
        _from_numpy(ops, ckpt),  # in the compute dtype
    )


def _memory_backward_op(ops, inputs, residuals, cotangents, *, chunk, save):
    w, erase, add, rho, m0, key, beta, gamma = inputs
    d_read, d_final = cotangents
    dtype = _COMPUTE[_dtype_name(w)]
    x = [_to_numpy(ops, v, dtype) for v in (w, erase, add, rho)]
    ckpt = _to_numpy(ops, residuals[0], dtype)
    cot = [_to_numpy(ops, d_read, dtype), _to_numpy(ops, d_final, dtype)]
    B, T, K, N = w.shape
    D = add.shape[-1]
    grads = {
        "w": _output((B, T, K, N), dtype),
        "erase": _output((B, T, K, D), dtype),
        "add": _output((B, T, K, D), dtype),
        "rho": _output((B, T, K, N), dtype),
    }
    zero, one, eps = _scalars(dtype)
    numba.set_num_threads(threads())
    if key is None:
        grads["m0"] = _output((B, K, N, D), dtype)
        _location_backward(*x, chunk, zero, ckpt, *cot, *grads.values())
    else:
        grads.update(
            key=_output((B, T, K, D), dtype),
            beta=_output((B, T, K), dtype),
            gamma=_output((B, T, K), dtype),
            m0=_output((B, K, N, D), dtype),
        )
        content = [
            _to_numpy(ops, key, dtype),
            *(_to_numpy(ops, v, dtype, 3) for v in (beta, gamma)),
        ]
        _content_backward(*x, *content, chunk, zero, one, eps, ckpt, *cot, *grads.values())
    like = dict(w=w, erase=erase, add=add, rho=rho, m0=m0, key=key, beta=beta, gamma=gamma)
    return tuple(
        None if like[n] is None else _from_numpy(ops, grads[n], like[n])
        for n in ("w", "erase", "add", "rho", "m0", "key", "beta", "gamma")
    )


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
    chunk: int | None = None,
) -> tuple[Array, Array]:
    """``Backend.memory_scan_read`` as one fused operation with its own backward; ``chunk``
    (steps between checkpoints) is open to tests and benchmarks."""
    named = dict(w=w, erase=erase, add=add, rho=rho, m0=m0, key=key, beta=beta, gamma=gamma)
    _check_dtypes(named, ("float32", "float64", "float16", "bfloat16"))
    if chunk is None:
        chunk = DEFAULT_CHUNK
    if chunk < 1:
        raise ValueError(f"chunk (steps between checkpoints) must be at least 1, got {chunk}")
    if w.shape[1] == 0:  # nothing to scan: no reads, the memory as it was
        return ops.zeros_like(add), m0
    inputs = (w, erase, add, rho, m0, key, beta, gamma)
    save = _needs_backward(ops, inputs)
    op = ops.custom_vjp(_memory_forward_op, _memory_backward_op, 2, chunk=chunk, save=save)
    return op(*inputs)


# ====================================================================== head scan: operation


@functools.lru_cache(maxsize=64)
def _homes(n_slots: int, lag: int | tuple[int, ...], heads: int) -> np.ndarray:
    """Each head's home slot ``-lag mod N`` (read-only: one array per shape and lag, kept)."""
    homes = (-np.broadcast_to(np.asarray(lag, dtype=np.int64), (heads,)) % n_slots).copy()
    homes.flags.writeable = False
    return homes


def _head_forward_op(ops, shift, gate, start, *, n_slots, lag):
    dtype = _COMPUTE[_dtype_name(shift)]
    shift_, start_ = _to_numpy(ops, shift, dtype), _to_numpy(ops, start, dtype, 3)
    B, T, K, _ = shift.shape
    w = _output((B, T, K, n_slots), dtype)
    zero, one, _ = _scalars(dtype)
    numba.set_num_threads(threads())
    _head_forward(
        shift_, _to_numpy(ops, gate, dtype, 3), start_, _homes(n_slots, lag, K), zero, one, w
    )
    out = _from_numpy(ops, w, shift)
    return out, out


def _head_backward_op(ops, inputs, residuals, cotangents, *, n_slots, lag):
    shift, gate, start = inputs
    dtype = _COMPUTE[_dtype_name(shift)]
    B, T, K, J = shift.shape
    d_shift, d_gate = _output((B, T, K, J), dtype), _output((B, T, K), dtype)
    d_start = _output((B, K, n_slots) if start is not None else (0, 0, 0), dtype)
    zero, one, _ = _scalars(dtype)
    numba.set_num_threads(threads())
    _head_backward(
        _to_numpy(ops, shift, dtype), _to_numpy(ops, gate, dtype, 3),
        _to_numpy(ops, start, dtype, 3), _homes(n_slots, lag, K),
        _to_numpy(ops, residuals[0], dtype), _to_numpy(ops, cotangents[0], dtype),
        zero, one, d_shift, d_gate, d_start,
    )  # fmt: skip
    return (
        _from_numpy(ops, d_shift, shift),
        _from_numpy(ops, d_gate, gate),
        None if start is None else _from_numpy(ops, d_start, start),
    )


def head_scan(
    ops: Backend,
    shift: Array,
    gate: Array,
    n_slots: int,
    start: Array | None = None,
    lag: int | tuple[int, ...] = 0,
) -> Array:
    """``Backend.head_scan`` in slot space, one fused operation with its own backward: the
    circular convolution costs ``O(N (2S+1))`` per step, no Fourier transform, and one-hot
    shifts with 0/1 gates give exactly one-hot positions (nothing to snap)."""
    _check_dtypes(dict(shift=shift, gate=gate, start=start), tuple(_COMPUTE)[:4])
    if shift.shape[-1] % 2 != 1:
        raise ValueError(f"shift distributions cover -S..S (an odd size), got {shift.shape[-1]}")
    lags = np.asarray(lag)
    if lags.ndim > 1 or (lags.ndim == 1 and lags.shape[0] not in (1, shift.shape[2])):
        raise ValueError(f"lag must be one lag or one per head ({shift.shape[2]}), got {lag!r}")
    if 0 in shift.shape:
        B, T, K, _ = shift.shape
        return ops.zeros((B, T, K, n_slots))
    static_lag = tuple(int(x) for x in lags.ravel()) if lags.ndim else int(lags)
    op = ops.custom_vjp(_head_forward_op, _head_backward_op, 1, n_slots=n_slots, lag=static_lag)
    return op(shift, gate, start)


# ====================================================================== one block: operation


def _block_forward_op(ops, sw, gw, sr, gr, erase, add, start_w, start_r, m0, *, n_slots, lag, save):
    dtype = _COMPUTE[_dtype_name(add)]
    B, T, K, _ = sw.shape
    D = add.shape[-1]
    n_chunks = -(-T // DEFAULT_CHUNK) if save else 0
    out = {
        "reads": _output((B, T, K, D), dtype),
        "final": _output((B, K, n_slots, D), dtype),
        "last_w": _output((B, K, n_slots), dtype),
        "last_r": _output((B, K, n_slots), dtype),
        "ckpt": _output((B, K, n_chunks, D, n_slots), dtype),
        "ckpt_w": _output((B, K, n_chunks, n_slots), dtype),
        "ckpt_r": _output((B, K, n_chunks, n_slots), dtype),
    }
    zero, one, _ = _scalars(dtype)
    numba.set_num_threads(threads())
    _block_forward(
        _to_numpy(ops, sw, dtype), _to_numpy(ops, gw, dtype, 3),
        _to_numpy(ops, sr, dtype), _to_numpy(ops, gr, dtype, 3), _to_numpy(ops, erase, dtype),
        _to_numpy(ops, add, dtype), _to_numpy(ops, start_w, dtype, 3),
        _to_numpy(ops, start_r, dtype, 3), _to_numpy(ops, m0, dtype), _homes(n_slots, 0, K),
        _homes(n_slots, lag, K), DEFAULT_CHUNK, zero, one, *out.values(),
    )  # fmt: skip
    return (
        _from_numpy(ops, out["reads"], add),
        _from_numpy(ops, out["final"], add),
        _from_numpy(ops, out["last_w"], add),
        _from_numpy(ops, out["last_r"], add),
        *(_from_numpy(ops, out[n]) for n in ("ckpt", "ckpt_w", "ckpt_r")),
    )


def _block_backward_op(ops, inputs, residuals, cotangents, *, n_slots, lag, save):
    sw, gw, sr, gr, erase, add, start_w, start_r, m0 = inputs
    dtype = _COMPUTE[_dtype_name(add)]
    B, T, K, J = sw.shape
    D = add.shape[-1]
    grads = {
        "sw": _output((B, T, K, J), dtype),
        "gw": _output((B, T, K), dtype),
        "sr": _output((B, T, K, J), dtype),
        "gr": _output((B, T, K), dtype),
        "erase": _output((B, T, K, D), dtype),
        "add": _output((B, T, K, D), dtype),
        "m0": _output((B, K, n_slots, D), dtype),
        "start_w": _output((B, K, n_slots) if start_w is not None else (0, 0, 0), dtype),
        "start_r": _output((B, K, n_slots) if start_r is not None else (0, 0, 0), dtype),
    }
    zero, one, _ = _scalars(dtype)
    d_read, d_final = (_to_numpy(ops, x, dtype) for x in cotangents[:2])
    d_last_w, d_last_r = (_to_numpy(ops, x, dtype, 3) for x in cotangents[2:])
    numba.set_num_threads(threads())
    _block_backward(
        _to_numpy(ops, sw, dtype), _to_numpy(ops, gw, dtype, 3), _to_numpy(ops, sr, dtype),
        _to_numpy(ops, gr, dtype, 3), _to_numpy(ops, erase, dtype), _to_numpy(ops, add, dtype),
        _to_numpy(ops, start_w, dtype, 3), _to_numpy(ops, start_r, dtype, 3),
        _homes(n_slots, 0, K), _homes(n_slots, lag, K), DEFAULT_CHUNK, zero, one,
        *(_to_numpy(ops, r, dtype) for r in residuals), d_read, d_final, d_last_w, d_last_r,
        *grads.values(),
    )  # fmt: skip
    like = dict(
        sw=sw, gw=gw, sr=sr, gr=gr, erase=erase, add=add, m0=m0, start_w=start_w, start_r=start_r
    )
    return tuple(
        None if like[n] is None else _from_numpy(ops, grads[n], like[n])
        for n in ("sw", "gw", "sr", "gr", "erase", "add", "start_w", "start_r", "m0")
    )


def block_scan(
    ops: Backend,
    write_shift: Array,
    write_gate: Array,
    read_shift: Array,
    read_gate: Array,
    erase: Array,
    add: Array,
    n_slots: int,
    write_start: Array | None = None,
    read_start: Array | None = None,
    m0: Array | None = None,
    read_lag: int | tuple[int, ...] = 0,
) -> tuple[Array, Array, Array, Array]:
    """``Backend.block_scan`` with location reads as one fused operation with its own backward
    (:func:`_block_forward`): no ``(B, T, K, N)`` head distribution or its gradient is ever
    stored."""
    named = dict(
        write_shift=write_shift, write_gate=write_gate, read_shift=read_shift,
        read_gate=read_gate, erase=erase, add=add, write_start=write_start,
        read_start=read_start, m0=m0,
    )  # fmt: skip
    _check_dtypes(named, tuple(_COMPUTE)[:4])
    K, J = write_shift.shape[2:]
    if J % 2 != 1 or read_shift.shape[-1] != J:
        raise ValueError(
            f"shift distributions cover -S..S (an odd size, one for both heads), got "
            f"{J} and {read_shift.shape[-1]}"
        )
    lags = np.asarray(read_lag)
    if lags.ndim > 1 or (lags.ndim == 1 and lags.shape[0] not in (1, K)):
        raise ValueError(f"read_lag must be one lag or one per head ({K}), got {read_lag!r}")
    if m0 is None:
        m0 = ops.zeros_like(add[:, 0, :, None, :] * ops.zeros((n_slots, 1)))
    static_lag = tuple(int(x) for x in lags.ravel()) if lags.ndim else int(lags)
    inputs = (write_shift, write_gate, read_shift, read_gate, erase, add, write_start,
              read_start, m0)  # fmt: skip
    save = _needs_backward(ops, inputs)
    op = ops.custom_vjp(
        _block_forward_op, _block_backward_op, 4, n_slots=n_slots, lag=static_lag, save=save
    )
    return op(*inputs)


# ====================================================================== the step form


@njit(**_JIT)
def _rows(single, n):
    """The slots a head touches, from :func:`_single`: all, its one, or none."""
    if single == -2:
        return 0, n
    if single >= 0:
        return single, single + 1
    return 0, 0


@njit(**_JIT)
def _step_task(write, read, memory, sw, gw, sr, gr, e, a, home_w, home_r, zero, one,
               ext, r, new_memory, new_write, new_read):  # fmt: skip
    """One token of one memory: both heads moved (:func:`_head_step`), then the write and the
    read on the ``N x D`` memory (one row each for one-slot heads)."""
    N, D = memory.shape
    _head_step(write, sw, gw, home_w, ext, new_write, zero, one)
    _head_step(read, sr, gr, home_r, ext, new_read, zero, one)
    _copy(memory, new_memory)
    lo, hi = _rows(_single(new_write, zero), N)
    for i in range(lo, hi):
        wi = new_write[i]
        for d in range(D):
            m = new_memory[i, d]
            new_memory[i, d] = m + wi * (a[d] - e[d] * m)
    _fill(r, zero)
    lo, hi = _rows(_single(new_read, zero), N)
    for i in range(lo, hi):
        ri = new_read[i]
        for d in range(D):
            r[d] += ri * new_memory[i, d]


@njit(**_JIT)
def _step_one(b, k, write, read, memory, sw, gw, sr, gr, erase, add, homes_w, homes_r, zero,
              one, reads, new_memory, new_write, new_read):  # fmt: skip
    _step_task(
        write[b, k], read[b, k], memory[b, k], sw[b, k], gw[b, k], sr[b, k], gr[b, k],
        erase[b, k], add[b, k], homes_w[k], homes_r[k], zero, one,
        np.empty(memory.shape[2] + sw.shape[2] - 1, memory.dtype), reads[b, k],
        new_memory[b, k], new_write[b, k], new_read[b, k],
    )  # fmt: skip


@njit(**_JIT)
def _block_step_serial(write, read, memory, *rest):
    """:func:`_step_task` for every (batch, memory), one after another."""
    B, K = memory.shape[:2]
    for task in range(B * K):
        _step_one(task // K, task % K, write, read, memory, *rest)


@njit(parallel=True, **_JIT)
def _block_step_parallel(write, read, memory, *rest):
    """:func:`_step_task` for every (batch, memory), on the cores."""
    B, K = memory.shape[:2]
    for task in prange(B * K):
        _step_one(task // K, task % K, write, read, memory, *rest)


# one token is little work: waking the pool costs more than it saves below this many elements
# (measured: 0.21 ms a call on 2 threads at B=8, K=2, N=65, D=16, against ~0.02 ms serially)
PARALLEL_STEP_ELEMENTS = 1 << 18


def _step_op(ops, write, read, memory, sw, gw, sr, gr, erase, add, *, lag):
    dtype = _COMPUTE[_dtype_name(memory)]
    B, K, N, D = memory.shape
    out = {
        "reads": _output((B, K, D), dtype),
        "memory": _output((B, K, N, D), dtype),
        "write": _output((B, K, N), dtype),
        "read": _output((B, K, N), dtype),
    }
    zero, one, _ = _scalars(dtype)
    kernel = _block_step_serial
    if B * K * N * D >= PARALLEL_STEP_ELEMENTS:
        numba.set_num_threads(threads())
        kernel = _block_step_parallel
    kernel(
        *(_to_numpy(ops, x, dtype, x.ndim) for x in (write, read, memory, sw, gw, sr, gr)),
        _to_numpy(ops, erase, dtype), _to_numpy(ops, add, dtype), _homes(N, 0, K),
        _homes(N, lag, K), zero, one, *out.values(),
    )  # fmt: skip
    return tuple(_from_numpy(ops, x, memory) for x in out.values())


def _step_backward(ops, inputs, residuals, cotangents, *, lag):
    raise NotImplementedError(
        "the fused step form (numba_cpu.block_step) has no backward: differentiate the "
        "parallel form (PNTM.forward), or step with a framework backend"
    )


def block_step(
    ops: Backend,
    write: Array,
    read: Array,
    memory: Array,
    write_shift: Array,
    write_gate: Array,
    read_shift: Array,
    read_gate: Array,
    erase: Array,
    add: Array,
    read_lag: int | tuple[int, ...] = 0,
) -> tuple[Array, Array, Array, Array]:
    """``Backend.block_step`` with location reads in one kernel call (decoding). A step that
    PyTorch would differentiate runs the framework operations (``step_block``); MLX cannot
    tell, and differentiating the fused step there raises."""
    inputs = (write, read, memory, write_shift, write_gate, read_shift, read_gate, erase, add)
    _check_dtypes(
        dict(zip(("write", "read", "memory"), inputs[:3], strict=True)), ("float32", "float64")
    )
    lags = np.asarray(read_lag)
    static_lag = tuple(int(x) for x in lags.ravel()) if lags.ndim else int(lags)
    if ops.framework == "torch":
        if _needs_backward(ops, inputs):
            return step_block(ops, *inputs, read_lag)
        return _step_op(ops, *inputs, lag=static_lag)
    return ops.custom_vjp(_step_op, _step_backward, 4, lag=static_lag)(*inputs)


# ====================================================================== linear scan: operation


def _linear_forward_op(ops, a, b, h0):
    dtype = _COMPUTE[_dtype_name(b)]
    a_, b_, h0_ = (_to_numpy(ops, v, dtype) for v in (a, b, h0))
    B, T = b.shape[:2]
    shape = (B, T, int(np.prod(b.shape[2:], dtype=np.int64)))
    h = _output(shape, dtype)
    numba.set_num_threads(threads())
    _linear_forward(a_.reshape(shape), b_.reshape(shape), h0_.reshape(B, -1), LINEAR_BLOCK, h)
    out = _from_numpy(ops, h.reshape(b.shape), b)
    return out, out


def _linear_backward_op(ops, inputs, residuals, cotangents):
    a, b, h0 = inputs
    dtype = _COMPUTE[_dtype_name(b)]
    B, T = b.shape[:2]
    shape = (B, T, int(np.prod(b.shape[2:], dtype=np.int64)))
    a_, h_, h0_, d_h = (_to_numpy(ops, v, dtype) for v in (a, residuals[0], h0, cotangents[0]))
    d_a, d_b, d_h0 = _output(shape, dtype), _output(shape, dtype), _output((B, shape[2]), dtype)
    numba.set_num_threads(threads())
    _linear_backward(
        a_.reshape(shape), h_.reshape(shape), h0_.reshape(B, -1), d_h.reshape(shape),
        LINEAR_BLOCK, d_a, d_b, d_h0,
    )  # fmt: skip
    return (
        _from_numpy(ops, d_a.reshape(a.shape), a),
        _from_numpy(ops, d_b.reshape(b.shape), b),
        _from_numpy(ops, d_h0.reshape(h0.shape), h0),
    )


def linear_scan(ops: Backend, a: Array, b: Array, h0: Array) -> Array:
    """``Backend.linear_scan`` as one fused operation with its own backward."""
    _check_dtypes(dict(a=a, b=b, h0=h0), tuple(_COMPUTE))
    if b.shape[1] == 0 or 0 in b.shape:
        return ops.zeros_like(b)
    return ops.custom_vjp(_linear_forward_op, _linear_backward_op, 1)(a, b, h0)


# ====================================================================== MLX on the CPU: BLAS
# MLX's Linux CPU wheels (``mlx[cpu]``) link the reference BLAS: measured here, 5-6 GFLOP/s for
# a float32 matrix multiply, against 240-340 GFLOP/s for NumPy's (OpenBLAS) on the same core.
# At the P-NTM's sizes that made the dense layers' multiplies (controller, MLP, output) most of
# an MLX training step, so this backend runs them (``Backend.project``) through NumPy. Like
# the kernels, such an operation evaluates its operands, and in the backward its cotangent, at
# once. That is harmless between the P-NTM's kernels, whose graphs they already cut, but not
# for any multiply: evaluating one cotangent of the NTM's 512-step backward alone kept all of
# that backward's intermediates alive (peak 10.4 GB against 0.47 GB, 4.3 s against 2.9 s,
# measured), which is why plain ``matmul`` stays MLX's. On macOS MLX multiplies with Accelerate
# and keeps its own. (``docs/design.md``, "Fused CPU kernels".)

#: whether MLX's multiplies go through NumPy's BLAS on this platform (MLX on the CPU only)
BLAS_FOR_MLX = sys.platform != "darwin"
#: the smallest multiply (rows x inner x columns) that NumPy's BLAS runs for MLX: below it the
#: call and the copies cost more than MLX's own multiply saves (measured: ``docs/performance.md``)
BLAS_MIN_WORK = 1 << 19


def _blas_forward_op(ops, a, b):
    dtype = _COMPUTE[_dtype_name(a)]
    a_, b_ = _to_numpy(ops, a, dtype), _to_numpy(ops, b, dtype)
    out = a_.reshape(-1, a_.shape[-1]) @ b_
    return (_from_numpy(ops, out.reshape(*a.shape[:-1], b.shape[-1]), a),)


def _blas_backward_op(ops, inputs, residuals, cotangents):
    a, b = inputs
    dtype = _COMPUTE[_dtype_name(a)]
    a_, b_ = _to_numpy(ops, a, dtype), _to_numpy(ops, b, dtype)
    g = _to_numpy(ops, cotangents[0], dtype).reshape(-1, b.shape[-1])
    d_a = (g @ b_.T).reshape(a.shape)
    d_b = a_.reshape(-1, a.shape[-1]).T @ g
    return _from_numpy(ops, d_a, a), _from_numpy(ops, d_b, b)


def set_blas_threads(n: int) -> None:
    """NumPy's BLAS threads in this process. OpenBLAS's idle workers spin, and beside the
    kernels' pool on 2 cores its 2 threads made an MLX step at T = 512 18% slower than 1
    (measured: 172 ms against 145 ms)."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=n, user_api="blas")


def blas_threads() -> int | None:
    """The threads of NumPy's BLAS (the first BLAS library threadpoolctl finds)."""
    import threadpoolctl

    pools = threadpoolctl.threadpool_info()
    return next((pool["num_threads"] for pool in pools if pool["user_api"] == "blas"), None)


def blas_matmul(ops: Backend, a: Array, b: Array) -> Array | None:
    """``a @ b`` through NumPy's BLAS, with its own backward, for MLX arrays on the CPU (where
    :data:`BLAS_FOR_MLX`; ``MLXBackend.project``), where ``b`` is a matrix and the multiply is
    large enough to gain (:data:`BLAS_MIN_WORK`); None where MLX's own multiply should run."""
    if b.ndim != 2 or a.ndim < 2:
        return None
    if _dtype_name(a) not in ("float32", "float64") or _dtype_name(b) != _dtype_name(a):
        return None
    if a.size * b.shape[1] < BLAS_MIN_WORK:
        return None
    return ops.custom_vjp(_blas_forward_op, _blas_backward_op, 1)(a, b)
