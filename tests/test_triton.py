"""The Triton kernels' own cases, against the float64 sequential reference: every way a scan is
cut up (slot and D tiles, checkpoint spans, time segments), half-precision inputs, the no-grad
path, the content-read fallback and refusals. The cases every backend shares run with
``--backend=triton`` in test_scans.py and test_model.py. Without a GPU all of this runs in
Triton's CPU interpreter (conftest.py), so shapes are small."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pntm import backends

INFO = {info.name: info for info in backends.available()}
if not INFO["triton"].runs:
    reason = f"backend 'triton' cannot run here: {INFO['triton'].reason}"
    pytest.skip(reason, allow_module_level=True)

import torch  # noqa: E402

from pntm.backends.numpy_backend import NumpyBackend  # noqa: E402
from pntm.backends.scans import sequential  # noqa: E402
from pntm.backends.scans import triton as ts  # noqa: E402
from pntm.backends.scans.reference import linear_scan_vjp, memory_scan_read_vjp  # noqa: E402
from tests.test_scans import linear_inputs, memory_inputs  # noqa: E402
from tests.tolerances import (  # noqa: E402
    FWD_RTOL,
    GRAD_RTOL,
    grad_errors,
    low_precision_rtol,
    rel_err,
)

NP = NumpyBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def only_when_triton_is_chosen(request):
    chosen = request.config.getoption("--backend")
    if chosen not in ("triton", "all"):
        pytest.skip(f"--backend={chosen} leaves out the triton backend's own tests")


# the plan options of the memory kernel: one step per chunk, chunks that do not divide T, slot
# and D tiles smaller than N and D (partial sums across tiles), several time segments (summary
# pass, segment scan, then the segments in parallel, forward and backward)
PLANS = {
    "default": {},
    "chunk1": dict(chunk=1),
    "chunk3-seg2": dict(chunk=3, segments=2),
    "tiles2x2": dict(block_n=2, block_d=2),
    "tiles4x1-chunk4-seg5": dict(chunk=4, block_n=4, block_d=1, segments=5),
    "seg-per-chunk": dict(chunk=5, segments=100),
}
SHAPE = (2, 23, 2, 7, 5)  # B, T, K, N, D: odd, T not a multiple of any chunk above


def as_torch(x: np.ndarray, dtype=torch.float32, grad: bool = True) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, device=DEVICE, requires_grad=grad)


def check_memory(inputs: dict, dtype=torch.float32, fwd_rtol=FWD_RTOL, grad_rtol=GRAD_RTOL, **plan):
    """Forward, final state and every gradient of the fused scan against the reference, on
    inputs rounded to ``dtype`` (so that only the kernel's own error is measured)."""
    native = {n: as_torch(x, dtype) for n, x in inputs.items()}
    rounded = {n: x.detach().double().cpu().numpy() for n, x in native.items()}
    want_reads, states = sequential.memory_scan_states(NP, **rounded)
    reads, final = ts.memory_scan_read_fused(**native, **plan)
    assert reads.dtype == final.dtype == dtype
    assert rel_err(reads.detach().double().cpu().numpy(), want_reads) <= fwd_rtol
    assert rel_err(final.detach().double().cpu().numpy(), states[-1]) <= fwd_rtol
    rng = np.random.default_rng(3)
    # the cotangents reach the kernel rounded to the outputs' dtype: give the reference the same
    d_read, d_final = (
        as_torch(rng.normal(size=x.shape), dtype, grad=False).double().cpu().numpy()
        for x in (want_reads, states[-1])
    )
    loss = (reads.float() * as_torch(d_read, grad=False)).sum()
    (loss + (final.float() * as_torch(d_final, grad=False)).sum()).backward()
    want = memory_scan_read_vjp(**rounded, d_read=d_read, d_final=d_final)
    got = {n: x.grad.double().cpu().numpy() for n, x in native.items()}
    assert all(native[n].grad.dtype == dtype for n in native)
    errors = grad_errors(got, {n: want[n] for n in native})
    assert max(errors.values()) <= grad_rtol, errors


TILE_OPTIONS = ("block_n", "block_d")


@pytest.mark.parametrize(
    "plan, content",
    [(p, False) for p in PLANS]
    + [(p, True) for p in PLANS if not set(PLANS[p]) & set(TILE_OPTIONS)],
    ids=lambda x: x if isinstance(x, str) else ("content" if x else "location"),
)
def test_memory_kernel_every_plan_matches_reference(plan, content):
    """Content reads take the whole memory in one tile: only the time plans apply to them."""
    inputs = memory_inputs(np.random.default_rng(0), *SHAPE, content)
    check_memory(inputs, **PLANS[plan])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 1, 1, 1), (3, 1, 2, 3, 1)])
@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
def test_memory_kernel_edge_shapes_every_segment_count(shape, content):
    """T=1, N=1, D=1 with the time split asked for (it is capped at one segment per chunk)."""
    inputs = memory_inputs(np.random.default_rng(1), *shape, content)
    check_memory(inputs, chunk=1, segments=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
def test_memory_kernel_half_precision_inputs_accumulate_in_float32(dtype, content):
    inputs = memory_inputs(np.random.default_rng(2), 2, 19, 2, 5, 3, content)
    fwd_rtol, grad_rtol = low_precision_rtol(dtype)
    check_memory(
        inputs,
        dtype,
        fwd_rtol=fwd_rtol,
        grad_rtol=grad_rtol,
        chunk=4,
        segments=2,
    )


def test_memory_kernel_without_gradients_keeps_no_checkpoints(monkeypatch):
    inputs = memory_inputs(np.random.default_rng(4), *SHAPE, content=True)
    allocated = []
    original = ts._output

    def spy(shape, dtype, device):
        allocated.append(tuple(shape))
        return original(shape, dtype, device)

    monkeypatch.setattr(ts, "_output", spy)
    with torch.no_grad():
        reads, _ = ts.memory_scan_read_fused(**{n: as_torch(x) for n, x in inputs.items()})
    want, _ = sequential.memory_scan_states(NP, **inputs)
    assert rel_err(reads.cpu().numpy(), want) <= FWD_RTOL
    B, T, K, N, D = SHAPE
    assert (B * K, -(-T // ts.DEFAULT_CHUNK), N, D) not in allocated


def test_memory_kernel_over_2048_steps_in_segments():
    """A long scan in the interpreter (T = 65,536 runs on a GPU, in test_scans.py): 64 chunks in
    4 segments, decays of exactly 0 and 1 inside."""
    inputs = memory_inputs(np.random.default_rng(8), 1, 2048, 1, 4, 3, content=False)
    inputs["erase"] *= 0.05  # slots keep content over long stretches
    check_memory(inputs, chunk=32, segments=4)


def test_content_reads_too_large_for_one_tile_take_the_chunked_path(monkeypatch):
    monkeypatch.setattr(ts, "MAX_CONTENT_TILE", 16)
    inputs = memory_inputs(np.random.default_rng(5), 2, 9, 1, 7, 3, content=True)
    native = {n: as_torch(x) for n, x in inputs.items()}
    with pytest.raises(ValueError, match=r"N_pad \* D_pad <= 16.*N=7, D=3"):
        ts.memory_scan_read_fused(**native)
    ops = backends.get("triton")
    reads, final = ops.memory_scan_read(**native)
    want, states = sequential.memory_scan_states(NP, **inputs)
    assert rel_err(reads.detach().cpu().numpy(), want) <= FWD_RTOL
    rng = np.random.default_rng(6)
    d_read, d_final = rng.normal(size=want.shape), rng.normal(size=states[-1].shape)
    loss = (reads * as_torch(d_read, grad=False)).sum()
    (loss + (final * as_torch(d_final, grad=False)).sum()).backward()
    want_grads = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)
    got = {n: x.grad.cpu().numpy() for n, x in native.items()}
    errors = grad_errors(got, {n: want_grads[n] for n in native})
    assert max(errors.values()) <= GRAD_RTOL, errors
    assert "PyTorch chunked scan" in ts.describe()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_kernel_half_precision_inputs(dtype):
    rng = np.random.default_rng(6)
    a, b, h0 = linear_inputs(rng, 2, 70, (3,), complex_=False)
    ta, tb, th = (as_torch(x, dtype) for x in (a, b, h0))
    rounded = [x.detach().double().cpu().numpy() for x in (ta, tb, th)]
    h = ts.linear_scan_fused(ta, tb, th)
    assert h.dtype == dtype
    tol, grad_tol = low_precision_rtol(dtype)
    assert rel_err(h.detach().double().cpu().numpy(), sequential.linear_scan(NP, *rounded)) <= tol
    d_h = as_torch(rng.normal(size=b.shape), dtype, grad=False).double().cpu().numpy()
    (h.float() * as_torch(d_h, grad=False)).sum().backward()
    want = dict(zip(("a", "b", "h0"), linear_scan_vjp(*rounded, d_h), strict=True))
    got = {n: x.grad.double().cpu().numpy() for n, x in zip(want, (ta, tb, th), strict=True)}
    errors = grad_errors(got, want)
    assert max(errors.values()) <= grad_tol, errors


def test_linear_kernel_tiles_carry_across_many_tiles():
    """T = 64 * 5 + 1 steps: several tiles of 64 rows and a last tile of one row."""
    rng = np.random.default_rng(7)
    a, b, h0 = linear_inputs(rng, 1, 321, (2,), complex_=True)
    h = ts.linear_scan_fused(*(as_torch(x, torch.complex64, grad=False) for x in (a, b, h0)))
    assert rel_err(h.cpu().numpy(), sequential.linear_scan(NP, a, b, h0)) <= FWD_RTOL


def test_kernels_refuse_float64_with_the_allowed_dtypes():
    x = torch.zeros((1, 2, 1, 3), dtype=torch.float64, device=DEVICE)
    e = torch.zeros((1, 2, 1, 2), dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"torch.float32, torch.float16, torch.bfloat16.*float64"):
        ts.memory_scan_read_fused(x, e, e, x)
    with pytest.raises(ValueError, match=r"a and b of one shape"):
        ts.linear_scan_fused(x, e)
    c128 = torch.zeros((1, 2, 3), dtype=torch.complex128, device=DEVICE)
    with pytest.raises(ValueError, match=r"torch.complex64, torch.float32 for a.*complex128"):
        ts.linear_scan_fused(c128, c128)
    with pytest.raises(ValueError, match=r"share one dtype.*'erase': torch.float16"):
        ts.memory_scan_read_fused(x.float(), e.half(), e.float(), x.float())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(block_n=3), "block_n must be a power of two, got 3"),
        (dict(chunk=0), "chunk must be >= 1, got 0"),
        (dict(segments=0), "segments must be >= 1, got 0"),
        (dict(block_d=4, content=True), "block_n=None and block_d=4 apply to location reads"),
    ],
)
def test_plan_refuses_bad_options_by_name(options, message):
    content = options.pop("content", False)
    with pytest.raises(ValueError, match=message):
        ts.plan_memory(1, 4, 1, 5, 2, content, torch.device("cpu"), **options)


def test_every_kernel_configuration_compiles_for_an_h100(tmp_path):
    """The interpreter runs the kernels' semantics, not the compiler: compile every launch kind
    for sm_90 ahead of time (no GPU needed; Triton's bundled ptxas), in a process where the
    kernels are defined for compiling (tests/triton_compile_check.py prints registers and
    spills)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    done = subprocess.run(
        [sys.executable, script, "90"], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("0 of ") and summary.endswith("failed to compile for sm_90")


def test_outputs_start_as_nan_under_the_test_harness():
    """The harness that makes an unwritten element fail is itself in force."""
    out = ts._output((2, 3), torch.complex64, torch.device(DEVICE))
    assert torch.isnan(torch.view_as_real(out)).all()
