"""The model contract: what a model is, so that training, evaluation, checkpoints, benchmarks
and the CLI work with any of them and know nothing of P-NTM heads or memory slots.

A model is

* a **config** (a frozen dataclass derived from :class:`ModelConfig`): its own options and
  defaults, each field declared with :func:`pntm.config.option` (help text, command-line flag,
  bounds), from which the CLI generates its options;
* **parameters from a seed**: :meth:`Model.init_params` gives a nested dict of float64 NumPy
  arrays, identical for every backend, so checkpoints move between backends;
* a **parallel forward** over a whole sequence, :meth:`Model.forward`, that can start from and
  return a decoding state;
* a **decoding state and a step**: :meth:`Model.init_state` and :meth:`Model.step`, one token at
  a time, computing the same function as the forward pass;
* its **training schedule and decoding mode**: what changes over training (:meth:`train_mode`,
  :meth:`train_noise`, :meth:`train_metrics`) and how it decodes (:meth:`decode_mode`).

``capacity`` is the one run-time size a model may need: the number of positions the state must
address (memory slots of the P-NTM and the NTM; unused by recurrent and attention models).
Training passes the padded batch length, evaluation the whole sequence length.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pntm.backends.base import Array, Backend
from pntm.config import config_from_dict
from pntm.tree import tree_map

__all__ = ["Model", "ModelConfig", "cross_entropy"]


@dataclass(frozen=True)
class ModelConfig:
    """Base of every model config: the vocabulary size comes from the task, the rest are the
    model's own options."""

    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return config_from_dict(cls, data, f"{cls.__name__}")

    def summary(self) -> str:
        """A few words on the model's size, for logs (e.g. ``2 blocks x 2 memories``)."""
        return ""


class Model(abc.ABC):
    """A model bound to a backend. Parameters are passed in (functional style), so the same
    object trains, evaluates and benchmarks any parameter set of its config."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    #: whether the model has memory slots (its ``capacity`` N); models without ignore it
    has_memory: ClassVar[bool] = False

    def __init__(self, config: Any, ops: Backend) -> None:
        self.config = config
        self.ops = ops

    # ------------------------------------------------------------------ parameters
    @staticmethod
    @abc.abstractmethod
    def init_params(config: Any, seed: int = 0) -> dict[str, Any]:
        """Parameters as a nested dict of float64 NumPy arrays: identical for every backend."""

    @staticmethod
    @abc.abstractmethod
    def parameter_count(config: Any) -> int:
        """How many numbers :meth:`init_params` draws, without drawing them: training checks
        that a model fits in memory before it builds one (tests hold the two equal)."""

    def params_from_numpy(self, params: Any) -> Any:
        return tree_map(lambda p: self.ops.asarray(p), params)

    # ------------------------------------------------------------------ the two forms
    @abc.abstractmethod
    def forward(
        self,
        params: Any,
        tokens: Array,
        capacity: int,
        state: Any = None,
        return_state: bool = False,
        **mode: Any,
    ) -> Array | tuple[Array, Any]:
        """Logits (B, T, V) for tokens (B, T), all positions at once; ``state`` continues an
        earlier call or :meth:`step`, ``return_state`` also returns the state after the last
        token. ``mode`` holds the keywords of :meth:`train_mode` or :meth:`decode_mode`."""

    @abc.abstractmethod
    def init_state(self, batch: int, capacity: int) -> Any:
        """The decoding state before the first token."""

    def step(self, params: Any, state: Any, token: Array, **mode: Any) -> tuple[Array, Any]:
        """Logits (B, V) for one token per sequence (B,), and the next state. This default is
        :meth:`forward` on a sequence of one token (fine where the forward pass is itself
        recurrent or cached); models with a cheaper step override it."""
        logits, state = self.forward(params, token[:, None], 1, state, True, **mode)
        return logits[:, 0], state

    # ------------------------------------------------------------------ training
    def train_mode(self, step: int, steps: int) -> dict[str, Any]:
        """Keywords of :meth:`forward` at training update ``step`` of ``steps`` (hashable
        values: the training loop compiles one loss per distinct mode)."""
        return {}

    def train_noise(
        self, rng: np.random.Generator, batch: int, length: int, step: int, steps: int
    ) -> Any:
        """Random draws the forward pass of update ``step`` takes as ``noise`` (from the data
        RNG, so that a resumed run draws the same), or None."""
        return None

    def train_metrics(self, step: int, steps: int) -> dict[str, Any]:
        """Schedule values to log with the metrics of update ``step``."""
        return {}

    def describe_schedule(self, steps: int) -> str:
        """A few words on what changes over ``steps`` updates (empty when nothing does)."""
        return ""

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
        """Training loss and the logits it was computed from."""
        extra = {} if noise is None else {"noise": noise}
        logits = self.forward(params, tokens, capacity, **mode, **extra)
        return cross_entropy(self.ops, logits, labels, mask), logits

    def memory_per_sequence(self, length: int, capacity: int, training: bool) -> int | None:
        """Bytes that one sequence of ``length`` tokens adds to the peak memory of a forward
        pass (``training``: forward and backward) with ``capacity`` slots: training and
        evaluation split their batches so that it fits (:func:`sequences_that_fit`). None
        where it was not measured (models whose memory does not grow with T x N)."""
        return None

    # ------------------------------------------------------------------ decoding
    def decode_mode(self, step: int, steps: int, **overrides: Any) -> dict[str, Any]:
        """Keywords of :meth:`forward` and :meth:`step` for decoding a model trained for
        ``step`` of ``steps`` updates; ``overrides`` are :attr:`decode_options` fields."""
        if overrides:
            raise ValueError(
                f"model {self.name!r} has no decoding options; got {sorted(overrides)}"
            )
        return {}

    #: decoding options: a dataclass of :func:`pntm.config.option` fields, or None
    decode_options: ClassVar[type | None] = None


def sequences_that_fit(
    model: Model, length: int, capacity: int, training: bool, wanted: int
) -> int:
    """How many of ``wanted`` sequences one pass can take within 3/4 of the backend's memory
    (the rest is for the process itself; the estimates are measured peaks with a margin);
    raises :class:`MemoryError` with the estimate when not even one fits."""
    per_sequence = model.memory_per_sequence(length, capacity, training)
    limit = model.ops.memory_limit()
    if per_sequence is None or limit is None:
        return wanted
    budget = limit * 3 // 4
    if per_sequence > budget:
        what = "training on" if training else "evaluating"
        raise MemoryError(
            f"{what} one sequence of {length} tokens with {capacity} memory slots takes about "
            f"{per_sequence / 2**30:.1f} GiB with {model.name!r}, more than 3/4 of the "
            f"{limit / 2**30:.1f} GiB of {model.ops.describe()}"
        )
    return max(1, min(wanted, budget // per_sequence))


def cross_entropy(ops: Backend, logits: Array, targets: Array, mask: Array) -> Array:
    """Mean negative log-likelihood of ``targets`` over positions where ``mask`` is 1."""
    logp = ops.sum(ops.log_softmax(logits, -1) * ops.one_hot(targets, logits.shape[-1]), axis=-1)
    return -ops.sum(logp * mask) / ops.sum(mask)
