"""One training loop for every model and backend: teacher forcing on a task's sequences, AdamW,
linear warm-up then cosine decay, global-norm clipping, and whatever schedule the model has of
its own (the P-NTM head schedule: :meth:`pntm.models.base.Model.train_mode`).

:class:`Trainer` holds the parameters, optimizer state and data RNG on one backend and can be
rebuilt exactly from a checkpoint; :func:`fit` runs it with a progress bar, JSONL metrics and
periodic atomic checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pntm import checkpoint, models, tasks
from pntm.backends.base import Backend
from pntm.config import check_finite, check_ints, config_from_dict, option
from pntm.optim import AdamW, clip_by_global_norm
from pntm.tree import tree_map

CHECKPOINT_NAME = "checkpoint.safetensors"
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
    seed: int = option(0, "Seeds the parameters and the data stream.")

    def __post_init__(self) -> None:
        tasks.get(self.task).check_length(self.train_length)
        check_ints(self, ("train_length", "steps", "batch_size"))
        check_ints(self, ("warmup_steps", "seed"), minimum=0)
        check_finite(self.lr, "lr", 0, low_open=True)
        check_finite(self.min_lr_ratio, "min_lr_ratio", 0, 1)
        check_finite(self.weight_decay, "weight_decay", 0)
        check_finite(self.clip_norm, "clip_norm", 0, low_open=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data, "training config")

    def lr_at(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Parameters, optimizer state, step and data RNG of one run, on one backend. It speaks
    only the model contract (:mod:`pntm.models.base`), so any model trains the same way."""

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
        self.model = self.model_class(model_config, ops)
        self.optimizer = AdamW(lr=config.lr, weight_decay=config.weight_decay)
        self.rng = np.random.default_rng([config.seed, 1])  # data stream, apart from init
        if resume_from is None:
            self.step = 0
            self.params = self.model.params_from_numpy(
                self.model_class.init_params(model_config, config.seed)
            )
            self.opt_state = self.optimizer.init(ops, self.params)
        else:
            if resume_from.optimizer is None or resume_from.rng_state is None:
                raise ValueError("the checkpoint holds no optimizer or RNG state to resume from")
            self.step = resume_from.step
            self.params = self.model.params_from_numpy(resume_from.params)
            self.opt_state = {
                "step": resume_from.optimizer["step"],
                "m": self.model.params_from_numpy(resume_from.optimizer["m"]),
                "v": self.model.params_from_numpy(resume_from.optimizer["v"]),
            }
            self.rng.bit_generator.state = resume_from.rng_state
        self._value_and_grad: dict[tuple, Callable[..., Any]] = {}

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
    ) -> tuple[Any, Any, float]:
        """One optimizer update on a batch of backend arrays: loss and gradients, global-norm
        clipping, AdamW; returns the loss, the logits and the gradient norm before clipping.
        Finished on the device when it returns (the benchmarks time exactly this)."""
        ops = self.ops
        (loss, logits), grads = self._loss_and_grad(capacity, mode)(
            self.params, tokens, labels, mask, noise=noise
        )
        grads, grad_norm = clip_by_global_norm(ops, grads, self.config.clip_norm)
        self.params, self.opt_state = self.optimizer.update(
            ops, self.params, grads, self.opt_state, lr=lr
        )
        ops.eval(self.params, self.opt_state["m"], self.opt_state["v"])
        return loss, logits, grad_norm

    def train_step(self) -> dict[str, Any]:
        """One update on a fresh batch; returns its metrics."""
        cfg, ops, model = self.config, self.ops, self.model
        start = time.perf_counter()
        lengths = self.rng.integers(1, cfg.train_length + 1, cfg.batch_size)
        batch = self.task.batch(self.rng, lengths)
        capacity = batch.tokens.shape[1]  # memory models get N = T of the padded batch
        mode = model.train_mode(self.step, cfg.steps)
        lr = cfg.lr_at(self.step)
        noise = model.train_noise(self.rng, *batch.tokens.shape, self.step, cfg.steps)
        loss, logits, grad_norm = self.update(
            ops.asarray(batch.tokens),
            ops.asarray(batch.labels),
            ops.asarray(batch.mask),
            capacity,
            mode,
            noise,
            lr,
        )
        predicted = ops.to_numpy(ops.argmax(logits, -1))
        accuracy = float(((predicted == batch.labels) * batch.mask).sum() / batch.mask.sum())
        schedule = model.train_metrics(self.step, cfg.steps)
        self.step += 1
        return {
            "step": self.step,
            "loss": float(ops.to_numpy(loss)),
            "accuracy": accuracy,
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
            rng_state=self.rng.bit_generator.state,
            backend=self.backend_name,
        )


def fit(
    trainer: Trainer,
    run_dir: str | Path,
    log_every: int = 10,
    save_every: int = 250,
    progress: bool = True,
) -> dict[str, Any]:
    """Train until ``trainer.config.steps``; metrics every ``log_every`` steps to
    ``run_dir/metrics.jsonl``, a checkpoint every ``save_every`` steps, at the end, and on
    Ctrl-C. Returns the last logged metrics."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME
    _truncate_metrics(metrics_path, trainer.step)  # drop lines logged after the checkpoint
    total = trainer.config.steps
    window: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    bar = tqdm(
        total=total, initial=trainer.step, disable=not progress, unit="step", dynamic_ncols=True
    )
    try:
        with metrics_path.open("a") as log:
            while trainer.step < total:
                window.append(trainer.train_step())
                bar.update(1)
                if trainer.step % log_every == 0 or trainer.step == total:
                    last = _summarize(window)
                    window = []
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}",
                        acc=f"{last['accuracy']:.3f}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                        **{k: last[k] for k in last if isinstance(last[k], str)},
                    )
                if trainer.step % save_every == 0 and trainer.step < total:
                    checkpoint.save(ckpt_path, trainer.to_checkpoint())
    except KeyboardInterrupt:
        checkpoint.save(ckpt_path, trainer.to_checkpoint())
        raise
    finally:
        bar.close()
    checkpoint.save(ckpt_path, trainer.to_checkpoint())
    return last


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


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        checkpoint.atomic_write(
            path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept))
        )
