"""The ``pntm`` command line: ``train``, ``eval``, ``tasks``, ``backends``.

Every entry point is backend-neutral: ``--backend`` picks where it runs, and checkpoints move
between backends. Bad input ends with one ``Error:`` line naming the value and what is allowed,
a non-zero exit and nothing overwritten.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource

from pntm import backends, checkpoint, models, tasks
from pntm.tree import tree_leaves

BACKEND_CHOICES = ("auto", *backends.NAMES)
EVAL_FACTORS = (1, 2, 4, 8)


class LengthList(click.ParamType):
    """Comma-separated positive integers, e.g. ``16,32,64``."""

    name = "LENGTHS"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            try:
                n = int(part.strip())
            except ValueError:
                self.fail(f"{part.strip()!r} is not an integer; give e.g. 16,32,64", param, ctx)
            if n <= 0:
                self.fail(f"length {n} is not allowed: lengths must be >= 1", param, ctx)
            out.append(n)
        return sorted(set(out))


class SlotCount(click.ParamType):
    """``auto`` or a positive integer."""

    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or value == "auto":
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor an integer", param, ctx)
        if n < 1:
            self.fail(f"{n} slots is not allowed: N must be >= 1", param, ctx)
        return n


def _ops(name: str, train: bool) -> tuple[str, backends.Backend]:
    """Resolve ``auto`` and build the backend, or fail with why it cannot run here."""
    try:
        name = backends.best_available() if name == "auto" else name
        ops = backends.get(name)
    except (ValueError, RuntimeError) as exc:
        runnable = [i.name for i in backends.available() if i.runs and (i.trainable or not train)]
        raise click.ClickException(f"{exc}; backends that run here: {', '.join(runnable)}") from exc
    if train and not ops.trainable:
        raise click.ClickException(
            f"backend {name!r} evaluates but does not train; train with torch, triton or mlx"
        )
    return name, ops


@click.group()
def main() -> None:
    """Parallelizable Neural Turing Machines: train and evaluate P-NTMs on MLX or PyTorch."""


@main.command("backends")
def backends_command() -> None:
    """List every backend, whether it runs on this machine, and why not; `auto` marks the one
    `--backend auto` takes."""
    infos = backends.available()
    auto = backends.best_available() if any(i.priority is not None for i in infos) else None
    for info in infos:
        status = "runs" if info.runs else "no"
        role = "train+eval" if info.trainable else ("eval" if info.runs else "-")
        mark = "auto" if info.name == auto else ""
        click.echo(f"{info.name:7s} {status:5s} {role:11s} {mark:4s} {info.reason}")


@main.command("tasks")
@click.option(
    "--show", "show", type=click.Choice(tasks.NAMES), help="Print decoded examples of this task."
)
@click.option(
    "--length",
    type=click.IntRange(min=1),
    help="Length of the examples shown (default: the task's training length, at most 8).",
)
@click.option(
    "--count",
    default=3,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Number of examples shown.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the examples shown.")
def tasks_command(show: str | None, length: int | None, count: int, seed: int) -> None:
    """List the tasks, or show decoded examples of one (``--show NAME``).

    Every sequence is ``input = target .``; target symbols have their own tokens, printed
    primed (``1'``). Length is counted in the task's unit (see the list). Each task's recipe
    is what ``pntm train --task TASK`` uses unless told otherwise."""
    from pntm import recipes

    if show is None:
        click.echo(
            f"{'task':22s} {'category':15s} {'L_train':>7s} {'limit':>6s} {'vocab':>5s}  "
            "what the target is"
        )
        for name in tasks.NAMES:
            t = tasks.get(name)
            click.echo(
                f"{name:22s} {t.category:15s} {t.default_train_length:7d} {t.max_length:6d} "
                f"{t.vocab_size:5d}  {t.description} (length = {t.length_unit})"
            )
        click.echo("\nrecipes: what `pntm train --task TASK` changes from the defaults")
        for name in tasks.NAMES:
            click.echo(f"  {name:22s} {recipes.get(name).describe()}")
        return
    task = tasks.get(show)
    length = length or min(8, task.default_train_length)
    try:
        task.check_length(length)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{task.name}: {task.description}; length {length} ({task.length_unit})")
    recipe = recipes.get(task.name)
    click.echo(f"recipe: {recipe.describe()} ({recipe.why})")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        click.echo("  " + task.decode(task.sequence(rng, length)))


# ---------------------------------------------------------------------------------- train

# CLI option -> (config, field); these must match a checkpoint's values on --resume
MODEL_OPTIONS = {
    "d_model": "d_model",
    "layers": "n_layers",
    "memory_heads": "n_heads",
    "head_dim": "head_dim",
    "max_shift": "max_shift",
    "mlp_ratio": "mlp_ratio",
    "content": "content",
    "add_activation": "add_activation",
    "velocity_prior": "velocity_prior",
    "overwrite": "overwrite",
    "gated_write": "gated_write",
}
OPTION_OF_MODEL_FIELD = {f: o for o, f in MODEL_OPTIONS.items()}
TRAIN_OPTIONS = (
    "task",
    "train_length",
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "clip_norm",
    "hard_from",
    "hard_mix",
    "head_noise",
    "noise_until",
    "seed",
)


@main.command("train")
@click.option(
    "--task",
    default="copy",
    show_default=True,
    type=click.Choice(tasks.NAMES),
    help="Task to train on (see `pntm tasks`).",
)
@click.option(
    "--model",
    default="pntm",
    show_default=True,
    type=click.Choice(models.NAMES),
    help="Model architecture.",
)
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    type=click.Choice(BACKEND_CHOICES),
    help="Where to train: auto = the Triton kernels on a CUDA GPU, MLX on Apple silicon, "
    "else PyTorch, else MLX on CPU. See `pntm backends`.",
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps.")
@click.option(
    "--train-length",
    type=int,
    help="Training lengths are drawn uniformly from 1..this (default: the task's).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Sequences per step.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate of AdamW.",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    help="Linear warm-up steps before the cosine decay.",
)
@click.option(
    "--min-lr-ratio",
    type=click.FloatRange(0, 1),
    help="The cosine decays to lr x this.",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    help="Decoupled (AdamW) weight decay.",
)
@click.option(
    "--clip-norm",
    type=click.FloatRange(min=0, min_open=True),
    help="Global gradient-norm clip.",
)
@click.option(
    "--hard-from",
    type=click.FloatRange(0, 1),
    help="Fraction of the steps after which heads are straight-through hard (exact "
    "one-hot shifts, 0/1 gates, soft gradients); 1 keeps them soft throughout. Hard "
    "heads are then also used at evaluation.",
)
@click.option(
    "--hard-mix",
    type=click.FloatRange(min=0),
    help="Before --hard-from, add this weight times the loss of the same batch with hard "
    "heads, so that the soft circuit keeps working once its heads are hardened.",
)
@click.option(
    "--head-noise",
    type=click.FloatRange(min=0),
    help="Scale of Gumbel noise on the shift logits and logistic noise on the gate logits "
    "in training (sampled heads), decaying linearly to 0 at --noise-until.",
)
@click.option(
    "--noise-until",
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction of the steps at which the head noise reaches 0.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seeds the parameters and the data stream.",
)
@click.option("--d-model", type=click.IntRange(min=1), help="Model width H.")
@click.option("--layers", type=click.IntRange(min=1), help="P-NTM blocks.")
@click.option(
    "--memory-heads",
    type=click.IntRange(min=1),
    help="Memories per block (K), each with a write and a read head.",
)
@click.option(
    "--head-dim",
    type=click.IntRange(min=1),
    help="Width D of a memory slot.",
)
@click.option(
    "--max-shift",
    type=click.IntRange(min=0),
    help="Heads move by -S..S slots per step.",
)
@click.option(
    "--mlp-ratio",
    type=click.IntRange(min=1),
    help="Hidden width of the MLP, in multiples of --d-model.",
)
@click.option(
    "--content/--no-content",
    default=None,
    help="Content-addressed reads (default: on for tasks that need them).",
)
@click.option(
    "--add-activation",
    type=click.Choice(("tanh", "linear")),
    help="Activation of the add vector.",
)
@click.option(
    "--velocity-prior",
    type=float,
    help="Initial bias of every head's +1 shift logit: a fresh head moves +1 per step with "
    "probability e^v / (e^v + 2S).",
)
@click.option(
    "--overwrite/--no-overwrite",
    default=None,
    help="Every write replaces its slot's content (erase fixed to 1) instead of a learned erase.",
)
@click.option(
    "--gated-write/--no-gated-write",
    default=None,
    help="The erase is also the write strength (add <- erase * add), snapped to 0/1 with hard "
    "heads: each write replaces or keeps a slot (a flip-flop).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory for the checkpoint, metrics.jsonl, eval.json and eval.png "
    "(default: runs/TASK-DATE-TIME). Must not hold a checkpoint already.",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    help="Continue a run from its checkpoint (file or run directory). Options not "
    "given take the checkpoint's values; given options must match them. The backend "
    "may differ.",
)
@click.option(
    "--log-every",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps per line of metrics.jsonl.",
)
@click.option(
    "--save-every",
    default=250,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps between checkpoints (also saved at the end and on Ctrl-C).",
)
@click.option(
    "--eval-lengths",
    type=LengthList(),
    help="Lengths evaluated after training (default: L_train, 2x, 4x, 8x).",
)
@click.option(
    "--eval-samples",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per evaluated length.",
)
@click.option("--no-eval", is_flag=True, help="Skip the evaluation after training.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(ctx: click.Context, **opts: Any) -> None:
    """Train a model on a task with teacher forcing, then evaluate length generalization.

    Loss and accuracy count target tokens (and END) only. Memory slots N equal the length of
    each padded batch. Prints a progress bar (loss, target-token accuracy, tokens/s), writes
    metrics.jsonl and an atomically written safetensors checkpoint, then prints the greedy
    exact-match table at the evaluation lengths.

    Training and model options not given take the task's recipe: the settings found to make
    that task generalize (`pntm tasks --show TASK` lists them; see docs/results.md)."""
    from pntm import recipes
    from pntm.train import CHECKPOINT_NAME, Trainer, fit

    resume_from = None
    if opts["resume"] is not None:
        ckpt_path, resume_from = _load_checkpoint(opts["resume"])
        run_dir = ckpt_path.parent
        if opts["out"] is not None and opts["out"].resolve() != run_dir.resolve():
            raise click.ClickException(
                f"--out {opts['out']} differs from the resumed run's directory {run_dir}; "
                "drop --out when resuming"
            )
        _merge_resumed_options(ctx, opts, resume_from)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = opts["out"] or Path("runs") / f"{opts['task']}-{stamp}"
        if (run_dir / CHECKPOINT_NAME).exists():
            raise click.ClickException(
                f"{run_dir / CHECKPOINT_NAME} exists; pass --resume {run_dir} to continue it "
                "or --out with a new directory"
            )

    task = tasks.get(opts["task"])
    recipe = recipes.get(task.name)
    try:
        train_config = recipe.train_config(**{k: opts[k] for k in TRAIN_OPTIONS})
        model_config = recipe.model_config(**{f: opts[o] for o, f in MODEL_OPTIONS.items()})
        eval_lengths = opts["eval_lengths"] or _default_eval_lengths(
            task, train_config.train_length
        )
        for length in eval_lengths:
            task.check_length(length)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if resume_from is not None:
        _check_resume(resume_from, opts["model"], model_config, train_config)
        if resume_from.step >= train_config.steps:
            raise click.ClickException(
                f"the checkpoint is at step {resume_from.step}, already at --steps "
                f"{train_config.steps}: nothing to resume"
            )

    backend_name, ops = _ops(opts["backend"], train=True)
    try:
        trainer = Trainer(opts["model"], model_config, train_config, ops, backend_name, resume_from)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    n_params = sum(int(np.prod(p.shape)) for p in tree_leaves(trainer.params))
    hard_step = int(np.ceil(train_config.hard_from * train_config.steps))
    click.echo(
        f"{opts['model']} ({model_config.n_layers} blocks x {model_config.n_heads} memories, "
        f"{n_params / 1e3:.1f}k parameters) on {backend_name}: task {task.name}, lengths "
        f"1..{train_config.train_length}, {train_config.steps} steps"
        + (f", hard heads from step {hard_step}" if hard_step < train_config.steps else "")
        + (f", resumed at step {trainer.step}" if resume_from else "")
    )
    click.echo(f"run directory: {run_dir}")
    try:
        fit(trainer, run_dir, opts["log_every"], opts["save_every"], progress=not opts["quiet"])
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted at step {trainer.step}; checkpoint saved, continue with "
            f"`pntm train --resume {run_dir}`"
        ) from None
    if opts["no_eval"]:
        return
    _evaluate_and_report(
        trainer.model,
        trainer.params,
        task,
        train_config,
        eval_lengths,
        samples=opts["eval_samples"],
        seed=0,
        heads=train_config.final_heads,
        n_slots=None,
        json_path=run_dir / "eval.json",
        plot_path=run_dir / "eval.png",
        info={"checkpoint": str(run_dir / CHECKPOINT_NAME), "backend": backend_name},
    )


def _default_eval_lengths(task: tasks.Task, train_length: int) -> list[int]:
    from pntm.evaluate import default_lengths

    return default_lengths(train_length, task, EVAL_FACTORS)


def _load_checkpoint(path: Path) -> tuple[Path, checkpoint.Checkpoint]:
    """The checkpoint file (``path`` itself, or the one in run directory ``path``), loaded."""
    from pntm.train import CHECKPOINT_NAME

    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        return path, checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def _merge_resumed_options(
    ctx: click.Context, opts: dict[str, Any], ckpt: checkpoint.Checkpoint
) -> None:
    """Options left at their defaults take the checkpoint's values."""
    saved = {**ckpt.train_config, "model": ckpt.model}
    model_config = _saved_model_config(ckpt)
    saved.update({o: model_config[f] for o, f in MODEL_OPTIONS.items()})
    for name in (*TRAIN_OPTIONS, "model", *MODEL_OPTIONS):
        source = ctx.get_parameter_source(name)
        if source in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP) and name in saved:
            opts[name] = saved[name]


def _saved_model_config(ckpt: checkpoint.Checkpoint) -> dict[str, Any]:
    """The checkpoint's model config with every field, defaults filled in (a checkpoint
    written before a field existed holds no value for it)."""
    try:
        return models.get(ckpt.model).config_class.from_dict(ckpt.model_config).to_dict()
    except ValueError as exc:
        raise click.ClickException(f"cannot resume: {exc}") from exc


def _check_resume(ckpt: checkpoint.Checkpoint, model: str, model_config: Any, train_config: Any):
    given = {"model": model, **model_config.to_dict(), **train_config.to_dict()}
    saved = {"model": ckpt.model, **_saved_model_config(ckpt), **ckpt.train_config}
    for key, value in given.items():
        if saved.get(key) != value:
            option = "--" + OPTION_OF_MODEL_FIELD.get(key, key).replace("_", "-")
            raise click.ClickException(
                f"cannot resume: {option} {value!r} differs from the checkpoint's "
                f"{saved.get(key)!r}; drop it or pass the checkpoint's value"
            )


# ---------------------------------------------------------------------------------- eval


@main.command("eval")
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    default="auto",
    show_default=True,
    type=click.Choice(BACKEND_CHOICES),
    help="Where to evaluate (numpy, the float64 reference, works too).",
)
@click.option(
    "--lengths", type=LengthList(), help="Comma-separated lengths (default: L_train, 2x, 4x, 8x)."
)
@click.option(
    "--samples",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per length.",
)
@click.option(
    "--heads",
    default="auto",
    show_default=True,
    type=click.Choice(("auto", "soft", "hard")),
    help="Head mode: auto = the mode the checkpoint's last training step used.",
)
@click.option(
    "--temperature",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Temperature of the shift and gate logits (soft heads).",
)
@click.option(
    "--slots",
    default="auto",
    show_default=True,
    type=SlotCount(),
    help="Memory slots N: auto = the whole sequence length at each length, or a fixed "
    "N for every length (at least the longest input plus separator).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the samples.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the results (default: eval.json beside the checkpoint).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the plot (default: eval.png beside the checkpoint).",
)
def eval_command(
    checkpoint_path: Path,
    backend: str,
    lengths: list[int] | None,
    samples: int,
    heads: str,
    temperature: float,
    slots: int | None,
    seed: int,
    json_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Greedy-decode a checkpoint's task at several lengths: exact match and token accuracy.

    CHECKPOINT is a checkpoint file or a run directory. The prompt is prefilled with the
    parallel form, then each emitted token is fed back through the step form. Prints a table
    and writes a JSON file and a PNG plot of accuracy against length."""
    from pntm.evaluate import check_slots
    from pntm.train import TrainConfig

    checkpoint_path, ckpt = _load_checkpoint(checkpoint_path)
    try:
        train_config = TrainConfig.from_dict(ckpt.train_config)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(f"checkpoint {checkpoint_path}: {exc}") from exc
    task = tasks.get(train_config.task)
    lengths = lengths or _default_eval_lengths(task, train_config.train_length)
    try:
        check_slots(task, lengths, slots)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    backend_name, ops = _ops(backend, train=False)
    spec = models.get(ckpt.model)
    model = spec.model_class(spec.config_class.from_dict(ckpt.model_config), ops)
    params = model.params_from_numpy(ckpt.params)
    heads = train_config.heads_at(max(ckpt.step - 1, 0)) if heads == "auto" else heads
    click.echo(
        f"{ckpt.model} checkpoint at step {ckpt.step} (trained on {ckpt.backend}, lengths "
        f"1..{train_config.train_length}) evaluated on {backend_name}, {heads} heads"
    )
    _evaluate_and_report(
        model,
        params,
        task,
        train_config,
        lengths,
        samples,
        seed,
        heads,
        slots,
        json_path or checkpoint_path.parent / "eval.json",
        plot_path or checkpoint_path.parent / "eval.png",
        {"checkpoint": str(checkpoint_path), "backend": backend_name, "temperature": temperature},
        temperature,
    )


def _evaluate_and_report(
    model: Any,
    params: Any,
    task: tasks.Task,
    train_config: Any,
    lengths: list[int],
    samples: int,
    seed: int,
    heads: str,
    n_slots: int | None,
    json_path: Path,
    plot_path: Path,
    info: dict[str, Any],
    temperature: float = 1.0,
) -> None:
    from pntm.evaluate import evaluate, format_table, plot, write_json

    start = time.perf_counter()
    results = evaluate(
        model, params, task, lengths, samples, seed, heads, n_slots, temperature=temperature
    )
    click.echo(
        f"\nlength generalization, task {task.name}, trained on lengths "
        f"1..{train_config.train_length} ({task.length_unit}), greedy decoding, {heads} heads:"
    )
    click.echo(format_table(results, train_config.train_length))
    meta = {
        **info,
        "task": task.name,
        "train_length": train_config.train_length,
        "heads": heads,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "model_config": model.config.to_dict(),
    }
    write_json(json_path, meta, results)
    title = f"{task.name}: trained on 1..{train_config.train_length}, {heads} heads"
    plot(plot_path, title, results, train_config.train_length)
    click.echo(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()
