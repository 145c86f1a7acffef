"""Length generalization by greedy autoregressive decoding (SPEC §6).

For each length L: draw ``samples`` examples (seeded by ``(seed, L)``, so a length's samples do
not depend on which other lengths are evaluated), prefill the prompt (input and SEP) with the
parallel form, then decode with the step form, feeding each emitted token back, for the target
length plus END. A sample is exact when every target token and END are right; token accuracy
counts the same positions. Capacity (memory slots N of the P-NTM and the NTM): the whole
sequence length at each L (as in training, where it is T of the padded batch), unless fixed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pntm.checkpoint import atomic_write
from pntm.models.base import sequences_that_fit
from pntm.tasks.base import Task


@dataclass(frozen=True)
class LengthResult:
    length: int
    capacity: int
    samples: int
    exact_match: float
    token_accuracy: float


def default_lengths(train_length: int, task: Task, factors: tuple[int, ...] = (1, 2, 4, 8)):
    """L_train, 2x, 4x, 8x, capped at the task's limit."""
    return sorted({min(f * train_length, task.max_length) for f in factors})


def check_capacity(task: Task, lengths: list[int], capacity: int | None) -> None:
    """A fixed ``capacity`` must hold the longest prompt (input and SEP)."""
    for length in lengths:
        task.check_length(length)
    if capacity is None:
        return
    longest = max(lengths)
    need = task.prompt_length(longest)
    if capacity < need:
        raise ValueError(
            f"capacity {capacity} is too small for task {task.name!r} at length {longest}: "
            f"its input and separator take {need} tokens, so it must be >= {need}"
        )


def greedy_decode(
    model: Any,
    params: Any,
    prompts: np.ndarray,
    n_new: int,
    capacity: int,
    mode: dict[str, Any],
    on_token: Callable[[], None] | None = None,
) -> np.ndarray:
    """``n_new`` greedily decoded tokens (B, n_new) after ``prompts`` (B, P): the prompt by the
    parallel form, then one step per token; ``mode`` is the model's :meth:`decode_mode`;
    ``on_token()`` after each token (a progress display)."""
    ops, tick = model.ops, on_token or (lambda: None)
    logits, state = model.forward(params, ops.asarray(prompts), capacity, return_state=True, **mode)
    token = ops.argmax(logits[:, -1], -1)
    out = [ops.to_numpy(token)]
    tick()
    for _ in range(n_new - 1):
        logits, state = model.step(params, state, token, **mode)
        token = ops.argmax(logits, -1)
        out.append(ops.to_numpy(token))
        tick()
    return np.stack(out, axis=1).astype(np.int64)


def evaluate(
    model: Any,
    params: Any,
    task: Task,
    lengths: list[int],
    samples: int = 64,
    seed: int = 0,
    mode: dict[str, Any] | None = None,
    capacity: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[LengthResult]:
    """Greedy exact match and token accuracy at each length (module docstring); ``mode`` is
    the model's :meth:`decode_mode`, ``capacity`` None = the sequence length. Samples go
    through the model ``batch_size`` at a time, or fewer where that would not fit in memory.
    ``progress``: a progress bar of decoded tokens on a terminal (a long length can take
    minutes)."""
    from tqdm.auto import tqdm

    check_capacity(task, lengths, capacity)
    per_pass = {  # a length that cannot fit fails here, before any is evaluated
        length: sequences_that_fit(
            model,
            task.prompt_length(length),
            capacity or task.sequence_length(length),
            False,
            batch_size,
        )
        for length in lengths
    }
    mode = mode or {}
    results = []
    answers = {n: task.sequence_length(n) - task.prompt_length(n) for n in lengths}
    bar = tqdm(
        total=samples * sum(answers.values()),
        unit="token",
        unit_scale=True,
        disable=None if progress else True,  # None: shown on a terminal only
        dynamic_ncols=True,
    )
    for length in lengths:
        bar.set_postfix(length=length)
        rng = np.random.default_rng([seed, length])
        seqs = np.array([task.sequence(rng, length) for _ in range(samples)])
        prompt_len = task.prompt_length(length)
        size = capacity or task.sequence_length(length)
        n_new = seqs.shape[1] - prompt_len
        batches = []
        for i in range(0, samples, per_pass[length]):
            prompts = seqs[i : i + per_pass[length], :prompt_len]
            step = functools.partial(bar.update, len(prompts))
            batches.append(greedy_decode(model, params, prompts, n_new, size, mode, step))
        predicted = np.concatenate(batches)
        correct = predicted == seqs[:, prompt_len:]
        results.append(
            LengthResult(
                length=length,
                capacity=size,
                samples=samples,
                exact_match=float(correct.all(axis=1).mean()),
                token_accuracy=float(correct.mean()),
            )
        )
    bar.close()
    return results


def format_table(results: list[LengthResult], train_length: int, memory: bool = True) -> str:
    """The results as a text table; ``memory``: the model has memory slots (else its
    capacity column shows -)."""
    header = ("length", "x train", "capacity", "samples", "exact", "token acc")
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(header, (8, 8, 8, 8, 7, 9), strict=True))]
    for r in results:
        capacity = f"{r.capacity:>8d}" if memory else f"{'-':>8}"
        lines.append(
            f"{r.length:>8d} {r.length / train_length:>7.3g}x {capacity} {r.samples:>8d} "
            f"{r.exact_match:>7.3f} {r.token_accuracy:>9.3f}"
        )
    return "\n".join(lines)


def write_json(path: str | Path, info: dict[str, Any], results: list[LengthResult]) -> None:
    payload = {**info, "results": [asdict(r) for r in results]}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))


def style_length_axes(ax: Any, lengths: list[int], train_length: int) -> None:
    """Accuracy against length on matplotlib axes ``ax``: log2 length axis ticked at the
    evaluated lengths, accuracy from 0 to 1, the training length marked."""
    ax.axvline(train_length, color="grey", lw=0.8, ls=":", label=f"L_train = {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("length")


def plot(path: str | Path, title: str, results: list[LengthResult], train_length: int) -> None:
    """Exact match and token accuracy against length (log2 axis), training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r.length for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
    ax.plot(lengths, [r.exact_match for r in results], "o-", label="exact match")
    ax.plot(lengths, [r.token_accuracy for r in results], "s--", label="token accuracy")
    style_length_axes(ax, lengths, train_length)
    ax.set_ylabel("accuracy (greedy decoding)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
