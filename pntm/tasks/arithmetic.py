"""Arithmetic on binary numbers, least significant bit first (so carries flow forward)."""

from __future__ import annotations

from pntm.tasks.base import Task, bits_lsb_first


class _BinaryOperation(Task):
    category = "arithmetic"
    input_symbols = ("0", "1", "+", "*")
    output_symbols = ("0", "1")
    length_unit = "bits of the long operand"
    default_train_length = 8

    def _operands(self, inputs: list[int]) -> tuple[list[int], list[int]]:
        split = next(i for i, t in enumerate(inputs) if t >= 2)
        return inputs[:split], inputs[split + 1 :]


class BinaryAddition(_BinaryOperation):
    name = "binary_addition"
    description = "a + b, both of L bits, LSB first; the sum has L + 1 bits"

    def sample_input(self, rng, length):
        a, b = rng.integers(0, 2, (2, length)).tolist()
        return [*a, 2, *b]

    def generate_target(self, inputs):
        a, b = self._operands(inputs)
        value = sum(bit << i for i, bit in enumerate(a)) + sum(bit << i for i, bit in enumerate(b))
        return bits_lsb_first(value, len(a) + 1)

    def solve(self, inputs):
        a, b = self._operands(inputs)
        carry, out = 0, []
        for x, y in zip(a, b, strict=True):  # ripple-carry adder
            total = x + y + carry
            out.append(total % 2)
            carry = total // 2
        return [*out, carry]

    def input_length(self, length):
        return 2 * length + 1

    def target_length(self, length):
        return length + 1


class BinaryMultiplication(_BinaryOperation):
    name = "binary_multiplication"
    description = "a * b, a of L bits, b of 3 bits, LSB first; the product has L + 3 bits"
    short_bits = 3

    def sample_input(self, rng, length):
        a = rng.integers(0, 2, length).tolist()
        b = rng.integers(0, 2, self.short_bits).tolist()
        return [*a, 3, *b]

    def generate_target(self, inputs):
        a, b = self._operands(inputs)
        value = sum(bit << i for i, bit in enumerate(a)) * sum(bit << i for i, bit in enumerate(b))
        return bits_lsb_first(value, len(a) + len(b))

    def solve(self, inputs):
        a, b = self._operands(inputs)
        product = [0] * (len(a) + len(b))
        for j, y in enumerate(b):  # schoolbook: add a shifted by j wherever b_j = 1
            if not y:
                continue
            carry = 0
            for i in range(len(product) - j):
                x = a[i] if i < len(a) else 0
                total = product[i + j] + x + carry
                product[i + j], carry = total % 2, total // 2
        return product

    def input_length(self, length):
        return length + 1 + self.short_bits

    def target_length(self, length):
        return length + self.short_bits
