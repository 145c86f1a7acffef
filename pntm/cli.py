"""The ``pntm`` command line: ``train``, ``eval``, ``bench``, ``tasks``, ``models``, ``backends``.

Every entry point is backend-neutral: ``--backend`` picks where it runs, and checkpoints move
between backends. Bad input ends with one ``Error:`` line naming the value and what is allowed,
a non-zero exit and nothing overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from pntm import __version__, backends, checkpoint, models, tasks
from pntm.bench import BenchConfig
from pntm.config import options_of
from pntm.train import TrainConfig
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


class OutputPath(click.Path):
    """A path to write to; the empty string (which would mean the current directory) is
    refused."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path is not allowed", param, ctx)
        return super().convert(value, param, ctx)


class NameList(click.ParamType):
    """Comma-separated names out of a fixed set."""

    name = "NAMES"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(dict.fromkeys(part.strip() for part in str(value).split(",")))
        for name in names:
            if name not in self.choices:
                self.fail(f"{name!r} is not one of {', '.join(self.choices)}", param, ctx)
        return names


def backend_option(help: str) -> Any:
    """``--backend`` (default ``auto``) with this help text."""
    return click.option(
        "--backend", default="auto", show_default=True, type=click.Choice(BACKEND_CHOICES),
        help=help,
    )  # fmt: skip


def threads_option() -> Any:
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        help="Threads for the framework's operations and the fused CPU kernels alike. Default: "
        "the framework's operations on 1 thread (their OpenMP workers spin, and on a machine "
        "busy with other work 2 threads ran 30x slower than 1) or OMP_NUM_THREADS where set, "
        "the kernels on every core (their workers sleep while they wait).",
    )


def _ops(name: str, train: bool, threads: int | None = None) -> tuple[str, backends.Backend]:
    """Resolve ``auto``, build the backend and set its threads (``backends.set_threads``), or
    fail with why it cannot run here."""
    try:
        name = backends.best_available() if name == "auto" else name
        ops = backends.get(name)
        backends.set_threads(ops, threads)
        backends.keep_freed_memory()
    except (ValueError, RuntimeError) as exc:
        runnable = [i.name for i in backends.available() if i.runs and (i.trainable or not train)]
        raise click.ClickException(f"{exc}; backends that run here: {', '.join(runnable)}") from exc
    if train and not ops.trainable:
        raise click.ClickException(
            f"backend {name!r} evaluates but does not train; train with torch, triton or mlx"
        )
    return name, ops


class _Commands(click.Group):
    """pntm's commands, and one rule for all of them: output that cannot be written (standard
    output full or closed: ``pntm tasks > /dev/full``) is one Error line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            try:  # a failed write may have emptied the buffer: probe the descriptor itself
                os.write(sys.stdout.fileno(), b"\n")
            except OSError:
                # standard output is the culprit: silence it, so that Python's own flush at
                # exit does not fail a second time, and say why on standard error
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                raise click.ClickException(
                    f"cannot write the output: {exc.strerror or exc}"
                ) from exc
            raise


@click.group(cls=_Commands)
@click.version_option(__version__, message="%(prog)s %(version)s")
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
        click.echo(f"{info.name:9s} {status:5s} {role:11s} {mark:4s} {info.reason}")


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
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Seed of the examples shown.",
)
def tasks_command(show: str | None, length: int | None, count: int, seed: int) -> None:
    """List the tasks, or show decoded examples of one (--show NAME).

    Every sequence is "input = target ."; target symbols have their own tokens, printed
    primed (1'). Length is counted in the task's unit (see the list). Each task's recipe
    is what `pntm train --task TASK` uses unless told otherwise."""
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


# ---------------------------------------------------------------------------------- options
# Training, model and decoding options are generated from the fields of the config dataclasses
# (declared with pntm.config.option): each field's flag, help and allowed values live with the
# field, and every option defaults to "not given" (None) so that the task's recipe, the
# checkpoint being resumed or the config's own default can fill it in.


@dataclass(frozen=True)
class ConfigOption:
    """A command-line option and the config fields it sets: ``fields`` maps each owner (a
    model name, or ``train``) to its field name."""

    flag: str
    param: str
    fields: dict[str, str]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["option"]["flag"] or f.name.replace("_", "-")


def _click_type(f: dataclasses.Field) -> Any:
    meta, kind = f.metadata["option"], type(f.default)
    if kind is tuple:  # comma-separated values
        return NameList(meta["choices"]) if meta["choices"] is not None else LengthList()
    if meta["choices"] is not None:
        return click.Choice(meta["choices"])
    bounds = {"min": meta["minimum"], "max": meta["maximum"]}
    if kind is int:
        return click.IntRange(**bounds) if any(v is not None for v in bounds.values()) else int
    if kind is float and any(v is not None for v in bounds.values()):
        return click.FloatRange(**bounds, min_open=meta["min_open"])
    return kind


def _generated_options(owners: dict[str, type | None]) -> list[tuple[ConfigOption, Any]]:
    """One click option per distinct flag over the option fields of ``owners`` (owner name ->
    config class); a flag several owners share must have one type. Its help names the owners
    that have it when not all do, and each owner's text or default where they differ."""
    found: dict[str, tuple[ConfigOption, list[dataclasses.Field]]] = {}
    for owner, config_class in owners.items():
        for f in options_of(config_class) if config_class is not None else []:
            flag = _flag(f)
            option, fields_ = found.setdefault(
                flag, (ConfigOption(flag, flag.replace("-", "_"), {}), [])
            )
            if fields_ and type(fields_[0].default) is not type(f.default):
                first = next(iter(option.fields))
                raise TypeError(f"--{flag}: {owner} and {first} give it different types")
            option.fields[owner] = f.name
            fields_.append(f)
    out = []
    for option, fields_ in found.values():
        names = list(option.fields)
        helps = [f.metadata["option"]["help"] for f in fields_]
        defaults = [_shown_default(f) for f in fields_]
        if len(set(helps)) == 1:
            help_text = helps[0]
        else:  # owners with the same text share one entry
            by_text: dict[str, list[str]] = {}
            for name, text in zip(names, helps, strict=True):
                by_text.setdefault(text, []).append(name)
            help_text = " ".join(f"{', '.join(n)}: {text}" for text, n in by_text.items())
        if "default" not in help_text:
            if len(set(defaults)) == 1:
                help_text += f" (default: {defaults[0]})"
            else:
                pairs = ", ".join(f"{n} {d}" for n, d in zip(names, defaults, strict=True))
                help_text += f" (defaults: {pairs})"
        if len(owners) > 1 and set(names) != set(owners):
            help_text += f" [{', '.join(names)}]"
        f = fields_[0]
        if isinstance(f.default, bool):
            decl = click.option(f"--{option.flag}/--no-{option.flag}", default=None, help=help_text)
        else:
            decl = click.option(f"--{option.flag}", type=_click_type(f), help=help_text)
        out.append((option, decl))
    return out


def _shown_default(f: dataclasses.Field) -> str:
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    if isinstance(f.default, tuple):
        return ",".join(map(str, f.default))
    return str(f.default)


def _with_options(generated: list[tuple[ConfigOption, Any]]) -> Any:
    def decorate(fn: Any) -> Any:
        for _, decl in reversed(generated):
            fn = decl(fn)
        return fn

    return decorate


def _given(opts: dict[str, Any], generated: list[tuple[ConfigOption, Any]], owner: str):
    """``{field: value}`` of the options given on the command line that ``owner`` has."""
    return {
        o.fields[owner]: opts[o.param]
        for o, _ in generated
        if owner in o.fields and opts[o.param] is not None
    }


def _refuse_foreign(
    opts: dict[str, Any], generated: list[tuple[ConfigOption, Any]], owner: str
) -> None:
    """An option given that ``owner`` does not have (e.g. a P-NTM option for an LSTM)."""
    for o, _ in generated:
        if opts[o.param] is not None and owner not in o.fields:
            raise click.ClickException(
                f"--{o.flag} is not an option of model {owner!r} "
                f"(models that have it: {', '.join(o.fields)})"
            )


MODEL_OPTIONS = _generated_options({name: models.get(name).config_class for name in models.NAMES})
TRAIN_OPTIONS = _generated_options({"train": TrainConfig})
DECODE_OPTIONS = _generated_options(
    {name: models.get(name).decode_options for name in models.NAMES}
)


# ---------------------------------------------------------------------------------- train


@main.command("train")
@click.option(
    "--model",
    type=click.Choice(models.NAMES),
    help="Model architecture (default: pntm; see `pntm models`).",
)
@backend_option(
    "Where to train: auto = the Triton kernels on a CUDA GPU, MLX on Apple silicon, "
    "else PyTorch, else MLX on CPU. See `pntm backends`."
)
@_with_options(TRAIN_OPTIONS)
@_with_options(MODEL_OPTIONS)
@click.option(
    "--restarts",
    type=click.IntRange(min=1),
    help="Independent runs from different seeds (restart 0 has --seed), side by side on a "
    "CPU; the one with the lowest cross-entropy on fresh sequences of the training lengths is "
    "kept (default: the recipe's). Each is a run of its own in OUT/restart-R.",
)
@click.option(
    "--validation-factor",
    type=click.IntRange(min=0),
    help="With restarts: also decode each on fresh sequences of this x the training length "
    "and keep the one with the fewest misses there, the cross-entropy breaking ties; 0 = "
    "the training lengths only (default: the recipe's). Pick a length you do not evaluate at.",
)
@click.option(
    "--out",
    type=OutputPath(file_okay=False, path_type=Path),
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
@threads_option()
@click.option("--no-eval", is_flag=True, help="Skip the evaluation after training.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(**opts: Any) -> None:
    """Train a model on a task with teacher forcing, then evaluate length generalization.

    Loss and accuracy count target tokens (and END) only. Memory models get as many slots as
    each padded batch has positions. Prints a progress bar (loss, target-token accuracy,
    tokens/s), writes metrics.jsonl and an atomically written safetensors checkpoint, then
    prints the greedy exact-match table at the evaluation lengths.

    Training and model options not given take the task's recipe: for the P-NTM, the settings
    found to make that task generalize (`pntm tasks --show TASK` lists them; see
    docs/results.md); other models train with the same budget and their own defaults. Options
    in [brackets] belong to the models named there."""
    from pntm import recipes, restarts, run
    from pntm.train import CHECKPOINT_NAME, Trainer, fit

    resume_from, plan = None, None
    if opts["resume"] is not None and _is_restarts_run(opts["resume"]):
        run_dir = _resumed_run_dir(opts, opts["resume"])
        try:
            plan = restarts.load_plan(run_dir)
        except restarts.RestartsError as exc:
            raise click.ClickException(str(exc)) from exc
        for name in ("restarts", "validation_factor"):
            given, saved = opts[name], getattr(plan, name)
            if given is not None and given != saved:
                raise click.ClickException(
                    f"cannot resume: --{name.replace('_', '-')} {given} differs from the "
                    f"run's {saved}; drop it or pass the run's value"
                )
        train_config, model_name, model_config = _saved_configs(
            opts, plan.model, plan.model_config, plan.train_config
        )
    elif opts["resume"] is not None:
        ckpt_path, resume_from = _load_checkpoint(opts["resume"])
        run_dir = _resumed_run_dir(opts, ckpt_path.parent)
        if ckpt_path.name != CHECKPOINT_NAME and (run_dir / CHECKPOINT_NAME).exists():
            raise click.ClickException(
                f"cannot resume from {ckpt_path}: the run would write its checkpoints to "
                f"{run_dir / CHECKPOINT_NAME}, which holds another run; copy {ckpt_path.name} "
                "into a directory of its own"
            )
        restarts_given = [
            f"--{name.replace('_', '-')} {opts[name]}"
            for name, plain in (("restarts", 1), ("validation_factor", 0))
            if opts[name] not in (None, plain)
        ]
        if restarts_given:
            raise click.ClickException(
                f"cannot resume {run_dir} with {' '.join(restarts_given)}: it is a single run"
            )
        train_config, model_name, model_config = _resumed_configs(opts, resume_from)
    else:
        train_config, model_name, model_config = _new_configs(opts)
        run_dir = opts["out"] or run.default_run_dir(train_config.task)
        recipe = recipes.get(train_config.task, model_name)
        count = opts["restarts"] or recipe.restarts
        factor = opts["validation_factor"]
        if count == 1 and factor:
            raise click.ClickException(
                f"--validation-factor {factor} chooses among restarts: it needs --restarts > 1"
            )
        if count > 1:
            try:
                plan = restarts.Plan(
                    model_name,
                    model_config.to_dict(),
                    train_config.to_dict(),
                    count,
                    recipe.validation_factor if factor is None else factor,
                )
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
    task = tasks.get(train_config.task)
    try:
        eval_lengths = opts["eval_lengths"] or _default_eval_lengths(
            task, train_config.train_length
        )
        for length in eval_lengths:
            task.check_length(length)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc

    backend_name, ops = _ops(opts["backend"], train=True, threads=opts["threads"])
    if plan is not None:
        resumed = opts["resume"] is not None
        _train_restarts(plan, run_dir, backend_name, ops, task, eval_lengths, opts, resumed)
        return
    try:
        trainer = Trainer(model_name, model_config, train_config, ops, backend_name, resume_from)
    except (ValueError, MemoryError) as exc:
        raise click.ClickException(str(exc)) from exc
    main = trainer.group.is_main
    say = click.echo if main else (lambda *_, **__: None)
    say(
        _run_header(trainer.model, trainer.params, train_config, backend_name, trainer.group)
        + (f", resumed at step {trainer.step}" if resume_from else "")
    )
    say(f"run directory: {run_dir}")
    check_new = run.check_new if main and resume_from is None else (lambda _: None)
    with _run_errors(run_dir, trainer.group):
        check_new(run_dir)  # before the lock, so that a refused directory gets no lock file
        with run.locked(run_dir) if main else contextlib.nullcontext():
            check_new(run_dir)  # again under the lock: a run may have finished there since
            fit(trainer, run_dir, progress=not opts["quiet"])
    if opts["no_eval"] or not main:
        return
    _evaluate_and_report(
        trainer.model,
        trainer.params,
        task,
        train_config,
        eval_lengths,
        samples=opts["eval_samples"],
        seed=0,
        mode=trainer.decode_mode(),
        capacity=None,
        json_path=run_dir / "eval.json",
        plot_path=run_dir / "eval.png",
        info={
            "checkpoint": str(run_dir / CHECKPOINT_NAME),
            "step": trainer.step,
            "backend": backend_name,
        },
        progress=not opts["quiet"],
    )


def _run_header(model: Any, params: Any, train_config: Any, backend_name: str, group: Any) -> str:
    """The line that opens a training run: model, size, backend, task, budget, schedule."""
    n_params = sum(int(np.prod(p.shape)) for p in tree_leaves(params))
    size = model.config.summary()
    schedule = model.describe_schedule(train_config.steps)
    return (
        f"{model.name} ({size + ', ' if size else ''}{n_params / 1e3:.1f}k parameters) on "
        f"{backend_name}: task {train_config.task}, lengths 1..{train_config.train_length}, "
        f"{train_config.steps} steps"
        + (f", {schedule}" if schedule else "")
        + (f", {group.size} processes ({group.engine})" if group.size > 1 else "")
    )


@contextlib.contextmanager
def _run_errors(run_dir: Path, group: Any) -> Any:
    """What can end a run in ``run_dir``, as the command's error (one line, the exit code of a
    signal); leaves the process group at the end."""
    from pntm import restarts, run
    from pntm.train import (
        CHECKPOINT_NAME,
        RunDirectoryLost,
        TrainingDead,
        TrainingDiverged,
        TrainingStopped,
    )

    try:
        yield
    except run.RunExists as exc:
        raise click.ClickException(
            f"{exc}: continue it with `pntm train --resume {run_dir}`, or pass --out with "
            "a new directory"
        ) from exc
    except (run.RunDirectoryError, restarts.RestartsError) as exc:
        raise click.ClickException(str(exc)) from exc
    except TrainingDiverged as exc:
        raise click.ClickException(f"{exc}; checkpoint: {run_dir / CHECKPOINT_NAME}") from exc
    except RunDirectoryLost as exc:
        raise click.ClickException(str(exc)) from exc
    except TrainingDead as exc:
        discarded = group.is_main and run.discard_unsaved(run_dir)
        raise click.ClickException(
            f"{exc}"
            + (
                " (none had been written, so the run's files were removed)"
                if discarded
                else f" ({run_dir} keeps it)"
            )
        ) from exc
    except backends.ProcessGroupError as exc:
        raise click.ClickException(f"{exc}; the last checkpoint in {run_dir} is kept") from exc
    except TrainingStopped as exc:
        if not group.is_main:  # rank 0 says it, once
            raise SystemExit(exc.exit_code) from None
        raise Stopped(
            f"{exc}; checkpoint saved, continue with `pntm train --resume {run_dir}`",
            exc.exit_code,
        ) from None
    except KeyboardInterrupt:
        saved = any(run_dir.glob(f"**/{CHECKPOINT_NAME}"))
        raise Stopped(
            "interrupted twice: stopped at once without saving; "
            + (
                f"the last checkpoint in {run_dir} is kept"
                if saved
                else f"no checkpoint was written yet: remove {run_dir} to start again"
            ),
            130,
        ) from None
    except OSError as exc:  # the disk is full, a file turned into a directory, ...
        kept = (
            "no checkpoint had been written, so the run's files were removed: the same "
            "command can run again"
            if group.is_main and run.discard_unsaved(run_dir)
            else "the last checkpoint there is kept"
        )
        raise click.ClickException(
            f"cannot write the run in {run_dir}: {exc.strerror or exc}; {kept}"
        ) from exc
    finally:
        group.close()


def _train_restarts(
    plan: Any,
    run_dir: Path,
    backend_name: str,
    ops: backends.Backend,
    task: tasks.Task,
    eval_lengths: list[int],
    opts: dict[str, Any],
    resumed: bool,
) -> None:
    """Train the restarts of ``plan`` (new, or ``resumed`` from ``run_dir``), keep the best and
    evaluate it as a single run is evaluated."""
    from pntm import restarts, run
    from pntm.train import CHECKPOINT_NAME, TrainConfig, Trainer

    group = ops.process_group()
    say = click.echo if group.is_main else (lambda *_, **__: None)
    try:  # refused here what no restart could train (memory, batch against processes)
        probe = Trainer(plan.model, plan.model_config_object(), plan.config(0), ops, backend_name)
    except (ValueError, MemoryError) as exc:
        raise click.ClickException(str(exc)) from exc
    model = probe.model
    say(
        _run_header(model, probe.params, probe.config, backend_name, group)
        + f", {plan.restarts} restarts"
    )
    say(f"run directory: {run_dir}")
    check_new = run.check_new if group.is_main and not resumed else (lambda _: None)
    with _run_errors(run_dir, group):
        check_new(run_dir)
        with run.locked(run_dir) if group.is_main else contextlib.nullcontext():
            check_new(run_dir)
            results, kept = restarts.train_restarts(
                plan, run_dir, backend_name, ops, progress=not opts["quiet"], say=say
            )
    say(f"kept restart {kept} (seed {results[kept].seed}): {plan.choice}")
    if opts["no_eval"] or not group.is_main:
        return
    ckpt = checkpoint.load(run_dir / CHECKPOINT_NAME)
    config = TrainConfig.from_dict(ckpt.train_config)
    _evaluate_and_report(
        model,
        model.params_from_numpy(ckpt.params),
        task,
        config,
        eval_lengths,
        samples=opts["eval_samples"],
        seed=0,
        mode=model.decode_mode(ckpt.step, config.steps),
        capacity=None,
        json_path=run_dir / "eval.json",
        plot_path=run_dir / "eval.png",
        info={
            "checkpoint": str(run_dir / CHECKPOINT_NAME),
            "step": ckpt.step,
            "backend": backend_name,
        },
        progress=not opts["quiet"],
    )


def _is_restarts_run(path: Path) -> bool:
    """A run directory of restarts whose best is not chosen yet (then it has no checkpoint)."""
    from pntm import run
    from pntm.train import CHECKPOINT_NAME

    return (
        path.is_dir() and (path / run.PLAN_NAME).exists() and not (path / CHECKPOINT_NAME).exists()
    )


def _resumed_run_dir(opts: dict[str, Any], run_dir: Path) -> Path:
    if opts["out"] is not None and opts["out"].resolve() != run_dir.resolve():
        raise click.ClickException(
            f"--out {opts['out']} differs from the resumed run's directory {run_dir}; "
            "drop --out when resuming"
        )
    return run_dir


def _checked(check: Any, paths: Any) -> None:
    """Run a :mod:`pntm.run` check on ``paths``, its error as the command's error."""
    from pntm import run

    try:
        check(paths)
    except run.RunDirectoryError as exc:
        raise click.ClickException(str(exc)) from exc


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Any:
    """Within the block, Ctrl-C and the other stop signals interrupt it at once (work with
    nothing to save, such as an evaluation) as :class:`_Interrupted`, instead of Python's
    default: a bare traceback, or a silent death by SIGTERM."""
    from pntm.train import STOP_SIGNALS

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    try:
        previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stopped(click.ClickException):
    """Training stopped by a signal: one ``Error:`` line and the signal's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _new_configs(opts: dict[str, Any]) -> tuple[Any, str, Any]:
    """The training and model configs of a new run: the recipe of (model, task) under the
    options given."""
    from pntm import recipes
    from pntm.train import TrainConfig

    model_name = opts["model"] or "pntm"
    _refuse_foreign(opts, MODEL_OPTIONS, model_name)
    recipe = recipes.get(opts["task"] or TrainConfig.task, model_name)
    try:
        train_config = recipe.train_config(**_given(opts, TRAIN_OPTIONS, "train"))
        model_config = recipe.model_config(**_given(opts, MODEL_OPTIONS, model_name))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    return train_config, model_name, model_config


def _resumed_configs(opts: dict[str, Any], ckpt: checkpoint.Checkpoint) -> tuple[Any, str, Any]:
    """The checkpoint's configs; an option given must equal the checkpoint's value."""
    configs = _saved_configs(opts, ckpt.model, ckpt.model_config, ckpt.train_config)
    if ckpt.step >= configs[0].steps:
        raise click.ClickException(
            f"the checkpoint is at step {ckpt.step}, already at --steps "
            f"{configs[0].steps}: nothing to resume"
        )
    return configs


def _saved_configs(
    opts: dict[str, Any], model: str, model_config: dict[str, Any], train_config: dict[str, Any]
) -> tuple[Any, str, Any]:
    """The configs a run saved (as dicts); an option given must equal the saved value."""
    from pntm.train import TrainConfig

    if opts["model"] is not None and opts["model"] != model:
        raise click.ClickException(
            f"cannot resume: --model {opts['model']!r} differs from the checkpoint's "
            f"{model!r}; drop it or pass the checkpoint's value"
        )
    _refuse_foreign(opts, MODEL_OPTIONS, model)
    for generated, owner, saved in (
        (TRAIN_OPTIONS, "train", train_config),
        (MODEL_OPTIONS, model, model_config),
    ):
        for field, value in _given(opts, generated, owner).items():
            if saved.get(field) != value:
                flag = next(o.flag for o, _ in generated if o.fields.get(owner) == field)
                raise click.ClickException(
                    f"cannot resume: --{flag} {value!r} differs from the checkpoint's "
                    f"{saved.get(field)!r}; drop it or pass the checkpoint's value"
                )
    try:
        train = TrainConfig.from_dict(train_config)
        model_object = models.get(model).config_class.from_dict(model_config)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(f"cannot resume: {exc}") from exc
    return train, model, model_object


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


# ---------------------------------------------------------------------------------- eval


@main.command("eval")
@click.argument("checkpoint_path", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@backend_option("Where to evaluate (numpy, the float64 reference, works too).")
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
@_with_options(DECODE_OPTIONS)
@click.option(
    "--slots",
    default="auto",
    show_default=True,
    type=SlotCount(),
    help="Memory slots N of a memory model (its capacity): auto = the whole sequence length "
    "at each length, or a fixed N for every length (at least the longest input plus "
    "separator).",
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the samples."
)
@click.option(
    "--json",
    "json_path",
    type=OutputPath(dir_okay=False, path_type=Path),
    help="Where to write the results (default: a new eval-DATE-TIME.json beside the "
    "checkpoint; the eval.json written by training is kept).",
)
@click.option(
    "--plot",
    "plot_path",
    type=OutputPath(dir_okay=False, path_type=Path),
    help="Where to write the plot (default: the JSON file's name with .png).",
)
@threads_option()
def eval_command(checkpoint_path: Path, **opts: Any) -> None:
    """Greedy-decode a checkpoint's task at several lengths: exact match and token accuracy.

    CHECKPOINT is a checkpoint file or a run directory. The prompt is prefilled with the
    parallel form, then each emitted token is fed back through the step form. Prints a table
    and writes a JSON file and a PNG plot of accuracy against length. Options in [brackets]
    belong to the models named there."""
    from pntm import run
    from pntm.evaluate import check_capacity

    checkpoint_path, ckpt = _load_checkpoint(checkpoint_path)
    try:
        train_config = TrainConfig.from_dict(ckpt.train_config)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(f"checkpoint {checkpoint_path}: {exc}") from exc
    task = tasks.get(train_config.task)
    lengths = opts["lengths"] or _default_eval_lengths(task, train_config.train_length)
    slots = opts["slots"]
    if slots is not None and not models.get(ckpt.model).has_memory:
        raise click.ClickException(
            f"--slots {slots}: the {ckpt.model} model has no memory slots (those of "
            f"{', '.join(n for n in models.NAMES if models.get(n).has_memory)} do)"
        )
    try:
        check_capacity(task, lengths, slots)
    except ValueError as exc:
        raise click.ClickException(f"--slots {slots}: {exc}" if slots else str(exc)) from exc
    _refuse_foreign(opts, DECODE_OPTIONS, ckpt.model)
    json_path = opts["json_path"] or run.unique_eval_path(checkpoint_path.parent)
    plot_path = opts["plot_path"] or json_path.with_suffix(".png")
    _checked(run.check_output_files, [json_path, plot_path])  # now, not after evaluating
    backend_name, ops = _ops(opts["backend"], train=False, threads=opts["threads"])
    model_class = models.get(ckpt.model)
    model = model_class(model_class.config_class.from_dict(ckpt.model_config), ops)
    params = model.params_from_numpy(ckpt.params)
    try:
        given = _given(opts, DECODE_OPTIONS, ckpt.model)
        mode = model.decode_mode(ckpt.step, train_config.steps, **given)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    described = ", ".join(f"{k} {v}" for k, v in mode.items())
    click.echo(
        f"{ckpt.model} checkpoint at step {ckpt.step} (trained on {ckpt.backend}, lengths "
        f"1..{train_config.train_length}) evaluated on {backend_name}"
        + (f", {described}" if described else "")
    )
    _evaluate_and_report(
        model,
        params,
        task,
        train_config,
        lengths,
        opts["samples"],
        opts["seed"],
        mode,
        slots,
        json_path,
        plot_path,
        {"checkpoint": str(checkpoint_path), "step": ckpt.step, "backend": backend_name},
    )
    if opts["seed"] == 0:
        click.echo(
            "(samples of seed 0, the samples of the table printed at the end of training: "
            "--seed N draws others)"
        )


def _evaluate_and_report(
    model: Any,
    params: Any,
    task: tasks.Task,
    train_config: Any,
    lengths: list[int],
    samples: int,
    seed: int,
    mode: dict[str, Any],
    capacity: int | None,
    json_path: Path,
    plot_path: Path,
    info: dict[str, Any],
    progress: bool = True,
) -> None:
    from pntm.evaluate import evaluate, format_table, plot, write_json

    start = time.perf_counter()
    try:
        with _signals_interrupt():
            results = evaluate(
                model, params, task, lengths, samples, seed, mode, capacity, progress=progress
            )
    except MemoryError as exc:
        raise click.ClickException(str(exc)) from exc
    except _Interrupted as exc:  # a Ctrl-C, kill or closed terminal while it decodes
        raise Stopped(
            f"the evaluation was stopped by {signal.Signals(exc.signum).name}; nothing of it was "
            f"written, and {info['checkpoint']} is as it was (`pntm eval` evaluates it)",
            128 + exc.signum,
        ) from None
    described = "".join(f", {k} {v}" for k, v in mode.items())
    click.echo(
        f"\nlength generalization of {model.name}, task {task.name}, trained on lengths "
        f"1..{train_config.train_length} ({task.length_unit}), greedy decoding{described}:"
    )
    click.echo(format_table(results, train_config.train_length, model.has_memory))
    meta = {
        **info,
        "model": model.name,
        "task": task.name,
        "train_length": train_config.train_length,
        **mode,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "model_config": model.config.to_dict(),
    }
    title = f"{model.name}, {task.name}: trained on 1..{train_config.train_length}{described}"
    try:
        write_json(json_path, meta, results)
        plot(plot_path, title, results, train_config.train_length)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write the evaluation to {json_path} and {plot_path}: {exc.strerror or exc}"
        ) from exc
    click.echo(f"wrote {json_path} and {plot_path}")


# ---------------------------------------------------------------------------------- models


@main.command("models")
def models_command() -> None:
    """List the models and their options (each `pntm train --model NAME` option is one of
    its config fields; `pntm train --help` lists them all)."""
    for name in models.NAMES:
        cls = models.get(name)
        click.echo(f"{name:12s} {cls.description}")
        for f in options_of(cls.config_class):
            click.echo(f"    --{_flag(f):22s} default {f.default}")


# ---------------------------------------------------------------------------------- bench


BENCH_OPTIONS = _generated_options({"bench": BenchConfig})


@main.command("bench")
@backend_option("Where to measure (see `pntm backends`).")
@_with_options(BENCH_OPTIONS)
@click.option(
    "--out",
    type=OutputPath(file_okay=False, path_type=Path),
    help="Directory for bench.json, bench.md and bench.png (default: runs/bench-BACKEND-DATE).",
)
@threads_option()
@click.option("--quiet", is_flag=True, help="Do not print each measurement as it starts.")
def bench_command(**opts: Any) -> None:
    """Time a training step of every model over T, and greedy decoding tokens/s.

    Every model gets the same batch, width (or parameter count) and memory size (N = T slots).
    Warm-up excluded, medians of repeats; ratios to the P-NTM are from the same run. Prints
    Markdown tables and writes them with a JSON file and a PNG plot."""
    from pntm import bench, run

    try:
        cfg = BenchConfig(**_given(opts, BENCH_OPTIONS, "bench"))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    backend_name, ops = _ops(opts["backend"], train=True, threads=opts["threads"])
    try:
        bench.check_memory(cfg, bench.model_configs(cfg), ops)  # before anything is written
    except MemoryError as exc:
        raise click.ClickException(str(exc)) from exc
    out = opts["out"] or Path("runs") / f"bench-{backend_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _checked(run.check_writable, out)  # now, not after the measurements
    say = (lambda _: None) if opts["quiet"] else (lambda line: click.echo(line, err=True))
    report = bench.run(cfg, ops, backend_name, progress=say)
    click.echo(bench.format_report(report))
    paths = bench.write(report, out)
    click.echo(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
