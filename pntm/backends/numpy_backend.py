"""The NumPy framework: float64 arrays, no autodiff.

With the ``sequential`` scans (plain loops over time) this is the ``numpy`` backend, the ground
truth of the conformance suite; the hand-written reverse mode of its scans (backpropagation
through time) is :mod:`pntm.backends.scans.reference`, itself checked against central finite
differences in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pntm.backends.base import Array, Backend


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"
    trainable = False

    def __init__(self, dtype: Any = np.float64, scan: str = "sequential") -> None:
        super().__init__(scan)
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

    @classmethod
    def describe(cls) -> str:
        return f"NumPy {np.__version__} on cpu, float64"
