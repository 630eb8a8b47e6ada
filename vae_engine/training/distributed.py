"""Multi-process training under torchrun: process-group set-up and the rank helpers the trainer uses.

`torchrun --nproc-per-node N -m vae_engine train ...` sets RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR; a plain
`vae-engine train` is world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    local_rank: int = 0  # this process's index on its machine: its GPU when training on CUDA

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, metrics and plots."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def from_env() -> World:
    """The world torchrun describes in the environment (size 1 without torchrun)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: str = "cpu") -> None:
    """Join the process group: nccl when training on CUDA GPUs, gloo on CPUs (even where a GPU is present: nccl
    cannot reduce CPU tensors)."""
    if world.size > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
