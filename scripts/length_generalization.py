"""Length generalization grid: train each model x task x seed with its recipe
(``pntm.recipes``, the settings ``pntm train --model MODEL --task NAME`` uses), evaluate greedy
exact match at L_train x 1, 2, 4, 8 and 16 on fresh sequences as ``pntm eval`` does, and write
a Markdown report with a PNG.

Each cell is a run directory ``GRID/MODEL/TASK/seed-S`` (checkpoint, metrics.jsonl,
result.json), so an interrupted grid continues where it stopped: finished cells are read back,
unfinished ones resume from their last checkpoint. ``--set`` changes a recipe field for the whole
grid (for experiments); a grid directory refuses a cell whose checkpoint was trained with other
settings. ``scripts/reproduce.py`` runs it for every model and task.

The report's records (one per model x task x seed) are kept beside it (``results.json`` next to
``results.md``), so a grid run that covers some cells, say one task re-run with a new recipe,
replaces their rows and keeps the others; the report lists the commands its rows come from.

    python scripts/length_generalization.py --grid runs/lengthgen --results docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from pntm.run import exit_with_parent

FACTORS = (1, 2, 4, 8, 16)
RESULT_NAME = "result.json"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``train.steps=3000`` / ``model.velocity_prior=2`` / ``recipe.restarts=2`` /
    ``recipe.validation_factor=6`` ->
    {"train": {...}, "model": {...}, "recipe": {...}}."""
    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}, "recipe": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        group, dot, name = key.partition(".")
        recipe_field = name in ("restarts", "validation_factor")
        if not sep or not dot or group not in out or (group == "recipe" and not recipe_field):
            raise SystemExit(
                f"--set {item!r}: expected train.FIELD=VALUE, model.FIELD=VALUE, "
                "recipe.restarts=N or recipe.validation_factor=F"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[group][name] = value
    return out


def cell_dir(grid: str | Path, model: str, task: str, seed: int) -> Path:
    return Path(grid) / model / task / f"seed-{seed}"


def run_cell(
    grid: str,
    model_name: str,
    task_name: str,
    seed: int,
    overrides: dict[str, dict[str, Any]],
    samples: int,
    eval_seed: int,
    backend: str,
    threads: int,
    restart_workers: int = 1,
) -> dict[str, Any]:
    """Train (or resume) and evaluate one task x seed; returns its result (also on disk)."""
    import torch

    torch.set_num_threads(threads)
    from pntm import backends, checkpoint, recipes
    from pntm.train import CHECKPOINT_NAME, TrainConfig, Trainer, fit, read_metrics

    cell = cell_dir(grid, model_name, task_name, seed)
    result_path = cell / RESULT_NAME
    if result_path.exists():
        return json.loads(result_path.read_text())
    recipe = recipes.get(task_name, model_name)
    train_config = recipe.train_config(seed=seed, **overrides["train"])
    model_config = recipe.model_config(**overrides["model"])
    chosen = {"restarts": recipe.restarts, "validation_factor": recipe.validation_factor}
    chosen |= overrides.get("recipe", {})
    if chosen["restarts"] > 1:
        return _restarts_cell(
            cell, model_name, train_config, model_config, chosen, recipe.describe(), overrides,
            samples, eval_seed, backend, threads, restart_workers,
        )  # fmt: skip
    resume = None
    if (cell / CHECKPOINT_NAME).exists():
        resume = checkpoint.load(cell / CHECKPOINT_NAME)
        saved = TrainConfig.from_dict(resume.train_config)  # fields added since take defaults
        if (saved, resume.model_config) != (train_config, model_config.to_dict()):
            raise ValueError(
                f"{cell} holds a run with other settings than this grid's; use another grid "
                "directory"
            )
    ops = backends.get(backend)
    trainer = Trainer(model_name, model_config, train_config, ops, backend, resume)
    if trainer.step < train_config.steps:
        fit(trainer, cell, progress=False)
    metrics = read_metrics(cell)
    trained = {
        "steps": trainer.step,
        "train_seconds": sum(m["seconds"] for m in metrics),
        "final_loss": metrics[-1]["loss"],
    }
    return _evaluate_cell(
        cell, trainer.model, trainer.params, trainer.decode_mode(), train_config, recipe.describe(),
        overrides, trained, samples, eval_seed, backend, threads,
    )  # fmt: skip


def _restarts_cell(
    cell: Path,
    model_name: str,
    train_config: Any,
    model_config: Any,
    chosen: dict[str, int],
    recipe: str,
    overrides: dict[str, dict[str, Any]],
    samples: int,
    eval_seed: int,
    backend: str,
    threads: int,
    restart_workers: int,
) -> dict[str, Any]:
    """A cell of ``chosen["restarts"]`` restarts chosen with its ``validation_factor``
    (:mod:`pntm.restarts`, as ``pntm train`` runs them, in ``CELL/restart-R``),
    ``restart_workers`` at a time; the kept one is evaluated."""
    from pntm import backends, checkpoint, models, restarts
    from pntm.train import CHECKPOINT_NAME

    count = chosen["restarts"]
    plan = restarts.Plan(
        model_name, model_config.to_dict(), train_config.to_dict(), count,
        chosen["validation_factor"],
    )  # fmt: skip
    if (cell / CHECKPOINT_NAME).exists() and not (cell / restarts.PLAN_NAME).exists():
        raise ValueError(f"{cell} holds a single run, not restarts; use another grid directory")
    if (cell / restarts.PLAN_NAME).exists() and restarts.load_plan(cell) != plan:
        raise ValueError(
            f"{cell} holds restarts with other settings than this grid's; use another grid "
            "directory"
        )
    ops = backends.get(backend)
    if not (cell / CHECKPOINT_NAME).exists():
        cell.mkdir(parents=True, exist_ok=True)
        restarts.train_restarts(
            plan, cell, backend, ops, workers=restart_workers, progress=False, say=lambda _: None
        )
    record = json.loads((cell / restarts.PLAN_NAME).read_text())
    kept = record["results"][record["selected"]]
    ckpt = checkpoint.load(cell / CHECKPOINT_NAME)
    model = models.get(model_name)(model_config, ops)
    trained = {
        "steps": ckpt.step,
        "train_seconds": sum(r["train_seconds"] for r in record["results"]),
        "final_loss": kept["final_loss"],
        "restarts": {
            "count": count,
            "workers": restart_workers,
            "kept": record["selected"],
            "validation_length": plan.validation_length,
            "wall_seconds": record["wall_seconds"],
            "results": record["results"],
        },
    }
    return _evaluate_cell(
        cell, model, model.params_from_numpy(ckpt.params),
        model.decode_mode(ckpt.step, train_config.steps), train_config, recipe, overrides,
        trained, samples, eval_seed, backend, threads,
    )  # fmt: skip


def _evaluate_cell(
    cell: Path,
    model: Any,
    params: Any,
    mode: dict[str, Any],
    train_config: Any,
    recipe: str,
    overrides: dict[str, dict[str, Any]],
    trained: dict[str, Any],
    samples: int,
    eval_seed: int,
    backend: str,
    threads: int,
) -> dict[str, Any]:
    """Evaluate a trained cell at L_train x FACTORS; its result, written to CELL/result.json."""
    from pntm import checkpoint, tasks
    from pntm.evaluate import default_lengths, evaluate

    task = tasks.get(train_config.task)
    start = time.perf_counter()
    results = evaluate(
        model,
        params,
        task,
        default_lengths(train_config.train_length, task, FACTORS),
        samples=samples,
        seed=eval_seed,
        mode=mode,
    )
    result = {
        "model": model.name,
        "task": task.name,
        "seed": train_config.seed,
        "recipe": recipe,
        "overrides": overrides,
        "train_config": train_config.to_dict(),
        "model_config": model.config.to_dict(),
        "backend": backend,
        "threads": threads,
        **trained,
        "eval_seconds": time.perf_counter() - start,
        "eval_seed": eval_seed,
        "decode_mode": mode,
        "results": [asdict(r) for r in results],
    }
    checkpoint.atomic_write(
        cell / RESULT_NAME, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    )
    return result


def model_of(result: dict[str, Any]) -> str:
    return result.get("model", "pntm")  # results written before the grid had models


def summary_line(r: dict[str, Any]) -> str:
    exact = " ".join(f"{x['exact_match']:.2f}" for x in r["results"])
    lengths = "/".join(str(x["length"]) for x in r["results"])
    return (
        f"{model_of(r):11s} {r['task']:22s} seed {r['seed']}: exact at {lengths} = {exact} "
        f"(loss {r['final_loss']:.2g}, {r['steps']} steps, {r['train_seconds']:.0f} s)"
    )


def cell_key(result: dict[str, Any]) -> tuple[str, str, int]:
    return model_of(result), result["task"], result["seed"]


def kept_records(report: Path, covered: set[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """The records beside ``report`` (from earlier grid runs) of the cells not in ``covered``."""
    path = report.with_suffix(".json")
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not the records of a report ({exc})") from exc
    return [r for r in records if cell_key(r) not in covered]


def write_report(path: Path, results: list[dict[str, Any]], command: str) -> None:
    """Markdown: a summary (model x task: median and range over seeds at 1x..16x), then one
    table per task with a row per model and seed; a PNG and the records (JSON) next to ``path``.
    Rows of cells that ``results`` does not hold are kept from the records already there."""
    from pntm import models, tasks
    from pntm.checkpoint import atomic_write

    results = [{"command": command, **r} for r in results]
    results += kept_records(path, {cell_key(r) for r in results})
    # the registries' order (tasks, then models, then seeds), whichever run a row comes from
    order = {name: i for i, name in enumerate([*tasks.NAMES, *models.NAMES])}
    results.sort(
        key=lambda r: (
            order.get(r["task"], len(order)),
            order.get(model_of(r), len(order)),
            r["seed"],
        )
    )
    commands = list(dict.fromkeys(r["command"] for r in results))
    png = path.with_suffix(".png")
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        by_task.setdefault(r["task"], {}).setdefault(model_of(r), []).append(r)
    models_seen = list(dict.fromkeys(model_of(r) for r in results))
    lines = [
        "# Length generalization results",
        "",
        "Written by `scripts/length_generalization.py`; do not edit by hand. "
        + ("Command:" if len(commands) == 1 else "Commands (each row comes from one of them):"),
        "",
        *(f"    {c}" for c in commands),
        "",
        "Each row is one seed trained with its recipe (`pntm tasks`, `pntm/recipes.py`): the",
        "settings `pntm train --model MODEL --task NAME` uses (the other models train with the",
        "P-NTM recipe's number of steps and their own defaults). Greedy exact match (every target",
        "token and END right) in each model's decoding mode (the P-NTM: the heads of the end of",
        "training), on fresh sequences drawn from the evaluation seed, memory N = the whole",
        "sequence length. Train time is the optimizer steps' wall time on one thread, as that",
        "run measured it (a run that shared the cores with more runs than cores took longer;",
        "`docs/research-log.md` gives the budgets measured alone); a recipe",
        "with restarts trains several seeds (restart 0 has the row's seed) and keeps the one",
        "with the lowest cross-entropy on fresh sequences of the training lengths (its time",
        "marked *; `pntm train` runs them side by side, one per core); with a validation factor",
        "F in its recipe, the one with the fewest misses on fresh sequences of F x L_train comes",
        "first (F is not an evaluated factor). The",
        "peers are not tuned: they get the P-NTM recipe's steps, batch and learning rate. Where",
        "the task's limit caps a length (associative recall: 64 pairs = 8x), the longer factors",
        "repeat the longest length evaluated.",
        "",
        f"![exact match against length]({png.name})",
        "",
        "Exact match, median over seeds [min, max]:",
        "",
        "| task | model | seeds | 1x | 2x | 4x | 8x | 16x | 100% at 8x on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, by_model in by_task.items():
        for model in models_seen:
            rows = by_model.get(model)
            if not rows:
                continue
            cells = []
            for factor in FACTORS:
                values = [_exact_at(r, factor) for r in rows]
                cells.append(
                    f"{np.median(values):.2f}"
                    + (f" [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else "")
                )
            at8 = [_exact_at(r, 8) for r in rows]
            lines.append(
                f"| {task} | {model} | {', '.join(str(r['seed']) for r in rows)} | "
                + " | ".join(cells)
                + f" | {sum(x == 1.0 for x in at8)} of {len(rows)} |"
            )
    lines.append("")
    for task, by_model in by_task.items():
        first = next(iter(by_model.values()))[0]
        lengths = [x["length"] for x in first["results"]]
        L = first["train_config"]["train_length"]
        lines += [
            f"## {task}",
            "",
            "| model | seed | steps | train time | final loss | samples (eval seed) | "
            + " | ".join(f"L={n} ({n / L:g}x)" for n in lengths)
            + " |",
            "|---" * (6 + len(lengths)) + "|",
        ]
        for model, rows in by_model.items():
            for r in rows:
                cells = [f"{x['exact_match']:.3f}" for x in r["results"]]
                samples = r["results"][0]["samples"]
                lines.append(
                    f"| {model} | {r['seed']} | {r['steps']} | {_train_time(r)} "
                    f"| {r['final_loss']:.2g} | {samples} ({r['eval_seed']}) | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
        for model, rows in by_model.items():
            # every row's own settings: rows of one model may come from different runs
            settings: dict[str, list[int]] = {}
            for r in rows:
                said = f"`{r['recipe']}`" + (
                    f"; grid overrides `{r['overrides']}`" if _any(r["overrides"]) else ""
                )
                settings.setdefault(said, []).append(r["seed"])
            for said, seeds in settings.items():
                which = "" if len(settings) == 1 else f" (seeds {', '.join(map(str, seeds))})"
                lines.append(f"- {model} recipe{which}: {said}")
        lines.append("")
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    records = sorted(results, key=cell_key)
    atomic_write(
        path.with_suffix(".json"),
        lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"),
    )
    _plot(png, by_task, models_seen)


def _train_time(result: dict[str, Any]) -> str:
    """One run's time; for restarts each one's (the kept one marked), which side by side on
    the cores of one machine take about as long as the longest."""
    if "restarts" not in result:
        return f"{result['train_seconds'] / 60:.1f} min"
    info = result["restarts"]
    return (
        " + ".join(
            f"{r['train_seconds'] / 60:.1f}" + ("*" if r["restart"] == info["kept"] else "")
            for r in info["results"]
        )
        + " min"
    )


def _exact_at(result: dict[str, Any], factor: int) -> float:
    """Exact match at ``factor`` x L_train (or the longest length evaluated, if capped)."""
    L = result["train_config"]["train_length"]
    points = [x for x in result["results"] if x["length"] <= factor * L]
    return points[-1]["exact_match"]


def _any(overrides: dict[str, dict[str, Any]]) -> bool:
    return any(overrides.values())


def _plot(
    path: Path, by_task: dict[str, dict[str, list[dict[str, Any]]]], models_seen: list[str]
) -> None:
    """One panel per task: exact match against length, one colour per model, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pntm.checkpoint import atomic_write
    from pntm.evaluate import style_length_axes

    n = len(by_task)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, layout="constrained"
    )
    colours = {m: f"C{i}" for i, m in enumerate(models_seen)}
    for ax, (task, by_model) in zip(axes.flat, by_task.items(), strict=False):
        for model, runs in by_model.items():
            for i, r in enumerate(runs):
                x = [p["length"] for p in r["results"]]
                ax.plot(
                    x, [p["exact_match"] for p in r["results"]], "o-", color=colours[model],
                    alpha=0.75, ms=3, label=model if len(models_seen) > 1 and i == 0 else
                    (f"seed {r['seed']}" if len(models_seen) == 1 else None),
                )  # fmt: skip
        first = next(iter(by_model.values()))[0]
        style_length_axes(ax, x, first["train_config"]["train_length"])
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("exact match")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, required=True, help="grid directory (resumable)")
    parser.add_argument("--models", default="pntm", help="comma-separated model names, or all")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--samples", type=int, default=200, help="fresh sequences per length")
    parser.add_argument("--eval-seed", type=int, default=2026, help="seed of those sequences")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at once")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per cell")
    parser.add_argument(
        "--restart-workers",
        type=int,
        default=1,
        help="restarts of one cell trained at once (processes of --threads each), for recipes "
        "with restarts; run them side by side as pntm train does with --workers 1",
    )
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE")
    parser.add_argument("--results", type=Path, help="write the Markdown report here (+ .png)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the cells of the grid that are finished",
    )
    return parser


def recipe_settings(args: argparse.Namespace) -> list[str]:
    """How ``args`` depart from the recipes' settings (overrides, a sample count or an
    evaluation seed other than the defaults), in words; empty for the recipes' own."""
    defaults = make_parser().parse_args(["--grid", "."])
    departures = [f"--set {item}" for item in args.set]
    for name in ("samples", "eval_seed"):
        if getattr(args, name) != getattr(defaults, name):
            departures.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    return departures


def main(argv: list[str] | None = None) -> None:
    from pntm import models, tasks

    args = make_parser().parse_args(argv)

    names = list(tasks.NAMES) if args.tasks == "all" else args.tasks.split(",")
    for name in names:
        tasks.get(name)
    model_names = list(models.NAMES) if args.models == "all" else args.models.split(",")
    for name in model_names:
        models.get(name)
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_overrides(args.set)
    cells = [(model, name, seed) for name in names for model in model_names for seed in seeds]
    command = "python scripts/length_generalization.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results, failed = [], []

    def report() -> None:
        # after every cell, so that an interrupted grid still has its finished rows reported
        if args.results is not None and results:
            write_report(args.results, results, command.replace(" --report-only", ""))

    if args.report_only:
        for cell in cells:
            path = cell_dir(args.grid, *cell) / RESULT_NAME
            if path.exists():
                results.append(json.loads(path.read_text()))
        print(f"{len(results)} of {len(cells)} cells finished in {args.grid}")
        report()
        return
    print(f"{len(cells)} cells in {args.grid}, {args.workers} at a time", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.perf_counter()
    jobs = [
        (str(args.grid), *cell, overrides, args.samples, args.eval_seed, args.backend,
         args.threads, args.restart_workers)
        for cell in cells
    ]  # fmt: skip

    def finished(cell: tuple[str, str, int], outcome: Any) -> None:
        try:
            result = outcome()
        except Exception as exc:  # one failed cell must not lose the others
            failed.append(cell)
            print(f"{cell} failed: {exc!r}", flush=True)
            return
        results.append(result)
        print(f"[{time.perf_counter() - start:6.0f} s] {summary_line(result)}", flush=True)
        report()

    if args.workers == 1:  # in this process, one cell after another
        for job in jobs:
            finished(job[1:4], lambda job=job: run_cell(*job))
    else:
        with ProcessPoolExecutor(
            args.workers,
            mp_context=get_context("spawn"),
            initializer=exit_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(run_cell, *job): job[1:4] for job in jobs}
            for future in as_completed(futures):
                finished(futures[future], future.result)
    if args.results is not None and results:
        print(f"wrote {args.results} and {args.results.with_suffix('.png')}")
    if failed:
        raise SystemExit(f"{len(failed)} cells failed: {failed}")


if __name__ == "__main__":
    main()
