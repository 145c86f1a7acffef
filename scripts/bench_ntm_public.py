"""Training-step time of pntm's NTM against a well-known public PyTorch NTM, at the same sizes.

The public NTM is loudinthecloud/pytorch-ntm (https://github.com/loudinthecloud/pytorch-ntm),
imported from a checkout given with ``--public`` (its code is not part of this project). Both get
the same controller width (one LSTM layer), memory N x M, one read and one write head, batch and
sequence length T, on the CPU with PyTorch:

* public: ``EncapsulatedNTM(V, V, controller, 1, 1, N, M)`` fed one-hot tokens, one call per
  step as its ``train.py`` does, binary cross-entropy of its sigmoid outputs, Adam;
* pntm: ``NTM`` on the ``torch`` backend (the embedding width is the controller width), the
  cross-entropy of the model contract, global-norm clipping and pntm's AdamW, as ``pntm train``.

One training step = forward over T, backward, optimizer step. Warm-up steps are excluded, and
the two models alternate repeat by repeat (so that a change of machine load hits both); the
table gives the median seconds per step, per-step microseconds (median / T) and the ratio
pntm / public (below 1: pntm is faster).

    python scripts/bench_ntm_public.py --public /path/to/pytorch-ntm --threads 1
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np
import torch

from pntm import backends
from pntm.bench import count_parameters
from pntm.models.ntm import NTMConfig
from pntm.train import TrainConfig, Trainer


def public_step(public_path: Path, controller: int, slots: int, width: int, vocab: int):
    """A closure running one training step of the public NTM on (tokens, targets)."""
    sys.path.insert(0, str(public_path))
    from ntm.aio import EncapsulatedNTM  # from the checkout given

    model = EncapsulatedNTM(vocab, vocab, controller, 1, 1, slots, width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCELoss()

    def run(tokens: np.ndarray, targets: np.ndarray) -> None:
        batch, length = tokens.shape
        x = torch.nn.functional.one_hot(torch.as_tensor(tokens.T), vocab).float()
        y = torch.nn.functional.one_hot(torch.as_tensor(targets.T), vocab).float()
        optimizer.zero_grad()
        model.init_sequence(batch)
        outputs = [model(x[t])[0] for t in range(length)]
        loss = loss_fn(torch.stack(outputs), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def pntm_step(controller: int, slots: int, width: int, vocab: int):
    """A closure running one training step of pntm's NTM on (tokens, targets): the update of
    ``pntm train`` (:meth:`pntm.train.Trainer.update`), with the public script's lr and clip."""
    ops = backends.get("torch")
    config = NTMConfig(
        vocab_size=vocab, d_model=controller, head_dim=width, read_heads=1, write_heads=1
    )
    train = TrainConfig(steps=1_000_000, lr=1e-3, clip_norm=10.0)
    trainer = Trainer("ntm", config, train, ops, "torch")

    def run(tokens: np.ndarray, targets: np.ndarray) -> None:
        mask = ops.asarray(np.ones(tokens.shape))
        trainer.update(ops.asarray(tokens), ops.asarray(targets), mask, slots, {}, None, train.lr)

    return run, count_parameters("ntm", config)


@click.command()
@click.option(
    "--public",
    "public_path",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A checkout of loudinthecloud/pytorch-ntm (the directory holding ntm/).",
)
@click.option("--lengths", default="64,128,256,512", show_default=True, help="Sequence lengths T.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--controller", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--slots", default=128, show_default=True, type=click.IntRange(min=1), help="N.")
@click.option("--width", default=20, show_default=True, type=click.IntRange(min=1), help="M.")
@click.option("--vocab", default=10, show_default=True, type=click.IntRange(min=2))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Torch threads."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(
    public_path: Path,
    lengths: str,
    batch: int,
    controller: int,
    slots: int,
    width: int,
    vocab: int,
    repeats: int,
    warmup: int,
    threads: int,
    json_path: Path | None,
) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # the public code calls deprecated F.sigmoid
    sizes = (controller, slots, width, vocab)
    runs = {"public": public_step(public_path, *sizes), "pntm-ntm": pntm_step(*sizes)}
    click.echo(
        f"PyTorch {torch.__version__}, {threads} thread(s), {platform.processor() or 'cpu'}; "
        f"batch {batch}, LSTM {controller}, memory {slots} x {width}, 1 read + 1 write head, "
        f"vocab {vocab}; parameters: " + ", ".join(f"{name} {n}" for name, (_, n) in runs.items())
    )
    rng = np.random.default_rng(0)
    rows = []
    click.echo(
        "\n| T | public s/step | pntm-ntm s/step | public us/pos | pntm-ntm us/pos | "
        "pntm-ntm / public |\n|---:|---:|---:|---:|---:|---:|"
    )
    for length in (int(x) for x in lengths.split(",")):
        tokens = rng.integers(0, vocab, (batch, length))
        targets = rng.integers(0, vocab, (batch, length))
        for run, _ in runs.values():
            for _ in range(warmup):
                run(tokens, targets)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, (run, _) in runs.items():
                start = time.perf_counter()
                run(tokens, targets)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"T": length, **{f"{k}_s": v for k, v in med.items()}, "times": times}
        row["ratio"] = med["pntm-ntm"] / med["public"]
        rows.append(row)
        click.echo(
            f"| {length} | {med['public']:.3f} | {med['pntm-ntm']:.3f} | "
            f"{1e6 * med['public'] / length:.0f} | {1e6 * med['pntm-ntm'] / length:.0f} | "
            f"{row['ratio']:.2f} |"
        )
    if json_path is not None:
        meta = {
            "torch": torch.__version__,
            "threads": threads,
            "batch": batch,
            "controller": controller,
            "slots": slots,
            "width": width,
            "vocab": vocab,
            "repeats": repeats,
            "warmup": warmup,
        }
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
