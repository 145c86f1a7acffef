"""The backend table: ``get(name)``, ``available()`` and ``best_available()``.

A backend is a framework (arrays and autodiff) and a scan implementation
(:mod:`pntm.backends.scans`); each row of :data:`BACKENDS` names the pair and declares, in one
place, what ``pntm backends`` and ``--backend auto`` need to know about it. A backend that cannot
run on this machine (its framework or kernels are missing, it needs a GPU that is not here) is
still listed by ``available()`` with the reason, so that tests and the CLI say why instead of
silently skipping it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pntm.backends.base import Backend, ProcessGroupError, load_scans

__all__ = [
    "BACKENDS",
    "NAMES",
    "Backend",
    "BackendInfo",
    "BackendSpec",
    "ProcessGroupError",
    "available",
    "best_available",
    "get",
    "keep_freed_memory",
    "set_threads",
]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    framework: str  # "module:Class" of the framework
    scan: str  # module of pntm.backends.scans
    extra: str | None  # the pip extra that installs what it needs: pip install 'pntm[extra]'
    #: ``--backend auto`` takes the runnable, trainable backend of highest priority: ``priority``
    #: where the framework's accelerator (CUDA, Metal) is present, else ``priority_without``
    #: (None: never chosen in that case)
    priority: int | None = 0
    priority_without: int | None = None


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("numpy", "pntm.backends.numpy_backend:NumpyBackend", "sequential", None),
    BackendSpec("mlx", "pntm.backends.mlx_backend:MLXBackend", "chunked", "mlx", 30, 10),
    BackendSpec("torch", "pntm.backends.torch_backend:TorchBackend", "chunked", "torch", 20, 20),
    BackendSpec("triton", "pntm.backends.torch_backend:TorchBackend", "triton", "torch", 40),
    BackendSpec("metal", "pntm.backends.mlx_backend:MLXBackend", "metal", "mlx", 50),
    # fused CPU kernels: first on a machine without an accelerator, never picked beside one
    BackendSpec(
        "numba", "pntm.backends.torch_backend:TorchBackend", "numba_cpu", "torch", None, 25
    ),
    BackendSpec("mlx-numba", "pntm.backends.mlx_backend:MLXBackend", "numba_cpu", "mlx", None, 15),
)
NAMES: tuple[str, ...] = tuple(spec.name for spec in BACKENDS)
_SPECS = {spec.name: spec for spec in BACKENDS}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runs: bool
    reason: str  # why it does not run here, or what it runs on
    trainable: bool = False
    priority: int | None = None  # for ``auto`` on this machine (None: never)


def _spec(name: str) -> BackendSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    return _SPECS[name]


def _load(spec: BackendSpec) -> tuple[type[Backend], Any]:
    """The framework class and the scan module, or RuntimeError saying why they cannot run."""
    module, cls = spec.framework.split(":")
    try:
        framework = getattr(importlib.import_module(module), cls)
        importlib.import_module(f"pntm.backends.scans.{spec.scan}")
    except ImportError as exc:
        raise RuntimeError(
            f"backend {spec.name!r} cannot run: {exc.name or exc} is not installed "
            f"(pip install 'pntm[{spec.extra}]')"
        ) from exc
    except (ValueError, RuntimeError) as exc:  # e.g. numba refusing NUMBA_NUM_THREADS=0
        raise RuntimeError(f"backend {spec.name!r} cannot run: {exc}") from exc
    try:
        return framework, load_scans(spec.scan, framework.framework)
    except RuntimeError as exc:  # the scan module says why it cannot run here
        raise RuntimeError(f"backend {spec.name!r} {str(exc).split(' ', 2)[2]}") from exc


def get(name: str, **options: Any) -> Backend:
    """An instance of backend ``name`` (``options`` go to its framework's constructor, e.g.
    ``device``; ``scan`` overrides the row's scan implementation)."""
    spec = _spec(name)
    framework, _ = _load(spec)
    ops = framework(**{"scan": spec.scan, **options})
    ops.name = name
    return ops


def available() -> list[BackendInfo]:
    """Every backend of the table, with whether it runs here and, if not, why."""
    infos = []
    for spec in BACKENDS:
        try:
            framework, scans = _load(spec)
        except RuntimeError as exc:
            infos.append(BackendInfo(spec.name, False, str(exc).split(": ", 1)[-1]))
            continue
        priority = spec.priority if framework.accelerator() else spec.priority_without
        what = scans.describe() if hasattr(scans, "describe") else scans.DESCRIPTION
        infos.append(
            BackendInfo(
                spec.name,
                True,
                f"{framework.describe()}; scans: {what}",
                framework.trainable,
                priority if framework.trainable else None,
            )
        )
    return infos


def best_available() -> str:
    """``auto``: the runnable, trainable backend of highest priority on this machine (Metal
    kernels, then MLX, on Apple silicon; Triton kernels, then PyTorch, on CUDA; else PyTorch,
    then MLX, on the CPU)."""
    candidates = [info for info in available() if info.runs and info.priority is not None]
    if not candidates:
        raise RuntimeError(
            "no trainable backend is installed: pip install 'pntm[torch]' or 'pntm[mlx]'"
        )
    return max(candidates, key=lambda info: info.priority).name


def set_threads(ops: Backend, threads: int | None = None) -> str:
    """The thread policy of a process that trains or evaluates on ``ops``; returns it in words.

    ``threads`` sets both the framework's intra-op threads and the fused CPU kernels' threads.
    None, the default: the framework's operations on one thread (OMP_NUM_THREADS, where set,
    is left in force) and the kernels on every core. The framework's OpenMP workers spin
    while they wait, so on a 2-core machine that was busy with another process a PyTorch step
    on 2 threads ran 30x slower than on 1 (measured: 368 s against 17 s for 200 steps of
    reverse); around the fused kernels its operations are small, and the kernels' workers
    (numba's workqueue pool) sleep while they wait (``docs/performance.md``, "Threads").
    """
    import os

    cores = os.cpu_count() or 1
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if threads is not None and threads > cores:  # more would only thrash (docs/performance.md)
        raise ValueError(f"threads {threads}: this machine has {cores} cores; at most {cores}")
    framework = threads if threads is not None else (None if "OMP_NUM_THREADS" in os.environ else 1)
    if framework is not None:
        ops.set_framework_threads(framework)
    kernel_threads = None
    if hasattr(ops.scan_module, "set_threads"):
        kernel_threads = min(threads or cores, ops.scan_module.max_threads())
        ops.scan_module.set_threads(kernel_threads)
    words = f"{ops.framework_threads()} framework thread(s)"
    return words + (f", {kernel_threads} kernel thread(s)" if kernel_threads else "")


def keep_freed_memory() -> bool:
    """Have this process's C allocator (glibc) keep freed memory for reuse instead of returning
    it to the system: large arrays otherwise come fresh from the kernel on every step, and a
    fresh page costs a fault when first written, which, taken by several kernel threads at
    once, measured here as much as the computation (one block's fused forward and backward at
    B=8, T=N=512: 90 ms, 56 ms with freed memory kept). The process's memory then stays at its
    peak. Returns False where the allocator is not glibc's (nothing changed)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, <malloc.h>
    # mallopt takes a C int: the largest threshold is 2^31 - 1 (a larger Python int passed
    # without argtypes was cut to its low 32 bits, 0 for 2^62: trimming at every free)
    never = 2**31 - 1
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, never))
