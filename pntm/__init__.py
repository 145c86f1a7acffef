"""Parallelizable Neural Turing Machines: scan-parallel training, constant-time decoding."""

__version__ = "0.1.0"
