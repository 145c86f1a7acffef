"""Faults and hostile input (issue 17): run directories used twice, unwritable outputs, edited
and foreign checkpoints, killed writers, memory that cannot hold a run. Each ends in one
``Error:`` line and nothing lost, or works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pntm import backends, checkpoint, run
from pntm.train import CHECKPOINT_NAME, METRICS_NAME
from tests.test_cli import TINY, TRAINABLE, assert_refused, fresh_run, run_dir, snapshot
from tests.test_cli import run as cli

__all__ = ["fresh_run", "run_dir"]  # fixtures shared with test_cli
ROOT = Path(__file__).resolve().parents[1]


def edit_metadata(path: Path, **changes: str) -> None:
    """Rewrite fields of a checkpoint's metadata (as a user with a text editor might)."""
    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata())
    for key, value in changes.items():
        if key in ("task", "steps"):  # fields of the training config
            train = json.loads(metadata["train_config"]) | {key: value}
            metadata["train_config"] = json.dumps(train)
        else:
            metadata[key] = value
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_a_directory_with_run_files_is_not_reused(tmp_path):
    """metrics.jsonl or eval.json without a checkpoint: refused, both kept as they were."""
    (tmp_path / METRICS_NAME).write_text('{"step": 999}\n')
    (tmp_path / "eval.json").write_text("{}")
    before = snapshot(tmp_path)
    result = cli("train", *TINY, "--backend", TRAINABLE[0], "--out", tmp_path)
    assert_refused(result, "already holds metrics.jsonl, eval.json")
    assert snapshot(tmp_path) == before


def test_a_directory_in_use_is_refused(tmp_path):
    """While one process holds the run directory's lock, a second train is refused at once,
    naming the holder; nothing of the first run is touched."""
    with run.locked(tmp_path):
        result = cli("train", *TINY, "--backend", TRAINABLE[0], "--out", tmp_path)
        assert_refused(result, "is in use by another pntm process", f"pid {os.getpid()}")
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_two_trainings_on_one_directory(tmp_path):
    """Two `pntm train` started together on one --out: one trains, the other stops with an
    Error line; the metrics hold each step once."""
    command = [sys.executable, "-m", "pntm", "train", *TINY, "--steps", "60", "--no-eval"]
    command += ["--backend", TRAINABLE[0], "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert outcomes[0][0] == 0 and outcomes[1][0] == 1, outcomes
    assert "Error:" in outcomes[1][1] and "Traceback" not in outcomes[1][1]
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_NAME).open()]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.parametrize("where", ["a file", "/proc"])
def test_an_unwritable_out_is_refused_before_training(tmp_path, where):
    out = tmp_path / "file" if where == "a file" else Path("/proc/pntm-test/run")
    if where == "a file":
        out.write_text("keep me")
    result = cli("train", *TINY, "--backend", TRAINABLE[0], "--out", out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Error:" in result.output
    if where == "a file":
        assert out.read_text() == "keep me"


def test_eval_keeps_the_training_evaluation_and_checks_its_outputs_first(fresh_run):
    """A later eval writes new files; an unwritable --json or --plot fails before the
    evaluation runs (it would take long) and writes nothing."""
    before = snapshot(fresh_run)
    result = cli("eval", fresh_run, "--samples", "2", "--lengths", "2")
    assert result.exit_code == 0, result.output
    after = snapshot(fresh_run)
    assert {k: after[k] for k in before} == before  # eval.json, eval.png kept
    assert len([name for name in after if name.startswith("eval-")]) == 2
    for option in ("--json", "--plot"):
        started = time.perf_counter()
        result = cli("eval", fresh_run, option, "/proc/pntm-test/x", "--lengths", "2")
        assert_refused(result, "cannot write to")
        assert "length generalization" not in result.output  # nothing was evaluated
        assert time.perf_counter() - started < 30
    assert snapshot(fresh_run) == after


def test_files_follow_the_umask_and_killed_writers_leave_no_temporaries(tmp_path):
    """Written files get the mode the umask gives (not 0600); a temporary file left by a
    process killed mid-write (a pid that no longer runs) is removed by the next write."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".eval.json.{dead}.abc123.tmp"
    stale.write_text("half")
    mine = tmp_path / f".eval.json.{os.getpid()}.live.tmp"  # a live writer's: kept
    mine.write_text("writing")
    old = os.umask(0o027)
    try:
        checkpoint.atomic_write(tmp_path / "eval.json", lambda t: Path(t).write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "eval.json").stat().st_mode) == 0o640
    assert not stale.exists() and mine.exists()


@pytest.mark.parametrize(
    "changes,fragments",
    [
        ({"task": "associative_recall"}, ("vocabulary of 6 tokens", "'associative_recall' has")),
        ({"step": "-5"}, ("step -5 is negative",)),
        ({"steps": "abc"}, ("steps must be a positive integer",)),
    ],
    ids=["foreign-vocabulary", "negative-step", "edited-steps"],
)
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_edited_checkpoints_are_refused(fresh_run, changes, fragments, command):
    edit_metadata(fresh_run / CHECKPOINT_NAME, **changes)
    before = snapshot(fresh_run)
    if command == "eval":
        result = cli("eval", fresh_run, "--samples", "2")
    else:
        result = cli("train", "--resume", fresh_run, "--quiet", "--no-eval")
    assert_refused(result, *fragments)
    assert snapshot(fresh_run) == before


def test_a_length_that_cannot_fit_in_memory_is_refused_with_what_fits(tmp_path):
    """The documented maximum with a large model: refused at once with the estimate and the
    longest training length that fits, instead of being killed for memory."""
    big = ["--d-model", "256", "--memory-heads", "64", "--layers", "8"]
    result = cli(
        "train", "--task", "copy", "--train-length", "2048", *big, "--out", tmp_path / "r",
        "--backend", TRAINABLE[0], "--quiet",
    )  # fmt: skip
    assert_refused(result, "train_length 2048", "GiB", "the longest train_length that fits is")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("tasks", "--show", "copy", "--seed", "-1"), "-1"),
        (("eval", "RUN", "--seed", "-1"), "-1"),
        (("eval", "RUN", "--temperature", "inf"), "temperature must be finite"),
    ],
)
def test_bad_seeds_and_temperatures(run_dir, args, fragment):
    result = cli(*(run_dir if a == "RUN" else a for a in args))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert fragment in result.output


def test_python_dash_m_and_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pntm", "--version"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("pntm "), done.stderr
    assert "``" not in cli("tasks", "--help").output


@pytest.mark.parametrize(
    "outputs,fragment",
    [
        (("--json", "RUN/checkpoint.safetensors"), "checkpoint.safetensors"),
        (("--plot", "RUN/checkpoint.safetensors"), "checkpoint.safetensors"),
        (("--json", "RUN/metrics.jsonl"), "metrics.jsonl"),
        (("--json", "RUN/eval.json"), "eval.json"),
        (("--json", "RUN/same.out", "--plot", "RUN/same.out"), "must differ"),
        (("--json", ""), "empty path"),
    ],
    ids=["json-checkpoint", "plot-checkpoint", "metrics", "eval-json", "same-file", "empty"],
)
def test_eval_outputs_never_replace_the_run(fresh_run, outputs, fragment):
    before = snapshot(fresh_run)
    args = [str(fresh_run) + a[3:] if a.startswith("RUN/") else a for a in outputs]
    result = cli("eval", fresh_run, *args, "--samples", "2", "--lengths", "2")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert fragment in result.output
    assert snapshot(fresh_run) == before


def test_a_full_disk_is_an_error_line(fresh_run, monkeypatch):
    """A write that fails (disk full) during training or evaluation: one Error line; the
    checkpoint written before is intact."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    before = (fresh_run / CHECKPOINT_NAME).read_bytes()
    monkeypatch.setattr("safetensors.numpy.save_file", full)
    result = cli("train", "--resume", fresh_run, "--steps", "12", "--quiet")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert (fresh_run / CHECKPOINT_NAME).read_bytes() == before
    for name in ("eval.json",):
        (fresh_run / name).unlink()
    monkeypatch.setattr(
        "pntm.evaluate.atomic_write", lambda *a: (_ for _ in ()).throw(OSError(28, "No space"))
    )
    result = cli("eval", fresh_run, "--samples", "2", "--lengths", "2")
    assert_refused(result, "cannot write the evaluation", "No space")


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"optimizer_step": "abc"}, "optimizer_step 'abc'"),
        ({"optimizer_step": "-5"}, "optimizer_step '-5'"),
    ],
)
def test_edited_optimizer_steps_are_refused(fresh_run, changes, fragment):
    edit_metadata(fresh_run / CHECKPOINT_NAME, **changes)
    assert_refused(cli("eval", fresh_run, "--samples", "2"), fragment)


def test_non_finite_and_incomplete_checkpoints_are_refused(fresh_run):
    path = fresh_run / CHECKPOINT_NAME
    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("params."))
    original = tensors[name]
    tensors[name] = original.copy()
    tensors[name].flat[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    assert_refused(cli("eval", fresh_run, "--samples", "2"), "non-finite", name)
    train = json.loads(metadata["train_config"])
    del train["seed"]
    save_file(tensors | {name: original}, str(path),
              metadata=metadata | {"train_config": json.dumps(train)})  # fmt: skip
    assert_refused(cli("train", "--resume", fresh_run, "--quiet"), "lacks ['seed']")


def test_resume_from_a_copy_beside_another_run_is_refused(fresh_run):
    shutil.copy(fresh_run / CHECKPOINT_NAME, fresh_run / "other.safetensors")
    before = snapshot(fresh_run)
    result = cli("train", "--resume", fresh_run / "other.safetensors", "--quiet")
    assert_refused(result, "holds another run")
    assert snapshot(fresh_run) == before


def test_out_cannot_be_empty():
    assert "empty path" in cli("train", *TINY, "--out", "").output


# ---------------------------------------------------------------------- issue 33


@pytest.mark.parametrize("then", ["deleted", "made anew"])
def test_a_deleted_run_directory_stops_the_run(tmp_path, then):
    """The run directory deleted during training (and perhaps made again, as a resumed run
    would): the run stops at its next write with an error naming the directory and step,
    instead of recreating the directory (or writing into the new one) beside its lock and
    metrics left on the deleted files."""
    from pntm.train import RunDirectoryLost, fit
    from tests.test_train import make_trainer

    trainer = make_trainer(TRAINABLE[0], steps=30, log_every=5, save_every=10)
    out = tmp_path / "run"

    def on_step(step: int) -> None:
        if step == 12:
            shutil.rmtree(out)
            if then == "made anew":
                out.mkdir()

    with pytest.raises(RunDirectoryLost, match=r"'.*run' was deleted or replaced .*step 15"):
        fit(trainer, out, progress=False, on_step=on_step)
    assert (not out.exists()) if then == "deleted" else list(out.iterdir()) == []


@pytest.mark.parametrize("save_every", [5, 1000], ids=["saved-before", "none-saved"])
def test_a_dead_model_is_an_error_not_a_success(tmp_path, save_every):
    """`--lr 1e6` saturates the model: from some step on the gradient is exactly zero and
    the loss sits at ln V (uniform guesses). Training stops with an error naming the step
    and the likely cause, exit 1, instead of finishing with exit 0."""
    result = cli(
        "train", *TINY, "--backend", TRAINABLE[0], "--lr", "1e6", "--warmup-steps", "0",
        "--steps", "200", "--no-eval", "--out", tmp_path, "--save-every", str(save_every),
    )  # fmt: skip
    assert_refused(result, "the gradient was exactly zero for the last 20 updates", "dead")
    assert (tmp_path / CHECKPOINT_NAME).exists() == (save_every == 5)
    if (tmp_path / CHECKPOINT_NAME).exists():  # kept as it was; the metrics show the death
        steps = [json.loads(line) for line in (tmp_path / METRICS_NAME).open()]
        assert steps[-1]["step"] < 200 and steps[-1]["grad_norm"] == 0.0
    else:  # died before its first checkpoint: nothing left to block the same command
        assert "the run's files were removed" in result.output
        assert not (tmp_path / METRICS_NAME).exists()


def test_a_zero_gradient_at_a_perfect_fit_is_not_death():
    """Exactly zero gradients at a loss of (float32) zero are a perfect fit, not a dead model."""
    from pntm.train import _no_gradient

    assert not _no_gradient({"grad_norm": 0.0, "loss": 0.0})
    assert _no_gradient({"grad_norm": 0.0, "loss": 1.79})
    assert not _no_gradient({"grad_norm": 1e-30, "loss": 1.79})


@pytest.mark.parametrize(
    "options, said",
    [
        (["--max-shift", "1000000"], "max_shift 1000000: heads would move by up to"),
        (["--memory-heads", "100000"], "parameters: training it takes about"),
        (["--layers", "100000"], "parameters: training it takes about"),
    ],
    ids=["shift-wider-than-slots", "memory-heads", "layers"],
)
def test_a_model_too_big_or_senseless_is_refused_before_it_is_built(tmp_path, options, said):
    """Options that would build a model of billions of parameters (once killed by the system
    at 22 GB without a word) or a shift range wider than any memory of the run: refused at
    once with the estimate and the machine's memory, and no run directory left behind."""
    out = tmp_path / "run"
    result = cli("train", "--task", "copy", *options, "--backend", TRAINABLE[0], "--out", out)
    assert_refused(result, said)
    assert not out.exists()


@pytest.mark.parametrize("model", ["pntm", "ntm", "lstm", "transformer"])
def test_parameter_counts_match_the_parameters_drawn(model):
    """``parameter_count`` (what the size check uses, without drawing) equals the numbers
    ``init_params`` draws, over widths, depths and each model's own options."""
    from pntm import models, tasks
    from pntm.tree import tree_leaves

    cls = models.get(model)
    variants = [{}, {"d_model": 24, "n_layers": 3}]
    variants += {
        "pntm": [{"n_heads": 3, "head_dim": 5, "max_shift": 2, "content": True},
                 {"registers": 1, "n_heads": 2, "fixed_velocity": True, "gated_write": True}],
        "ntm": [{"read_heads": 2, "write_heads": 3, "head_dim": 7, "max_shift": 2}],
        "lstm": [{"d_model": 40}],
        "transformer": [{"mlp_ratio": 3, "n_heads": 4}],
    }[model]  # fmt: skip
    for options in variants:
        config = cls.config_class(vocab_size=tasks.get("copy").vocab_size, **options)
        drawn = sum(int(np.prod(p.shape)) for p in tree_leaves(cls.init_params(config, 0)))
        assert cls.parameter_count(config) == drawn, options


def test_a_damaged_optimizer_state_is_refused_on_resume(fresh_run):
    """AdamW's second moment set to -1 (finite, so the finiteness check passes): resuming is
    refused naming the tensor, instead of diverging later with advice about the learning
    rate; the checkpoint is left as it was, and can still be evaluated."""
    path = fresh_run / CHECKPOINT_NAME
    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("optimizer.v."))
    tensors[name] = np.full_like(tensors[name], -1.0)
    # a run stopped half-way, so that there is something to resume
    save_file(tensors, str(path), metadata=metadata | {"step": "6", "optimizer_step": "6"})
    before = snapshot(fresh_run)
    result = cli("train", "--resume", fresh_run, "--quiet")
    assert_refused(result, "damaged optimizer state", name[len("optimizer.") :], "negative")
    assert snapshot(fresh_run) == before
    evaluated = cli("eval", fresh_run, "--samples", "2", "--lengths", "2")  # needs no optimizer
    assert evaluated.exit_code == 0, evaluated.output


def test_a_full_disk_at_the_first_save_leaves_nothing_behind(tmp_path, monkeypatch):
    """The disk full at a new run's first checkpoint: the error does not claim a checkpoint
    was kept, and the run's files (metrics, lock, the directory it made) are removed, so the
    same command runs again once there is room."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    out = tmp_path / "run"
    command = ["train", *TINY, "--backend", TRAINABLE[0], "--no-eval", "--out", out]
    monkeypatch.setattr("safetensors.numpy.save_file", full)
    result = cli(*command)
    assert_refused(result, "No space left", "no checkpoint had been written")
    assert "checkpoint there is kept" not in result.output
    assert not out.exists()
    monkeypatch.undo()
    assert cli(*command).exit_code == 0


def test_eval_records_the_step_says_its_seed_and_refuses_slots_without_memory(fresh_run, tmp_path):
    """`pntm eval`: the JSON records the checkpoint's step; the output says that seed 0
    repeats the samples of training's own table; --slots for a model without memory slots
    (an LSTM) is refused, and its table shows no capacity."""
    result = cli("eval", fresh_run, "--samples", "2", "--lengths", "2", "--json",
                 tmp_path / "e.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    step = checkpoint.load(fresh_run / CHECKPOINT_NAME).step
    assert json.loads((tmp_path / "e.json").read_text())["step"] == step
    assert "samples of seed 0, the samples of the table printed at the end of training" in (
        result.output
    )
    lstm = tmp_path / "lstm"
    options = [
        "--task",
        "copy",
        "--steps",
        "4",
        "--train-length",
        "3",
        "--batch-size",
        "4",
        "--d-model",
        "8",
        "--layers",
        "1",
        "--eval-lengths",
        "2",
        "--eval-samples",
        "2",
    ]
    trained = cli("train", *options, "--model", "lstm", "--backend", TRAINABLE[0], "--quiet",
                  "--out", lstm)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert_refused(cli("eval", lstm, "--slots", "10"), "--slots 10: the lstm model has no memory")
    table = cli("eval", lstm, "--samples", "2", "--lengths", "2", "--seed", "3")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if line.split()[:1] == ["2"])
    assert row.split()[2] == "-" and "samples of seed 0" not in table.output


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_an_error_line():
    """`pntm tasks > /dev/full`: one Error line on standard error, exit 1, no traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "pntm", "tasks"], stdout=full, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: cannot write the output: No space left on device"


# ---------------------------------------------------------------------- faults of our own


@pytest.mark.parametrize(
    "env, said",
    [
        ({"NUMBA_NUM_THREADS": "0"}, "NUMBA_NUM_THREADS='0': numba needs a number of threads"),
        ({"NUMBA_THREADING_LAYER": "nonsense"}, "NUMBA_THREADING_LAYER='nonsense' is not one"),
    ],
    ids=["threads-0", "unknown-layer"],
)
def test_a_bad_numba_setting_is_named_not_a_traceback(tmp_path, env, said):
    """numba's own environment set wrong: the kernels' backend says which variable and why
    (numba raised at import, or at the first kernel's launch mid-training, with a traceback),
    and `pntm backends` lists it as not running."""
    if not {i.name: i.runs for i in backends.available()}.get("numba"):
        pytest.skip("the numba backend does not run here")
    base = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    train = [sys.executable, "-m", "pntm", "train", *TINY, "--backend", "numba", "--no-eval"]
    done = subprocess.run([*train, "--out", str(tmp_path / "run")], env=base, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert said in done.stderr and not (tmp_path / "run").exists()
    listed = subprocess.run([sys.executable, "-m", "pntm", "backends"], env=base, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    row = next(line for line in listed.stdout.splitlines() if line.startswith("numba "))
    assert row.split()[1] == "no" and said in row


def test_more_threads_than_cores_is_refused(tmp_path):
    """`--threads 1000` on a 2-core machine: refused (PyTorch took 1000 threads and thrashed),
    naming the cores."""
    cores = os.cpu_count() or 1
    result = cli("train", *TINY, "--threads", str(cores + 1), "--out", tmp_path / "run")
    assert_refused(result, f"threads {cores + 1}: this machine has {cores} cores")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_an_evaluation_says_what_is_kept(fresh_run, tmp_path, monkeypatch, signum):
    """Ctrl-C, kill or a closed terminal while `pntm eval` (or training's final evaluation)
    decodes: one Error line saying that nothing of the evaluation was written and the
    checkpoint is as it was, exit 128 + the signal (before: click's bare "Aborted!", or a
    silent death by SIGTERM)."""

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # interrupted before this ends
        raise AssertionError("the signal did not interrupt the evaluation")

    monkeypatch.setattr("pntm.evaluate.evaluate", signalled)
    before = snapshot(fresh_run)
    result = cli("eval", fresh_run, "--samples", "2", "--json", tmp_path / "e.json")
    assert_refused(result, f"stopped by {signal.Signals(signum).name}", "nothing of it was written",
                   code=128 + signum)  # fmt: skip
    assert snapshot(fresh_run) == before and not (tmp_path / "e.json").exists()


def test_a_bench_too_big_for_memory_is_refused_before_measuring(tmp_path):
    """`pntm bench --lengths 200000`: refused with the estimate before anything runs or is
    written (before: a NumPy traceback asking for 2.33 TiB inside the first kernel call)."""
    out = tmp_path / "bench"
    result = cli("bench", "--models", "pntm", "--lengths", "200000", "--decode-lengths", "8",
                 "--repeats", "1", "--warmup", "0", "--out", out)  # fmt: skip
    assert_refused(result, "one sequence of 200000 tokens", "GiB")
    assert not out.exists()
