"""The MLX framework (Metal GPU on Apple silicon, CPU elsewhere), float32.

With the ``chunked`` scans (MLX operations) this is the ``mlx`` backend.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from pntm.backends.base import (
    Array,
    Backend,
    ProcessGroup,
    ProcessGroupError,
    check_attention_shapes,
    check_lstm_shapes,
    collective_timeout_s,
    exit_now,
)

# set by mlx.launch (ring) and by MPI launchers: this process is one rank of several
_LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class MLXBackend(Backend):
    name = "mlx"
    framework = "mlx"

    def __init__(self, dtype: Any = mx.float32, scan: str = "chunked") -> None:
        self.float_dtype = dtype
        self.complex_dtype = mx.complex64
        self.int_dtype = mx.int32
        self.on_cpu = mx.default_device() == mx.cpu
        self._custom: dict[tuple, Callable[..., Any]] = {}
        super().__init__(scan)
        # MLX's Linux CPU build multiplies with the reference BLAS; the CPU kernels' module
        # runs large multiplies through NumPy's instead (numba_cpu.blas_matmul)
        self._numpy_blas = self.on_cpu and getattr(self.scan_module, "BLAS_FOR_MLX", False)

    @classmethod
    def describe(cls) -> str:
        return f"MLX {mx.__version__} on {mx.default_device()}"

    @classmethod
    def accelerator(cls) -> str | None:
        return "metal" if mx.metal.is_available() else None

    def set_framework_threads(self, threads: int) -> None:
        if self._numpy_blas:  # MLX itself has no thread setting; NumPy's BLAS has
            self.scan_module.set_blas_threads(threads)

    def framework_threads(self) -> int | None:
        return self.scan_module.blas_threads() if self._numpy_blas else None

    def memory_limit(self) -> int | None:
        if mx.metal.is_available():  # unified memory: what Metal recommends for one process
            info = getattr(mx, "device_info", None) or mx.metal.device_info
            return int(info()["max_recommended_working_set_size"])
        return super().memory_limit()

    def _join_process_group(self) -> ProcessGroup:
        launched = any(name in os.environ for name in _LAUNCHER_VARIABLES)
        group = mx.distributed.init() if launched else None
        return MLXProcessGroup(group) if group and group.size() > 1 else ProcessGroup()

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
            # converted in one go: mx.array of float64 data is float32 unless told
            return mx.array(x, dtype=dtype) if dtype is not None else mx.array(x)
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

    def project(self, x, w):
        out = self.scan_module.blas_matmul(self, x, w) if self._numpy_blas else None
        return mx.matmul(x, w) if out is None else out

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

    # the peers' primitives
    def lstm(self, x, h0, c0, w_ih, w_hh, bias):
        """MLX has no fused LSTM: ``x W_ih + bias`` for all steps in one matmul, then the
        recurrence step by step with ``addmm`` (what ``mlx.nn.LSTM`` does)."""
        check_lstm_shapes(x, h0, c0, w_ih, w_hh, bias)
        xw = mx.addmm(bias, x, w_ih)
        h, c, outputs = h0, c0, []
        for z in self.unstack(xw, 1):
            i, f, g, o = mx.split(mx.addmm(z, h, w_hh), 4, axis=-1)
            c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
            h = mx.sigmoid(o) * mx.tanh(c)
            outputs.append(h)
        return mx.stack(outputs, axis=1), (h, c)

    def attention(self, q, k, v, causal):
        """``mx.fast.scaled_dot_product_attention``; its ``"causal"`` mask is aligned to the
        lower right (the last query sees the last key), as a KV cache needs."""
        check_attention_shapes(q, k, v, causal)
        mask = "causal" if causal and q.shape[-2] > 1 else None
        scale = 1.0 / float(q.shape[-1]) ** 0.5
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    # autodiff
    def stop_gradient(self, x):
        return mx.stop_gradient(x)

    def value_and_grad(self, fn: Callable[..., Any], has_aux: bool = False):
        # mx.value_and_grad differentiates the first output when fn returns a tuple
        return mx.value_and_grad(fn)

    def eval(self, *arrays):
        mx.eval(*arrays)

    def reset_peak_memory(self) -> None:
        if not self.on_cpu:
            mx.reset_peak_memory()

    def peak_memory(self) -> int | None:
        return None if self.on_cpu else int(mx.get_peak_memory())

    def custom_vjp(self, forward, backward, n_outputs, **static):
        def op(*inputs):
            present = tuple(x is not None for x in inputs)
            key = (forward, backward, n_outputs, present, tuple(sorted(static.items())))
            if key not in self._custom:
                self._custom[key] = self._make_custom(forward, backward, n_outputs, present, static)
            outputs = self._custom[key](*(x for x in inputs if x is not None))[:n_outputs]
            return outputs[0] if n_outputs == 1 else tuple(outputs)

        return op

    def _make_custom(self, forward, backward, n_outputs, present, static):
        """An ``mx.custom_function`` over the inputs that are not None; the residuals are extra
        outputs, so that the VJP receives them without recomputing."""
        ops = self

        def full(arrays):
            it = iter(arrays)
            return [next(it) if p else None for p in present]

        @mx.custom_function
        def fn(*arrays):
            return tuple(forward(ops, *full(arrays), **static))

        @fn.vjp
        def fn_vjp(primals, cotangents, outputs):
            grads = backward(
                ops, full(primals), outputs[n_outputs:], cotangents[:n_outputs], **static
            )
            return tuple(g for g, p in zip(grads, present, strict=True) if p)

        return fn


class MLXProcessGroup(ProcessGroup):
    """The ranks of an ``mlx.launch`` (ring or MPI) launch: ``mx.distributed`` collectives."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.engine = "mlx.distributed"
        # MLX's collectives wait for ever (a stopped peer hung a job for good); a watchdog
        # ends this process when one outlasts the timeout, as PyTorch's own timeout does
        self.timeout_s = collective_timeout_s()
        self._deadline: float | None = None
        self._local_peers = self._find_local_peers()
        threading.Thread(target=self._watch, daemon=True).start()

    def _find_local_peers(self) -> list[int]:
        """Process ids of the other ranks on this machine (one collective at the start).
        mlx.launch neither ends a job when a rank exits nor stops the rest, so a rank that
        gives up on a hung (stopped) peer ends its local peers itself; ranks on other
        machines are their launcher's to end."""
        host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
        mine = np.zeros((self.size, 2), np.int32)
        mine[self.rank] = host, os.getpid()
        table = np.array(mx.distributed.all_sum(mx.array(mine), group=self.group))
        return [int(pid) for r, (h, pid) in enumerate(table) if r != self.rank and h == host]

    def _watch(self) -> None:
        """Watchdog: ends this process, saying why, once a collective passes its deadline.
        The main thread is blocked inside MLX, so it cannot be told to raise; the run
        directory's checkpoints are written by rename, so the last one is whole."""
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            deadline = self._deadline
            if deadline is None or time.monotonic() < deadline:
                continue
            for pid in self._local_peers:  # a stopped process ends by SIGKILL alone
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            ended = (
                f"; its {len(self._local_peers)} other process(es) on this machine ended"
                if self._local_peers
                else ""
            )
            exit_now(
                f"Error: process {self.rank} of {self.size} lost contact with the others "
                f"({self.engine}: no answer within {self.timeout_s:g} s); another process of "
                f"the run has probably died or stopped{ended}; the run's last checkpoint is "
                "kept"
            )

    def _sum_flat(self, pieces: list[Array]) -> Array:
        return self._all_sum(mx.concatenate(pieces))

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        total = self._all_sum(mx.array(list(values), dtype=mx.float32))
        return [float(v) for v in total.tolist()]

    def _all_sum(self, x: mx.array) -> mx.array:
        """The sum, evaluated here so that a lost peer is reported here (MLX is lazy)."""
        mx.eval(x)  # this process's own work (MLX is lazy) is not waiting for the others
        self._deadline = time.monotonic() + self.timeout_s
        try:
            total = mx.distributed.all_sum(x, group=self.group)
            mx.eval(total)
        except RuntimeError as exc:  # the ring backend's "connection to a peer was lost"
            raise ProcessGroupError(self, exc) from exc
        finally:
            self._deadline = None
        return total
