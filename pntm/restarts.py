"""Restarts: train several runs of one configuration from different seeds, keep the best.

Some tasks reach their discrete machine on most seeds but not all (binary addition loses about
one training seed in five at the switch to hard heads; research log §17-18). A failed run is
plain in its cross-entropy on fresh sequences of the *training* lengths, decoded with hard
heads, so restarts need no long sequence and no evaluation data to choose: each restart is an
ordinary run (``restart-R/`` in the run directory, resumable on its own), and the one with the
lowest validation cross-entropy is copied to the run directory's checkpoint. A run whose rare
misses appear only beyond the training lengths (binary multiplication, §19) is told apart on a
validation *length*: with ``validation_factor`` F > 0 each restart is also decoded on fresh
sequences of F x the training length, and the one with the fewest misses there is kept, the
cross-entropy breaking ties. F should not be an evaluation length.

Restart 0 uses the run's seed, so one restart is exactly a plain run; restart ``r > 0`` uses a
seed derived from ``(seed, r)`` (:func:`restart_seed`). The validation sequences are drawn from
their own streams of the run's seed (``[seed, 2, batch]``, and ``[seed, 3, batch]`` at the
validation length), apart from training batches (``[seed, 1, step]``) and from evaluation
samples (``[seed, length]``). Restarts run side by side in processes of their own on
a CPU (one or more threads each), one after another elsewhere or under a data-parallel
launcher; ``restarts.json`` holds the plan from the start and each restart's result at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from pntm import backends, checkpoint, models, run, tasks
from pntm.models.base import cross_entropy, sequences_that_fit
from pntm.run import PLAN_NAME
from pntm.train import (
    CHECKPOINT_NAME,
    STOP_SIGNALS,
    StopSignals,
    TrainConfig,
    Trainer,
    TrainingDead,
    TrainingDiverged,
    TrainingStopped,
    fit,
    read_metrics,
)

#: fresh sequences of the training lengths each restart is scored on, and per pass
VALIDATION_SAMPLES = 2048
VALIDATION_BATCH = 256


class RestartsError(RuntimeError):
    """No restart finished (each diverged), or a plan that does not fit the run asked for."""


class RestartsStopped(TrainingStopped):
    """Restarts stopped by a signal, each at the step its checkpoint holds."""

    def __init__(self, signum: int, steps: list[int], total: int) -> None:
        super().__init__(signum, min(steps))
        self.steps = steps
        self.args = (
            f"stopped by {signal.Signals(signum).name} with the restarts at steps "
            f"{', '.join(map(str, steps))} of {total}",
        )


def check_choice(restarts: int, validation_factor: int) -> None:
    """Refuse a restart count below 1 or a validation factor below 0 (0: none), naming it."""
    for name, value, low in (
        ("restarts", restarts, 1),
        ("validation_factor", validation_factor, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def restart_seed(seed: int, restart: int) -> int:
    """The training seed of restart ``restart`` of a run seeded ``seed``: ``seed`` itself for
    restart 0 (one restart is a plain run), else a 32-bit seed derived from both, so that
    restarts of different seeds do not share runs."""
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def restart_dir(run_dir: str | Path, restart: int) -> Path:
    return Path(run_dir) / f"restart-{restart}"


@dataclass(frozen=True)
class Plan:
    """What a restarts run trains: the model, its config and the training config of the run
    (restart 0's; the others differ only in their seeds), and how many restarts."""

    model: str
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    restarts: int
    validation_factor: int = 0  # > 0: misses at this x the training length choose first

    def __post_init__(self) -> None:
        check_choice(self.restarts, self.validation_factor)
        if self.validation_factor:
            config = TrainConfig.from_dict(self.train_config)
            try:
                tasks.get(config.task).check_length(self.validation_length)
            except ValueError as exc:
                raise ValueError(
                    f"validation_factor {self.validation_factor} x training length "
                    f"{config.train_length}: {exc}"
                ) from exc

    @property
    def choice(self) -> str:
        """How the kept restart is chosen (:attr:`RestartResult.rank`), in words."""
        rule = "the lowest validation cross-entropy"
        if self.validation_factor:
            rule = f"the fewest misses at length {self.validation_length}, then {rule}"
        return rule

    @property
    def validation_length(self) -> int:
        """The length restarts are decoded at to count misses (0: none)."""
        return self.validation_factor * TrainConfig.from_dict(self.train_config).train_length

    @property
    def seed(self) -> int:
        """The run's seed: restart 0's, and the validation data's."""
        return TrainConfig.from_dict(self.train_config).seed

    def config(self, restart: int) -> TrainConfig:
        base = TrainConfig.from_dict(self.train_config)
        return replace(base, seed=restart_seed(base.seed, restart))

    def model_config_object(self) -> Any:
        return models.get(self.model).config_class.from_dict(self.model_config)


@dataclass(frozen=True)
class RestartResult:
    restart: int
    seed: int
    status: str  # "finished", "diverged" or "dead" (no gradient any more)
    step: int
    validation_loss: float  # infinite unless finished
    final_loss: float | None  # the last logged training loss
    train_seconds: float  # the optimizer steps' wall time (metrics.jsonl), this process only
    validation_misses: int | None = None  # at the plan's validation length, when it has one

    @property
    def rank(self) -> tuple[float, float]:
        """Lower is better: misses at the validation length (none counted: 0), then the
        cross-entropy at the training lengths."""
        return (self.validation_misses or 0, self.validation_loss)


def validation_loss(
    model: Any,
    params: Any,
    task: tasks.Task,
    train_length: int,
    mode: dict[str, Any],
    seed: int,
    samples: int = VALIDATION_SAMPLES,
) -> float:
    """Mean cross-entropy per target token of ``samples`` fresh sequences of lengths
    1..``train_length`` (drawn as training draws them, from the stream ``[seed, 2, i]``),
    teacher-forced in decoding mode ``mode`` (the P-NTM: hard heads). Penalties that are part
    of a model's training loss are left out: this scores what the model predicts."""
    ops = model.ops
    total = tokens_counted = 0.0

    def lengths(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(1, train_length + 1, n)

    passes = _validation_logits(model, params, task, mode, seed, 2, samples, lengths)
    for logits, labels, mask in passes:
        ce = cross_entropy(ops, logits, ops.asarray(labels), ops.asarray(mask))
        total += float(ops.to_numpy(ce)) * float(mask.sum())
        tokens_counted += float(mask.sum())
    return total / tokens_counted


def validation_misses(
    model: Any,
    params: Any,
    task: tasks.Task,
    length: int,
    mode: dict[str, Any],
    seed: int,
    samples: int = VALIDATION_SAMPLES,
) -> int:
    """How many of ``samples`` fresh sequences of ``length`` (from the stream ``[seed, 3, i]``)
    have a target token whose teacher-forced argmax in decoding mode ``mode`` is wrong: exactly
    the sequences greedy decoding gets wrong, since greedy decoding feeds back its own argmax."""
    ops = model.ops
    misses = 0

    def lengths(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, length)

    passes = _validation_logits(model, params, task, mode, seed, 3, samples, lengths)
    for logits, labels, mask in passes:
        wrong = (ops.to_numpy(ops.argmax(logits, -1)) != labels) & (mask > 0)
        misses += int(wrong.any(axis=1).sum())
    return misses


def _validation_logits(
    model: Any,
    params: Any,
    task: tasks.Task,
    mode: dict[str, Any],
    seed: int,
    stream: int,
    samples: int,
    draw_lengths: Callable[[np.random.Generator, int], np.ndarray],
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(logits, labels, mask) of ``samples`` fresh sequences, batch ``i`` drawn from
    ``[seed, stream, i]`` with lengths ``draw_lengths(rng, n)``, in as many passes as fit."""
    ops = model.ops
    for i, start in enumerate(range(0, samples, VALIDATION_BATCH)):
        rng = np.random.default_rng([seed, stream, i])
        lengths = draw_lengths(rng, min(VALIDATION_BATCH, samples - start))
        batch = task.batch(rng, lengths)
        capacity = batch.tokens.shape[1]
        size = sequences_that_fit(model, capacity, capacity, False, len(lengths))
        for j in range(0, len(lengths), size):
            rows = slice(j, j + size)
            logits = model.forward(params, ops.asarray(batch.tokens[rows]), capacity, **mode)
            yield logits, batch.labels[rows], batch.mask[rows]


def write_plan(
    run_dir: Path,
    plan: Plan,
    results: list[RestartResult] | None = None,
    selected: int | None = None,
    wall_seconds: float | None = None,
) -> None:
    """``restarts.json``: the plan, and (at the end) each restart's result and the one kept."""
    seed = plan.seed
    payload: dict[str, Any] = {
        **asdict(plan),
        "seeds": [restart_seed(seed, r) for r in range(plan.restarts)],
        "validation": {
            "samples": VALIDATION_SAMPLES,
            "lengths": "1..train_length, as in training",
            "data": f"numpy default_rng([{seed}, 2, batch])",
            "metric": "cross-entropy per target token, decoding mode (hard heads)",
        },
    }
    if plan.validation_factor:
        payload["validation_length"] = {
            "samples": VALIDATION_SAMPLES,
            "length": plan.validation_length,
            "data": f"numpy default_rng([{seed}, 3, batch])",
            "metric": "sequences with a wrong token (greedy misses); chosen first, then the "
            "cross-entropy",
        }
    if results is not None:
        payload["results"] = [asdict(r) for r in results]
        payload["selected"] = selected
        payload["wall_seconds"] = wall_seconds  # of the call that finished them
    text = json.dumps(payload, indent=2, allow_nan=True) + "\n"
    checkpoint.atomic_write(run_dir / PLAN_NAME, lambda tmp: Path(tmp).write_text(text))


def load_plan(run_dir: str | Path) -> Plan:
    path = Path(run_dir) / PLAN_NAME
    try:
        data = json.loads(path.read_text())
        return Plan(
            data["model"],
            data["model_config"],
            data["train_config"],
            data["restarts"],
            data.get("validation_factor", 0),  # plans written before it had none
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RestartsError(f"cannot read the restarts plan {path}: {exc}") from exc


def default_workers(restarts: int, ops: backends.Backend) -> int:
    """Restarts trained at once: as many as there are CPU cores on a CPU backend, one at a
    time on an accelerator (each restart has it to itself) or under a data-parallel launcher."""
    if not ops.on_cpu or ops.process_group().size > 1:
        return 1
    return max(1, min(restarts, os.cpu_count() or 1))


def train_restart(
    plan: Plan,
    run_dir: Path,
    restart: int,
    ops: backends.Backend,
    backend_name: str,
    progress: bool = False,
    on_step: Callable[[int], int | None] | None = None,
    resuming: bool = False,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> RestartResult:
    """Train (or resume, from its checkpoint) restart ``restart`` in its directory and score
    it; a diverged restart is reported, not raised (a stopped one raises
    :class:`TrainingStopped`). A new run refuses a directory holding run files; when
    ``resuming`` the plan, a restart killed before its first checkpoint starts again there."""
    directory = restart_dir(run_dir, restart)
    config = plan.config(restart)
    resume = None
    if (directory / CHECKPOINT_NAME).exists():
        resume = checkpoint.load(directory / CHECKPOINT_NAME)
        saved = (TrainConfig.from_dict(resume.train_config), resume.model, resume.model_config)
        if saved != (config, plan.model, plan.model_config):
            raise RestartsError(
                f"{directory} holds a run with other settings than the restarts plan of "
                f"{run_dir}; use another run directory"
            )
    trainer = Trainer(plan.model, plan.model_config_object(), config, ops, backend_name, resume)
    status = "finished"
    main = trainer.group.is_main
    with run.locked(directory) if main else contextlib.nullcontext():
        if resume is None and main and not resuming:
            run.check_new(directory)
        try:
            fit(
                trainer, directory, progress=progress, on_step=on_step, announce=progress,
                on_metrics=on_metrics,
            )  # fmt: skip
        except TrainingDiverged:
            status = "diverged"  # its last finite state is saved; the others may still win
        except TrainingDead:
            status = "dead"  # no gradient any more; the others may still win
    score, misses = math.inf, None
    if status == "finished":
        task = tasks.get(config.task)
        model, params, mode = trainer.model, trainer.params, trainer.decode_mode()
        score = validation_loss(model, params, task, config.train_length, mode, plan.seed)
        if plan.validation_factor:
            length = plan.validation_length
            misses = validation_misses(model, params, task, length, mode, plan.seed)
    metrics = read_metrics(directory)
    return RestartResult(
        restart=restart,
        seed=config.seed,
        status=status,
        step=trainer.step,
        validation_loss=score,
        final_loss=metrics[-1]["loss"] if metrics else None,
        train_seconds=sum(m["seconds"] for m in metrics),
        validation_misses=misses,
    )


def train_restarts(
    plan: Plan,
    run_dir: str | Path,
    backend_name: str,
    ops: backends.Backend,
    workers: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[list[RestartResult], int]:
    """Train every restart of ``plan`` in ``run_dir`` (resuming those with a checkpoint),
    ``workers`` at a time (default: :func:`default_workers`), then copy the best
    (:attr:`RestartResult.rank`) to ``run_dir``'s checkpoint. Returns the results and the index
    kept. The caller holds ``run_dir``'s lock; ``restarts.json`` is written before training.

    Raises :class:`TrainingStopped` when a signal stopped the restarts (each saved its
    checkpoint; calling again resumes them) and :class:`RestartsError` when none finished."""
    run_dir = Path(run_dir)
    workers = workers or default_workers(plan.restarts, ops)
    resuming = (run_dir / PLAN_NAME).exists()
    main = ops.process_group().is_main  # under a launcher, rank 0 alone writes
    if main:
        write_plan(run_dir, plan)
    start = time.perf_counter()
    if workers == 1:
        results = []
        for r in range(plan.restarts):
            say(f"restart {r} of {plan.restarts} (seed {plan.config(r).seed})")
            results.append(
                train_restart(plan, run_dir, r, ops, backend_name, progress, None, resuming)
            )
            say(_describe(results[-1]))
    else:
        results = _in_processes(plan, run_dir, backend_name, workers, progress, say, resuming)
    finished = [r for r in results if r.status == "finished"]
    if not finished:
        raise RestartsError(f"no restart of {run_dir} finished: every one diverged or died")
    best = min(finished, key=lambda r: r.rank)
    if main:
        src = restart_dir(run_dir, best.restart) / CHECKPOINT_NAME
        checkpoint.atomic_write(run_dir / CHECKPOINT_NAME, lambda tmp: shutil.copyfile(src, tmp))
        write_plan(run_dir, plan, results, best.restart, time.perf_counter() - start)
    return results, best.restart


def _describe(result: RestartResult) -> str:
    loss = "" if result.final_loss is None else f", training loss {result.final_loss:.3g}"
    misses = result.validation_misses
    missed = "" if misses is None else f", {misses} of {VALIDATION_SAMPLES} missed"
    return (
        f"restart {result.restart} (seed {result.seed}): {result.status} at step "
        f"{result.step}{loss}, validation cross-entropy {result.validation_loss:.3g}{missed}"
    )


# ------------------------------------------------------------------ restarts in processes

_stop: Any = None  # per-worker: set by the parent when it is asked to stop
_status: Any = None  # per-worker: shared (step, last logged loss) of every restart, for the bar


def _init_worker(stop: Any, status: Any, threads: int, parent: int) -> None:
    global _stop, _status
    _stop, _status = stop, status
    run.exit_with_parent(parent)  # no orphan training on if the parent is killed
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # a worker between restarts ignores Ctrl-C and the other stop signals (no traceback from
    # an idle process, no broken pool); while it trains, fit's own handler stops it at a step
    # boundary, as the parent's ``stop`` does
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _worker(
    plan: Plan, run_dir: Path, restart: int, backend_name: str, threads: int, resuming: bool
) -> RestartResult | None:
    """Train one restart in this worker; ``None`` when the run was stopped before it began
    (the pool may already have handed it over)."""
    if _stop.is_set():
        return None
    ops = backends.get(backend_name)
    backends.set_threads(ops, threads)
    backends.keep_freed_memory()

    steps, losses = _status

    def on_step(step: int) -> int | None:
        steps[restart] = step
        return signal.SIGTERM if _stop.is_set() else None

    def on_metrics(metrics: dict[str, Any]) -> None:
        losses[restart] = metrics["loss"]

    return train_restart(
        plan, run_dir, restart, ops, backend_name, False, on_step, resuming, on_metrics
    )


def _in_processes(
    plan: Plan,
    run_dir: Path,
    backend_name: str,
    workers: int,
    progress: bool,
    say: Callable[[str], None],
    resuming: bool,
) -> list[RestartResult]:
    from tqdm.auto import tqdm

    ctx = get_context("spawn")  # no fork of a process that may hold framework threads
    stop = ctx.Event()
    threads = max(1, (os.cpu_count() or 1) // workers)
    steps = plan.config(0).steps
    saved = [_checkpoint_step(restart_dir(run_dir, r)) for r in range(plan.restarts)]
    # each restart's step and last logged loss, for the progress bar
    status = (ctx.Array("q", saved), ctx.Array("d", [math.nan] * plan.restarts))
    say(
        f"{plan.restarts} restarts, {workers} at a time ({threads} thread"
        f"{'s' if threads > 1 else ''} each): seeds "
        + ", ".join(str(plan.config(r).seed) for r in range(plan.restarts))
    )
    results: dict[int, RestartResult] = {}
    bar = tqdm(total=plan.restarts * steps, initial=sum(saved), disable=not progress, unit="step")
    with (
        StopSignals(announce=True) as signals,
        ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(stop, status, threads, os.getpid()),
        ) as pool,
    ):
        futures = {
            pool.submit(_worker, plan, run_dir, r, backend_name, threads, resuming): r
            for r in range(plan.restarts)
        }
        pending, errors, stops = set(futures), [], []
        while pending:
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                if future.cancelled():
                    continue
                try:
                    result = future.result()
                except TrainingStopped as exc:  # saved; resumable
                    stops.append(exc)
                    continue
                except Exception as exc:  # raised once the others have stopped
                    errors.append(exc)
                    continue
                if result is None:
                    continue
                results[result.restart] = result
                if progress:
                    bar.write(_describe(result))
                else:
                    say(_describe(result))
            if (signals.signum is not None or errors or stops) and not stop.is_set():
                stop.set()  # each restart under way saves at its next step boundary
                for future in pending:
                    future.cancel()  # those not started: nothing to save
            done = sum(status[0])
            if done > bar.n:
                bar.set_postfix_str(_status_line(status, steps, results), refresh=False)
                bar.update(done - bar.n)
            time.sleep(0.2)
    bar.close()
    if any(isinstance(e, BrokenProcessPool) for e in errors):
        raise RestartsError(
            f"a process training a restart of {run_dir} ended abruptly (killed, or out of "
            "memory); each restart's last checkpoint is kept, so the run can be resumed"
        ) from next(e for e in errors if isinstance(e, BrokenProcessPool))
    if errors:
        raise errors[0]
    if stops or signals.signum is not None:
        saved = [_checkpoint_step(restart_dir(run_dir, r)) for r in range(plan.restarts)]
        raise RestartsStopped(signals.signum or stops[0].signum, saved, steps)
    bar.close()
    return [results[r] for r in sorted(results)]


def _status_line(status: Any, steps: int, results: dict[int, RestartResult]) -> str:
    """Each restart's state for the progress bar: ``r0 1200/8000 loss 0.21``, or its end."""
    parts = []
    for r, (step, loss) in enumerate(zip(*status, strict=True)):
        if r in results:
            parts.append(f"r{r} {results[r].status}")
        else:
            parts.append(f"r{r} {step}/{steps}" + ("" if math.isnan(loss) else f" loss {loss:.3g}"))
    return " | ".join(parts)


def _checkpoint_step(directory: Path) -> int:
    path = directory / CHECKPOINT_NAME
    return checkpoint.load(path).step if path.exists() else 0
