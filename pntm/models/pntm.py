"""The P-NTM model (``docs/design.md``, "A block"), written once against the backend interface.

token embedding (no positional encoding) -> ``n_layers`` P-NTM blocks -> RMSNorm -> logits.

Each block has ``n_heads`` memories of ``n_slots x head_dim``, each with one write head and one
read head. A pointwise controller (one linear map of the normed input) emits, per head and step,
the shift distributions over ``-max_shift..max_shift`` and reset gates of both heads, the erase
and add vectors, and (option ``content``) a key, strength and mix for content-addressed reads.

Two entry points compute the same function:

* :meth:`PNTM.forward` — the whole sequence at once: each block's recurrences by
  ``Backend.block_scan`` (the heads by a parallel scan in Fourier space over the slot axis, or
  in slot space by a fused kernel; the memory and reads by ``memory_scan_read``, or fused with
  the heads) (``docs/design.md``, "Heads", "Memory and reads");
* :meth:`PNTM.step` — one token, carrying per layer the two head positions and the memory:
  ``Backend.block_step``, the plain recurrence in slot space, O(K N D) per token
  (``docs/design.md``, "The step form").

The number of slots N is the run-time ``capacity`` of the model contract
(:mod:`pntm.models.base`): no parameter depends on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pntm.backends.base import Array, Backend, home_delta, move_head
from pntm.config import check_finite, check_ints, option
from pntm.models.base import Model, ModelConfig, cross_entropy
from pntm.models.layers import (
    dense,
    embedding_and_output,
    embedding_and_output_count,
    mlp,
    mlp_param_count,
    mlp_params,
    output_logits,
    rms_norm,
)

HEAD_MODES = ("soft", "hard")
MIN_TEMPERATURE = 1e-3
ACTIVATIONS = ("tanh", "linear")
Lags = int | tuple[int, ...]  # a home's lag: one for every head, or one per head
CONTENT_MIX_BIAS = -2.0  # content reads start mostly location-addressed (the mix gamma ~ 0.12)


@dataclass(frozen=True)
class PNTMConfig(ModelConfig):
    d_model: int = option(64, "Model width H.", minimum=1)
    n_layers: int = option(2, "P-NTM blocks.", flag="layers", minimum=1)
    n_heads: int = option(
        2,
        "Memories per block (K), each with a write and a read head.",
        flag="memory-heads",
        minimum=1,
    )
    head_dim: int = option(16, "Width D of a memory slot.", minimum=1)
    max_shift: int = option(1, "Heads move by -S..S slots per step.", minimum=0)
    mlp_ratio: int = option(2, "Hidden width of the MLP, in multiples of the width.", minimum=1)
    content: bool = option(
        False, "Content-addressed reads (SPEC §2); the task's recipe turns them on where needed."
    )
    add_activation: str = option("tanh", "Activation of the add vector.", choices=ACTIVATIONS)
    # Velocity prior: added at initialization to the controller bias of the +1 shift of every
    # write and read head, so that a fresh head moves +1 per step with probability
    # e^v / (e^v + 2S) (1/3 at v = 0, 0.79 at v = 2 for S = 1). Only the initial parameters
    # change; the model computes the same function of its parameters (SPEC §7).
    velocity_prior: float = option(
        0.0,
        "Initial bias of every head's +1 shift logit: a fresh head moves +1 per step with "
        "probability e^v / (e^v + 2S).",
    )
    # Every write replaces what its head points at (erase fixed to 1, no erase output): a head
    # parked on one slot then holds the last write, not a leaky sum of all of them (the
    # length-dependent counter shortcut of SPEC §7).
    overwrite: bool = option(
        False, "Every write replaces its slot's content (erase fixed to 1), no learned erase."
    )
    # Gated writes: the erase vector e is also the write strength (add <- e * add), so a write
    # blends toward the add rather than adding to the slot. With hard heads e is snapped to
    # 0/1 (straight-through), so each slot component is either replaced or kept: exact
    # flip-flops, which can hold a value across steps where overwrite cannot, and no
    # accumulator. Training noise on heads also samples e (binary concrete).
    gated_write: bool = option(
        False,
        "The erase is also the write strength (add <- erase * add), snapped to 0/1 with hard "
        "heads: each write replaces or keeps a slot (a flip-flop).",
    )
    # The head schedule of training (the "st40" recipe of the prototype, SPEC §7): soft heads
    # for the first ``hard_from`` fraction of the updates, then straight-through hard heads,
    # which are also the heads decoding uses.
    hard_from: float = option(
        0.4,
        "Fraction of the training steps after which heads are straight-through hard (exact "
        "one-hot shifts, 0/1 gates, soft gradients); 1 keeps them soft throughout. Decoding "
        "uses the heads of the last step.",
        minimum=0,
        maximum=1,
    )
    # During the soft phase, add this weight times the loss of the same batch with hard
    # (straight-through) heads: the soft circuit is pushed toward one that still works once
    # its heads are hardened.
    hard_mix: float = option(
        0.0,
        "Before hard_from, add this weight times the loss of the same batch with hard heads.",
        minimum=0,
    )
    # Gumbel (shifts) and logistic (gates) noise of this scale on the head logits at step 0,
    # decaying linearly to 0 at ``noise_until`` x steps: sampled heads, so that a circuit
    # cannot lean on the blur of soft heads, and hard heads explore other moves.
    head_noise: float = option(
        0.0,
        "Scale of Gumbel noise on the shift logits and logistic noise on the gate logits in "
        "training (sampled heads), decaying linearly to 0 at noise_until.",
        minimum=0,
    )
    noise_until: float = option(
        0.5,
        "Fraction of the training steps at which the head noise reaches 0.",
        minimum=0,
        maximum=1,
        min_open=True,
    )

    # A read head's home (start and reset slot) one or more slots behind the write head's: a
    # read head that moves with its write head then reads the token written read_lag steps
    # earlier (the "previous token" of an induction circuit). Without it the two heads can
    # only drift apart by moving differently at some step, which a controller that sees only
    # the current token cannot time (research log §11). w_0 and the reset target become
    # delta_{-lag}, whose DFT is exp(2 pi i k lag / N): the head scan stays affine (SPEC §3).
    read_lag: int = option(
        0,
        "Read heads start at and reset to slot -read_lag (mod N), write heads at slot 0: a "
        "read head moving with its write head reads what was written read_lag steps earlier.",
        minimum=0,
    )
    # Staggered homes: read head k of a block lags read_lag + k * read_lag_step slots, so K read
    # heads moving together see a window of the last K written tokens at once (the lagged
    # operand bits a_i, a_(i-1), a_(i-2) of a column sum). The same DFT argument, one home per
    # head: still affine.
    read_lag_step: int = option(
        0,
        "Read head k (0..K-1) of each block starts at and resets to slot -(read_lag + k x "
        "read_lag_step): K heads moving together read a window of the last K writes.",
        minimum=0,
    )

    # Blocks below this index read by location only. Where a lower block could also read by
    # content, training found the shortcut of reading the sequence's values by content (a bag
    # of values) instead of the previous-token read the block above needs (research log §13).
    content_from_block: int = option(
        0,
        "With content reads: blocks below this index (0-based) read by location only, "
        "blocks from it on by location and content.",
        minimum=0,
    )
    # The reset gates' counterpart of the velocity prior (the prototype's -2: sigma = 0.12).
    # With hard heads a head resets where its logit is > 0; a controller initialized with
    # unit-scale logits resets some heads on some tokens unless this is well below 0.
    reset_prior: float = option(
        -2.0,
        "Initial bias of every head's reset-gate logit: a fresh head resets with probability "
        "1 / (1 + e^-r).",
    )
    # Constant-velocity heads: no shift outputs; every head moves +1 on every token and learns
    # only when to reset, so its position is the number of tokens since its last reset (plus
    # its home). This rules out the heads that walk with the data or stand still on some
    # tokens (research log §12) while keeping the resets an aligned read needs (a read head
    # that restarts at a separator); on binary multiplication it raised exact match at 8x
    # (research log §16).
    fixed_velocity: bool = option(
        False,
        "Every head moves +1 slot on every token (no shift outputs) and learns only its reset "
        "gate: a head's position counts the tokens since its last reset.",
    )
    # Registers: with fixed_velocity every head moves, so a value read at every output step
    # (the multiplier of binary multiplication) can only be held by a head that resets on every
    # token, which training has to find (research log §16). These memories' heads stay at home
    # (slot 0, read lag 0) by construction; with gated writes each is a bank of flip-flops.
    registers: int = option(
        0,
        "The last this many memories of each block are registers: their write and read heads "
        "stay on slot 0 (reset on every token, no read lag).",
        minimum=0,
    )
    # How much gradient hard moves pass back. Straight-through (1) sums the position gradients
    # of every later step into each hard shift, which swamps the rest of the gradient
    # (research log §11); 0 keeps the moves the priors start with and trains the rest of the
    # model around them (research log §13).
    hard_move_grad: float = option(
        1.0,
        "Scale of the gradient that hard head moves (shifts and reset gates) pass back: 1 = "
        "straight-through, 0 = none (the moves stay those of the priors).",
        minimum=0,
    )

    # Scalable softmax (Nakanishi 2025) on content reads: a content read is a softmax over all N
    # slots (unwritten ones compete at cosine 0), so the weight left on the wrong slots grows
    # with N at a fixed strength. Scaling beta by ln N keeps a read learned at N slots as sharp
    # at more: n wrong slots at a cosine gap x hold ~ n^(1 - beta x) of the weight (research
    # log §14).
    content_log_scale: bool = option(
        False,
        "With content reads: the content strength is multiplied by ln N (N memory slots), so "
        "content reads stay as sharp when the memory grows (scalable softmax).",
    )
    # A head whose move follows the data (a counter of 0 bits, a walk with the output bits)
    # addresses slots whose contents training shows only at small counts (research log §12).
    # This charges each change of a head's move between consecutive tokens, so that heads
    # keep one move per phase: alone it made no more multiplication seeds exact (research log
    # §15); with fixed_velocity and registers it keeps resets at the separators (§16).
    move_change_cost: float = option(
        0.0,
        "Weight of a training penalty on head moves that change from one token to the next: "
        "half the squared distance between consecutive moves as made (shifts and reset; "
        "one-hot once heads are hard), summed over heads and tokens, per target token.",
        minimum=0,
    )

    def __post_init__(self) -> None:
        check_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "mlp_ratio"))
        check_ints(
            self, ("max_shift", "read_lag", "read_lag_step", "content_from_block", "registers"), 0
        )
        if self.registers > self.n_heads:
            raise ValueError(
                f"registers {self.registers} must be at most the memories per block "
                f"(n_heads {self.n_heads})"
            )
        check_finite(self.velocity_prior, "velocity_prior")
        check_finite(self.reset_prior, "reset_prior")
        check_finite(self.hard_move_grad, "hard_move_grad", 0)
        if self.fixed_velocity and self.max_shift < 1:
            raise ValueError("fixed_velocity needs max_shift >= 1 (heads move +1 on every token)")
        if self.fixed_velocity and self.velocity_prior:
            raise ValueError(
                f"velocity_prior {self.velocity_prior} biases a learned +1 shift; with "
                "fixed_velocity every head moves +1 already: leave it at 0"
            )
        if self.velocity_prior and self.max_shift < 1:
            raise ValueError(
                f"velocity_prior {self.velocity_prior} needs max_shift >= 1 (a +1 shift to bias)"
            )
        for name in ("content", "overwrite", "gated_write", "content_log_scale", "fixed_velocity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.overwrite and self.gated_write:
            raise ValueError(
                "overwrite and gated_write exclude each other: overwrite fixes the erase to 1, "
                "gated_write learns it as a 0/1 write gate"
            )
        if self.add_activation not in ACTIVATIONS:
            raise ValueError(
                f"add_activation must be one of {ACTIVATIONS}, got {self.add_activation!r}"
            )
        check_finite(self.hard_from, "hard_from", 0, 1)
        check_finite(self.hard_mix, "hard_mix", 0)
        check_finite(self.move_change_cost, "move_change_cost", 0)
        check_finite(self.head_noise, "head_noise", 0)
        check_finite(self.noise_until, "noise_until", 0, 1, low_open=True)
        if self.content_from_block and not self.content:
            raise ValueError(
                f"content_from_block {self.content_from_block} needs content reads (content)"
            )
        if self.content_log_scale and not self.content:
            raise ValueError("content_log_scale needs content reads (content)")
        if self.content and self.content_from_block >= self.n_layers:
            raise ValueError(
                f"content_from_block {self.content_from_block} leaves none of the "
                f"{self.n_layers} blocks reading by content: it must be < n_layers"
            )

    def reads_content(self, block: int) -> bool:
        """Whether block ``block`` (0-based) reads by content as well as by location."""
        return self.content and block >= self.content_from_block

    @property
    def read_lags(self) -> tuple[int, ...]:
        """Each read head's lag: how many slots behind slot 0 its home is (0 for registers)."""
        return tuple(
            self.read_lag + k * self.read_lag_step if k < self.tapes else 0
            for k in range(self.n_heads)
        )

    @property
    def tapes(self) -> int:
        """The memories of a block whose heads move: all but the last ``registers``."""
        return self.n_heads - self.registers

    def summary(self) -> str:
        return f"{self.n_layers} blocks x {self.n_heads} memories"

    # ------------------------------------------------------------------ head schedule
    def heads_at(self, step: int, steps: int) -> str:
        """Head mode of training update ``step`` (0-based) of ``steps``."""
        return "hard" if step >= self.hard_from * steps else "soft"

    def noise_at(self, step: int, steps: int) -> float:
        """Scale of the head noise at update ``step``: linear decay to 0 at noise_until."""
        return self.head_noise * max(0.0, 1 - step / (self.noise_until * steps))

    @property
    def n_shifts(self) -> int:
        return 2 * self.max_shift + 1

    def controller_fields(self, block: int) -> list[tuple[str, int]]:
        """Per-head slices of block ``block``'s controller output, in order."""
        D = self.head_dim
        shift = [] if self.fixed_velocity else [("shift", self.n_shifts)]
        write, read = ([(f"{head}_{name}", n) for name, n in shift] for head in ("write", "read"))
        out = [
            *write,
            ("write_gate", 1),
            *([] if self.overwrite else [("erase", D)]),
            ("add", D),
            *read,
            ("read_gate", 1),
        ]
        if self.reads_content(block):
            out += [("key", D), ("beta", 1), ("gamma", 1)]
        return out

    def controller_width(self, block: int) -> int:
        """Width of one head's controller output in block ``block``: its fields summed."""
        return sum(n for _, n in self.controller_fields(block))

    def controller_slices(self, block: int) -> dict[str, slice]:
        """Where each of :meth:`controller_fields` lies in one head's controller output."""
        slices, offset = {}, 0
        for name, n in self.controller_fields(block):
            slices[name] = slice(offset, offset + n)
            offset += n
        return slices


def init_params(config: PNTMConfig, seed: int = 0) -> dict[str, Any]:
    """Parameters as a nested dict of float64 NumPy arrays: identical for every backend."""
    rng = np.random.default_rng(seed)
    H, V, K = config.d_model, config.vocab_size, config.n_heads
    hidden = config.mlp_ratio * H
    blocks = []
    for index in range(config.n_layers):
        bias = _controller_bias(config, index)
        blocks.append(
            {
                "norm_ctrl": np.ones(H),
                "ctrl_w": dense(rng, H, bias.size),
                "ctrl_b": bias,
                "read_out": dense(rng, K * config.head_dim, H),
                **mlp_params(rng, H, hidden),
            }
        )
    embed, output = embedding_and_output(rng, V, H)
    return {"embed": embed, "blocks": blocks, **output}


def parameter_count(config: PNTMConfig) -> int:
    """The numbers of :func:`init_params`, without drawing them."""
    H, K = config.d_model, config.n_heads
    total = embedding_and_output_count(config.vocab_size, H)
    for index in range(config.n_layers):
        width = K * config.controller_width(index)  # the controller's outputs
        total += H + H * width + width + K * config.head_dim * H
        total += mlp_param_count(H, config.mlp_ratio * H)
    return total


def _controller_bias(config: PNTMConfig, block: int) -> np.ndarray:
    """The initial controller bias of one block (K x its fields, flat): the velocity and reset
    priors on the heads, the content mix mostly off, the rest 0."""
    slices = config.controller_slices(block)
    bias = np.zeros((config.n_heads, config.controller_width(block)))
    for head in ("write", "read"):
        bias[:, slices[f"{head}_gate"]] = config.reset_prior
        if not config.fixed_velocity:  # shifts -S..S: +1 is at index S + 1
            bias[:, slices[f"{head}_shift"].start + config.max_shift + 1] = config.velocity_prior
    if "gamma" in slices:
        bias[:, slices["gamma"]] = CONTENT_MIX_BIAS
    return bias.reshape(-1)


@dataclass(frozen=True)
class PNTMDecoding:
    """How a trained P-NTM decodes (``pntm eval`` options)."""

    heads: str = option(
        "auto",
        "Head mode: auto = the mode of the checkpoint's last training step.",
        choices=("auto", *HEAD_MODES),
    )
    temperature: float = option(
        1.0, "Temperature of the shift and gate logits (soft heads).", minimum=MIN_TEMPERATURE
    )


class PNTM(Model):
    """A P-NTM bound to a backend. Parameters are passed in (functional style);
    ``capacity`` is the number of memory slots N."""

    name = "pntm"
    description = "Parallelizable Neural Turing Machine (parallel scans, constant-time decoding)"
    config_class = PNTMConfig
    has_memory = True
    decode_options = PNTMDecoding

    def __init__(self, config: PNTMConfig, ops: Backend) -> None:
        super().__init__(config, ops)
        # 1 for the heads that move, 0 for the registers' (the last ``registers`` memories)
        self._tapes = ops.asarray((np.arange(config.n_heads) < config.tapes).astype(float))
        # the one move of fixed_velocity heads: the one-hot of shift +1 among -S..S
        self._plus_one = (
            ops.asarray(np.arange(config.n_shifts) == config.max_shift + 1, ops.float_dtype)
            if config.fixed_velocity
            else None
        )

    @staticmethod
    def init_params(config: PNTMConfig, seed: int = 0) -> dict[str, Any]:
        return init_params(config, seed)

    @staticmethod
    def parameter_count(config: PNTMConfig) -> int:
        return parameter_count(config)

    # ------------------------------------------------------------------ schedule and modes
    def train_mode(self, step: int, steps: int) -> dict[str, Any]:
        return {"heads": self.config.heads_at(step, steps)}

    def train_noise(
        self, rng: np.random.Generator, batch: int, length: int, step: int, steps: int
    ) -> list[dict[str, Array]] | None:
        scale = self.config.noise_at(step, steps)
        return self.head_noise(rng, batch, length, scale) if scale else None

    def train_metrics(self, step: int, steps: int) -> dict[str, Any]:
        c = self.config
        return {"heads": c.heads_at(step, steps), "head_noise": c.noise_at(step, steps)}

    def describe_schedule(self, steps: int) -> str:
        hard_step = int(np.ceil(self.config.hard_from * steps))
        return f"hard heads from step {hard_step}" if hard_step < steps else ""

    def loss(
        self,
        params: Any,
        tokens: Array,
        labels: Array,
        mask: Array,
        capacity: int,
        mode: dict[str, Any],
        noise: Any = None,
    ) -> tuple[Array, Array]:
        c = self.config
        logits, _, controls = self._forward(params, tokens, capacity, noise=noise, **mode)
        loss = cross_entropy(self.ops, logits, labels, mask)
        if c.move_change_cost:
            changes = move_changes(self.ops, controls, mask)
            loss = loss + c.move_change_cost * changes / self.ops.sum(mask)
        if c.hard_mix and mode.get("heads") == "soft":
            hard = self.forward(params, tokens, capacity, heads="hard", noise=noise)
            loss = loss + c.hard_mix * cross_entropy(self.ops, hard, labels, mask)
        return loss, logits

    def decode_mode(self, step: int, steps: int, **overrides: Any) -> dict[str, Any]:
        options = PNTMDecoding(**overrides)
        heads = options.heads
        if heads == "auto":  # the heads of the last training update
            heads = self.config.heads_at(max(step - 1, 0), steps)
        _check_heads(heads, options.temperature)
        return {"heads": heads, "temperature": options.temperature}

    def memory_per_sequence(self, length: int, capacity: int, training: bool) -> int | None:
        # the (T, K, N) head positions and their Fourier transforms in every block dominate;
        # peaks measured on the CPU at T = N = 256..1024 were 31-46 (training) and 5.4-7.4
        # (forward) times T K N float32s per block with PyTorch, 41 and 11 with MLX
        c = self.config
        per_block = length * c.n_heads * capacity * 4
        return (48 if training else 12) * per_block * c.n_layers

    # ------------------------------------------------------------------ state
    def init_state(self, batch: int, capacity: int) -> list[dict[str, Array]]:
        """Heads at home (write heads on slot 0, read heads their lags behind), memories
        empty: the state before the first token."""
        n_slots = capacity
        _check_slots(n_slots)
        c, ops = self.config, self.ops
        at_home = np.zeros((batch, c.n_heads, 1))
        return [
            {
                "write": ops.asarray(at_home + home_delta(n_slots, 0)),
                "read": ops.asarray(at_home + home_delta(n_slots, c.read_lags)),
                "memory": ops.asarray(np.zeros((batch, c.n_heads, n_slots, c.head_dim))),
            }
            for _ in range(c.n_layers)
        ]

    # ------------------------------------------------------------------ shared pointwise parts

    def _controls(
        self,
        block: dict,
        index: int,
        x: Array,
        heads: str,
        temperature: float,
        noise: dict[str, Array] | None = None,
    ) -> dict[str, Array]:
        """Controller outputs per head of block number ``index`` for inputs ``x`` (..., H):
        shapes (..., K, width).

        ``noise`` (training only) is added to the shift and gate logits of both heads: Gumbel
        noise makes the shifts Gumbel-softmax samples and logistic noise the gates binary
        concrete samples (with hard heads: exact samples of the discrete moves)."""
        ops, c = self.ops, self.config
        raw = ops.project(rms_norm(ops, x, block["norm_ctrl"]), block["ctrl_w"]) + block["ctrl_b"]
        raw = ops.reshape(raw, (*x.shape[:-1], c.n_heads, -1))
        out = {name: raw[..., where] for name, where in c.controller_slices(index).items()}
        for head in ("write", "read"):
            gate_logits = out[f"{head}_gate"][..., 0]
            if noise is not None:
                gate_logits = gate_logits + noise[f"{head}_gate"]
            gate = ops.sigmoid(gate_logits / temperature)
            if heads == "hard":  # exact 0-1 forward, (scaled) soft gradient
                gate = _straight_through_step(ops, gate, c.hard_move_grad)
            if c.registers:  # registers reset on every token: they stay at home
                gate = gate * self._tapes + (1 - self._tapes)
            if c.fixed_velocity:
                shift = ops.zeros_like(gate)[..., None] + self._plus_one
            else:
                shift_logits = out[f"{head}_shift"]
                if noise is not None:
                    shift_logits = shift_logits + noise[f"{head}_shift"]
                shift = ops.softmax(shift_logits / temperature, axis=-1)
                if heads == "hard":  # exact one-hot forward, (scaled) soft gradient
                    shift = _straight_through_one_hot(ops, shift, c.hard_move_grad)
            out[f"{head}_shift"], out[f"{head}_gate"] = shift, gate
        if c.overwrite:
            out["erase"] = ops.ones_like(out["add"])
        elif c.gated_write:
            logits = out["erase"] if noise is None else out["erase"] + noise["erase"]
            erase = ops.sigmoid(logits)
            if heads == "hard":
                erase = _straight_through_step(ops, erase)
            out["erase"] = erase
        else:
            out["erase"] = ops.sigmoid(out["erase"])
        if c.add_activation == "tanh":
            out["add"] = ops.tanh(out["add"])
        if c.gated_write:
            out["add"] = out["erase"] * out["add"]
        if c.reads_content(index):
            out["beta"] = ops.softplus(out["beta"][..., 0])
            out["gamma"] = ops.sigmoid(out["gamma"][..., 0])
        return out

    def _content(
        self, ctl: dict[str, Array], n_slots: int
    ) -> tuple[Array | None, Array | None, Array | None]:
        """The key, strength and mix of a block's content reads over ``n_slots`` slots (None for
        a block that reads by location only)."""
        if "key" not in ctl:
            return None, None, None
        beta = ctl["beta"] * math.log(n_slots) if self.config.content_log_scale else ctl["beta"]
        return ctl["key"], beta, ctl["gamma"]

    def _residual(self, block: dict, x: Array, reads: Array) -> Array:
        ops, c = self.ops, self.config
        reads = ops.reshape(reads, (*reads.shape[:-2], c.n_heads * c.head_dim))
        x = x + ops.project(reads, block["read_out"])
        return x + mlp(ops, block, x)

    # ------------------------------------------------------------------ parallel form
    def head_positions(
        self,
        shift: Array,
        gate: Array,
        n_slots: int,
        start: Array | None = None,
        heads: str = "soft",
        lag: Lags = 0,
    ) -> Array:
        """All head distributions ``w_t`` (B, T, K, N) of the head recurrence
        (``Backend.head_scan``: in Fourier space by a parallel scan, or in slot space by a fused
        kernel), from ``start`` or, without it, the home ``delta_{-lag}``; ``lag`` is one lag
        for every head or one per head. With hard heads every ``w_t`` is exactly one-hot: the
        parallel form is exactly the discrete machine that :meth:`step` runs."""
        return self.ops.head_scan(shift, gate, n_slots, start, lag, hard=heads == "hard")

    def forward(
        self,
        params: dict,
        tokens: Array,
        capacity: int,
        state: list[dict[str, Array]] | None = None,
        return_state: bool = False,
        heads: str = "soft",
        temperature: float = 1.0,
        noise: list[dict[str, Array]] | None = None,
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        """Logits (B, T, V) for tokens (B, T), all positions at once, with ``capacity`` = N
        memory slots.

        ``state`` continues from an earlier call (or :meth:`step`); ``return_state`` also returns
        the state after the last token, so that decoding can go on with :meth:`step`.
        ``noise`` (one dict per block, from :meth:`head_noise`) samples the heads in training.
        """
        logits, new_state, _ = self._forward(
            params, tokens, capacity, state, heads, temperature, noise
        )
        return (logits, new_state) if return_state else logits

    def _forward(
        self,
        params: dict,
        tokens: Array,
        capacity: int,
        state: list[dict[str, Array]] | None = None,
        heads: str = "soft",
        temperature: float = 1.0,
        noise: list[dict[str, Array]] | None = None,
    ) -> tuple[Array, list[dict[str, Array]], list[dict[str, Array]]]:
        """:meth:`forward`'s logits and state, and every block's controller outputs."""
        n_slots = capacity
        _check_slots(n_slots)
        _check_heads(heads, temperature)
        ops = self.ops
        x = ops.take(params["embed"], tokens)
        new_state, controls = [], []
        for i, block in enumerate(params["blocks"]):
            ctl = self._controls(block, i, x, heads, temperature, noise[i] if noise else None)
            controls.append(ctl)
            prev = state[i] if state is not None else {}
            key, beta, gamma = self._content(ctl, n_slots)
            reads, memory, write, read = ops.block_scan(
                ctl["write_shift"],
                ctl["write_gate"],
                ctl["read_shift"],
                ctl["read_gate"],
                ctl["erase"],
                ctl["add"],
                n_slots,
                prev.get("write"),
                prev.get("read"),
                prev.get("memory"),
                self.config.read_lags,
                heads == "hard",
                key,
                beta,
                gamma,
            )
            x = self._residual(block, x, reads)
            new_state.append({"write": write, "read": read, "memory": memory})
        return output_logits(ops, params, x), new_state, controls

    def head_noise(
        self, rng: np.random.Generator, batch: int, length: int, scale: float
    ) -> list[dict[str, Array]]:
        """``scale`` x Gumbel noise for the shift logits and ``scale`` x logistic noise (the
        difference of two Gumbels) for the gate logits, per block, head and position; with
        ``gated_write`` also logistic noise for the erase (write gate) logits."""
        c, ops = self.config, self.ops
        shape = (batch, length, c.n_heads)
        out = []
        for _ in range(c.n_layers):
            draws = {}
            for head in ("write", "read"):
                if not c.fixed_velocity:
                    draws[f"{head}_shift"] = scale * rng.gumbel(size=(*shape, c.n_shifts))
                draws[f"{head}_gate"] = scale * rng.logistic(size=shape)
            if c.gated_write:
                draws["erase"] = scale * rng.logistic(size=(*shape, c.head_dim))
            out.append({k: ops.asarray(v) for k, v in draws.items()})
        return out

    # ------------------------------------------------------------------ recurrent (step) form
    def move_head(self, position: Array, shift: Array, gate: Array, lag: Lags = 0) -> Array:
        """``w_t = (1 - g) (s ⊛ w_{t-1}) + g delta_{-lag}`` in slot space; ``lag``: one for
        every head or one per head (``pntm.backends.base.move_head``)."""
        return move_head(self.ops, position, shift, gate, lag)

    def step(
        self,
        params: dict,
        state: list[dict[str, Array]],
        token: Array,
        heads: str = "soft",
        temperature: float = 1.0,
    ) -> tuple[Array, list[dict[str, Array]]]:
        """Logits (B, V) for one token per sequence (B,), and the next state."""
        _check_heads(heads, temperature)
        ops = self.ops
        x = ops.take(params["embed"], token)
        new_state = []
        for i, (block, prev) in enumerate(zip(params["blocks"], state, strict=True)):
            ctl = self._controls(block, i, x, heads, temperature)
            reads, memory, write, read = ops.block_step(
                prev["write"],
                prev["read"],
                prev["memory"],
                ctl["write_shift"],
                ctl["write_gate"],
                ctl["read_shift"],
                ctl["read_gate"],
                ctl["erase"],
                ctl["add"],
                self.config.read_lags,
                *self._content(ctl, prev["memory"].shape[-2]),
            )
            x = self._residual(block, x, reads)
            new_state.append({"write": write, "read": read, "memory": memory})
        return output_logits(ops, params, x), new_state


def move_changes(ops: Backend, controls: list[dict[str, Array]], mask: Array) -> Array:
    """Sum over blocks, heads, sequences and consecutive tokens of half the squared distance
    between a head's moves q_{t-1} and q_t as the forward pass makes them, q = ((1 - g) s, g)
    over the shifts s and the reset g: noisy samples while the heads are noisy, exact one-hot
    moves (with their straight-through gradient) once they are hard, so that a head cannot
    hide a change of its hard move behind flat logits. Tokens after the sequence's end are left
    out: a token is in the sequence while ``mask`` (the loss's, (B, T)) has a 1 at it or after
    it, since the last label that counts is the sequence's END. A change between two certain
    moves counts 1."""
    T = mask.shape[1]
    after = ops.asarray(np.tril(np.ones((T, T))))  # [s, t] = 1 where s >= t
    kept = ops.where(ops.matmul(mask, after) > 0, ops.ones_like(mask), ops.zeros_like(mask))
    kept = kept[:, 1:, None]  # (B, T - 1, 1): the pair (t - 1, t) counts where t does
    total = 0.0
    for ctl in controls:
        for head in ("write", "read"):
            gate = ctl[f"{head}_gate"][..., None]
            move = ops.concat([(1 - gate) * ctl[f"{head}_shift"], gate], axis=-1)
            step = move[:, 1:] - move[:, :-1]
            total = total + ops.sum(ops.sum(step * step, axis=-1) * kept) / 2
    return total


def _straight_through_one_hot(ops: Backend, probs: Array, scale: float = 1.0) -> Array:
    """The one-hot of the argmax of ``probs`` (last axis) in the forward pass, ``scale`` x the
    gradient of ``probs`` in the backward pass."""
    hard = ops.one_hot(ops.argmax(probs, -1), probs.shape[-1])
    return _with_gradient_of(ops, hard, probs, scale)


def _straight_through_step(ops: Backend, probs: Array, scale: float = 1.0) -> Array:
    """``probs > 0.5`` as 0/1 in the forward pass, ``scale`` x the gradient of ``probs`` in the
    backward pass."""
    hard = ops.where(probs > 0.5, ops.ones_like(probs), ops.zeros_like(probs))
    return _with_gradient_of(ops, hard, probs, scale)


def _with_gradient_of(ops: Backend, hard: Array, probs: Array, scale: float) -> Array:
    """``hard`` in the forward pass, ``scale`` x the gradient of ``probs`` in the backward."""
    if scale == 0:
        return ops.stop_gradient(hard)
    return hard + scale * (probs - ops.stop_gradient(probs))


def _check_slots(n_slots: int) -> None:
    if not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
        raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")


def _check_heads(heads: str, temperature: float) -> None:
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    # below 1e-3 the logits / temperature of float32 backends overflow to inf, and NaN heads
    check_finite(temperature, "temperature", MIN_TEMPERATURE)
