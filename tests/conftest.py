"""Conformance-suite options: ``pytest --backend=NAME`` (numpy, mlx, metal, torch, triton, or
``all``, the default). Tests that take the ``backend_name`` fixture run once per selected
backend; a backend that cannot run here is reported as skipped with its reason."""

from __future__ import annotations

import os

import pytest

# Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter; it is chosen when the
# kernels are defined, so before anything imports them.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

# Without Metal the Metal kernels run in the C++ emulator (pntm.backends.metal_emulator), also
# chosen at import.
if "PNTM_METAL_EMULATE" not in os.environ:
    try:
        import mlx.core as mx

        if not mx.metal.is_available():
            os.environ["PNTM_METAL_EMULATE"] = "1"
    except ImportError:
        pass

from pntm import backends

CHOICES = (*backends.NAMES, "all")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="store",
        default="all",
        choices=CHOICES,
        help="backend(s) to check against the NumPy reference (default: all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend")
        names = list(backends.NAMES) if chosen == "all" else [chosen]
        metafunc.parametrize("backend_name", names, indirect=True)


_INFO = {info.name: info for info in backends.available()}


@pytest.fixture
def backend_name(request: pytest.FixtureRequest) -> str:
    name = request.param
    info = _INFO[name]
    if not info.runs:
        pytest.skip(f"backend {name!r} cannot run here: {info.reason}")
    return name


@pytest.fixture
def ops(backend_name: str):
    return backends.get(backend_name)


@pytest.fixture
def trainable_ops(backend_name: str):
    if not _INFO[backend_name].trainable:
        pytest.skip(f"backend {backend_name!r} is the reference: it has no model autodiff")
    return backends.get(backend_name)


@pytest.fixture
def ref():
    """The float64 sequential reference."""
    return backends.get("numpy")


@pytest.fixture(autouse=True)
def nan_filled_kernel_outputs(monkeypatch):
    """Every buffer a Triton or numba kernel writes starts as NaN, so an element it fails to
    write fails the comparison with the reference (as in flash-linear-attention's tests)."""
    try:
        import numpy as np

        from pntm.backends.scans import numba_cpu

        monkeypatch.setattr(
            numba_cpu, "_output", lambda shape, dtype: np.full(shape, np.nan, dtype)
        )
    except ImportError:
        pass
    try:
        from pntm.backends.scans import triton as triton_scans
    except ImportError:
        yield
        return
    import torch

    def nan_output(shape, dtype, device):
        out = torch.empty(shape, dtype=dtype, device=device)
        (torch.view_as_real(out) if out.is_complex() else out).fill_(float("nan"))
        return out

    monkeypatch.setattr(triton_scans, "_output", nan_output)
    yield
