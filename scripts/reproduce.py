"""Reproduce the comparison: every model (P-NTM, NTM, LSTM, Transformer) on every task over
seeds, each with its recipe (the P-NTM's own; the peers with the P-NTM recipe's number of steps
and their own defaults), evaluated for length generalization as ``pntm eval`` does, written to
``docs/results.md`` with a plot. CPU-sized defaults; resumable: run it again after an
interruption and it continues (finished cells are read back, unfinished ones resume).

    python scripts/reproduce.py                       # all models x all tasks x seeds 0, 1, 2
    python scripts/reproduce.py --models lstm --tasks copy,parity --seeds 0

Any option of ``scripts/length_generalization.py`` may be given; these are the defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULTS = {
    "--grid": "runs/lengthgen",
    "--models": "all",
    "--tasks": "all",
    "--seeds": "0,1,2",
    "--results": "docs/results.md",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    # imported by name from its folder, so that the grid's worker processes (spawned) find the
    # functions they run under the same module name
    sys.path.insert(0, str(Path(__file__).parent))
    import length_generalization

    for flag, value in DEFAULTS.items():
        if flag not in given:
            argv += [flag, value]
    args = length_generalization.make_parser().parse_args(argv)
    departures = length_generalization.recipe_settings(args)
    if departures and "--results" not in given:
        # the committed report holds the recipes' results: a run of other settings does not
        # replace its rows unless --results names the report explicitly
        elsewhere = str(Path(args.grid) / "results.md")
        argv[argv.index("--results") + 1] = elsewhere
        print(
            f"settings other than the recipes' ({', '.join(departures)}): the report goes to "
            f"{elsewhere}, not {DEFAULTS['--results']} (pass --results to choose)",
            flush=True,
        )
    length_generalization.main(argv)


if __name__ == "__main__":
    main()
