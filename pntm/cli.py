"""The ``pntm`` command line."""

from __future__ import annotations

import sys
import time

import click
import numpy as np

from pntm import backends


@click.group()
def main() -> None:
    """Parallelizable Neural Turing Machines: train and evaluate P-NTMs on MLX or PyTorch."""


@main.command("backends")
def backends_command() -> None:
    """List every backend, whether it runs on this machine, and why not."""
    for info in backends.available():
        status = "runs" if info.runs else "no"
        role = "train+eval" if info.trainable else ("eval" if info.runs else "-")
        click.echo(f"{info.name:7s} {status:5s} {role:11s} {info.reason}")


def _resolve_backend(name: str) -> str:
    try:
        return backends.best_available() if name == "auto" else name
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def toy_copy_batch(rng: np.random.Generator, batch: int, length: int):
    """Built-in toy sequences: ``bits SEP bits' END`` where ``bits'`` repeats the input bits
    with their own output token ids (0/1 -> 3/4; SEP = 2, END = 5). Loss on the target part."""
    bits = rng.integers(0, 2, (batch, length))
    seq = np.concatenate([bits, np.full((batch, 1), 2), bits + 3, np.full((batch, 1), 5)], 1)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = np.zeros(targets.shape)
    mask[:, length:] = 1.0  # predict the copied bits and the END token
    return inputs, targets, mask


@main.command("demo")
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="Backend to train with: auto, torch or mlx (see `pntm backends`).",
)
@click.option(
    "--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Optimizer steps."
)
@click.option(
    "--length",
    default=8,
    show_default=True,
    type=click.IntRange(min=1, max=64),
    help="Bits per toy sequence.",
)
@click.option("--seed", default=0, show_default=True)
def demo(backend: str, steps: int, length: int, seed: int) -> None:
    """Train a tiny P-NTM on a built-in toy copy sequence and print its loss falling."""
    from pntm.models.pntm import PNTM, PNTMConfig, cross_entropy, init_params
    from pntm.optim import AdamW, clip_by_global_norm

    name = _resolve_backend(backend)
    try:
        ops = backends.get(name)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not ops.trainable:
        raise click.ClickException(f"backend {name!r} does not train; use torch or mlx")
    config = PNTMConfig(vocab_size=6, d_model=32, n_layers=2, n_heads=2, head_dim=8)
    model = PNTM(config, ops)
    params = model.params_from_numpy(init_params(config, seed))
    optimizer = AdamW(lr=3e-3)
    state = optimizer.init(ops, params)
    rng = np.random.default_rng(seed)
    n_slots = 2 * length + 2

    def loss_fn(p, inputs, targets, mask):
        return cross_entropy(ops, model.forward(p, inputs, n_slots), targets, mask)

    value_and_grad = ops.value_and_grad(loss_fn)
    click.echo(
        f"P-NTM {config.n_layers}x{config.n_heads} heads on {name}: toy copy of "
        f"{length} bits, {steps} steps"
    )
    start, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        inputs, targets, mask = (ops.asarray(x) for x in toy_copy_batch(rng, 32, length))
        loss, grads = value_and_grad(params, inputs, targets, mask)
        grads, _ = clip_by_global_norm(ops, grads, 1.0)
        params, state = optimizer.update(ops, params, grads, state)
        ops.eval(params)
        value = float(ops.to_numpy(loss))
        running = value if running is None else 0.9 * running + 0.1 * value
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            click.echo(f"step {step:5d}  loss {running:.4f}  ({time.perf_counter() - start:.1f} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
