"""Kernel benchmark: P-NTM's two scan primitives, the fused kernels against the framework-ops
chunked scans and the plain loop over time, measured in one run: Triton against PyTorch
(``--framework torch``, the default), or Metal against MLX (``--framework mlx``).

For each scan, T, (N, D) and mode (``fwd``: forward without gradients; ``fwdbwd``: forward and
backward) it reports the median time, the peak memory above the inputs (CUDA), and for the
forward of the memory scan the bytes it must move (inputs read once, reads and final state
written) per second, as a fraction of this device's measured copy bandwidth. ``--train-step``
adds one training step (forward, backward, AdamW) of the default model at a long T.

    python scripts/bench_kernels.py                          # the default sweep (CUDA)
    python scripts/bench_kernels.py --lengths 2048 --sizes 64x64 --batch 32
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --device cpu --lengths 64 --sizes 8x8 \
        --batch 2 --repeats 1                                 # a smoke run without a GPU
    python scripts/bench_kernels.py --framework mlx          # Metal on a Mac
    python scripts/bench_kernels.py --device cpu --lengths 128,512,2048 --square-width 16 \
        --batch 8 --heads 4 --scans memory,block              # the fused CPU kernels (numba)

On a CPU (``--device cpu``, or no GPU) the fused numba kernels take the GPU kernels' place, and
the memory scan's rows also give GFLOP/s (counted operations, ``MEMORY_FLOPS``) against the
measured peak of the CPU (PyTorch's float32 matrix multiply on the same threads). ``block``
times one whole block's recurrences with hard heads: the two head scans and the memory scan
(the fused kernel's ``block_scan``, or the Fourier head scans and the chunked memory scan).

The batch defaults to 65,536 tokens per run (B = 65536 // T, at least 1): B=32 at T=2048.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import click
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pntm import backends
from pntm.backends.base import Backend
from pntm.models.base import cross_entropy
from pntm.models.pntm import PNTM, PNTMConfig, init_params
from pntm.optim import AdamW

# framework -> implementation -> (backend, scan); the fused kernels first (the "vs kernel"
# column divides by their time)
IMPLS = {
    "torch": {
        "triton": ("triton", "triton"),
        "chunked": ("torch", "chunked"),
        "sequential": ("torch", "sequential"),
    },
    "mlx": {
        "metal": ("metal", "metal"),
        "chunked": ("mlx", "chunked"),
        "sequential": ("mlx", "sequential"),
    },
}
# on a CPU the fused kernels are numba's (pntm.backends.scans.numba_cpu)
CPU_KERNELS = {
    "torch": ("numba", ("numba", "numba_cpu")),
    "mlx": ("numba", ("mlx-numba", "numba_cpu")),
}
KERNELS = ("triton", "metal", "numba")
TOKENS_PER_RUN = 65_536
# counted floating-point operations per (step, slot, slot element) of the memory scan with
# location reads: the write (e m, a - e m, w (...), + m: 4) and the read (2) forward; the
# backward adds the recomputed write (4), the read's and the write's gradients (d_rho 2, G_t 2,
# d_w 4, d_a 2, d_e 2) and G's decay (2)
MEMORY_FLOPS = {"fwd": 6, "fwdbwd": 6 + 4 + 14}


# ---------------------------------------------------------------------- measurement


def accelerator(ops: Backend) -> str | None:
    """``cuda`` or ``metal`` where ``ops`` computes on one, else None."""
    if ops.framework == "torch":
        return "cuda" if ops.device.type == "cuda" else None
    if ops.framework == "mlx":
        import mlx.core as mx

        return "metal" if mx.default_device() == mx.gpu else None
    return None


def measure(fn: Callable[[], object], ops: Backend, repeats: int) -> tuple[float, int | None]:
    """Median seconds of ``fn`` (which waits for its results) and its peak memory (bytes above
    what was allocated before; CUDA and Metal only)."""
    where = accelerator(ops)
    if where == "cuda":
        import torch
        import triton.testing

        fn()  # compile, warm the allocator
        torch.cuda.synchronize(ops.device)
        torch.cuda.reset_peak_memory_stats(ops.device)
        base = torch.cuda.memory_allocated(ops.device)
        fn()
        torch.cuda.synchronize(ops.device)
        peak = torch.cuda.max_memory_allocated(ops.device) - base
        ms = triton.testing.do_bench(fn, warmup=10, rep=max(20, 20 * repeats), return_mode="median")
        return ms / 1e3, peak
    peak = None
    if where == "metal":
        import mlx.core as mx

        fn()  # compile the kernels, warm the allocator
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        fn()
        peak = mx.get_peak_memory() - base
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if repeats else times), peak


def copy_bandwidth(ops: Backend) -> float | None:
    """Bytes per second of a 1 GiB on-device copy (read + write); on a CPU, of NumPy's copy of
    256 MiB into a buffer already touched (the kernels' own outputs are)."""
    if accelerator(ops) is None:
        src, dst = np.ones(1 << 26, dtype=np.float32), np.zeros(1 << 26, dtype=np.float32)
        seconds = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(5))
        return 2 * src.nbytes / seconds
    x = ops.asarray(np.zeros(1 << 28, dtype=np.float32))

    def copy():
        y = x * 1.0  # one read, one write
        ops.eval(y)

    seconds, _ = measure(copy, ops, 5)
    return 2 * (1 << 28) * 4 / seconds


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_peak_flops() -> float:
    """Float32 FLOP/s of PyTorch's matrix multiply (oneDNN/MKL: vectorized FMAs on every core),
    2048 x 2048 x 2048, best of 5: the measured peak the kernels are compared with."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048**3 / min(_seconds(lambda: torch.mm(a, b)) for _ in range(5))


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "allocate" in text


# ---------------------------------------------------------------------- inputs


def memory_inputs(ops: Backend, B, T, K, N, D) -> dict:
    rng = np.random.default_rng(0)

    def softmax(x):
        z = np.exp(3 * (x - x.max(-1, keepdims=True)))
        return z / z.sum(-1, keepdims=True)

    return {
        name: ops.asarray(x.astype(np.float32))
        for name, x in dict(
            w=softmax(rng.normal(size=(B, T, K, N))),
            erase=1 / (1 + np.exp(-rng.normal(size=(B, T, K, D)))),
            add=np.tanh(rng.normal(size=(B, T, K, D))),
            rho=softmax(rng.normal(size=(B, T, K, N))),
        ).items()
    }


def linear_inputs(ops: Backend, B, T, K, N) -> dict:
    """The head scan's shapes: (B, T, K, N // 2 + 1) complex, |a| <= 1."""
    rng = np.random.default_rng(0)
    shape = (B, T, K, N // 2 + 1)
    a = rng.uniform(0, 1, shape) * np.exp(2j * np.pi * rng.uniform(0, 1, shape))
    b = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    return dict(a=ops.asarray(a.astype(np.complex64)), b=ops.asarray(b.astype(np.complex64)))


def memory_bytes(B, T, K, N, D, element: int = 4) -> int:
    """What the memory scan's forward must move: w, rho, erase, add read once, the reads and
    the final state written."""
    return element * (2 * B * T * K * N + 3 * B * T * K * D + B * K * N * D)


def block_inputs(ops: Backend, B, T, K, N, D) -> dict:
    """Hard heads (one-hot shifts over -1..1, 0/1 gates resetting 1 step in 10) for a block."""
    rng = np.random.default_rng(0)
    out = {}
    for head in ("write", "read"):
        out[f"{head}_shift"] = np.eye(3)[rng.integers(0, 3, (B, T, K))]
        out[f"{head}_gate"] = (rng.uniform(size=(B, T, K)) < 0.1).astype(float)
    out["erase"] = 1 / (1 + np.exp(-rng.normal(size=(B, T, K, D))))
    out["add"] = np.tanh(rng.normal(size=(B, T, K, D)))
    return {name: ops.asarray(x.astype(np.float32)) for name, x in out.items()}


def linear_bytes(B, T, K, N) -> int:
    return 8 * 3 * B * T * K * (N // 2 + 1)  # complex64 a and b read, h written


def run_case(
    scan: str, ops: Backend, inputs: dict, mode: str, n_slots: int = 0
) -> Callable[[], object]:
    def block(write_shift, write_gate, read_shift, read_gate, erase, add):
        return ops.block_scan(
            write_shift, write_gate, read_shift, read_gate, erase, add, n_slots, hard=True
        )

    primitive = {"memory": ops.memory_scan_read, "linear": ops.linear_scan, "block": block}[scan]

    def total(out):
        outs = out if isinstance(out, tuple) else (out,)
        parts = [ops.sum(ops.real(o)) if o.dtype == ops.complex_dtype else ops.sum(o) for o in outs]
        return sum(parts[1:], parts[0])

    def forward():  # the inputs need no gradient: no checkpoints are kept
        out = primitive(**inputs)
        ops.eval(*(out if isinstance(out, tuple) else (out,)))
        return out

    def forward_backward():
        loss, grads = ops.value_and_grad(lambda p: total(primitive(**p)))(inputs)
        ops.eval(loss, *grads.values())
        return loss

    return forward if mode == "fwd" else forward_backward


# ---------------------------------------------------------------------- training step


def train_step_case(ops, length: int, slots: int, batch: int) -> Callable[[], object]:
    """One training step of the default model (2 layers, d_model 64, K=2, D=16): forward,
    backward and an AdamW update, at ``length`` tokens with ``slots`` memory slots."""
    config = PNTMConfig(vocab_size=8)
    model = PNTM(config, ops)
    params = model.params_from_numpy(init_params(config))
    rng = np.random.default_rng(0)
    tokens = ops.asarray(rng.integers(0, 8, (batch, length)))
    mask = ops.asarray(np.ones((batch, length)))
    optimizer = AdamW(lr=1e-3)
    state = {"params": params, "opt": optimizer.init(ops, params)}

    def loss_fn(p):
        return cross_entropy(ops, model.forward(p, tokens, slots, heads="hard"), tokens, mask)

    value_and_grad = ops.value_and_grad(loss_fn)

    def step():
        loss, grads = value_and_grad(state["params"])
        state["params"], state["opt"] = optimizer.update(ops, state["params"], grads, state["opt"])
        ops.eval(loss)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"loss {float(loss)} at T={length}")
        return loss

    return step


# ---------------------------------------------------------------------- command


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected NxD[,NxD...], e.g. 64x64,128x32") from None


@click.command()
@click.option(
    "--framework",
    type=click.Choice(sorted(IMPLS)),
    default="torch",
    show_default=True,
    help="torch: Triton against PyTorch; mlx: Metal against MLX.",
)
@click.option(
    "--device", default=None, help="PyTorch: cuda or cpu (default: cuda if there is one)."
)
@click.option(
    "--lengths", default="256,1024,2048,8192,65536", show_default=True, help="Values of T."
)
@click.option(
    "--sizes",
    default="32x32,64x64,128x128",
    show_default=True,
    help="Memory sizes NxD (slots x slot width).",
)
@click.option("--batch", type=int, default=None, help=f"B (default {TOKENS_PER_RUN} // T).")
@click.option("--heads", default=4, show_default=True, help="K: memories per layer.")
@click.option(
    "--impls",
    default=None,
    help="Implementations (default: all of the framework's: triton or metal, chunked, sequential).",
)
@click.option(
    "--scans", default="memory,linear", show_default=True, help="Scans to time (and block)."
)
@click.option(
    "--square-width",
    type=int,
    default=0,
    help="N = T for every length, with slots of this width (instead of --sizes).",
)
@click.option("--modes", default="fwd,fwdbwd", show_default=True, help="fwd and/or fwdbwd.")
@click.option(
    "--sequential-max-length",
    default=2048,
    show_default=True,
    help="Time the plain loop only up to this T (it takes T Python-level steps).",
)
@click.option(
    "--repeats",
    default=5,
    show_default=True,
    help="CPU: timed runs after a warm-up (median); CUDA: do_bench's budget, 20 ms per repeat.",
)
@click.option(
    "--train-step",
    "train_step_length",
    type=int,
    default=0,
    help="Also time one training step of the default model at this T (0: no).",
)
@click.option("--train-step-slots", default=64, show_default=True, help="N for --train-step.")
@click.option("--train-step-batch", default=2, show_default=True, help="B for --train-step.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write JSON here.")
def main(
    framework,
    device,
    lengths,
    sizes,
    batch,
    heads,
    impls,
    scans,
    square_width,
    modes,
    sequential_max_length,
    repeats,
    train_step_length,
    train_step_slots,
    train_step_batch,
    json_out,
):
    """Time the scan kernels against the framework-ops and plain-loop scans (on a CPU, the
    fused numba kernels take the GPU kernels' place)."""
    lengths_ = [int(v) for v in lengths.split(",")]
    sizes_ = parse_sizes(sizes)
    table = dict(IMPLS[framework])
    on_cpu = (framework == "torch" and (device == "cpu" or not _has_cuda())) or (
        framework == "mlx" and not _has_metal()
    )
    if on_cpu:  # the fused CPU kernels take the GPU kernels' place
        name, impl = CPU_KERNELS[framework]
        table = {name: impl, **{k: v for k, v in table.items() if k not in KERNELS}}
    impls_ = _choices(impls or ",".join(table), table, "implementations")
    scans_ = _choices(scans, ("memory", "linear", "block"), "scans")
    modes_ = _choices(modes, ("fwd", "fwdbwd"), "modes")
    options = {}
    if framework == "torch":
        import torch

        options["device"] = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends.keep_freed_memory()  # as pntm train does
    infos = {i.name: i for i in backends.available()}
    ops_of = {}
    for impl in impls_:
        name, scan = table[impl]
        if infos[name].runs:
            ops_of[impl] = backends.get(name, scan=scan, **options)
        else:
            click.echo(f"# {impl}: skipped, {infos[name].reason}")
    if not ops_of:
        raise click.ClickException(f"none of {impls_} runs here")
    any_ops = next(iter(ops_of.values()))
    bandwidth = copy_bandwidth(any_ops)
    peak = cpu_peak_flops() if on_cpu and framework == "torch" else None
    if on_cpu:
        import torch

        threads = f"{torch.get_num_threads()} PyTorch thread(s)" if framework == "torch" else ""
        kernel_threads = next(
            (o.scan_module.threads() for o in ops_of.values() if o.scan == "numba_cpu"), None
        )
        threads += f", {kernel_threads} kernel thread(s)" if kernel_threads else ""
    header = dict(
        device=_machine(any_ops),
        framework=any_ops.describe(),
        kernels=_kernel_versions(),
        copy_bandwidth_gbs=bandwidth and bandwidth / 1e9,
        peak_gflops=peak and peak / 1e9,
        threads=threads if on_cpu else None,
    )
    click.echo(f"# {json.dumps(header)}")
    click.echo(
        f"{'scan':6s} {'mode':6s} {'B':>5s} {'T':>6s} {'N':>4s} {'D':>4s} {'impl':10s} "
        f"{'ms':>10s} {'peak MiB':>9s} {'GB/s':>7s} {'of copy':>7s} {'vs kernel':>9s} "
        f"{'GFLOP/s':>7s} {'of peak':>7s}"
    )
    results = []
    for scan in scans_:
        for T in lengths_:
            B = batch or max(1, TOKENS_PER_RUN // T)
            # the head scan depends on N only
            cases = sizes_ if scan != "linear" else list({N: (N, D) for N, D in sizes_}.values())
            if square_width:
                cases = [(T, square_width)]
            for N, D in cases:
                for mode in modes_:
                    base = None
                    for impl, ops in ops_of.items():
                        if impl == "sequential" and sequential_max_length < T:
                            continue
                        row = dict(scan=scan, mode=mode, B=B, T=T, K=heads, N=N, D=D, impl=impl)
                        if scan == "memory" and not _fused(ops, N, D):
                            row["note"] = "the kernel does not take this N, D: chunked path"
                        row.update(_time_one(scan, mode, ops, B, T, heads, N, D, repeats))
                        if row.get("seconds") and scan == "memory":
                            flops = MEMORY_FLOPS[mode] * B * T * heads * N * D
                            row["gflops"] = flops / row["seconds"] / 1e9
                            if peak:
                                row["of_peak"] = flops / row["seconds"] / peak
                        if row.get("seconds") and mode == "fwd" and scan != "block":
                            moved = (
                                memory_bytes(B, T, heads, N, D)
                                if scan == "memory"
                                else linear_bytes(B, T, heads, N)
                            )
                            row["gbs"] = moved / row["seconds"] / 1e9
                            if bandwidth:
                                row["of_copy"] = moved / row["seconds"] / bandwidth
                        if impl in KERNELS:
                            base = row.get("seconds")
                        if base and row.get("seconds"):
                            row["vs_kernel"] = row["seconds"] / base
                        results.append(row)
                        click.echo(_format(row))
    if train_step_length:
        for impl in ops_of:
            if impl == "sequential":
                continue
            row = dict(
                scan="train-step",
                mode="fwdbwd+adamw",
                B=train_step_batch,
                T=train_step_length,
                K=2,
                N=train_step_slots,
                D=16,
                impl=impl,
            )
            try:
                step = train_step_case(
                    ops_of[impl], train_step_length, train_step_slots, train_step_batch
                )
                row["seconds"], row["peak_bytes"] = measure(step, ops_of[impl], 1)
            except (MemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            results.append(row)
            click.echo(_format(row))
    if json_out:
        tmp = f"{json_out}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"machine": header, "results": results}, fh, indent=2)
        os.replace(tmp, json_out)


def _choices(text: str, allowed, what: str) -> list[str]:
    chosen = text.split(",")
    for value in chosen:
        if value not in allowed:
            raise click.BadParameter(f"{value!r}: {what} are {', '.join(allowed)}")
    return chosen


def _time_one(scan, mode, ops, B, T, K, N, D, repeats) -> dict:
    try:
        make = {"memory": memory_inputs, "block": block_inputs}
        inputs = make[scan](ops, B, T, K, N, D) if scan in make else linear_inputs(ops, B, T, K, N)
        seconds, peak = measure(run_case(scan, ops, inputs, mode, N), ops, repeats)
        return dict(seconds=seconds, peak_bytes=peak)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        return dict(error=f"out of memory: {str(exc).splitlines()[0][:80]}")
    finally:
        if accelerator(ops) == "cuda":
            import torch

            torch.cuda.empty_cache()


def _format(row: dict) -> str:
    def num(key, fmt, scale=1.0):
        value = row.get(key)
        return format(value * scale, fmt) if value is not None else "-"

    text = (
        f"{row['scan']:6s} {row['mode']:6s} {row['B']:5d} {row['T']:6d} {row['N']:4d} "
        f"{row['D']:4d} {row['impl']:10s} {num('seconds', '10.3f', 1e3)} "
        f"{num('peak_bytes', '9.1f', 1 / 2**20)} {num('gbs', '7.1f')} {num('of_copy', '7.1%')} "
        f"{num('vs_kernel', '8.2f')}x {num('gflops', '7.2f')} {num('of_peak', '7.1%')}"
    )
    return text + "".join(f"  {row[key]}" for key in ("error", "note") if key in row)


def _fused(ops: Backend, N: int, D: int) -> bool:
    """Whether the scan module runs this memory scan (location reads) in its kernel."""
    fits = getattr(ops.scan_module, "fits", None)
    return fits is None or fits(N, D)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_metal() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return mx.metal.is_available()


def _machine(ops: Backend) -> str:
    where = accelerator(ops)
    if where == "cuda":
        import torch

        return torch.cuda.get_device_name(ops.device)
    if where == "metal":
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return str(info.get("device_name", "Apple GPU"))
    return f"{platform.machine()} {platform.processor() or 'cpu'}"


def _kernel_versions() -> dict[str, str]:
    """Versions of the kernel languages' packages that are installed."""
    versions = {}
    for package in ("triton", "mlx", "numba"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


if __name__ == "__main__":
    main()
