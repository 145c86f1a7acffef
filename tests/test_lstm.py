"""The stacked LSTM: the ``Backend.lstm`` primitive and the model against an independent float64
NumPy implementation on every backend, step form and state hand-over against the parallel
form, gradients, training, config checks and the CLI end to end.

Tolerances (tests/tolerances.py): framework backends compute in float32, the reference in
float64. An LSTM step is a few matmuls and saturating nonlinearities whose derivatives are at
most 1, so float32 roundoff (~6e-8) does not grow along the sequence: the logits are observed
within 6e-7 of the reference (relative to their largest value; torch and MLX, T up to 40), so
FWD_RTOL = 1e-5 leaves a 15x margin; full gradients within 4e-7 of float64 PyTorch, against
GRAD_RTOL = 1e-4. The NumPy backend runs the same float64 arithmetic as the reference in another
order: EXACT_RTOL.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from pntm import backends, tasks
from pntm.cli import main
from pntm.models.base import cross_entropy
from pntm.models.lstm import LSTM, LSTMConfig, init_params
from pntm.train import TrainConfig, Trainer
from pntm.tree import tree_flatten
from tests.tolerances import (
    EXACT_RTOL,
    FD_RTOL_FLOAT32,
    FWD_RTOL,
    GRAD_RTOL,
    central_difference,
    grad_errors,
    rel_err,
)

VOCAB = 7
CONFIGS = {
    "two-layers": dict(d_model=16, n_layers=2),
    "one-layer-odd": dict(d_model=7, n_layers=1),
    "three-layers-narrow": dict(d_model=5, n_layers=3),
}
SHAPES = [(1, 1), (2, 9), (3, 13)]  # (batch, T): T = 1, B = 1, odd sizes


# ---------------------------------------------------------------------- the NumPy reference
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm_layer(x, h, c, w_ih, w_hh, bias):
    """One layer, gates i, f, g, o: the recurrence of Backend.lstm, step by step."""
    H = h.shape[-1]
    outputs = []
    for t in range(x.shape[1]):
        z = x[:, t] @ w_ih + h @ w_hh + bias
        i, f, g, o = (z[:, k * H : (k + 1) * H] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, 1), h, c


def np_lstm_model(params, tokens, state=None):
    """Logits (B, T, V) and the per-layer (h, c) after the last token."""
    x = params["embed"][tokens]
    B, H = tokens.shape[0], params["embed"].shape[1]
    new_state = []
    for i, layer in enumerate(params["layers"]):
        h, c = (np.zeros((B, H)), np.zeros((B, H))) if state is None else state[i]
        x, h, c = np_lstm_layer(x, h, c, layer["w_ih"], layer["w_hh"], layer["bias"])
        new_state.append((h, c))
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * params["norm_out"]
    return x @ params["unembed"], new_state


def np_loss(params, tokens, targets, mask):
    logits, _ = np_lstm_model(params, tokens)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return -(picked * mask).sum() / mask.sum()


def make(ops, config="two-layers", seed=0):
    config = LSTMConfig(vocab_size=VOCAB, **CONFIGS[config])
    return LSTM(config, ops), init_params(config, seed)


def fwd_tol(ops):
    return EXACT_RTOL if ops.name == "numpy" else FWD_RTOL


# ---------------------------------------------------------------------- the primitive
@pytest.mark.parametrize("B,T,I,H", [(1, 1, 3, 2), (3, 11, 5, 4), (2, 6, 8, 8)])
def test_lstm_primitive_matches_numpy(ops, B, T, I, H):
    rng = np.random.default_rng(T)
    x, h0, c0 = rng.normal(size=(B, T, I)), rng.normal(size=(B, H)), rng.normal(size=(B, H))
    w_ih, w_hh = rng.normal(0, 0.5, (I, 4 * H)), rng.normal(0, 0.5, (H, 4 * H))
    bias = rng.normal(size=4 * H)
    want_out, want_h, want_c = np_lstm_layer(x, h0, c0, w_ih, w_hh, bias)
    out, (h, c) = ops.lstm(*(ops.asarray(a) for a in (x, h0, c0, w_ih, w_hh, bias)))
    for got, want in ((out, want_out), (h, want_h), (c, want_c)):
        assert rel_err(ops.to_numpy(got), want) <= fwd_tol(ops)


def test_lstm_primitive_refuses_bad_shapes():
    ops = backends.get("numpy")
    x, h = np.zeros((2, 3, 4)), np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"w_hh has shape \(5, 16\), expected \(5, 20\)"):
        ops.lstm(x, h, h, np.zeros((4, 20)), np.zeros((5, 16)), np.zeros(20))


# ---------------------------------------------------------------------- the model
def step_logits(model, params, tokens):
    ops = model.ops
    state = model.init_state(tokens.shape[0], tokens.shape[1])
    out = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(params, state, tokens[:, t])
        out.append(ops.to_numpy(logits))
    return np.stack(out, 1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_step_match_numpy_reference(ops, config, shape):
    batch, T = shape
    tokens = np.random.default_rng(T).integers(0, VOCAB, (batch, T))
    model, params = make(ops, config)
    want, want_state = np_lstm_model(params, tokens)
    native = model.params_from_numpy(params)
    got, state = model.forward(native, ops.asarray(tokens), T, return_state=True)
    assert rel_err(ops.to_numpy(got), want) <= fwd_tol(ops)
    for layer, (h, c) in zip(state, want_state, strict=True):
        assert rel_err(ops.to_numpy(layer["h"]), h) <= fwd_tol(ops)
        assert rel_err(ops.to_numpy(layer["c"]), c) <= fwd_tol(ops)
    assert rel_err(step_logits(model, native, ops.asarray(tokens)), want) <= fwd_tol(ops)


def test_state_hand_over_between_forms(ops):
    """forward(prefix, return_state) -> forward(rest) and -> step(...) give forward(all)."""
    model, params = make(ops)
    params = model.params_from_numpy(params)
    tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 12))
    full = ops.to_numpy(model.forward(params, ops.asarray(tokens), 12))
    head, state = model.forward(params, ops.asarray(tokens[:, :5]), 12, return_state=True)
    tail = model.forward(params, ops.asarray(tokens[:, 5:]), 12, state=state)
    joined = np.concatenate([ops.to_numpy(head), ops.to_numpy(tail)], 1)
    assert rel_err(joined, full) <= fwd_tol(ops)
    stepped = []
    for t in range(5, 12):
        logits, state = model.step(params, state, ops.asarray(tokens[:, t]))
        stepped.append(ops.to_numpy(logits))
    assert rel_err(np.stack(stepped, 1), full[:, 5:]) <= fwd_tol(ops)


def _data(seed=5, batch=2, T=7):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, T))
    targets = rng.integers(0, VOCAB, (batch, T))
    mask = (rng.uniform(size=(batch, T)) < 0.7).astype(float)
    mask[:, -1] = 1.0
    return tokens, targets, mask


def _native_grads(ops, model, params, data):
    tokens, targets, mask = (ops.asarray(x) for x in data)

    def loss_fn(p):
        return cross_entropy(ops, model.forward(p, tokens, tokens.shape[1]), targets, mask)

    _, grads = ops.value_and_grad(loss_fn)(model.params_from_numpy(params))
    return {k: ops.to_numpy(v) for k, v in tree_flatten(grads).items()}


@pytest.mark.parametrize("config", ["two-layers", "one-layer-odd"])
def test_gradients_match_finite_differences(trainable_ops, config):
    """float32 autodiff through the backend's LSTM against central differences of the float64
    NumPy reference, at 3 coordinates of every parameter (FD_RTOL_FLOAT32)."""
    model, params = make(trainable_ops, config, seed=1)
    data = _data()
    grads = _native_grads(trainable_ops, model, params, data)
    rng = np.random.default_rng(0)
    for name, value in tree_flatten(params).items():
        for k in rng.choice(value.size, size=min(3, value.size), replace=False):
            index = np.unravel_index(k, value.shape)
            want = central_difference(lambda: np_loss(params, *data), value, index)
            got = grads[name][index]
            assert abs(got - want) <= FD_RTOL_FLOAT32 * max(abs(want), 1e-2), (name, got, want)


def test_gradients_agree_with_float64_pytorch(trainable_ops):
    """Every gradient on this backend against PyTorch's LSTM in float64 (for MLX: a second,
    independent autodiff; for PyTorch: float32 against float64), GRAD_RTOL."""
    torch_backend = pytest.importorskip("pntm.backends.torch_backend")
    import torch

    reference = torch_backend.TorchBackend(device="cpu", dtype=torch.float64)
    model, params = make(trainable_ops, seed=2)
    data = _data(T=15)
    got = _native_grads(trainable_ops, model, params, data)
    want = _native_grads(reference, LSTM(model.config, reference), params, data)
    errors = grad_errors(got, want)
    assert max(errors.values()) <= GRAD_RTOL, errors


def test_training_lowers_the_loss(trainable_ops):
    """A few dozen updates on tiny copy: the loss falls well below where it started."""
    config = LSTMConfig(vocab_size=tasks.get("copy").vocab_size, d_model=16, n_layers=1)
    train = TrainConfig(
        task="copy", train_length=3, steps=40, batch_size=16, lr=1e-2, warmup_steps=2
    )
    trainer = Trainer("lstm", config, train, trainable_ops, trainable_ops.name)
    losses = [trainer.train_step()["loss"] for _ in range(train.steps)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize(
    "field,value",
    [("d_model", 0), ("n_layers", 1.5), ("vocab_size", "7"), ("d_model", True)],
)
def test_bad_config_is_named(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer, got {value!r}"):
        LSTMConfig(**(dict(vocab_size=5) | {field: value}))


def test_config_round_trip_and_summary():
    config = LSTMConfig(vocab_size=5, d_model=8, n_layers=3)
    assert LSTMConfig.from_dict(config.to_dict()) == config
    assert config.summary() == "3 layers x 8 units"
    with pytest.raises(ValueError, match=r"unknown LSTMConfig keys \['n_heads'\]"):
        LSTMConfig.from_dict(config.to_dict() | {"n_heads": 2})


# ---------------------------------------------------------------------- the CLI
TRAINABLE = [i.name for i in backends.available() if i.runs and i.trainable]
TINY = [
    "--task", "copy", "--steps", "3", "--train-length", "3", "--batch-size", "4",
    "--d-model", "8", "--layers", "1", "--warmup-steps", "1", "--eval-lengths", "2,4",
    "--eval-samples", "3", "--quiet",
]  # fmt: skip


def run(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.mark.skipif(not TRAINABLE, reason="no trainable backend installed")
def test_cli_trains_and_evaluates_an_lstm(tmp_path):
    out = tmp_path / "lstm"
    result = run("train", "--model", "lstm", *TINY, "--backend", TRAINABLE[0], "--out", out)
    assert result.exit_code == 0, result.output
    assert "lstm (1 layers x 8 units" in result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["model"] == "lstm" and [r["length"] for r in data["results"]] == [2, 4]
    assert data["model_config"] == {"vocab_size": 6, "d_model": 8, "n_layers": 1}
    for backend in ("numpy", TRAINABLE[0]):
        json_path = tmp_path / f"{backend}.json"
        result = run(
            "eval", out, "--backend", backend, "--lengths", "3,5", "--samples", "3",
            "--json", json_path, "--plot", tmp_path / f"{backend}.png",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "lstm checkpoint at step 3" in result.output
        assert [r["length"] for r in json.loads(json_path.read_text())["results"]] == [3, 5]
    # a decoding option of the P-NTM is refused at evaluation too
    result = run("eval", out, "--backend", "numpy", "--heads", "hard")
    assert result.exit_code != 0 and len(error_lines(result)) == 1, result.output
    assert "--heads is not an option of model 'lstm'" in error_lines(result)[0]


@pytest.mark.parametrize("flag,value", [("--velocity-prior", "1"), ("--attention-heads", "2")])
def test_cli_refuses_options_of_other_models(tmp_path, flag, value):
    result = run("train", "--model", "lstm", *TINY, flag, value, "--out", tmp_path / "r")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    errors = error_lines(result)
    assert len(errors) == 1, result.output
    assert f"{flag} is not an option of model 'lstm'" in errors[0]
    assert not Path(tmp_path / "r").exists()
