"""Data parallel on localhost: `pntm train` under ``torchrun`` (gloo) and ``mlx.launch`` (ring)
with 2 CPU processes is the single-process run with the same global batch; a 2-process run
resumes on 1 process and the reverse as the same run; killing one process ends the job.

Tolerance: 2 processes sum the gradients of their halves of the batch with the framework's
collective (float32), one process sums all rows at once, so the two differ by float32 rounding
of the sum order (measured: 1.2e-7 on the parameters after 20 steps); 1e-5 on the parameters
and relative 1e-5 on the logged losses leave room for that and catch any difference in data,
weighting or schedule (a different batch changes the losses at the first step by > 1e-2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pntm import backends, checkpoint
from pntm.train import CHECKPOINT_NAME, METRICS_NAME
from pntm.tree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
RUNS = {info.name for info in backends.available() if info.runs and info.trainable}
ENGINES = [
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            "torch" not in RUNS or shutil.which("torchrun") is None, reason="needs torchrun"
        ),
    ),
    pytest.param(
        "mlx",
        marks=pytest.mark.skipif(
            "mlx" not in RUNS or shutil.which("mlx.launch") is None, reason="needs mlx.launch"
        ),
    ),
]
STEPS = 16
TRAIN = [
    "train", "--task", "copy", "--steps", str(STEPS), "--batch-size", "6",
    "--train-length", "4", "--head-noise", "1", "--log-every", "1", "--no-eval", "--quiet",
]  # fmt: skip
HAS_PROC = Path("/proc/self/environ").exists()  # Linux: _rank_pids reads the ranks there
# CPU processes on every machine: NCCL wants a GPU per rank, and a one-GPU machine has one
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(engine: str, processes: int, out: Path, *extra: str) -> list[str]:
    """``pntm train`` on ``engine`` with ``processes`` processes (1: no launcher)."""
    args = [*TRAIN, "--backend", engine, *extra]
    args += ["--out", str(out)] if "--resume" not in extra else []
    if processes == 1:
        return [sys.executable, "-m", "pntm", *args]
    if engine == "torch":  # --standalone: a free rendezvous port, so tests can run side by side
        return ["torchrun", "--standalone", f"--nproc-per-node={processes}", "-m", "pntm", *args]
    launch = ["mlx.launch", "-n", str(processes), "--backend", "ring"]
    launch += ["--starting-port", str(_free_port())]
    return [*launch, "--", shutil.which("pntm") or "pntm", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, signalled as a terminal would
    )  # fmt: skip


def signal_rank_1(engine: str, out: Path, signum: int, within: float, **env: str) -> str:
    """Start a 2-process run, send ``signum`` to rank 1 once 3 steps are logged, and return
    the job's output; fail if the job has not ended ``within`` seconds later. Rank 1 is
    killed afterwards whatever happened (a stopped process would linger)."""
    cmd = command(engine, 2, out, "--steps", "2000", "--save-every", "2")
    proc = start(cmd, {**ENV, **env})
    wait_for_step(out, 3, proc)
    pids = _rank_pids(out)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signum)
    try:
        return proc.communicate(timeout=within)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job still ran {within} s after {signal.Signals(signum).name} to rank 1")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[1], signal.SIGKILL)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    metrics = out / METRICS_NAME
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the run did not reach its first steps"
        time.sleep(0.05)


def losses(out: Path) -> list[float]:
    lines = (out / METRICS_NAME).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    ckpt_a, ckpt_b = checkpoint.load(a / CHECKPOINT_NAME), checkpoint.load(b / CHECKPOINT_NAME)
    assert ckpt_a.step == ckpt_b.step == STEPS
    flat_b = tree_flatten(ckpt_b.params)
    for name, value in tree_flatten(ckpt_a.params).items():
        np.testing.assert_allclose(flat_b[name], value, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(losses(b), losses(a), rtol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """The reference: one process, per engine (trained on first use)."""
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in done:
            out = tmp_path_factory.mktemp(f"single-{engine}")
            run(command(engine, 1, out))
            done[engine] = out
        return done[engine]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_as_one(engine, single, tmp_path):
    """Same loss at every step and same final weights as one process; rank 0 alone writes
    (one metrics line per step) and prints."""
    done = run(command(engine, 2, tmp_path))
    assert_same_run(single(engine), tmp_path)
    assert len(losses(tmp_path)) == STEPS
    assert done.stdout.count("run directory:") == 1
    assert "2 processes" in done.stdout


@pytest.mark.parametrize("processes", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_resumes_on_another_number_of_processes(engine, processes, single, tmp_path):
    """Ctrl-C (SIGINT to the process group) stops every process at one step boundary with
    exit code 130 and a checkpoint; resumed with another number of processes it ends as the
    uninterrupted single-process run."""
    first, then = processes
    proc = start(command(engine, first, tmp_path))
    wait_for_step(tmp_path, 3, proc)
    if engine == "mlx" and first > 1:
        # Signal the ranks, not mlx.launch: mlx.launch 0.32 has no SIGINT handler, and a
        # KeyboardInterrupt that lands while its main thread holds an output queue's lock
        # leaves that lock taken, so its relay thread blocks forever after the ranks exit
        # (seen in CI and reproduced here: 1 run in 7 under load). That is a hang of the
        # launcher alone; pntm's part, every rank stopping at one step boundary with a
        # checkpoint, is what this test checks.
        if not HAS_PROC:
            pytest.skip("finds the ranks in /proc, which this system lacks")
        pids = _rank_pids(tmp_path)
        assert set(pids) == {0, 1}, pids
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    if engine == "mlx" and first > 1:
        # mlx.launch exits 0 whatever its processes do; it reports their exit codes, and
        # stops the other rank once one has exited
        assert "exited with code 130" in output, output
    else:
        assert "stopped by SIGINT at step" in output, output
        assert proc.returncode == (130 if first == 1 else 1), output  # torchrun: 1
    stopped_at = checkpoint.load(tmp_path / CHECKPOINT_NAME).step
    assert 3 <= stopped_at < STEPS
    run(command(engine, then, tmp_path, "--resume", str(tmp_path)))
    assert_same_run(single(engine), tmp_path)


def _rank_pids(out: Path) -> dict[int, int]:
    """Process id of each rank of the run writing to ``out`` (from /proc: Linux)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" not in cmdline or str(out).encode() not in cmdline:
            continue
        for entry in environ:
            name, _, value = entry.partition(b"=")
            if name in (b"RANK", b"MLX_RANK"):
                found[int(value)] = int(proc.name)
    return found


@pytest.mark.skipif(not HAS_PROC, reason="finds the ranks in /proc")
@pytest.mark.parametrize("engine", ENGINES)
def test_killing_one_process_ends_the_job(engine, tmp_path):
    """SIGKILL to rank 1 mid-run: within a minute the job is over and says why, with no
    traceback from pntm, and the last checkpoint is intact. Under torchrun rank 0 reports that
    it lost contact; mlx.launch stops the other processes as soon as one exits, reports the
    killed rank, and may stop relaying rank 0's output before its last line."""
    output = signal_rank_1(engine, tmp_path, signal.SIGKILL, 60)
    said = "lost contact with the others" if engine == "torch" else "rank 1 exited with code -9"
    assert said in output, output
    assert 'File "' + str(ROOT / "pntm") not in output, output  # no traceback of ours
    assert checkpoint.load(tmp_path / CHECKPOINT_NAME).step >= 2


@pytest.mark.parametrize("engine", ENGINES)
def test_restarts_under_a_launcher_run_one_after_another(engine, single, tmp_path):
    """``--restarts 2`` with two processes: each restart is a data-parallel run of both (one
    after another), restart 0 is the single-process run, and rank 0 alone writes the choice."""
    done = run(command(engine, 2, tmp_path, "--restarts", "2"))
    assert_same_run(single(engine), tmp_path / "restart-0")
    record = json.loads((tmp_path / "restarts.json").read_text())
    assert [r["status"] for r in record["results"]] == ["finished", "finished"]
    kept = tmp_path / f"restart-{record['selected']}" / CHECKPOINT_NAME
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == kept.read_bytes()
    assert done.stdout.count("kept restart") == 1


@pytest.mark.skipif(not HAS_PROC, reason="reads the ranks' process ids in /proc")
@pytest.mark.parametrize("engine", ENGINES)
def test_killing_the_launcher_ends_its_processes(engine, tmp_path):
    """SIGKILL to the launcher itself (torchrun, mlx.launch), which cannot pass it on: its
    processes notice that their parent is gone and end within seconds, saying so, instead of
    training on as orphans holding the run's lock; the run then resumes."""
    from pntm import run as rundir

    proc = start(command(engine, 2, tmp_path, "--steps", "2000", "--save-every", "2"))
    wait_for_step(tmp_path, 3, proc)
    pids = _rank_pids(tmp_path)
    assert set(pids) == {0, 1}, pids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids.values()):
        if time.monotonic() > deadline:
            for pid in pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail("the ranks still trained 30 s after their launcher was killed")
        time.sleep(0.1)
    with rundir.locked(tmp_path):  # the lock is free
        pass
    assert checkpoint.load(tmp_path / CHECKPOINT_NAME).step >= 2


@pytest.mark.skipif(not HAS_PROC, reason="finds the ranks in /proc")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_stopped_process_ends_the_job(engine, tmp_path):
    """SIGSTOP to rank 1 (hung, not dead: nothing tells the launcher): rank 0 gives up on
    its collective after the timeout (``PNTM_COLLECTIVE_TIMEOUT``, 15 s here; 300 s by
    default) and the job ends saying it lost contact, with the last checkpoint kept. MLX's
    collectives have no timeout of their own; before the watchdog such a job hung for good."""
    output = signal_rank_1(engine, tmp_path, signal.SIGSTOP, 90, PNTM_COLLECTIVE_TIMEOUT="15")
    assert "lost contact with the others" in output, output
    assert 'File "' + str(ROOT / "pntm") not in output, output  # no traceback of ours
    assert checkpoint.load(tmp_path / CHECKPOINT_NAME).step >= 2
