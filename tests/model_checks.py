"""The checks every model of the contract (pntm.models.base) goes through, in one place.

Each model's test file (test_model.py, test_ntm.py, test_lstm.py, test_transformer.py) keeps
what is its own: the float64 NumPy reference, the configs, the model-specific tests. What the
model contract makes the same for all of them is here: building a model from a config, the
parallel and step forms against the reference, the state hand-over between the forms,
gradients against float64 autodiff and finite differences, training, config round trips and
refusals, and the CLI end to end. The test files import it as ``checks``: a call such as
``checks.hand_over(model, params, tokens, capacity=12, split=5)`` asserts what it names.

Tolerances are those of tests/tolerances.py: :func:`forward_tolerance` for logits and states,
GRAD_RTOL between two autodiffs, FD_RTOL_* against finite differences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from pntm import backends, models, tasks
from pntm.backends.base import Backend
from pntm.cli import main
from pntm.models.base import Model, ModelConfig, cross_entropy
from pntm.train import TrainConfig, Trainer
from pntm.tree import tree_flatten
from tests.tolerances import (
    EXACT_RTOL,
    FD_RTOL_FLOAT32,
    FWD_RTOL,
    GRAD_RTOL,
    central_difference,
    grad_errors,
    rel_err,
)

VOCAB = 7  # the vocabulary of the model checks: small, odd


# ------------------------------------------------------------------------------ models and data
def make_model(
    model_class: type[Model], options: dict[str, Any], ops: Backend, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """A ``model_class`` over :data:`VOCAB` with config ``options`` on ``ops``, and its float64
    NumPy parameters from ``seed``."""
    config = model_class.config_class(vocab_size=VOCAB, **options)
    return model_class(config, ops), model_class.init_params(config, seed)


def random_tokens(batch: int, T: int, seed: int | None = None) -> np.ndarray:
    """Tokens (batch, T) of :data:`VOCAB`, drawn from ``seed`` (by default ``T``)."""
    return np.random.default_rng(T if seed is None else seed).integers(0, VOCAB, (batch, T))


def loss_data(
    seed: int = 5, batch: int = 2, T: int = 7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens and targets (batch, T) of :data:`VOCAB`, and a loss mask of about 70% ones (the
    last position always one, so that no sequence is empty)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (batch, T))
    targets = rng.integers(0, VOCAB, (batch, T))
    mask = (rng.uniform(size=(batch, T)) < 0.7).astype(float)
    mask[:, -1] = 1.0
    return tokens, targets, mask


def forward_tolerance(ops: Backend) -> float:
    """Logits and states against a float64 reference: EXACT_RTOL on the NumPy backend (float64
    in another order), FWD_RTOL on the float32 frameworks."""
    return EXACT_RTOL if ops.name == "numpy" else FWD_RTOL


def np_cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """The training loss (:func:`pntm.models.base.cross_entropy`) in NumPy: mean negative
    log-likelihood of ``targets`` where ``mask`` is 1."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return -(picked * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------ the two forms
def step_logits(
    model: Model, params: Any, tokens: np.ndarray, capacity: int, **mode: Any
) -> np.ndarray:
    """Logits (B, T, V) of the step form, one token at a time from ``init_state(B,
    capacity)``: ``params`` on the model's backend, ``tokens`` NumPy (B, T)."""
    ops = model.ops
    native = ops.asarray(tokens)
    state = model.init_state(tokens.shape[0], capacity)
    out = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(params, state, native[:, t], **mode)
        out.append(ops.to_numpy(logits))
    return np.stack(out, 1)


def forward_and_step(
    model: Model,
    params: dict[str, Any],
    tokens: np.ndarray,
    want: np.ndarray,
    want_state: list[dict[str, np.ndarray]] | None = None,
    *,
    capacity: int | None = None,
    **mode: Any,
) -> None:
    """The parallel form and the step form of ``model`` (NumPy ``params``) give the reference
    logits ``want`` within :func:`forward_tolerance`; with ``want_state`` (a dict of arrays
    per layer) the state the parallel form returns is the reference's too. ``capacity``
    defaults to the sequence length; ``mode`` goes to forward and step."""
    ops = model.ops
    capacity = tokens.shape[1] if capacity is None else capacity
    tol = forward_tolerance(ops)
    native = model.params_from_numpy(params)
    if want_state is None:
        got = model.forward(native, ops.asarray(tokens), capacity, **mode)
    else:
        got, state = model.forward(native, ops.asarray(tokens), capacity, return_state=True, **mode)
        for i, (layer, expected) in enumerate(zip(state, want_state, strict=True)):
            for name, value in expected.items():
                err = rel_err(ops.to_numpy(layer[name]), value)
                assert err <= tol, f"layer {i} {name}: error {err:.3g} > {tol:g}"
    assert rel_err(ops.to_numpy(got), want) <= tol, "parallel form"
    assert rel_err(step_logits(model, native, tokens, capacity, **mode), want) <= tol, "steps"


def hand_over(
    model: Model,
    params: dict[str, Any],
    tokens: np.ndarray,
    capacity: int,
    split: int,
    *,
    restate: bool = False,
) -> tuple[np.ndarray, Any]:
    """``forward(tokens[:, :split], return_state=True)``, then ``forward(rest, state)`` and,
    from the same state, ``step`` token by token give ``forward(tokens)`` (NumPy ``params``),
    within :func:`forward_tolerance`. ``restate``: step from the state of a second forward
    pass over the prefix instead. Returns the logits of the whole and the prefix's state."""
    ops = model.ops
    tol = forward_tolerance(ops)
    params = model.params_from_numpy(params)
    full = ops.to_numpy(model.forward(params, ops.asarray(tokens), capacity))
    prefix = ops.asarray(tokens[:, :split])
    head, state = model.forward(params, prefix, capacity, return_state=True)
    tail = model.forward(params, ops.asarray(tokens[:, split:]), capacity, state=state)
    joined = np.concatenate([ops.to_numpy(head), ops.to_numpy(tail)], 1)
    assert rel_err(joined, full) <= tol, "forward(prefix) -> forward(rest)"
    stepped, at = [], state
    if restate:
        _, at = model.forward(params, prefix, capacity, return_state=True)
    for t in range(split, tokens.shape[1]):
        logits, at = model.step(params, at, ops.asarray(tokens[:, t]))
        stepped.append(ops.to_numpy(logits))
    assert rel_err(np.stack(stepped, 1), full[:, split:]) <= tol, "forward(prefix) -> step"
    return full, state


# ------------------------------------------------------------------------------ gradients
def float64_torch(**options: Any) -> Backend:
    """PyTorch on the CPU in float64, with backend ``options`` (the test is skipped where
    PyTorch is not installed)."""
    torch_backend = pytest.importorskip("pntm.backends.torch_backend")
    import torch

    return torch_backend.TorchBackend(device="cpu", dtype=torch.float64, **options)


def native_grads(
    ops: Backend,
    model: Model,
    params: dict[str, Any],
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    capacity: int | None = None,
    **mode: Any,
) -> dict[str, np.ndarray]:
    """Gradients of the training loss (:func:`cross_entropy` of ``model.forward`` on ``ops``)
    on ``data`` = (tokens, targets, mask), by the backend's autodiff, with respect to every
    parameter (NumPy ``params``): flattened names (:func:`tree_flatten`) to NumPy arrays.
    ``capacity`` defaults to the sequence length; ``mode`` goes to ``forward`` (``heads``)."""
    tokens, targets, mask = (ops.asarray(x) for x in data)
    capacity = tokens.shape[1] if capacity is None else capacity

    def loss_fn(p: Any) -> Any:
        return cross_entropy(ops, model.forward(p, tokens, capacity, **mode), targets, mask)

    _, grads = ops.value_and_grad(loss_fn)(model.params_from_numpy(params))
    return {k: ops.to_numpy(v) for k, v in tree_flatten(grads).items()}


def gradients_agree(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Every gradient within GRAD_RTOL of the other autodiff's (:func:`grad_errors`)."""
    errors = grad_errors(got, want)
    assert max(errors.values()) <= GRAD_RTOL, errors


def finite_differences(
    grads: dict[str, np.ndarray],
    params: Any,
    loss: Callable[[], float],
    *,
    samples: int = 3,
    rtol: float = FD_RTOL_FLOAT32,
    floor: float = 1e-2,
    rng: np.random.Generator | None = None,
) -> int:
    """``grads`` (flattened names, as :func:`native_grads`) against central differences of the
    float64 ``loss()``, which reads ``params`` (a tree of NumPy arrays, perturbed in place and
    restored), at ``samples`` random coordinates of every parameter (fewer where it has
    fewer): ``|got - want| <= rtol * max(|want|, floor)``. ``rng`` picks the coordinates (by
    default seed 0). Returns how many coordinates were checked."""
    rng = np.random.default_rng(0) if rng is None else rng
    checked = 0
    for name, value in tree_flatten(params).items():
        for k in rng.choice(value.size, size=min(samples, value.size), replace=False):
            index = np.unravel_index(k, value.shape)
            want = central_difference(loss, value, index)
            got = grads[name][index]
            assert abs(got - want) <= rtol * max(abs(want), floor), (name, index, got, want)
            checked += 1
    return checked


# ------------------------------------------------------------------------------ training
def training_lowers_the_loss(
    ops: Backend,
    model_name: str,
    options: dict[str, Any],
    *,
    batch_size: int = 16,
    warmup_steps: int = 2,
    window: int = 5,
) -> None:
    """40 updates of model ``model_name`` (config ``options``) on tiny copy (length 3): the
    losses stay finite and the mean of the last ``window`` falls below 0.7 times that of the
    first ``window``."""
    config = models.get(model_name).config_class(vocab_size=tasks.get("copy").vocab_size, **options)
    train = TrainConfig(
        task="copy",
        train_length=3,
        steps=40,
        batch_size=batch_size,
        lr=1e-2,
        warmup_steps=warmup_steps,
    )
    trainer = Trainer(model_name, config, train, ops, ops.name)
    losses = [trainer.train_step()["loss"] for _ in range(train.steps)]
    assert np.isfinite(losses).all(), losses
    assert np.mean(losses[-window:]) < 0.7 * np.mean(losses[:window]), losses


# ------------------------------------------------------------------------------ configs
def config_round_trip(config: ModelConfig, summary: str, foreign_key: str) -> None:
    """``config`` survives to_dict / from_dict, summarizes as ``summary``, and from_dict names
    ``foreign_key`` (an option of another model) as unknown."""
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    assert config.summary() == summary
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} keys \['{foreign_key}'\]"):
        cls.from_dict(config.to_dict() | {foreign_key: 2})


def config_refused(config_class: type[ModelConfig], changes: dict, match: str) -> None:
    """``config_class(vocab_size=5, **changes)`` raises a ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match):
        config_class(**(dict(vocab_size=5) | changes))


# ------------------------------------------------------------------------------ the CLI
TRAINABLE = [i.name for i in backends.available() if i.runs and i.trainable]
needs_trainable = pytest.mark.skipif(not TRAINABLE, reason="no trainable backend installed")

# a run of a few seconds: options every model has (width 8, one layer), evaluated at 2 and 4
TINY_TRAIN = [
    "--task", "copy", "--steps", "3", "--train-length", "3", "--batch-size", "4",
    "--d-model", "8", "--layers", "1", "--warmup-steps", "1", "--eval-lengths", "2,4",
    "--eval-samples", "3", "--quiet",
]  # fmt: skip


def run_cli(*args: Any) -> Result:
    """``pntm ARGS`` (each argument as a string) in-process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result: Result) -> list[str]:
    """The lines of the output that report an error."""
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def cli_trains_and_evaluates(
    tmp_path: Path,
    model: str,
    args: list[str],
    banner: str,
    model_config: dict[str, Any],
) -> Path:
    """``pntm train --model MODEL ARGS`` (:data:`TINY_TRAIN` and the model's own options) on
    the first trainable backend prints ``banner`` and writes eval.json at lengths 2 and 4 with
    ``model_config``; ``pntm eval`` of the run on NumPy and on that backend writes its JSON at
    lengths 3 and 5. Returns the run's folder."""
    out = tmp_path / model
    result = run_cli("train", "--model", model, *args, "--backend", TRAINABLE[0], "--out", out)
    assert result.exit_code == 0, result.output
    assert banner in result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["model"] == model and [r["length"] for r in data["results"]] == [2, 4]
    assert data["model_config"] == model_config
    for backend in ("numpy", TRAINABLE[0]):
        json_path = tmp_path / f"{backend}.json"
        result = run_cli(
            "eval", out, "--backend", backend, "--lengths", "3,5", "--samples", "3",
            "--json", json_path, "--plot", tmp_path / f"{backend}.png",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"{model} checkpoint at step 3" in result.output
        assert [r["length"] for r in json.loads(json_path.read_text())["results"]] == [3, 5]
    return out


def cli_refuses(tmp_path: Path, model: str, flag: str, value: str, *args: str) -> None:
    """``pntm train --model MODEL ARGS FLAG VALUE`` stops with one error line that names
    ``flag`` as no option of ``model``, no traceback, and no run folder."""
    out = tmp_path / "r"
    result = run_cli("train", "--model", model, *args, flag, value, "--out", out)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    errors = error_lines(result)
    assert len(errors) == 1, result.output
    assert f"{flag} is not an option of model {model!r}" in errors[0]
    assert not out.exists()
