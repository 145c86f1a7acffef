"""The backend interface: the operations the models need, and nothing else.

A model is written once against :class:`Backend`. Arrays are the backend's native arrays
(``np.ndarray``, ``torch.Tensor``, ``mx.array``); Python arithmetic (``+ - * /``), ``x[..., None]``
and basic slicing work on all of them, everything else goes through a method here.

A backend is a *framework* (this class: arrays, math, autodiff) and a *scan implementation*
(a module of :mod:`pntm.backends.scans`). Backends differ in algorithm only in the two scan
primitives, :meth:`Backend.linear_scan` and :meth:`Backend.memory_scan_read`, which every
framework delegates to the scan module it was built with: plain loops (``sequential``), chunked
parallel scans in framework operations (``chunked``), or fused kernels (``triton``, ``metal``).

Layout convention: time is axis 1 of every per-step input, ``(B, T, ...)``.
"""

from __future__ import annotations

import abc
import importlib
import math
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn

import numpy as np

Array = Any

# Added inside the norms of content addressing, ``sqrt(|x|^2 + eps)``, so that the cosine of an
# all-zero memory slot (every slot at the start) is 0 with a bounded gradient.
COSINE_EPS = 1e-6


class ProcessGroupError(RuntimeError):
    """A collective failed: another process of the run died or cannot be reached."""

    def __init__(self, group: ProcessGroup, cause: BaseException) -> None:
        said = str(cause).split(". ")[0] or type(cause).__name__  # the engines' first sentence
        super().__init__(
            f"process {group.rank} of {group.size} lost contact with the others "
            f"({group.engine}: {said}); another process of the run has probably died"
        )


def collective_timeout_s() -> float:
    """Seconds a collective waits for its peers before the run gives up on them (a rank that
    died, or stopped, without its launcher noticing): ``PNTM_COLLECTIVE_TIMEOUT`` where set,
    else 300. Both engines use it (PyTorch's own timeout; a watchdog for MLX's, which has
    none)."""
    raw = os.environ.get("PNTM_COLLECTIVE_TIMEOUT", "300")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(
            f"PNTM_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {raw!r}"
        )
    return seconds


class ProcessGroup:
    """The processes of one data-parallel run. This base class is the run of one process:
    rank 0 of 1, and sums that return their input."""

    rank: int = 0
    size: int = 1
    #: how the processes talk, for messages (e.g. ``torch.distributed (gloo)``)
    engine: str = "one process"

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that prints and writes files."""
        return self.rank == 0

    def sum(self, arrays: list[Array]) -> list[Array]:
        """Elementwise sums over every process of each array: one collective for all of them,
        on their concatenation (:meth:`_sum_flat`)."""
        if self.size == 1 or not arrays:
            return arrays
        flat = self._sum_flat([a.reshape(-1) for a in arrays])
        out, offset = [], 0
        for a in arrays:
            n = math.prod(a.shape)
            out.append(flat[offset : offset + n].reshape(a.shape))
            offset += n
        return out

    def _sum_flat(self, pieces: list[Array]) -> Array:
        """The sum over every process of the concatenation of 1-D ``pieces``."""
        raise NotImplementedError(f"{type(self).__name__} has no collective")

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sums over every process of a few host numbers (metrics)."""
        return [float(v) for v in values]

    def close(self) -> None:
        """Leave the group (at the end of a run)."""


class Backend(abc.ABC):
    """Array operations, autodiff and the two scan primitives of P-NTM."""

    name: str = ""
    #: the framework's name, as scan modules list it in their ``FRAMEWORKS``
    framework: str = ""
    #: whether :meth:`value_and_grad` exists (the NumPy reference has hand-written scan gradients
    #: only, so it evaluates models but does not train them)
    trainable: bool = True
    #: whether arrays live on a CPU (scan implementations size their work by it)
    on_cpu: bool = True

    def __init__(self, scan: str) -> None:
        self.scan = scan  # its name, e.g. "chunked"
        self.scan_module = load_scans(scan, self.framework)  # the module that implements it

    @classmethod
    @abc.abstractmethod
    def describe(cls) -> str:
        """Framework, version and device, e.g. ``PyTorch 2.13.0 on cuda``."""

    @classmethod
    def accelerator(cls) -> str | None:
        """The accelerator this framework would use here (``cuda``, ``metal``), if any."""
        return None

    # ------------------------------------------------------------------ creation and conversion
    float_dtype: Any
    complex_dtype: Any
    int_dtype: Any

    @abc.abstractmethod
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """NumPy (or Python) data -> native array; floats become ``float_dtype`` unless given."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray: ...

    def zeros(self, shape: Sequence[int], dtype: Any = None) -> Array:
        return self.asarray(np.zeros(tuple(shape)), dtype)

    def ones(self, shape: Sequence[int], dtype: Any = None) -> Array:
        return self.asarray(np.ones(tuple(shape)), dtype)

    @abc.abstractmethod
    def zeros_like(self, x: Array) -> Array:
        """Zeros of ``x``'s shape, dtype and device."""

    def ones_like(self, x: Array) -> Array:
        return self.zeros_like(x) + 1

    # ------------------------------------------------------------------ elementwise math
    @abc.abstractmethod
    def exp(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def log(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def tanh(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sigmoid(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def softplus(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sqrt(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def gelu(self, x: Array) -> Array:
        """The tanh approximation, identical on every backend."""

    @abc.abstractmethod
    def where(self, cond: Array, x: Array, y: Array) -> Array: ...

    @abc.abstractmethod
    def one_hot(self, indices: Array, depth: int) -> Array:
        """Float one-hot vectors along a new last axis."""

    # ------------------------------------------------------------------ reductions
    @abc.abstractmethod
    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array: ...

    @abc.abstractmethod
    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array: ...

    @abc.abstractmethod
    def argmax(self, x: Array, axis: int = -1) -> Array: ...

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        count = int(np.prod(x.shape)) if axis is None else x.shape[axis]
        return self.sum(x, axis, keepdims) / count

    def softmax(self, x: Array, axis: int = -1) -> Array:
        z = self.exp(x - self.stop_gradient(self.max(x, axis, keepdims=True)))
        return z / self.sum(z, axis, keepdims=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        shifted = x - self.stop_gradient(self.max(x, axis, keepdims=True))
        return shifted - self.log(self.sum(self.exp(shifted), axis, keepdims=True))

    # ------------------------------------------------------------------ linear algebra and shape
    @abc.abstractmethod
    def matmul(self, a: Array, b: Array) -> Array: ...

    def project(self, x: Array, w: Array) -> Array:
        """``x @ w`` for activations ``x`` (..., H) and a weight matrix ``w`` (H, O): the
        multiplies of the dense layers around the scans (controller, MLP, output). A backend
        may run them its own way (``mlx-numba``: through NumPy's BLAS, evaluating the
        operands and, in the backward, the cotangent at once, as its kernels do)."""
        return self.matmul(x, w)

    @abc.abstractmethod
    def reshape(self, x: Array, shape: Sequence[int]) -> Array: ...

    @abc.abstractmethod
    def transpose(self, x: Array, axes: Sequence[int]) -> Array: ...

    @abc.abstractmethod
    def concat(self, xs: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def stack(self, xs: Sequence[Array], axis: int) -> Array: ...

    @abc.abstractmethod
    def unstack(self, x: Array, axis: int) -> list[Array]:
        """Split ``x`` into its slices along ``axis`` (whose gradient is one stack, unlike
        indexing each slice, which costs a full-size gradient per slice)."""

    @abc.abstractmethod
    def take(self, table: Array, indices: Array) -> Array:
        """Rows of ``table`` (V, H) at integer ``indices``: ``(*indices.shape, H)``."""

    @abc.abstractmethod
    def roll(self, x: Array, shift: int, axis: int) -> Array:
        """Circular shift: ``out[i] = x[(i - shift) mod n]`` along ``axis``."""

    @abc.abstractmethod
    def flip(self, x: Array, axis: int) -> Array:
        """Reverse ``x`` along ``axis``."""

    # ------------------------------------------------------------------ complex numbers and FFT
    @abc.abstractmethod
    def complex(self, real: Array, imag: Array) -> Array: ...

    @abc.abstractmethod
    def conj(self, x: Array) -> Array:
        """Complex conjugate (identity on real arrays)."""

    @abc.abstractmethod
    def real(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def imag(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def rfft(self, x: Array, axis: int = -1) -> Array: ...

    @abc.abstractmethod
    def irfft(self, x: Array, n: int, axis: int = -1) -> Array: ...

    # ------------------------------------------------------------------ autodiff and evaluation
    @abc.abstractmethod
    def stop_gradient(self, x: Array) -> Array: ...

    def value_and_grad(
        self, fn: Callable[..., Any], has_aux: bool = False
    ) -> Callable[..., tuple[Any, Any]]:
        """``fn(params, *args) -> loss`` (or ``(loss, aux)``) into
        ``g(params, *args) -> (loss or (loss, aux), grads)``, grads shaped like ``params``."""
        raise NotImplementedError(
            f"backend {self.name!r} evaluates models but does not differentiate them; "
            "train with a framework backend (see `pntm backends`)"
        )

    def eval(self, *arrays: Any) -> None:  # noqa: B027 - only lazy backends (MLX) override it
        """Force evaluation of lazily computed arrays (no-op on eager backends)."""

    def reset_peak_memory(self) -> None:  # noqa: B027 - only GPU backends track it
        """Start a new peak of :meth:`peak_memory`."""

    def peak_memory(self) -> int | None:
        """Bytes of device memory at the peak since :meth:`reset_peak_memory`, where the
        framework reports it (CUDA, Metal); None elsewhere."""
        return None

    def memory_limit(self) -> int | None:
        """Bytes this backend's arrays can use: the device's memory on a GPU, the machine's
        physical memory on a CPU (None where it cannot be read)."""
        return physical_memory()

    def process_group(self) -> ProcessGroup:
        """The processes of this data-parallel run, joined on first use (later calls return
        the same group): the framework's own collectives under its launcher (``torchrun``,
        ``mlx.launch``), else one process. A rank of a launched group ends when its launcher
        is gone (:func:`exit_with_parent`): a launcher killed with SIGKILL cannot stop its
        ranks, which would go on training as orphans, holding the run directory's lock."""
        group = getattr(self, "_process_group", None)  # backends have their own __init__
        if group is None:
            group = self._process_group = self._join_process_group()
            if group.size > 1:
                exit_with_parent(
                    os.getppid(),
                    f"pntm: process {group.rank} of {group.size}: its launcher is gone; "
                    "stopped (the run's last checkpoint is kept)",
                )
        return group

    def set_framework_threads(self, threads: int) -> None:  # noqa: B027 - only PyTorch has one
        """The framework's intra-op threads (PyTorch's; MLX has no such setting)."""

    def framework_threads(self) -> int | None:
        """The framework's intra-op threads, where it has such a setting."""
        return None

    def _join_process_group(self) -> ProcessGroup:
        """Join the launcher's group; one process unless the backend knows its launcher."""
        return ProcessGroup()

    # ------------------------------------------------------------------ memory-write arithmetic
    # Defaults in plain operations; backends may fuse them (they run every step of every scan).
    def decay_mul(self, x: Array, w: Array, erase: Array) -> Array:
        """``(1 - w e^T) ⊙ x`` for ``w`` (..., N), ``erase`` (..., D), ``x`` (..., N, D)."""
        return (1 - w[..., None] * erase[..., None, :]) * x

    def outer_add(self, x: Array, u: Array, v: Array) -> Array:
        """``x + u v^T`` for ``u`` (..., N), ``v`` (..., D), ``x`` (..., N, D)."""
        return x + u[..., None] * v[..., None, :]

    def decay_write(self, memory: Array, w: Array, erase: Array, add: Array) -> Array:
        """One memory write: ``(1 - w e^T) ⊙ M + w a^T``."""
        return self.outer_add(self.decay_mul(memory, w, erase), w, add)

    def custom_vjp(
        self, forward: Callable[..., Any], backward: Callable[..., Any], n_outputs: int, **static
    ) -> Callable[..., Any]:
        """One differentiable operation from a forward and a backward written by hand.

        ``forward(ops, *inputs, **static)`` returns the ``n_outputs`` outputs followed by the
        residuals the backward needs; ``backward(ops, inputs, residuals, cotangents, **static)``
        returns one gradient per input (None for an input that is None). Inputs may be None.
        The operation returns the outputs only (one array if ``n_outputs`` is 1, else a tuple).
        ``forward`` and ``backward`` should be module-level functions and ``static`` hashable
        values: a framework may build (and cache) one operation per such combination.
        This default runs the forward alone: right for a framework without autodiff.
        """

        def op(*inputs):
            outputs = tuple(forward(self, *inputs, **static))[:n_outputs]
            return outputs[0] if n_outputs == 1 else outputs

        return op

    # ------------------------------------------------------------------ the two scan primitives
    def linear_scan(self, a: Array, b: Array, h0: Array | None = None) -> Array:
        """``h_t = a_t * h_{t-1} + b_t`` along axis 1 (time), ``h_0 = h0`` (zeros if None).

        ``a`` and ``b`` are ``(B, T, *rest)`` of one shape, real or complex.
        Returns every ``h_t``, ``(B, T, *rest)``.
        """
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"linear_scan needs a and b of one shape, got {a.shape} and {b.shape}")
        if h0 is None:
            h0 = self.zeros_like(b[:, 0])
        return self.scan_module.linear_scan(self, a, b, h0)

    def memory_scan_read(
        self,
        w: Array,
        erase: Array,
        add: Array,
        rho: Array,
        m0: Array | None = None,
        key: Array | None = None,
        beta: Array | None = None,
        gamma: Array | None = None,
    ) -> tuple[Array, Array]:
        """The memory recurrence of one P-NTM layer with its reads (SPEC §2–3), per head.

        ``M_t = (1 - w_t e_t^T) ⊙ M_{t-1} + w_t a_t^T``, ``M_0 = m0`` (zeros if None), then
        ``r_t = rho_t^T M_t`` where ``rho_t`` is the location weighting ``rho`` mixed, when
        ``key``/``beta``/``gamma`` are given, with content addressing (:func:`read_step`).

        Shapes: ``w``, ``rho`` (B, T, K, N); ``erase``, ``add``, ``key`` (B, T, K, D);
        ``beta``, ``gamma`` (B, T, K); ``m0`` (B, K, N, D).
        Returns ``r`` (B, T, K, D) and the final memory ``M_T`` (B, K, N, D).
        """
        if m0 is None:
            m0 = self.zeros_like(w[:, 0, ..., None] * add[:, 0, :, None, :])
        return self.scan_module.memory_scan_read(self, w, erase, add, rho, m0, key, beta, gamma)

    def head_scan(
        self,
        shift: Array,
        gate: Array,
        n_slots: int,
        start: Array | None = None,
        lag: int | tuple[int, ...] = 0,
        hard: bool = False,
    ) -> Array:
        """All head distributions of the head recurrence (``docs/design.md``, "Heads"):
        ``w_t = (1 - g_t) (s_t ⊛ w_{t-1}) + g_t delta_{-lag}`` over ``n_slots`` slots, a circular
        convolution of the shift distribution ``s_t`` over ``-S..S`` and a reset to the home
        slot ``-lag`` (one lag for every head or one per head), from ``w_0 = start`` (the home
        if None).

        Shapes: ``shift`` (B, T, K, 2S+1), ``gate`` (B, T, K), ``start`` (B, K, N).
        Returns ``w`` (B, T, K, N). With ``hard`` (one-hot shifts and 0/1 gates) every ``w_t`` is
        exactly one-hot, with the gradient of the recurrence.

        A scan module may compute it directly in slot space (``head_scan``, ``O(T N S)``); the
        default is the parallel form, :func:`fourier_head_scan`.
        """
        if hasattr(self.scan_module, "head_scan"):
            return self.scan_module.head_scan(self, shift, gate, n_slots, start, lag)
        return fourier_head_scan(self, shift, gate, n_slots, start, lag, hard)

    def block_scan(
        self,
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
        hard: bool = False,
        key: Array | None = None,
        beta: Array | None = None,
        gamma: Array | None = None,
    ) -> tuple[Array, Array, Array, Array]:
        """The recurrences of one P-NTM block: the write head (home 0) and the read head
        (home ``-read_lag``) by :meth:`head_scan`, then the memory with its reads by
        :meth:`memory_scan_read` over their distributions.

        Returns the reads (B, T, K, D), the final memory (B, K, N, D) and the last write and
        read distributions (B, K, N). A scan module may fuse the three (``block_scan``, for
        location reads), so that the ``(B, T, K, N)`` head distributions are never stored.
        """
        if key is None and hasattr(self.scan_module, "block_scan"):
            return self.scan_module.block_scan(
                self, write_shift, write_gate, read_shift, read_gate, erase, add, n_slots,
                write_start, read_start, m0, read_lag,
            )  # fmt: skip
        write = self.head_scan(write_shift, write_gate, n_slots, write_start, 0, hard)
        read = self.head_scan(read_shift, read_gate, n_slots, read_start, read_lag, hard)
        reads, memory = self.memory_scan_read(write, erase, add, read, m0, key, beta, gamma)
        return reads, memory, write[:, -1], read[:, -1]

    def block_step(
        self,
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
        key: Array | None = None,
        beta: Array | None = None,
        gamma: Array | None = None,
    ) -> tuple[Array, Array, Array, Array]:
        """One token of :meth:`block_scan` (the step form): from the head distributions
        ``write``, ``read`` (B, K, N) and the ``memory`` (B, K, N, D), the controls of one token
        ((B, K, 2S+1), (B, K), (B, K, D)) give the reads (B, K, D), the new memory and the new
        head distributions. A scan module may fuse it (``block_step``); the default is
        :func:`step_block`."""
        if key is None and hasattr(self.scan_module, "block_step"):
            return self.scan_module.block_step(
                self, write, read, memory, write_shift, write_gate, read_shift, read_gate,
                erase, add, read_lag,
            )  # fmt: skip
        return step_block(
            self, write, read, memory, write_shift, write_gate, read_shift, read_gate, erase,
            add, read_lag, key, beta, gamma,
        )  # fmt: skip

    # ------------------------------------------------------------------ the peers' primitives
    # The LSTM and the Transformer (pntm.models.lstm, pntm.models.transformer) are compared with
    # the P-NTM for speed too, so each reaches its framework's fastest native kernel through
    # these two methods. The defaults here are plain loops and an explicit masked softmax in
    # the operations above: the float64 reference (NumPy) runs them as they are.

    def lstm(
        self, x: Array, h0: Array, c0: Array, w_ih: Array, w_hh: Array, bias: Array
    ) -> tuple[Array, tuple[Array, Array]]:
        """One LSTM layer over a whole sequence: ``(outputs, (h_T, c_T))``.

        Shapes: ``x`` (B, T, I); ``h0``, ``c0`` (B, H); ``w_ih`` (I, 4H); ``w_hh`` (H, 4H);
        ``bias`` (4H,); outputs ``h_1..h_T`` (B, T, H). The four gate blocks of the last axis
        of ``w_ih``, ``w_hh`` and ``bias`` are, in order, input ``i``, forget ``f``, cell
        ``g`` and output ``o`` (PyTorch's order):

        ``z_t = x_t W_ih + h_{t-1} W_hh + bias``, ``i, f, o = sigmoid(z_i, z_f, z_o)``,
        ``g = tanh(z_g)``, ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.

        This default computes ``x W_ih + bias`` for all steps in one matmul, then loops over
        time (the plain recurrence; what ``mlx.nn.LSTM`` does).
        """
        check_lstm_shapes(x, h0, c0, w_ih, w_hh, bias)
        hidden = h0.shape[-1]
        inputs = self.unstack(self.matmul(x, w_ih) + bias, 1)
        h, c, outputs = h0, c0, []
        for z in inputs:
            z = z + self.matmul(h, w_hh)
            i = self.sigmoid(z[..., :hidden])
            f = self.sigmoid(z[..., hidden : 2 * hidden])
            g = self.tanh(z[..., 2 * hidden : 3 * hidden])
            o = self.sigmoid(z[..., 3 * hidden :])
            c = f * c + i * g
            h = o * self.tanh(c)
            outputs.append(h)
        return self.stack(outputs, 1), (h, c)

    def attention(self, q: Array, k: Array, v: Array, causal: bool) -> Array:
        """Scaled dot-product attention ``softmax(q k^T / sqrt(d) + mask) v`` per head.

        Shapes: ``q`` (B, heads, Tq, d); ``k``, ``v`` (B, heads, Tk, d); out (B, heads, Tq, d).
        ``causal``: the Tq queries are the *last* Tq of the Tk positions (a KV cache holds the
        first Tk - Tq), so query ``i`` sees keys ``0 .. Tk - Tq + i`` (the mask aligned to the
        lower right); it needs Tq <= Tk. With Tq = Tk it is the usual causal mask, with Tq = 1
        (one decoding step) no mask at all.

        This default is the explicit masked softmax.
        """
        check_attention_shapes(q, k, v, causal)
        scores = self.matmul(q, self.transpose(k, (0, 1, 3, 2))) * (1.0 / float(q.shape[-1]) ** 0.5)
        if causal and q.shape[-2] > 1:
            scores = scores + self.asarray(causal_bias(q.shape[-2], k.shape[-2]))
        return self.matmul(self.softmax(scores, -1), v)


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (POSIX), else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def causal_mask(n_queries: int, n_keys: int) -> np.ndarray:
    """Boolean (Tq, Tk): query ``i`` (position ``Tk - Tq + i``) may see key ``j``, lower-right
    aligned as :meth:`Backend.attention` describes."""
    return np.tril(np.ones((n_queries, n_keys), dtype=bool), n_keys - n_queries)


def causal_bias(n_queries: int, n_keys: int) -> np.ndarray:
    """:func:`causal_mask` as an additive float64 mask: 0 where seen, -inf where not."""
    return np.where(causal_mask(n_queries, n_keys), 0.0, -np.inf)


def check_lstm_shapes(x, h0, c0, w_ih, w_hh, bias) -> None:
    hidden = h0.shape[-1]
    want = {
        "x": (None, None, w_ih.shape[0]),
        "h0": (x.shape[0], hidden),
        "c0": (x.shape[0], hidden),
        "w_ih": (w_ih.shape[0], 4 * hidden),
        "w_hh": (hidden, 4 * hidden),
        "bias": (4 * hidden,),
    }
    got = {"x": x, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "bias": bias}
    for name, shape in want.items():
        actual = tuple(got[name].shape)
        if len(actual) != len(shape) or any(
            s is not None and a != s for a, s in zip(actual, shape, strict=True)
        ):
            expected = tuple("*" if s is None else s for s in shape)
            raise ValueError(
                f"lstm: {name} has shape {actual}, expected {expected} "
                "(x (B, T, I), h0/c0 (B, H), w_ih (I, 4H), w_hh (H, 4H), bias (4H,))"
            )


def check_attention_shapes(q, k, v, causal: bool) -> None:
    if q.ndim != 4 or tuple(k.shape) != tuple(v.shape) or k.ndim != 4:
        raise ValueError(
            "attention needs q (B, heads, Tq, d) and k, v (B, heads, Tk, d); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if tuple(q.shape[:2]) != tuple(k.shape[:2]) or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or d"
        )
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"causal attention needs Tq <= Tk (the queries are the last Tq positions), got "
            f"Tq {q.shape[-2]} > Tk {k.shape[-2]}"
        )


def exit_now(message: str | None = None) -> NoReturn:
    """End this process at once (exit code 1, no cleanup: for a watching thread whose main
    thread cannot be told to stop), saying ``message`` on stderr first where it can."""
    import sys

    try:
        if message:
            print(message, file=sys.stderr, flush=True)
    except OSError:  # stderr was a pipe to a parent or launcher that is gone
        pass
    finally:
        os._exit(1)


def exit_with_parent(parent: int, message: str | None = None, poll_s: float = 2.0) -> None:
    """End this process once ``parent`` (the process that started it) is gone, killed rather
    than interrupted (:func:`exit_now` with ``message``), so that no orphan goes on training
    into a run directory: a watching thread, for worker processes and data-parallel ranks.
    Checkpoints are written by rename, so the run resumes cleanly next time."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        exit_now(message)

    threading.Thread(target=watch, daemon=True).start()


def load_scans(scan: str, framework: str) -> ModuleType:
    """The scan module ``pntm.backends.scans.<scan>``, checked to run on ``framework``."""
    from pntm.backends import scans

    if scan not in scans.NAMES:
        raise ValueError(f"unknown scan {scan!r}; scans: {', '.join(scans.NAMES)}")
    try:
        module = importlib.import_module(f"pntm.backends.scans.{scan}")
    except ImportError as exc:
        raise RuntimeError(f"scan {scan!r} cannot run: {exc.name or exc} is not installed") from exc
    if framework not in module.FRAMEWORKS:
        runs_on = ", ".join(module.FRAMEWORKS)
        raise ValueError(f"scan {scan!r} runs on {runs_on}, not on {framework!r}")
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if reason:
        raise RuntimeError(f"scan {scan!r} cannot run: {reason}")
    return module


# ---------------------------------------------------------------------- per-step read math
# Shared by the sequential reference and the parallel path: what one step reads from a memory
# state. It is pointwise in time, so it is the same in every algorithm; only how the states
# are produced differs.


def read_step(
    ops: Backend,
    memory: Array,
    rho: Array,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
) -> Array:
    """``r = rho'^T M`` with ``rho' = (1-gamma) rho + gamma softmax_i(beta cos(key, M_i))``.

    ``memory`` (..., N, D), ``rho`` (..., N), ``key`` (..., D), ``beta``/``gamma`` (...).
    """
    if key is not None:
        rho = _content_weights(ops, memory, rho, key, beta, gamma)[0]
    return ops.matmul(rho[..., None, :], memory)[..., 0, :]


def _content_weights(ops, memory, rho, key, beta, gamma):
    dots = ops.matmul(memory, key[..., None])[..., 0]
    norm_m = ops.sqrt(ops.sum(memory * memory, axis=-1) + COSINE_EPS)
    norm_k = ops.sqrt(ops.sum(key * key, axis=-1) + COSINE_EPS)[..., None]
    cosine = dots / (norm_m * norm_k)
    content = ops.softmax(beta[..., None] * cosine, axis=-1)
    mixed = (1 - gamma)[..., None] * rho + gamma[..., None] * content
    return mixed, cosine, content, norm_m, norm_k


def read_step_vjp(
    ops: Backend,
    memory: Array,
    rho: Array,
    d_read: Array,
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
) -> tuple[Array, Array, Array | None, Array | None, Array | None]:
    """Reverse mode of :func:`read_step`: ``(dM, d_rho, d_key, d_beta, d_gamma)``."""
    if key is None:
        d_memory = rho[..., None] * d_read[..., None, :]
        d_rho = ops.matmul(memory, d_read[..., None])[..., 0]
        return d_memory, d_rho, None, None, None
    mixed, cosine, content, norm_m, norm_k = _content_weights(ops, memory, rho, key, beta, gamma)
    d_memory = mixed[..., None] * d_read[..., None, :]
    d_mixed = ops.matmul(memory, d_read[..., None])[..., 0]
    g = gamma[..., None]
    d_rho = (1 - g) * d_mixed
    d_gamma = ops.sum(d_mixed * (content - rho), axis=-1)
    d_content = g * d_mixed
    d_logits = content * (d_content - ops.sum(content * d_content, axis=-1, keepdims=True))
    d_beta = ops.sum(d_logits * cosine, axis=-1)
    d_cos = beta[..., None] * d_logits
    # cos_i = <M_i, k> / (|M_i| |k|) with the eps-regularised norms above
    inv = d_cos / (norm_m * norm_k)
    d_key = ops.matmul(inv[..., None, :], memory)[..., 0, :] - ops.sum(d_cos * cosine, axis=-1)[
        ..., None
    ] * key / (norm_k * norm_k)
    d_memory = (
        d_memory
        + inv[..., None] * key[..., None, :]
        - (d_cos * cosine / (norm_m * norm_m))[..., None] * memory
    )
    return d_memory, d_rho, d_key, d_beta, d_gamma


# ---------------------------------------------------------------------- head recurrence
# The parallel form of Backend.head_scan: a circular convolution is diagonal in Fourier space
# over the slots, so each frequency is a complex first-order recurrence (``linear_scan``).


def home_delta(n_slots: int, lag: int | tuple[int, ...]) -> np.ndarray:
    """The home ``delta_{-lag}`` over ``n_slots`` slots (circular): (N,) for one lag, (K, N)
    for one per head."""
    return np.eye(n_slots)[-np.asarray(lag) % n_slots]


def shift_spectrum(n_slots: int, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``2 pi j k / N`` for shifts j = -S..S and frequencies k = 0..N//2."""
    angle = 2 * np.pi * np.outer(np.arange(-max_shift, max_shift + 1), np.arange(n_slots // 2 + 1))
    return np.cos(angle / n_slots), np.sin(angle / n_slots)


def fourier_head_scan(
    ops: Backend,
    shift: Array,
    gate: Array,
    n_slots: int,
    start: Array | None = None,
    lag: int | tuple[int, ...] = 0,
    hard: bool = False,
) -> Array:
    """:meth:`Backend.head_scan` by a scan in Fourier space:
    ``hat w_t(k) = (1 - g_t) hat s_t(k) hat w_{t-1}(k) + g_t hat h(k)`` with the home
    ``h = delta_{-lag}`` (``hat h(k) = exp(2 pi i k lag / N)``).

    With hard heads every ``w_t`` is one-hot in exact arithmetic, but the float32 FFT route
    leaves it up to ~1e-3 off at long T; it is snapped to the one-hot of its argmax in the
    forward pass (gradients pass straight through)."""
    cache = ops.__dict__.setdefault("_spectra", {})
    key = (n_slots, shift.shape[-1] // 2)
    if key not in cache:
        cache[key] = tuple(ops.asarray(x) for x in shift_spectrum(*key))
    cos, sin = cache[key]
    keep = (1 - gate)[..., None]
    spec_re, spec_im = ops.matmul(shift, cos), -ops.matmul(shift, sin)
    a = ops.complex(keep * spec_re, keep * spec_im)
    lags = np.asarray(lag)[..., None] % n_slots  # (1,) or (K, 1): one home per head
    home = 2 * np.pi * lags * np.arange(n_slots // 2 + 1) / n_slots
    home_re, home_im = np.cos(home), np.sin(home)
    g = gate[..., None]
    b = ops.complex(g * ops.asarray(home_re), g * ops.asarray(home_im))
    if start is None:
        zeros = ops.zeros_like(spec_re[:, 0])
        h0 = ops.complex(zeros + ops.asarray(home_re), zeros + ops.asarray(home_im))
    else:
        h0 = ops.rfft(start, axis=-1)
    positions = ops.irfft(ops.linear_scan(a, b, h0), n=n_slots, axis=-1)
    if not hard:
        return positions
    snapped = ops.one_hot(ops.argmax(positions, -1), n_slots)
    return snapped + (positions - ops.stop_gradient(positions))


def move_head(
    ops: Backend, position: Array, shift: Array, gate: Array, lag: int | tuple[int, ...] = 0
) -> Array:
    """One step of the head recurrence in slot space, ``(1 - g) (s ⊛ w) + g delta_{-lag}``:
    the circular convolution as ``2S + 1`` rolls."""
    S = shift.shape[-1] // 2
    cache = ops.__dict__.setdefault("_homes", {})
    if (position.shape[-1], lag) not in cache:
        cache[position.shape[-1], lag] = ops.asarray(home_delta(position.shape[-1], lag))
    moved = None
    for j in range(-S, S + 1):
        term = shift[..., j + S : j + S + 1] * ops.roll(position, j, axis=-1)
        moved = term if moved is None else moved + term
    g = gate[..., None]
    return (1 - g) * moved + g * cache[position.shape[-1], lag]


def step_block(
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
    key: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """:meth:`Backend.block_step` in framework operations: both heads moved, the memory
    written, then read."""
    write = move_head(ops, write, write_shift, write_gate)
    memory = ops.decay_write(memory, write, erase, add)
    read = move_head(ops, read, read_shift, read_gate, read_lag)
    return read_step(ops, memory, read, key, beta, gamma), memory, write, read
