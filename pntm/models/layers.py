"""Pieces the models share: initialization, RMSNorm, the MLP branch, embedding and output."""

from __future__ import annotations

from typing import Any

import numpy as np

from pntm.backends.base import Array, Backend

RMS_EPS = 1e-5


def dense(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """A (fan_in, fan_out) weight drawn N(0, 1 / fan_in)."""
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out))


def mlp_params(rng: np.random.Generator, width: int, hidden: int) -> dict[str, np.ndarray]:
    """A pre-norm GELU MLP branch (:func:`mlp`): norm gain, two dense layers with biases."""
    return {
        "norm_mlp": np.ones(width),
        "mlp_w1": dense(rng, width, hidden),
        "mlp_b1": np.zeros(hidden),
        "mlp_w2": dense(rng, hidden, width),
        "mlp_b2": np.zeros(width),
    }


def mlp_param_count(width: int, hidden: int) -> int:
    """The numbers of :func:`mlp_params`."""
    return 2 * width + 2 * width * hidden + hidden


def embedding_and_output_count(vocab: int, width: int) -> int:
    """The numbers of :func:`embedding_and_output`."""
    return 2 * vocab * width + width


def embedding_and_output(
    rng: np.random.Generator, vocab: int, width: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Token embedding N(0, 1), and the output: a norm gain and the unembedding (drawn after
    the embedding, so a model that draws its blocks in between keeps its draws in order)."""
    embed = rng.normal(0.0, 1.0, (vocab, width))
    return embed, {"norm_out": np.ones(width), "unembed": dense(rng, width, vocab)}


def rms_norm(ops: Backend, x: Array, gain: Array) -> Array:
    return x / ops.sqrt(ops.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * gain


def mlp(ops: Backend, block: dict[str, Any], x: Array) -> Array:
    """The MLP branch of a residual block: ``W2 gelu(W1 norm(x) + b1) + b2``."""
    h = rms_norm(ops, x, block["norm_mlp"])
    h = ops.gelu(ops.project(h, block["mlp_w1"]) + block["mlp_b1"])
    return ops.project(h, block["mlp_w2"]) + block["mlp_b2"]


def output_logits(ops: Backend, params: dict[str, Any], x: Array) -> Array:
    """Vocabulary logits of the final hidden states: ``norm(x) @ unembed``."""
    return ops.project(rms_norm(ops, x, params["norm_out"]), params["unembed"])
