"""``pntm bench``: every model measured at every length, ratios from the same run, the report
files written, bad settings refused. Tiny sizes: the timings themselves are not tested."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pntm import backends, bench, models
from pntm.cli import main

TINY = dict(lengths=(4, 6), decode_lengths=(3,), repeats=2, warmup=1, batch_size=2, d_model=8)


def test_every_model_is_measured_at_every_length(trainable_ops, backend_name):
    cfg = bench.BenchConfig(**TINY)
    report = bench.run(cfg, trainable_ops, backend_name)
    found = {(m["model"], m["kind"], m["length"]): m for m in report["measurements"]}
    for name in models.NAMES:
        for length in (4, 6):
            m = found[(name, "train", length)]
            assert len(m["seconds"]) == 2 and m["median_s"] > 0, m
        assert found[(name, "step", 3)]["per_s"] > 0
    assert found[("pntm", "recompute", 3)]["per_s"] > 0
    assert set(report["models"]) == set(models.NAMES)
    assert all(info["parameters"] > 0 for info in report["models"].values())
    text = bench.format_report(report)
    assert "| 4 |" in text and "| 6 |" in text and "pntm recompute" in text
    json.dumps(report)  # JSON-able


def test_matched_parameter_counts():
    cfg = bench.BenchConfig(**TINY, match="params")
    configs = bench.model_configs(cfg)
    target = bench.count_parameters("pntm", configs["pntm"])
    for name, config in configs.items():
        # the nearest width on a grid of 8: within a width step of the P-NTM's count
        wider = type(config)(**(config.to_dict() | {"d_model": config.d_model + 8}))
        step = bench.count_parameters(name, wider) - bench.count_parameters(name, config)
        assert abs(bench.count_parameters(name, config) - target) <= step, name


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(models=("lstm",)), "must include 'pntm'"),
        (dict(models=("pntm", "rnn")), "unknown model 'rnn'"),
        (dict(match="flops"), "match must be one of"),
        (dict(repeats=0), "repeats must be a positive integer"),
        (dict(warmup=-1), "warmup must be an integer >= 0"),
        (dict(budget_s=0.0), r"budget_s must be in \(0, inf\]"),
        (dict(lengths=(1,)), "lengths must be >= 2"),
    ],
)
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bench.BenchConfig(**bad)


def test_cli_writes_the_tables_json_and_plot(tmp_path):
    name = next(i.name for i in backends.available() if i.runs and i.trainable)
    args = [
        "bench", "--backend", name, "--lengths", "4", "--decode-lengths", "3", "--repeats", "1",
        "--warmup", "0", "--batch-size", "2", "--d-model", "8", "--quiet", "--out", str(tmp_path),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Training step" in result.output and "tokens/s" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["backend"] == name and report["config"]["lengths"] == [4]


def test_cli_refuses_an_unwritable_directory_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["bench", "--out", str(blocker / "sub"), "--quiet"])
    assert result.exit_code != 0 and "cannot write to" in result.output
    assert "Training step" not in result.output
