"""Per-task recipes: every task has one, each builds valid configs, and `pntm train` uses it
where the command line is silent."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pntm import checkpoint, recipes, tasks
from pntm.cli import main


@pytest.mark.parametrize("name", tasks.NAMES)
def test_every_task_has_a_valid_recipe(name):
    recipe = recipes.get(name)
    train, model = recipe.train_config(seed=3), recipe.model_config()
    assert train.task == name and train.seed == 3
    assert train.train_length == tasks.get(name).default_train_length
    assert model.vocab_size == tasks.get(name).vocab_size
    assert model.content == tasks.get(name).needs_content
    for key, value in recipe.train.items():
        assert getattr(train, key) == value
    for key, value in recipe.model.items():
        assert getattr(model, key) == value
    assert recipe.why


def test_overrides_win_and_none_is_silent():
    recipe = recipes.get("reverse")
    assert recipe.train_config(steps=7, lr=None).steps == 7
    assert recipe.train_config(lr=None).lr == recipe.train_config().lr
    assert recipe.model_config(velocity_prior=0.0).velocity_prior == 0.0


def test_unknown_fields_and_tasks_are_named():
    with pytest.raises(ValueError, match=r"unknown training fields \['stepz'\]"):
        recipes.Recipe("copy", train={"stepz": 3})
    with pytest.raises(ValueError, match=r"unknown model fields \['hard_from'\]"):
        recipes.Recipe("copy", model={"hard_from": 0.5}, model_name="lstm")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        recipes.get("nope")
    with pytest.raises(ValueError, match="unknown model 'rnn'"):
        recipes.get("copy", "rnn")
    with pytest.raises(ValueError, match="restarts must be >= 1, got 0"):
        recipes.Recipe("copy", restarts=0)
    with pytest.raises(ValueError, match="validation_factor must be >= 0, got -2"):
        recipes.Recipe("copy", validation_factor=-2)


def test_restarts_are_part_of_the_budget_and_shown():
    recipe = recipes.Recipe("copy", {"steps": 10}, restarts=3)
    assert recipe.describe() == "steps=10 restarts=3"
    assert recipes.Recipe("copy", {"steps": 10}).describe() == "steps=10"
    chosen = recipes.Recipe("copy", {"steps": 10}, restarts=3, validation_factor=6)
    assert chosen.describe() == "steps=10 restarts=3 validation_factor=6"
    for name in tasks.NAMES:  # the peers train as many runs as the P-NTM, chosen alike
        peer, own = recipes.get(name, "lstm"), recipes.get(name)
        assert (peer.restarts, peer.validation_factor) == (own.restarts, own.validation_factor)


@pytest.mark.parametrize("model", ["ntm", "lstm", "transformer"])
def test_peers_take_the_pntm_budget_and_their_own_defaults(model):
    recipe = recipes.get("reverse", model)
    assert recipe.model_name == model and recipe.model == {}
    assert recipe.train_config() == recipes.get("reverse").train_config()
    config = recipe.model_config()
    assert config == type(config)(vocab_size=tasks.get("reverse").vocab_size)


def test_train_uses_the_recipe_where_the_command_line_is_silent(tmp_path):
    args = [
        "train", "--task", "reverse", "--steps", "2", "--train-length", "2", "--batch-size",
        "2", "--d-model", "8", "--layers", "1", "--memory-heads", "1", "--head-dim", "2",
        "--no-eval", "--quiet", "--out", str(tmp_path / "r"), "--velocity-prior", "0.5",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = checkpoint.load(tmp_path / "r" / "checkpoint.safetensors")
    recipe = recipes.get("reverse")
    assert saved.model_config["velocity_prior"] == 0.5  # given
    for key, value in recipe.model.items():
        if key != "velocity_prior":
            assert saved.model_config[key] == value
    for key, value in recipe.train.items():
        if key != "steps":
            assert saved.train_config[key] == value


def test_tasks_command_shows_the_recipes():
    listing = CliRunner().invoke(main, ["tasks"]).output
    for name in tasks.NAMES:
        assert f"{name:22s} {recipes.get(name).describe()}" in listing
    shown = CliRunner().invoke(main, ["tasks", "--show", "reverse"]).output
    assert f"recipe: {recipes.get('reverse').describe()}" in shown
