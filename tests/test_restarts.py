"""Restarts (pntm.restarts): restart 0 is the plain run, the kept one has the lowest validation
cross-entropy, processes give what one process gives, a stopped run resumes to the same end,
diverged restarts are passed over, and a plan with other settings is refused."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest

from pntm import backends, checkpoint, restarts, tasks
from pntm.models.base import cross_entropy
from pntm.models.pntm import PNTM
from pntm.run import RunDirectoryError
from pntm.train import CHECKPOINT_NAME, Trainer, TrainingDiverged, TrainingStopped, fit
from pntm.tree import tree_flatten
from tests.test_train import tiny

pytestmark = pytest.mark.skipif(
    not any(i.name == "torch" and i.runs for i in backends.available()),
    reason="restarts are tested on torch",
)


def plan_of(count: int, **train) -> restarts.Plan:
    model, config = tiny(**{"steps": 12, "save_every": 5, "log_every": 2, **train})
    return restarts.Plan("pntm", model.to_dict(), config.to_dict(), count)


def params_of(path) -> dict[str, np.ndarray]:
    return tree_flatten(checkpoint.load(path).params)


def same_params(a, b, rtol: float = 0.0) -> bool:
    a, b = params_of(a), params_of(b)
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol, rtol) for k in a)


def test_restart_seeds():
    assert restarts.restart_seed(7, 0) == 7  # one restart is the plain run
    seeds = {restarts.restart_seed(s, r) for s in range(20) for r in range(4)}
    assert len(seeds) == 80  # no two restarts of small seeds share a run
    assert restarts.restart_seed(3, 1) == restarts.restart_seed(3, 1)
    assert all(0 <= s < 2**32 for s in seeds)


def test_restart_zero_is_the_plain_run_and_the_lowest_validation_loss_is_kept(tmp_path):
    ops = backends.get("torch")
    plan = plan_of(3)
    results, kept = restarts.train_restarts(plan, tmp_path / "r", "torch", ops, workers=1)
    model, config = tiny(steps=12, save_every=5, log_every=2)
    plain = Trainer("pntm", model, config, ops, "torch")
    fit(plain, tmp_path / "plain", progress=False)
    assert same_params(
        tmp_path / "r" / "restart-0" / CHECKPOINT_NAME, tmp_path / "plain" / CHECKPOINT_NAME
    )
    assert [r.seed for r in results] == [restarts.restart_seed(config.seed, r) for r in range(3)]
    assert len({r.validation_loss for r in results}) == 3  # three different runs
    assert kept == int(np.argmin([r.validation_loss for r in results]))
    assert same_params(
        tmp_path / "r" / CHECKPOINT_NAME, tmp_path / "r" / f"restart-{kept}" / CHECKPOINT_NAME
    )
    record = json.loads((tmp_path / "r" / "restarts.json").read_text())
    assert record["selected"] == kept and record["restarts"] == 3
    assert [r["validation_loss"] for r in record["results"]] == [r.validation_loss for r in results]
    assert restarts.load_plan(tmp_path / "r") == plan


def test_validation_loss_is_the_token_weighted_cross_entropy_of_its_own_stream():
    ops = backends.get("torch")
    model_config, config = tiny()
    model = PNTM(model_config, ops)
    params = model.params_from_numpy(PNTM.init_params(model_config, 0))
    task = tasks.get("copy")
    mode = model.decode_mode(config.steps, config.steps)
    got = restarts.validation_loss(model, params, task, 4, mode, seed=5, samples=300)
    total = count = 0.0
    for i, n in enumerate((restarts.VALIDATION_BATCH, 300 - restarts.VALIDATION_BATCH)):
        rng = np.random.default_rng([5, 2, i])
        batch = task.batch(rng, rng.integers(1, 5, n))
        logits = model.forward(params, ops.asarray(batch.tokens), batch.tokens.shape[1], **mode)
        ce = cross_entropy(ops, logits, ops.asarray(batch.labels), ops.asarray(batch.mask))
        total += float(ops.to_numpy(ce)) * batch.mask.sum()
        count += batch.mask.sum()
    assert got == pytest.approx(total / count, rel=1e-6)  # fp32 sums, summed in another order
    other = restarts.validation_loss(model, params, task, 4, mode, seed=6, samples=300)
    assert other != got  # the data follows the run's seed


class _LabelsModel:
    """A stand-in model that predicts every next token right (it looks the labels up), except
    at one target position of the sequences ``wrong`` picks, and at the first prompt position
    of every sequence (which no score may count)."""

    name = "labels"

    def __init__(self, ops, labels: dict[bytes, tuple[np.ndarray, np.ndarray]], wrong) -> None:
        self.ops, self.labels, self.wrong = ops, labels, wrong

    def memory_per_sequence(self, *_) -> None:
        return None

    def forward(self, params, tokens, capacity, **mode):
        tokens = self.ops.to_numpy(tokens)
        logits = np.zeros((*tokens.shape, 16))
        for i, row in enumerate(tokens):
            labels, mask = self.labels[row.tobytes()]
            logits[i, np.arange(len(row)), labels] = 1.0
            targets, prompt = np.flatnonzero(mask), np.flatnonzero(mask == 0)
            if self.wrong(row):
                logits[i, targets[-1], labels[targets[-1]]] = -1.0
            logits[i, prompt[0], labels[prompt[0]]] = -1.0
        return self.ops.asarray(logits)


def test_validation_misses_count_the_sequences_with_a_wrong_target_token():
    """Fresh sequences of the validation length from the stream ``[seed, 3, i]``: a sequence
    counts when one of its target tokens (not a prompt or padding position) is predicted
    wrong, which is when greedy decoding gets it wrong."""
    ops = backends.get("numpy")
    task, length, seed, samples = tasks.get("binary_addition"), 6, 5, 300
    labels, expected = {}, 0
    for i, n in enumerate((restarts.VALIDATION_BATCH, samples - restarts.VALIDATION_BATCH)):
        batch = task.batch(np.random.default_rng([seed, 3, i]), np.full(n, length))
        assert batch.tokens.shape[1] == task.sequence_length(length) - 1
        for row, lab, mask in zip(batch.tokens, batch.labels, batch.mask, strict=True):
            labels[row.tobytes()] = (lab, mask)
            expected += int(row[0] == 1)
    model = _LabelsModel(ops, labels, wrong=lambda row: row[0] == 1)
    assert 0 < expected < samples
    assert restarts.validation_misses(model, None, task, length, {}, seed, samples) == expected
    model.wrong = lambda row: False  # wrong only at a prompt position of every sequence
    assert restarts.validation_misses(model, None, task, length, {}, seed, samples) == 0


def test_misses_at_the_validation_length_choose_before_the_cross_entropy(tmp_path, monkeypatch):
    """With a validation factor the kept restart has the fewest misses at F x the training
    length, even against a lower cross-entropy; the plan records the length and each count."""
    ops = backends.get("torch")
    by_loss, _ = restarts.train_restarts(plan_of(2), tmp_path / "loss", "torch", ops, workers=1)
    best_loss = int(np.argmin([r.validation_loss for r in by_loss]))
    calls = []

    def misses(model, params, task, length, mode, seed):
        calls.append((length, seed))
        return 7 if len(calls) - 1 == best_loss else 3  # the lowest cross-entropy misses more

    monkeypatch.setattr(restarts, "validation_misses", misses)
    plan = plan_of(2, train_length=3)
    plan = restarts.Plan(plan.model, plan.model_config, plan.train_config, 2, 5)
    assert plan.validation_length == 15
    results, kept = restarts.train_restarts(plan, tmp_path / "misses", "torch", ops, workers=1)
    assert calls == [(15, plan.seed)] * 2
    assert kept == 1 - best_loss and [r.validation_misses for r in results][best_loss] == 7
    record = json.loads((tmp_path / "misses" / restarts.PLAN_NAME).read_text())
    assert record["validation_factor"] == 5 and record["validation_length"]["length"] == 15
    assert [r["validation_misses"] for r in record["results"]] == [
        r.validation_misses for r in results
    ]
    assert restarts.load_plan(tmp_path / "misses") == plan
    assert by_loss[0].validation_misses is None  # no factor: nothing decoded at length


def test_a_plan_names_a_bad_validation_factor():
    plan = plan_of(2)
    with pytest.raises(ValueError, match="validation_factor must be >= 0, got -1"):
        restarts.Plan(plan.model, plan.model_config, plan.train_config, 2, -1)
    with pytest.raises(ValueError, match="validation_factor must be an integer, got True"):
        restarts.Plan(plan.model, plan.model_config, plan.train_config, 2, True)
    with pytest.raises(ValueError, match=r"validation_factor 1000 x training length .*1\.\.\d+"):
        restarts.Plan(plan.model, plan.model_config, plan.train_config, 2, 1000)


def test_restarts_in_processes_match_one_process(tmp_path):
    ops = backends.get("torch")
    plan = plan_of(3)
    one, kept_one = restarts.train_restarts(plan, tmp_path / "one", "torch", ops, workers=1)
    two, kept_two = restarts.train_restarts(
        plan, tmp_path / "two", "torch", ops, workers=2, progress=False
    )
    assert kept_one == kept_two
    for a, b in zip(one, two, strict=True):
        assert (a.seed, a.step, a.status) == (b.seed, b.step, b.status)
        assert a.validation_loss == pytest.approx(b.validation_loss, rel=1e-6)
    # one thread per worker against this process's threads: fp32 sums in another order, through
    # 12 Adam updates (whose first steps move every weight by about lr whatever the gradient)
    assert same_params(
        tmp_path / "one" / CHECKPOINT_NAME, tmp_path / "two" / CHECKPOINT_NAME, rtol=1e-4
    )


def test_a_stopped_run_resumes_to_the_same_end(tmp_path, monkeypatch):
    ops = backends.get("torch")
    plan = plan_of(2)
    restarts.train_restarts(plan, tmp_path / "whole", "torch", ops, workers=1)

    real_fit = restarts.fit

    def stopping_fit(trainer, run_dir, progress=True, on_step=None, announce=None, **kw):
        # restart 1 is stopped after its 7th update, as by SIGTERM
        stop = (
            (lambda s: signal.SIGTERM if s == 7 else None) if "restart-1" in str(run_dir) else None
        )
        return real_fit(trainer, run_dir, progress, on_step=stop, announce=announce, **kw)

    monkeypatch.setattr(restarts, "fit", stopping_fit)
    with pytest.raises(TrainingStopped) as stopped:
        restarts.train_restarts(plan, tmp_path / "cut", "torch", ops, workers=1)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step == 7
    assert not (tmp_path / "cut" / CHECKPOINT_NAME).exists()  # nothing kept before all end
    assert checkpoint.load(tmp_path / "cut" / "restart-1" / CHECKPOINT_NAME).step == 7
    monkeypatch.setattr(restarts, "fit", real_fit)
    resumed = restarts.load_plan(tmp_path / "cut")
    results, _ = restarts.train_restarts(resumed, tmp_path / "cut", "torch", ops, workers=1)
    assert [r.step for r in results] == [12, 12]
    for r in (0, 1):
        assert same_params(
            tmp_path / "whole" / f"restart-{r}" / CHECKPOINT_NAME,
            tmp_path / "cut" / f"restart-{r}" / CHECKPOINT_NAME,
        )
    assert same_params(tmp_path / "whole" / CHECKPOINT_NAME, tmp_path / "cut" / CHECKPOINT_NAME)


def test_diverged_restarts_are_passed_over(tmp_path, monkeypatch):
    ops = backends.get("torch")
    plan = plan_of(3)
    real_fit = restarts.fit
    diverging = {"restart-0", "restart-2"}

    def fit_or_diverge(trainer, run_dir, progress=True, on_step=None, announce=None, **kw):
        if run_dir.name in diverging:
            raise TrainingDiverged(3, "the loss is nan")
        return real_fit(trainer, run_dir, progress, on_step, announce, **kw)

    monkeypatch.setattr(restarts, "fit", fit_or_diverge)
    results, kept = restarts.train_restarts(plan, tmp_path / "a", "torch", ops, workers=1)
    assert kept == 1
    assert [r.status for r in results] == ["diverged", "finished", "diverged"]
    assert results[0].validation_loss == np.inf
    diverging.add("restart-1")
    with pytest.raises(restarts.RestartsError, match="every one diverged"):
        restarts.train_restarts(plan, tmp_path / "b", "torch", ops, workers=1)


def test_a_restart_trained_with_other_settings_is_refused(tmp_path):
    ops = backends.get("torch")
    restarts.train_restarts(plan_of(2), tmp_path, "torch", ops, workers=1)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(restarts.RestartsError, match="other settings"):
        restarts.train_restarts(plan_of(2, lr=1e-3), tmp_path, "torch", ops, workers=1)


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_a_bad_restart_count_is_named(count):
    model, config = tiny()
    with pytest.raises(ValueError, match=f"restarts must be .*{count!r}"):
        restarts.Plan("pntm", model.to_dict(), config.to_dict(), count)


def test_a_restart_killed_before_its_first_checkpoint_starts_again(tmp_path):
    """Resuming the plan: a restart directory with metrics but no checkpoint (its process was
    killed early) trains from step 0 again, its stale metrics dropped; a new run refuses it."""
    ops = backends.get("torch")
    plan = plan_of(2)
    whole, _ = restarts.train_restarts(plan, tmp_path / "whole", "torch", ops, workers=1)
    cut = tmp_path / "cut"
    restarts.train_restarts(plan, cut, "torch", ops, workers=1)
    (cut / CHECKPOINT_NAME).unlink()
    (cut / "restart-1" / CHECKPOINT_NAME).unlink()
    with pytest.raises(RunDirectoryError, match=r"already holds metrics\.jsonl"):
        restarts.train_restart(plan, cut, 1, ops, "torch")
    again, _ = restarts.train_restarts(plan, cut, "torch", ops, workers=1)
    assert [r.validation_loss for r in again] == [r.validation_loss for r in whole]
    metrics = (cut / "restart-1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(2, 13, 2))


def test_the_progress_bar_shows_each_restart():
    """A restarts run's bar says where each restart is and its last logged loss (once only a
    combined step count, for 27 minutes of multiplication), and how the finished ones ended."""
    finished = restarts.RestartResult(
        restart=2, seed=9, status="diverged", step=40, validation_loss=math.inf,
        final_loss=None, train_seconds=1.0, validation_misses=None,
    )  # fmt: skip
    status = ([1200, 0, 40], [0.2134, math.nan, 3.0])
    line = restarts._status_line(status, 8000, {2: finished})
    assert line == "r0 1200/8000 loss 0.213 | r1 0/8000 | r2 diverged"
