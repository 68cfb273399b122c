"""One process or many, on the same code path: torch.distributed when a launcher (torchrun) started us.

`init_distributed` reads the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and joins the process group: gloo on CPU, nccl on CUDA. Without those variables it returns the single-process
`Dist()`, and every helper here is then a no-op, so library code calls them unconditionally.

    torchrun --standalone --nproc_per_node=2 -m dppmg stage1 configs/default.yaml            # one machine
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500 --nproc_per_node=8 -m dppmg stage1 ...  # two
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dppmg.errors import DppmgError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: `rank` in [0, `world`); rank 0 writes the outputs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True when a launcher asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | torch.device = "cpu") -> Dist:
    """Join the process group torchrun describes (once per process); `Dist()` when there is none."""
    if not launched():
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        except (RuntimeError, ValueError) as e:
            raise DppmgError(
                f"cannot join the process group (rank {rank} of {world}): {e}. Start many processes with "
                "torchrun, e.g. `torchrun --standalone --nproc_per_node=2 -m dppmg stage1 CONFIG`"
            ) from None
    return Dist(rank, world, local_rank)


def barrier(d: Dist) -> None:
    """Wait until every process gets here (rank 0 finished writing what the others read next)."""
    if d.active:
        dist.barrier()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's value of `flag`, on every process."""
    if not d.active:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
