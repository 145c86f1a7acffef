"""The ground truth of every scan: the reverse mode of :mod:`pntm.backends.scans.sequential`'s
plain loops, written by hand in NumPy (backpropagation through time; float64 in the tests).

Every other scan implementation (``chunked``, ``triton``, ...) is tested against these loops and
their gradients, which are themselves tested against central finite differences.
"""

from __future__ import annotations

import numpy as np

from pntm.backends.base import home_delta, read_step_vjp
from pntm.backends.numpy_backend import NumpyBackend
from pntm.backends.scans import sequential

# ---------------------------------------------------------------------- linear scan


def linear_scan_vjp(
    a: np.ndarray, b: np.ndarray, h0: np.ndarray | None, d_h: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse mode of :func:`pntm.backends.scans.sequential.linear_scan`: ``(da, db, dh0)``.

    Complex values use the convention of PyTorch: the cotangent of ``z`` is
    ``dL/dRe(z) + i dL/dIm(z)``, so a product ``y = a z`` sends ``conj(a) * dy`` back to ``z``.
    """
    h = sequential.linear_scan(NumpyBackend(), a, b, h0)
    T = b.shape[1]
    prev = np.concatenate(
        [(np.zeros_like(h[:, :1]) if h0 is None else h0[:, None]).astype(h.dtype), h[:, :-1]],
        axis=1,
    )
    a_full = np.broadcast_to(a, h.shape)
    d_b = np.empty_like(h)
    carry = np.zeros_like(h[:, 0])  # dL/dh_t arriving from step t+1
    for t in reversed(range(T)):
        carry = carry + d_h[:, t]
        d_b[:, t] = carry
        carry = np.conj(a_full[:, t]) * carry
    d_a = d_b * np.conj(prev)
    return d_a, d_b, carry


# ---------------------------------------------------------------------- head recurrence


def head_scan_vjp(
    shift: np.ndarray,
    gate: np.ndarray,
    n_slots: int,
    start: np.ndarray | None,
    lag,
    d_w: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse mode of :func:`pntm.backends.scans.sequential.head_scan`: ``(d_shift, d_gate,
    d_start)`` (``d_start`` of ``w_0``, the home where ``start`` is None).

    With ``c_t = d_w_t + (1 - g_{t+1}) (s_{t+1} ⋆ c_{t+1})``: ``d_s_t(j) = (1 - g_t) sum_i
    c_t(i) w_{t-1}(i - j)``, ``d_g_t = sum_i c_t(i) (h(i) - (s_t ⊛ w_{t-1})(i))``."""
    ops = NumpyBackend()
    w = sequential.head_scan(ops, shift, gate, n_slots, start, lag)
    B, T, K, J = shift.shape
    S = J // 2
    home = np.broadcast_to(home_delta(n_slots, lag), (K, n_slots))
    first = np.broadcast_to(home, (B, K, n_slots)) if start is None else start
    d_shift, d_gate = np.zeros_like(shift), np.zeros_like(gate)
    carry = np.zeros((B, K, n_slots))
    for t in reversed(range(T)):
        c = d_w[:, t] + carry
        prev = first if t == 0 else w[:, t - 1]
        keep = 1 - gate[:, t]
        moved = np.zeros_like(prev)
        carry = np.zeros_like(prev)
        for j in range(-S, S + 1):
            rolled = np.roll(prev, j, axis=-1)  # prev(i - j)
            d_shift[:, t, :, j + S] = keep * np.sum(c * rolled, axis=-1)
            moved += shift[:, t, :, j + S, None] * rolled
            carry += shift[:, t, :, j + S, None] * np.roll(c, -j, axis=-1)  # c(p + j)
        d_gate[:, t] = np.sum(c * (home - moved), axis=-1)
        carry = keep[..., None] * carry
    return d_shift, d_gate, carry


# ---------------------------------------------------------------------- memory scan and reads


def memory_scan_read_vjp(
    w, erase, add, rho, m0, d_read, d_final=None, key=None, beta=None, gamma=None
) -> dict[str, np.ndarray | None]:
    """Backpropagation through time of :func:`pntm.backends.scans.sequential.memory_scan_states`
    (SPEC §4.3): gradients of ``(r, M_T)`` for cotangents ``(d_read, d_final)``.

    ``G_t = dL/dM_t = (read gradient at t) + F_{t+1} ⊙ G_{t+1}``, then
    ``dw_t(i) = sum_d G_t(i,d) (a_t(d) - e_t(d) M_{t-1}(i,d))``,
    ``de_t(d) = -sum_i G_t(i,d) w_t(i) M_{t-1}(i,d)``, ``da_t(d) = sum_i G_t(i,d) w_t(i)``.
    """
    ops = NumpyBackend()
    _, states = sequential.memory_scan_states(ops, w, erase, add, rho, m0, key, beta, gamma)
    T = w.shape[1]
    grads = {name: np.zeros_like(x) for name, x in dict(w=w, erase=erase, add=add, rho=rho).items()}
    if key is not None:
        grads.update(key=np.zeros_like(key), beta=np.zeros_like(beta), gamma=np.zeros_like(gamma))
    carry = np.zeros_like(states[-1]) if d_final is None else d_final.copy()
    for t in reversed(range(T)):
        memory, prev = states[t + 1], states[t]
        content = (key[:, t], beta[:, t], gamma[:, t]) if key is not None else (None, None, None)
        d_mem, d_rho, d_key, d_beta, d_gamma = read_step_vjp(
            ops, memory, rho[:, t], d_read[:, t], *content
        )
        g = carry + d_mem  # G_t
        grads["rho"][:, t] = d_rho
        if key is not None:
            grads["key"][:, t], grads["beta"][:, t], grads["gamma"][:, t] = d_key, d_beta, d_gamma
        wt, et, at = w[:, t], erase[:, t], add[:, t]
        g_prev = g * prev
        grads["w"][:, t] = np.einsum("bknd,bkd->bkn", g, at) - np.einsum(
            "bknd,bkd->bkn", g_prev, et
        )
        grads["erase"][:, t] = -np.einsum("bkn,bknd->bkd", wt, g_prev)
        grads["add"][:, t] = np.einsum("bkn,bknd->bkd", wt, g)
        carry = (1.0 - wt[..., None] * et[..., None, :]) * g  # F_t ⊙ G_t -> dL/dM_{t-1}
    grads["m0"] = carry
    return grads
