"""One training loop for every backend: teacher forcing on a task's sequences, AdamW, linear
warm-up then cosine decay, global-norm clipping, and a head schedule (soft heads for the first
``hard_from`` fraction of the steps, then straight-through hard heads: the "st40" recipe of the
prototype, SPEC §7), optionally with noisy (sampled) heads early on and a hard-heads loss term
during the soft phase (docs/research-log.md).

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
from pntm.config import config_from_dict
from pntm.models.pntm import cross_entropy
from pntm.optim import AdamW, clip_by_global_norm
from pntm.tree import tree_map

CHECKPOINT_NAME = "checkpoint.safetensors"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    task: str = "copy"
    train_length: int = 16  # lengths drawn uniformly from 1..train_length
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    hard_from: float = 0.4  # fraction of steps after which heads are hard (1.0: always soft)
    # During the soft phase, add this weight times the loss of the same batch with hard
    # (straight-through) heads: the soft circuit is pushed toward one that still works once
    # its heads are hardened.
    hard_mix: float = 0.0
    # Gumbel (shifts) and logistic (gates) noise of this scale on the head logits at step 0,
    # decaying linearly to 0 at ``noise_until`` x steps: sampled heads, so that a circuit
    # cannot lean on the blur of soft heads, and hard heads explore other moves.
    head_noise: float = 0.0
    noise_until: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        task = tasks.get(self.task)
        task.check_length(self.train_length)
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.hard_from <= 1:
            raise ValueError(f"hard_from must be in [0, 1], got {self.hard_from}")
        if not 0 <= self.head_noise < float("inf"):
            raise ValueError(f"head_noise must be a finite number >= 0, got {self.head_noise}")
        if not 0 < self.noise_until <= 1:
            raise ValueError(f"noise_until must be in (0, 1], got {self.noise_until}")
        if not 0 <= self.hard_mix < float("inf"):
            raise ValueError(f"hard_mix must be a finite number >= 0, got {self.hard_mix}")
        if self.clip_norm <= 0 or self.weight_decay < 0:
            raise ValueError("clip_norm must be > 0 and weight_decay >= 0")

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

    def noise_at(self, step: int) -> float:
        """Scale of the head noise at update ``step``: linear decay to 0 at noise_until."""
        return self.head_noise * max(0.0, 1 - step / (self.noise_until * self.steps))

    def heads_at(self, step: int) -> str:
        return "hard" if step >= self.hard_from * self.steps else "soft"

    @property
    def final_heads(self) -> str:
        """The head mode of the last training steps: the mode to evaluate with."""
        return self.heads_at(self.steps - 1)


class Trainer:
    """Parameters, optimizer state, step and data RNG of one run, on one backend."""

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
        self.spec = models.get(model_name)
        self.model_config = model_config
        self.config = config
        self.task = tasks.get(config.task)
        self.ops, self.backend_name = ops, backend_name
        self.model = self.spec.model_class(model_config, ops)
        self.optimizer = AdamW(lr=config.lr, weight_decay=config.weight_decay)
        self.rng = np.random.default_rng([config.seed, 1])  # data stream, apart from init
        if resume_from is None:
            self.step = 0
            self.params = self.model.params_from_numpy(self.spec.init(model_config, config.seed))
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
        self._value_and_grad: dict[tuple[int, str], Callable[..., Any]] = {}

    def _loss_and_grad(self, n_slots: int, heads: str) -> Callable[..., Any]:
        key = (n_slots, heads)
        if key not in self._value_and_grad:
            model, ops = self.model, self.ops
            hard_mix = self.config.hard_mix if heads == "soft" else 0.0

            def loss_fn(params, tokens, labels, mask, noise=None):
                logits = model.forward(params, tokens, n_slots, heads=heads, noise=noise)
                loss = cross_entropy(ops, logits, labels, mask)
                if hard_mix:
                    hard = model.forward(params, tokens, n_slots, heads="hard", noise=noise)
                    loss = loss + hard_mix * cross_entropy(ops, hard, labels, mask)
                return loss, logits

            self._value_and_grad[key] = ops.value_and_grad(loss_fn, has_aux=True)
        return self._value_and_grad[key]

    def train_step(self) -> dict[str, Any]:
        """One update on a fresh batch; returns its metrics."""
        cfg, ops = self.config, self.ops
        start = time.perf_counter()
        lengths = self.rng.integers(1, cfg.train_length + 1, cfg.batch_size)
        batch = self.task.batch(self.rng, lengths)
        n_slots = batch.tokens.shape[1]  # N = T of the padded batch
        heads = cfg.heads_at(self.step)
        lr = cfg.lr_at(self.step)
        scale = cfg.noise_at(self.step)
        noise = self.model.head_noise(self.rng, *batch.tokens.shape, scale) if scale else None
        (loss, logits), grads = self._loss_and_grad(n_slots, heads)(
            self.params,
            ops.asarray(batch.tokens),
            ops.asarray(batch.labels),
            ops.asarray(batch.mask),
            noise=noise,
        )
        grads, grad_norm = clip_by_global_norm(ops, grads, cfg.clip_norm)
        self.params, self.opt_state = self.optimizer.update(
            ops, self.params, grads, self.opt_state, lr=lr
        )
        ops.eval(self.params, self.opt_state["m"], self.opt_state["v"])
        predicted = ops.to_numpy(ops.argmax(logits, -1))
        accuracy = float(((predicted == batch.labels) * batch.mask).sum() / batch.mask.sum())
        self.step += 1
        return {
            "step": self.step,
            "loss": float(ops.to_numpy(loss)),
            "accuracy": accuracy,
            "lr": lr,
            "grad_norm": grad_norm,
            "heads": heads,
            "head_noise": scale,
            "tokens": int(batch.tokens.size),
            "seconds": time.perf_counter() - start,
        }

    def to_checkpoint(self) -> checkpoint.Checkpoint:
        to_np = self.ops.to_numpy
        return checkpoint.Checkpoint(
            model=self.spec.name,
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
                        heads=last["heads"],
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


def _summarize(window: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(m["seconds"] for m in window)
    return {
        "step": window[-1]["step"],
        "loss": float(np.mean([m["loss"] for m in window])),
        "accuracy": float(np.mean([m["accuracy"] for m in window])),
        "lr": window[-1]["lr"],
        "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
        "heads": window[-1]["heads"],
        "head_noise": window[-1]["head_noise"],
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
