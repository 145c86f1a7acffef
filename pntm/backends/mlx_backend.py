"""MLX backend: MLX operations only (Metal GPU on Apple silicon, CPU elsewhere), float32.

The scans are the framework parallel path of :mod:`pntm.backends.parallel`; the memory scan is
one ``mx.custom_function`` whose VJP is SPEC §4.3 in MLX operations. Its forward returns the
chunk-start states as extra outputs so that the VJP receives them without recomputing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from pntm.backends import parallel
from pntm.backends.base import Array
from pntm.backends.parallel import FrameworkBackend


class MLXBackend(FrameworkBackend):
    name = "mlx"

    def __init__(self, dtype: Any = mx.float32, scan: str = "parallel") -> None:
        super().__init__(scan)
        self.float_dtype = dtype
        self.complex_dtype = mx.complex64
        self.int_dtype = mx.int32
        self._memory_scans: dict[tuple[bool, int], Callable[..., Any]] = {}
        self._linear_scans: dict[int, Callable[..., Any]] = {}
        # CPUs want few, cache-sized chunks; GPUs as many as the sqrt(T) rule allows
        on_cpu = mx.default_device() == mx.cpu
        self.target_step_elements = parallel.CPU_STEP_ELEMENTS if on_cpu else None

    # creation and conversion
    def asarray(self, x: Any, dtype: Any = None) -> mx.array:
        if not isinstance(x, mx.array):
            x = np.asarray(x)
            if dtype is None:
                if np.iscomplexobj(x):
                    dtype = self.complex_dtype
                elif np.issubdtype(x.dtype, np.floating):
                    dtype = self.float_dtype
                elif np.issubdtype(x.dtype, np.integer):
                    dtype = self.int_dtype
            x = mx.array(x)
        return x.astype(dtype) if dtype is not None else x

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.array(x)

    def zeros_like(self, x):
        return mx.zeros_like(x)

    def ones_like(self, x):
        return mx.ones_like(x)

    # elementwise
    def exp(self, x):
        return mx.exp(x)

    def log(self, x):
        return mx.log(x)

    def tanh(self, x):
        return mx.tanh(x)

    def sigmoid(self, x):
        return mx.sigmoid(x)

    def softplus(self, x):
        return mx.logaddexp(x, 0.0)

    def sqrt(self, x):
        return mx.sqrt(x)

    def gelu(self, x):
        return 0.5 * x * (1.0 + mx.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    def where(self, cond, x, y):
        return mx.where(cond, x, y)

    def one_hot(self, indices, depth):
        return (indices[..., None] == mx.arange(depth)).astype(self.float_dtype)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return mx.max(x, axis=axis, keepdims=keepdims)

    def argmax(self, x, axis=-1):
        return mx.argmax(x, axis=axis)

    def softmax(self, x, axis=-1):
        return mx.softmax(x, axis=axis, precise=True)

    def log_softmax(self, x, axis=-1):
        return x - mx.logsumexp(x, axis=axis, keepdims=True)

    # linear algebra and shape
    def matmul(self, a, b):
        return mx.matmul(a, b)

    def reshape(self, x, shape):
        return mx.reshape(x, tuple(shape))

    def transpose(self, x, axes):
        return mx.transpose(x, tuple(axes))

    def concat(self, xs, axis):
        return mx.concatenate(list(xs), axis=axis)

    def stack(self, xs, axis):
        return mx.stack(list(xs), axis=axis)

    def unstack(self, x, axis):
        return [mx.squeeze(part, axis) for part in mx.split(x, x.shape[axis], axis=axis)]

    def take(self, table, indices):
        return mx.take(table, indices, axis=0)

    def roll(self, x, shift, axis):
        return mx.roll(x, shift, axis=axis)

    def flip(self, x, axis):
        index = [slice(None)] * x.ndim
        index[axis] = slice(None, None, -1)
        return x[tuple(index)]

    # complex and FFT
    def complex(self, real, imag):
        return real.astype(mx.complex64) + mx.array(1j, dtype=mx.complex64) * imag

    def conj(self, x):
        return mx.conj(x) if x.dtype == mx.complex64 else x

    def real(self, x):
        return mx.real(x)

    def imag(self, x):
        return mx.imag(x)

    def rfft(self, x, axis=-1):
        return mx.fft.rfft(x, axis=axis)

    def irfft(self, x, n, axis=-1):
        return mx.fft.irfft(x, n=n, axis=axis)

    # autodiff
    def stop_gradient(self, x):
        return mx.stop_gradient(x)

    def value_and_grad(self, fn: Callable[..., Any], has_aux: bool = False):
        # mx.value_and_grad differentiates the first output when fn returns a tuple
        return mx.value_and_grad(fn)

    def eval(self, *arrays):
        mx.eval(*arrays)

    def _linear_scan_op(self, a, b, h0, chunk):
        if chunk not in self._linear_scans:
            self._linear_scans[chunk] = self._make_linear_scan(chunk)
        return self._linear_scans[chunk](a, b, h0)

    def _make_linear_scan(self, chunk: int) -> Callable[..., Any]:
        ops = self

        @mx.custom_function
        def linear_scan(a, b, h0):
            return parallel.scan_forward(ops, a, b, h0, chunk)

        @linear_scan.vjp
        def linear_scan_vjp(primals, cotangent, output):
            a, _, h0 = primals
            return parallel.scan_backward(ops, a, output, h0, cotangent, chunk)

        return linear_scan

    def _memory_scan_op(self, w, erase, add, rho, m0, key, beta, gamma, chunk):
        content = key is not None
        if (content, chunk) not in self._memory_scans:
            self._memory_scans[content, chunk] = self._make_memory_scan(content, chunk)
        inputs = (w, erase, add, rho, m0) + ((key, beta, gamma) if content else ())
        reads, final, _, _ = self._memory_scans[content, chunk](*inputs)
        return reads, final

    def _make_memory_scan(self, content: bool, chunk: int) -> Callable[..., Any]:
        ops = self

        @mx.custom_function
        def memory_scan(w, erase, add, rho, m0, *extra):
            return parallel.memory_scan_forward(ops, w, erase, add, rho, m0, *extra, chunk=chunk)

        @memory_scan.vjp
        def memory_scan_vjp(primals, cotangents, outputs):
            w, erase, add, rho, _m0, *extra = primals
            extra = extra or [None, None, None]
            g = parallel.memory_scan_backward(
                ops,
                w,
                erase,
                add,
                rho,
                outputs[2],
                outputs[3],
                cotangents[0],
                cotangents[1],
                *extra,
                chunk=chunk,
            )
            names = ["w", "erase", "add", "rho", "m0"] + (
                ["key", "beta", "gamma"] if content else []
            )
            return tuple(g[n] for n in names)

        return memory_scan
