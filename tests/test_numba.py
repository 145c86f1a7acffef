"""The fused CPU kernels (``pntm.backends.scans.numba_cpu``) beyond the shared suite: the
one-slot (hard head) paths, every checkpoint spacing, float64 to roundoff, half-precision
inputs, the thread policy and the refusals. The shared suite (``pytest --backend=numba``,
``--backend=mlx-numba``) runs the same kernels against the float64 reference on its shapes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pntm import backends
from pntm.backends.numpy_backend import NumpyBackend
from pntm.backends.scans import sequential
from pntm.backends.scans.reference import memory_scan_read_vjp
from tests.test_scans import backend_grads, block_reference, head_inputs
from tests.tolerances import FWD_RTOL, GRAD_RTOL, grad_errors, low_precision_rtol, rel_err

numba_cpu = pytest.importorskip("pntm.backends.scans.numba_cpu")
NP = NumpyBackend()
KERNEL_BACKENDS = [name for name in backends.NAMES if name.endswith("numba")]


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_ops(request):
    info = {i.name: i for i in backends.available()}[request.param]
    if not info.runs:
        pytest.skip(f"backend {request.param!r} cannot run here: {info.reason}")
    return backends.get(request.param)


def one_slot_inputs(rng, B, T, K, N, D, dense_steps: bool):
    """Hard heads' weights: one nonzero slot per step (not always 1), steps that write or read
    nothing, and optionally a few soft steps, so that chunks of each kind meet."""
    w = np.eye(N)[rng.integers(0, N, (B, T, K))] * rng.uniform(0.5, 1, (B, T, K, 1))
    rho = np.eye(N)[rng.integers(0, N, (B, T, K))]
    w[:, ::5] = 0.0
    rho[:, 3::7] = 0.0
    if dense_steps:
        w[:, T // 2] = rng.dirichlet(np.ones(N), (B, K))
        rho[:, T // 3] = rng.dirichlet(np.ones(N), (B, K))
    erase = rng.uniform(0, 1, (B, T, K, D))
    erase[:, min(2, T - 1)] = 1.0  # an exact overwrite
    return dict(w=w, erase=erase, add=rng.normal(size=(B, T, K, D)), rho=rho,
                m0=rng.normal(size=(B, K, N, D)))  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 3, 16, 200])
@pytest.mark.parametrize("dense_steps", [False, True], ids=["one-slot", "mixed"])
@pytest.mark.parametrize("B,T,K,N,D", [(2, 40, 2, 7, 3), (1, 1, 1, 1, 1), (2, 70, 1, 9, 2)])
def test_one_slot_paths_and_checkpoint_spacing(kernel_ops, B, T, K, N, D, dense_steps, chunk):
    """Writes and reads of a single slot (every hard head) run O(D) paths, and a chunk of them
    is walked back by undoing each write: equal to the float64 reference, forward and every
    gradient, at every checkpoint spacing (one step, uneven last chunk, one chunk)."""
    ops = kernel_ops
    rng = np.random.default_rng(T + chunk)
    inputs = one_slot_inputs(rng, B, T, K, N, D, dense_steps)
    want_reads, states = sequential.memory_scan_states(NP, **inputs)

    def scan(*x):
        return numba_cpu.memory_scan_read(ops, *x, chunk=chunk)

    reads, final = scan(*(ops.asarray(x) for x in inputs.values()))
    assert rel_err(ops.to_numpy(reads), want_reads) <= FWD_RTOL
    assert rel_err(ops.to_numpy(final), states[-1]) <= FWD_RTOL
    d_read, d_final = rng.normal(size=want_reads.shape), rng.normal(size=states[-1].shape)
    want = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)
    errors = grad_errors(
        backend_grads(ops, scan, inputs, [d_read, d_final]), {n: want[n] for n in inputs}
    )
    assert max(errors.values()) <= GRAD_RTOL, errors


def test_forward_keeps_one_state_per_chunk():
    """The residual a backward keeps is the state every ``chunk`` steps,
    O(B K (T / chunk) N D), never a state per step."""
    ops = backends.get("numba")
    B, T, K, N, D = 2, 50, 3, 6, 4
    rng = np.random.default_rng(0)
    x = one_slot_inputs(rng, B, T, K, N, D, dense_steps=True)
    out = numba_cpu._memory_forward_op(
        ops, *(ops.asarray(v) for v in x.values()), None, None, None, chunk=16, save=True
    )
    assert tuple(out[2].shape) == (B, K, 4, D, N)
    assert np.array_equal(ops.to_numpy(out[2])[:, :, 0], np.swapaxes(x["m0"], -1, -2).astype("f4"))


def test_float64_is_exact_to_roundoff(kernel_ops):
    """In float64 the kernels compute the reference's function to roundoff (1e-12): the
    block (heads in slot space, memory, reads) and its gradients, and (PyTorch: MLX has no
    complex128) the linear scan. For MLX this also checks the way back: ``mx.array`` of a
    float64 NumPy array is float32 unless told, which once rounded every output."""
    if kernel_ops.framework == "torch":
        import torch

        ops = backends.get("numba", dtype=torch.float64)
    else:
        import mlx.core as mx

        ops = backends.get("mlx-numba", dtype=mx.float64)
    rng = np.random.default_rng(1)
    B, T, K, N, D, S, lag = 2, 33, 2, 6, 3, 1, (0, 2)
    inputs = {
        f"{name}_{part}": x
        for name in ("write", "read")
        for part, x in head_inputs(rng, B, T, K, N, S, False, True).items()
    }
    inputs |= dict(erase=rng.uniform(0, 1, (B, T, K, D)), add=rng.normal(size=(B, T, K, D)),
                   m0=rng.normal(size=(B, K, N, D)))  # fmt: skip
    cot = [rng.normal(size=s) for s in ((B, T, K, D), (B, K, N, D), (B, K, N), (B, K, N))]
    want, want_grads = block_reference(inputs, N, lag, *cot)
    names = list(inputs)

    def scan(*x):
        a = dict(zip(names, x, strict=True))
        return ops.block_scan(
            a["write_shift"], a["write_gate"], a["read_shift"], a["read_gate"], a["erase"],
            a["add"], N, a["write_start"], a["read_start"], a["m0"], lag,
        )  # fmt: skip

    got = scan(*(ops.asarray(v) for v in inputs.values()))
    for out, ref in zip(got, want, strict=True):
        assert rel_err(ops.to_numpy(out), ref) <= 1e-12
    errors = grad_errors(backend_grads(ops, scan, inputs, cot), want_grads)
    assert max(errors.values()) <= 1e-12, errors
    if ops.framework == "mlx":
        return
    a = rng.uniform(0, 1, (2, 40, 3)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (2, 40, 3)))
    b, h0 = rng.normal(size=(2, 40, 3)) + 0j, rng.normal(size=(2, 3)) + 0j
    h = ops.to_numpy(ops.linear_scan(*(ops.asarray(v) for v in (a, b, h0))))
    assert rel_err(h, sequential.linear_scan(NP, a, b, h0)) <= 1e-12


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_compute_in_float32(kernel_ops, dtype):
    """bfloat16 and float16 inputs: computed in float32, outputs and gradients returned in
    the input dtype, within the half-precision tolerances of the rounded inputs' reference."""
    ops = kernel_ops
    rng = np.random.default_rng(2)
    x = one_slot_inputs(rng, 2, 24, 2, 5, 3, dense_steps=True)
    if ops.framework == "torch":
        import torch

        half = getattr(torch, dtype)
        native = {n: torch.tensor(v, dtype=half) for n, v in x.items()}
        rounded = {n: t.double().numpy() for n, t in native.items()}
    else:
        import mlx.core as mx

        half = getattr(mx, dtype)
        native = {n: mx.array(v.astype(np.float32)).astype(half) for n, v in x.items()}
        rounded = {n: np.array(t.astype(mx.float32)).astype(np.float64) for n, t in native.items()}
    reads, final = ops.memory_scan_read(**native)
    assert str(reads.dtype).endswith(dtype) and str(final.dtype).endswith(dtype)
    want_reads, states = sequential.memory_scan_states(NP, **rounded)
    fwd_rtol, _ = low_precision_rtol(dtype)
    to64 = (
        (lambda t: t.double().numpy())
        if ops.framework == "torch"
        else (lambda t: np.array(t.astype(mx.float32)).astype(np.float64))
    )
    assert rel_err(to64(reads), want_reads) <= fwd_rtol
    assert rel_err(to64(final), states[-1]) <= fwd_rtol


def test_thread_settings_are_honoured():
    import torch

    saved = torch.get_num_threads()
    try:
        numba_cpu.set_threads(None)
        torch.set_num_threads(1)
        assert numba_cpu.threads() == 1  # a library user's torch.set_num_threads holds
        numba_cpu.set_threads(numba_cpu.max_threads())
        assert numba_cpu.threads() == numba_cpu.max_threads()
        with pytest.raises(ValueError, match=r"kernel threads must be 1\.\."):
            numba_cpu.set_threads(numba_cpu.max_threads() + 1)
        ops = backends.get("numba")
        words = backends.set_threads(ops, 1)
        assert torch.get_num_threads() == 1 and numba_cpu.threads() == 1
        assert "1 framework thread(s), 1 kernel thread(s)" in words
        if "OMP_NUM_THREADS" not in os.environ:  # the default policy
            backends.set_threads(ops)
            assert torch.get_num_threads() == 1
            cores = min(os.cpu_count() or 1, numba_cpu.max_threads())
            assert numba_cpu.threads() == cores
        with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
            backends.set_threads(ops, 0)
    finally:
        numba_cpu.set_threads(None)
        torch.set_num_threads(saved)


def _mlx_numba():
    info = {i.name: i for i in backends.available()}["mlx-numba"]
    if not info.runs:
        pytest.skip(f"backend 'mlx-numba' cannot run here: {info.reason}")
    return backends.get("mlx-numba")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4096, 64, 200), (3, 257, 33, 65), (1, 1, 600, 1000)])
def test_projection_through_numpy_blas_matches_mlx(dtype, shape):
    """``project`` on mlx-numba (MLX on a CPU whose MLX multiplies with the reference BLAS)
    runs large multiplies by a weight matrix through NumPy's BLAS with its own backward: the
    product and both gradients equal the float64 product's, to the dtype's roundoff (float32:
    sums of up to 4096 products, 1e-5 relative), on odd and one-row shapes."""
    import mlx.core as mx

    ops = _mlx_numba()
    if not numba_cpu.BLAS_FOR_MLX:
        pytest.skip("MLX multiplies with its own BLAS on this platform")
    *rows, inner, cols = shape
    rng = np.random.default_rng(inner)
    x, w, cot = (rng.normal(size=s) for s in ((*rows, inner), (inner, cols), (*rows, cols)))
    assert np.prod(rows) * inner * cols >= numba_cpu.BLAS_MIN_WORK  # the route, not MLX's
    dt = getattr(mx, dtype)
    routed = numba_cpu.blas_matmul(ops, mx.array(x, dt), mx.array(w, dt))
    assert routed is not None
    out, (dx, dw) = mx.vjp(
        lambda a, b: [ops.project(a, b)], [mx.array(x, dt), mx.array(w, dt)], [mx.array(cot, dt)]
    )
    x2 = x.reshape(-1, inner)
    want = {"out": x @ w, "dx": cot @ w.T, "dw": x2.T @ cot.reshape(-1, cols)}
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for name, got in {"out": out[0], "dx": dx, "dw": dw}.items():
        assert got.dtype == dt
        assert rel_err(np.array(got, dtype=np.float64), want[name]) <= rtol, name


def test_small_or_other_multiplies_stay_mlx():
    """Below ``BLAS_MIN_WORK`` (where MLX's own multiply is as fast, measured), with a batched
    right operand, or in half precision, ``project`` is MLX's multiply; plain ``matmul`` always
    is (evaluating a cotangent early can keep a long backward's intermediates alive)."""
    import mlx.core as mx

    ops = _mlx_numba()
    small = (mx.ones((8, 64)), mx.ones((64, 256)))
    assert numba_cpu.BLAS_MIN_WORK > 8 * 64 * 256
    assert numba_cpu.blas_matmul(ops, *small) is None
    assert numba_cpu.blas_matmul(ops, mx.ones((4, 512, 64)), mx.ones((4, 64, 256))) is None
    half = (mx.ones((512, 64), dtype=mx.float16), mx.ones((64, 256), dtype=mx.float16))
    assert numba_cpu.blas_matmul(ops, *half) is None
    big = (mx.ones((4096, 64)), mx.ones((64, 256)))
    calls = []
    real = numba_cpu.blas_matmul
    try:
        numba_cpu.blas_matmul = lambda *a: calls.append(1) or real(*a)
        np.testing.assert_allclose(np.array(ops.matmul(*big)), 64.0)
        assert calls == []
        np.testing.assert_allclose(np.array(ops.project(*big)), 64.0)
        assert calls == ([1] if numba_cpu.BLAS_FOR_MLX else [])
    finally:
        numba_cpu.blas_matmul = real


def test_mlx_numba_framework_threads_are_numpy_blas_threads():
    """MLX has no thread setting; on mlx-numba the framework's threads are NumPy's BLAS's
    (OpenBLAS's idle workers spin beside the kernels' pool: 2 threads made a step 18% slower
    than 1 on 2 cores, measured)."""
    ops = _mlx_numba()
    if not numba_cpu.BLAS_FOR_MLX:
        pytest.skip("MLX multiplies with its own BLAS on this platform")
    saved = numba_cpu.blas_threads()
    try:
        words = backends.set_threads(ops, 1)
        assert numba_cpu.blas_threads() == 1 and ops.framework_threads() == 1
        assert words.startswith("1 framework thread(s)")
    finally:
        if saved:
            numba_cpu.set_blas_threads(saved)
        numba_cpu.set_threads(None)


def test_pool_without_spinning_workers():
    """numba's workqueue pool: its workers sleep while they wait (OpenMP's would spin beside
    PyTorch's own OpenMP runtime, and ignored set_num_threads there, measured)."""
    import numba

    ops = backends.get("numba")
    ops.linear_scan(ops.asarray(np.ones((1, 2, 1))), ops.asarray(np.ones((1, 2, 1))))
    if "NUMBA_THREADING_LAYER" not in os.environ:
        assert numba.threading_layer() == "workqueue"


def test_refusals_name_the_value():
    import torch

    ops = backends.get("numba")
    w = torch.ones((1, 3, 1, 2))
    e = torch.ones((1, 3, 1, 4))
    with pytest.raises(ValueError, match="float32, float64, float16, bfloat16 for w, got int64"):
        ops.memory_scan_read(w.long(), e, e, w)
    with pytest.raises(ValueError, match="must share one dtype"):
        ops.memory_scan_read(w, e.double(), e, w)
    with pytest.raises(ValueError, match="must be at least 1, got 0"):
        numba_cpu.memory_scan_read(ops, w, e, e, w, torch.zeros((1, 1, 2, 4)), chunk=0)
    shift, gate = torch.ones((1, 3, 2, 2)), torch.ones((1, 3, 2))
    with pytest.raises(ValueError, match="an odd size"):
        ops.head_scan(shift, gate, 4)
    with pytest.raises(ValueError, match=r"one per head \(2\), got \(1, 2, 3\)"):
        ops.head_scan(torch.ones((1, 3, 2, 3)), gate, 4, lag=(1, 2, 3))


def test_a_missing_numba_is_named_with_its_install():
    """Without numba the two backends say why they cannot run and how to install it, and
    ``auto`` falls back to the framework path."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from pntm import backends\n"
        "infos = {i.name: i for i in backends.available()}\n"
        "print(infos['numba'].runs, infos['numba'].reason, sep='|')\n"
        "print(infos['mlx-numba'].reason)\n"
        "print(backends.best_available())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "False|numba is not installed (pip install 'pntm[torch]')"
    assert out[1] == "numba is not installed (pip install 'pntm[mlx]')"
    assert out[2] in ("torch", "mlx")


def test_freed_memory_is_kept_on_glibc():
    """After ``keep_freed_memory`` a freed 64 MB block stays with the process: it came from
    the heap (no mmap) and the heap's end does not move back when it is freed (a trim
    threshold cut to 0 once made glibc hand memory back at every free: 42,000 page faults
    a step, an MLX step at T = 512 35% slower, measured)."""
    import ctypes
    import ctypes.util
    import platform

    kept = backends.keep_freed_memory()
    assert kept == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    if not kept:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    size = 64 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    end = libc.sbrk(0)
    assert block < end  # from the heap, below its end: not a mapping of its own
    libc.free(block)
    assert libc.sbrk(0) == end  # the heap was not trimmed
