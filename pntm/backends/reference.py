"""The sequential reference backend: NumPy, float64, plain loops over time.

This is the ground truth of the conformance suite. Its scan primitives are the recurrences of
SPEC §2 written as loops, with hand-written reverse-mode gradients (backpropagation through
time), themselves checked against central finite differences in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pntm.backends import sequential
from pntm.backends.base import Array, Backend, read_step_vjp


class NumpyBackend(Backend):
    name = "numpy"
    trainable = False

    def __init__(self, dtype: Any = np.float64) -> None:
        self.float_dtype = np.dtype(dtype)
        self.complex_dtype = np.result_type(self.float_dtype, np.complex64)
        self.int_dtype = np.dtype(np.int64)

    # creation and conversion
    def asarray(self, x: Any, dtype: Any = None) -> np.ndarray:
        x = np.asarray(x)
        if dtype is None:
            if np.iscomplexobj(x):
                dtype = self.complex_dtype
            elif np.issubdtype(x.dtype, np.floating):
                dtype = self.float_dtype
            elif np.issubdtype(x.dtype, np.integer):
                dtype = self.int_dtype
        return x.astype(dtype) if dtype is not None else x

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def zeros_like(self, x):
        return np.zeros_like(x)

    # elementwise
    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def tanh(self, x):
        return np.tanh(x)

    def sigmoid(self, x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))

    def softplus(self, x):
        return np.logaddexp(0.0, x)

    def sqrt(self, x):
        return np.sqrt(x)

    def gelu(self, x):
        return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))

    def where(self, cond, x, y):
        return np.where(cond, x, y)

    def one_hot(self, indices, depth):
        return (np.asarray(indices)[..., None] == np.arange(depth)).astype(self.float_dtype)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def argmax(self, x, axis=-1):
        return np.argmax(x, axis=axis)

    # linear algebra and shape
    def matmul(self, a, b):
        return a @ b

    def reshape(self, x, shape: Sequence[int]):
        return np.reshape(x, tuple(shape))

    def transpose(self, x, axes):
        return np.transpose(x, tuple(axes))

    def concat(self, xs, axis):
        return np.concatenate(list(xs), axis=axis)

    def stack(self, xs, axis):
        return np.stack(list(xs), axis=axis)

    def unstack(self, x, axis):
        return list(np.moveaxis(x, axis, 0))

    def take(self, table, indices):
        return table[np.asarray(indices)]

    def roll(self, x, shift, axis):
        return np.roll(x, shift, axis=axis)

    def flip(self, x, axis):
        return np.flip(x, axis=axis)

    # complex and FFT
    def complex(self, real, imag):
        return real + 1j * imag

    def conj(self, x):
        return np.conj(x)

    def real(self, x):
        return np.real(x)

    def imag(self, x):
        return np.imag(x)

    def rfft(self, x, axis=-1):
        return np.fft.rfft(x, axis=axis)

    def irfft(self, x, n, axis=-1):
        return np.fft.irfft(x, n=n, axis=axis)

    # autodiff
    def stop_gradient(self, x):
        return x

    # ------------------------------------------------------------------ scans: plain loops
    def linear_scan(self, a, b, h0=None):
        return sequential.linear_scan(self, a, b, h0)

    def memory_scan_read(self, w, erase, add, rho, m0=None, key=None, beta=None, gamma=None):
        reads, states = sequential.memory_scan_read(self, w, erase, add, rho, m0, key, beta, gamma)
        return reads, states[-1]


# ---------------------------------------------------------------------- linear scan


def linear_scan_vjp(
    a: np.ndarray, b: np.ndarray, h0: np.ndarray | None, d_h: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse mode of :func:`pntm.backends.sequential.linear_scan`: ``(da, db, dh0)``.

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


# ---------------------------------------------------------------------- memory scan and reads


def memory_scan_read_vjp(
    w, erase, add, rho, m0, d_read, d_final=None, key=None, beta=None, gamma=None
) -> dict[str, np.ndarray | None]:
    """Backpropagation through time of :func:`pntm.backends.sequential.memory_scan_read`
    (SPEC §4.3): gradients of ``(r, M_T)`` for cotangents ``(d_read, d_final)``.

    ``G_t = dL/dM_t = (read gradient at t) + F_{t+1} ⊙ G_{t+1}``, then
    ``dw_t(i) = sum_d G_t(i,d) (a_t(d) - e_t(d) M_{t-1}(i,d))``,
    ``de_t(d) = -sum_i G_t(i,d) w_t(i) M_{t-1}(i,d)``, ``da_t(d) = sum_i G_t(i,d) w_t(i)``.
    """
    ops = NumpyBackend()
    _, states = sequential.memory_scan_read(ops, w, erase, add, rho, m0, key, beta, gamma)
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
