"""Greedy decoding and the length-generalization metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pntm import backends, tasks
from pntm.evaluate import (
    LengthResult,
    check_capacity,
    default_lengths,
    evaluate,
    greedy_decode,
    plot,
    write_json,
)
from pntm.models.pntm import PNTM, PNTMConfig, init_params


class OracleModel:
    """Emits the right next token of a task (by its solver), except at ``wrong_at`` output
    positions (0-based), where it emits a wrong one: a model with known accuracy."""

    def __init__(self, task: tasks.Task, wrong_at: tuple[int, ...] = ()) -> None:
        self.task, self.wrong_at = task, set(wrong_at)
        self.ops = backends.get("numpy")

    def _logits(self, history: list[int]) -> np.ndarray:
        task = self.task
        sep = history.index(task.sep_id)
        expected = [len(task.input_symbols) + y for y in task.solve(history[:sep])] + [task.end_id]
        position = len(history) - sep - 1
        token = expected[position]
        if position in self.wrong_at:
            token = (token + 1) % task.vocab_size
        return np.eye(task.vocab_size)[token]

    def memory_per_sequence(self, length, capacity, training):
        return None  # holds histories only

    def forward(self, params, tokens, capacity, return_state):
        histories = [list(map(int, row)) for row in tokens]
        logits = np.stack([[self._logits(h)] for h in histories])
        return logits, histories

    def step(self, params, state, token):
        histories = [[*h, int(t)] for h, t in zip(state, token, strict=True)]
        return np.stack([self._logits(h) for h in histories]), histories


@pytest.mark.parametrize("name", tasks.NAMES)
def test_oracle_is_exact(name):
    task = tasks.get(name)
    lengths = [1, 3, min(9, task.max_length)]
    results = evaluate(OracleModel(task), None, task, lengths, samples=5)
    assert [(r.exact_match, r.token_accuracy) for r in results] == [(1.0, 1.0)] * 3
    assert [r.capacity for r in results] == [task.sequence_length(n) for n in lengths]


def test_one_wrong_token_fails_the_sample_but_not_the_other_tokens():
    task = tasks.get("copy")
    results = evaluate(OracleModel(task, wrong_at=(2,)), None, task, [2, 7], samples=4)
    short, long = results
    assert short.token_accuracy == pytest.approx(2 / 3)  # 2 bits + END, END wrong
    assert long.token_accuracy == pytest.approx(7 / 8) and long.exact_match == 0.0


def test_samples_of_a_length_do_not_depend_on_the_other_lengths():
    task = tasks.get("parity")
    a = evaluate(OracleModel(task, wrong_at=(0,)), None, task, [4], samples=3)
    b = evaluate(OracleModel(task, wrong_at=(0,)), None, task, [2, 4], samples=3)
    assert a[0] == b[1]


def test_greedy_decode_matches_full_recomputation(ops):
    """Prefill + step decoding emits what re-running the parallel form on the growing
    sequence would emit (hard heads: the mode evaluation uses)."""
    task = tasks.get("copy")
    config = PNTMConfig(task.vocab_size, d_model=16, n_layers=2, n_heads=2, head_dim=4)
    model = PNTM(config, ops)
    params = model.params_from_numpy(init_params(config, 3))
    rng = np.random.default_rng(0)
    prompts = np.array([task.sequence(rng, 5)[:6] for _ in range(3)])
    decoded = greedy_decode(model, params, prompts, 6, 12, {"heads": "hard"})
    seq = prompts
    for _ in range(6):
        logits = ops.to_numpy(model.forward(params, ops.asarray(seq), 12, heads="hard"))
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(decoded, seq[:, prompts.shape[1] :])


def test_default_lengths_are_capped_at_the_task_limit():
    assert default_lengths(16, tasks.get("copy")) == [16, 32, 64, 128]
    assert default_lengths(16, tasks.get("associative_recall")) == [16, 32, 64]


def test_capacity_too_small_is_refused():
    task = tasks.get("copy")
    check_capacity(task, [8, 16], 17)  # 16 input bits and SEP fit
    with pytest.raises(ValueError, match=r"capacity 16 is too small .* must be >= 17"):
        check_capacity(task, [8, 16], 16)


def test_json_and_plot_are_written(tmp_path):
    results = [LengthResult(8, 18, 4, 1.0, 1.0), LengthResult(16, 34, 4, 0.5, 0.9)]
    write_json(tmp_path / "e.json", {"task": "copy"}, results)
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["task"] == "copy" and data["results"][1]["exact_match"] == 0.5
    plot(tmp_path / "e.png", "copy", results, 8)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.png"]


def test_progress_counts_every_decoded_token(monkeypatch):
    """The progress bar of a long evaluation (once silent for ten minutes) counts each decoded
    token of every sample, across lengths and batches, and reaches its total."""
    import tqdm.auto

    seen = {}

    class Bar:
        def __init__(self, total, disable, **kwargs):
            seen.update(total=total, disable=disable, done=0)

        def update(self, n):
            seen["done"] += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    task = tasks.get("copy")
    evaluate(OracleModel(task), None, task, [2, 7], samples=5, batch_size=2, progress=True)
    answers = sum(task.sequence_length(n) - task.prompt_length(n) for n in (2, 7))
    assert seen == {"total": 5 * answers, "disable": None, "done": 5 * answers}
