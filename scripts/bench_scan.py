"""Forward+backward time of one P-NTM, parallel scans against the plain sequential loop.

Both variants are the same model, weights and tokens on the same backend; the only difference
is ``scan="chunked"`` (chunked scans, the memory scan with its own backward) or
``scan="sequential"`` (the recurrences as plain loops over time, differentiated by the framework).
Reported: median seconds over ``--repeats`` after one warm-up, and the ratio loop / parallel.

    python scripts/bench_scan.py --backend torch --batch 2 --length 512 --slots 512
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import click
import numpy as np

from pntm import backends
from pntm.models.base import cross_entropy
from pntm.models.pntm import PNTM, PNTMConfig, init_params


def time_fwd_bwd(
    backend: str,
    scan: str,
    config: PNTMConfig,
    batch: int,
    length: int,
    slots: int,
    repeats: int,
    seed: int = 0,
) -> float:
    ops = backends.get(backend, scan=scan)
    model = PNTM(config, ops)
    params = model.params_from_numpy(init_params(config, seed))
    rng = np.random.default_rng(seed)
    tokens = ops.asarray(rng.integers(0, config.vocab_size, (batch, length)))
    mask = ops.asarray(np.ones((batch, length)))

    def loss_fn(p):
        return cross_entropy(ops, model.forward(p, tokens, slots), tokens, mask)

    value_and_grad = ops.value_and_grad(loss_fn)
    times = []
    for _ in range(repeats + 1):  # the first call warms up (allocations, lazy graph building)
        start = time.perf_counter()
        loss, grads = value_and_grad(params)
        ops.eval(loss, grads)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@click.command()
@click.option(
    "--backend",
    "backend_names",
    multiple=True,
    default=("torch", "mlx"),
    show_default=True,
    help="Backends to time (repeatable).",
)
@click.option("--batch", default=2, show_default=True)
@click.option("--length", default=512, show_default=True, help="Sequence length T.")
@click.option("--slots", default=512, show_default=True, help="Memory slots N.")
@click.option("--threads", default=0, help="CPU threads for PyTorch (0: its default).")
@click.option("--repeats", default=3, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results as JSON here.",
)
def main(backend_names, batch, length, slots, threads, repeats, json_out):
    """Time parallel vs sequential P-NTM forward+backward (model of the prototype)."""
    config = PNTMConfig(vocab_size=8, d_model=64, n_layers=2, n_heads=2, head_dim=16)
    if threads:
        import torch

        torch.set_num_threads(threads)
    machine = f"{platform.machine()} {platform.system()}, {platform.processor() or 'cpu'}"
    click.echo(f"# B={batch} T={length} N={slots}, model {config}, {machine}")
    results = []
    for name in backend_names:
        parallel = time_fwd_bwd(name, "chunked", config, batch, length, slots, repeats)
        loop = time_fwd_bwd(name, "sequential", config, batch, length, slots, repeats)
        results.append(
            dict(
                backend=name,
                batch=batch,
                length=length,
                slots=slots,
                threads=threads,
                parallel_s=parallel,
                sequential_s=loop,
                speedup=loop / parallel,
            )
        )
        click.echo(
            f"{name:6s} parallel {parallel:7.3f} s   sequential loop {loop:7.3f} s   "
            f"loop/parallel {loop / parallel:5.2f}x"
        )
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
