"""The causal Transformer: the ``Backend.attention`` primitive (including the lower-right mask
of a KV cache) and the model (NoPE and RoPE) against an independent float64 NumPy
implementation on every backend, step form and KV-cache hand-over against the parallel form,
gradients, training, config checks and the CLI end to end.

Tolerances (tests/tolerances.py): framework backends compute in float32, the reference in
float64. Attention is a softmax-weighted average and the blocks are pre-norm residual sums,
with no recurrence to accumulate roundoff over time: the logits are observed within 6e-7 of
the reference (relative to their largest value; torch and MLX, every config here, T up to 40),
so FWD_RTOL = 1e-5 leaves a 15x margin; full gradients within 1e-6 of float64 PyTorch, against
GRAD_RTOL = 1e-4.
The NumPy backend runs the same float64 arithmetic as the reference in another order:
EXACT_RTOL.
"""

from __future__ import annotations

import numpy as np
import pytest

from pntm import backends
from pntm.models.transformer import Transformer, TransformerConfig
from tests import model_checks as checks
from tests.tolerances import rel_err

CONFIGS = {
    "nope": dict(d_model=16, n_layers=2, n_heads=4),
    "rope": dict(d_model=16, n_layers=2, n_heads=2, positions="rope"),
    "one-layer-odd": dict(d_model=15, n_layers=1, n_heads=3, mlp_ratio=3),
    "rope-one-head": dict(d_model=6, n_layers=1, n_heads=1, positions="rope"),
}
SHAPES = [(1, 1), (2, 9), (3, 13)]  # (batch, T): T = 1, B = 1, odd sizes
TINY = [*checks.TINY_TRAIN, "--attention-heads", "2"]


# ---------------------------------------------------------------------- the NumPy reference
def np_attention(q, k, v, causal):
    """Explicit masked softmax; causal: query i is position Tk - Tq + i and sees keys <= it."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if causal:
        position = np.arange(n_queries)[:, None] + (n_keys - n_queries)
        scores = np.where(np.arange(n_keys)[None, :] <= position, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def np_rms(x, gain):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * gain


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_rope(x, start):
    """Rotary embedding of (B, heads, T, d) at positions start..: pairs (x_j, x_{j + d/2})."""
    half = x.shape[-1] // 2
    angle = (start + np.arange(x.shape[2]))[:, None] * 10_000.0 ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def np_transformer(config, params, tokens, cache=None):
    """Logits (B, T, V) and the per-block {"k", "v"} (keys, values) after these tokens."""
    B, T = tokens.shape
    H, heads = config.d_model, config.n_heads
    x = params["embed"][tokens]
    new_cache = []
    for i, blk in enumerate(params["blocks"]):
        qkv = np_rms(x, blk["norm_attn"]) @ blk["qkv"]
        q, k, v = (
            qkv[..., j * H : (j + 1) * H].reshape(B, T, heads, H // heads).transpose(0, 2, 1, 3)
            for j in range(3)
        )
        start = 0 if cache is None else cache[i]["k"].shape[2]
        if config.positions == "rope":
            q, k = np_rope(q, start), np_rope(k, start)
        if cache is not None:
            k, v = np.concatenate([cache[i]["k"], k], 2), np.concatenate([cache[i]["v"], v], 2)
        new_cache.append({"k": k, "v": v})
        out = np_attention(q, k, v, causal=True).transpose(0, 2, 1, 3).reshape(B, T, H)
        x = x + out @ blk["attn_out"]
        h = np_gelu(np_rms(x, blk["norm_mlp"]) @ blk["mlp_w1"] + blk["mlp_b1"])
        x = x + h @ blk["mlp_w2"] + blk["mlp_b2"]
    return np_rms(x, params["norm_out"]) @ params["unembed"], new_cache


def make(ops, config="nope", seed=0):
    return checks.make_model(Transformer, CONFIGS[config], ops, seed)


# ---------------------------------------------------------------------- the primitive
# (B, heads, Tq, Tk, d): Tq = Tk (training), Tq < Tk (prefill after a cache), Tq = 1 (a step)
ATTENTION_SHAPES = [(1, 1, 1, 1, 2), (2, 3, 5, 5, 4), (2, 2, 3, 7, 4), (1, 2, 1, 6, 3)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}-h{}-q{}-k{}-d{}".format(*s))
def test_attention_primitive_matches_numpy(ops, shape, causal):
    """Including Tq < Tk, where the causal mask must align to the lower right (PyTorch's
    ``is_causal`` alone would align it to the upper left)."""
    B, heads, n_queries, n_keys, d = shape
    rng = np.random.default_rng(n_keys)
    q = rng.normal(size=(B, heads, n_queries, d))
    k, v = rng.normal(size=(2, B, heads, n_keys, d))
    got = ops.to_numpy(ops.attention(ops.asarray(q), ops.asarray(k), ops.asarray(v), causal))
    assert rel_err(got, np_attention(q, k, v, causal)) <= checks.forward_tolerance(ops)


def test_attention_gradients_with_a_cache(trainable_ops):
    """Gradients through the lower-right causal mask (Tq < Tk) against central differences
    of the float64 reference."""
    ops = trainable_ops
    rng = np.random.default_rng(0)
    inputs = {"q": rng.normal(size=(2, 2, 3, 4)), "k": rng.normal(size=(2, 2, 5, 4))}
    inputs["v"] = rng.normal(size=(2, 2, 5, 4))
    weight = rng.normal(size=(2, 2, 3, 4))

    def loss(p):
        return ops.sum(ops.attention(p["q"], p["k"], p["v"], True) * ops.asarray(weight))

    _, grads = ops.value_and_grad(loss)({n: ops.asarray(x) for n, x in inputs.items()})
    checks.finite_differences(
        {name: ops.to_numpy(g) for name, g in grads.items()},
        inputs,
        lambda: float((np_attention(*inputs.values(), True) * weight).sum()),
        samples=6,
        rng=rng,
    )


def test_attention_refuses_more_queries_than_keys():
    ops = backends.get("numpy")
    q, k = np.zeros((1, 1, 4, 2)), np.zeros((1, 1, 3, 2))
    with pytest.raises(ValueError, match=r"causal attention needs Tq <= Tk .* got Tq 4 > Tk 3"):
        ops.attention(q, k, k, causal=True)


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_step_match_numpy_reference(ops, config, shape):
    model, params = make(ops, config)
    tokens = checks.random_tokens(*shape)
    want, want_cache = np_transformer(model.config, params, tokens)
    checks.forward_and_step(model, params, tokens, want, want_cache)


@pytest.mark.parametrize("config", ["nope", "rope"])
def test_kv_cache_hand_over_between_forms(ops, config):
    """forward(prefix, return_state) -> forward(rest, cache) (several queries after a cache:
    the lower-right mask, positions continuing) and -> step(...) give forward(all)."""
    model, params = make(ops, config)
    tokens = checks.random_tokens(2, 12, seed=3)
    full, state = checks.hand_over(model, params, tokens, capacity=12, split=5)
    assert state[0]["k"].shape == (2, model.config.n_heads, 5, model.config.head_dim)
    params = model.params_from_numpy(params)
    tail, after = model.forward(
        params, ops.asarray(tokens[:, 5:]), 12, state=state, return_state=True
    )
    assert rel_err(ops.to_numpy(tail), full[:, 5:]) <= checks.forward_tolerance(ops)
    assert after[-1]["v"].shape[2] == 12
    # starting from the empty cache of init_state is starting from nothing
    fresh = model.forward(params, ops.asarray(tokens), 12, state=model.init_state(2, 12))
    assert rel_err(ops.to_numpy(fresh), full) <= checks.forward_tolerance(ops)


def test_rope_scores_depend_on_relative_positions_only():
    """RoPE rotates queries and keys so that their scores depend on the distance between
    positions only: the same (q, k) pairs give the same scores at any start, and other scores
    than without rotation. (A cache at any length continues it; the hand-over test checks the
    positions themselves.)"""
    ops = backends.get("numpy")
    model, _ = make(ops, "rope")
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 2, 6, model.config.head_dim))

    def scores(start):
        cos, sin = model._rotation(start, 6)
        return model._rotate(q, cos, sin) @ np.swapaxes(model._rotate(k, cos, sin), -1, -2)

    np.testing.assert_allclose(scores(37), scores(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores(1000), scores(0), rtol=1e-10, atol=1e-12)
    assert np.abs(scores(0) - q @ np.swapaxes(k, -1, -2)).max() > 1e-2


@pytest.mark.parametrize("config", ["nope", "rope"])
def test_gradients_match_finite_differences(trainable_ops, config):
    """float32 autodiff through the backend's attention against central differences of the
    float64 NumPy reference, at 3 coordinates of every parameter (FD_RTOL_FLOAT32)."""
    model, params = make(trainable_ops, config, seed=1)
    data = checks.loss_data()
    tokens, targets, mask = data
    grads = checks.native_grads(trainable_ops, model, params, data)

    def loss():
        logits, _ = np_transformer(model.config, params, tokens)
        return checks.np_cross_entropy(logits, targets, mask)

    checks.finite_differences(grads, params, loss)


@pytest.mark.parametrize("config", ["nope", "rope"])
def test_gradients_agree_with_float64_pytorch(trainable_ops, config):
    """Every gradient on this backend against PyTorch in float64 (for MLX: a second,
    independent autodiff; for PyTorch: float32 against float64), GRAD_RTOL."""
    reference = checks.float64_torch()
    model, params = make(trainable_ops, config, seed=2)
    data = checks.loss_data(T=15)
    got = checks.native_grads(trainable_ops, model, params, data)
    want = checks.native_grads(reference, Transformer(model.config, reference), params, data)
    checks.gradients_agree(got, want)


def test_training_lowers_the_loss(trainable_ops):
    """A few dozen updates on tiny copy: the loss falls well below where it started."""
    options = dict(d_model=16, n_layers=1, n_heads=2)
    checks.training_lowers_the_loss(trainable_ops, "transformer", options)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(n_heads=2.0), "n_heads must be a positive integer, got 2.0"),
        (dict(mlp_ratio=-1), "mlp_ratio must be a positive integer, got -1"),
        (dict(d_model=16, n_heads=3), "d_model 16 must be a multiple of n_heads 3"),
        (dict(positions="alibi"), "positions must be one of ('nope', 'rope'), got 'alibi'"),
        (
            dict(d_model=12, n_heads=4, positions="rope"),
            "positions 'rope' needs an even head width, got d_model 12 / n_heads 4 = 3",
        ),
    ],
)
def test_bad_config_is_named(changes, message):
    checks.config_refused(
        TransformerConfig, changes, message.replace("(", r"\(").replace(")", r"\)")
    )


def test_config_round_trip_and_summary():
    config = TransformerConfig(vocab_size=5, d_model=8, n_layers=3, n_heads=2, positions="rope")
    checks.config_round_trip(config, "3 blocks x 2 heads, rope", foreign_key="read_heads")


# ---------------------------------------------------------------------- the CLI
@checks.needs_trainable
def test_cli_trains_and_evaluates_a_transformer(tmp_path):
    checks.cli_trains_and_evaluates(
        tmp_path,
        "transformer",
        [*TINY, "--positions", "rope", "--mlp-ratio", "3"],
        banner="transformer (1 blocks x 2 heads, rope",
        model_config={
            "vocab_size": 6,
            "d_model": 8,
            "n_layers": 1,
            "n_heads": 2,
            "mlp_ratio": 3,
            "positions": "rope",
        },
    )


@pytest.mark.parametrize("flag,value", [("--velocity-prior", "1"), ("--memory-heads", "2")])
def test_cli_refuses_options_of_other_models(tmp_path, flag, value):
    checks.cli_refuses(tmp_path, "transformer", flag, value, *TINY)
