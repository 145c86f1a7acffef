"""The standard NTM (pntm.models.ntm) against a plain float64 NumPy NTM written here, loop by loop
(heads, slots, shifts), on every backend: addressing, one step, the forward pass over a sequence
and step-by-step decoding; state hand-over; gradients; training; config checks; the CLI.

Tolerances (tests/tolerances.py): the NumPy backend computes in float64 like the reference, but
in another order (sharpening as a softmax of gamma log w, batched matmuls), so it agrees to
EXACT_RTOL (1e-10). The framework backends compute in float32 (unit roundoff 6e-8): an NTM step
has no long accumulation (reductions over N, D, H of a few dozen terms), sharpening multiplies
the relative error of ``w_s`` by gamma (< 10 here) and the recurrence carries it over T <= 13
steps, so the observed error is ~1e-6 of the largest logit, 10x under FWD_RTOL (1e-5).
Gradients: float32 autodiff against the same model in PyTorch float64 within GRAD_RTOL (1e-4,
one more pass of roundoff); that float64 gradient against central differences of the reference
here within FD_RTOL_REFERENCE (1e-6: truncation and cancellation of the differences are ~1e-10).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pntm import backends, models
from pntm.backends.base import COSINE_EPS
from pntm.models.ntm import NTM, NTMConfig
from tests import model_checks as checks
from tests.tolerances import FD_RTOL_REFERENCE, rel_err

CONFIGS = {
    "default-small": dict(d_model=8, head_dim=3),
    # two layers, two heads of each kind, S = 2 (N = 3 < 2S + 1 below), odd sizes
    "multi": dict(d_model=7, n_layers=2, read_heads=2, write_heads=2, head_dim=5, max_shift=2),
    "no-shift": dict(d_model=6, head_dim=4, max_shift=0, write_heads=2),
    # a small clip, so that head parameters and logits are clipped
    "clipped": dict(d_model=5, head_dim=2, read_heads=3, clip_value=0.5),
}
# (batch, T, N): T = 1, N = 1, N < 2S + 1, odd everything
SHAPES = [(1, 1, 1), (2, 9, 1), (3, 11, 4), (2, 6, 3), (1, 13, 13)]


# ------------------------------------------------------------------------------ the reference
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def ref_address(memory, previous, key, beta, gate, shift, gamma):
    """Graves et al. 3.3 for one example and one head, slot by slot: ``memory`` (N, D),
    ``previous`` (N,), ``key`` (D,), scalars ``beta``, ``gate``, ``gamma``, ``shift`` (2S+1,)."""
    n, S = memory.shape[0], (len(shift) - 1) // 2
    norm_k = np.sqrt(key @ key + COSINE_EPS)
    cosine = np.array([memory[i] @ key / (np.sqrt(memory[i] @ memory[i] + COSINE_EPS) * norm_k)
                       for i in range(n)])  # fmt: skip
    content = softmax(beta * cosine)
    mixed = gate * content + (1 - gate) * previous
    shifted = np.zeros(n)
    for i in range(n):
        for j in range(-S, S + 1):
            shifted[i] += shift[j + S] * mixed[(i - j) % n]
    powered = shifted**gamma
    return powered / powered.sum()


def ref_fields(config: NTMConfig) -> dict[str, slice]:
    """Where each head parameter sits in the controller's output (the documented order)."""
    K, W, D, S = config.n_heads, config.write_heads, config.head_dim, config.n_shifts
    sizes = [("key", K * D), ("add", W * D), ("gate", K), ("erase", W * D), ("beta", K),
             ("gamma", K), ("shift", K * S)]  # fmt: skip
    out, start = {}, 0
    for name, size in sizes:
        out[name] = slice(start, start + size)
        start += size
    return out


def ref_initial(params, config: NTMConfig, batch: int, n_slots: int) -> dict:
    H, R, D = config.d_model, config.read_heads, config.head_dim
    weights = np.zeros((batch, config.n_heads, n_slots))
    for k in range(config.n_heads):
        u = sigmoid(params["init_weight"][k])
        weights[:, k] = u / n_slots
        weights[:, k, 0] += 1 - u
    return {
        "h": np.zeros((config.n_layers, batch, H)),
        "c": np.zeros((config.n_layers, batch, H)),
        "reads": np.broadcast_to(np.tanh(params["init_read"]), (batch, R, D)).copy(),
        "weights": weights,
        "memory": np.full((batch, n_slots, D), 1e-6),
    }


def ref_step(params, config: NTMConfig, state: dict, token: np.ndarray):
    """One NTM step for tokens (B,): logits (B, V) and the next state (a new dict)."""
    H, R, W, D, S = (config.d_model, config.read_heads, config.write_heads, config.head_dim,
                     config.max_shift)  # fmt: skip
    clip = config.clip_value
    B, N = state["memory"].shape[:2]
    x = params["embed"][token]
    h_new, c_new = np.zeros_like(state["h"]), np.zeros_like(state["c"])
    below = x
    for layer, p in enumerate(params["lstm"]):
        recurrent = state["h"][layer]
        if layer == 0:
            recurrent = np.concatenate([state["reads"].reshape(B, R * D), recurrent], -1)
        z = below @ p["w_in"] + recurrent @ p["w_rec"] + p["b"]
        i, f, o = sigmoid(z[:, :H]), sigmoid(z[:, H : 2 * H]), sigmoid(z[:, 2 * H : 3 * H])
        g = np.tanh(z[:, 3 * H :])
        c_new[layer] = f * state["c"][layer] + i * g
        h_new[layer] = o * np.tanh(c_new[layer])
        below = h_new[layer]
    raw = np.clip(below @ params["heads"]["w"] + params["heads"]["b"], -clip, clip)
    at = ref_fields(config)
    weights = np.zeros_like(state["weights"])
    reads = np.zeros_like(state["reads"])
    memory = state["memory"].copy()
    for b in range(B):
        for k in range(config.n_heads):
            head = {name: raw[b, sl] for name, sl in at.items()}
            weights[b, k] = ref_address(
                state["memory"][b],
                state["weights"][b, k],
                np.tanh(head["key"][k * D : (k + 1) * D]),
                softplus(head["beta"][k]),
                sigmoid(head["gate"][k]),
                softmax(head["shift"][k * (2 * S + 1) : (k + 1) * (2 * S + 1)]),
                1 + softplus(head["gamma"][k]),
            )
        for r in range(R):
            for i in range(N):
                reads[b, r] += weights[b, r, i] * state["memory"][b, i]
        for i in range(N):
            keep = np.ones(D)
            added = np.zeros(D)
            for m in range(W):
                erase = sigmoid(raw[b, at["erase"]][m * D : (m + 1) * D])
                add = np.tanh(raw[b, at["add"]][m * D : (m + 1) * D])
                keep *= 1 - weights[b, R + m, i] * erase
                added += weights[b, R + m, i] * add
            memory[b, i] = state["memory"][b, i] * keep + added
    out = np.concatenate([below, reads.reshape(B, R * D)], -1)
    logits = np.clip(out @ params["out"]["w"] + params["out"]["b"], -clip, clip)
    return logits, {"h": h_new, "c": c_new, "reads": reads, "weights": weights, "memory": memory}


def ref_forward(params, config: NTMConfig, tokens: np.ndarray, n_slots: int) -> np.ndarray:
    state = ref_initial(params, config, tokens.shape[0], n_slots)
    out = []
    for t in range(tokens.shape[1]):
        logits, state = ref_step(params, config, state, tokens[:, t])
        out.append(logits)
    return np.stack(out, 1)


# ------------------------------------------------------------------------------ helpers
def make(ops, name: str, seed: int = 0):
    return checks.make_model(NTM, CONFIGS[name], ops, seed)


# ------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("max_shift", [0, 1, 2])
@pytest.mark.parametrize("n_slots", [1, 2, 5, 11])
def test_addressing_matches_reference(ops, n_slots, max_shift):
    """Content, interpolation, shift and sharpening of K heads at once = the slot loop, with
    strengths and sharpening up to 10 and a slot left at zero."""
    rng = np.random.default_rng(n_slots * 10 + max_shift)
    B, K, D = 3, 4, 5
    memory = rng.normal(size=(B, n_slots, D))
    memory[0, 0] = 0.0  # an empty slot: cosine 0 through the eps
    previous = rng.dirichlet(np.ones(n_slots), (B, K))
    key = rng.normal(size=(B, K, D))
    beta = rng.uniform(0, 10, (B, K))
    gate = rng.uniform(0, 1, (B, K))
    shift = rng.dirichlet(np.ones(2 * max_shift + 1), (B, K))
    gamma = rng.uniform(1, 10, (B, K))
    model, _ = make(ops, "default-small")
    args = (memory, previous, key, beta, gate, shift, gamma)
    got = ops.to_numpy(model.address(*(ops.asarray(a) for a in args)))
    want = np.array(
        [[ref_address(memory[b], *(a[b, k] for a in args[1:])) for k in range(K)] for b in range(B)]
    )
    assert rel_err(got, want) <= checks.forward_tolerance(ops)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=checks.forward_tolerance(ops))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_step_matches_reference(ops, config):
    """One step from a random mid-sequence state: logits and every part of the next state."""
    model, params = make(ops, config, seed=3)
    c = model.config
    rng = np.random.default_rng(1)
    B, N = 3, 5
    state = {
        "h": rng.normal(0, 0.5, (c.n_layers, B, c.d_model)),
        "c": rng.normal(0, 0.5, (c.n_layers, B, c.d_model)),
        "reads": rng.normal(0, 0.5, (B, c.read_heads, c.head_dim)),
        "weights": rng.dirichlet(np.ones(N), (B, c.n_heads)),
        "memory": rng.normal(0, 0.5, (B, N, c.head_dim)),
    }
    token = rng.integers(0, checks.VOCAB, B)
    want_logits, want = ref_step(params, c, state, token)
    native = {
        "h": [ops.asarray(h) for h in state["h"]],
        "c": [ops.asarray(x) for x in state["c"]],
        **{k: ops.asarray(state[k]) for k in ("reads", "weights", "memory")},
    }
    logits, got = model.step(model.params_from_numpy(params), native, ops.asarray(token))
    tol = checks.forward_tolerance(ops)
    assert rel_err(ops.to_numpy(logits), want_logits) <= tol
    for name in ("reads", "weights", "memory"):
        assert rel_err(ops.to_numpy(got[name]), want[name]) <= tol, name
    for name in ("h", "c"):
        assert rel_err(np.stack([ops.to_numpy(x) for x in got[name]]), want[name]) <= tol, name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-N{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_decoding_match_reference(ops, config, shape):
    """The forward pass over a sequence and step-by-step decoding from the initial state
    (learned initial reads and weightings) equal the reference."""
    batch, T, n_slots = shape
    tokens = checks.random_tokens(batch, T)
    model, params = make(ops, config)
    want = ref_forward(params, model.config, tokens, n_slots)
    checks.forward_and_step(model, params, tokens, want, capacity=n_slots)


@pytest.mark.parametrize("config", ["default-small", "multi"])
def test_state_hand_over(ops, config):
    """forward(prefix, return_state) then forward(rest) or step(...) = forward(whole)."""
    model, params = make(ops, config)
    checks.hand_over(model, params, checks.random_tokens(2, 12, seed=3), capacity=7, split=5)


def test_initial_weighting_and_memory():
    """Before the first token: memory 1e-6, reads tanh(init_read), weightings (1 - u) delta_0
    + u / N with u = sigmoid(init_weight): mostly slot 0 at every N."""
    ops = backends.get("numpy")
    model, params = make(ops, "multi")
    for n_slots in (1, 4, 100):
        state = model._start(params, None, 2, n_slots)
        assert np.all(state["memory"] == 1e-6)
        np.testing.assert_allclose(state["reads"][1], np.tanh(params["init_read"]))
        np.testing.assert_allclose(state["weights"].sum(-1), 1.0)
        u = sigmoid(params["init_weight"][0])
        assert state["weights"][0, 0, 0] == pytest.approx(1 - u + u / n_slots)
        assert state["weights"][0, 0, 0] > 0.85


def test_sharpening_survives_float32_underflow(trainable_ops):
    """A flat weighting over 512 slots with gamma = 21: every w^gamma underflows in float32,
    the softmax form still returns the flat weighting, and gradients stay finite."""
    ops = trainable_ops
    model, _ = make(ops, "default-small")
    B, K, N, D = 1, 2, 512, 3
    memory = ops.asarray(np.full((B, N, D), 1e-6))
    previous = ops.asarray(np.full((B, K, N), 1.0 / N))
    key = ops.asarray(np.ones((B, K, D)))
    ones = ops.asarray(np.ones((B, K)))
    shift = ops.asarray(np.full((B, K, 3), 1 / 3))
    gamma = ops.asarray(np.full((B, K), 21.0))

    def loss(gamma):
        w = model.address(memory, previous, key, ones, ones * 0.5, shift, gamma)
        return ops.sum(w * w), w

    (_, w), grad = ops.value_and_grad(loss, has_aux=True)(gamma)
    np.testing.assert_allclose(ops.to_numpy(w), 1.0 / N, rtol=1e-4)
    assert np.all(np.isfinite(ops.to_numpy(grad)))


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("config", ["default-small", "multi"])
def test_gradients_match_float64_and_finite_differences(trainable_ops, config):
    """Every gradient on this backend = the same model in PyTorch float64 (GRAD_RTOL), whose
    gradient = central differences of the reference NTM above at sampled coordinates."""
    f64 = checks.float64_torch(scan="sequential")
    model, params = make(trainable_ops, config, seed=1)
    data, n_slots = checks.loss_data(T=6), 5
    got = checks.native_grads(trainable_ops, model, params, data, n_slots)
    exact = checks.native_grads(f64, NTM(model.config, f64), params, data, n_slots)
    assert all(np.all(np.isfinite(g)) for g in got.values())
    checks.gradients_agree(got, exact)
    if trainable_ops.name != "torch":
        return  # the float64 side is the same on every backend: checked once
    tokens, targets, mask = data

    def ref_loss():
        return checks.np_cross_entropy(
            ref_forward(params, model.config, tokens, n_slots), targets, mask
        )

    checks.finite_differences(exact, params, ref_loss, samples=2, rtol=FD_RTOL_REFERENCE, floor=1.0)


def test_training_lowers_the_loss(trainable_ops):
    checks.training_lowers_the_loss(
        trainable_ops, "ntm", dict(d_model=16, head_dim=4), batch_size=8, warmup_steps=3, window=8
    )


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("n_layers", 1.5),
        ("read_heads", 0),
        ("write_heads", -1),
        ("head_dim", True),
        ("max_shift", -1),
        ("max_shift", 1.0),
        ("clip_value", 0.0),
        ("clip_value", float("inf")),
        ("clip_value", "big"),
        ("vocab_size", 2.0),
    ],
)
def test_bad_config_is_named(field, value):
    checks.config_refused(NTMConfig, {field: value}, rf"{field}.*{value!r}".replace("(", r"\("))


@pytest.mark.parametrize("capacity", [0, 2.5, True])
def test_bad_capacity_is_named(capacity):
    model, params = make(backends.get("numpy"), "default-small")
    with pytest.raises(ValueError, match=f"capacity.*{capacity!r}"):
        model.forward(params, np.zeros((1, 3), int), capacity)


def test_state_of_another_capacity_is_refused():
    model, params = make(backends.get("numpy"), "default-small")
    _, state = model.forward(params, np.zeros((1, 3), int), 4, return_state=True)
    with pytest.raises(ValueError, match="4 memory slots, capacity is 6"):
        model.forward(params, np.zeros((1, 3), int), 6, state=state)


def test_registry_and_summary():
    assert models.get("ntm") is NTM
    assert NTMConfig(vocab_size=5).summary() == "LSTM 64, 1 read + 1 write head"
    two = NTMConfig(vocab_size=5, n_layers=2, read_heads=2, d_model=32)
    checks.config_round_trip(two, "LSTM 32 x 2 layers, 2 read + 1 write heads", "positions")


# ------------------------------------------------------------------------------ CLI
@checks.needs_trainable
def test_cli_trains_and_evaluates_an_ntm(tmp_path: Path):
    out = checks.cli_trains_and_evaluates(
        tmp_path,
        "ntm",
        [*checks.TINY_TRAIN, "--head-dim", "4", "--read-heads", "2"],
        banner="ntm (LSTM 8, 2 read + 1 write heads",
        model_config=NTMConfig(vocab_size=6, d_model=8, head_dim=4, read_heads=2).to_dict(),
    )
    # without --json, eval writes a new eval-DATE-TIME-PID.json beside the run's eval.json
    result = checks.run_cli("eval", out, "--backend", "numpy", "--lengths", "2,3", "--samples", "3")
    assert result.exit_code == 0, result.output
    (written,) = out.glob("eval-*.json")
    rows = json.loads(written.read_text())["results"]
    assert [r["length"] for r in rows] == [2, 3]
    checks.cli_refuses(tmp_path, "pntm", "--read-heads", "2")
