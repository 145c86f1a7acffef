"""Backend registry: ``get(name)`` and ``available()``.

Every backend implements :class:`pntm.backends.base.Backend`. A backend that cannot run on this
machine (its framework is missing, or it is not written yet) is still listed by ``available()``
with the reason, so that tests and the CLI can say why instead of silently skipping it.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass
from typing import Any

from pntm.backends.base import Backend

__all__ = ["NAMES", "Backend", "BackendInfo", "available", "best_available", "get"]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runs: bool
    reason: str  # why it does not run here, or what it runs on
    trainable: bool = False


# name -> (module, class) or the reason it does not exist yet
_IMPLEMENTATIONS: dict[str, tuple[str, str] | str] = {
    "numpy": ("pntm.backends.reference", "NumpyBackend"),
    "mlx": ("pntm.backends.mlx_backend", "MLXBackend"),
    "torch": ("pntm.backends.torch_backend", "TorchBackend"),
    "triton": "not implemented yet: the fused Triton kernels are a planned backend",
    "metal": "not implemented yet: the fused Metal kernels are a planned backend",
}
NAMES: tuple[str, ...] = tuple(_IMPLEMENTATIONS)


def _load(name: str) -> type[Backend]:
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(NAMES)}")
    impl = _IMPLEMENTATIONS[name]
    if isinstance(impl, str):
        raise RuntimeError(f"backend {name!r} cannot run: {impl}")
    module, cls = impl
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        extra = {"mlx": "mlx", "torch": "torch"}.get(name, name)
        raise RuntimeError(
            f"backend {name!r} cannot run: {exc.name or exc} is not installed "
            f"(pip install 'pntm[{extra}]')"
        ) from exc


def get(name: str, **options: Any) -> Backend:
    """An instance of backend ``name`` (``options`` go to its constructor, e.g. ``device``)."""
    return _load(name)(**options)


def _describe(name: str) -> str:
    if name == "numpy":
        return "NumPy float64 sequential reference (evaluates; does not train)"
    if name == "mlx":
        import mlx.core as mx

        return f"MLX {mx.__version__} on {mx.default_device()}"
    if name == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return f"PyTorch {torch.__version__} on {device}"
    return name


def available() -> list[BackendInfo]:
    """Every registered backend, with whether it runs here and, if not, why."""
    infos = []
    for name in NAMES:
        try:
            cls = _load(name)
        except RuntimeError as exc:
            infos.append(BackendInfo(name, False, str(exc).split(": ", 1)[-1]))
            continue
        infos.append(BackendInfo(name, True, _describe(name), cls.trainable))
    return infos


def best_available() -> str:
    """``auto``: MLX on Apple silicon, PyTorch on CUDA, else the best CPU backend."""
    runs = {info.name for info in available() if info.runs and info.trainable}
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    if apple and "mlx" in runs:
        return "mlx"
    if "torch" in runs:
        return "torch"
    if "mlx" in runs:
        return "mlx"
    raise RuntimeError(
        "no trainable backend is installed: pip install 'pntm[torch]' or 'pntm[mlx]'"
    )
