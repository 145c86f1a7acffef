"""``python -m pntm``: the ``pntm`` command line."""

from pntm.cli import main

main(prog_name="pntm")
