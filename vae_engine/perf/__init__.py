"""Measuring: the one timing recipe, this machine's GEMM peaks per precision, and the work (FLOPs, multiply-adds by
precision) a model or a path does."""
