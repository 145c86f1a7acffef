"""The backend registry, the optimizer and the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pntm import backends
from pntm.cli import main
from pntm.optim import AdamW, clip_by_global_norm


def test_available_lists_every_backend_with_a_reason():
    infos = {info.name: info for info in backends.available()}
    assert set(infos) == {"numpy", "mlx", "torch", "triton", "metal", "numba", "mlx-numba"}
    assert infos["numpy"].runs and not infos["numpy"].trainable
    for info in infos.values():
        assert info.reason


def test_each_backend_is_a_framework_and_a_scan_module():
    for spec in backends.BACKENDS:
        info = next(i for i in backends.available() if i.name == spec.name)
        if not info.runs:
            continue
        ops = backends.get(spec.name)
        assert ops.name == spec.name
        assert ops.scan_module.__name__ == f"pntm.backends.scans.{spec.scan}"
        assert ops.framework in ops.scan_module.FRAMEWORKS


def test_a_scan_module_refuses_a_framework_it_does_not_run_on():
    with pytest.raises(ValueError, match=r"scan 'triton' runs on torch, not on 'numpy'"):
        backends.get("numpy", scan="triton")
    with pytest.raises(ValueError, match=r"unknown scan 'fft'"):
        backends.get("torch", scan="fft")


def test_auto_takes_the_highest_priority_backend_that_runs(monkeypatch):
    """On a CUDA machine the Triton kernels win; on a CPU machine the fused CPU kernels, then
    PyTorch, then MLX; Metal (and MLX) only where Metal is."""

    def machine(infos):
        monkeypatch.setattr(backends, "available", lambda: infos)
        return backends.best_available()

    info = backends.BackendInfo
    cuda = [
        info("numpy", True, "", False, None),
        info("mlx", True, "", True, 10),
        info("torch", True, "", True, 20),
        info("triton", True, "", True, 40),
        info("metal", False, "no Metal GPU here"),
    ]
    assert machine(cuda) == "triton"
    cpu = [*cuda[:3], info("triton", True, "", True, None), cuda[4]]
    assert machine(cpu) == "torch"
    emulated = [*cpu[:4], info("metal", True, "", True, None)]  # the C++ emulator: never auto
    assert machine(emulated) == "torch"
    fused = [*cpu, info("numba", True, "", True, 25), info("mlx-numba", True, "", True, 15)]
    assert machine(fused) == "numba"
    assert machine([*cpu, info("numba", False, "numba is not installed")]) == "torch"
    assert machine([*cpu[:2], fused[-1]]) == "mlx-numba"  # MLX alone: its fused kernels
    apple = [cuda[0], info("mlx", True, "", True, 30), cuda[2], info("metal", True, "", True, 50)]
    assert machine(apple) == "metal"
    assert machine([*apple[:3], cuda[4]]) == "mlx"
    with pytest.raises(RuntimeError, match="no trainable backend"):
        machine(cuda[:1])


def test_available_ranks_triton_first_only_with_cuda(monkeypatch):
    """The priorities ``available()`` reports come from each framework's accelerator: Triton
    (interpreted without CUDA) is never ``auto`` without CUDA, and first with it."""
    infos = {i.name: i for i in backends.available()}
    if not (infos["torch"].runs and infos["triton"].runs):
        pytest.skip("needs the torch and triton backends")
    from pntm.backends.torch_backend import TorchBackend

    monkeypatch.setattr(TorchBackend, "accelerator", classmethod(lambda cls: None))
    infos = {i.name: i for i in backends.available()}
    assert infos["triton"].priority is None
    assert backends.best_available() == ("numba" if infos["numba"].runs else "torch")
    monkeypatch.setattr(TorchBackend, "accelerator", classmethod(lambda cls: "cuda"))
    infos = {i.name: i for i in backends.available()}
    assert infos["triton"].priority > infos["torch"].priority
    assert infos["numba"].priority is None  # the CPU kernels are never auto beside a GPU
    assert backends.best_available() == "triton"


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    """LOCAL_RANK picks the GPU; a rank beyond the node's GPUs is refused with both numbers,
    since NCCL cannot put two ranks on one GPU; without CUDA every rank is on the CPU."""
    torch = pytest.importorskip("torch")
    from pntm.backends.torch_backend import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RuntimeError, match=r"local rank 2 has no GPU: this node has 2 CUDA"):
        default_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


def test_priorities_follow_the_accelerator():
    """The rows' priorities: Triton only with CUDA, MLX above PyTorch only with Metal, the
    fused CPU kernels first without an accelerator and never with one."""
    spec = {s.name: s for s in backends.BACKENDS}
    assert spec["numba"].priority_without > spec["torch"].priority_without
    assert spec["torch"].priority_without > spec["mlx-numba"].priority_without
    assert spec["mlx-numba"].priority_without > spec["mlx"].priority_without
    assert spec["numba"].priority is None and spec["mlx-numba"].priority is None
    assert spec["triton"].priority > spec["torch"].priority > spec["mlx"].priority_without
    assert spec["triton"].priority_without is None and spec["metal"].priority_without is None
    assert spec["mlx"].priority > spec["torch"].priority_without


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"'cuda'.*known backends: numpy, mlx, torch"):
        backends.get("cuda")


def test_a_backend_that_cannot_run_says_why():
    """Without Metal and without the emulator (a fresh process: the tests set
    PNTM_METAL_EMULATE), ``metal`` says what it lacks and how to emulate it."""
    code = (
        "import mlx.core as mx; from pntm import backends\n"
        "info = next(i for i in backends.available() if i.name == 'metal')\n"
        "print(mx.metal.is_available(), info.runs, info.reason, sep='|')\n"
        "try:\n    backends.get('metal')\nexcept RuntimeError as exc:\n    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PNTM_METAL_EMULATE"}
    if not any(i.name == "mlx" and i.runs for i in backends.available()):
        pytest.skip("needs MLX")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    has_metal, runs, reason = out.splitlines()[0].split("|")
    if has_metal == "True":
        assert runs == "True"
        return
    assert runs == "False" and "no Metal GPU here" in reason and "PNTM_METAL_EMULATE=1" in reason
    assert "backend 'metal' cannot run: no Metal GPU here" in out.splitlines()[1]


def test_reference_backend_does_not_pretend_to_train():
    with pytest.raises(NotImplementedError, match="does not differentiate"):
        backends.get("numpy").value_and_grad(lambda p: p)


def test_adamw_step_and_clipping_match_the_formulas(trainable_ops):
    ops = trainable_ops
    params = {"w": ops.asarray(np.array([1.0, -2.0]))}
    grads = {"w": ops.asarray(np.array([3.0, 4.0]))}
    clipped, norm = clip_by_global_norm(ops, grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.allclose(ops.to_numpy(clipped["w"]), [0.6, 0.8], atol=1e-6)
    opt = AdamW(lr=0.1, weight_decay=0.01)
    new, state = opt.update(ops, params, clipped, opt.init(ops, params))
    # first Adam step moves each weight by lr * sign(g) (bias-corrected m / sqrt(v) = +-1)
    want = np.array([1.0, -2.0]) - 0.1 * (1.0 + 0.01 * np.array([1.0, -2.0]))
    assert np.allclose(ops.to_numpy(new["w"]), want, atol=1e-5)
    assert state["step"] == 1


def test_cli_backends_lists_all():
    result = CliRunner().invoke(main, ["backends"])
    assert result.exit_code == 0
    for name in backends.NAMES:
        assert name in result.output
