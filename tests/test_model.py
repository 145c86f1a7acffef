"""The model: parallel form against the float64 step-by-step reference on every backend,
step form against parallel form, state hand-over, and gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from pntm.models.base import cross_entropy
from pntm.models.pntm import PNTM, PNTMConfig, init_params
from pntm.tree import tree_flatten
from tests import model_checks as checks

CONFIGS = {
    "default": dict(d_model=16, n_layers=2, n_heads=2, head_dim=4),
    "content": dict(d_model=16, n_layers=2, n_heads=2, head_dim=4, content=True),
    "shift2-odd": dict(
        d_model=12, n_layers=1, n_heads=3, head_dim=5, max_shift=2, velocity_prior=1.5
    ),
    "one-head-linear-add-overwrite": dict(
        d_model=8, n_layers=3, n_heads=1, head_dim=3, add_activation="linear", overwrite=True
    ),
    "gated-write": dict(d_model=8, n_layers=2, n_heads=2, head_dim=3, gated_write=True),
    # lag 2 > N for the N = 1 shapes: the home wraps around
    "read-lag-content": dict(
        d_model=8, n_layers=2, n_heads=2, head_dim=3, read_lag=2, content=True, gated_write=True
    ),
    # lags 1, 3, 5: one home per read head, wrapping around for N < 6
    "staggered-read-lags": dict(
        d_model=8, n_layers=2, n_heads=3, head_dim=3, read_lag=1, read_lag_step=2, gated_write=True
    ),
    # blocks 0 and 1 read by location only, block 2 by content too, its strength scaled by ln N
    # (0 at N = 1); priors that start the hard heads moving +1 and never resetting
    "content-from-block": dict(
        d_model=8,
        n_layers=3,
        n_heads=2,
        head_dim=3,
        content=True,
        content_from_block=2,
        content_log_scale=True,
        read_lag=1,
        overwrite=True,
        velocity_prior=6.0,
        reset_prior=-6.0,
    ),
    # heads that move +1 on every token and learn only their resets, and one register per
    # block; S = 2 so that the fixed move is not the last shift
    "fixed-velocity-registers": dict(
        d_model=8,
        n_layers=2,
        n_heads=3,
        registers=1,
        head_dim=3,
        max_shift=2,
        fixed_velocity=True,
        gated_write=True,
        read_lag=1,
        read_lag_step=1,
    ),
}
# (batch, T, n_slots): T=1, N=1, N < 2S+1, N > T, odd everything
SHAPES = [(1, 1, 1), (2, 9, 1), (3, 11, 4), (2, 13, 13), (1, 24, 31)]


def make(ops, name, seed=0):
    return checks.make_model(PNTM, CONFIGS[name], ops, seed)


@pytest.mark.parametrize("heads", ["soft", "hard"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-N{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_float64_step_reference(ops, ref, config, shape, heads):
    """The parallel form and the step form on this backend against the step form (the plain
    loop of SPEC §2) of the float64 NumPy backend."""
    batch, T, n_slots = shape
    tokens = checks.random_tokens(batch, T)
    ref_model, params = make(ref, config)
    native = ref_model.params_from_numpy(params)
    want = checks.step_logits(ref_model, native, tokens, n_slots, heads=heads)
    model = PNTM(ref_model.config, ops)
    checks.forward_and_step(model, params, tokens, want, capacity=n_slots, heads=heads)


@pytest.mark.parametrize("config", ["default", "content"])
def test_state_hand_over_between_forms(ops, config):
    """forward(prefix) -> state -> forward(rest) and -> step(...) give forward(all)."""
    model, params = make(ops, config)
    tokens = checks.random_tokens(2, 15, seed=3)
    checks.hand_over(model, params, tokens, capacity=16, split=6, restate=True)


# N = 7 at T = 65,536: few frequencies (the interpreted Triton scan is slow) whose twiddles are
# not exact in float32, so the drift that snapping removes is there; lag 4 > N = 3 wraps around
@pytest.mark.parametrize(
    "T,n_slots,lag", [(1, 1, 0), (5, 3, 4), (300, 37, 0), (300, 37, 1), (65_536, 7, 0)]
)
def test_hard_heads_are_exactly_the_discrete_machine(ops, T, n_slots, lag):
    """Straight-through heads in the parallel form: exact one-hot positions, equal to the
    discrete machine's integer positions (move by the shift, or reset to the home slot -lag)
    at every step, up to T = 65,536 where the float32 FFT route alone drifts ~1e-3 off
    one-hot."""
    model, _ = make(ops, "default")
    rng = np.random.default_rng(T)
    S = model.config.max_shift
    moves = rng.integers(-S, S + 1, (1, T, 1))
    resets = rng.uniform(size=(1, T, 1)) < (0.01 if T > 10 else 0.3)
    shift = ops.asarray(np.eye(2 * S + 1)[moves + S])
    gate = ops.asarray(resets.astype(float))
    got = ops.to_numpy(model.head_positions(shift, gate, n_slots, heads="hard", lag=lag))
    want = np.zeros((1, T, 1), dtype=np.int64)
    home = -lag % n_slots
    position = np.full((1, 1), home)
    for t in range(T):
        position = np.where(resets[:, t], home, (position + moves[:, t]) % n_slots)
        want[:, t] = position
    assert np.array_equal(got, np.eye(n_slots)[want])


# (read_lag, read_lag_step, K) -> lags: (1, 1) the previous-token read of an induction circuit,
# (0, 1, 2) a window of the last three writes, (1, 3, 5) homes that wrap around to slots 12, 10
# and 8 of N = 13 (N > T + lag: no slot is written twice, so each read has one right answer)
@pytest.mark.parametrize("lag,lag_step,K,N", [(1, 0, 2, 9), (0, 1, 3, 11), (1, 2, 3, 13)])
def test_read_lags_read_earlier_writes(ops, lag, lag_step, K, N):
    """With every head of a block moving +1 on every token (hard heads), read head k returns
    what write head k wrote ``read_lag + k * read_lag_step`` steps earlier (an empty slot
    before the first write), in both forms."""
    config = PNTMConfig(
        vocab_size=checks.VOCAB,
        d_model=8,
        n_layers=1,
        n_heads=K,
        head_dim=3,
        read_lag=lag,
        read_lag_step=lag_step,
        add_activation="linear",
        overwrite=True,
    )
    lags = config.read_lags
    assert lags == tuple(lag + k * lag_step for k in range(K))
    model = PNTM(config, ops)
    B, T, D = 2, 7, 3
    plus_one = np.zeros((B, T, K, 3))
    plus_one[..., 2] = 1.0
    moves, stay = ops.asarray(plus_one), ops.asarray(np.zeros((B, T, K)))
    write = model.head_positions(moves, stay, N, heads="hard")
    read = model.head_positions(moves, stay, N, heads="hard", lag=lags)
    adds = np.random.default_rng(0).normal(size=(B, T, K, D))
    reads, _ = ops.memory_scan_read(
        write, ops.asarray(np.ones((B, T, K, D))), ops.asarray(adds), read, None
    )
    want = np.zeros((B, T, K, D))
    for k, behind in enumerate(lags):
        want[:, behind:, k] = adds[:, : T - behind, k]
    np.testing.assert_allclose(ops.to_numpy(reads), want, atol=1e-6)
    state = model.init_state(B, N)[0]
    for t in range(T):
        state = {"read": model.move_head(state["read"], moves[:, t], stay[:, t], lags)}
        slots = ops.to_numpy(state["read"]).argmax(-1)
        assert np.array_equal(slots, np.broadcast_to((t + 1 - np.array(lags)) % N, (B, K)))


def test_hard_heads_from_the_controller_are_one_hot(ops):
    model, params = make(ops, "default")
    params = model.params_from_numpy(params)
    tokens = ops.asarray(np.random.default_rng(0).integers(0, checks.VOCAB, (2, 300)))
    x = ops.take(params["embed"], tokens)
    ctl = model._controls(params["blocks"][0], 0, x, "hard", 1.0)
    positions = ops.to_numpy(
        model.head_positions(ctl["write_shift"], ctl["write_gate"], 37, heads="hard")
    )
    assert np.array_equal(positions.max(-1), np.ones(positions.shape[:-1]))
    assert np.array_equal(positions.sum(-1), np.ones(positions.shape[:-1]))


@pytest.mark.parametrize("max_shift", [1, 3])
def test_velocity_prior_biases_the_plus_one_shift(max_shift):
    """A fresh head moves +1 with probability e^v / (e^v + 2S) (gates aside): the bias sits on
    the +1 shift logit of every write and read head, nowhere else."""
    v = 2.0
    base = PNTMConfig(vocab_size=checks.VOCAB, max_shift=max_shift, d_model=8, n_heads=3)
    biased = PNTMConfig(**(base.to_dict() | {"velocity_prior": v}))
    b0 = init_params(base, 0)["blocks"][0]["ctrl_b"].reshape(3, -1)
    b1 = init_params(biased, 0)["blocks"][0]["ctrl_b"].reshape(3, -1)
    changed = np.argwhere(b1 != b0)
    where = base.controller_slices(0)
    plus_one = [where[h].start + max_shift + 1 for h in ("write_shift", "read_shift")]
    assert sorted({int(c) for c in changed[:, 1]}) == sorted(plus_one)
    assert len(changed) == 2 * 3
    logits = b1[0, where["write_shift"]]
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.isclose(p[max_shift + 1], np.exp(v) / (np.exp(v) + 2 * max_shift))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_match_finite_differences_of_reference(trainable_ops, ref, config):
    """Every parameter's gradient on this backend (float32 autodiff through the parallel path)
    against central differences of the float64 NumPy forward, on a sample of coordinates."""
    ops = trainable_ops
    ref_model, params = make(ref, config, seed=1)
    data = checks.loss_data(T=8)
    tokens, targets, mask = data
    n_slots = 7

    def ref_loss():
        logits = ref_model.forward(params, tokens, n_slots)
        return float(cross_entropy(ref, logits, targets, mask))

    grads = checks.native_grads(ops, PNTM(ref_model.config, ops), params, data, n_slots)
    checked = checks.finite_differences(grads, params, ref_loss)
    assert checked >= 3 * len(tree_flatten(params)) - 2


@pytest.mark.parametrize("config", ["default", "content"])
def test_gradients_agree_across_backends(trainable_ops, config):
    """Full gradients on this backend against the same computation run in PyTorch float64
    sequential mode when PyTorch is installed (a second, independent autodiff)."""
    reference = checks.float64_torch(scan="sequential")
    model, params = make(trainable_ops, config, seed=2)
    data = checks.loss_data(T=20)
    got = checks.native_grads(trainable_ops, model, params, data, 11)
    want = checks.native_grads(reference, PNTM(model.config, reference), params, data, 11)
    checks.gradients_agree(got, want)


@pytest.mark.parametrize(
    "bad", [dict(capacity=0), dict(capacity=2.5), dict(heads="sharp"), dict(temperature=0.0)]
)
def test_bad_arguments_are_named(bad):
    from pntm import backends

    ops = backends.get("numpy")
    model, params = make(ops, "default")
    kwargs = dict(capacity=4) | bad
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        model.forward(params, np.zeros((1, 3), int), **kwargs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("max_shift", -1),
        ("add_activation", "relu"),
        ("vocab_size", 2.0),
        ("velocity_prior", float("nan")),
        ("velocity_prior", "fast"),
        ("reset_prior", float("inf")),
        ("hard_move_grad", -0.5),
        ("content_from_block", -1),
        ("content_from_block", 1.5),
        ("content_log_scale", 1),
        ("move_change_cost", -0.1),
        ("move_change_cost", float("nan")),
    ],
)
def test_bad_config_is_named(field, value):
    checks.config_refused(PNTMConfig, {field: value}, field)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(content_from_block=1), r"content_from_block 1 needs content reads"),
        (dict(content=True, content_from_block=2), r"content_from_block 2 leaves none of the 2"),
        (dict(content_log_scale=True), r"content_log_scale needs content reads"),
    ],
)
def test_content_options_need_a_block_that_reads_by_content(changes, match):
    with pytest.raises(ValueError, match=match):
        PNTMConfig(vocab_size=5, n_layers=2, **changes)


def test_blocks_below_content_from_block_have_no_content_controls():
    """Blocks below ``content_from_block`` have no key, strength or mix outputs (their
    controller is narrower by D + 2 per memory); the blocks from it on have them."""
    config = PNTMConfig(
        vocab_size=5, n_layers=3, n_heads=2, head_dim=4, content=True, content_from_block=1
    )
    names = [[name for name, _ in config.controller_fields(b)] for b in range(3)]
    assert "key" not in names[0] and "beta" not in names[0] and "gamma" not in names[0]
    assert names[1][-3:] == names[2][-3:] == ["key", "beta", "gamma"]
    widths = [block["ctrl_b"].size for block in init_params(config, 0)["blocks"]]
    assert widths[1] - widths[0] == widths[2] - widths[0] == 2 * (4 + 2)


@pytest.mark.parametrize("n_slots", [1, 2, 130])
def test_content_log_scale_multiplies_the_strength_by_log_slots(n_slots):
    """With ``content_log_scale`` a content read over N slots uses strength beta ln N (none at
    N = 1, where the one slot gets all the weight anyway); without it, beta itself. The key and
    the mix are unchanged."""
    from pntm import backends

    ops = backends.get("numpy")
    base = dict(vocab_size=5, d_model=8, n_heads=2, head_dim=3, content=True)
    rng = np.random.default_rng(n_slots)
    x = ops.asarray(rng.normal(size=(2, 4, 8)))
    for scaled in (False, True):
        model = PNTM(PNTMConfig(content_log_scale=scaled, **base), ops)
        block = init_params(model.config, 0)["blocks"][1]
        ctl = model._controls(block, 1, x, "soft", 1.0)
        key, beta, gamma = model._content(ctl, n_slots)
        factor = np.log(n_slots) if scaled else 1.0
        np.testing.assert_allclose(beta, ctl["beta"] * factor, rtol=1e-12)
        assert key is ctl["key"] and gamma is ctl["gamma"]


def _certain_moves(moves: list[int | str], n_shifts: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One-hot shifts (1, T, 1, n_shifts) and 0/1 reset gates (1, T, 1) of one head making the
    given hard moves: a shift index, or "R" for a reset."""
    shift = np.zeros((1, len(moves), 1, n_shifts))
    gate = np.zeros((1, len(moves), 1))
    for t, move in enumerate(moves):
        if move == "R":
            gate[0, t, 0] = 1.0
            shift[0, t, 0, 1] = 1.0  # the shift of a resetting head does not count
        else:
            shift[0, t, 0, move] = 1.0
    return shift, gate


@pytest.mark.parametrize(
    "moves,pads,want",
    [
        ([2, 2, 2, 2, 2], 0, 0.0),  # +1 on every token: no change
        ([2, 2, "R", 2, 2], 0, 2.0),  # a reset at a separator: two changes
        ([2, 1, 2, 1, 2], 0, 4.0),  # a head that walks with the data: a change per token
        ([2, 2, 2, 0, 1], 2, 0.0),  # changes after the sequence's end do not count
        ([2, 2, 1, 0, 1], 2, 1.0),
        ([0], 0, 0.0),  # T = 1: no pair of tokens
    ],
)
def test_move_changes_counts_changes_between_consecutive_tokens(moves, pads, want):
    """Hard moves that change between two tokens count 1 each (half the squared distance of
    two one-hot moves); a change into or inside the padding after the sequence's end does not
    count; heads and blocks add up."""
    from pntm import backends
    from pntm.models.pntm import move_changes

    ops = backends.get("numpy")
    mask = np.zeros((1, len(moves)))  # the loss's mask: the sequence's last label counts
    mask[0, len(moves) - pads - 1] = 1.0
    shift, gate = _certain_moves(moves)
    still, never = _certain_moves([2] * len(moves))
    block = {"write_shift": shift, "write_gate": gate, "read_shift": still, "read_gate": never}
    assert move_changes(ops, [block], mask) == pytest.approx(want, abs=1e-12)
    both = {"write_shift": shift, "write_gate": gate, "read_shift": shift, "read_gate": gate}
    assert move_changes(ops, [both, block], mask) == pytest.approx(3 * want)


def test_move_changes_of_uncertain_moves():
    """Soft moves: the distance is over q = ((1 - g) s, g), so a head that resets for certain
    costs nothing for changing the shift it would have made."""
    from pntm import backends
    from pntm.models.pntm import move_changes

    ops = backends.get("numpy")
    shift = np.array([[[[0.2, 0.3, 0.5]], [[0.5, 0.3, 0.2]]]])  # (1, 2, 1, 3)
    gate = np.array([[[0.5], [0.5]]])
    q0, q1 = np.array([0.1, 0.15, 0.25, 0.5]), np.array([0.25, 0.15, 0.1, 0.5])
    block = {
        "write_shift": shift,
        "write_gate": gate,
        "read_shift": shift,
        "read_gate": np.ones((1, 2, 1)),
    }
    want = ((q1 - q0) ** 2).sum() / 2
    assert move_changes(ops, [block], np.array([[0.0, 1.0]])) == pytest.approx(want)


def test_reset_prior_biases_the_reset_gates():
    """The reset prior is the initial bias of every write and read head's reset-gate logit;
    its default is the prototype's -2, and the content mix keeps its own -2."""
    config = PNTMConfig(vocab_size=5, n_heads=3, content=True, reset_prior=-6.0)
    where = config.controller_slices(0)
    bias = init_params(config, 0)["blocks"][0]["ctrl_b"].reshape(3, -1)
    assert np.all(bias[:, where["write_gate"]] == -6.0)
    assert np.all(bias[:, where["read_gate"]] == -6.0)
    assert np.all(bias[:, where["gamma"]] == -2.0)
    default = PNTMConfig(vocab_size=5, n_heads=3, content=True)
    assert default.reset_prior == -2.0


def test_hard_move_grad_scales_the_gradient_of_hard_moves_only():
    """With hard heads the forward pass does not depend on ``hard_move_grad``; the gradient of
    the controller's shift and reset-gate outputs is scaled by it (exactly 0 at 0), and that of
    its other outputs (erase, add) is unchanged. One block, so that no scaled move lies between
    a parameter and the loss other than its own."""
    torch_ops = checks.float64_torch(scan="sequential")
    base = dict(d_model=8, n_layers=1, n_heads=2, head_dim=3, velocity_prior=1.0)
    data = checks.loss_data(T=9)
    tokens = torch_ops.asarray(data[0])
    logits, grads = {}, {}
    for scale in (0.0, 0.5, 1.0):
        config = PNTMConfig(vocab_size=checks.VOCAB, hard_move_grad=scale, **base)
        model = PNTM(config, torch_ops)
        params = init_params(config, 3)
        logits[scale] = torch_ops.to_numpy(
            model.forward(model.params_from_numpy(params), tokens, 7, heads="hard")
        )
        grads[scale] = checks.native_grads(torch_ops, model, params, data, 7, heads="hard")
    assert np.array_equal(logits[0.0], logits[1.0]) and np.array_equal(logits[0.5], logits[1.0])
    config = PNTMConfig(vocab_size=checks.VOCAB, **base)
    slices = config.controller_slices(0)
    moves = np.zeros(config.controller_width(0), bool)
    for name, where in slices.items():
        moves[where] = name.endswith(("_shift", "_gate"))
    moves = np.tile(moves, config.n_heads)
    for name in ("blocks.0.ctrl_w", "blocks.0.ctrl_b"):
        g0, g5, g1 = (grads[s][name][..., moves] for s in (0.0, 0.5, 1.0))
        assert np.abs(g1).max() > 1e-6  # the moves do get a straight-through gradient at 1
        assert np.all(g0 == 0)
        np.testing.assert_allclose(g5, 0.5 * g1, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            grads[0.0][name][..., ~moves], grads[1.0][name][..., ~moves], rtol=1e-9, atol=1e-12
        )


def test_velocity_prior_needs_a_shift():
    with pytest.raises(ValueError, match=r"velocity_prior 2.0 needs max_shift >= 1"):
        PNTMConfig(vocab_size=5, max_shift=0, velocity_prior=2.0)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(max_shift=0), r"fixed_velocity needs max_shift >= 1"),
        (dict(velocity_prior=2.0), r"velocity_prior 2.0 biases a learned \+1 shift"),
        (dict(fixed_velocity=1), r"fixed_velocity must be true or false, got 1"),
    ],
)
def test_fixed_velocity_bad_configs_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        PNTMConfig(vocab_size=5, **{"fixed_velocity": True, **changes})


@pytest.mark.parametrize("heads", ["soft", "hard"])
def test_fixed_velocity_heads_count_the_tokens_since_their_last_reset(heads):
    """With ``fixed_velocity`` the controller has no shift outputs (narrower by 2 (2S + 1) per
    memory) and draws no shift noise; every head's shift is the one-hot +1, soft or hard, noisy
    or not, so a hard head's slot is its home plus the tokens since its last reset (the first
    token counting from the start)."""
    from pntm import backends

    ops = backends.get("numpy")
    S, K, N, T = 2, 3, 11, 17
    base = dict(vocab_size=checks.VOCAB, d_model=8, n_layers=1, n_heads=K, head_dim=3)
    config = PNTMConfig(**base, max_shift=S, fixed_velocity=True, read_lag=2)
    learned = PNTMConfig(**base, max_shift=S)
    assert "write_shift" not in dict(config.controller_fields(0))
    assert learned.controller_width(0) - config.controller_width(0) == 2 * (2 * S + 1)
    model = PNTM(config, ops)
    params = init_params(config, 0)
    params["blocks"][0]["ctrl_w"] *= 6.0  # spread the reset logits over both signs
    tokens = np.random.default_rng(3).integers(0, checks.VOCAB, (2, T))
    x = ops.take(params["embed"], tokens)
    noise = model.head_noise(np.random.default_rng(0), 2, T, 1.0)
    assert set(noise[0]) == {"write_gate", "read_gate"}
    for draws in (None, noise[0]):
        ctl = model._controls(params["blocks"][0], 0, x, heads, 1.0, draws)
        for head, lag in (("write", 0), ("read", 2)):
            np.testing.assert_array_equal(
                ctl[f"{head}_shift"], np.broadcast_to(np.eye(5)[3], (2, T, K, 5))
            )
            if heads == "soft":
                continue
            resets = ctl[f"{head}_gate"] == 1
            assert resets.any() and not resets.all()
            got = model.head_positions(
                ctl[f"{head}_shift"], ctl[f"{head}_gate"], N, heads="hard", lag=lag
            )
            # tokens since the last reset, or since the start
            since = np.zeros((2, K), dtype=np.int64)
            for t in range(T):
                since = np.where(resets[:, t], 0, since + 1)
                np.testing.assert_array_equal(got[:, t], np.eye(N)[(since - lag) % N])


@pytest.mark.parametrize("heads", ["soft", "hard"])
def test_registers_stay_at_home_and_hold_their_last_write(heads):
    """The last ``registers`` memories of a block keep both heads on slot 0 at every token
    (read lag 0 whatever read_lag is), in the parallel and the step form; with gated writes and
    hard heads the register's read is, per component, the add of the last step that wrote it.
    The other memories' heads move as before."""
    from pntm import backends

    ops = backends.get("numpy")
    K, N, T, D = 3, 9, 11, 4
    config = PNTMConfig(
        vocab_size=checks.VOCAB,
        d_model=8,
        n_layers=1,
        n_heads=K,
        head_dim=D,
        registers=2,
        fixed_velocity=True,
        gated_write=True,
        read_lag=2,
    )
    assert config.read_lags == (2, 0, 0)
    model = PNTM(config, ops)
    params = init_params(config, 0)
    params["blocks"][0]["ctrl_w"] *= 8.0  # spread the gate and erase logits over both signs
    tokens = np.random.default_rng(4).integers(0, checks.VOCAB, (2, T))
    ctl = model._controls(params["blocks"][0], 0, ops.take(params["embed"], tokens), heads, 1.0)
    for head, lag in (("write", 0), ("read", config.read_lags)):
        np.testing.assert_array_equal(ctl[f"{head}_gate"][..., 1:], 1.0)
        positions = model.head_positions(
            ctl[f"{head}_shift"], ctl[f"{head}_gate"], N, heads=heads, lag=lag
        )
        np.testing.assert_allclose(positions[:, :, 1:], np.eye(N)[0] + np.zeros((2, T, 2, N)))
    state = model.init_state(2, N)[0]
    for t in range(T):
        _, step_state = model.step(params, [state], tokens[:, t], heads=heads)
        state = step_state[0]
        for head in ("write", "read"):
            np.testing.assert_allclose(state[head][:, 1:], np.eye(N)[np.zeros((2, 2), int)])
    if heads == "hard":
        erase, add = ctl["erase"][:, :, 1:], ctl["add"][:, :, 1:]
        assert 0 < erase.mean() < 1
        held = np.zeros((2, 2, D))
        for t in range(T):  # last write wins, per component
            held = np.where(erase[:, t] == 1, add[:, t], held)
        np.testing.assert_allclose(state["memory"][:, 1:, 0], held, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"registers 4 must be at most the memories per block"):
        PNTMConfig(vocab_size=5, n_heads=3, registers=4)


def test_overwrite_keeps_the_last_write_of_a_parked_head():
    """With ``overwrite`` a slot holds exactly the last add written to it (erase is 1), in
    both forms: a head parked on one slot is no leaky counter."""
    from pntm import backends

    ops = backends.get("numpy")
    config = PNTMConfig(vocab_size=checks.VOCAB, d_model=8, n_layers=1, n_heads=1, head_dim=3)
    model = PNTM(PNTMConfig(**(config.to_dict() | {"overwrite": True})), ops)
    assert "erase" not in dict(model.config.controller_fields(0))
    params = init_params(model.config, 0)
    tokens = np.random.default_rng(1).integers(0, checks.VOCAB, (2, 9))
    x = ops.take(params["embed"], tokens)
    ctl = model._controls(params["blocks"][0], 0, x, "hard", 1.0)
    assert np.array_equal(ctl["erase"], np.ones_like(ctl["add"]))
    parked = np.zeros((2, 9, 1, 5))
    parked[..., 2] = 1.0  # the write head never leaves slot 2
    _, memory = ops.memory_scan_read(parked, ctl["erase"], ctl["add"], parked, None)
    np.testing.assert_allclose(memory[:, 0, 2], ctl["add"][:, -1, 0], rtol=1e-12)
    state = model.init_state(2, 5)[0]["memory"]
    for t in range(9):
        state = ops.decay_write(state, parked[:, t], ctl["erase"][:, t], ctl["add"][:, t])
    np.testing.assert_allclose(state, memory, rtol=1e-12)


def test_gated_write_is_a_flip_flop_with_hard_heads():
    """With ``gated_write`` and hard heads every erase component is 0 or 1 and the add is
    gated by it, so a parked head's slot holds, per component, the add of the last step that
    wrote it (a flip-flop), in both forms; soft heads keep e in (0, 1)."""
    from pntm import backends

    ops = backends.get("numpy")
    config = PNTMConfig(vocab_size=checks.VOCAB, d_model=8, n_layers=1, n_heads=1, head_dim=4)
    model = PNTM(PNTMConfig(**(config.to_dict() | {"gated_write": True})), ops)
    params = init_params(model.config, 0)
    params["blocks"][0]["ctrl_w"] *= 8.0  # spread the erase logits over both signs
    tokens = np.random.default_rng(1).integers(0, checks.VOCAB, (2, 9))
    x = ops.take(params["embed"], tokens)
    soft = model._controls(params["blocks"][0], 0, x, "soft", 1.0)
    assert np.all((soft["erase"] > 0) & (soft["erase"] < 1))
    ctl = model._controls(params["blocks"][0], 0, x, "hard", 1.0)
    erase = ctl["erase"]
    assert set(np.unique(erase)) == {0.0, 1.0}
    np.testing.assert_array_equal(ctl["add"] == 0, erase == 0)
    parked = np.zeros((2, 9, 1, 5))
    parked[..., 2] = 1.0  # the write head never leaves slot 2
    _, memory = ops.memory_scan_read(parked, erase, ctl["add"], parked, None)
    expected = np.zeros((2, 4))
    for t in range(9):  # last write wins, per component; untouched components stay 0
        expected = np.where(erase[:, t, 0] == 1, ctl["add"][:, t, 0], expected)
    np.testing.assert_allclose(memory[:, 0, 2], expected, rtol=1e-12, atol=1e-15)
    state = model.init_state(2, 5)[0]["memory"]
    for t in range(9):
        state = ops.decay_write(state, parked[:, t], erase[:, t], ctl["add"][:, t])
    np.testing.assert_allclose(state, memory, rtol=1e-12, atol=1e-15)
    noise = model.head_noise(np.random.default_rng(0), 2, 9, 1.0)
    assert noise[0]["erase"].shape == (2, 9, 1, 4)
    with pytest.raises(ValueError, match="overwrite and gated_write exclude each other"):
        PNTMConfig(vocab_size=checks.VOCAB, overwrite=True, gated_write=True)


def test_head_noise_samples_the_heads():
    """Zero noise is no noise; with hard heads the shifts are the argmax of logits + noise."""
    from pntm import backends

    ops = backends.get("numpy")
    model, params = make(ops, "default")
    tokens = np.random.default_rng(2).integers(0, checks.VOCAB, (3, 7))
    plain = model.forward(params, tokens, 8, heads="hard")
    zero = model.head_noise(np.random.default_rng(0), 3, 7, 0.0)
    assert [set(n) for n in zero] == [
        {"write_shift", "write_gate", "read_shift", "read_gate"}
    ] * model.config.n_layers
    assert zero[0]["write_shift"].shape == (3, 7, 2, 3) and zero[0]["read_gate"].shape == (3, 7, 2)
    np.testing.assert_array_equal(model.forward(params, tokens, 8, heads="hard", noise=zero), plain)
    noise = model.head_noise(np.random.default_rng(0), 3, 7, 5.0)
    x = ops.take(params["embed"], tokens)
    block = params["blocks"][0]
    clean = model._controls(block, 0, x, "soft", 1.0)
    noisy = model._controls(block, 0, x, "hard", 1.0, noise[0])
    raw = np.log(clean["write_shift"]) + noise[0]["write_shift"]
    np.testing.assert_array_equal(noisy["write_shift"], np.eye(3)[raw.argmax(-1)])
    assert not np.array_equal(noisy["write_shift"], np.eye(3)[clean["write_shift"].argmax(-1)])
