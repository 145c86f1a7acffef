"""One training loop for every model and backend: teacher forcing on a task's sequences, AdamW,
linear warm-up then cosine decay, global-norm clipping, and whatever schedule the model has of
its own (the P-NTM head schedule: :meth:`pntm.models.base.Model.train_mode`).

:class:`Trainer` holds the parameters and optimizer state on one backend and can be rebuilt
exactly from a checkpoint: the batch of step s is drawn from (seed, s) alone, so a resumed run,
or one split over any number of data-parallel processes, sees the same data. :func:`fit` runs it
with a progress bar, JSONL metrics and periodic atomic checkpoints, stops cleanly on a signal,
and stops with :class:`TrainingDiverged` at the first non-finite loss, gradient or update.

Data parallel: under ``torchrun`` or ``mlx.launch`` every process builds the same global batch,
trains on its rows, and the gradients are summed by the framework's collective in
:meth:`Trainer.apply`, weighted so that the result is the gradient of the global batch's loss;
rank 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pntm import checkpoint, models, tasks
from pntm.backends.base import Backend
from pntm.config import check_finite, check_ints, config_from_dict, option
from pntm.models.base import sequences_that_fit
from pntm.optim import AdamW, clip_by_global_norm
from pntm.tree import tree_flatten, tree_leaves, tree_map, tree_unflatten

CHECKPOINT_NAME = "checkpoint.safetensors"
_ADDED_FIELDS = {"log_every", "save_every"}  # TrainConfig fields newer than checkpoint format 1
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """What every model's training shares; a model's own schedule (e.g. the P-NTM head
    schedule) lives in its config (:meth:`pntm.models.base.Model.train_mode`)."""

    task: str = option("copy", "Task to train on (see `pntm tasks`).", choices=tasks.NAMES)
    train_length: int = option(
        16, "Training lengths are drawn uniformly from 1..this (default: the task's)."
    )
    steps: int = option(1500, "Optimizer steps.", minimum=1)
    batch_size: int = option(32, "Sequences per step.", minimum=1)
    lr: float = option(2e-3, "Peak learning rate of AdamW.", minimum=0, min_open=True)
    warmup_steps: int = option(100, "Linear warm-up steps before the cosine decay.", minimum=0)
    min_lr_ratio: float = option(0.1, "The cosine decays to lr x this.", minimum=0, maximum=1)
    weight_decay: float = option(0.0, "Decoupled (AdamW) weight decay.", minimum=0)
    clip_norm: float = option(1.0, "Global gradient-norm clip.", minimum=0, min_open=True)
    seed: int = option(
        0, "Seeds the parameters and the data: the batch of step s depends only on (seed, s)."
    )
    log_every: int = option(10, "Steps per line of metrics.jsonl.", minimum=1)
    save_every: int = option(
        250, "Steps between checkpoints (also saved at the end and when stopped).", minimum=1
    )

    def __post_init__(self) -> None:
        tasks.get(self.task).check_length(self.train_length)
        check_ints(self, ("train_length", "steps", "batch_size", "log_every", "save_every"))
        check_ints(self, ("warmup_steps", "seed"), minimum=0)
        check_finite(self.lr, "lr", 0, low_open=True)
        check_finite(self.min_lr_ratio, "min_lr_ratio", 0, 1)
        check_finite(self.weight_decay, "weight_decay", 0)
        check_finite(self.clip_norm, "clip_norm", 0, low_open=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From a checkpoint's dict: every field, except those added since checkpoints were
        first written (they take their defaults), must be there."""
        missing = {f.name for f in fields(cls)} - set(data) - _ADDED_FIELDS
        if missing:
            raise ValueError(f"the training config lacks {sorted(missing)}")
        return config_from_dict(cls, data, "training config")

    def lr_at(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or update; the trainer still holds the last finite state."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"training diverged at step {step}: {what}; the run keeps step {step - 1}, its last "
            "finite state (try a lower learning rate or a tighter gradient clip)"
        )
        self.step = step


#: bytes a parameter takes while training: its float64 draw (8), the float32 parameter (4), its
#: gradient (4), AdamW's two moments (8), an update's temporaries (8) and a checkpoint's
#: float32 copies of the parameter and its moments (12)
TRAINING_BYTES_PER_PARAMETER = 44

#: a run whose gradient is exactly zero for this many updates in a row, at a loss above
#: :data:`DEAD_LOSS`, has stopped learning for good (saturated units pass no gradient)
DEAD_STEPS = 20
DEAD_LOSS = 1e-3  # below it a zero gradient may be a (float32-)perfect fit


class TrainingDead(RuntimeError):
    """The gradient has been exactly zero for :data:`DEAD_STEPS` updates at a loss that is not
    near zero: nothing will change any more. Nothing is saved over the last checkpoint."""

    def __init__(self, step: int, loss: float, vocab_size: int) -> None:
        uniform = math.log(vocab_size)
        said = (
            f" (ln {vocab_size}: uniform guesses over the {vocab_size}-token vocabulary)"
            if abs(loss - uniform) < 1e-3 * uniform
            else ""
        )
        super().__init__(
            f"training stopped at step {step}: the gradient was exactly zero for the last "
            f"{DEAD_STEPS} updates at loss {loss:.4f}{said}, so the model is dead (saturated "
            "units pass no gradient; usually a learning rate far too high, or damaged "
            "parameters); nothing was saved over the last checkpoint"
        )
        self.step, self.loss, self.vocab_size = step, loss, vocab_size

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: it crosses process boundaries
        return type(self), (self.step, self.loss, self.vocab_size)


class TrainingStopped(Exception):
    """Training was stopped by a signal (Ctrl-C, SIGTERM) at a step boundary, after saving."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: it crosses process boundaries
        return type(self), (self.signum, self.step)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


class Trainer:
    """Parameters, optimizer state and step of one run, on one backend and one process of a
    data-parallel group. It speaks only the model contract (:mod:`pntm.models.base`), so any
    model trains the same way."""

    def __init__(
        self,
        model_name: str,
        model_config: Any,
        config: TrainConfig,
        ops: Backend,
        backend_name: str,
        resume_from: checkpoint.Checkpoint | None = None,
    ) -> None:
        if not ops.trainable:
            raise ValueError(
                f"backend {backend_name!r} evaluates but does not train; "
                "train with torch, triton or mlx"
            )
        self.model_class = models.get(model_name)
        self.model_config = model_config
        self.config = config
        self.task = tasks.get(config.task)
        self.ops, self.backend_name = ops, backend_name
        self.group = ops.process_group()
        if config.batch_size < self.group.size:
            raise ValueError(
                f"batch_size {config.batch_size} is smaller than the {self.group.size} "
                "processes: every process needs at least one sequence of the global batch"
            )
        # this process's rows of every global batch (contiguous, sizes differ by at most 1)
        bounds = np.linspace(0, config.batch_size, self.group.size + 1).round().astype(int)
        self.rows = slice(int(bounds[self.group.rank]), int(bounds[self.group.rank + 1]))
        self._check_options()
        self.model = self.model_class(model_config, ops)
        self._check_memory()
        self.optimizer = AdamW(lr=config.lr, weight_decay=config.weight_decay)
        if resume_from is None:
            self.step = 0
            self.params = self.model.params_from_numpy(
                self.model_class.init_params(model_config, config.seed)
            )
            self.opt_state = self.optimizer.init(ops, self.params)
        else:
            if resume_from.optimizer is None:
                raise ValueError("the checkpoint holds no optimizer state to resume from")
            for name, v in tree_flatten(resume_from.optimizer["v"]).items():
                if v.size and v.min() < 0:  # an average of squared gradients: never negative
                    raise ValueError(
                        "the checkpoint holds a damaged optimizer state: "
                        f"optimizer.v.{name}, AdamW's average of squared gradients, has "
                        f"negative values (down to {float(v.min()):.3g}); it can be evaluated "
                        "but not resumed"
                    )
            self.step = resume_from.step
            self.params = self.model.params_from_numpy(resume_from.params)
            self.opt_state = {
                "step": resume_from.optimizer["step"],
                "m": self.model.params_from_numpy(resume_from.optimizer["m"]),
                "v": self.model.params_from_numpy(resume_from.optimizer["v"]),
            }
        self._value_and_grad: dict[tuple, Callable[..., Any]] = {}

    def _check_options(self) -> None:
        """Before anything is built: a shift range no memory of the run can hold, and a model
        whose parameters and optimizer state do not fit in memory (such a run was once killed
        by the system at 22 GB without a word, leaving a directory that blocked the command)."""
        name, config = self.model_class.name, self.model_config
        slots = self.task.sequence_length(self.config.train_length) - 1  # the widest batch's N
        shift = getattr(config, "max_shift", None)
        if shift is not None and 2 * shift + 1 > slots:
            raise ValueError(
                f"max_shift {shift}: heads would move by up to {shift} slots a step, but the "
                f"longest training sequence (train_length {self.config.train_length}) gives "
                f"the memory {slots} slots; max_shift must be at most {max(0, (slots - 1) // 2)}"
                " (2 max_shift + 1 <= slots)"
            )
        count = self.model_class.parameter_count(config)
        need, limit = count * TRAINING_BYTES_PER_PARAMETER, self.ops.memory_limit()
        if limit is not None and need > limit * 3 // 4:
            raise MemoryError(
                f"the {name} model of these options has {count:,} parameters: training it "
                f"takes about {need / 2**30:.1f} GiB ({TRAINING_BYTES_PER_PARAMETER} bytes a "
                "parameter: its draw, the parameter, its gradient, AdamW's two moments, an "
                f"update's temporaries and a checkpoint's copies), more than 3/4 of the "
                f"{limit / 2**30:.1f} GiB of {self.ops.describe()}; choose a smaller model"
            )

    def _check_memory(self) -> None:
        """Fail now, naming the longest training length that fits, when one sequence of the
        longest padded batch (N = T slots) does not fit in memory."""

        def check(train_length: int) -> None:
            widest = self.task.sequence_length(train_length) - 1
            sequences_that_fit(self.model, widest, widest, True, 1)

        def fits(train_length: int) -> bool:
            try:
                check(train_length)
            except MemoryError:
                return False
            return True

        length = self.config.train_length
        try:
            check(length)
        except MemoryError as exc:
            low, high = 0, length  # fits(low) (0: none known), not fits(high)
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            advice = f"the longest train_length that fits is {low}" if low else "a smaller model"
            raise MemoryError(f"train_length {length}: {exc}; {advice}") from None

    def _loss_and_grad(self, capacity: int, mode: dict[str, Any]) -> Callable[..., Any]:
        key = (capacity, *sorted(mode.items()))
        if key not in self._value_and_grad:
            model = self.model

            def loss_fn(params, tokens, labels, mask, noise=None):
                return model.loss(params, tokens, labels, mask, capacity, mode, noise)

            self._value_and_grad[key] = self.ops.value_and_grad(loss_fn, has_aux=True)
        return self._value_and_grad[key]

    def update(
        self,
        tokens: Any,
        labels: Any,
        mask: Any,
        capacity: int,
        mode: dict[str, Any],
        noise: Any,
        lr: float,
    ) -> tuple[float, Any, float]:
        """One optimizer update on one batch of backend arrays (one process, one pass):
        :meth:`apply` of that batch. Returns the loss, the logits and the gradient norm before
        clipping; finished on the device when it returns (the benchmarks time exactly this)."""
        loss, (logits,), grad_norm = self.apply(
            [(tokens, labels, mask, noise, 1.0)], capacity, mode, lr
        )
        return loss, logits, grad_norm

    def apply(
        self,
        parts: list[tuple[Any, Any, Any, Any, float]],
        capacity: int,
        mode: dict[str, Any],
        lr: float,
    ) -> tuple[float, list[Any], float]:
        """One optimizer update from ``parts`` of the global batch, each ``(tokens, labels,
        mask, noise, weight)`` with ``weight`` its share of the global batch's target tokens:
        the weighted sum of their gradients (and losses), summed over the process group (the
        one collective of the step: it is then the gradient of the global mean loss),
        global-norm clipping, AdamW. Returns the global loss, each part's logits and the
        gradient norm before clipping.

        Raises :class:`TrainingDiverged`, leaving the parameters as they were, when the loss,
        the gradient or the updated parameters are not finite (in every process alike: they
        all see the same sums)."""
        ops = self.ops
        loss, grads, logits = None, None, []
        for tokens, labels, mask, noise, weight in parts:
            (part_loss, part_logits), part_grads = self._loss_and_grad(capacity, mode)(
                self.params, tokens, labels, mask, noise=noise
            )
            if weight != 1.0:
                part_loss = part_loss * weight
                part_grads = tree_map(lambda g, w=weight: g * w, part_grads)
            loss = part_loss if loss is None else loss + part_loss
            grads = part_grads if grads is None else tree_map(lambda a, b: a + b, grads, part_grads)
            logits.append(part_logits)
        if self.group.size > 1:  # the loss rides along with the gradients: one collective
            flat = tree_flatten(grads)
            *summed, loss = self.group.sum([*flat.values(), loss])
            grads = tree_unflatten(dict(zip(flat, summed, strict=True)), grads)
        grads, grad_norm = clip_by_global_norm(ops, grads, self.config.clip_norm)
        loss_value = float(ops.to_numpy(loss))
        if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
            raise TrainingDiverged(
                self.step + 1, f"the loss is {loss_value} and the gradient norm {grad_norm}"
            )
        params, opt_state = self.optimizer.update(ops, self.params, grads, self.opt_state, lr=lr)
        ops.eval(params, opt_state["m"], opt_state["v"])
        # one reduction (one sync) over the new parameters: inf * 0 and nan * 0 are NaN, so a
        # single non-finite entry makes the sum non-finite
        total = float(ops.to_numpy(sum(ops.sum(p * 0.0) for p in tree_leaves(params))))
        if not math.isfinite(total):
            raise TrainingDiverged(self.step + 1, "the update made the parameters non-finite")
        self.params, self.opt_state = params, opt_state
        return loss_value, logits, grad_norm

    def batch_at(self, step: int) -> tuple[Any, Any]:
        """The global batch of update ``step`` and its model noise: a function of (seed, step)
        alone, the same in every process, on resume and at any number of processes."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1, step])
        lengths = rng.integers(1, cfg.train_length + 1, cfg.batch_size)
        batch = self.task.batch(rng, lengths)
        noise = self.model.train_noise(rng, *batch.tokens.shape, step, cfg.steps)
        return batch, noise

    def train_step(self) -> dict[str, Any]:
        """One update on the batch of this step; returns its metrics over the global batch.
        This process's rows go through the model in as few passes as fit in memory
        (:func:`pntm.models.base.sequences_that_fit`); the update is the same either way."""
        cfg, ops, model = self.config, self.ops, self.model
        start = time.perf_counter()
        batch, noise = self.batch_at(self.step)
        capacity = batch.tokens.shape[1]  # memory models get N = T of the padded global batch
        mode = model.train_mode(self.step, cfg.steps)
        lr = cfg.lr_at(self.step)
        targets = float(batch.mask.sum())
        rows = range(self.rows.start, self.rows.stop)
        size = sequences_that_fit(model, capacity, capacity, True, len(rows))
        passes = [slice(i, min(i + size, rows.stop)) for i in rows[::size]]
        parts = [
            (
                ops.asarray(batch.tokens[part]),
                ops.asarray(batch.labels[part]),
                ops.asarray(batch.mask[part]),
                None if noise is None else tree_map(lambda a, part=part: a[part], noise),
                float(batch.mask[part].sum()) / targets,
            )
            for part in passes
        ]
        loss, logits, grad_norm = self.apply(parts, capacity, mode, lr)
        predicted = np.concatenate([ops.to_numpy(ops.argmax(x, -1)) for x in logits])
        own = self.rows
        (correct,) = self.group.sum_floats(
            [((predicted == batch.labels[own]) * batch.mask[own]).sum()]
        )
        schedule = model.train_metrics(self.step, cfg.steps)
        self.step += 1
        return {
            "step": self.step,
            "loss": loss,
            "accuracy": correct / targets,
            "lr": lr,
            "grad_norm": grad_norm,
            **schedule,
            "tokens": int(batch.tokens.size),
            "seconds": time.perf_counter() - start,
        }

    def decode_mode(self, **overrides: Any) -> dict[str, Any]:
        """How the trained model decodes (e.g. P-NTM: the heads of the last update)."""
        return self.model.decode_mode(self.step, self.config.steps, **overrides)

    def to_checkpoint(self) -> checkpoint.Checkpoint:
        to_np = self.ops.to_numpy
        return checkpoint.Checkpoint(
            model=self.model_class.name,
            model_config=self.model_config.to_dict(),
            train_config=self.config.to_dict(),
            step=self.step,
            params=tree_map(to_np, self.params),
            optimizer={
                "step": self.opt_state["step"],
                "m": tree_map(to_np, self.opt_state["m"]),
                "v": tree_map(to_np, self.opt_state["v"]),
            },
            backend=self.backend_name,
        )


#: signals that stop training at the next step boundary, with a checkpoint: Ctrl-C, kill's
#: default, a closed terminal or ssh session (SIGHUP), Ctrl-\ (SIGQUIT) and SIGUSR1 (which
#: batch schedulers such as Slurm send ahead of a time limit)
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1")
    if hasattr(signal, name)  # Windows has SIGINT and SIGTERM alone
)


class StopSignals:
    """While active, :data:`STOP_SIGNALS` only ask the training loop to stop at the next step
    boundary (where the state is whole and can be saved); a second SIGINT stops at once.
    ``announce``: say so on stderr when the first one arrives (a long step may take a while)."""

    def __init__(self, announce: bool = False) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        first = self.signum is None
        self.signum = signum
        if first and self.announce:
            again = (
                " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            )
            with contextlib.suppress(OSError):  # no terminal any more (SIGHUP)
                print(
                    f"\n{signal.Signals(signum).name}: stopping after this step, with a "
                    f"checkpoint{again}",
                    file=sys.stderr,
                    flush=True,
                )

    def __enter__(self) -> StopSignals:
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def fit(
    trainer: Trainer,
    run_dir: str | Path,
    progress: bool = True,
    on_step: Callable[[int], int | None] | None = None,
    announce: bool | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train until ``trainer.config.steps``; metrics every ``log_every`` steps to
    ``run_dir/metrics.jsonl``, a checkpoint every ``save_every`` steps and at the end (rank 0
    alone writes). Returns the last logged metrics.

    On SIGINT, SIGTERM or another of :data:`STOP_SIGNALS` every process stops after the step
    under way (saying so at once where ``announce``, by default on rank 0), a checkpoint is
    saved and :class:`TrainingStopped` is raised; resuming from it continues the same run. On a
    non-finite loss, gradient or update the last finite state is saved and
    :class:`TrainingDiverged` is raised. ``on_step(step)``, called after each update, may
    return a signal number: the run then stops as if this process had received it;
    ``on_metrics(metrics)`` receives each metrics line as it is logged."""
    from tqdm.auto import tqdm

    main = trainer.group.is_main
    run_dir = Path(run_dir)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME
    cfg = trainer.config
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, trainer.step)  # drop lines logged after the checkpoint
        home = _identity(run_dir)

    def still_home() -> None:
        """Stop before writing if the run directory is no longer the one the run started in:
        writing would recreate it (or write into its replacement) beside a run resumed
        there, while this run's lock and metrics stay on the deleted files."""
        if main and _identity(run_dir) != home:
            raise RunDirectoryLost(run_dir, trainer.step)

    def save() -> None:
        if main:
            still_home()
            checkpoint.save(ckpt_path, trainer.to_checkpoint())

    window: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    dead = 0  # updates in a row without a gradient
    bar = tqdm(
        total=cfg.steps,
        initial=trainer.step,
        disable=not (progress and main),
        unit="step",
        dynamic_ncols=True,
    )
    try:
        announce = main if announce is None else announce
        with StopSignals(announce) as signals, _metrics_log(metrics_path, main) as log:
            while trainer.step < cfg.steps:
                # every process stops at the same step boundary if any of them was signalled
                (stops,) = trainer.group.sum_floats([signals.signum is not None])
                if stops:
                    save()
                    raise TrainingStopped(signals.signum or signal.SIGTERM, trainer.step)
                try:
                    window.append(trainer.train_step())
                except TrainingDiverged:
                    save()  # the trainer still holds the last finite state
                    raise
                dead = dead + 1 if _no_gradient(window[-1]) else 0
                if dead >= DEAD_STEPS:
                    vocab = trainer.model.config.vocab_size
                    raise TrainingDead(trainer.step, window[-1]["loss"], vocab)
                bar.update(1)
                if on_step is not None and signals.signum is None:
                    signals.signum = on_step(trainer.step)
                if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                    last = _summarize(window)
                    window = []
                    still_home()
                    log(last)
                    if on_metrics is not None:
                        on_metrics(last)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}",
                        acc=f"{last['accuracy']:.3f}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                        **{k: last[k] for k in last if isinstance(last[k], str)},
                    )
                if trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
                    save()
    finally:
        bar.close()
    save()
    return last


def _no_gradient(metrics: dict[str, Any]) -> bool:
    return metrics["grad_norm"] == 0.0 and metrics["loss"] > DEAD_LOSS


class RunDirectoryLost(RuntimeError):
    """The run directory was deleted, moved or replaced while the run was writing to it."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(
            f"the run directory {str(run_dir)!r} was deleted or replaced during training "
            f"(noticed at step {step}): stopped without writing there again"
        )
        self.run_dir, self.step = run_dir, step

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: it crosses process boundaries
        return type(self), (self.run_dir, self.step)


def _identity(directory: Path) -> tuple[int, int] | None:
    """The directory's device and inode (None if it is gone): a deleted directory made anew
    at the same path is another one."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextmanager
def _metrics_log(path: Path, main: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A writer of metrics lines in strict JSON, appended to ``path`` (rank 0; elsewhere a
    no-op)."""
    if not main:
        yield lambda metrics: None
        return
    with path.open("a") as log:

        def write(metrics: dict[str, Any]) -> None:
            log.write(json.dumps(metrics, allow_nan=False) + "\n")
            log.flush()

        yield write


_AVERAGED = ("loss", "accuracy", "grad_norm")


def _summarize(window: list[dict[str, Any]]) -> dict[str, Any]:
    """One metrics line for a window of updates: means of the loss, accuracy and gradient norm,
    tokens/s, and the last update's other values (step, learning rate, the model's schedule)."""
    seconds = sum(m["seconds"] for m in window)
    last = {k: v for k, v in window[-1].items() if k not in ("tokens", "seconds")}
    return {
        **last,
        **{k: float(np.mean([m[k] for m in window])) for k in _AVERAGED},
        "tokens_per_s": sum(m["tokens"] for m in window) / max(seconds, 1e-9),
        "seconds": seconds,
    }


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics lines a run logged (``run_dir/metrics.jsonl``; none if it has none)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        checkpoint.atomic_write(
            path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept))
        )


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not one (e.g. cut short by a
    killed process), so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
