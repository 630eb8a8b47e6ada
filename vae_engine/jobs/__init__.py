"""Batch jobs over items (encode, decode, reconstruct, sample, score, detect, evaluate), local and on Ray Data,
and their output writers."""
