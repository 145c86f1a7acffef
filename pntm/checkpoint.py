"""Checkpoints: one safetensors file with the weights, the optimizer state and, as metadata, the
model and training configs and the step (the data of every step follows from the seed and the
step, so no RNG state is kept; version-2 files hold one, which is ignored).

Tensors are stored as float32 NumPy arrays under dotted names (``params.blocks.0.ctrl_w``,
``optimizer.m.embed``, ...), so a checkpoint written by one backend loads in any other. Files are
written to a temporary name in the same directory and renamed: a crash never leaves a
half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pntm import models, tasks
from pntm.tree import tree_flatten, tree_unflatten

FORMAT = "pntm-checkpoint"
FORMAT_VERSION = "2"
# Version 1 kept the P-NTM head schedule in the training config; version 2 keeps every model's
# own options in its model config. A version-1 checkpoint is read by moving them over.
_V1_PNTM_SCHEDULE = ("hard_from", "hard_mix", "head_noise", "noise_until")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match what it claims to hold."""


@dataclass
class Checkpoint:
    model: str
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    step: int
    params: dict[str, Any]  # nested dict of float32 NumPy arrays
    optimizer: dict[str, Any] | None  # {"step", "m", "v"} or None
    backend: str  # the backend that wrote it (informational)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to
    ``path``: readers see the old file or the whole new one. The file gets the mode the umask
    gives a new file (not the 0600 of a temporary file), and temporary files of ``path`` left
    by processes that were killed while writing are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.PID.*.tmp`` beside ``path`` whose process no longer exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    from safetensors.numpy import save_file

    tensors = {
        f"params.{k}": np.ascontiguousarray(v, dtype=np.float32)
        for k, v in tree_flatten(ckpt.params).items()
    }
    if ckpt.optimizer is not None:
        for moment in ("m", "v"):
            for k, v in tree_flatten(ckpt.optimizer[moment]).items():
                tensors[f"optimizer.{moment}.{k}"] = np.ascontiguousarray(v, dtype=np.float32)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": ckpt.model,
        "model_config": json.dumps(ckpt.model_config),
        "train_config": json.dumps(ckpt.train_config),
        "step": str(ckpt.step),
        "optimizer_step": str(ckpt.optimizer["step"]) if ckpt.optimizer is not None else "",
        "backend": ckpt.backend,
    }

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as exc:  # safetensors reports a failed write (disk full) as its own
            raise OSError(f"cannot write checkpoint {str(path)!r}: {exc}") from exc

    atomic_write(path, write)


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint; every problem is a :class:`CheckpointError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (truncated or not a safetensors file): {exc}"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a pntm checkpoint")
    version = metadata.get("format_version")
    if version not in ("1", FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; "
            f"this pntm reads versions 1 and {FORMAT_VERSION}"
        )
    try:
        model_class = models.get(metadata["model"])
        model_config = json.loads(metadata["model_config"])
        train_config = json.loads(metadata["train_config"])
        if version == "1" and model_class.name == "pntm":
            for key in _V1_PNTM_SCHEDULE:
                if key in train_config:
                    model_config[key] = train_config.pop(key)
        config = model_class.config_class.from_dict(model_config)
        step = int(metadata["step"])
        if step < 0:
            raise ValueError(f"step {step} is negative")
        task = tasks.get(train_config["task"])
        if config.vocab_size != task.vocab_size:  # tokens of the task would index past the table
            raise ValueError(
                f"its model has a vocabulary of {config.vocab_size} tokens but its task "
                f"{task.name!r} has {task.vocab_size}"
            )
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has invalid metadata: {exc}") from exc

    # the tensors must be exactly the parameters this config defines, with their shapes
    like = model_class.init_params(config, 0)
    expected = {k: v.shape for k, v in tree_flatten(like).items()}
    params = _section(tensors, "params.", expected, path)
    optimizer = None
    if any(k.startswith("optimizer.") for k in tensors):
        optimizer = {
            "step": _count(metadata.get("optimizer_step") or "0", "optimizer_step", path),
            "m": tree_unflatten(_section(tensors, "optimizer.m.", expected, path), like),
            "v": tree_unflatten(_section(tensors, "optimizer.v.", expected, path), like),
        }
    return Checkpoint(
        model=model_class.name,
        model_config=config.to_dict(),
        train_config=train_config,
        step=step,
        params=tree_unflatten(params, like),
        optimizer=optimizer,
        backend=metadata.get("backend", "?"),
    )


def _count(text: str, name: str, path: Path) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has invalid metadata: {name} {text!r} is not an integer >= 0"
        )
    return value


def _section(
    tensors: dict[str, np.ndarray], prefix: str, expected: dict[str, tuple], path: Path
) -> dict[str, np.ndarray]:
    found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its model config: "
            f"missing tensors {[prefix + k for k in missing]}, "
            f"unexpected tensors {[prefix + k for k in extra]}"
        )
    for name, shape in expected.items():
        if not np.isfinite(found[name]).all():
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds non-finite values in {prefix + name}"
            )
        if found[name].shape != shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match its model config: tensor "
                f"{prefix + name} has shape {found[name].shape}, the config gives {shape}"
            )
    return found
