"""A causal Transformer decoder, the attention peer of the P-NTM, written once against the
backend interface.

token embedding -> ``n_layers`` pre-norm blocks (RMSNorm -> multi-head causal self-attention
-> residual; RMSNorm -> GELU MLP -> residual, the P-NTM's MLP) -> RMSNorm -> logits.

Attention runs through :meth:`pntm.backends.base.Backend.attention`, so each framework uses its
fused kernel (``scaled_dot_product_attention`` in PyTorch, ``mx.fast`` in MLX). The decoding
state is a KV cache per layer; :meth:`Transformer.forward` continues from one (prefill) and
:meth:`Transformer.step` is the forward pass on one token, attending to the whole cache.
``capacity`` is unused.

Positions (option ``positions``):

* ``nope`` (the default): no positional encoding. This project measures length generalization
  (evaluation at 2x-16x the training length), and NoPE has nothing that depends on the absolute
  position: the causal mask alone lets a decoder infer order and position (Haviv et al. 2022),
  and on algorithmic tasks (copy, reverse, addition, parity...) NoPE decoders generalized to
  longer sequences better than RoPE, ALiBi or T5's relative bias (Kazemnejad et al. 2023). It is
  also what the P-NTM has (no positional encoding). A learned absolute embedding could not even
  run past the training length, so it is not offered.
* ``rope``: rotary embeddings (Su et al. 2021, base 10,000) on queries and keys, the modern
  default of language models; relative, but rotations at distances never seen in training are
  known to extrapolate poorly. The cache holds rotated keys, and the positions of a forward or
  step continue from the cache's length.

Default size: width 64 and 2 blocks, the P-NTM's width and depth (compared at matched width),
4 heads of 16 (the P-NTM's memory width D = 16) and the P-NTM's MLP ratio 2: 67k parameters on
``copy``, against 45k for the P-NTM's copy recipe (49k for its default config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pntm.backends.base import Array, Backend
from pntm.config import check_ints, option
from pntm.models.base import Model, ModelConfig
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

POSITIONS = ("nope", "rope")
ROPE_BASE = 10_000.0


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    d_model: int = option(64, "Model width H.", minimum=1)
    n_layers: int = option(2, "Transformer blocks.", flag="layers", minimum=1)
    n_heads: int = option(
        4, "Attention heads per block (each of width H / heads).", flag="attention-heads", minimum=1
    )
    mlp_ratio: int = option(2, "Hidden width of the MLP, in multiples of the width.", minimum=1)
    # NoPE by default: nothing in the model depends on absolute positions, which generalizes to
    # unseen lengths best on algorithmic tasks (module docstring); RoPE for comparison.
    positions: str = option(
        "nope",
        "Positional scheme: nope = none (the causal mask alone gives order), rope = rotary "
        "embeddings on queries and keys.",
        choices=POSITIONS,
    )

    def __post_init__(self) -> None:
        check_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_ratio"))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads} "
                "(each head is d_model / n_heads wide)"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                f"positions 'rope' needs an even head width, got d_model {self.d_model} / "
                f"n_heads {self.n_heads} = {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def summary(self) -> str:
        return f"{self.n_layers} blocks x {self.n_heads} heads, {self.positions}"


def init_params(config: TransformerConfig, seed: int = 0) -> dict[str, Any]:
    """Parameters as a nested dict of float64 NumPy arrays: identical for every backend."""
    rng = np.random.default_rng(seed)
    H, V = config.d_model, config.vocab_size
    hidden = config.mlp_ratio * H
    blocks = [
        {
            "norm_attn": np.ones(H),
            "qkv": dense(rng, H, 3 * H),  # queries, keys, values; heads contiguous within each
            "attn_out": dense(rng, H, H),
            **mlp_params(rng, H, hidden),
        }
        for _ in range(config.n_layers)
    ]
    embed, output = embedding_and_output(rng, V, H)
    return {"embed": embed, "blocks": blocks, **output}


def parameter_count(config: TransformerConfig) -> int:
    """The numbers of :func:`init_params`, without drawing them."""
    H = config.d_model
    block = H + 3 * H * H + H * H + mlp_param_count(H, config.mlp_ratio * H)
    return embedding_and_output_count(config.vocab_size, H) + config.n_layers * block


class Transformer(Model):
    """A causal Transformer decoder bound to a backend. Parameters are passed in (functional
    style); the decoding state is a KV cache per block."""

    name = "transformer"
    description = (
        "Causal Transformer decoder, pre-norm, NoPE or RoPE (the framework's fused attention)"
    )
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig, ops: Backend) -> None:
        super().__init__(config, ops)
        self._rope: tuple[int, Array, Array] | None = None  # (positions, cos, sin)

    @staticmethod
    def init_params(config: TransformerConfig, seed: int = 0) -> dict[str, Any]:
        return init_params(config, seed)

    @staticmethod
    def parameter_count(config: TransformerConfig) -> int:
        return parameter_count(config)

    def init_state(self, batch: int, capacity: int) -> list[dict[str, Array]]:
        """Empty KV caches: keys and values (B, heads, 0, H / heads) per block."""
        c = self.config
        empty = np.zeros((batch, c.n_heads, 0, c.head_dim))
        return [
            {"k": self.ops.asarray(empty), "v": self.ops.asarray(empty)} for _ in range(c.n_layers)
        ]

    # ------------------------------------------------------------------ parts
    def _rotation(self, start: int, length: int) -> tuple[Array, Array]:
        """cos and sin (length, head_dim / 2) of RoPE at positions start .. start + length - 1,
        sliced from a table kept on the backend (grown to a power of two)."""
        end = start + length
        if self._rope is None or self._rope[0] < end:
            n = 1 << max(end - 1, 1).bit_length()
            half = self.config.head_dim // 2
            inv_freq = ROPE_BASE ** (-np.arange(half) / half)
            angle = np.outer(np.arange(n), inv_freq)
            self._rope = (n, self.ops.asarray(np.cos(angle)), self.ops.asarray(np.sin(angle)))
        _, cos, sin = self._rope
        return cos[start:end], sin[start:end]

    def _rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        """RoPE on (B, heads, T, d): the halves (x1, x2) of each head turn by the angles."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return self.ops.concat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def _heads(self, x: Array) -> Array:
        """(B, T, H) -> (B, heads, T, H / heads)."""
        c = self.config
        return self.ops.transpose(
            self.ops.reshape(x, (x.shape[0], x.shape[1], c.n_heads, c.head_dim)), (0, 2, 1, 3)
        )

    def _attend(
        self, block: dict, x: Array, cache: dict[str, Array] | None
    ) -> tuple[Array, dict[str, Array]]:
        """The attention sublayer's output (B, T, H) and the cache extended by these T."""
        ops, H = self.ops, self.config.d_model
        qkv = ops.matmul(rms_norm(ops, x, block["norm_attn"]), block["qkv"])
        q, k, v = (self._heads(qkv[..., i * H : (i + 1) * H]) for i in range(3))
        if self.config.positions == "rope":
            start = 0 if cache is None else cache["k"].shape[2]
            cos, sin = self._rotation(start, x.shape[1])
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is not None:
            k, v = ops.concat([cache["k"], k], 2), ops.concat([cache["v"], v], 2)
        out = ops.attention(q, k, v, causal=True)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (x.shape[0], x.shape[1], H))
        return ops.matmul(out, block["attn_out"]), {"k": k, "v": v}

    # ------------------------------------------------------------------ the two forms
    def forward(
        self,
        params: dict,
        tokens: Array,
        capacity: int,
        state: list[dict[str, Array]] | None = None,
        return_state: bool = False,
    ) -> Array | tuple[Array, list[dict[str, Array]]]:
        """Logits (B, T, V) for tokens (B, T); ``state`` (KV caches) continues an earlier call
        or :meth:`step`: these T tokens follow the cached positions. ``return_state`` also
        returns the caches extended by them."""
        ops = self.ops
        x = ops.take(params["embed"], tokens)
        new_state = []
        for i, block in enumerate(params["blocks"]):
            attended, cache = self._attend(block, x, None if state is None else state[i])
            x = x + attended
            x = x + mlp(ops, block, x)
            new_state.append(cache)
        logits = output_logits(ops, params, x)
        return (logits, new_state) if return_state else logits
