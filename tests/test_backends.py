"""The backend registry, the optimizer and the command line."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pntm import backends
from pntm.cli import main
from pntm.optim import AdamW, clip_by_global_norm


def test_available_lists_every_backend_with_a_reason():
    infos = {info.name: info for info in backends.available()}
    assert set(infos) == {"numpy", "mlx", "torch", "triton", "metal"}
    assert infos["numpy"].runs and not infos["numpy"].trainable
    for name in ("triton", "metal"):
        assert not infos[name].runs
        assert "not implemented yet" in infos[name].reason


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"'cuda'.*known backends: numpy, mlx, torch"):
        backends.get("cuda")


def test_unimplemented_backend_says_why():
    with pytest.raises(RuntimeError, match=r"triton.*not implemented yet"):
        backends.get("triton")


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
