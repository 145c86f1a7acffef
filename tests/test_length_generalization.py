"""scripts/length_generalization.py: a tiny grid end to end, read back when finished, resumed
from a checkpoint when interrupted, refused when a cell was trained with other settings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pntm import backends

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "length_generalization.py"
spec = importlib.util.spec_from_file_location("length_generalization", SCRIPT)
grid_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid_script)

pytestmark = pytest.mark.skipif(
    not any(i.name == "torch" and i.runs for i in backends.available()),
    reason="the grid trains with torch",
)
TINY = [
    "--set", "train.steps=4", "--set", "train.train_length=2", "--set", "train.batch_size=4",
    "--set", "model.d_model=8", "--set", "model.n_layers=1", "--set", "model.head_dim=2",
    "--samples", "3", "--workers", "1",
]  # fmt: skip


def test_grid_trains_reports_and_reads_back(tmp_path):
    grid, report = tmp_path / "grid", tmp_path / "results.md"
    args = ["--grid", str(grid), "--tasks", "copy", "--seeds", "0,1", *TINY]
    grid_script.main([*args, "--results", str(report)])
    for seed in (0, 1):
        cell = grid / "pntm" / "copy" / f"seed-{seed}"
        result = json.loads((cell / "result.json").read_text())
        assert result["steps"] == 4 and result["seed"] == seed
        assert [r["length"] for r in result["results"]] == [2, 4, 8, 16, 32]
        assert result["model_config"]["head_noise"] == 3.0  # the recipe, under the overrides
    text = report.read_text()
    assert "| copy | pntm | 0, 1 |" in text
    assert "| pntm | 0 | 4 |" in text and "| pntm | 1 | 4 |" in text
    assert report.with_suffix(".png").stat().st_size > 0
    # finished cells are read back, not trained again
    stamps = {p: p.stat().st_mtime_ns for p in grid.rglob("checkpoint.safetensors")}
    grid_script.main([*args, "--results", str(report), "--report-only"])
    grid_script.main(args)
    assert stamps == {p: p.stat().st_mtime_ns for p in grid.rglob("checkpoint.safetensors")}


def test_a_report_keeps_the_rows_of_cells_another_grid_ran(tmp_path):
    """The report's records (results.json beside it) keep every cell's row: a grid run over
    some cells replaces theirs and keeps the others, and the report names both commands."""
    report = tmp_path / "results.md"
    first = ["--grid", str(tmp_path / "a"), "--tasks", "copy", "--seeds", "0,1", *TINY]
    grid_script.main([*first, "--results", str(report)])
    again = ["--grid", str(tmp_path / "b"), "--tasks", "copy", "--seeds", "1", *TINY]
    grid_script.main([*again, "--set", "train.steps=5", "--results", str(report)])
    text = report.read_text()
    assert "| pntm | 0 | 4 |" in text and "| pntm | 1 | 5 |" in text
    assert "| pntm | 1 | 4 |" not in text
    assert "Commands (each row comes from one of them):" in text
    assert f"--grid {tmp_path / 'a'}" in text and f"--grid {tmp_path / 'b'}" in text
    records = json.loads(report.with_suffix(".json").read_text())
    assert [(r["seed"], r["steps"]) for r in records] == [(0, 4), (1, 5)]
    report.with_suffix(".json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"results\.json: not the records of a report"):
        grid_script.main([*first, "--results", str(report), "--report-only"])


def test_interrupted_cell_resumes_and_other_settings_are_refused(tmp_path):
    """A cell stopped at step 2 of 4 resumes from its checkpoint and ends where an
    uninterrupted cell ends; a cell trained with other settings is refused."""
    from pntm import checkpoint, recipes
    from pntm.train import CHECKPOINT_NAME, Trainer
    from pntm.tree import tree_flatten

    args = ["--tasks", "copy", "--seeds", "0", *TINY]
    grid_script.main(["--grid", str(tmp_path / "straight"), *args])
    overrides = grid_script.parse_overrides(TINY[: TINY.index("--samples")][1::2])
    recipe = recipes.get("copy")
    trainer = Trainer(
        "pntm",
        recipe.model_config(**overrides["model"]),
        recipe.train_config(seed=0, **overrides["train"]),
        backends.get("torch"),
        "torch",
    )
    trainer.train_step()
    trainer.train_step()
    cell = tmp_path / "resumed" / "pntm" / "copy" / "seed-0"
    checkpoint.save(cell / CHECKPOINT_NAME, trainer.to_checkpoint())
    grid_script.main(["--grid", str(tmp_path / "resumed"), *args])
    resumed = checkpoint.load(cell / CHECKPOINT_NAME)
    straight = checkpoint.load(tmp_path / "straight" / "pntm" / "copy" / "seed-0" / CHECKPOINT_NAME)
    assert resumed.step == straight.step == 4
    for key, value in tree_flatten(straight.params).items():
        assert (tree_flatten(resumed.params)[key] == value).all(), key

    (cell / "result.json").unlink()
    with pytest.raises(SystemExit, match="1 cells failed"):
        grid_script.main(["--grid", str(tmp_path / "resumed"), *args, "--set", "train.lr=1e-3"])
    with pytest.raises(ValueError, match="other settings"):
        grid_script.run_cell(
            str(tmp_path / "resumed"),
            "pntm",
            "copy",
            0,
            grid_script.parse_overrides([]),
            3,
            0,
            "torch",
            1,
        )


def test_bad_overrides_are_named():
    with pytest.raises(SystemExit, match=r"train\.FIELD=VALUE"):
        grid_script.parse_overrides(["steps=3"])
    with pytest.raises(SystemExit, match=r"recipe\.restarts=N"):
        grid_script.parse_overrides(["recipe.steps=3"])
    assert grid_script.parse_overrides(["recipe.validation_factor=6"])["recipe"] == {
        "validation_factor": 6
    }
    assert grid_script.parse_overrides(["model.overwrite=false", "train.task=x"]) == {
        "model": {"overwrite": False},
        "train": {"task": "x"},
        "recipe": {},
    }


def test_a_cell_of_restarts_keeps_the_best_and_reports_each(tmp_path):
    """With restarts, a cell trains them as ``pntm train`` does (CELL/restart-R), evaluates the
    kept one, and its row gives each restart's time and the one kept."""
    from pntm import restarts

    grid, report = tmp_path / "grid", tmp_path / "results.md"
    args = ["--grid", str(grid), "--tasks", "copy", "--seeds", "1", *TINY]
    grid_script.main([*args, "--set", "recipe.restarts=2", "--results", str(report)])
    cell = grid / "pntm" / "copy" / "seed-1"
    result = json.loads((cell / "result.json").read_text())
    record = json.loads((cell / restarts.PLAN_NAME).read_text())
    assert result["restarts"]["kept"] == record["selected"]
    assert [r["seed"] for r in record["results"]] == [1, restarts.restart_seed(1, 1)]
    kept = cell / f"restart-{record['selected']}" / "checkpoint.safetensors"
    assert (cell / "checkpoint.safetensors").read_bytes() == kept.read_bytes()
    times = [f"{r['train_seconds'] / 60:.1f}" for r in record["results"]]
    times[record["selected"]] += "*"
    assert f"| {' + '.join(times)} min |" in report.read_text()
    (cell / "result.json").unlink()  # evaluated again from the kept checkpoint, not retrained
    again = grid_script.main([*args, "--set", "recipe.restarts=2"])
    assert (
        again is None
        and json.loads((cell / "result.json").read_text())["results"] == (result["results"])
    )
    (cell / "result.json").unlink()
    with pytest.raises(SystemExit, match="1 cells failed"):
        grid_script.main([*args, "--set", "recipe.restarts=3"])
    with pytest.raises(SystemExit, match="1 cells failed"):  # chosen another way: refused too
        factor = ["--set", "recipe.validation_factor=2"]
        grid_script.main([*args, "--set", "recipe.restarts=2", *factor])

    plain = ["--grid", str(tmp_path / "plain"), "--tasks", "copy", "--seeds", "1", *TINY]
    grid_script.main(plain)  # one run per cell
    (tmp_path / "plain" / "pntm" / "copy" / "seed-1" / "result.json").unlink()
    overrides = grid_script.parse_overrides([*TINY[: TINY.index("--samples")][1::2]])
    overrides["recipe"]["restarts"] = 2
    with pytest.raises(ValueError, match="holds a single run, not restarts"):
        grid_script.run_cell(
            str(tmp_path / "plain"), "pntm", "copy", 1, overrides, 3, 0, "torch", 1
        )


def test_a_worker_ends_when_its_grid_process_is_gone():
    """A worker whose recorded parent is no longer its parent (the grid process was killed)
    exits by itself instead of training on as an orphan."""
    code = (
        "import importlib.util, time; "
        f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r}); "
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g); "
        "g.exit_with_parent(-1, poll_s=0.01); time.sleep(120)"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 1


def test_reproduce_runs_several_models_in_worker_processes(tmp_path):
    """scripts/reproduce.py, as a user runs it: two models in two spawned workers, one report
    with a summary row per model."""
    grid, report = tmp_path / "grid", tmp_path / "results.md"
    args = [
        "--grid", str(grid), "--models", "pntm,lstm", "--tasks", "parity", "--seeds", "0",
        "--workers", "2", "--samples", "2", "--set", "train.steps=3", "--set",
        "train.train_length=2", "--set", "train.batch_size=2", "--set", "model.d_model=8",
        "--results", str(report),
    ]  # fmt: skip
    script = SCRIPT.with_name("reproduce.py")
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for model in ("pntm", "lstm"):
        result = json.loads((grid / model / "parity" / "seed-0" / "result.json").read_text())
        assert result["model"] == model and result["steps"] == 3
        assert f"| parity | {model} | 0 |" in report.read_text()


TINY_SETTINGS = [
    "--set", "train.steps=3", "--set", "train.train_length=2", "--set", "train.batch_size=2",
    "--set", "model.d_model=8", "--workers", "1",
]  # fmt: skip


def test_reproduce_with_other_settings_keeps_the_committed_report(tmp_path):
    """`scripts/reproduce.py` with settings other than the recipes' (here --set and
    --samples) and no --results: the report goes to the grid's directory, and the default
    report (docs/results.md, relative to where it runs) is not written."""
    grid = tmp_path / "grid"
    args = ["--grid", str(grid), "--models", "lstm", "--tasks", "parity", "--seeds", "1"]
    args += ["--samples", "4", *TINY_SETTINGS]
    script = SCRIPT.with_name("reproduce.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "settings other than the recipes'" in done.stdout and "--samples 4" in done.stdout
    assert not (tmp_path / "docs").exists()
    assert "| parity | lstm | 1 |" in (grid / "results.md").read_text()


def test_every_row_carries_its_own_settings(tmp_path):
    """Rows of one report from runs of different settings: each row shows its sample count
    and evaluation seed, and each seed's overrides are listed (not the first row's alone)."""
    report = tmp_path / "results.md"
    for seed, samples, steps in ((0, 2, 3), (1, 3, 4)):
        args = ["--grid", str(tmp_path / "grid"), "--models", "lstm", "--tasks", "parity"]
        args += ["--seeds", str(seed), "--samples", str(samples), *TINY_SETTINGS]
        args += ["--set", f"train.steps={steps}", "--results", str(report)]
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    assert "| lstm | 0 | 3 |" in text and "| 2 (2026) |" in text
    assert "| lstm | 1 | 4 |" in text and "| 3 (2026) |" in text
    assert "lstm recipe (seeds 0): " in text and "lstm recipe (seeds 1): " in text
    assert "'steps': 3" in text and "'steps': 4" in text
