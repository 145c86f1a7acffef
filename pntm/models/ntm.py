"""The standard Neural Turing Machine (SPEC §5): the speed baseline and accuracy peer of the P-NTM.

Graves et al. 2014 ("Neural Turing Machines"), with the stabilization of Collier & Beel 2018
("Implementing Neural Turing Machines"), written once against the backend interface:

    token embedding -> LSTM controller (``n_layers`` layers) fed [x_t; r_{t-1}]
    -> head parameters (one linear map, clipped) -> addressing, read, write
    -> logits from [controller output h_t; reads r_t] (clipped)

One memory ``M`` of N x D (N = the run-time ``capacity``, D = ``head_dim``) shared by
``read_heads`` read heads and ``write_heads`` write heads. Every head addresses the memory of the
previous step, as in Collier & Beel's code (and loudinthecloud/pytorch-ntm): per head a key k
(tanh), strength beta (softplus), interpolation gate g (sigmoid), shift distribution s over
-S..S (softmax) and sharpening gamma = 1 + softplus;

    w_c = softmax_i(beta cos(k, M_{t-1}(i)))          content
    w_g = g w_c + (1 - g) w_{t-1}                     interpolation
    w_s(i) = sum_j s(j) w_g(i - j mod N)              circular shift
    w_t = w_s^gamma / sum_i w_s(i)^gamma              sharpening

The cosine has the project's ``eps`` inside its norms (:data:`COSINE_EPS`, SPEC §2), so that the
nearly empty starting memory has a bounded gradient. Sharpening is computed as
``softmax(gamma log(w_s + tiny))``: the same function, but the sum cannot underflow to 0 in
float32 (with N = 512 and gamma = 20, every ``w_s^gamma`` of a flat weighting does), and ``tiny``
keeps ``log`` finite where ``w_s`` has underflowed to 0.

Reads ``r_t = w^r_t M_{t-1}`` (before this step's write); write heads erase then add,
``M_t = M_{t-1} ⊙ prod_h (1 - w^h e_h^T) + sum_h w^h a_h^T`` (erase sigmoid, add tanh).

Collier & Beel's stabilization:

* memory initialized to a small constant, 1e-6 (their best scheme);
* learned initial read vectors ``r_0 = tanh(init_read)``;
* learned initial head weightings. They learn softmax logits over the N slots, but here N is a
  run-time size (training runs N = T of each batch, evaluation the whole sequence length), so
  each head learns one number: ``w_0 = (1 - u) delta_0 + u / N`` with ``u = sigmoid(init_weight)``
  -- a learned fraction ``u`` spread over all slots, the rest on slot 0. This is the softmax of
  a learned bias on slot 0 alone (logits ``b delta_0``), with ``b`` set from ``u`` and N so that
  the learned number means the same at every N; it starts mostly on slot 0 (u = 0.12), which
  breaks the symmetry of the constant memory for location-based addressing;
* controller outputs (the head parameters) and the output logits clipped to [-clip, clip], 20 by
  default, as they did; gradient-norm clipping is the trainer's (``--clip-norm``).

The NTM is sequential in time: :meth:`NTM.forward` loops over the positions calling the same
cell as :meth:`NTM.step`. Per step, everything that does not depend on the recurrence is taken
out of the loop: the embedding part of the controller's input projection (one matmul over all T
before the loop) and the output layer (one matmul over all T after it); all heads are addressed
together (one linear map for all head parameters, batched cosine and shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pntm.backends.base import COSINE_EPS, Array, Backend
from pntm.config import check_finite, check_ints, option
from pntm.models.base import Model, ModelConfig

MEMORY_INIT = 1e-6  # Collier & Beel's constant memory initialization
FORGET_BIAS = 1.0  # added to the LSTM forget gate at initialization (as in their controller)
INIT_WEIGHT_LOGIT = -2.0  # u = sigmoid(-2) = 0.12 of each head's initial weighting is uniform
INIT_READ_STD = 0.1  # spread of the learned initial read vectors (before tanh)
SHARPEN_TINY = 1e-30  # keeps log finite where a shifted weighting has underflowed to 0


@dataclass(frozen=True)
class NTMConfig(ModelConfig):
    """Sizes of the NTM. The defaults match the P-NTM's (width 64, slots of width 16, shifts
    -1..1), so that comparisons are at the same width and memory size: a 64-unit LSTM
    controller, one read and one write head on one N x 16 memory."""

    d_model: int = option(
        64, "Controller width H: token embedding and LSTM hidden size.", minimum=1
    )
    n_layers: int = option(1, "LSTM layers of the controller.", flag="layers", minimum=1)
    read_heads: int = option(1, "Read heads of the NTM.", minimum=1)
    write_heads: int = option(1, "Write heads of the NTM.", minimum=1)
    head_dim: int = option(16, "Width D of a memory slot.", minimum=1)
    max_shift: int = option(1, "Heads move by -S..S slots per step.", minimum=0)
    clip_value: float = option(
        20.0,
        "The NTM's head parameters and logits are clipped to [-this, this] (Collier & Beel).",
        minimum=0,
        min_open=True,
    )

    def __post_init__(self) -> None:
        check_ints(
            self, ("vocab_size", "d_model", "n_layers", "read_heads", "write_heads", "head_dim")
        )
        check_ints(self, ("max_shift",), minimum=0)
        check_finite(self.clip_value, "clip_value", 0, low_open=True)

    def summary(self) -> str:
        layers = f" x {self.n_layers} layers" if self.n_layers > 1 else ""
        return (
            f"LSTM {self.d_model}{layers}, {self.read_heads} read + {self.write_heads} write "
            f"head{'s' if self.n_heads > 2 else ''}"
        )

    @property
    def n_heads(self) -> int:
        """All heads, read heads first."""
        return self.read_heads + self.write_heads

    @property
    def n_shifts(self) -> int:
        return 2 * self.max_shift + 1

    def interface_fields(self) -> list[tuple[str, int]]:
        """The head parameters the controller emits, in order (``key``, ``gate``, ``beta``,
        ``gamma``, ``shift``: every head, read heads first; ``add``, ``erase``: the write heads).
        Fields under one activation are adjacent, so each activation is one operation."""
        K, W, D = self.n_heads, self.write_heads, self.head_dim
        return [
            ("key", K * D),  # tanh
            ("add", W * D),  # tanh
            ("gate", K),  # sigmoid
            ("erase", W * D),  # sigmoid
            ("beta", K),  # softplus
            ("gamma", K),  # 1 + softplus
            ("shift", K * self.n_shifts),  # softmax per head
        ]


def init_params(config: NTMConfig, seed: int = 0) -> dict[str, Any]:
    """Parameters as a nested dict of float64 NumPy arrays: identical for every backend.

    ``lstm[l]``: ``w_in`` (H, 4H) from the layer's input (the embedding, or the layer below),
    ``w_rec`` from its recurrent input ([r_{t-1}; h_{t-1}] for layer 0, h_{t-1} above), ``b``;
    the four gate blocks are i, f, o, g (input, forget, output, cell). ``heads``: one linear
    map to :meth:`NTMConfig.interface_fields`. ``out``: [h_t; r_t] -> logits."""
    rng = np.random.default_rng(seed)
    H, V, D, R = config.d_model, config.vocab_size, config.head_dim, config.read_heads

    def normal(fan_in: int, *shape: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)

    lstm = []
    for layer in range(config.n_layers):
        recurrent = H + (R * D if layer == 0 else 0)
        bias = np.zeros(4 * H)
        bias[H : 2 * H] = FORGET_BIAS
        lstm.append(
            {
                "w_in": normal(H + recurrent, H, 4 * H),
                "w_rec": normal(H + recurrent, recurrent, 4 * H),
                "b": bias,
            }
        )
    width = sum(n for _, n in config.interface_fields())
    return {
        "embed": rng.normal(0.0, 1.0, (V, H)),
        "lstm": lstm,
        "heads": {"w": normal(H, H, width), "b": np.zeros(width)},
        "out": {"w": normal(H + R * D, H + R * D, V), "b": np.zeros(V)},
        "init_read": rng.normal(0.0, INIT_READ_STD, (R, D)),
        "init_weight": np.full(config.n_heads, INIT_WEIGHT_LOGIT),
    }


def parameter_count(config: NTMConfig) -> int:
    """The numbers of :func:`init_params`, without drawing them."""
    H, V, D, R = config.d_model, config.vocab_size, config.head_dim, config.read_heads
    total = V * H + R * D + config.n_heads
    for layer in range(config.n_layers):
        recurrent = H + (R * D if layer == 0 else 0)
        total += (H + recurrent) * 4 * H + 4 * H
    width = sum(n for _, n in config.interface_fields())
    return total + H * width + width + (H + R * D) * V + V


class NTM(Model):
    """An NTM bound to a backend. Parameters are passed in (functional style); ``capacity`` is
    the number of memory slots N.

    The state is a dict: ``h``, ``c`` (lists over the LSTM layers, (B, H) each), ``reads``
    (B, R, D), ``weights`` (B, R + W, N; read heads first) and ``memory`` (B, N, D). In the state
    of :meth:`init_state` ``reads`` and ``weights`` are None: the learned initial ones, which
    depend on the parameters."""

    name = "ntm"
    description = (
        "Neural Turing Machine (Graves et al. 2014, stabilized as Collier & Beel 2018): LSTM "
        "controller, content and location addressing, sequential in time"
    )
    config_class = NTMConfig
    has_memory = True

    def __init__(self, config: NTMConfig, ops: Backend) -> None:
        super().__init__(config, ops)
        self._delta0: dict[int, Array] = {}

    @staticmethod
    def init_params(config: NTMConfig, seed: int = 0) -> dict[str, Any]:
        return init_params(config, seed)

    @staticmethod
    def parameter_count(config: NTMConfig) -> int:
        return parameter_count(config)

    # ------------------------------------------------------------------ state
    def memory_per_sequence(self, length: int, capacity: int, training: bool) -> int | None:
        # training keeps every step's N x D memory for the backward pass (peaks measured on
        # the CPU at T = N = 256..512: 4.1-6.1 times T N D float32s); a forward pass without
        # gradients keeps only the current memory
        per_step = capacity * self.config.head_dim * 4
        return (8 * length if training else 4) * per_step

    def init_state(self, batch: int, capacity: int) -> dict[str, Any]:
        """Empty controller, memory at the constant 1e-6, learned initial reads and weights."""
        _check_slots(capacity)
        c, ops = self.config, self.ops
        zeros = ops.zeros((batch, c.d_model))
        return {
            "h": [zeros for _ in range(c.n_layers)],
            "c": [zeros for _ in range(c.n_layers)],
            "reads": None,
            "weights": None,
            "memory": ops.asarray(np.full((batch, capacity, c.head_dim), MEMORY_INIT)),
        }

    def _start(self, params: dict, state: dict[str, Any] | None, batch: int, n_slots: int):
        """``state`` (or the initial state), with the learned initial reads and weightings
        filled in where it has none."""
        _check_slots(n_slots)
        if state is None:
            state = self.init_state(batch, n_slots)
        elif state["memory"].shape[1] != n_slots:
            raise ValueError(
                f"the state has {state['memory'].shape[1]} memory slots, capacity is {n_slots}"
            )
        ops, c = self.ops, self.config
        state = dict(state)
        if state["reads"] is None:
            zeros = ops.zeros((batch, c.read_heads, c.head_dim))
            state["reads"] = zeros + ops.tanh(params["init_read"])
        if state["weights"] is None:
            u = ops.sigmoid(params["init_weight"])[:, None]
            start = (1 - u) * self._delta(n_slots) + u * (1.0 / n_slots)
            state["weights"] = ops.zeros((batch, c.n_heads, n_slots)) + start
        return state

    def _delta(self, n_slots: int) -> Array:
        if n_slots not in self._delta0:
            self._delta0[n_slots] = self.ops.asarray(np.eye(n_slots)[0])
        return self._delta0[n_slots]

    # ------------------------------------------------------------------ one step
    def _recurrent_weights(self, params: dict) -> list[tuple[Array, Array | None]]:
        """Per layer, the weight applied to the recurrent input of the cell and (layers above
        the first) its bias: layer 0 gets [r_{t-1}; h_{t-1}] (its input projection and bias are
        precomputed), layer l > 0 gets [h^{l-1}_t; h^l_{t-1}]."""
        layers = params["lstm"]
        out = [(layers[0]["w_rec"], None)]
        for layer in layers[1:]:
            out.append((self.ops.concat([layer["w_in"], layer["w_rec"]], 0), layer["b"]))
        return out

    def _lstm(self, gates: Array, cell: Array) -> tuple[Array, Array]:
        ops, H = self.ops, self.config.d_model
        sig = ops.sigmoid(gates[..., : 3 * H])  # i, f, o
        cell = sig[..., H : 2 * H] * cell + sig[..., :H] * ops.tanh(gates[..., 3 * H :])
        return sig[..., 2 * H :] * ops.tanh(cell), cell

    def _interface(self, params: dict, h: Array) -> dict[str, Array]:
        """The head parameters from the controller output ``h`` (B, H), clipped, activated:
        ``key`` (B, K, D), ``gate``/``beta``/``gamma`` (B, K), ``shift`` (B, K, 2S+1);
        ``add``/``erase`` (B, W, D)."""
        ops, c = self.ops, self.config
        raw = _clip(ops, ops.matmul(h, params["heads"]["w"]) + params["heads"]["b"], c.clip_value)
        B, K, W, D = h.shape[0], c.n_heads, c.write_heads, c.head_dim
        tanh_end = (K + W) * D
        sig_end = tanh_end + K + W * D
        soft_end = sig_end + 2 * K
        tanh = ops.tanh(raw[:, :tanh_end])
        sig = ops.sigmoid(raw[:, tanh_end:sig_end])
        soft = ops.softplus(raw[:, sig_end:soft_end])
        shift = ops.softmax(ops.reshape(raw[:, soft_end:], (B, K, c.n_shifts)), -1)
        return {
            "key": ops.reshape(tanh[:, : K * D], (B, K, D)),
            "add": ops.reshape(tanh[:, K * D :], (B, W, D)),
            "gate": sig[:, :K],
            "erase": ops.reshape(sig[:, K:], (B, W, D)),
            "beta": soft[:, :K],
            "gamma": soft[:, K:] + 1,
            "shift": shift,
        }

    def address(
        self,
        memory: Array,
        previous: Array,
        key: Array,
        beta: Array,
        gate: Array,
        shift: Array,
        gamma: Array,
    ) -> Array:
        """New weightings (B, K, N) of K heads over ``memory`` (B, N, D): content, interpolation
        with ``previous`` (B, K, N), circular shift, sharpening (module docstring)."""
        ops = self.ops
        dots = ops.matmul(key, ops.transpose(memory, (0, 2, 1)))  # (B, K, N)
        norm_m = ops.sqrt(ops.sum(memory * memory, axis=-1) + COSINE_EPS)  # (B, N)
        norm_k = ops.sqrt(ops.sum(key * key, axis=-1) + COSINE_EPS)  # (B, K)
        content = ops.softmax(dots / norm_m[:, None, :] * (beta / norm_k)[..., None], -1)
        mixed = previous + gate[..., None] * (content - previous)
        shifted = circular_shift(ops, mixed, shift)
        return ops.softmax(gamma[..., None] * ops.log(shifted + SHARPEN_TINY), -1)

    def _cell(
        self, params: dict, recurrent: list, state: dict[str, Any], x_gates: Array
    ) -> tuple[Array, Array, dict[str, Any]]:
        """One step from the precomputed input projection ``x_gates`` (B, 4H) of the token:
        the controller output h_t (B, H), the reads r_t (B, R, D) and the next state."""
        ops, c = self.ops, self.config
        R = c.read_heads
        memory, reads = state["memory"], state["reads"]
        B = memory.shape[0]
        hs, cs = [], []
        below = ops.reshape(reads, (B, R * c.head_dim))
        for layer, (w, b) in enumerate(recurrent):  # b is None: layer 0 (x_gates has it)
            inputs = ops.concat([below, state["h"][layer]], -1)
            gates = ops.matmul(inputs, w) + (x_gates if b is None else b)
            h, cell = self._lstm(gates, state["c"][layer])
            hs.append(h)
            cs.append(cell)
            below = h
        ctl = self._interface(params, below)
        weights = self.address(
            memory,
            state["weights"],
            ctl["key"],
            ctl["beta"],
            ctl["gate"],
            ctl["shift"],
            ctl["gamma"],
        )
        reads = ops.matmul(weights[:, :R], memory)
        memory = write(ops, memory, weights[:, R:], ctl["erase"], ctl["add"])
        new_state = {"h": hs, "c": cs, "reads": reads, "weights": weights, "memory": memory}
        return below, reads, new_state

    def _logits(self, params: dict, h: Array, reads: Array) -> Array:
        """Logits from the controller outputs ``h`` (..., H) and reads (..., R, D)."""
        ops, c = self.ops, self.config
        flat = ops.reshape(reads, (*reads.shape[:-2], c.read_heads * c.head_dim))
        out = params["out"]
        return _clip(ops, ops.matmul(ops.concat([h, flat], -1), out["w"]) + out["b"], c.clip_value)

    def _input_gates(self, params: dict, tokens: Array) -> Array:
        layer = params["lstm"][0]
        return self.ops.matmul(self.ops.take(params["embed"], tokens), layer["w_in"]) + layer["b"]

    # ------------------------------------------------------------------ the two forms
    def forward(
        self,
        params: dict,
        tokens: Array,
        capacity: int,
        state: dict[str, Any] | None = None,
        return_state: bool = False,
    ) -> Array | tuple[Array, dict[str, Any]]:
        """Logits (B, T, V) for tokens (B, T) with ``capacity`` = N memory slots: the step of
        :meth:`step` at every position, with the input projection and the output layer done
        for all positions at once."""
        ops = self.ops
        state = self._start(params, state, tokens.shape[0], capacity)
        recurrent = self._recurrent_weights(params)
        hs, reads = [], []
        for x_gates in ops.unstack(self._input_gates(params, tokens), 1):
            h, r, state = self._cell(params, recurrent, state, x_gates)
            hs.append(h)
            reads.append(r)
        logits = self._logits(params, ops.stack(hs, 1), ops.stack(reads, 1))
        return (logits, state) if return_state else logits

    def step(
        self, params: dict, state: dict[str, Any], token: Array
    ) -> tuple[Array, dict[str, Any]]:
        """Logits (B, V) for one token per sequence (B,), and the next state."""
        state = self._start(params, state, token.shape[0], state["memory"].shape[1])
        h, reads, state = self._cell(
            params, self._recurrent_weights(params), state, self._input_gates(params, token)
        )
        return self._logits(params, h, reads), state


def circular_shift(ops: Backend, w: Array, shift: Array) -> Array:
    """``out(i) = sum_j shift(j) w(i - j mod N)`` for shifts j = -S..S: ``w`` (..., N),
    ``shift`` (..., 2S+1). Any N >= 1 (for N < 2S + 1 several shifts land on one slot)."""
    S = (shift.shape[-1] - 1) // 2
    if S == 0:
        return w * shift
    out = None
    for j, s in zip(range(-S, S + 1), ops.unstack(shift, -1), strict=True):
        term = s[..., None] * (ops.roll(w, j, axis=-1) if j else w)
        out = term if out is None else out + term
    return out


def write(ops: Backend, memory: Array, w: Array, erase: Array, add: Array) -> Array:
    """``M ⊙ prod_h (1 - w_h e_h^T) + sum_h w_h a_h^T`` for write heads h: ``w`` (B, W, N),
    ``erase``/``add`` (B, W, D), ``memory`` (B, N, D)."""
    if w.shape[1] == 1:  # reshape, not w[:, 0]: a cheaper gradient
        B, N, D = memory.shape
        return ops.decay_write(
            memory, ops.reshape(w, (B, N)), ops.reshape(erase, (B, D)), ops.reshape(add, (B, D))
        )
    for h in range(w.shape[1]):
        memory = ops.decay_mul(memory, w[:, h], erase[:, h])
    return memory + ops.matmul(ops.transpose(w, (0, 2, 1)), add)


def _clip(ops: Backend, x: Array, limit: float) -> Array:
    """``x`` clipped to [-limit, limit] (zero gradient outside, as ``tf.clip_by_value``)."""
    return ops.where(x > limit, limit, ops.where(x < -limit, -limit, x))


def _check_slots(n_slots: int) -> None:
    if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
        raise ValueError(f"capacity (memory slots N) must be a positive integer, got {n_slots!r}")
