"""Training: the loop (ELBO/IWAE/DReG, bf16 autocast, resume), DDP, and the figures of a run."""
