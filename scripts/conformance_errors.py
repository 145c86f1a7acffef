"""Max errors of each backend against the float64 sequential reference, for the record.

    python scripts/conformance_errors.py [--backend NAME ...] [--long-length T]

Errors are ``max|x - ref| / max|ref|`` (as in tests/tolerances.py). The tests assert bounds;
this prints the measured values.
"""

from __future__ import annotations

import click
import numpy as np

from pntm import backends
from pntm.backends.numpy_backend import NumpyBackend
from pntm.backends.scans import sequential
from pntm.backends.scans.reference import linear_scan_vjp, memory_scan_read_vjp
from pntm.models.pntm import PNTM, PNTMConfig, init_params

NP = NumpyBackend()


def err(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def scan_inputs(rng, T):
    a = rng.uniform(0, 1, (2, T, 3)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (2, T, 3)))
    a[:, ::17] = 0.0
    b = rng.normal(size=a.shape) + 1j * rng.normal(size=a.shape)
    mem = dict(
        w=rng.dirichlet(np.ones(5), (2, T, 2)),
        erase=rng.uniform(0, 1, (2, T, 2, 3)),
        add=rng.normal(size=(2, T, 2, 3)),
        rho=rng.dirichlet(np.ones(5), (2, T, 2)),
        key=rng.normal(size=(2, T, 2, 3)),
        beta=rng.uniform(0, 4, (2, T, 2)),
        gamma=rng.uniform(0, 1, (2, T, 2)),
    )
    return a, b, mem


@click.command()
@click.option(
    "--backend",
    "names",
    multiple=True,
    type=click.Choice(backends.NAMES),
    help="Rows to print (repeatable; default: every backend that runs here).",
)
@click.option(
    "--long-length",
    default=65_536,
    show_default=True,
    help="T of the long-sequence columns (the Triton interpreter takes minutes at 65,536).",
)
def main(names: tuple[str, ...], long_length: int) -> None:
    """Print each backend's max relative error against the float64 reference."""
    rng = np.random.default_rng(0)
    a, b, mem = scan_inputs(rng, 200)
    long_a, long_b, long_mem = scan_inputs(rng, long_length)
    config = PNTMConfig(vocab_size=7, d_model=16, n_layers=2, n_heads=2, head_dim=4, content=True)
    params = init_params(config, 0)
    tokens = rng.integers(0, 7, (2, 40))
    ref_model = PNTM(config, NP)
    state, ref_logits = ref_model.init_state(2, 41), []
    for t in range(40):
        logits, state = ref_model.step(params, state, tokens[:, t])
        ref_logits.append(logits)
    ref_logits = np.stack(ref_logits, 1)
    print(
        f"{'backend':8s} {'lin fwd':>9s} {'lin grad':>9s} {'mem fwd':>9s} {'mem grad':>9s} "
        f"{'logits':>9s} {'step':>9s} {'lin T=' + str(long_length):>11s} "
        f"{'mem T=' + str(long_length):>11s}"
    )
    for info in backends.available():
        if not info.runs or (names and info.name not in names):
            continue
        ops = backends.get(info.name)
        A = ops.asarray
        row = [err(ops.to_numpy(ops.linear_scan(A(a), A(b))), sequential.linear_scan(NP, a, b))]
        d_h = rng.normal(size=b.shape) + 1j * rng.normal(size=b.shape)
        if ops.trainable:
            # each lambda is called at once, in its own iteration: no late binding
            _, g = ops.value_and_grad(
                lambda p: ops.sum(ops.real(ops.linear_scan(p["a"], p["b"]) * A(np.conj(d_h))))  # noqa: B023
            )({"a": A(a), "b": A(b)})
            want = linear_scan_vjp(a, b, None, d_h)
            row.append(max(err(ops.to_numpy(g["a"]), want[0]), err(ops.to_numpy(g["b"]), want[1])))
        else:
            row.append(float("nan"))
        reads, _ = ops.memory_scan_read(**{k: A(v) for k, v in mem.items()})
        ref_reads, _ = sequential.memory_scan_states(NP, **mem)
        row.append(err(ops.to_numpy(reads), ref_reads))
        if ops.trainable:
            d_r = rng.normal(size=ref_reads.shape)
            _, g = ops.value_and_grad(
                lambda p: ops.sum(ops.memory_scan_read(**p)[0] * A(d_r))  # noqa: B023
            )({k: A(v) for k, v in mem.items()})
            want = memory_scan_read_vjp(m0=None, d_read=d_r, **mem)
            row.append(max(err(ops.to_numpy(g[k]), want[k]) for k in mem))
        else:
            row.append(float("nan"))
        model = PNTM(config, ops)
        native = model.params_from_numpy(params)
        row.append(err(ops.to_numpy(model.forward(native, A(tokens), 41)), ref_logits))
        state, stepped = model.init_state(2, 41), []
        for t in range(40):
            logits, state = model.step(native, state, A(tokens[:, t]))
            stepped.append(ops.to_numpy(logits))
        row.append(err(np.stack(stepped, 1), ref_logits))
        row.append(
            err(
                ops.to_numpy(ops.linear_scan(A(long_a), A(long_b))),
                sequential.linear_scan(NP, long_a, long_b),
            )
        )
        long_reads, _ = ops.memory_scan_read(**{k: A(v) for k, v in long_mem.items()})
        row.append(err(ops.to_numpy(long_reads), sequential.memory_scan_states(NP, **long_mem)[0]))
        print(f"{info.name:8s} " + " ".join(f"{x:9.1e}" for x in row[:6]), end=" ")
        print(" ".join(f"{x:11.1e}" for x in row[6:]))


if __name__ == "__main__":
    main()
