"""One process or many, on the same code path: accelerate's process state when a launcher started us.

`init_distributed` builds `Dist` from `accelerate.PartialState`, which reads what torchrun or `accelerate launch`
set (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group: gloo on CPU, nccl on
CUDA. accelerate 1.16 takes a CPU run for a multi-process one only when asked for the CPU (`PartialState(cpu=True)`,
then `DistributedType.MULTI_CPU`); without it, a CPU-only machine under torchrun would give every process a world
of one. Without a launcher every helper here is a no-op, so library code calls them unconditionally, and one
process computes exactly what it computed before there were helpers.

    torchrun --standalone --nproc_per_node=2 -m dppmg stage1 configs/default.yaml            # one machine
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500 --nproc_per_node=8 -m dppmg stage1 ...  # two

Stage 1 trains through torch's DistributedDataParallel on the process group accelerate joined; stage 2 splits its
pairs across processes and combines with `gather`, `sum_across`, `all_agree` and `sum_gradients` (README, "Many
processes and machines").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

from dppmg.device import resolve_device
from dppmg.errors import DppmgError

T = TypeVar("T")


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

    def shard(self, n: int) -> list[int]:
        """This process's rows of n: every world-th from its rank (all of them on one process)."""
        return list(range(self.rank, n, self.world))


SINGLE = Dist()  # one process: the default of every `dist` argument


def launched() -> bool:
    """True when a launcher asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | torch.device = "cpu") -> Dist:
    """Join the process group the launcher describes (once per process); `Dist()` when there is none."""
    if not launched():
        return SINGLE
    cuda = resolve_device(device).type == "cuda"
    try:
        state = PartialState(cpu=not cuda)
    except (RuntimeError, ValueError) as e:
        raise DppmgError(
            f"cannot join the process group (rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}): "
            f"{e}. Start many processes with torchrun, e.g. "
            "`torchrun --standalone --nproc_per_node=2 -m dppmg stage1 CONFIG`"
        ) from None
    if state.num_processes < 2:
        raise DppmgError(
            f"the launcher asked for {os.environ['WORLD_SIZE']} processes but accelerate joined none "
            f"({state.distributed_type}); check the device ({device}) and the launcher's environment"
        )
    return Dist(state.process_index, state.num_processes, state.local_process_index)


def barrier(d: Dist) -> None:
    """Wait until every process gets here (rank 0 finished writing what the others read next)."""
    if d.active:
        PartialState().wait_for_everyone()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first, the others after it (they then find the caches it filled)."""
    if not d.active:
        yield
        return
    with PartialState().main_process_first():
        yield


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's value of `flag`, on every process."""
    if not d.active:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def all_agree(d: Dist, flag: bool) -> bool:
    """True on every process when `flag` is true on every process (a step is skipped everywhere or nowhere)."""
    if not d.active:
        return flag
    return not bool(reduce(torch.tensor([0.0 if flag else 1.0], device=_device()), "max").item())


def sum_across(d: Dist, values: Sequence[float]) -> list[float]:
    """The element-wise sums of `values` over the processes (float64); the values themselves on one process."""
    if not d.active:
        return list(values)
    return reduce(torch.tensor(list(values), dtype=torch.float64, device=_device()), "sum").tolist()


def gather(d: Dist, item: T) -> list[T]:
    """Every process's `item`, in rank order, on every process ([item] on one process)."""
    if not d.active:
        return [item]
    return gather_object([item])


def gather_rows(d: Dist, rows: Sequence[int], values: Sequence[Any], n: int) -> list[Any]:
    """The n values of a list split across processes, back in order: this process holds values[k] for row rows[k]."""
    if not d.active:
        return list(values)
    whole: list[Any] = [None] * n
    for part_rows, part in gather(d, (list(rows), list(values))):
        for r, v in zip(part_rows, part):
            whole[r] = v
    return whole


def sum_gradients(d: Dist, params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the processes, in place (a no-op on one process).

    Each process's loss is its share of the batch's loss (`share`), so the sum is the gradient of the whole batch.
    A parameter that has a gradient on some process gets zeros where it has none (an empty share of a minibatch),
    so every process joins the same all-reduce; one without a gradient anywhere keeps none, as on one process.
    """
    if not d.active:
        return
    present = reduce(torch.tensor([float(p.grad is not None) for p in params], device=_device()), "max")
    for p, has in zip(params, present.tolist()):
        if not has:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def check_replicas(d: Dist, params: Sequence[torch.Tensor], what: str) -> None:
    """Raise unless `params` are bitwise equal on every process (a cheap float64 checksum of each, gathered).

    Every process takes the same summed-gradient steps, so replicas stay equal; this catches a code path that
    lets them drift, which would otherwise only show as rank 0's outputs not matching a one-process run.
    """
    if not d.active:
        return
    mine = [float(p.detach().double().sum()) for p in params] + [
        float(p.detach().double().abs().sum()) for p in params
    ]
    sums = gather(d, mine)
    if any(other != sums[0] for other in sums):
        raise DppmgError(f"{what}: the trainable parameters differ between processes ({sums})")


def share(d: Dist, loss: torch.Tensor, weight: float, total: float) -> torch.Tensor:
    """This process's part of a batch mean: its own mean `loss` over `weight` of the batch's `total` units
    (rows or tokens), scaled so that the parts sum to the batch's mean. Unchanged on one process."""
    return loss * (weight / total) if d.active else loss


def _device() -> torch.device:
    """Where the collectives' own small tensors live: nccl reduces CUDA tensors only, gloo CPU ones."""
    return PartialState().device


def shutdown(d: Dist) -> None:
    if d.active and torch.distributed.is_initialized():
        PartialState().destroy_process_group()
