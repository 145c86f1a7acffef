"""The two scan primitives: every backend against the float64 sequential reference, forward and
gradients; the reference's hand-written gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from pntm.backends.numpy_backend import NumpyBackend
from pntm.backends.scans import chunked, sequential
from pntm.backends.scans.reference import head_scan_vjp, linear_scan_vjp, memory_scan_read_vjp
from tests.tolerances import (
    CONDITION_MARGIN,
    FD_EPS,
    FD_RTOL_REFERENCE,
    FWD_RTOL,
    GRAD_RTOL,
    LONG_T_RTOL,
    central_difference,
    grad_errors,
    input_rounding_sensitivity,
    rel_err,
)

NP = NumpyBackend()

# (B, T, rest) for the linear scan; decays include exact zeros and ones
LINEAR_SHAPES = [(1, 1, (1,)), (2, 7, (3,)), (3, 64, (2, 5)), (2, 129, (4,)), (1, 1000, (3,))]
# (B, T, K, N, D) for the memory scan: T=1, N=1, odd D, K>1, batch>1, T not a square
MEMORY_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 5, 1, 1, 3),
    (1, 17, 3, 4, 5),
    (3, 40, 2, 7, 1),
    (2, 130, 2, 5, 3),
]


def linear_inputs(rng, B, T, rest, complex_):
    shape = (B, T, *rest)
    a = rng.uniform(0, 1, shape)
    a.flat[:: max(1, a.size // 7)] = 0.0  # a reset: the scan must be exact here
    a.flat[3 :: max(1, a.size // 5)] = 1.0
    b = rng.normal(size=shape)
    h0 = rng.normal(size=(B, *rest))
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
    return a, b, h0


def memory_inputs(rng, B, T, K, N, D, content):
    w = rng.dirichlet(np.ones(N), (B, T, K))
    rho = rng.dirichlet(np.ones(N), (B, T, K))
    erase = rng.uniform(0, 1, (B, T, K, D))
    add = rng.normal(size=(B, T, K, D))
    # exact decays of 0 (one-hot weight, erase 1) and of 1 (zero weight)
    w[:, T // 2, 0] = 0.0
    w[:, T // 2, 0, 0] = 1.0
    erase[:, T // 2, 0] = 1.0
    if T > 2:
        w[:, T // 3 + 1, -1] = 0.0
    inputs = dict(w=w, erase=erase, add=add, rho=rho, m0=rng.normal(size=(B, K, N, D)))
    if content:
        inputs.update(
            key=rng.normal(size=(B, T, K, D)),
            beta=rng.uniform(0, 4, (B, T, K)),
            gamma=rng.uniform(0, 1, (B, T, K)),
        )
    return inputs


def backend_grads(ops, fn, inputs: dict, cotangents: list):
    """Gradients of ``sum_i <fn(*inputs)_i, cotangent_i>`` w.r.t. every input, via autodiff."""
    names = list(inputs)

    def loss(params):
        outs = fn(*[params[n] for n in names])
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = 0
        for out, cot in zip(outs, cotangents, strict=True):
            total = total + ops.sum(
                ops.real(out * ops.asarray(cot)) if np.iscomplexobj(cot) else out * ops.asarray(cot)
            )
        return total

    _, grads = ops.value_and_grad(loss)({n: ops.asarray(x) for n, x in inputs.items()})
    return {n: ops.to_numpy(g) for n, g in grads.items()}


# ---------------------------------------------------------------------- reference vs FD


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_reference_linear_scan_gradient_matches_finite_differences(complex_):
    rng = np.random.default_rng(0)
    a, b, h0 = linear_inputs(rng, 2, 9, (3,), complex_)
    d_h = rng.normal(size=b.shape) + (1j * rng.normal(size=b.shape) if complex_ else 0)

    def loss():
        return float(np.sum(np.real(np.conj(d_h) * sequential.linear_scan(NP, a, b, h0))))

    for x, grad in zip((a, b, h0), linear_scan_vjp(a, b, h0, d_h), strict=True):
        for k in rng.choice(x.size, size=6, replace=False):
            index = np.unravel_index(k, x.shape)
            # cotangent convention for complex values: dL/dRe + i dL/dIm
            want = central_difference(loss, x, index)
            if complex_:
                d_imag = (1j * central_difference(loss, x, index, eps=1j * FD_EPS)).real
                want = want + 1j * d_imag
            assert abs(grad[index] - want) <= FD_RTOL_REFERENCE * max(1.0, abs(want))


@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
def test_reference_memory_scan_gradient_matches_finite_differences(content):
    rng = np.random.default_rng(1)
    inputs = memory_inputs(rng, 2, 6, 2, 4, 3, content)
    d_read = rng.normal(size=(2, 6, 2, 3))
    d_final = rng.normal(size=(2, 2, 4, 3))

    def loss():
        reads, states = sequential.memory_scan_states(NP, **inputs)
        return float(np.sum(reads * d_read) + np.sum(states[-1] * d_final))

    grads = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)
    for name, x in inputs.items():
        flat = rng.choice(x.size, size=min(6, x.size), replace=False)
        for k in flat:
            index = np.unravel_index(k, x.shape)
            want = central_difference(loss, x, index)
            assert abs(grads[name][index] - want) <= FD_RTOL_REFERENCE * max(1.0, abs(want)), name


# ---------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("B,T,rest", LINEAR_SHAPES, ids=lambda s: str(s))
def test_linear_scan_matches_reference(ops, B, T, rest, complex_):
    rng = np.random.default_rng(T)
    a, b, h0 = linear_inputs(rng, B, T, rest, complex_)
    want = sequential.linear_scan(NP, a, b, h0)
    got = ops.to_numpy(ops.linear_scan(ops.asarray(a), ops.asarray(b), ops.asarray(h0)))
    assert rel_err(got, want) <= FWD_RTOL
    got0 = ops.to_numpy(ops.linear_scan(ops.asarray(a), ops.asarray(b)))
    assert rel_err(got0, sequential.linear_scan(NP, a, b)) <= FWD_RTOL
    if not ops.trainable:
        return
    d_h = rng.normal(size=b.shape) + (1j * rng.normal(size=b.shape) if complex_ else 0)
    want_grads = dict(zip(("a", "b", "h0"), linear_scan_vjp(a, b, h0, d_h), strict=True))
    got_grads = backend_grads(ops, ops.linear_scan, dict(a=a, b=b, h0=h0), [np.conj(d_h)])
    errors = grad_errors(got_grads, want_grads)
    assert max(errors.values()) <= GRAD_RTOL, errors


@pytest.mark.parametrize("content", [False, True], ids=["location", "content"])
@pytest.mark.parametrize("B,T,K,N,D", MEMORY_SHAPES, ids=lambda s: str(s))
def test_memory_scan_read_matches_reference(ops, B, T, K, N, D, content):
    rng = np.random.default_rng(T * N + D)
    inputs = memory_inputs(rng, B, T, K, N, D, content)
    want_reads, states = sequential.memory_scan_states(NP, **inputs)
    native = {n: ops.asarray(x) for n, x in inputs.items()}
    reads, final = ops.memory_scan_read(**native)
    assert rel_err(ops.to_numpy(reads), want_reads) <= FWD_RTOL
    assert rel_err(ops.to_numpy(final), states[-1]) <= FWD_RTOL
    no_m0 = {n: x for n, x in native.items() if n != "m0"}
    want_reads0, _ = sequential.memory_scan_states(
        NP, **{n: x for n, x in inputs.items() if n != "m0"}
    )
    assert rel_err(ops.to_numpy(ops.memory_scan_read(**no_m0)[0]), want_reads0) <= FWD_RTOL
    if not ops.trainable:
        return
    d_read = rng.normal(size=want_reads.shape)
    d_final = rng.normal(size=states[-1].shape)
    want = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)

    def scan(*args):
        return ops.memory_scan_read(*args)

    got = backend_grads(ops, scan, inputs, [d_read, d_final])
    errors = grad_errors(got, {n: want[n] for n in inputs})

    def reference_grads(x):
        g = memory_scan_read_vjp(**x, d_read=d_read, d_final=d_final)
        return {n: g[n] for n in inputs}

    conditioned = CONDITION_MARGIN * input_rounding_sensitivity(reference_grads, inputs)
    assert max(errors.values()) <= max(GRAD_RTOL, conditioned), (errors, conditioned)


@pytest.mark.parametrize("chunk,max_group", [(1, 1 << 26), (3, 1 << 26), (4, 1), (5, 40)])
def test_memory_scan_chunking_and_backward_groups(chunk, max_group):
    """The parallel algorithm itself, in float64 for exactness, over chunk lengths (one step per
    chunk, uneven last chunk) and backward group sizes (one chunk per group, several chunks)."""
    rng = np.random.default_rng(chunk)
    inputs = memory_inputs(rng, 2, 23, 2, 3, 2, content=True)
    want_reads, states = sequential.memory_scan_states(NP, **inputs)
    reads, final, starts, prod = chunked.memory_scan_forward(NP, **inputs, chunk=chunk)
    assert rel_err(reads, want_reads) <= 1e-12
    assert rel_err(final, states[-1]) <= 1e-12
    d_read, d_final = rng.normal(size=reads.shape), rng.normal(size=final.shape)
    want = memory_scan_read_vjp(**inputs, d_read=d_read, d_final=d_final)
    args = {n: x for n, x in inputs.items() if n != "m0"}
    got = chunked.memory_scan_backward(
        NP,
        starts=starts,
        prod=prod,
        d_read=d_read,
        d_final=d_final,
        chunk=chunk,
        max_group_elements=max_group,
        **args,
    )
    for name in inputs:
        assert rel_err(got[name], want[name]) <= 1e-12, name


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_linear_scan_chunking(chunk):
    rng = np.random.default_rng(chunk)
    a, b, h0 = linear_inputs(rng, 2, 37, (3,), complex_=True)
    want = sequential.linear_scan(NP, a, b, h0)
    h = chunked.scan_forward(NP, a, b, h0, chunk)
    assert rel_err(h, want) <= 1e-12
    d_h = rng.normal(size=b.shape) + 1j * rng.normal(size=b.shape)
    for got, ref_grad in zip(
        chunked.scan_backward(NP, a, h, h0, d_h, chunk),
        linear_scan_vjp(a, b, h0, d_h),
        strict=True,
    ):
        assert rel_err(got, ref_grad) <= 1e-12


# ---------------------------------------------------------------------- heads and whole blocks

# (B, T, K, N, S, lag, start): T=1, N=1 (every shift lands on the one slot), N < 2S+1 (shifts
# wrap around more than once), a lag per head, a carried start
HEAD_SHAPES = [
    (1, 1, 1, 1, 1, 0, False),
    (2, 7, 2, 5, 1, 0, False),
    (2, 30, 3, 9, 2, (0, 1, 3), True),
    (1, 50, 1, 3, 2, 1, True),
    (3, 40, 2, 13, 1, 4, True),
]


def head_inputs(rng, B, T, K, N, S, hard, start):
    if hard:  # one-hot shifts, 0/1 gates, one-hot start: exactly one-hot heads
        shift = np.eye(2 * S + 1)[rng.integers(0, 2 * S + 1, (B, T, K))]
        gate = (rng.uniform(size=(B, T, K)) < 0.2).astype(float)
        first = np.eye(N)[rng.integers(0, N, (B, K))]
    else:
        shift = rng.dirichlet(np.ones(2 * S + 1), (B, T, K))
        gate = rng.uniform(0, 1, (B, T, K))
        gate[:, T // 2] = 1.0  # an exact reset and an exact keep
        gate[:, T // 3] = 0.0
        first = rng.dirichlet(np.ones(N), (B, K))
    return dict(shift=shift, gate=gate) | ({"start": first} if start else {})


@pytest.mark.parametrize("start", [False, True], ids=["home", "start"])
def test_reference_head_scan_gradient_matches_finite_differences(start):
    rng = np.random.default_rng(3)
    inputs = head_inputs(rng, 2, 6, 2, 5, 2, False, start)
    lag = (0, 2)
    d_w = rng.normal(size=(2, 6, 2, 5))
    got = head_scan_vjp(inputs["shift"], inputs["gate"], 5, inputs.get("start"), lag, d_w)

    def loss():
        w = sequential.head_scan(NP, inputs["shift"], inputs["gate"], 5, inputs.get("start"), lag)
        return float(np.sum(w * d_w))

    for name, grad in zip(("shift", "gate", "start"), got, strict=True):
        if name not in inputs:
            continue
        for index in [tuple(rng.integers(0, n) for n in inputs[name].shape) for _ in range(8)]:
            want = central_difference(loss, inputs[name], index)
            assert abs(grad[index] - want) <= FD_RTOL_REFERENCE * max(1.0, abs(want)), name


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("B,T,K,N,S,lag,start", HEAD_SHAPES, ids=lambda s: str(s))
def test_head_scan_matches_reference(ops, B, T, K, N, S, lag, start, hard):
    """``Backend.head_scan`` (Fourier route or a kernel in slot space) against the float64
    loop in slot space; exactly one-hot with hard heads; gradients against its reverse."""
    rng = np.random.default_rng(T * N + S)
    inputs = head_inputs(rng, B, T, K, N, S, hard, start)
    want = sequential.head_scan(NP, inputs["shift"], inputs["gate"], N, inputs.get("start"), lag)
    native = {n: ops.asarray(x) for n, x in inputs.items()}

    def scan(shift, gate, start=None):
        return ops.head_scan(shift, gate, N, start, lag, hard=hard)

    got = ops.to_numpy(scan(**native))
    if hard:
        assert np.array_equal(got, want)
    assert rel_err(got, want) <= FWD_RTOL
    if not ops.trainable:
        return
    d_w = rng.normal(size=want.shape)
    grads = head_scan_vjp(inputs["shift"], inputs["gate"], N, inputs.get("start"), lag, d_w)
    want_grads = {n: g for n, g in zip(("shift", "gate", "start"), grads, strict=True)}
    errors = grad_errors(
        backend_grads(ops, scan, inputs, [d_w]), {n: want_grads[n] for n in inputs}
    )
    assert max(errors.values()) <= GRAD_RTOL, errors


def block_reference(inputs, n_slots, lag, d_read, d_final, d_last_w, d_last_r):
    """The float64 block (two heads, then the memory and its reads) and the gradients of
    ``<reads, d_read> + <M_T, d_final> + <w_T, d_last_w> + <rho_T, d_last_r>``, composed from
    the reference loops and their reverse modes."""
    x = inputs
    w = sequential.head_scan(NP, x["write_shift"], x["write_gate"], n_slots, x.get("write_start"))
    rho = sequential.head_scan(
        NP, x["read_shift"], x["read_gate"], n_slots, x.get("read_start"), lag
    )
    reads, states = sequential.memory_scan_states(NP, w, x["erase"], x["add"], rho, x["m0"])
    mem = memory_scan_read_vjp(w, x["erase"], x["add"], rho, x["m0"], d_read, d_final)
    mem["w"][:, -1] += d_last_w
    mem["rho"][:, -1] += d_last_r
    ws, wg, wst = head_scan_vjp(
        x["write_shift"], x["write_gate"], n_slots, x.get("write_start"), 0, mem["w"]
    )
    rs, rg, rst = head_scan_vjp(
        x["read_shift"], x["read_gate"], n_slots, x.get("read_start"), lag, mem["rho"]
    )
    grads = dict(
        write_shift=ws, write_gate=wg, read_shift=rs, read_gate=rg, erase=mem["erase"],
        add=mem["add"], m0=mem["m0"], write_start=wst, read_start=rst,
    )  # fmt: skip
    return (reads, states[-1], w[:, -1], rho[:, -1]), {n: grads[n] for n in inputs}


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize(
    "B,T,K,N,D,S,lag,start",
    [
        (1, 1, 1, 1, 1, 1, 0, False),
        (2, 9, 2, 5, 3, 1, 0, False),
        (2, 37, 3, 7, 2, 2, (0, 1, 3), True),
        (1, 70, 1, 11, 4, 1, 2, True),
    ],
    ids=lambda s: str(s),
)
def test_block_scan_matches_reference(ops, B, T, K, N, D, S, lag, start, hard):
    """``Backend.block_scan`` (the heads then the memory, or one fused kernel) against the
    float64 reference: reads, final memory, last head distributions and every gradient."""
    rng = np.random.default_rng(T + N)
    heads = {
        f"{name}_{part}": x
        for name in ("write", "read")
        for part, x in head_inputs(rng, B, T, K, N, S, hard, start).items()
    }
    erase = rng.uniform(0, 1, (B, T, K, D))
    erase[:, T // 2] = 1.0  # a full erase (at a one-hot weight: an exact overwrite)
    inputs = heads | dict(erase=erase, add=rng.normal(size=(B, T, K, D)))
    inputs["m0"] = rng.normal(size=(B, K, N, D))
    cot = [rng.normal(size=s) for s in ((B, T, K, D), (B, K, N, D), (B, K, N), (B, K, N))]
    want, want_grads = block_reference(inputs, N, lag, *cot)

    def scan(write_shift, write_gate, read_shift, read_gate, erase, add, m0, **starts):
        return ops.block_scan(
            write_shift, write_gate, read_shift, read_gate, erase, add, N,
            starts.get("write_start"), starts.get("read_start"), m0, lag, hard,
        )  # fmt: skip

    got = scan(**{n: ops.asarray(x) for n, x in inputs.items()})
    for out, ref in zip(got, want, strict=True):
        assert rel_err(ops.to_numpy(out), ref) <= FWD_RTOL
    if not ops.trainable:
        return
    names = list(inputs)
    by_name = backend_grads(ops, lambda *x: scan(**dict(zip(names, x, strict=True))), inputs, cot)
    errors = grad_errors(by_name, want_grads)
    assert max(errors.values()) <= GRAD_RTOL, errors


# ---------------------------------------------------------------------- long sequences


LONG_T = 65_536


@pytest.mark.slow
def test_linear_scan_stable_at_65536_steps(ops):
    """T = 65,536 with decays of exactly 0 and |a| up to 1: float32 within 1e-4 of float64, no
    NaN/Inf."""
    rng = np.random.default_rng(7)
    a, b, h0 = linear_inputs(rng, 1, LONG_T, (3,), complex_=True)
    a = a * 0.5 + 0.5 * np.exp(1j * rng.uniform(-np.pi, np.pi, a.shape))  # |a| up to 1
    a[0, ::997] = 0.0
    want = sequential.linear_scan(NP, a, b, h0)
    got = ops.to_numpy(ops.linear_scan(*map(ops.asarray, (a, b, h0))))
    assert rel_err(got, want) <= LONG_T_RTOL


@pytest.mark.slow
def test_memory_scan_stable_at_65536_steps(ops):
    """T = 65,536 with decays of exactly 0 and 1 inside: float32 within 1e-4 of float64, no
    NaN/Inf, gradients included."""
    if ops.scan == "triton" and triton_interpreted():
        pytest.skip(
            "the memory scan at T=65,536 takes about 12 minutes in Triton's CPU interpreter "
            "(measured); scripts/gpu_check.sh runs this test on a GPU, and test_triton.py runs "
            "a 2,048-step memory scan here"
        )
    rng = np.random.default_rng(8)
    inputs = memory_inputs(rng, 1, LONG_T, 1, 4, 3, content=False)
    inputs["erase"] *= 0.05  # slots keep content over long stretches
    want_reads, states = sequential.memory_scan_states(NP, **inputs)
    reads, final = ops.memory_scan_read(**{n: ops.asarray(x) for n, x in inputs.items()})
    assert rel_err(ops.to_numpy(reads), want_reads) <= LONG_T_RTOL
    assert rel_err(ops.to_numpy(final), states[-1]) <= LONG_T_RTOL
    if not ops.trainable:
        return
    d_read = rng.normal(size=want_reads.shape)
    want_grads = memory_scan_read_vjp(**inputs, d_read=d_read)
    got = backend_grads(ops, lambda *x: ops.memory_scan_read(*x)[0], inputs, [d_read])
    errors = grad_errors(got, {n: want_grads[n] for n in inputs})
    assert max(errors.values()) <= LONG_T_RTOL, errors


def triton_interpreted() -> bool:
    from pntm.backends.scans import triton

    return triton.interpreted()
