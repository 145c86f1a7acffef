"""Fused Metal kernels for P-NTM's two scan primitives (SPEC §4.3), on MLX arrays.

The kernels (:mod:`pntm.backends.scans.metal_kernels`) run through ``mx.fast.metal_kernel`` on
Apple GPUs; each primitive is one ``mx.custom_function`` (``Backend.custom_vjp``) whose forward
and backward are both kernels:

* ``memory_scan_read``: one threadgroup per batch·head keeps the memory in registers, its slots
  spread over the threads, and loops over time: each step writes, reads (location, and content
  addressing when ``key`` is given) and, every ``chunk`` steps, stores a float32 checkpoint. The
  backward walks time in reverse, chunk by chunk: it recomputes a chunk's states from its
  checkpoint, then runs ``G_t = (read gradient)_t + F_{t+1} ⊙ G_{t+1}`` through them. The
  ``B x T x K x N x D`` states never exist.
* ``linear_scan``: one thread per channel walks time, complex values as real/imaginary pairs;
  the backward is the same walk in reverse.

Where Metal is absent (Linux, CI), ``PNTM_METAL_EMULATE=1`` set before this module is imported
runs the very same kernel sources through :mod:`pntm.backends.metal_emulator`, which compiles
them as C++ and runs the launch grid on the CPU: a correctness check, not a fast path.

Inputs may be float32, float16 or bfloat16 (the head scan: float32 or complex64); everything
accumulates in float32 and outputs come back in the input dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from pntm.backends.base import Array, Backend
from pntm.backends.scans import chunked
from pntm.backends.scans.metal_kernels import (
    LINEAR_BACKWARD,
    LINEAR_FORWARD,
    MEMORY_BACKWARD,
    MEMORY_FORWARD,
    KernelSource,
)

FRAMEWORKS = ("mlx",)
SIMD_WIDTH = 32
#: threads per threadgroup of the memory scan, at most (one threadgroup per batch·head)
MAX_THREADS = 256
#: memory elements one thread keeps in registers, at most (slots per thread x D), and slots per
#: thread, at most; beyond, the scan runs the MLX chunked path. The backward holds about twice
#: that tile and MLX refuses a threadgroup larger than the compiled pipeline's register budget
#: allows, so these stay small until a Metal report says otherwise.
MAX_THREAD_TILE = 128
MAX_ROWS = 8
#: slot width D, at most: every thread also holds a few vectors of D (and 2 D) floats
MAX_WIDTH = 64
DEFAULT_CHUNK = 16  # steps between checkpoints (and the backward's recompute span)
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
#: elements of one buffer, at most: the kernels index with 32-bit integers
MAX_ELEMENTS = 2**31 - 1

# the kernels run in the C++ emulator: chosen once, when this module is first imported
_EMULATED = os.environ.get("PNTM_METAL_EMULATE", "0").lower() in ("1", "true", "yes", "on")


def emulated() -> bool:
    """Whether the kernels run in the CPU emulator (``PNTM_METAL_EMULATE`` set when this module
    was first imported) rather than on a Metal GPU."""
    return _EMULATED


def unavailable_reason() -> str | None:
    if emulated():
        from pntm.backends import metal_emulator

        if metal_emulator.compiler() is None:
            return "PNTM_METAL_EMULATE is set but no C++ compiler (c++, or $CXX) is on PATH"
        return None
    if mx.metal.is_available():
        return None
    return (
        "no Metal GPU here (mx.metal.is_available() is False; PNTM_METAL_EMULATE=1 before the "
        "first import runs the kernels in a C++ emulator on the CPU: slow, for tests)"
    )


def describe() -> str:
    where = "C++ emulator on the CPU, PNTM_METAL_EMULATE=1" if emulated() else "Metal GPU"
    return (
        f"Metal kernels through mx.fast.metal_kernel ({where}): memory scan with location and "
        f"content reads, fused, up to {MAX_ROWS} slots and {MAX_THREAD_TILE} slot elements per "
        f"thread and D <= {MAX_WIDTH} (beyond: MLX chunked scan); head scan; controller and "
        "FFTs in MLX"
    )


_COMPILED: dict[str, Any] = {}


def kernel(source: KernelSource) -> Any:
    """``mx.fast.metal_kernel`` for ``source`` (built once), or its emulation."""
    if source.name not in _COMPILED:
        if emulated():
            from pntm.backends.metal_emulator import EmulatedKernel

            _COMPILED[source.name] = EmulatedKernel(**source.arguments())
        else:
            _COMPILED[source.name] = mx.fast.metal_kernel(**source.arguments())
    return _COMPILED[source.name]


def _launch(source: KernelSource, inputs, output_shapes, output_dtypes, template, grid, group):
    """One kernel launch, its buffers first checked against the kernels' 32-bit indices."""
    for shape in [*(x.shape for x in inputs), *output_shapes]:
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(
                f"a buffer of shape {tuple(shape)} has more than {MAX_ELEMENTS} elements, "
                "which the Metal kernels' 32-bit indices cannot address"
            )
    return kernel(source)(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=group,
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
    )


def _sizes(*values: int) -> mx.array:
    return mx.array(values, dtype=mx.int32)


def _check_dtypes(named: dict[str, mx.array], allowed=FLOAT_DTYPES) -> mx.Dtype:
    for name, x in named.items():
        if x.dtype not in allowed:
            raise ValueError(
                f"metal kernels take {', '.join(map(str, allowed))} for {name}, got {x.dtype}"
            )
    dtypes = {name: x.dtype for name, x in named.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"the scan's inputs must share one dtype, got {dtypes}")
    return next(iter(dtypes.values()))


_OPS: list[Backend] = []


def _ops() -> Backend:
    """An MLX backend for ``custom_vjp`` (its scans are not used here)."""
    if not _OPS:
        from pntm.backends.mlx_backend import MLXBackend

        _OPS.append(MLXBackend(scan="chunked"))
    return _OPS[0]


# ====================================================================== memory scan


@dataclass(frozen=True)
class MemoryPlan:
    """How the memory scan is cut: ``threads`` per threadgroup (a multiple of 32) share the N
    slots, ``rows`` each; a checkpoint every ``chunk`` steps."""

    threads: int
    rows: int
    chunk: int

    @property
    def simdgroups(self) -> int:
        return self.threads // SIMD_WIDTH


def plan_memory(N: int, D: int, threads: int | None = None, chunk: int = DEFAULT_CHUNK):
    """The plan for N slots of width D (``threads`` and ``chunk`` open to tests and
    benchmarks)."""
    if threads is None:
        threads = min(MAX_THREADS, -(-N // SIMD_WIDTH) * SIMD_WIDTH)
    if threads < SIMD_WIDTH or threads % SIMD_WIDTH or threads > 1024:
        raise ValueError(f"threads must be a multiple of {SIMD_WIDTH} up to 1024, got {threads}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return MemoryPlan(threads, -(-N // threads), chunk)


def fits(N: int, D: int, plan: MemoryPlan | None = None) -> bool:
    """Whether the fused memory scan takes N slots of width D (else: the chunked path)."""
    plan = plan or plan_memory(N, D)
    return D <= MAX_WIDTH and plan.rows <= MAX_ROWS and plan.rows * D <= MAX_THREAD_TILE


def _memory_launch(source, inputs, output_shapes, output_dtypes, D, plan, content):
    """A memory kernel: one threadgroup of ``plan.threads`` per batch·head."""
    heads = inputs[0].shape[0] * inputs[0].shape[2]  # B * K, from w (B, T, K, N)
    template = [("T", inputs[0].dtype), ("D", D), ("R", plan.rows), ("SG", plan.simdgroups)]
    template.append(("CONTENT", content))
    grid, group = (plan.threads, heads, 1), (plan.threads, 1, 1)
    return _launch(source, inputs, output_shapes, output_dtypes, template, grid, group)


def _content_inputs(key, beta, gamma, dtype):
    """The content inputs, or one-element stand-ins (the kernels' signature has them)."""
    if key is None:
        return tuple(mx.zeros((1,), dtype=dtype) for _ in range(3))
    return key, beta, gamma


def _memory_forward(ops, w, erase, add, rho, m0, key, beta, gamma, *, plan):
    B, T, K, N = w.shape
    D = add.shape[-1]
    n_checkpoints = -(-T // plan.chunk)
    sizes = _sizes(T, N, K, plan.chunk, n_checkpoints)
    inputs = [w, erase, add, rho, m0, *_content_inputs(key, beta, gamma, w.dtype), sizes]
    shapes = [(B, T, K, D), (B, K, N, D), (B * K, n_checkpoints, N, D)]
    dtypes = [w.dtype, w.dtype, mx.float32]
    return _memory_launch(MEMORY_FORWARD, inputs, shapes, dtypes, D, plan, key is not None)


def _memory_backward(ops, inputs, residuals, cotangents, *, plan):
    w, erase, add, rho, m0, key, beta, gamma = inputs
    (checkpoints,) = residuals
    d_reads, d_final = cotangents
    B, T, K, N = w.shape
    D = add.shape[-1]
    content = _content_inputs(key, beta, gamma, w.dtype)
    sizes = _sizes(T, N, K, plan.chunk, checkpoints.shape[1])
    inputs = [w, erase, add, rho, *content, checkpoints, d_reads.astype(w.dtype)]
    inputs += [d_final.astype(w.dtype), sizes]
    states = (B * K, min(plan.chunk, T) + 1, N, D)  # the recomputed states of one chunk
    shapes = [w.shape, erase.shape, add.shape, rho.shape, *(x.shape for x in content)]
    shapes += [m0.shape, states]
    dtypes = [w.dtype] * 8 + [mx.float32]
    grads = _memory_launch(MEMORY_BACKWARD, inputs, shapes, dtypes, D, plan, key is not None)
    d_w, d_erase, d_add, d_rho, d_key, d_beta, d_gamma, d_m0, _ = grads
    if key is None:
        d_key = d_beta = d_gamma = None
    return d_w, d_erase, d_add, d_rho, d_m0.astype(m0.dtype), d_key, d_beta, d_gamma


def memory_scan_read_fused(
    w: mx.array,
    erase: mx.array,
    add: mx.array,
    rho: mx.array,
    m0: mx.array | None = None,
    key: mx.array | None = None,
    beta: mx.array | None = None,
    gamma: mx.array | None = None,
    *,
    threads: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[mx.array, mx.array]:
    """The fused memory scan on MLX arrays (``Backend.memory_scan_read``'s contract), with the
    plan's options open to tests and benchmarks."""
    named = dict(w=w, erase=erase, add=add, rho=rho, m0=m0, key=key, beta=beta, gamma=gamma)
    dtype = _check_dtypes({n: x for n, x in named.items() if x is not None})
    B, T, K, N = w.shape
    D = add.shape[-1]
    if m0 is None:
        m0 = mx.zeros((B, K, N, D), dtype=dtype)
    if T == 0 or B * K * N * D == 0:  # no steps, heads or slots: nothing to read or write
        return mx.zeros((B, T, K, D), dtype=dtype), m0
    plan = plan_memory(N, D, threads, chunk)
    if not fits(N, D, plan):
        raise ValueError(
            f"the fused memory scan holds at most {MAX_ROWS} slots and {MAX_THREAD_TILE} slot "
            f"elements per thread with D <= {MAX_WIDTH}; got N={N}, D={D} over {plan.threads} "
            "threads"
        )
    op = _ops().custom_vjp(_memory_forward, _memory_backward, 2, plan=plan)
    return op(w, erase, add, rho, m0, key, beta, gamma)


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
    """Fused, or the MLX chunked scan where the memory does not fit the kernel's registers."""
    if not fits(w.shape[-1], add.shape[-1]):
        return chunked.memory_scan_read(ops, w, erase, add, rho, m0, key, beta, gamma)
    return memory_scan_read_fused(w, erase, add, rho, m0, key, beta, gamma)


# ====================================================================== linear scan

_LINEAR_GROUP = 256  # threads per threadgroup (channels)


def _parts(x: mx.array, complex_: bool) -> tuple[mx.array, mx.array]:
    if not complex_:
        return x, mx.zeros((1,), dtype=x.dtype)
    return mx.real(x), mx.imag(x)


def _linear_launch(source, inputs, out_shapes, dtype, complex_, B, C):
    """A head-scan kernel: one thread per (batch, channel)."""
    template = [("T", dtype), ("COMPLEX", complex_)]
    grid, group = (C, B, 1), (min(C, _LINEAR_GROUP), 1, 1)
    return _launch(source, inputs, out_shapes, [dtype] * len(out_shapes), template, grid, group)


def _join(re: mx.array, im: mx.array, complex_: bool) -> mx.array:
    return re + mx.array(1j, dtype=mx.complex64) * im if complex_ else re


def _linear_forward(ops, a, b, h0, *, complex_):
    B, T, C = b.shape
    dtype = mx.float32 if complex_ else b.dtype
    parts = [*_parts(a, complex_), *_parts(b, complex_), *_parts(h0, complex_)]
    small = (1,)
    h_re, h_im = _linear_launch(
        LINEAR_FORWARD, [*parts, _sizes(T, C)], [(B, T, C), (B, T, C) if complex_ else small],
        dtype, complex_, B, C,
    )  # fmt: skip
    h = _join(h_re, h_im, complex_)
    return h, h


def _linear_backward(ops, inputs, residuals, cotangents, *, complex_):
    a, _, h0 = inputs
    (h,) = residuals
    (d_h,) = cotangents
    B, T, C = h.shape
    dtype = mx.float32 if complex_ else h.dtype
    parts = [*_parts(a, complex_), *_parts(h, complex_), *_parts(h0, complex_)]
    parts += _parts(d_h.astype(h.dtype), complex_)
    full = (B, T, C) if complex_ else (1,)
    start = (B, C) if complex_ else (1,)
    d_a_re, d_a_im, d_b_re, d_b_im, d_h0_re, d_h0_im = _linear_launch(
        LINEAR_BACKWARD, [*parts, _sizes(T, C)],
        [(B, T, C), full, (B, T, C), full, (B, C), start], dtype, complex_, B, C,
    )  # fmt: skip
    return (
        _join(d_a_re, d_a_im, complex_),
        _join(d_b_re, d_b_im, complex_),
        _join(d_h0_re, d_h0_im, complex_),
    )


def linear_scan_fused(a: mx.array, b: mx.array, h0: mx.array | None = None) -> mx.array:
    """``h_t = a_t h_{t-1} + b_t`` along axis 1 for (B, T, *rest) MLX arrays, real or complex64."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"linear_scan needs a and b of one shape, got {a.shape} and {b.shape}")
    named = {"a": a, "b": b} if h0 is None else {"a": a, "b": b, "h0": h0}
    complex_ = any(x.dtype == mx.complex64 for x in named.values())
    if complex_:  # complex64, or float32 parts of a complex64 scan
        for name, x in named.items():
            if x.dtype not in (mx.complex64, mx.float32):
                raise ValueError(
                    f"a complex head scan takes complex64 or float32 for {name}, got {x.dtype}"
                )
        a, b = a.astype(mx.complex64), b.astype(mx.complex64)
    else:
        _check_dtypes(named)
    B, T = b.shape[:2]
    if b.size == 0:
        return mx.zeros_like(b)
    C = math.prod(b.shape[2:])
    h0 = mx.zeros_like(b[:, 0]) if h0 is None else h0.astype(b.dtype)
    op = _ops().custom_vjp(_linear_forward, _linear_backward, 1, complex_=complex_)
    h = op(a.reshape(B, T, C), b.reshape(B, T, C), h0.reshape(B, C))
    return h.reshape(b.shape)


def linear_scan(ops: Backend, a: Array, b: Array, h0: Array) -> Array:
    return linear_scan_fused(a, b, h0)
