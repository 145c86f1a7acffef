"""Fused Triton kernels for P-NTM's two scan primitives (SPEC §4.3), on PyTorch tensors.

``memory_scan_read``: ``M_t = (1 - w_t e_t^T) ⊙ M_{t-1} + w_t a_t^T`` with the reads
``r_t = rho_t^T M_t`` fused in (the ``fused_recurrent`` pattern): one program per (batch·head,
block of slots, block of D, segment of time) keeps an ``BN x BD`` tile of the memory in registers
and loops over time. The ``B x T x K x N x D`` states never exist in global memory: the forward
writes the reads, the final state and, for the backward, the state at every ``chunk``-th step.

* Location reads split the tile freely; a reduction that crosses tiles (the read over slots, the
  weight gradient over D, ...) is written as per-tile partial sums that PyTorch adds up.
* Content reads (key, strength, mix) need whole rows and the softmax over all slots, so one
  program holds the whole ``N x D`` memory; where that tile would not fit on chip
  (``N_pad * D_pad > MAX_CONTENT_TILE``) the scan runs the framework path (``chunked``) instead.
* Time split ("chunked variant"): for long T and few batch·heads the time axis is cut into
  segments; a summary pass gives each segment's decay product and zero-started state, a short
  scan over segments gives their start states, then every segment runs in parallel.
* Backward: a reverse-time loop of the state cotangent ``G_t = rho_t dr_t^T + F_{t+1} ⊙ G_{t+1}``
  (plus the content-read terms), chunk by chunk from the last; each chunk's states are first
  recomputed from its checkpoint into a per-program scratch of ``chunk + 1`` tiles. Segments are
  split in time the same way, with the summary and segment scan run in reverse.

``linear_scan``: ``h_t = a_t h_{t-1} + b_t`` for the head positions in Fourier space, complex
values held as real/imaginary pairs (Triton has no complex type): tiles of ``BT`` steps are
scanned with ``tl.associative_scan`` and carried from tile to tile; the backward is the same scan
run backwards in time on ``conj(a_{t+1})`` and the output cotangent.

Inputs may be float32, float16 or bfloat16 (complex64 for the head scan); everything accumulates
in float32 and outputs come back in the input dtype.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pntm.backends.base import COSINE_EPS, Array, Backend
from pntm.backends.scans import chunked

FRAMEWORKS = ("torch",)
#: content reads keep the whole memory of one head on chip up to this many (padded) elements
#: (the backward holds about five such tiles: at 16384 it spills, compiled for sm_90)
MAX_CONTENT_TILE = 8192
#: the backward's recompute scratch, all programs together, is kept under this many bytes by
#: running fewer time segments
MAX_SCRATCH_BYTES = 1 << 30
#: location reads: (padded) elements of one program's tile
LOCATION_TILE = 2048
DEFAULT_CHUNK = 32  # steps between checkpoints (and the backward's recompute span)
#: software-pipelining depth of the time loops: the loads of the next steps' inputs (which do
#: not depend on the state) are in flight while a step computes (cp.async on sm_80 and later;
#: with plain ``range`` the compiled loop issues none)
PIPELINE_STAGES = 3
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret_knob() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; before, the variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# the kernels below are defined for the interpreter or for the compiler once, here
_INTERPRETED = _interpret_knob()


def interpreted() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET`` set
    when it was first imported)."""
    return _INTERPRETED


def unavailable_reason() -> str | None:
    if torch.cuda.is_available() or interpreted():
        return None
    return (
        "no CUDA GPU here (TRITON_INTERPRET=1 before the first import runs the kernels in "
        "Triton's CPU interpreter: slow, for tests)"
    )


def describe() -> str:
    where = "CPU interpreter, TRITON_INTERPRET=1" if interpreted() else "CUDA"
    return (
        f"Triton {triton.__version__} kernels ({where}): memory scan with location reads, and "
        f"with content reads up to N*D = {MAX_CONTENT_TILE} padded (beyond: PyTorch chunked "
        "scan), fused; head scan; controller and FFTs in PyTorch"
    )


def _output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (the tests fill it with NaN, so that an
    element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_float(name: str, x: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if x.dtype not in allowed:
        raise ValueError(
            f"triton kernels take {', '.join(map(str, allowed))} for {name}, got {x.dtype}"
        )
    if not (x.is_cuda or interpreted()):
        raise ValueError(f"triton kernels need CUDA tensors, got {name} on {x.device}")


# ====================================================================== memory scan: kernels


@triton.jit
def _program_tile(N, D, n_dblocks, BN: tl.constexpr, BD: tl.constexpr):
    """This program's block of slots and of D (grid axis 1 enumerates slot x D blocks): the
    offsets, their masks, and the tile's offsets and mask in an (N, D) memory."""
    offs_n = tl.program_id(1) // n_dblocks * BN + tl.arange(0, BN)
    offs_d = tl.program_id(1) % n_dblocks * BD + tl.arange(0, BD)
    mask_n = offs_n < N
    mask_d = offs_d < D
    tile = offs_n[:, None] * D + offs_d[None, :]
    return offs_n, offs_d, mask_n, mask_d, tile, mask_n[:, None] & mask_d[None, :]


@triton.jit
def _write(M, w_ptr, e_ptr, a_ptr, row, offs_n, offs_d, mask_n, mask_d, N, D):
    """One memory write of step ``row``: ``(1 - w e^T) ⊙ M + w a^T``; also ``w`` and ``e``."""
    w = tl.load(w_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return (1.0 - w[:, None] * e[None, :]) * M + w[:, None] * a[None, :], w, e


# T changes from batch to batch: one compiled kernel for every length. N, D and K stay
# specialised (Triton's "divisible by 16" hint vectorises the tile accesses; without it the
# content kernels spill, measured with Triton 3.6 for sm_90)
_TIME_SIZES = ["T", "n_chunks", "seg_chunks", "n_segs"]


@triton.jit
def _content_mix(M, rho, key, beta, gamma, mask_n, EPS: tl.constexpr):
    """``(1 - gamma) rho + gamma softmax_i(beta cos(key, M_i))`` and its intermediates."""
    dots = tl.sum(M * key[None, :], axis=1)
    # correctly rounded, as the reference's: the GPU's tl.sqrt and "/" are approximate
    norm_m = tl.sqrt_rn(tl.sum(M * M, axis=1) + EPS)
    norm_k = tl.sqrt_rn(tl.sum(key * key, axis=0) + EPS)
    cosine = tl.div_rn(dots, norm_m * norm_k)
    logits = tl.where(mask_n, beta * cosine, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = tl.div_rn(p, tl.sum(p, axis=0) + tl.zeros_like(p))
    return (1.0 - gamma) * rho + gamma * p, cosine, p, norm_m, norm_k


@triton.jit
def _content_read_vjp(M, rho, dr, key, beta, gamma, mask_n, EPS: tl.constexpr):
    """Reverse mode of a content read (``read_step_vjp`` of ``pntm.backends.base``)."""
    mixed, cosine, p, norm_m, norm_k = _content_mix(M, rho, key, beta, gamma, mask_n, EPS)
    d_mixed = tl.sum(M * dr[None, :], axis=1)
    d_rho = (1.0 - gamma) * d_mixed
    d_gamma = tl.sum(d_mixed * (p - rho), axis=0)
    d_content = gamma * d_mixed
    d_logits = p * (d_content - tl.sum(p * d_content, axis=0))
    d_beta = tl.sum(d_logits * cosine, axis=0)
    d_cos = beta * d_logits
    inv = tl.div_rn(d_cos, norm_m * norm_k)
    d_key = tl.sum(inv[:, None] * M, axis=0) - tl.div_rn(
        tl.sum(d_cos * cosine, axis=0) * key, norm_k * norm_k + tl.zeros_like(key)
    )
    d_mem = (
        mixed[:, None] * dr[None, :]
        + inv[:, None] * key[None, :]
        - tl.div_rn(d_cos * cosine, norm_m * norm_m)[:, None] * M
    )
    return d_mem, d_rho, d_key, d_beta, d_gamma


@triton.jit(do_not_specialize=_TIME_SIZES)
def _memory_forward_kernel(
    w_ptr, e_ptr, a_ptr, rho_ptr, key_ptr, beta_ptr, gamma_ptr,
    start_ptr,  # (BK, n_segs, N, D): segment start states (FROM_STARTS), else m0 (BK, N, D)
    reads_ptr,  # (NNB, B, T, K, D): partial reads per slot block
    final_ptr,  # (BK, N, D)
    ckpt_ptr,  # (BK, n_chunks, N, D): the state before every chunk (SAVE)
    prod_ptr, local_ptr,  # (BK, n_segs, N, D): segment summaries (SUMMARY)
    T, K, N, D, n_chunks, seg_chunks, n_segs, n_dblocks,
    CHUNK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CONTENT: tl.constexpr, FROM_STARTS: tl.constexpr, SAVE: tl.constexpr,
    SUMMARY: tl.constexpr, EPS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1) // n_dblocks
    seg = tl.program_id(2)
    b = bk // K
    k = bk % K
    offs_n, offs_d, mask_n, mask_d, tile, mask = _program_tile(N, D, n_dblocks, BN, BD)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    if SUMMARY:
        M = tl.zeros((BN, BD), dtype=tl.float32)
        P = tl.full((BN, BD), 1.0, dtype=tl.float32)
    elif FROM_STARTS:
        M = tl.load(start_ptr + (bk * n_segs + seg) * N * D + tile, mask=mask, other=0.0)
    else:
        M = tl.load(start_ptr + bk * N * D + tile, mask=mask, other=0.0).to(tl.float32)
    for c in range(c0, c1):
        if SAVE:
            tl.store(ckpt_ptr + (bk * n_chunks + c) * N * D + tile, M, mask=mask)
        for t in tl.range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, T), num_stages=STAGES):
            row = (b * T + t) * K + k
            M, w, e = _write(M, w_ptr, e_ptr, a_ptr, row, offs_n, offs_d, mask_n, mask_d, N, D)
            if SUMMARY:
                P = P * (1.0 - w[:, None] * e[None, :])
            else:
                rho = tl.load(rho_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if CONTENT:
                    key = tl.load(key_ptr + row * D + offs_d, mask=mask_d, other=0.0)
                    beta = tl.load(beta_ptr + row).to(tl.float32)
                    gamma = tl.load(gamma_ptr + row).to(tl.float32)
                    rho, _, _, _, _ = _content_mix(
                        M, rho, key.to(tl.float32), beta, gamma, mask_n, EPS
                    )
                r = tl.sum(rho[:, None] * M, axis=0)
                out = reads_ptr + ((pid_n * (tl.num_programs(0) // K) + b) * T + t) * K * D
                tl.store(out + k * D + offs_d, r.to(reads_ptr.dtype.element_ty), mask=mask_d)
    if SUMMARY:
        summary = (bk * n_segs + seg) * N * D + tile
        tl.store(prod_ptr + summary, P, mask=mask)
        tl.store(local_ptr + summary, M, mask=mask)
    elif c1 == n_chunks:
        tl.store(final_ptr + bk * N * D + tile, M.to(final_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_segs"])
def _segment_scan_kernel(
    prod_ptr, local_ptr,  # (BK, n_segs, N, D)
    x0_ptr,  # (BK, N, D): the value entering the first segment (HAS_X0), else zeros
    out_ptr,  # (BK, n_segs, N, D): the value entering each segment
    n_segs, N, D, n_dblocks,
    BN: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr, HAS_X0: tl.constexpr,
):  # fmt: skip
    """``x <- prod_s ⊙ x + local_s`` over segments (backwards in time with REVERSE)."""
    bk = tl.program_id(0).to(tl.int64)
    _, _, _, _, tile, mask = _program_tile(N, D, n_dblocks, BN, BD)
    if HAS_X0:
        x = tl.load(x0_ptr + bk * N * D + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros((BN, BD), dtype=tl.float32)
    for i in range(0, n_segs):
        s = n_segs - 1 - i if REVERSE else i
        at = (bk * n_segs + s) * N * D + tile
        tl.store(out_ptr + at, x, mask=mask)
        x = tl.load(prod_ptr + at, mask=mask, other=0.0) * x + tl.load(
            local_ptr + at, mask=mask, other=0.0
        )


@triton.jit(do_not_specialize=_TIME_SIZES)
def _memory_backward_kernel(
    w_ptr, e_ptr, a_ptr, rho_ptr, key_ptr, beta_ptr, gamma_ptr, dr_ptr,
    ckpt_ptr,  # (BK, n_chunks, N, D)
    g_end_ptr,  # (BK, n_segs, N, D): dL/dM at each segment's end (HAS_G_END), else zeros
    scratch_ptr,  # (programs, CHUNK + 1, BN, BD): one chunk of recomputed states
    dw_ptr, drho_ptr,  # (NDB, B, T, K, N): partial sums over D blocks
    de_ptr, da_ptr,  # (NNB, B, T, K, D): partial sums over slot blocks
    dkey_ptr, dbeta_ptr, dgamma_ptr,  # (B, T, K, D), (B, T, K), (B, T, K): content only
    dm0_ptr,  # (BK, N, D)
    prod_ptr, local_ptr,  # (BK, n_segs, N, D): segment summaries (SUMMARY)
    T, K, N, D, n_chunks, seg_chunks, n_segs, n_dblocks,
    CHUNK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    # a location-only summary needs no states: the read's cotangent does not depend on them
    CONTENT: tl.constexpr, HAS_G_END: tl.constexpr, SUMMARY: tl.constexpr,
    NEED_STATES: tl.constexpr, EPS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(0).to(tl.int64)
    pid_nd = tl.program_id(1)
    pid_n = pid_nd // n_dblocks
    pid_d = pid_nd % n_dblocks
    seg = tl.program_id(2)
    B = tl.num_programs(0) // K
    b = bk // K
    k = bk % K
    offs_n, offs_d, mask_n, mask_d, tile, mask = _program_tile(N, D, n_dblocks, BN, BD)
    program = (bk * tl.num_programs(1) + pid_nd) * tl.num_programs(2) + seg
    scratch = scratch_ptr + program * (CHUNK + 1) * BN * BD
    local_tile = tl.arange(0, BN)[:, None] * BD + tl.arange(0, BD)[None, :]
    if HAS_G_END:
        G = tl.load(g_end_ptr + (bk * n_segs + seg) * N * D + tile, mask=mask, other=0.0)
        G = G.to(tl.float32)
    else:
        G = tl.zeros((BN, BD), dtype=tl.float32)
    if SUMMARY:
        P = tl.full((BN, BD), 1.0, dtype=tl.float32)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        t0 = c * CHUNK
        length = tl.minimum(CHUNK, T - t0)
        if NEED_STATES:  # states of this chunk, recomputed from its checkpoint
            M = tl.load(ckpt_ptr + (bk * n_chunks + c) * N * D + tile, mask=mask, other=0.0)
            tl.store(scratch + local_tile, M)
            for l in tl.range(0, length, num_stages=STAGES):
                row = (b * T + t0 + l) * K + k
                M, _, _ = _write(M, w_ptr, e_ptr, a_ptr, row, offs_n, offs_d, mask_n, mask_d, N, D)
                tl.store(scratch + (l + 1) * BN * BD + local_tile, M)
            tl.debug_barrier()  # the reverse loop reads what other threads wrote
        # M_t of the step below; its M_{t-1} is the next (earlier) step's M_t
        if NEED_STATES:
            M_t = tl.load(scratch + length * BN * BD + local_tile)
        else:
            M_t = tl.zeros((BN, BD), dtype=tl.float32)
        for j in tl.range(0, length, num_stages=STAGES):
            l = length - 1 - j
            t = t0 + l
            row = (b * T + t) * K + k
            w = tl.load(w_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            e = tl.load(e_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            rho = tl.load(rho_ptr + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            dr = tl.load(dr_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if NEED_STATES:
                M_prev = tl.load(scratch + l * BN * BD + local_tile)
            if CONTENT:
                key = tl.load(key_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + row).to(tl.float32)
                gamma = tl.load(gamma_ptr + row).to(tl.float32)
                d_mem, d_rho, d_key, d_beta, d_gamma = _content_read_vjp(
                    M_t, rho, dr, key, beta, gamma, mask_n, EPS
                )
                G = G + d_mem
            else:
                G = G + rho[:, None] * dr[None, :]
            if not SUMMARY:
                if not CONTENT:
                    d_rho = tl.sum(M_t * dr[None, :], axis=1)
                a = tl.load(a_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                G_prev = G * M_prev  # G_t ⊙ M_{t-1}
                dw = tl.sum(G * a[None, :], axis=1) - tl.sum(G_prev * e[None, :], axis=1)
                de = -tl.sum(w[:, None] * G_prev, axis=0)
                da = tl.sum(w[:, None] * G, axis=0)
                by_slot = ((pid_d * B + b) * T + t) * K * N + k * N + offs_n
                tl.store(dw_ptr + by_slot, dw, mask=mask_n)
                tl.store(drho_ptr + by_slot, d_rho, mask=mask_n)
                by_width = ((pid_n * B + b) * T + t) * K * D + k * D + offs_d
                tl.store(de_ptr + by_width, de, mask=mask_d)
                tl.store(da_ptr + by_width, da, mask=mask_d)
                if CONTENT:
                    tl.store(dkey_ptr + row * D + offs_d, d_key, mask=mask_d)
                    tl.store(dbeta_ptr + row, d_beta)
                    tl.store(dgamma_ptr + row, d_gamma)
            decay = 1.0 - w[:, None] * e[None, :]
            G = G * decay
            if SUMMARY:
                P = P * decay
            if NEED_STATES:
                M_t = M_prev
        if NEED_STATES:
            tl.debug_barrier()  # the next chunk overwrites the scratch
    if SUMMARY:
        summary = (bk * n_segs + seg) * N * D + tile
        tl.store(prod_ptr + summary, P, mask=mask)
        tl.store(local_ptr + summary, G, mask=mask)
    elif seg == 0:
        tl.store(dm0_ptr + bk * N * D + tile, G, mask=mask)


# ====================================================================== memory scan: launches


@dataclass(frozen=True)
class MemoryPlan:
    """How one memory scan is cut up: tiles, checkpoint span and time segments."""

    block_n: int
    block_d: int
    chunk: int
    segments: int  # requested; the launch uses ``n_segs`` after rounding
    num_warps: int
    num_warps_backward: int
    stages_backward: int


def plan_memory(
    B: int,
    T: int,
    K: int,
    N: int,
    D: int,
    content: bool,
    device: torch.device,
    chunk: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    segments: int | None = None,
) -> MemoryPlan:
    """Tile sizes (powers of two), the checkpoint span and the time split.

    Content reads take the whole padded ``N x D`` memory of a head; location reads a tile of at
    most ``LOCATION_TILE`` elements, D blocks of up to 32. On a GPU, time is split until there
    are about four programs per multiprocessor (never in the interpreter, which runs programs
    one after another).
    """
    n_pad, d_pad = _pow2(N), _pow2(D)
    if content:
        if block_n is not None or block_d is not None:
            raise ValueError(
                f"content reads take the whole memory in one tile; block_n={block_n} and "
                f"block_d={block_d} apply to location reads only"
            )
        block_n, block_d = n_pad, d_pad
    else:
        block_d = block_d or min(d_pad, 32)
        block_n = block_n or min(n_pad, max(1, LOCATION_TILE // block_d))
    for name, value in (("block_n", block_n), ("block_d", block_d)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if segments is not None and segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    n_chunks = -(-T // chunk)
    programs = B * K * -(-N // block_n) * -(-D // block_d)
    if segments is None:
        segments = 1
        if device.type == "cuda" and not interpreted():
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            segments = max(1, min(n_chunks // 4, -(-target // programs)))
        # each segment's programs hold a scratch of chunk + 1 tiles in the backward
        scratch_per_segment = programs * (chunk + 1) * block_n * block_d * 4
        segments = max(1, min(segments, MAX_SCRATCH_BYTES // scratch_per_segment))
    elements = block_n * block_d
    num_warps = 1 if elements <= 256 else 2 if elements <= 1024 else 4 if elements <= 4096 else 8
    # the content backward keeps about five tiles live: twice the warps keeps a 64 x 64 tile
    # out of local memory; a 128 x 64 tile spills all the same, less without the pipeline's
    # buffers (about 270 B per thread against 420 B, compiled for sm_90)
    backward = min(16, 2 * num_warps) if content else num_warps
    stages = 1 if content and elements > 4096 else PIPELINE_STAGES
    segments = max(1, min(segments, n_chunks))
    return MemoryPlan(block_n, block_d, chunk, segments, num_warps, backward, stages)


def fits_on_chip(N: int, D: int) -> bool:
    """Whether content reads of an ``N x D`` memory run in the fused kernel."""
    return _pow2(N) * _pow2(D) <= MAX_CONTENT_TILE


def _segments(T: int, plan: MemoryPlan) -> tuple[int, int, int]:
    n_chunks = -(-T // plan.chunk)
    seg_chunks = -(-n_chunks // plan.segments)
    return n_chunks, seg_chunks, -(-n_chunks // seg_chunks)


@dataclass(frozen=True)
class _Launch:
    """The sizes and grid of one memory scan's launches under a plan."""

    B: int
    T: int
    K: int
    N: int
    D: int
    n_chunks: int
    seg_chunks: int
    n_segs: int
    nnb: int  # slot blocks
    ndb: int  # D blocks
    device: torch.device

    @classmethod
    def of(cls, w: torch.Tensor, add: torch.Tensor, plan: MemoryPlan) -> _Launch:
        B, T, K, N = w.shape
        D = add.shape[-1]
        nnb, ndb = -(-N // plan.block_n), -(-D // plan.block_d)
        return cls(B, T, K, N, D, *_segments(T, plan), nnb, ndb, w.device)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.B * self.K, self.nnb * self.ndb, self.n_segs)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The kernels' size arguments, in their order."""
        return (self.T, self.K, self.N, self.D, self.n_chunks, self.seg_chunks, self.n_segs,
                self.ndb)  # fmt: skip


def _segment_entries(
    launch: _Launch, plan: MemoryPlan, summarize, x0: torch.Tensor | None, reverse: bool
) -> torch.Tensor:
    """What enters each time segment (the state at its start, or with ``reverse`` the cotangent
    at its end): ``summarize(prod, local)`` launches the summary pass that fills each segment's
    decay product and zero-started value, then a scan over the segments from ``x0``."""
    shape = (launch.B * launch.K, launch.n_segs, launch.N, launch.D)
    device = launch.device
    prod = _output(shape, torch.float32, device)
    local = _output(shape, torch.float32, device)
    summarize(prod, local)
    entries = _output(shape, torch.float32, device)
    _segment_scan_kernel[(launch.B * launch.K, launch.nnb * launch.ndb)](
        prod, local, prod if x0 is None else x0, entries, launch.n_segs, launch.N, launch.D,
        launch.ndb, BN=plan.block_n, BD=plan.block_d, REVERSE=reverse, HAS_X0=x0 is not None,
        num_warps=plan.num_warps,
    )  # fmt: skip
    return entries


def _sum_tiles(partial: torch.Tensor) -> torch.Tensor:
    """Per-tile partial sums (tiles on axis 0) added up."""
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def memory_forward(
    w, erase, add, rho, m0, key, beta, gamma, plan: MemoryPlan, save: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reads (B, T, K, D), final state (B, K, N, D) and, with ``save``, the checkpoints."""
    launch = _Launch.of(w, add, plan)
    B, T, K, N, D = launch.B, launch.T, launch.K, launch.N, launch.D
    device, f32 = w.device, torch.float32
    content = key is not None
    partial = _output((launch.nnb, B, T, K, D), f32 if launch.nnb > 1 else w.dtype, device)
    final = _output((B, K, N, D), w.dtype, device)
    ckpt = _output((B * K, launch.n_chunks, N, D), f32, device) if save else partial
    dummy = w  # pointer arguments a launch does not read
    common = dict(
        CHUNK=plan.chunk, BN=plan.block_n, BD=plan.block_d, CONTENT=content,
        EPS=COSINE_EPS, STAGES=PIPELINE_STAGES, num_warps=plan.num_warps,
    )  # fmt: skip

    def summarize(prod, local):
        _memory_forward_kernel[launch.grid](
            w, erase, add, rho, dummy, dummy, dummy, dummy, dummy, dummy, dummy, prod, local,
            *launch.sizes, FROM_STARTS=False, SAVE=False, SUMMARY=True, **common,
        )  # fmt: skip

    segmented = launch.n_segs > 1
    start = _segment_entries(launch, plan, summarize, m0, reverse=False) if segmented else m0
    _memory_forward_kernel[launch.grid](
        w, erase, add, rho, *((key, beta, gamma) if content else (dummy,) * 3),
        start, partial, final, ckpt, dummy, dummy,
        *launch.sizes, FROM_STARTS=segmented, SAVE=save, SUMMARY=False, **common,
    )  # fmt: skip
    return _sum_tiles(partial).to(w.dtype), final, (ckpt if save else None)


def memory_backward(
    w, erase, add, rho, key, beta, gamma, ckpt, d_reads, d_final, plan: MemoryPlan
) -> tuple[torch.Tensor, ...]:
    """Gradients for ``(w, erase, add, rho, m0, key, beta, gamma)`` (float32; None for the
    content inputs without content)."""
    launch = _Launch.of(w, add, plan)
    B, T, K, N, D = launch.B, launch.T, launch.K, launch.N, launch.D
    device, f32 = w.device, torch.float32
    content = key is not None
    d_reads = d_reads.contiguous()
    d_final = None if d_final is None else d_final.contiguous()  # e.g. stride 0 from a sum
    dummy = w
    common = dict(
        CHUNK=plan.chunk, BN=plan.block_n, BD=plan.block_d, CONTENT=content,
        EPS=COSINE_EPS, STAGES=plan.stages_backward, num_warps=plan.num_warps_backward,
    )  # fmt: skip
    programs = B * K * launch.nnb * launch.ndb * launch.n_segs
    scratch = _output((programs, plan.chunk + 1, plan.block_n, plan.block_d), f32, device)
    content_in = (key, beta, gamma) if content else (dummy,) * 3

    def summarize(prod, local):
        _memory_backward_kernel[launch.grid](
            w, erase, add, rho, *content_in, d_reads, ckpt, dummy, scratch,
            dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, prod, local,
            *launch.sizes, HAS_G_END=False, SUMMARY=True, NEED_STATES=content, **common,
        )  # fmt: skip

    g_end = d_final
    if launch.n_segs > 1:
        g_end = _segment_entries(launch, plan, summarize, d_final, reverse=True)
    dw = _output((launch.ndb, B, T, K, N), f32, device)
    drho = _output((launch.ndb, B, T, K, N), f32, device)
    de = _output((launch.nnb, B, T, K, D), f32, device)
    da = _output((launch.nnb, B, T, K, D), f32, device)
    dkey = _output((B, T, K, D), f32, device) if content else None
    dbeta = _output((B, T, K), f32, device) if content else None
    dgamma = _output((B, T, K), f32, device) if content else None
    dm0 = _output((B, K, N, D), f32, device)
    _memory_backward_kernel[launch.grid](
        w, erase, add, rho, *content_in, d_reads, ckpt, dummy if g_end is None else g_end,
        scratch, dw, drho, de, da, *((dkey, dbeta, dgamma) if content else (dummy,) * 3), dm0,
        dummy, dummy,
        *launch.sizes, HAS_G_END=g_end is not None, SUMMARY=False, NEED_STATES=True, **common,
    )  # fmt: skip
    return (
        _sum_tiles(dw),
        _sum_tiles(de),
        _sum_tiles(da),
        _sum_tiles(drho),
        dm0,
        dkey,
        dbeta,
        dgamma,
    )


class MemoryScanRead(torch.autograd.Function):
    """The memory scan with its reads: fused forward, fused backward from checkpoints."""

    @staticmethod
    def forward(ctx, w, erase, add, rho, m0, key, beta, gamma, plan, save):
        with _on(w.device):
            reads, final, ckpt = memory_forward(
                w, erase, add, rho, m0, key, beta, gamma, plan, save
            )
        ctx.save_for_backward(w, erase, add, rho, key, beta, gamma, ckpt)
        ctx.plan, ctx.m0_dtype = plan, m0.dtype
        return reads, final

    @staticmethod
    def backward(ctx, d_reads, d_final):
        w, erase, add, rho, key, beta, gamma, ckpt = ctx.saved_tensors
        with _on(w.device):
            grads = memory_backward(
                w, erase, add, rho, key, beta, gamma, ckpt, d_reads, d_final, ctx.plan
            )
        dtypes = [x.dtype if x is not None else None for x in (w, erase, add, rho)]
        dtypes += [ctx.m0_dtype] + [x.dtype if x is not None else None for x in (key, beta, gamma)]
        cast = [g if g is None else g.to(dt) for g, dt in zip(grads, dtypes, strict=True)]
        return (*cast, None, None)


def memory_scan_read_fused(
    w: torch.Tensor,
    erase: torch.Tensor,
    add: torch.Tensor,
    rho: torch.Tensor,
    m0: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    **plan_options: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused memory scan on tensors (``Backend.memory_scan_read``'s contract), with the
    plan's options (``chunk``, ``block_n``, ``block_d``, ``segments``) open to tests and
    benchmarks."""
    inputs = dict(w=w, erase=erase, add=add, rho=rho, m0=m0, key=key, beta=beta, gamma=gamma)
    for name, x in inputs.items():
        if x is not None:
            _check_float(name, x)
    dtypes = {name: x.dtype for name, x in inputs.items() if x is not None}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"the memory scan's inputs must share one dtype, got {dtypes}")
    B, T, K, N = w.shape
    D = add.shape[-1]
    if m0 is None:
        m0 = torch.zeros((B, K, N, D), dtype=w.dtype, device=w.device)
    if T == 0:  # nothing to scan: no reads, the memory as it was
        return add.new_zeros((B, 0, K, D)), m0
    content = key is not None
    if content and not fits_on_chip(N, D):
        raise ValueError(
            f"content reads need N_pad * D_pad <= {MAX_CONTENT_TILE} in the fused kernel, "
            f"got N={N}, D={D}"
        )
    plan = plan_memory(B, T, K, N, D, content, w.device, **plan_options)
    inputs = [
        x if x is None else x.contiguous() for x in (w, erase, add, rho, m0, key, beta, gamma)
    ]
    # checkpoints only where a backward will come (under no_grad, apply still sees requires_grad)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    return MemoryScanRead.apply(*inputs, plan, save)


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
    """Fused, or the PyTorch chunked scan where content reads do not fit on chip."""
    if key is not None and not fits_on_chip(w.shape[-1], add.shape[-1]):
        return chunked.memory_scan_read(ops, w, erase, add, rho, m0, key, beta, gamma)
    return memory_scan_read_fused(w, erase, add, rho, m0, key, beta, gamma)


# ====================================================================== linear scan


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """``x -> a x + b`` maps composed, the earlier (1) first: ``(a2 a1, a2 b1 + b2)``."""
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _complex_affine_combine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    """:func:`_affine_combine` on complex numbers held as real and imaginary parts."""
    return (
        ar2 * ar1 - ai2 * ai1,
        ar2 * ai1 + ai2 * ar1,
        ar2 * br1 - ai2 * bi1 + br2,
        ar2 * bi1 + ai2 * br1 + bi2,
    )


@triton.jit
def _load_pair(ptr, idx, mask, other_re, COMPLEX: tl.constexpr):
    """Real and imaginary parts of element ``idx`` (interleaved pairs when COMPLEX)."""
    if COMPLEX:
        re = tl.load(ptr + 2 * idx, mask=mask, other=other_re).to(tl.float32)
        im = tl.load(ptr + 2 * idx + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        re = tl.load(ptr + idx, mask=mask, other=other_re).to(tl.float32)
        im = tl.zeros_like(re)
    return re, im


@triton.jit
def _store_pair(ptr, idx, re, im, mask, COMPLEX: tl.constexpr):
    if COMPLEX:
        tl.store(ptr + 2 * idx, re.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + 2 * idx + 1, im.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + idx, re.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_tile(ar, ai, br, bi, COMPLEX: tl.constexpr):
    """Inclusive scan of the affine maps of one tile along its rows (time)."""
    if COMPLEX:
        ar, ai, br, bi = tl.associative_scan((ar, ai, br, bi), 0, _complex_affine_combine)
    else:
        ar, br = tl.associative_scan((ar, br), 0, _affine_combine)
    return ar, ai, br, bi


@triton.jit
def _last_row(x, rows, BT: tl.constexpr):
    return tl.sum(tl.where(rows[:, None] == BT - 1, x, 0.0), axis=0)


@triton.jit(do_not_specialize=["T"])
def _linear_forward_kernel(
    a_ptr, b_ptr, h0_ptr, h_ptr, T, R,
    BT: tl.constexpr, BR: tl.constexpr, COMPLEX: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BR + tl.arange(0, BR)
    col_mask = cols < R
    rows = tl.arange(0, BT)
    hr, hi = _load_pair(h0_ptr, batch * R + cols, col_mask, 0.0, COMPLEX)
    for t0 in tl.range(0, T, BT, num_stages=STAGES):
        t = t0 + rows
        mask = (t < T)[:, None] & col_mask[None, :]
        idx = (batch * T + t)[:, None] * R + cols[None, :]
        # past the end: the identity map (a = 1, b = 0), so the last row carries the state
        ar, ai = _load_pair(a_ptr, idx, mask, 1.0, COMPLEX)
        br, bi = _load_pair(b_ptr, idx, mask, 0.0, COMPLEX)
        ar, ai, br, bi = _scan_tile(ar, ai, br, bi, COMPLEX)
        out_r = ar * hr[None, :] - ai * hi[None, :] + br
        out_i = ar * hi[None, :] + ai * hr[None, :] + bi
        _store_pair(h_ptr, idx, out_r, out_i, mask, COMPLEX)
        hr = _last_row(out_r, rows, BT)
        hi = _last_row(out_i, rows, BT)


@triton.jit(do_not_specialize=["T"])
def _linear_backward_kernel(
    a_ptr, h_ptr, h0_ptr, dh_ptr, da_ptr, db_ptr, dh0_ptr, T, R,
    BT: tl.constexpr, BR: tl.constexpr, COMPLEX: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``g_t = dh_t + conj(a_{t+1}) g_{t+1}`` scanned from the end (row i of a tile is step
    ``T - 1 - (t0 + i)``); ``db = g``, ``da_t = g_t conj(h_{t-1})``, ``dh0 = conj(a_1) g_1``."""
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BR + tl.arange(0, BR)
    col_mask = cols < R
    rows = tl.arange(0, BT)
    gr = tl.zeros((BR,), dtype=tl.float32)
    gi = tl.zeros((BR,), dtype=tl.float32)
    h0r, h0i = _load_pair(h0_ptr, batch * R + cols, col_mask, 0.0, COMPLEX)
    for t0 in tl.range(0, T, BT, num_stages=STAGES):
        t = T - 1 - (t0 + rows)
        valid = t >= 0
        mask = valid[:, None] & col_mask[None, :]
        idx = (batch * T + t)[:, None] * R + cols[None, :]
        # conj(a_{t+1}); 0 past the end of time, the identity map (1) before its start
        nr, ni = _load_pair(a_ptr, idx + R, ((t + 1) < T)[:, None] & mask, 0.0, COMPLEX)
        nr = tl.where(valid[:, None], nr, 1.0)
        cr, ci = _load_pair(dh_ptr, idx, mask, 0.0, COMPLEX)
        nr, ni, cr, ci = _scan_tile(nr, -ni, cr, ci, COMPLEX)
        out_r = nr * gr[None, :] - ni * gi[None, :] + cr
        out_i = nr * gi[None, :] + ni * gr[None, :] + ci
        _store_pair(db_ptr, idx, out_r, out_i, mask, COMPLEX)
        pr, pi = _load_pair(h_ptr, idx - R, (t >= 1)[:, None] & mask, 0.0, COMPLEX)
        first = (t == 0)[:, None]
        pr = tl.where(first, h0r[None, :], pr)
        pi = tl.where(first, h0i[None, :], pi)
        _store_pair(da_ptr, idx, out_r * pr + out_i * pi, out_i * pr - out_r * pi, mask, COMPLEX)
        gr = _last_row(out_r, rows, BT)
        gi = _last_row(out_i, rows, BT)
    ar, ai = _load_pair(a_ptr, batch * T * R + cols, col_mask, 0.0, COMPLEX)
    _store_pair(dh0_ptr, batch * R + cols, ar * gr + ai * gi, ar * gi - ai * gr, col_mask, COMPLEX)


def _as_pairs(x: torch.Tensor) -> torch.Tensor:
    """Complex as interleaved real/imaginary pairs; lazy conjugate or negative views (e.g. a
    cotangent through ``.conj()``) are materialised first, since the kernel reads storage."""
    if not x.is_complex():
        return x
    return torch.view_as_real(x.resolve_conj().resolve_neg().contiguous())


def _linear_launch(kernel, B: int, T: int, R: int, complex_: bool, *tensors) -> None:
    block_r = min(_pow2(R), 32)
    block_t = min(_pow2(T), 64)  # a 64 x 32 tile on 8 warps: no spills, sm_90 (Triton 3.6)
    with _on(tensors[0].device):
        kernel[(-(-R // block_r), B)](
            *map(_as_pairs, tensors),
            T,
            R,
            BT=block_t,
            BR=block_r,
            COMPLEX=complex_,
            STAGES=PIPELINE_STAGES,
            num_warps=8,
        )


class LinearScan(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + b_t`` on (B, T, R) tensors: fused forward and backward."""

    @staticmethod
    def forward(ctx, a, b, h0):
        B, T, R = b.shape
        h = _output(b.shape, b.dtype, b.device)
        _linear_launch(_linear_forward_kernel, B, T, R, b.is_complex(), a, b, h0, h)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, d_h):
        a, h, h0 = ctx.saved_tensors
        B, T, R = h.shape
        da = _output(a.shape, a.dtype, a.device)
        db = _output(h.shape, h.dtype, h.device)
        dh0 = _output(h0.shape, h0.dtype, h0.device)
        tensors = (a, h, h0, d_h.contiguous(), da, db, dh0)
        _linear_launch(_linear_backward_kernel, B, T, R, h.is_complex(), *tensors)
        return da, db, dh0


def linear_scan_fused(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """``h_t = a_t h_{t-1} + b_t`` along axis 1 for (B, T, *rest) tensors, real or complex64."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"linear_scan needs a and b of one shape, got {a.shape} and {b.shape}")
    named = {"a": a, "b": b} if h0 is None else {"a": a, "b": b, "h0": h0}
    if any(x.is_complex() for x in named.values()):
        # complex64, or float32 parts of a complex64 scan: nothing else loses no precision
        for name, x in named.items():
            _check_float(name, x, (torch.complex64, torch.float32))
        a, b = a.to(torch.complex64), b.to(torch.complex64)
    else:
        for name, x in named.items():
            _check_float(name, x)
    B, T = b.shape[:2]
    if T == 0:
        return torch.zeros_like(b)
    R = math.prod(b.shape[2:])
    h0 = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    flat = [x.reshape(B, T, R).contiguous() for x in (a, b)]
    h = LinearScan.apply(*flat, h0.reshape(B, R).contiguous())
    return h.reshape(b.shape)


def linear_scan(ops: Backend, a: Array, b: Array, h0: Array) -> Array:
    return linear_scan_fused(a, b, h0)
