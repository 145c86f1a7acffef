"""Memorization: the target is (a rearrangement of) what was stored."""

from __future__ import annotations

from pntm.tasks.base import Task


class _BitStringTask(Task):
    category = "memorization"
    input_symbols = ("0", "1")
    output_symbols = ("0", "1")

    def sample_input(self, rng, length):
        return rng.integers(0, 2, length).tolist()

    def input_length(self, length):
        return length


class Copy(_BitStringTask):
    name = "copy"
    description = "repeat a bit string"

    def generate_target(self, inputs):
        return list(inputs)

    def solve(self, inputs):
        out = []
        for bit in inputs:
            out.append(bit)
        return out

    def target_length(self, length):
        return length


class Reverse(_BitStringTask):
    name = "reverse"
    description = "a bit string backwards"

    def generate_target(self, inputs):
        return inputs[::-1]

    def solve(self, inputs):
        out = []
        for i in range(len(inputs) - 1, -1, -1):
            out.append(inputs[i])
        return out

    def target_length(self, length):
        return length


class Duplicate(_BitStringTask):
    name = "duplicate"
    description = "a bit string twice"

    def generate_target(self, inputs):
        return inputs * 2

    def solve(self, inputs):
        out = []
        for _ in range(2):
            for bit in inputs:
                out.append(bit)
        return out

    def target_length(self, length):
        return 2 * length


class AssociativeRecall(Task):
    """``k1 v1 k2 v2 ... kL vL ? q = v .``: distinct keys, each bound to a value; the target is
    the value bound to the query key ``q``. Reads must be content-addressed."""

    name = "associative_recall"
    category = "memorization"
    description = "key-value pairs (distinct keys), then a query key: recall its value"
    n_keys, n_values = 64, 8
    input_symbols = (
        *(f"k{i}" for i in range(n_keys)),
        *(f"v{i}" for i in range(n_values)),
        "?",
    )
    output_symbols = tuple(f"v{i}" for i in range(n_values))
    max_length = n_keys  # keys are distinct
    default_train_length = 8
    needs_content = True
    length_unit = "key-value pairs"

    @property
    def query_id(self) -> int:
        return self.n_keys + self.n_values

    def sample_input(self, rng, length):
        keys = rng.permutation(self.n_keys)[:length]
        values = rng.integers(0, self.n_values, length)
        query = keys[rng.integers(0, length)]
        out = []
        for key, value in zip(keys, values, strict=True):
            out += [int(key), self.n_keys + int(value)]
        return [*out, self.query_id, int(query)]

    def generate_target(self, inputs):
        table = dict(zip(inputs[0:-2:2], inputs[1:-2:2], strict=True))
        return [table[inputs[-1]] - self.n_keys]

    def solve(self, inputs):
        query = inputs[-1]
        for i in range(0, len(inputs) - 2, 2):
            if inputs[i] == query:
                return [inputs[i + 1] - self.n_keys]
        raise ValueError(f"query key {query} is not among the stored keys")

    def input_length(self, length):
        return 2 * length + 2

    def target_length(self, length):
        return 1
