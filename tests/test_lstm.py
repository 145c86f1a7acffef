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

import numpy as np
import pytest

from pntm import backends
from pntm.models.lstm import LSTM, LSTMConfig
from tests import model_checks as checks
from tests.tolerances import rel_err

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
    """Logits (B, T, V) and the per-layer {"h", "c"} after the last token."""
    x = params["embed"][tokens]
    B, H = tokens.shape[0], params["embed"].shape[1]
    new_state = []
    for i, layer in enumerate(params["layers"]):
        start = {"h": np.zeros((B, H)), "c": np.zeros((B, H))} if state is None else state[i]
        weights = layer["w_ih"], layer["w_hh"], layer["bias"]
        x, h, c = np_lstm_layer(x, start["h"], start["c"], *weights)
        new_state.append({"h": h, "c": c})
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * params["norm_out"]
    return x @ params["unembed"], new_state


def make(ops, config="two-layers", seed=0):
    return checks.make_model(LSTM, CONFIGS[config], ops, seed)


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
        assert rel_err(ops.to_numpy(got), want) <= checks.forward_tolerance(ops)


def test_lstm_primitive_refuses_bad_shapes():
    ops = backends.get("numpy")
    x, h = np.zeros((2, 3, 4)), np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"w_hh has shape \(5, 16\), expected \(5, 20\)"):
        ops.lstm(x, h, h, np.zeros((4, 20)), np.zeros((5, 16)), np.zeros(20))


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_step_match_numpy_reference(ops, config, shape):
    model, params = make(ops, config)
    tokens = checks.random_tokens(*shape)
    want, want_state = np_lstm_model(params, tokens)
    checks.forward_and_step(model, params, tokens, want, want_state)


def test_state_hand_over_between_forms(ops):
    """forward(prefix, return_state) -> forward(rest) and -> step(...) give forward(all)."""
    model, params = make(ops)
    checks.hand_over(model, params, checks.random_tokens(2, 12, seed=3), capacity=12, split=5)


@pytest.mark.parametrize("config", ["two-layers", "one-layer-odd"])
def test_gradients_match_finite_differences(trainable_ops, config):
    """float32 autodiff through the backend's LSTM against central differences of the float64
    NumPy reference, at 3 coordinates of every parameter (FD_RTOL_FLOAT32)."""
    model, params = make(trainable_ops, config, seed=1)
    data = checks.loss_data()
    tokens, targets, mask = data
    grads = checks.native_grads(trainable_ops, model, params, data)

    def loss():
        logits, _ = np_lstm_model(params, tokens)
        return checks.np_cross_entropy(logits, targets, mask)

    checks.finite_differences(grads, params, loss)


def test_gradients_agree_with_float64_pytorch(trainable_ops):
    """Every gradient on this backend against PyTorch's LSTM in float64 (for MLX: a second,
    independent autodiff; for PyTorch: float32 against float64), GRAD_RTOL."""
    reference = checks.float64_torch()
    model, params = make(trainable_ops, seed=2)
    data = checks.loss_data(T=15)
    got = checks.native_grads(trainable_ops, model, params, data)
    want = checks.native_grads(reference, LSTM(model.config, reference), params, data)
    checks.gradients_agree(got, want)


def test_training_lowers_the_loss(trainable_ops):
    """A few dozen updates on tiny copy: the loss falls well below where it started."""
    checks.training_lowers_the_loss(trainable_ops, "lstm", dict(d_model=16, n_layers=1))


@pytest.mark.parametrize(
    "field,value",
    [("d_model", 0), ("n_layers", 1.5), ("vocab_size", "7"), ("d_model", True)],
)
def test_bad_config_is_named(field, value):
    message = rf"{field} must be a positive integer, got {value!r}"
    checks.config_refused(LSTMConfig, {field: value}, message)


def test_config_round_trip_and_summary():
    config = LSTMConfig(vocab_size=5, d_model=8, n_layers=3)
    checks.config_round_trip(config, "3 layers x 8 units", foreign_key="n_heads")


# ---------------------------------------------------------------------- the CLI
@checks.needs_trainable
def test_cli_trains_and_evaluates_an_lstm(tmp_path):
    out = checks.cli_trains_and_evaluates(
        tmp_path,
        "lstm",
        checks.TINY_TRAIN,
        banner="lstm (1 layers x 8 units",
        model_config={"vocab_size": 6, "d_model": 8, "n_layers": 1},
    )
    # a decoding option of the P-NTM is refused at evaluation too
    result = checks.run_cli("eval", out, "--backend", "numpy", "--heads", "hard")
    assert result.exit_code != 0 and len(checks.error_lines(result)) == 1, result.output
    assert "--heads is not an option of model 'lstm'" in checks.error_lines(result)[0]


@pytest.mark.parametrize("flag,value", [("--velocity-prior", "1"), ("--attention-heads", "2")])
def test_cli_refuses_options_of_other_models(tmp_path, flag, value):
    checks.cli_refuses(tmp_path, "lstm", flag, value, *checks.TINY_TRAIN)
