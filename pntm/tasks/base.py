"""What every task shares: the token layout of SPEC §6 and batching.

A sequence is ``input SEP target END``. Input and target symbols have their own token ids
(an output bit 1 is not the token of an input bit 1), so a pointwise controller can tell from
the token alone whether it reads the input or its own output. Token ids, in order:

    input symbols | output symbols | SEP | END

A task is defined by three methods: ``sample_input`` draws an input of a given length,
``generate_target`` computes its target the way a data generator would (often vectorised or
through integers), and ``solve`` computes it again as a plain Python loop over the tokens. The
tests check the two against each other over many seeds and lengths.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

SEP_NAME, END_NAME = "=", "."


@dataclass(frozen=True)
class Batch:
    """Teacher-forcing batch: ``tokens`` (B, T) in, ``labels`` (B, T) the next token, ``mask``
    (B, T) 1.0 where the label is a target token or END. Shorter sequences are right-padded
    with END (masked out; a causal model never sees padding before a real position)."""

    tokens: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray


class Task(abc.ABC):
    """One task: input and output alphabets, how inputs are drawn, and what the target is."""

    name: ClassVar[str]
    category: ClassVar[str]  # "state tracking", "memorization" or "arithmetic"
    description: ClassVar[str]
    input_symbols: ClassVar[tuple[str, ...]]
    output_symbols: ClassVar[tuple[str, ...]]
    # The longest length a task generates: past it, the symbols run out (associative recall) or
    # evaluation would hold B x T x K x N head distributions of many GB.
    max_length: ClassVar[int] = 2048
    default_train_length: ClassVar[int] = 16
    needs_content: ClassVar[bool] = False  # reads must be content-addressed
    length_unit: ClassVar[str] = "input symbols"

    # ------------------------------------------------------------------ what a task defines
    @abc.abstractmethod
    def sample_input(self, rng: np.random.Generator, length: int) -> list[int]:
        """An input of ``length`` (in :attr:`length_unit`), as input-symbol indices."""

    @abc.abstractmethod
    def generate_target(self, inputs: list[int]) -> list[int]:
        """The target as output-symbol indices, computed the generator's way."""

    @abc.abstractmethod
    def solve(self, inputs: list[int]) -> list[int]:
        """The target again, by a plain Python loop over the input symbols (the check)."""

    @abc.abstractmethod
    def input_length(self, length: int) -> int:
        """Number of input symbols of an example of ``length``."""

    @abc.abstractmethod
    def target_length(self, length: int) -> int:
        """Number of target symbols of an example of ``length``."""

    # ------------------------------------------------------------------ vocabulary
    @property
    def sep_id(self) -> int:
        return len(self.input_symbols) + len(self.output_symbols)

    @property
    def end_id(self) -> int:
        return self.sep_id + 1

    @property
    def vocab_size(self) -> int:
        return self.end_id + 1

    def vocabulary(self) -> list[str]:
        """Display name of every token id; output symbols are primed (``1'``)."""
        return [
            *self.input_symbols,
            *(f"{s}'" for s in self.output_symbols),
            SEP_NAME,
            END_NAME,
        ]

    def decode(self, tokens: list[int] | np.ndarray) -> str:
        names = self.vocabulary()
        return " ".join(names[int(t)] if 0 <= int(t) < len(names) else f"<{t}>" for t in tokens)

    # ------------------------------------------------------------------ sequences
    def check_length(self, length: int) -> None:
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool):
            raise ValueError(f"length must be an integer, got {length!r}")
        if not 1 <= length <= self.max_length:
            raise ValueError(
                f"length {length} is out of range for task {self.name!r}: "
                f"allowed 1..{self.max_length} ({self.length_unit})"
            )

    def prompt_length(self, length: int) -> int:
        """Tokens fed before the first target token: the input and SEP."""
        return self.input_length(length) + 1

    def sequence_length(self, length: int) -> int:
        """Tokens of a whole example: input, SEP, target, END."""
        return self.prompt_length(length) + self.target_length(length) + 1

    def example(self, rng: np.random.Generator, length: int) -> tuple[list[int], list[int]]:
        """A seeded ``(input tokens, target tokens)`` pair; target ids are output-symbol ids."""
        self.check_length(length)
        inputs = self.sample_input(rng, length)
        offset = len(self.input_symbols)
        return inputs, [offset + y for y in self.generate_target(inputs)]

    def sequence(self, rng: np.random.Generator, length: int) -> list[int]:
        inputs, target = self.example(rng, length)
        return [*inputs, self.sep_id, *target, self.end_id]

    def batch(self, rng: np.random.Generator, lengths: list[int] | np.ndarray) -> Batch:
        """Teacher-forcing batch of one example per entry of ``lengths``."""
        seqs = [self.sequence(rng, int(n)) for n in lengths]
        width = max(len(s) for s in seqs) - 1
        tokens = np.full((len(seqs), width), self.end_id, dtype=np.int64)
        labels = np.full((len(seqs), width), self.end_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width))
        for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            tokens[i, : len(seq) - 1] = seq[:-1]
            labels[i, : len(seq) - 1] = seq[1:]
            # label position p predicts seq[p + 1]: target tokens and END follow the prompt
            mask[i, self.prompt_length(int(n)) - 1 : len(seq) - 1] = 1.0
        return Batch(tokens, labels, mask, np.asarray(lengths, dtype=np.int64))


def bits_lsb_first(value: int, width: int) -> list[int]:
    """``value`` as ``width`` bits, least significant first."""
    return [(value >> i) & 1 for i in range(width)]
