"""Every task's generator against its plain-Python solver, and the SPEC §6 token layout."""

from __future__ import annotations

import numpy as np
import pytest

from pntm import tasks

LENGTHS = (1, 2, 3, 5, 8, 16, 33, 64)
SEEDS = range(25)


@pytest.fixture(params=tasks.NAMES)
def task(request) -> tasks.Task:
    return tasks.get(request.param)


def test_generator_matches_solver(task):
    offset = len(task.input_symbols)
    checked = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        for length in LENGTHS:
            if length > task.max_length:
                continue
            inputs, target = task.example(rng, length)
            assert len(inputs) == task.input_length(length)
            assert len(target) == task.target_length(length)
            assert all(0 <= t < offset for t in inputs), "input tokens must be input symbols"
            assert all(offset <= t < task.sep_id for t in target), "targets are output symbols"
            assert [t - offset for t in target] == task.solve(inputs), (task.name, seed, length)
            checked += 1
    assert checked >= len(SEEDS) * 5


def test_solver_on_known_examples():
    cases = {
        "parity": ([1, 0, 1, 1], [1, 1, 0, 1]),
        "cycle_navigation": ([0, 0, 2, 1, 2, 2], [4, 3, 4, 4, 0, 1]),  # -1 -1 +1 +0 +1 +1
        "modular_arithmetic": ([4, 5, 3, 6, 2], [4, 2, 0]),  # 4 + 3 - 2 (mod 5)
        "copy": ([1, 0, 0], [1, 0, 0]),
        "reverse": ([1, 0, 0], [0, 0, 1]),
        "duplicate": ([1, 0], [1, 0, 1, 0]),
        "associative_recall": ([5, 64 + 3, 9, 64 + 7, 72, 9], [7]),
        "binary_addition": ([1, 1, 0, 2, 1, 0, 1], [0, 0, 0, 1]),  # 3 + 5 = 8, LSB first
        "binary_multiplication": ([1, 1, 3, 1, 0, 1], [1, 1, 1, 1, 0]),  # 3 * 5 = 15
    }
    assert set(cases) == set(tasks.NAMES)
    for name, (inputs, target) in cases.items():
        assert tasks.get(name).solve(inputs) == target, name


def test_generation_is_seeded(task):
    length = min(8, task.max_length)
    a = task.sequence(np.random.default_rng(7), length)
    b = task.sequence(np.random.default_rng(7), length)
    assert a == b
    assert len(a) == task.sequence_length(length)
    assert a[task.prompt_length(length) - 1] == task.sep_id and a[-1] == task.end_id


def test_batch_layout(task):
    rng = np.random.default_rng(0)
    lengths = [1, min(5, task.max_length), 3]
    batch = task.batch(rng, lengths)
    rng = np.random.default_rng(0)
    for i, length in enumerate(lengths):
        seq = task.sequence(rng, length)
        n = len(seq) - 1
        np.testing.assert_array_equal(batch.tokens[i, :n], seq[:-1])
        np.testing.assert_array_equal(batch.labels[i, :n], seq[1:])
        # loss positions are exactly those whose label is a target token or END
        expected = np.zeros(batch.mask.shape[1])
        expected[task.prompt_length(length) - 1 : n] = 1
        np.testing.assert_array_equal(batch.mask[i], expected)
        assert set(batch.labels[i, batch.mask[i] == 1]) <= {
            *range(len(task.input_symbols), task.sep_id),
            task.end_id,
        }
        assert (batch.tokens[i, n:] == task.end_id).all()


def test_associative_recall_keys_are_distinct():
    task = tasks.get("associative_recall")
    rng = np.random.default_rng(3)
    inputs, _ = task.example(rng, task.max_length)
    keys = inputs[0:-2:2]
    assert len(set(keys)) == len(keys) == task.max_length
    assert inputs[-1] in keys


@pytest.mark.parametrize("bad", [0, -3, 10**6])
def test_lengths_out_of_range_are_refused(task, bad):
    with pytest.raises(ValueError, match=rf"length {bad} is out of range .* allowed 1\.\."):
        task.example(np.random.default_rng(0), bad)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'copyy'; known tasks: parity"):
        tasks.get("copyy")


def test_decode_names_output_symbols_apart():
    task = tasks.get("copy")
    assert task.decode([1, 0, task.sep_id, 3, 2, task.end_id]) == "1 0 = 1' 0' ."
