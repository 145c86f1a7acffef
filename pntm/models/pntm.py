"""The P-NTM model (SPEC §2), written once against the backend interface.

token embedding (no positional encoding) -> ``n_layers`` P-NTM blocks -> RMSNorm -> logits.

Each block has ``n_heads`` memories of ``n_slots x head_dim``, each with one write head and one
read head. A pointwise controller (one linear map of the normed input) emits, per head and step,
the shift distributions over ``-max_shift..max_shift`` and reset gates of both heads, the erase
and add vectors, and (option ``content``) a key, strength and mix for content-addressed reads.

Two entry points compute the same function:

* :meth:`PNTM.forward` — the whole sequence at once: head positions by a linear scan in Fourier
  space over the slot axis (SPEC §3), memory and reads by ``memory_scan_read``;
* :meth:`PNTM.step` — one token, carrying per layer the two head positions and the memory:
  the plain recurrence of SPEC §2 (circular convolution in slot space), O(K N D) per token.

``n_slots`` is a runtime argument: no parameter depends on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pntm.backends.base import Array, Backend, read_step
from pntm.config import config_from_dict
from pntm.tree import tree_map

HEAD_MODES = ("soft", "hard")
RMS_EPS = 1e-5
RESET_GATE_BIAS = -2.0  # heads start mostly moving, rarely resetting (prototype setting)


@dataclass(frozen=True)
class PNTMConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2  # K: memories (each with a write and a read head) per layer
    head_dim: int = 16  # D: width of a memory slot
    max_shift: int = 1  # S: shifts -S..S
    mlp_ratio: int = 2
    content: bool = False  # content-addressed reads (SPEC §2), off by default
    add_activation: str = "tanh"  # "tanh" or "linear"
    # Velocity prior: added at initialization to the controller bias of the +1 shift of every
    # write and read head, so that a fresh head moves +1 per step with probability
    # e^v / (e^v + 2S) (1/3 at v = 0, 0.79 at v = 2 for S = 1). Only the initial parameters
    # change; the model computes the same function of its parameters (SPEC §7).
    velocity_prior: float = 0.0
    # Every write replaces what its head points at (erase fixed to 1, no erase output): a head
    # parked on one slot then holds the last write, not a leaky sum of all of them (the
    # length-dependent counter shortcut of SPEC §7).
    overwrite: bool = False
    # Gated writes: the erase vector e is also the write strength (add <- e * add), so a write
    # blends toward the add rather than adding to the slot. With hard heads e is snapped to
    # 0/1 (straight-through), so each slot component is either replaced or kept: exact
    # flip-flops, which can hold a value across steps where overwrite cannot, and no
    # accumulator. Training noise on heads also samples e (binary concrete).
    gated_write: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be an integer >= 0, got {self.max_shift!r}")
        if not isinstance(self.velocity_prior, (int, float)) or not np.isfinite(
            self.velocity_prior
        ):
            raise ValueError(f"velocity_prior must be a finite number, got {self.velocity_prior!r}")
        if self.velocity_prior and self.max_shift < 1:
            raise ValueError(
                f"velocity_prior {self.velocity_prior} needs max_shift >= 1 (a +1 shift to bias)"
            )
        for name in ("overwrite", "gated_write"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.overwrite and self.gated_write:
            raise ValueError(
                "overwrite and gated_write exclude each other: overwrite fixes the erase to 1, "
                "gated_write learns it as a 0/1 write gate"
            )
        if self.add_activation not in ("tanh", "linear"):
            raise ValueError(
                f"add_activation must be 'tanh' or 'linear', got {self.add_activation!r}"
            )

    @property
    def n_shifts(self) -> int:
        return 2 * self.max_shift + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PNTMConfig:
        return config_from_dict(cls, data, "P-NTM config")

    def controller_fields(self) -> list[tuple[str, int]]:
        """Per-head slices of the controller output, in order."""
        S, D = self.n_shifts, self.head_dim
        out = [
            ("write_shift", S),
            ("write_gate", 1),
            *([] if self.overwrite else [("erase", D)]),
            ("add", D),
            ("read_shift", S),
            ("read_gate", 1),
        ]
        if self.content:
            out += [("key", D), ("beta", 1), ("gamma", 1)]
        return out


def init_params(config: PNTMConfig, seed: int = 0) -> dict[str, Any]:
    """Parameters as a nested dict of float64 NumPy arrays: identical for every backend."""
    rng = np.random.default_rng(seed)
    H, V, K = config.d_model, config.vocab_size, config.n_heads

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out))

    per_head = config.controller_fields()
    width = sum(n for _, n in per_head)
    bias = np.zeros((K, width))
    offset = 0
    for name, n in per_head:
        if name in ("write_gate", "read_gate", "gamma"):
            bias[:, offset : offset + n] = RESET_GATE_BIAS
        if name in ("write_shift", "read_shift"):  # shifts -S..S: +1 is at index S + 1
            bias[:, offset + config.max_shift + 1] = config.velocity_prior
        offset += n
    hidden = config.mlp_ratio * H
    blocks = [
        {
            "norm_ctrl": np.ones(H),
            "ctrl_w": dense(H, K * width),
            "ctrl_b": bias.reshape(-1).copy(),
            "read_out": dense(K * config.head_dim, H),
            "norm_mlp": np.ones(H),
            "mlp_w1": dense(H, hidden),
            "mlp_b1": np.zeros(hidden),
            "mlp_w2": dense(hidden, H),
            "mlp_b2": np.zeros(H),
        }
        for _ in range(config.n_layers)
    ]
    return {
        "embed": rng.normal(0.0, 1.0, (V, H)),
        "blocks": blocks,
        "norm_out": np.ones(H),
        "unembed": dense(H, V),
    }


class PNTM:
    """A P-NTM bound to a backend. Parameters are passed in (functional style)."""

    def __init__(self, config: PNTMConfig, ops: Backend) -> None:
        self.config = config
        self.ops = ops
        self._twiddles: dict[int, tuple[Array, Array]] = {}
        self._delta0: dict[int, Array] = {}

    # ------------------------------------------------------------------ parameters and state
    def params_from_numpy(self, params: Any) -> Any:
        return tree_map(lambda p: self.ops.asarray(p), params)

    def init_state(self, batch: int, n_slots: int) -> list[dict[str, Array]]:
        """Heads on slot 0, memories empty: the state before the first token."""
        _check_slots(n_slots)
        c, ops = self.config, self.ops
        delta = np.zeros((batch, c.n_heads, n_slots))
        delta[..., 0] = 1.0
        return [
            {
                "write": ops.asarray(delta),
                "read": ops.asarray(delta),
                "memory": ops.asarray(np.zeros((batch, c.n_heads, n_slots, c.head_dim))),
            }
            for _ in range(c.n_layers)
        ]

    # ------------------------------------------------------------------ shared pointwise parts
    def _rms_norm(self, x: Array, gain: Array) -> Array:
        ops = self.ops
        return x / ops.sqrt(ops.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * gain

    def _controls(
        self,
        block: dict,
        x: Array,
        heads: str,
        temperature: float,
        noise: dict[str, Array] | None = None,
    ) -> dict[str, Array]:
        """Controller outputs per head for inputs ``x`` (..., H): shapes (..., K, width).

        ``noise`` (training only) is added to the shift and gate logits of both heads: Gumbel
        noise makes the shifts Gumbel-softmax samples and logistic noise the gates binary
        concrete samples (with hard heads: exact samples of the discrete moves)."""
        ops, c = self.ops, self.config
        raw = ops.matmul(self._rms_norm(x, block["norm_ctrl"]), block["ctrl_w"]) + block["ctrl_b"]
        raw = ops.reshape(raw, (*x.shape[:-1], c.n_heads, -1))
        out: dict[str, Array] = {}
        offset = 0
        for name, n in c.controller_fields():
            out[name] = raw[..., offset : offset + n]
            offset += n
        for head in ("write", "read"):
            shift_logits, gate_logits = out[f"{head}_shift"], out[f"{head}_gate"][..., 0]
            if noise is not None:
                shift_logits = shift_logits + noise[f"{head}_shift"]
                gate_logits = gate_logits + noise[f"{head}_gate"]
            shift = ops.softmax(shift_logits / temperature, axis=-1)
            gate = ops.sigmoid(gate_logits / temperature)
            if heads == "hard":  # straight-through: exact one-hot / 0-1 forward, soft gradient
                shift = _straight_through_one_hot(ops, shift)
                gate = _straight_through_step(ops, gate)
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
        if c.content:
            out["beta"] = ops.softplus(out["beta"][..., 0])
            out["gamma"] = ops.sigmoid(out["gamma"][..., 0])
        return out

    def _content(self, ctl: dict[str, Array]) -> tuple[Array | None, Array | None, Array | None]:
        if not self.config.content:
            return None, None, None
        return ctl["key"], ctl["beta"], ctl["gamma"]

    def _residual(self, block: dict, x: Array, reads: Array) -> Array:
        ops, c = self.ops, self.config
        reads = ops.reshape(reads, (*reads.shape[:-2], c.n_heads * c.head_dim))
        x = x + ops.matmul(reads, block["read_out"])
        h = self._rms_norm(x, block["norm_mlp"])
        h = ops.gelu(ops.matmul(h, block["mlp_w1"]) + block["mlp_b1"])
        return x + ops.matmul(h, block["mlp_w2"]) + block["mlp_b2"]

    def _logits(self, params: dict, x: Array) -> Array:
        return self.ops.matmul(self._rms_norm(x, params["norm_out"]), params["unembed"])

    # ------------------------------------------------------------------ parallel form
    def _spectrum(self, n_slots: int) -> tuple[Array, Array]:
        """cos and sin of ``2 pi j k / N`` for shifts j = -S..S and frequencies k = 0..N//2."""
        if n_slots not in self._twiddles:
            S = self.config.max_shift
            angle = (
                2 * np.pi * np.outer(np.arange(-S, S + 1), np.arange(n_slots // 2 + 1)) / n_slots
            )
            self._twiddles[n_slots] = (
                self.ops.asarray(np.cos(angle)),
                self.ops.asarray(np.sin(angle)),
            )
        return self._twiddles[n_slots]

    def head_positions(
        self,
        shift: Array,
        gate: Array,
        n_slots: int,
        start: Array | None = None,
        heads: str = "soft",
    ) -> Array:
        """All head distributions ``w_t`` (B, T, K, N) of SPEC §2 by a scan in Fourier space:
        ``hat w_t(k) = (1 - g_t) hat s_t(k) hat w_{t-1}(k) + g_t`` (SPEC §3).

        With hard heads every ``w_t`` is one-hot in exact arithmetic, but the float32 FFT
        route leaves it up to ~1e-3 off at long T; it is snapped to the one-hot of its argmax
        in the forward pass (gradients pass straight through), so that the parallel form is
        exactly the discrete machine that :meth:`step` runs."""
        ops = self.ops
        cos, sin = self._spectrum(n_slots)
        keep = (1 - gate)[..., None]
        spec_re, spec_im = ops.matmul(shift, cos), -ops.matmul(shift, sin)
        a = ops.complex(keep * spec_re, keep * spec_im)
        reset = gate[..., None] + ops.zeros_like(spec_re)
        b = ops.complex(reset, ops.zeros_like(spec_re))
        if start is None:
            h0 = ops.complex(ops.ones_like(spec_re[:, 0]), ops.zeros_like(spec_re[:, 0]))
        else:
            h0 = ops.rfft(start, axis=-1)
        positions = ops.irfft(ops.linear_scan(a, b, h0), n=n_slots, axis=-1)
        return _straight_through_one_hot(ops, positions) if heads == "hard" else positions

    def forward(
        self,
        params: dict,
        tokens: Array,
        n_slots: int,
        state: list[dict[str, Array]] | None = None,
        heads: str = "soft",
        temperature: float = 1.0,
        return_state: bool = False,
        noise: list[dict[str, Array]] | None = None,
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        """Logits (B, T, V) for tokens (B, T), all positions at once.

        ``state`` continues from an earlier call (or :meth:`step`); ``return_state`` also returns
        the state after the last token, so that decoding can go on with :meth:`step`.
        ``noise`` (one dict per block, from :meth:`head_noise`) samples the heads in training.
        """
        _check_slots(n_slots)
        _check_heads(heads, temperature)
        ops = self.ops
        x = ops.take(params["embed"], tokens)
        new_state = []
        for i, block in enumerate(params["blocks"]):
            ctl = self._controls(block, x, heads, temperature, noise[i] if noise else None)
            prev = state[i] if state is not None else {}
            write, read = (
                self.head_positions(
                    ctl[f"{head}_shift"], ctl[f"{head}_gate"], n_slots, prev.get(head), heads
                )
                for head in ("write", "read")
            )
            reads, memory = ops.memory_scan_read(
                write, ctl["erase"], ctl["add"], read, prev.get("memory"), *self._content(ctl)
            )
            x = self._residual(block, x, reads)
            new_state.append({"write": write[:, -1], "read": read[:, -1], "memory": memory})
        logits = self._logits(params, x)
        return (logits, new_state) if return_state else logits

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
                draws[f"{head}_shift"] = scale * rng.gumbel(size=(*shape, c.n_shifts))
                draws[f"{head}_gate"] = scale * rng.logistic(size=shape)
            if c.gated_write:
                draws["erase"] = scale * rng.logistic(size=(*shape, c.head_dim))
            out.append({k: ops.asarray(v) for k, v in draws.items()})
        return out

    # ------------------------------------------------------------------ recurrent (step) form
    def _delta(self, n_slots: int) -> Array:
        if n_slots not in self._delta0:
            self._delta0[n_slots] = self.ops.asarray(np.eye(n_slots)[0])
        return self._delta0[n_slots]

    def move_head(self, position: Array, shift: Array, gate: Array) -> Array:
        """``w_t = (1 - g) (s ⊛ w_{t-1}) + g delta_0`` in slot space (SPEC §2)."""
        ops, S = self.ops, self.config.max_shift
        moved = None
        for j in range(-S, S + 1):
            term = shift[..., j + S : j + S + 1] * ops.roll(position, j, axis=-1)
            moved = term if moved is None else moved + term
        g = gate[..., None]
        return (1 - g) * moved + g * self._delta(position.shape[-1])

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
        for block, prev in zip(params["blocks"], state, strict=True):
            ctl = self._controls(block, x, heads, temperature)
            write = self.move_head(prev["write"], ctl["write_shift"], ctl["write_gate"])
            memory = ops.decay_write(prev["memory"], write, ctl["erase"], ctl["add"])
            read = self.move_head(prev["read"], ctl["read_shift"], ctl["read_gate"])
            reads = read_step(ops, memory, read, *self._content(ctl))
            x = self._residual(block, x, reads)
            new_state.append({"write": write, "read": read, "memory": memory})
        return self._logits(params, x), new_state


def _straight_through_one_hot(ops: Backend, probs: Array) -> Array:
    """The one-hot of the argmax of ``probs`` (last axis) in the forward pass, the gradient of
    ``probs`` in the backward pass."""
    hard = ops.one_hot(ops.argmax(probs, -1), probs.shape[-1])
    return hard + (probs - ops.stop_gradient(probs))


def _straight_through_step(ops: Backend, probs: Array) -> Array:
    """``probs > 0.5`` as 0/1 in the forward pass, the gradient of ``probs`` in the backward."""
    hard = ops.where(probs > 0.5, ops.ones_like(probs), ops.zeros_like(probs))
    return hard + (probs - ops.stop_gradient(probs))


def _check_slots(n_slots: int) -> None:
    if not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
        raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")


def _check_heads(heads: str, temperature: float) -> None:
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def cross_entropy(ops: Backend, logits: Array, targets: Array, mask: Array) -> Array:
    """Mean negative log-likelihood of ``targets`` over positions where ``mask`` is 1."""
    logp = ops.sum(ops.log_softmax(logits, -1) * ops.one_hot(targets, logits.shape[-1]), axis=-1)
    return -ops.sum(logp * mask) / ops.sum(mask)
