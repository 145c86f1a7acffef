"""The CLI end to end, and every bad-input case: one ``Error:`` line naming the value and what
is allowed, a non-zero exit, no traceback, nothing overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pntm import backends, tasks
from pntm.cli import main

TRAINABLE = [i.name for i in backends.available() if i.runs and i.trainable]
pytestmark = pytest.mark.skipif(not TRAINABLE, reason="no trainable backend installed")
TINY = [
    "--task", "copy", "--steps", "12", "--train-length", "3", "--batch-size", "8",
    "--d-model", "16", "--layers", "1", "--memory-heads", "1", "--head-dim", "4",
    "--warmup-steps", "2", "--save-every", "5", "--eval-lengths", "2,4", "--eval-samples", "4",
    "--quiet",
]  # fmt: skip


def run(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result: Result, *fragments: str, code: int | None = None) -> None:
    """A clean refusal: non-zero exit by SystemExit (no other exception escaped, so no
    traceback), and an ``Error:`` line holding every fragment."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if code is not None:
        assert result.exit_code == code
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "copy"
    result = run("train", *TINY, "--backend", TRAINABLE[0], "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def fresh_run(run_dir, tmp_path) -> Path:
    """A copy of the trained run that a test may modify."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# ------------------------------------------------------------------------------ happy paths
def test_train_writes_a_run_and_prints_the_table(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"checkpoint.safetensors", "metrics.jsonl", "eval.json", "eval.png"} | {
        ".pntm.lock"  # the run's lock (flock), kept: removing it would race with a new run
    }
    data = json.loads((run_dir / "eval.json").read_text())
    assert [r["length"] for r in data["results"]] == [2, 4]
    assert data["heads"] == "hard" and data["task"] == "copy"


def test_eval_prints_the_table_on_every_backend(run_dir, tmp_path):
    for name in [i.name for i in backends.available() if i.runs]:
        json_path = tmp_path / f"{name}.json"
        result = run(
            "eval", run_dir, "--backend", name, "--lengths", "3,6", "--samples", "5",
            "--json", json_path, "--plot", tmp_path / f"{name}.png",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "exact" in result.output and "token acc" in result.output
        rows = json.loads(json_path.read_text())["results"]
        assert [(r["length"], r["samples"]) for r in rows] == [(3, 5), (6, 5)]
    fixed = run(
        "eval",
        run_dir,
        "--lengths",
        "3,6",
        "--samples",
        "2",
        "--slots",
        "20",
        "--json",
        tmp_path / "fixed.json",
        "--plot",
        tmp_path / "fixed.png",
    )
    assert fixed.exit_code == 0, fixed.output
    rows = json.loads((tmp_path / "fixed.json").read_text())["results"]
    assert [r["capacity"] for r in rows] == [20, 20]
    (tmp_path / "fixed.json").unlink()
    # the same checkpoint decodes to the same accuracies everywhere
    results = {p.stem: json.loads(p.read_text())["results"] for p in tmp_path.glob("*.json")}
    assert len({json.dumps(r) for r in results.values()}) == 1, results


def test_finished_run_has_nothing_to_resume(fresh_run):
    assert_refused(run("train", "--resume", fresh_run, "--quiet"), "already at --steps 12")


def test_resume_from_a_middle_checkpoint(tmp_path):
    """A run stopped at step 5 of 12 resumes with just ``--resume``: every option comes from
    the checkpoint, and the result equals the uninterrupted run's."""
    import numpy as np

    from pntm import checkpoint, recipes
    from pntm.train import Trainer
    from pntm.tree import tree_flatten

    name = TRAINABLE[0]
    # the settings TINY gives `pntm train`: the copy recipe where TINY is silent
    recipe = recipes.get("copy")
    model = recipe.model_config(d_model=16, n_layers=1, n_heads=1, head_dim=4)
    config = recipe.train_config(train_length=3, steps=12, batch_size=8, warmup_steps=2)
    trainer = Trainer("pntm", model, config, backends.get(name), name)
    for _ in range(5):
        trainer.train_step()
    checkpoint.save(tmp_path / "r" / "checkpoint.safetensors", trainer.to_checkpoint())

    # step 5 of 12 is still in the soft phase (hard from step 4.8): eval's auto mode says so
    early = run(
        "eval",
        tmp_path / "r",
        "--lengths",
        "3",
        "--samples",
        "2",
        "--json",
        tmp_path / "e.json",
        "--plot",
        tmp_path / "e.png",
    )
    assert early.exit_code == 0 and "heads soft" in early.output, early.output
    result = run("train", "--resume", tmp_path / "r", "--backend", name, "--quiet")
    assert result.exit_code == 0, result.output
    assert "resumed at step 5" in result.output and "exact" in result.output
    assert (
        run("train", *TINY, "--backend", name, "--no-eval", "--out", tmp_path / "s").exit_code == 0
    )
    resumed = checkpoint.load(tmp_path / "r" / "checkpoint.safetensors")
    straight = checkpoint.load(tmp_path / "s" / "checkpoint.safetensors")
    assert resumed.step == straight.step == 12
    for key, value in tree_flatten(straight.params).items():
        np.testing.assert_array_equal(tree_flatten(resumed.params)[key], value, err_msg=key)


def test_tasks_and_backends_commands():
    listing = run("tasks")
    assert listing.exit_code == 0
    for name in tasks.NAMES:
        assert name in listing.output
    shown = run("tasks", "--show", "binary_addition", "--length", "3", "--count", "2")
    examples = [line for line in shown.output.splitlines() if line.startswith("  ")]
    assert shown.exit_code == 0 and len(examples) == 2
    assert all(" + " in line and " = " in line and line.endswith(" .") for line in examples)
    assert "triton" in run("backends").output


def test_every_command_has_help():
    for command in ("train", "eval", "tasks", "backends"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
        options = [p for p in main.commands[command].params if p.param_type_name == "option"]
        assert all(p.help for p in options), [p.name for p in options if not p.help]


# ------------------------------------------------------------------------------ bad input
def test_unknown_task_backend_and_model():
    assert_refused(run("train", "--task", "copyy"), "'copyy'", "copy", code=2)
    assert_refused(run("train", "--backend", "jax"), "'jax'", "torch", code=2)
    assert_refused(run("train", "--model", "rnn"), "'rnn'", "pntm", code=2)
    assert_refused(run("tasks", "--show", "sorting"), "'sorting'", "parity", code=2)


def test_backend_that_cannot_run_here(tmp_path, monkeypatch):
    try:
        from pntm.backends.scans import metal
    except ImportError:  # no MLX: the metal backend cannot run here as it is
        pass
    else:
        monkeypatch.setattr(metal, "unavailable_reason", lambda: "no Metal GPU here")
    assert_refused(
        run("train", *TINY, "--backend", "metal", "--out", tmp_path / "t"),
        "metal",
        "cannot run",
        "backends that run here",
    )
    assert_refused(
        run("train", *TINY, "--backend", "numpy", "--out", tmp_path / "n"),
        "'numpy'",
        "does not train",
    )
    assert not (tmp_path / "t" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--train-length", "0"], ["length 0 is out of range", "allowed 1..2048"]),
        (["--train-length", "-2"], ["length -2 is out of range"]),
        (["--task", "associative_recall", "--train-length", "65"], ["65", "allowed 1..64"]),
        (["--eval-lengths", "4,0"], ["length 0 is not allowed", ">= 1"]),
        (["--eval-lengths", "4,x"], ["'x' is not an integer"]),
        (["--eval-lengths", "5000"], ["length 5000 is out of range", "1..2048"]),
        (["--steps", "0"], ["--steps", "0"]),
        (["--hard-from", "2"], ["--hard-from", "2"]),
    ],
)
def test_bad_lengths_and_values(args, fragments, tmp_path):
    out = tmp_path / "run"
    assert_refused(run("train", *TINY, *args, "--out", out), *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_eval_bad_lengths_and_slots(run_dir):
    before = snapshot(run_dir)
    assert_refused(run("eval", run_dir, "--lengths", "0"), "length 0 is not allowed")
    assert_refused(run("eval", run_dir, "--lengths", "3000"), "3000 is out of range", "1..2048")
    assert_refused(
        run("eval", run_dir, "--lengths", "4,8", "--slots", "8"),
        "--slots 8",
        "capacity 8 is too small",
        "must be >= 9",
    )
    assert_refused(run("eval", run_dir, "--slots", "0"), "0 slots", ">= 1")
    assert_refused(run("eval", run_dir, "--samples", "0"), "--samples")
    assert snapshot(run_dir) == before, "a refused eval wrote nothing"


def test_existing_run_is_not_overwritten(run_dir):
    before = snapshot(run_dir)
    result = run("train", *TINY, "--out", run_dir)
    assert_refused(result, "checkpoint.safetensors exists", "--resume")
    assert snapshot(run_dir) == before


def test_resume_with_a_different_config(fresh_run):
    before = snapshot(fresh_run)
    assert_refused(
        run("train", "--resume", fresh_run, "--lr", "0.01"),
        "--lr 0.01",
        "differs from the checkpoint's 0.002",
    )
    assert_refused(
        run("train", "--resume", fresh_run, "--d-model", "32"), "--d-model 32", "checkpoint's 16"
    )
    assert_refused(run("train", "--resume", fresh_run, "--task", "parity"), "--task 'parity'")
    assert snapshot(fresh_run) == before


def test_missing_unreadable_and_truncated_checkpoints(fresh_run, tmp_path):
    ckpt = fresh_run / "checkpoint.safetensors"
    assert_refused(run("eval", tmp_path / "nowhere.safetensors"), "does not exist")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all")
    assert_refused(run("eval", garbage), "cannot read checkpoint", "garbage.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_refused(run("eval", truncated), "cannot read checkpoint", "truncated")
    assert_refused(run("train", "--resume", truncated), "cannot read checkpoint")


def test_mismatched_checkpoints(fresh_run, tmp_path):
    from safetensors.numpy import load_file, save_file

    from pntm.checkpoint import load

    ckpt = fresh_run / "checkpoint.safetensors"
    tensors = load_file(str(ckpt))
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="np") as f:
        metadata = f.metadata()

    # the config claims a wider model than the tensors hold
    wider = json.loads(metadata["model_config"]) | {"d_model": 32}
    bad = tmp_path / "wider.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "model_config": json.dumps(wider)})
    assert_refused(run("eval", bad), "does not match its model config", "params.embed")

    # a tensor is missing
    bad = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "params.unembed"}, str(bad), metadata)
    assert_refused(run("eval", bad), "missing tensors ['params.unembed']")

    # a safetensors file that is not a pntm checkpoint
    bad = tmp_path / "foreign.safetensors"
    save_file(tensors, str(bad), metadata={"format": "pt"})
    assert_refused(run("eval", bad), "not a pntm checkpoint")

    # a different model name, and an unknown config key
    bad = tmp_path / "model.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "model": "rnn"})
    assert_refused(run("eval", bad), "unknown model 'rnn'")
    bad = tmp_path / "key.safetensors"
    extra = json.loads(metadata["model_config"]) | {"n_experts": 4}
    save_file(tensors, str(bad), metadata={**metadata, "model_config": json.dumps(extra)})
    assert_refused(run("eval", bad), "n_experts")
    assert load(ckpt).step == 12  # the original is intact


def test_generated_options_cover_every_field_and_refuse_type_clashes():
    """Every option field of every model, of training and of the bench is on the command
    line; one flag shared by two configs must have one type."""
    from dataclasses import dataclass

    from pntm import models
    from pntm.cli import _generated_options, main
    from pntm.config import option, options_of

    train_flags = {p.opts[0] for p in main.commands["train"].params}
    for name in models.NAMES:
        for f in options_of(models.get(name).config_class):
            flag = "--" + (f.metadata["option"]["flag"] or f.name.replace("_", "-"))
            assert flag in train_flags, (name, f.name)

    @dataclass(frozen=True)
    class A:
        width: int = option(1, "an int")

    @dataclass(frozen=True)
    class B:
        width: float = option(1.0, "a float")

    with pytest.raises(TypeError, match="--width"):
        _generated_options({"a": A, "b": B})


def test_a_validation_factor_chooses_among_restarts(tmp_path):
    """``--validation-factor F`` decodes each restart at F x the training length and says so;
    without restarts there is nothing to choose and it is refused, as is a length the task
    does not have."""
    from pntm import restarts

    name, out = TRAINABLE[0], tmp_path / "r"
    result = run(
        "train", *TINY, "--backend", name, "--restarts", "2", "--validation-factor", "3",
        "--out", out, "--no-eval",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "missed" in result.output and "the fewest misses at length" in result.output
    record = json.loads((out / restarts.PLAN_NAME).read_text())
    assert record["validation_factor"] == 3
    assert all(isinstance(r["validation_misses"], int) for r in record["results"])
    too_long, b_dir = tasks.get("copy").max_length // 3 + 1, tmp_path / "b"  # L_train 3
    assert_refused(
        run("train", *TINY, "--restarts", "1", "--validation-factor", "3", "--out", tmp_path / "a"),
        "--validation-factor 3 chooses among restarts: it needs --restarts > 1",
    )
    assert_refused(
        run("train", *TINY, "--restarts", "2", "--validation-factor", too_long, "--out", b_dir),
        f"validation_factor {too_long} x training length",
        "out of range",
    )
    assert not (tmp_path / "a").exists() and not b_dir.exists()
    # a finished restarts run resumes as the single run it kept
    assert_refused(
        run("train", "--resume", out, "--validation-factor", "2", "--quiet"),
        "with --validation-factor 2: it is a single run",
    )


def test_restarts_train_keep_the_best_and_resume(tmp_path):
    """``--restarts 2``: two runs in OUT/restart-R, the kept one copied to OUT and evaluated;
    an interrupted restarts run resumes with just ``--resume``, and a --restarts that differs
    from the run's is refused."""
    from pntm import restarts

    name = TRAINABLE[0]
    out = tmp_path / "r"
    result = run("train", *TINY, "--backend", name, "--restarts", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 restarts" in result.output and "kept restart" in result.output
    assert "exact" in result.output
    record = json.loads((out / restarts.PLAN_NAME).read_text())
    assert len(record["results"]) == 2 and (out / "eval.json").exists()
    kept = out / f"restart-{record['selected']}" / "checkpoint.safetensors"
    assert (out / "checkpoint.safetensors").read_bytes() == kept.read_bytes()
    assert_refused(run("train", "--resume", out, "--quiet"), "already at --steps 12")

    # as if stopped before the best was chosen: the plan and one unfinished restart
    (out / "checkpoint.safetensors").unlink()
    shutil.rmtree(out / "restart-1")
    assert_refused(
        run("train", *TINY, "--backend", name, "--restarts", "2", "--out", out),
        "restarts that can be resumed",
        f"pntm train --resume {out}",
    )
    assert_refused(
        run("train", "--resume", out, "--restarts", "3", "--quiet"),
        "--restarts 3 differs from the run's 2",
    )
    assert_refused(
        run("train", "--resume", out, "--validation-factor", "3", "--quiet"),
        "--validation-factor 3 differs from the run's 0",
    )
    again = run("train", "--resume", out, "--backend", name, "--no-eval", "--quiet")
    assert again.exit_code == 0, again.output
    resumed = json.loads((out / restarts.PLAN_NAME).read_text())

    def outcome(results):  # all but the wall time: restart 1 was trained again from its seed
        return [(r["seed"], r["step"], r["status"], r["validation_loss"]) for r in results]

    assert outcome(resumed["results"]) == outcome(record["results"])
    assert resumed["selected"] == record["selected"]
    assert_refused(
        run("train", *TINY, "--backend", name, "--restarts", "2", "--out", out),
        "can be resumed",
    )
