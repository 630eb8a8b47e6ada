"""Foundations every stage uses: the project's exceptions, config dataclasses and constants, atomic writes,
hardware facts, counter-based random streams and the Numba helpers the kernels share."""
