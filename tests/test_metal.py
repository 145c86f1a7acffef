"""The Metal kernels' own cases, against the float64 sequential reference: every way the memory
scan is cut up (threads per threadgroup, slots per thread, checkpoint spans), half-precision
inputs, the fallback and refusals, and that MLX and the emulator get the same kernel sources.
The cases every backend shares run with ``--backend=metal`` in test_scans.py and test_model.py.
Without Metal all of this runs in the C++ emulator (conftest.py sets PNTM_METAL_EMULATE)."""

from __future__ import annotations

import numpy as np
import pytest

from pntm import backends

INFO = {info.name: info for info in backends.available()}
if not INFO["metal"].runs:
    pytest.skip(f"backend 'metal' cannot run here: {INFO['metal'].reason}", allow_module_level=True)

import mlx.core as mx  # noqa: E402

from pntm.backends.numpy_backend import NumpyBackend  # noqa: E402
from pntm.backends.scans import metal, metal_kernels, sequential  # noqa: E402
from pntm.backends.scans.reference import linear_scan_vjp, memory_scan_read_vjp  # noqa: E402
from tests.test_scans import backend_grads, linear_inputs, memory_inputs  # noqa: E402
from tests.tolerances import (  # noqa: E402
    FWD_RTOL,
    GRAD_RTOL,
    grad_errors,
    low_precision_rtol,
    rel_err,
)

NP = NumpyBackend()


@pytest.fixture(autouse=True)
def only_when_metal_is_chosen(request):
    chosen = request.config.getoption("--backend")
    if chosen not in ("metal", "all"):
        pytest.skip(f"--backend={chosen} leaves out the metal backend's own tests")


def as_mlx(x: np.ndarray, dtype=mx.float32) -> mx.array:
    return mx.array(np.asarray(x, dtype=np.float32)).astype(dtype)


def as_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def check_memory(inputs: dict, dtype=mx.float32, fwd_rtol=FWD_RTOL, grad_rtol=GRAD_RTOL, **plan):
    """Forward, final state and every gradient of the fused scan against the reference, on
    inputs rounded to ``dtype`` (so that only the kernel's own error is measured)."""
    native = {n: as_mlx(x, dtype) for n, x in inputs.items()}
    rounded = {n: as_numpy(x) for n, x in native.items()}
    want_reads, states = sequential.memory_scan_states(NP, **rounded)
    reads, final = metal.memory_scan_read_fused(**native, **plan)
    assert reads.dtype == final.dtype == dtype
    assert rel_err(as_numpy(reads), want_reads) <= fwd_rtol
    assert rel_err(as_numpy(final), states[-1]) <= fwd_rtol
    rng = np.random.default_rng(3)
    # the cotangents reach the kernel rounded to the outputs' dtype: give the reference the same
    d_read, d_final = (
        as_numpy(as_mlx(rng.normal(size=x.shape), dtype)) for x in (want_reads, states[-1])
    )
    names = list(native)

    def loss(*args):
        r, f = metal.memory_scan_read_fused(**dict(zip(names, args, strict=True)), **plan)
        return (r.astype(mx.float32) * as_mlx(d_read)).sum() + (
            f.astype(mx.float32) * as_mlx(d_final)
        ).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(names))))(*native.values())
    assert all(g.dtype == dtype for g in grads)
    want = memory_scan_read_vjp(**rounded, d_read=d_read, d_final=d_final)
    got = {n: as_numpy(g) for n, g in zip(names, grads, strict=True)}
    errors = grad_errors(got, {n: want[n] for n in names})
    assert max(errors.values()) <= grad_rtol, errors


# the plans of the memory kernel: one SIMD group per threadgroup with several slots per thread,
# several SIMD groups (threadgroup reductions across them) with one or more slots per thread,
# threads without a slot; one step per chunk, and chunks that do not divide T
PLANS = {
    "default": {},
    "1simd-3rows-chunk1": dict(threads=32, chunk=1),
    "3simd-1row": dict(threads=96, chunk=5),
    "2simd-2rows-chunk3": dict(threads=64, chunk=3),
    "8simd-idle-threads": dict(threads=256, chunk=64),
}
SHAPE = (2, 23, 2, 70, 5)  # B, T, K, N, D: N over two SIMD groups, T not a multiple of a chunk


@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_memory_kernel_every_plan_matches_reference(plan, content):
    inputs = memory_inputs(np.random.default_rng(0), *SHAPE, content)
    check_memory(inputs, **PLANS[plan])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 1, 1, 1), (3, 1, 2, 3, 1)])
@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
def test_memory_kernel_edge_shapes(shape, content):
    """T=1, N=1, D=1, one step per chunk, and more threads than slots."""
    inputs = memory_inputs(np.random.default_rng(1), *shape, content)
    check_memory(inputs, chunk=1, threads=64)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
def test_memory_kernel_half_precision_inputs_accumulate_in_float32(dtype, content):
    inputs = memory_inputs(np.random.default_rng(2), 2, 19, 2, 5, 3, content)
    fwd_rtol, grad_rtol = low_precision_rtol(dtype)
    check_memory(inputs, dtype, fwd_rtol=fwd_rtol, grad_rtol=grad_rtol, chunk=4)


def test_memory_kernel_over_2048_steps():
    """A long scan (T = 65,536 runs in test_scans.py, marked slow): 128 chunks, decays of
    exactly 0 and 1 inside."""
    inputs = memory_inputs(np.random.default_rng(8), 1, 2048, 1, 4, 3, content=True)
    inputs["erase"] *= 0.05  # slots keep content over long stretches
    check_memory(inputs)


def test_memory_too_large_for_the_registers_takes_the_chunked_path(monkeypatch):
    monkeypatch.setattr(metal, "MAX_THREAD_TILE", 4)
    inputs = memory_inputs(np.random.default_rng(5), 2, 9, 1, 40, 5, content=True)
    native = {n: as_mlx(x) for n, x in inputs.items()}
    with pytest.raises(ValueError, match=r"4 slot elements per thread.*N=40, D=5 over 64"):
        metal.memory_scan_read_fused(**native)
    ops = backends.get("metal")
    want, states = sequential.memory_scan_states(NP, **inputs)
    reads, final = ops.memory_scan_read(**native)
    assert rel_err(ops.to_numpy(reads), want) <= FWD_RTOL
    assert rel_err(ops.to_numpy(final), states[-1]) <= FWD_RTOL
    rng = np.random.default_rng(6)
    d_read, d_final = rng.normal(size=want.shape), rng.normal(size=states[-1].shape)
    got = backend_grads(ops, ops.memory_scan_read, inputs, [d_read, d_final])
    want_grads = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)
    errors = grad_errors(got, {n: want_grads[n] for n in inputs})
    assert max(errors.values()) <= GRAD_RTOL, errors
    assert "MLX chunked scan" in metal.describe()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_linear_kernel_half_precision_inputs(dtype):
    rng = np.random.default_rng(6)
    a, b, h0 = linear_inputs(rng, 2, 70, (3,), complex_=False)
    native = [as_mlx(x, dtype) for x in (a, b, h0)]
    rounded = [as_numpy(x) for x in native]
    h = metal.linear_scan_fused(*native)
    assert h.dtype == dtype
    tol, grad_tol = low_precision_rtol(dtype)
    assert rel_err(as_numpy(h), sequential.linear_scan(NP, *rounded)) <= tol
    d_h = as_numpy(as_mlx(rng.normal(size=b.shape), dtype))

    def loss(*args):
        return (metal.linear_scan_fused(*args).astype(mx.float32) * as_mlx(d_h)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))(*native)
    want = dict(zip(("a", "b", "h0"), linear_scan_vjp(*rounded, d_h), strict=True))
    got = {n: as_numpy(g) for n, g in zip(want, grads, strict=True)}
    errors = grad_errors(got, want)
    assert max(errors.values()) <= grad_tol, errors


def test_linear_kernel_more_channels_than_one_threadgroup():
    """300 channels: two threadgroups of 256, the second one partial."""
    rng = np.random.default_rng(7)
    a, b, h0 = linear_inputs(rng, 2, 9, (3, 100), complex_=True)
    ops = backends.get("metal")
    h = ops.linear_scan(*(ops.asarray(x) for x in (a, b, h0)))
    assert rel_err(ops.to_numpy(h), sequential.linear_scan(NP, a, b, h0)) <= FWD_RTOL


def test_kernels_refuse_other_dtypes_by_name():
    x = mx.zeros((1, 2, 1, 3), dtype=mx.int32)
    e = mx.zeros((1, 2, 1, 2))
    with pytest.raises(ValueError, match=r"float32, mlx.core.float16, mlx.core.bfloat16 for w"):
        metal.memory_scan_read_fused(x, e, e, x)
    with pytest.raises(ValueError, match=r"a and b of one shape"):
        metal.linear_scan_fused(x, e)
    with pytest.raises(ValueError, match=r"share one dtype.*'erase': mlx.core.float16"):
        metal.memory_scan_read_fused(
            x.astype(mx.float32), e.astype(mx.float16), e, x.astype(mx.float32)
        )
    c = mx.zeros((1, 2, 3), dtype=mx.complex64)
    with pytest.raises(ValueError, match=r"complex64 or float32 for b, got mlx.core.float16"):
        metal.linear_scan_fused(c, c.real.astype(mx.float16))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(threads=48), "threads must be a multiple of 32 up to 1024, got 48"),
        (dict(threads=2048), "threads must be a multiple of 32 up to 1024, got 2048"),
        (dict(chunk=0), "chunk must be at least 1, got 0"),
    ],
)
def test_plan_refuses_bad_options_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        metal.plan_memory(10, 4, **options)


def test_plans_spread_slots_over_simd_groups():
    assert metal.plan_memory(1, 16) == metal.MemoryPlan(32, 1, metal.DEFAULT_CHUNK)
    assert metal.plan_memory(70, 16) == metal.MemoryPlan(96, 1, metal.DEFAULT_CHUNK)
    assert metal.plan_memory(1000, 16) == metal.MemoryPlan(256, 4, metal.DEFAULT_CHUNK)
    assert metal.plan_memory(1000, 16).simdgroups == 8
    assert metal.fits(2048, 16) and not metal.fits(2049, 16)  # 8 slots per thread at most
    assert metal.fits(1024, 32) and not metal.fits(1025, 32)  # 128 elements per thread
    assert not metal.fits(10, metal.MAX_WIDTH + 1)


@pytest.mark.parametrize("B,T,K,N", [(1, 0, 2, 3), (0, 4, 2, 3), (1, 4, 0, 3), (1, 4, 2, 0)])
def test_empty_scans_return_the_memory_as_it_was(B, T, K, N):
    m0 = mx.ones((B, K, N, 4))
    w = mx.zeros((B, T, K, N))
    e = mx.zeros((B, T, K, 4))
    reads, final = metal.memory_scan_read_fused(w, e, e, w, m0)
    assert reads.shape == (B, T, K, 4) and not bool(mx.any(reads)) and bool(mx.all(final == m0))
    empty = mx.zeros((B, T, K))
    assert metal.linear_scan_fused(empty, empty).shape == (B, T, K)


# ---------------------------------------------------------------------- one source of truth


def test_mlx_and_the_emulator_compile_the_same_kernel_sources(monkeypatch):
    """What ``mx.fast.metal_kernel`` receives on a Mac is, argument for argument, what the
    emulator receives here; and the C++ the emulator compiles holds the body and the header
    verbatim."""
    from pntm.backends.metal_emulator import EmulatedKernel

    received = {}

    def metal_kernel(**arguments):
        received[arguments["name"]] = arguments
        return lambda **call: None

    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    monkeypatch.setattr(metal, "_EMULATED", False)
    monkeypatch.setattr(metal, "_COMPILED", {})
    for source in metal_kernels.KERNELS:
        metal.kernel(source)
    assert set(received) == {s.name for s in metal_kernels.KERNELS}

    monkeypatch.setattr(metal, "_EMULATED", True)
    monkeypatch.setattr(metal, "_COMPILED", {})
    for source in metal_kernels.KERNELS:
        emulated = metal.kernel(source)
        assert isinstance(emulated, EmulatedKernel)
        arguments = received[source.name]
        assert emulated.source == arguments["source"] == source.source
        assert emulated.header == arguments["header"] == source.header
        assert emulated.input_names == list(arguments["input_names"])
        assert emulated.output_names == list(arguments["output_names"])
        assert arguments["ensure_row_contiguous"] is emulated.ensure_row_contiguous is True
        inputs = [mx.zeros((9,)) for _ in source.input_names]
        cpp = emulated.cpp_source(
            inputs, [mx.float32] * len(source.output_names), [("T", mx.float32)]
        )
        assert source.source in cpp and source.header in cpp
