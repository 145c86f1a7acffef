"""Conformance-suite options: ``pytest --backend=NAME`` (numpy, mlx, metal, torch, triton, or
``all``, the default). Tests that take the ``backend_name`` fixture run once per selected
backend; a backend that cannot run here is reported as skipped with its reason."""

from __future__ import annotations

import pytest

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
