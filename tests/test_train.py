"""Training loop, schedules, checkpoints: exact resume, and portability between backends."""

from __future__ import annotations

import itertools
import json
import os
import signal

import numpy as np
import pytest

from pntm import backends, checkpoint, tasks
from pntm.evaluate import greedy_decode
from pntm.models.pntm import PNTM, PNTMConfig
from pntm.train import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    STOP_SIGNALS,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingStopped,
    fit,
)
from pntm.tree import tree_flatten
from tests.tolerances import FWD_RTOL, rel_err

TRAINABLE = [i.name for i in backends.available() if i.runs and i.trainable]
needs_two = pytest.mark.skipif(
    len(TRAINABLE) < 2, reason=f"needs two trainable backends, found {TRAINABLE}"
)


# P-NTM config fields that shape training
SCHEDULE = ("hard_from", "hard_mix", "head_noise", "noise_until", "move_change_cost")


def tiny(task: str = "copy", **options) -> tuple[PNTMConfig, TrainConfig]:
    """A tiny P-NTM and its training config; ``options`` go to the config that has them."""
    schedule = {k: v for k, v in options.items() if k in SCHEDULE}
    train = {k: v for k, v in options.items() if k not in SCHEDULE}
    model = PNTMConfig(
        tasks.get(task).vocab_size, d_model=16, n_layers=1, n_heads=1, head_dim=4, **schedule
    )
    defaults = {"task": task, "train_length": 4, "steps": 40, "batch_size": 8, "warmup_steps": 5}
    return model, TrainConfig(**{**defaults, **train})


def make_trainer(name: str, resume_from=None, **train) -> Trainer:
    model, config = tiny(**train)
    return Trainer("pntm", model, config, backends.get(name), name, resume_from)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-5)
    assert cfg.lr_at(99) == pytest.approx(1e-3)
    assert cfg.lr_at(100) == pytest.approx(1e-3)
    assert cfg.lr_at(550) == pytest.approx(0.55e-3)  # half-way through the cosine
    assert cfg.lr_at(999) == pytest.approx(1e-4, rel=1e-4)
    lrs = [cfg.lr_at(s) for s in range(100, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_head_schedule():
    model = PNTM(tiny(hard_from=0.4)[0], backends.get("numpy"))
    assert [model.train_mode(s, 10)["heads"] for s in range(10)] == ["soft"] * 4 + ["hard"] * 6
    assert model.decode_mode(10, 10) == {"heads": "hard", "temperature": 1.0}
    assert model.decode_mode(4, 10) == {"heads": "soft", "temperature": 1.0}  # stopped early
    assert model.decode_mode(10, 10, heads="soft", temperature=0.5)["heads"] == "soft"
    soft = PNTM(tiny(hard_from=1.0)[0], backends.get("numpy"))
    assert soft.decode_mode(10, 10)["heads"] == "soft"
    assert PNTM(tiny(hard_from=0.0)[0], backends.get("numpy")).train_mode(0, 10)["heads"] == "hard"
    assert model.train_metrics(3, 10) == {"heads": "soft", "head_noise": 0.0}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"train_length": 0}, "length 0 is out of range"),
        ({"task": "associative_recall", "train_length": 65}, r"allowed 1\.\.64"),
        ({"hard_from": 1.5}, "hard_from must be in"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": float("inf")}, "lr must be finite"),
        ({"weight_decay": float("nan")}, "weight_decay must be finite"),
        ({"clip_norm": float("nan")}, "clip_norm must be finite"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"hard_mix": -1.0}, "hard_mix must be"),
        ({"head_noise": float("nan")}, "head_noise must be"),
        ({"noise_until": 0.0}, "noise_until must be in"),
        ({"move_change_cost": float("inf")}, "move_change_cost must be finite"),
    ],
)
def test_train_config_refuses_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_numpy_backend_does_not_train():
    model, config = tiny()
    with pytest.raises(ValueError, match="does not train"):
        Trainer("pntm", model, config, backends.get("numpy"), "numpy")


def test_training_lowers_the_loss(trainable_ops, backend_name):
    trainer = make_trainer(backend_name, steps=60, hard_from=1.0, lr=1e-2)
    losses = [trainer.train_step()["loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert np.isfinite(losses).all()


def test_noise_schedule():
    cfg = tiny(head_noise=2.0, noise_until=0.5)[0]
    assert [cfg.noise_at(s, 10) for s in range(7)] == pytest.approx([2, 1.6, 1.2, 0.8, 0.4, 0, 0])
    assert tiny()[0].noise_at(0, 10) == 0
    model = PNTM(cfg, backends.get("numpy"))
    rng = np.random.default_rng(0)
    assert model.train_noise(rng, 2, 3, 5, 10) is None  # decayed to 0: no draws
    assert model.train_noise(rng, 2, 3, 0, 10)[0]["write_shift"].shape == (2, 3, 1, 3)


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("heads", ["soft", "hard"])
def test_move_change_cost_adds_the_move_changes(name, heads):
    """The loss is CE + move_change_cost x (changes of every head's move between consecutive
    tokens of a sequence, as the forward pass makes them) / (target tokens), over the
    sequences' own tokens only, with noisy heads. Hard heads: the changes are counted, a pair
    of tokens where the head resets on one and not the other or shifts differently without
    resetting; soft heads: recomputed in float64."""
    from pntm.models.base import cross_entropy

    trainer = make_trainer(
        name,
        task="binary_addition",
        move_change_cost=0.3,
        hard_from=0.0 if heads == "hard" else 1.0,
        head_noise=1.0,
        batch_size=5,
        train_length=6,
    )
    ops, model, params = trainer.ops, trainer.model, trainer.params
    batch, noise = trainer.batch_at(trainer.step)  # the batch train_step will train on
    tokens = ops.asarray(batch.tokens)
    logits, _, controls = model._forward(
        params, tokens, batch.tokens.shape[1], heads=heads, noise=noise
    )
    args = [ops.asarray(a) for a in (batch.labels, batch.mask)]
    ce = float(ops.to_numpy(cross_entropy(ops, logits, *args)))
    changes = 0.0
    own = batch.tokens != tasks.get("binary_addition").end_id
    for ctl in controls:
        for head in ("write", "read"):
            shift = ops.to_numpy(ctl[f"{head}_shift"]).astype(np.float64)  # (B, T, K, 2S + 1)
            gate = ops.to_numpy(ctl[f"{head}_gate"]).astype(np.float64)  # (B, T, K)
            if heads == "hard":
                assert set(np.unique(gate)) <= {0.0, 1.0}
                assert np.all(shift.max(-1) == 1.0) and np.all(shift.sum(-1) == 1.0)
            for b in range(len(own)):
                n = own[b].sum()  # the sequence's tokens; padding follows
                if heads == "hard":
                    g, s = gate[b, :n] == 1, shift[b, :n].argmax(-1)
                    moved_apart = ~g[1:] & ~g[:-1] & (s[1:] != s[:-1])
                    changes += np.sum((g[1:] != g[:-1]) | moved_apart)
                else:
                    q = np.concatenate(
                        [(1 - gate[b, :n, :, None]) * shift[b, :n], gate[b, :n, :, None]], -1
                    )
                    changes += ((q[1:] - q[:-1]) ** 2).sum() / 2
    assert changes > 0
    want = ce + 0.3 * changes / batch.mask.sum()
    assert trainer.train_step()["loss"] == pytest.approx(want, rel=1e-5)


def test_hard_mix_adds_the_hard_heads_loss(tmp_path):
    """In the soft phase the loss is CE(soft heads) + hard_mix x CE(hard heads), same batch."""
    from pntm.models.base import cross_entropy

    name = TRAINABLE[0]
    trainer = make_trainer(name, hard_mix=0.5, hard_from=0.5)
    ops, model, params = trainer.ops, trainer.model, trainer.params
    batch, _ = trainer.batch_at(trainer.step)  # the batch train_step will train on
    args = [ops.asarray(a) for a in (batch.labels, batch.mask)]

    def loss(heads):
        logits = model.forward(
            params, ops.asarray(batch.tokens), batch.tokens.shape[1], heads=heads
        )
        return float(ops.to_numpy(cross_entropy(ops, logits, *args)))

    want = loss("soft") + 0.5 * loss("hard")
    assert trainer.train_step()["loss"] == pytest.approx(want, rel=1e-5)


def test_resume_is_exact(trainable_ops, backend_name, tmp_path):
    """Six steps straight equal three, a checkpoint, a new process-like Trainer, three more:
    parameters and optimizer state are restored and the data (head noise too) follows from
    (seed, step) (hard heads from step 3)."""
    straight = make_trainer(backend_name, steps=6, hard_from=0.5, head_noise=1.0)
    for _ in range(6):
        straight.train_step()

    first = make_trainer(backend_name, steps=6, hard_from=0.5, head_noise=1.0)
    for _ in range(3):
        first.train_step()
    checkpoint.save(tmp_path / "c.safetensors", first.to_checkpoint())
    resumed = make_trainer(
        backend_name,
        checkpoint.load(tmp_path / "c.safetensors"),
        steps=6,
        hard_from=0.5,
        head_noise=1.0,
    )
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    a, b = straight.to_checkpoint(), resumed.to_checkpoint()
    for tree_a, tree_b in ((a.params, b.params), (a.optimizer["m"], b.optimizer["m"])):
        for key, value in tree_flatten(tree_a).items():
            np.testing.assert_array_equal(value, tree_flatten(tree_b)[key], err_msg=key)
    assert a.optimizer["step"] == b.optimizer["step"] == 6


def test_gated_writes_train_through_the_snapped_gate(trainable_ops, backend_name):
    """With ``gated_write`` and hard heads from step 0 the write gates are snapped to 0/1, yet
    the first update moves their weights: the gradient passes straight through (Adam's first
    step is zero where the gradient is zero). Noise also samples the gates."""
    model, config = tiny(steps=2, hard_from=0.0, head_noise=1.0)
    model = PNTMConfig(**(model.to_dict() | {"gated_write": True}))
    trainer = Trainer("pntm", model, config, trainable_ops, backend_name)
    erase_columns = model.controller_slices(0)["erase"]  # K = 1: one head's fields

    def erase_weights():
        return trainable_ops.to_numpy(trainer.params["blocks"][0]["ctrl_w"])[:, erase_columns]

    before = erase_weights()
    metrics = trainer.train_step()
    assert metrics["heads"] == "hard" and np.isfinite(metrics["loss"])
    assert np.abs(erase_weights() - before).max() > 1e-4


def test_fit_writes_metrics_and_checkpoint(tmp_path):
    trainer = make_trainer(TRAINABLE[0], steps=12, log_every=5, save_every=5)
    last = fit(trainer, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 12]
    assert last == lines[-1]
    assert {"loss", "accuracy", "lr", "grad_norm", "heads", "tokens_per_s"} <= set(last)
    ckpt = checkpoint.load(tmp_path / CHECKPOINT_NAME)
    assert ckpt.step == 12 and ckpt.backend == TRAINABLE[0]
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_resumed_fit_drops_metrics_logged_after_the_checkpoint(tmp_path):
    every = {"steps": 10, "log_every": 2, "save_every": 4}
    trainer = make_trainer(TRAINABLE[0], **every)
    fit(trainer, tmp_path, progress=False)
    ckpt = checkpoint.load(tmp_path / CHECKPOINT_NAME)
    # pretend the run died after step 8's checkpoint, while writing a line (cut short): the
    # lines after step 8 and the cut one go on resume
    ckpt.step = 8
    with (tmp_path / METRICS_NAME).open("a") as log:
        log.write('{"step": 11, "lo')
    resumed = make_trainer(TRAINABLE[0], ckpt, **every)
    fit(resumed, tmp_path, progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]


@needs_two
@pytest.mark.parametrize("trained_on", TRAINABLE)
def test_checkpoint_is_portable_across_backends(trained_on, tmp_path):
    """Trained on one backend, a checkpoint gives the same logits (float32 vs float32 and vs
    the float64 reference, to FWD_RTOL) and the same greedy decodes on every backend."""
    trainer = make_trainer(trained_on, steps=25)
    for _ in range(25):
        trainer.train_step()
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, trainer.to_checkpoint())
    ckpt = checkpoint.load(path)
    task = tasks.get("copy")
    rng = np.random.default_rng(1)
    prompts = np.array([task.sequence(rng, 6)[: task.prompt_length(6)] for _ in range(5)])
    config = PNTMConfig.from_dict(ckpt.model_config)
    logits, decodes = {}, {}
    for name in (*TRAINABLE, "numpy"):
        model = PNTM(config, backends.get(name))
        params = model.params_from_numpy(ckpt.params)
        logits[name] = model.ops.to_numpy(
            model.forward(params, model.ops.asarray(prompts), 16, heads="hard")
        )
        decodes[name] = greedy_decode(model, params, prompts, 8, 16, {"heads": "hard"})
    for name in TRAINABLE:
        assert rel_err(logits[name], logits["numpy"]) < FWD_RTOL, name
        np.testing.assert_array_equal(decodes[name], decodes["numpy"], err_msg=name)


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, capsys, signum):
    """A signal during step 4 (Ctrl-C, kill, a closed terminal's SIGHUP, SIGQUIT, a
    scheduler's SIGUSR1) is announced at once, lets the step finish, saves step 4 and raises
    TrainingStopped (exit code 128 + the signal); resuming gives exactly the uninterrupted
    run, and the metrics of the resumed run hold every step once."""
    every = {"steps": 8, "log_every": 1, "save_every": 100, "head_noise": 1.0}
    straight = make_trainer(TRAINABLE[0], **every)
    fit(straight, tmp_path / "straight", progress=False)

    trainer = make_trainer(TRAINABLE[0], **every)
    real_step = trainer.train_step

    def signalled_step():
        if trainer.step == 3:
            os.kill(os.getpid(), signum)  # arrives while the step runs
        return real_step()

    trainer.train_step = signalled_step
    with pytest.raises(TrainingStopped) as stopped:
        fit(trainer, tmp_path / "run", progress=False)
    assert stopped.value.step == 4 and stopped.value.exit_code == 128 + signum
    said = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint" in said
    assert signal.getsignal(signum) is not None  # handlers restored, not left in place
    ckpt = checkpoint.load(tmp_path / "run" / CHECKPOINT_NAME)
    assert ckpt.step == 4
    resumed = make_trainer(TRAINABLE[0], ckpt, **every)
    fit(resumed, tmp_path / "run", progress=False)
    a, b = straight.to_checkpoint(), resumed.to_checkpoint()
    for key, value in tree_flatten(a.params).items():
        np.testing.assert_array_equal(value, tree_flatten(b.params)[key], err_msg=key)
    logged = (tmp_path / "run" / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, 9))


@pytest.mark.parametrize(
    "options,why",
    [({"lr": 1e30}, "non-finite"), ({"lr": 1e-3}, "the loss is nan")],
    ids=["lr-1e30", "nan-batch"],
)
def test_divergence_stops_with_the_last_finite_state(tmp_path, options, why):
    """A non-finite update (a huge learning rate) or loss (a batch poisoned with NaN noise)
    stops training with TrainingDiverged naming the step; the checkpoint holds the last
    finite state, and the metrics stay strict JSON."""
    trainer = make_trainer(TRAINABLE[0], steps=20, log_every=1, head_noise=1.0, **options)
    if why.startswith("the loss"):
        real_batch = trainer.batch_at

        def poisoned(step):
            batch, noise = real_batch(step)
            if step == 5:
                noise[0]["write_gate"] = noise[0]["write_gate"] * float("nan")
            return batch, noise

        trainer.batch_at = poisoned
    with pytest.raises(TrainingDiverged, match="training diverged at step") as diverged:
        fit(trainer, tmp_path, progress=False)
    ckpt = checkpoint.load(tmp_path / CHECKPOINT_NAME)
    assert ckpt.step == diverged.value.step - 1
    assert all(np.isfinite(leaf).all() for leaf in tree_flatten(ckpt.params).values())
    for line in (tmp_path / METRICS_NAME).read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    if why == "the loss is nan":
        assert diverged.value.step == 6 and why in str(diverged.value)


def test_version_1_checkpoints_load_with_the_head_schedule_moved(tmp_path):
    """Format 1 kept the P-NTM head schedule in the training config; it loads into the model
    config, and the run resumes as the same run."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    trainer = make_trainer(TRAINABLE[0], steps=6, hard_from=0.5, head_noise=1.0)
    trainer.train_step()
    path = tmp_path / "v2.safetensors"
    checkpoint.save(path, trainer.to_checkpoint())
    with safe_open(str(path), framework="np") as f:
        metadata = dict(f.metadata())
    model_config = json.loads(metadata["model_config"])
    schedule = {
        k: model_config.pop(k) for k in ("hard_from", "hard_mix", "head_noise", "noise_until")
    }
    train_config = json.loads(metadata["train_config"]) | schedule
    old = tmp_path / "v1.safetensors"
    v1 = metadata | {
        "format_version": "1",
        "model_config": json.dumps(model_config),
        "train_config": json.dumps(train_config),
    }
    save_file(load_file(str(path)), str(old), metadata=v1)
    loaded = checkpoint.load(old)
    assert loaded.model_config == trainer.model_config.to_dict()
    assert loaded.train_config == trainer.config.to_dict()
    with pytest.raises(checkpoint.CheckpointError, match="format version '9'"):
        save_file(load_file(str(path)), str(old), metadata=metadata | {"format_version": "9"})
        checkpoint.load(old)
