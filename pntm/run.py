"""Run directories: where a training run writes, and the rules that keep results safe.

A run directory holds one run: its checkpoint, ``metrics.jsonl`` and the evaluation written at
the end of training (``eval.json``, ``eval.png``). A new run only starts in a directory that
holds none of these; a run is continued only from its checkpoint; and one process at a time
writes to it, under an exclusive lock that the operating system releases when the process
ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pntm.backends.base import exit_with_parent
from pntm.train import CHECKPOINT_NAME, METRICS_NAME

__all__ = ["exit_with_parent"]  # kept here too: restarts and the grid script import it

EVAL_NAMES = ("eval.json", "eval.png")
PLAN_NAME = "restarts.json"  # a run of several restarts (pntm.restarts)
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, PLAN_NAME, *EVAL_NAMES)
LOCK_NAME = ".pntm.lock"


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked."""


class RunExists(RunDirectoryError):
    """A new run was aimed at the directory of one that can be resumed."""


def default_run_dir(task: str) -> Path:
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new(run_dir: Path) -> None:
    """A new run may start in ``run_dir``: it is (or can become) a writable directory holding
    no run files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"run directory {str(run_dir)!r} exists and is not a directory")
    ckpt = run_dir / CHECKPOINT_NAME
    if ckpt.exists():
        if not ckpt.is_file():
            raise RunDirectoryError(f"{ckpt} exists and is not a file")
        raise RunExists(f"{ckpt} exists: a run that can be resumed")
    if (run_dir / PLAN_NAME).is_file():
        raise RunExists(f"{run_dir / PLAN_NAME} exists: restarts that can be resumed")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} already holds {', '.join(found)} (without a "
            "checkpoint to resume from): start this run in a new directory, or remove them"
        )
    check_writable(run_dir)


def check_writable(directory: Path) -> None:
    """``directory`` exists or can be made, and a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".pntm-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirectoryError(
            f"cannot write to {str(directory)!r}: {exc.strerror or exc}"
        ) from exc


def check_output_files(paths: list[Path]) -> None:
    """Files an evaluation will write: distinct, not directories, not the files of a run
    (its checkpoint, metrics or training evaluation), and writable (their directories are
    made if missing). Checked before the work that produces them, not after."""
    if len({p.resolve() for p in paths}) != len(paths):
        raise RunDirectoryError(f"the output files {[str(p) for p in paths]} must differ")
    for path in paths:
        if not path.name:
            raise RunDirectoryError(f"{str(path)!r} is not a file name")
        if path.is_dir():
            raise RunDirectoryError(f"{str(path)!r} is a directory, not a file name")
        if path.name in RUN_FILES and path.exists():
            raise RunDirectoryError(
                f"{str(path)!r} is a run's {path.name}: it is kept; write elsewhere"
            )
        check_writable(path.parent)


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; fail at once, naming the holder,
    when another process holds it. The lock is an ``flock`` on ``.pntm.lock`` (POSIX; on
    systems without ``fcntl`` no lock is taken)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    check_writable(run_dir)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryError(
                f"run directory {str(run_dir)!r} is in use by another pntm process (pid "
                f"{holder}); wait for it to finish or use another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def discard_unsaved(run_dir: Path) -> bool:
    """After a failed run that wrote no checkpoint anywhere in ``run_dir`` (a new run: a
    resumed one has one): remove the files it did write (metrics, restarts plan, restart
    directories, lock) and the directory if that leaves it empty, so that the same command
    can run again; True if it did. Nothing is removed where a checkpoint exists."""
    if not run_dir.is_dir() or any(run_dir.glob(f"**/{CHECKPOINT_NAME}")):
        return False
    for restart in run_dir.glob("restart-*"):
        if restart.is_dir():
            for name in (*RUN_FILES, LOCK_NAME):
                (restart / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                restart.rmdir()
    for name in (*RUN_FILES, LOCK_NAME):
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: the user's own files stay
        run_dir.rmdir()
    return True


def unique_eval_path(run_dir: Path) -> Path:
    """Default JSON output of a later ``pntm eval`` of this run (its plot: the same name with
    ``.png``): a new name (date, time and process id, so that evaluations started together
    differ), so that the evaluation written by training (``eval.json``, ``eval.png``) and
    earlier ones are kept."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""
        json_path = run_dir / f"eval-{stamp}{suffix}.json"
        if not json_path.exists() and not json_path.with_suffix(".png").exists():
            return json_path
    raise RunDirectoryError(f"no free evaluation file name in {str(run_dir)!r}")
