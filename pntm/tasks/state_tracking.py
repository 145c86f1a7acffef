"""State tracking: the target is the running state after each input symbol (SPEC §6)."""

from __future__ import annotations

import numpy as np

from pntm.tasks.base import Task


class Parity(Task):
    name = "parity"
    category = "state tracking"
    description = "running parity of a bit string: after each bit, 1 if an odd number of 1s so far"
    input_symbols = ("0", "1")
    output_symbols = ("0", "1")

    def sample_input(self, rng, length):
        return rng.integers(0, 2, length).tolist()

    def generate_target(self, inputs):
        return (np.cumsum(inputs) % 2).tolist()

    def solve(self, inputs):
        state, out = 0, []
        for bit in inputs:
            state ^= bit
            out.append(state)
        return out

    def input_length(self, length):
        return length

    def target_length(self, length):
        return length


class CycleNavigation(Task):
    name = "cycle_navigation"
    category = "state tracking"
    description = "position on a cycle of 5 (start 0) after each move of -1, 0 or +1"
    input_symbols = ("-1", "+0", "+1")
    output_symbols = ("p0", "p1", "p2", "p3", "p4")
    cycle = 5

    def sample_input(self, rng, length):
        return rng.integers(0, 3, length).tolist()

    def generate_target(self, inputs):
        return (np.cumsum(np.asarray(inputs) - 1) % self.cycle).tolist()

    def solve(self, inputs):
        position, out = 0, []
        for move in inputs:
            position = {0: position - 1, 1: position, 2: position + 1}[move]
            position %= self.cycle
            out.append(position)
        return out

    def input_length(self, length):
        return length

    def target_length(self, length):
        return length


class ModularArithmetic(Task):
    name = "modular_arithmetic"
    category = "state tracking"
    description = "running value mod 5 of d0 ± d1 ± d2 ..., digits 0..4, after each digit"
    input_symbols = ("0", "1", "2", "3", "4", "+", "-")
    output_symbols = ("0", "1", "2", "3", "4")
    modulus = 5
    length_unit = "digits"

    def sample_input(self, rng, length):
        digits = rng.integers(0, self.modulus, length)
        ops = rng.integers(5, 7, length - 1)  # token 5 is '+', 6 is '-'
        out = [int(digits[0])]
        for op, digit in zip(ops, digits[1:], strict=True):
            out += [int(op), int(digit)]
        return out

    def generate_target(self, inputs):
        digits = np.asarray(inputs[0::2])
        signs = np.concatenate([[1], np.where(np.asarray(inputs[1::2]) == 5, 1, -1)])
        return (np.cumsum(signs * digits) % self.modulus).tolist()

    def solve(self, inputs):
        value, sign, out = 0, 1, []
        for token in inputs:
            symbol = self.input_symbols[token]
            if symbol in "+-":
                sign = 1 if symbol == "+" else -1
            else:
                value = (value + sign * int(symbol)) % self.modulus
                out.append(value)
        return out

    def input_length(self, length):
        return 2 * length - 1

    def target_length(self, length):
        return length
