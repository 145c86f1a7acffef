"""``pntm bench``: the speed claim, measured the same way for every model and backend.

* **Training step**: one optimizer update (forward, backward, global-norm clipping, AdamW,
  finished on the device) on a batch of random tokens of length T, for every model over T;
  warm-up updates excluded, the median of the timed repeats reported, with ratios to the P-NTM
  computed from the same run. All models share the batch, the width (or, with
  ``match="params"``, the parameter count) and the memory size (N = T slots, as in training).
* **Decoding**: greedy tokens/s generating T tokens one at a time, with each model's step form
  (for the P-NTM: constant time per token; for the Transformer: its KV cache), and for the P-NTM
  also by recomputing the parallel form over the whole prefix for every new token, the cost its
  step form avoids.
* **Peak memory** of a training step, where the framework reports it (CUDA, Metal).

Models train in the mode of their last training phase (the P-NTM: straight-through hard heads)
and without training noise.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pntm import models, tasks
from pntm.backends.base import Backend
from pntm.checkpoint import atomic_write
from pntm.config import check_finite, check_ints, option
from pntm.evaluate import greedy_decode
from pntm.models.base import sequences_that_fit

TRAIN_LENGTHS = (64, 128, 256, 512, 1024, 2048)
DECODE_LENGTHS = (64, 256, 1024)
MATCHES = ("width", "params")
REFERENCE = "pntm"  # ratios are to this model


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = option(
        tuple(models.NAMES),
        "Comma-separated models to compare (pntm is the reference of the ratios).",
        choices=models.NAMES,
    )
    lengths: tuple[int, ...] = option(
        TRAIN_LENGTHS, "Sequence lengths T of the training-step timings."
    )
    decode_lengths: tuple[int, ...] = option(
        DECODE_LENGTHS, "Numbers of tokens generated in the decoding timings."
    )
    recompute_max: int = option(
        512,
        "Longest T of the recompute-the-prefix decoding baseline (it costs O(T^2)).",
        minimum=1,
    )
    batch_size: int = option(8, "Sequences per batch.", minimum=1)
    d_model: int = option(
        64, "Width of every model (of the P-NTM alone with match params).", minimum=1
    )
    match: str = option(
        "width",
        "width: every model at d_model; params: the other models at the width whose parameter "
        "count is nearest the P-NTM's.",
        choices=MATCHES,
    )
    repeats: int = option(5, "Timed repeats.", minimum=1)
    warmup: int = option(2, "Untimed repeats first (compilation, caches).", minimum=0)
    budget_s: float = option(
        60.0,
        "Seconds after which a measurement stops repeating (one timed repeat at least).",
        flag="budget",
        minimum=0,
        min_open=True,
    )
    task: str = option("copy", "Task whose vocabulary the random tokens use.", choices=tasks.NAMES)
    seed: int = option(0, "Seed of the parameters and tokens.", minimum=0)

    def __post_init__(self) -> None:
        for name in self.models:
            models.get(name)
        if REFERENCE not in self.models:
            raise ValueError(f"the models must include {REFERENCE!r}, the reference of ratios")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        check_ints(self, ("batch_size", "d_model", "repeats", "recompute_max"))
        check_ints(self, ("warmup", "seed"), minimum=0)
        check_finite(self.budget_s, "budget_s", 0, low_open=True)
        for length in (*self.lengths, *self.decode_lengths):
            if length < 2:
                raise ValueError(f"lengths must be >= 2, got {length}")
        tasks.get(self.task)


@dataclass
class Measurement:
    model: str
    kind: str  # "train" or a decoding method: "step", "recompute"
    length: int
    seconds: list[float] = field(default_factory=list)
    median_s: float = float("nan")
    per_s: float = float("nan")  # train: steps/s; decoding: tokens/s over the batch
    peak_bytes: int | None = None


def count_parameters(model_name: str, config: Any) -> int:
    return models.get(model_name).parameter_count(config)


def model_configs(cfg: BenchConfig) -> dict[str, Any]:
    """Each model's default config at the bench's vocabulary and width; with ``match =
    "params"`` every other model's width is the one whose parameter count is nearest the
    P-NTM's."""
    vocab = tasks.get(cfg.task).vocab_size
    configs = {}
    for name in cfg.models:
        cls = models.get(name).config_class
        configs[name] = cls(vocab_size=vocab, d_model=cfg.d_model)
    if cfg.match == "params":
        target = count_parameters(REFERENCE, configs[REFERENCE])
        for name in cfg.models:
            if name != REFERENCE:
                configs[name] = _nearest_width(name, vocab, target)
    return configs


def _nearest_width(model_name: str, vocab: int, target: int) -> Any:
    cls = models.get(model_name).config_class
    best, best_gap = None, None
    for width in range(8, 1025, 8):
        try:
            config = cls(vocab_size=vocab, d_model=width)
        except ValueError:  # e.g. a width the attention heads do not divide
            continue
        gap = abs(count_parameters(model_name, config) - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = config, gap
    assert best is not None
    return best


def _repeat(run: Callable[[], None], cfg: BenchConfig) -> list[float]:
    """Seconds of each timed call of ``run`` after ``cfg.warmup`` untimed ones; stops early
    once ``cfg.budget_s`` is spent (one timed call at least)."""
    for _ in range(cfg.warmup):
        run()
    seconds: list[float] = []
    while len(seconds) < cfg.repeats and (not seconds or sum(seconds) < cfg.budget_s):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def _finish(m: Measurement, work: float) -> Measurement:
    m.median_s = statistics.median(m.seconds)
    m.per_s = work / m.median_s
    return m


def time_training(
    model_name: str, config: Any, ops: Backend, backend_name: str, length: int, cfg: BenchConfig
) -> Measurement:
    from pntm.train import TrainConfig, Trainer

    train = TrainConfig(task=cfg.task, steps=1_000_000, batch_size=cfg.batch_size, seed=cfg.seed)
    trainer = Trainer(model_name, config, train, ops, backend_name)
    rng = np.random.default_rng([cfg.seed, length])
    tokens = rng.integers(0, config.vocab_size, (cfg.batch_size, length + 1))
    inputs, labels = ops.asarray(tokens[:, :-1]), ops.asarray(tokens[:, 1:])
    mask = ops.asarray(np.ones((cfg.batch_size, length)))
    mode = trainer.model.train_mode(train.steps - 1, train.steps)
    m = Measurement(model_name, "train", length)
    ops.reset_peak_memory()
    m.seconds = _repeat(lambda: trainer.update(inputs, labels, mask, length, mode, None, 1e-3), cfg)
    m.peak_bytes = ops.peak_memory()
    return _finish(m, 1.0)


def time_decoding(
    model_name: str, config: Any, ops: Backend, method: str, length: int, cfg: BenchConfig
) -> Measurement:
    """Greedy generation of ``length`` tokens after a one-token prompt, the whole batch."""
    cls = models.get(model_name)
    model = cls(config, ops)
    params = model.params_from_numpy(cls.init_params(config, cfg.seed))
    mode = model.decode_mode(1, 1)
    prompt = np.random.default_rng(cfg.seed).integers(0, config.vocab_size, (cfg.batch_size, 1))
    if method == "step":

        def run() -> None:
            greedy_decode(model, params, prompt, length, length + 1, mode)

    elif method == "recompute":

        def run() -> None:
            seq = prompt
            for _ in range(length):
                logits = model.forward(params, ops.asarray(seq), length + 1, **mode)
                token = ops.to_numpy(ops.argmax(logits[:, -1], -1))
                seq = np.concatenate([seq, token[:, None]], axis=1)

    else:
        raise ValueError(f"unknown decoding method {method!r}; known: step, recompute")
    m = Measurement(model_name, method, length)
    m.seconds = _repeat(run, cfg)
    return _finish(m, float(cfg.batch_size * length))


def run(
    cfg: BenchConfig,
    ops: Backend,
    backend_name: str,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every measurement of the bench; a JSON-able dict (see :func:`format_report`). Raises
    :class:`MemoryError` before measuring anything where one of the lengths cannot fit in
    the backend's memory (:func:`check_memory`)."""
    configs = model_configs(cfg)
    check_memory(cfg, configs, ops)
    measurements: list[Measurement] = []
    for length in cfg.lengths:
        for name in cfg.models:
            progress(f"train step  {name:12s} T = {length}")
            measurements.append(time_training(name, configs[name], ops, backend_name, length, cfg))
    for length in cfg.decode_lengths:
        for name in cfg.models:
            progress(f"decode      {name:12s} T = {length}")
            measurements.append(time_decoding(name, configs[name], ops, "step", length, cfg))
        if length <= cfg.recompute_max:
            progress(f"decode      {REFERENCE:12s} T = {length} (recompute)")
            measurements.append(
                time_decoding(REFERENCE, configs[REFERENCE], ops, "recompute", length, cfg)
            )
    return {
        "config": asdict(cfg),
        "backend": backend_name,
        "device": ops.describe(),
        "models": {
            name: {
                "config": configs[name].to_dict(),
                "parameters": count_parameters(name, configs[name]),
                "summary": configs[name].summary(),
            }
            for name in cfg.models
        },
        "measurements": [asdict(m) for m in measurements],
    }


def check_memory(cfg: BenchConfig, configs: dict[str, Any], ops: Backend) -> None:
    """:class:`MemoryError`, naming the model and length, where not even one sequence of a
    training step fits in memory by the model's own estimate (as training checks). The
    estimates are the framework path's peaks, above the fused kernels' (the default bench at
    T = 2048 runs on numba where they allow 5 of its 8 sequences), so a whole batch is not
    required."""
    for name in cfg.models:
        model = models.get(name)(configs[name], ops)
        for length in cfg.lengths:
            sequences_that_fit(model, length, length, True, cfg.batch_size)


def _index(report: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(m["model"], m["kind"], m["length"]): m for m in report["measurements"]}


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables: training step time and its ratio to the P-NTM's, decoding tokens/s."""
    cfg, found = report["config"], _index(report)
    names = cfg["models"]
    lines = [
        f"Backend {report['backend']} ({report['device']}), batch {cfg['batch_size']}, "
        f"matched {cfg['match']}; median of up to {cfg['repeats']} timed repeats after "
        f"{cfg['warmup']} warm-up.",
        "",
        "| model | parameters | size |",
        "|---|---|---|",
    ]
    for name in names:
        info = report["models"][name]
        lines.append(f"| {name} | {info['parameters']:,} | {info['summary']} |")
    lines += ["", "Training step (forward + backward + AdamW), ms; in brackets: x the P-NTM's", ""]
    lines.append("| T | " + " | ".join(names) + " | peak memory (P-NTM) |")
    lines.append("|---|" + "---|" * (len(names) + 1))
    for length in cfg["lengths"]:
        ref = found[(REFERENCE, "train", length)]
        cells = []
        for name in names:
            m = found[(name, "train", length)]
            ratio = m["median_s"] / ref["median_s"]
            cells.append(
                f"{1e3 * m['median_s']:.1f}" + ("" if name == REFERENCE else f" ({ratio:.2g}x)")
            )
        peak = ref["peak_bytes"]
        memory = f"{peak / 2**20:.0f} MiB" if peak is not None else "not reported"
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {memory} |")
    methods = [("step", name) for name in names] + [("recompute", REFERENCE)]
    header = [f"{name} step" for name in names] + [f"{REFERENCE} recompute"]
    lines += ["", "Greedy decoding, tokens/s (whole batch)", ""]
    lines.append("| T | " + " | ".join(header) + " |")
    lines.append("|---|" + "---|" * len(header))
    for length in cfg["decode_lengths"]:
        cells = []
        for kind, name in methods:
            m = found.get((name, kind, length))
            cells.append(f"{m['per_s']:,.0f}" if m else "-")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    paths = out / "bench.json", out / "bench.md", out / "bench.png"
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(text))
    table = format_report(report) + "\n"
    atomic_write(paths[1], lambda tmp: Path(tmp).write_text(table))
    plot(report, paths[2])
    return paths


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Training step time against T (log-log) and decoding tokens/s against T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, found = report["config"], _index(report)
    fig, (train_ax, decode_ax) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")

    def series(ax: Any, name: str, kind: str, lengths: list[int], scale: float, style: str,
               label: str) -> None:  # fmt: skip
        lengths = [n for n in lengths if (name, kind, n) in found]
        key = "median_s" if kind == "train" else "per_s"
        values = [scale * found[(name, kind, n)][key] for n in lengths]
        ax.plot(lengths, values, style, label=label)

    for name in cfg["models"]:
        series(train_ax, name, "train", cfg["lengths"], 1e3, "o-", name)
        series(decode_ax, name, "step", cfg["decode_lengths"], 1.0, "o-", f"{name} step")
    series(decode_ax, REFERENCE, "recompute", cfg["decode_lengths"], 1.0, "s--",
           f"{REFERENCE} recompute")  # fmt: skip
    for ax in (train_ax, decode_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.legend(fontsize=8)
    train_ax.set_ylabel("training step, ms")
    decode_ax.set_ylabel("decoding, tokens/s")
    fig.suptitle(f"pntm bench: {report['backend']} ({report['device']})", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
