"""Data-parallel training through torchrun: DistributedDataParallel over gloo (CPU) or nccl (GPU).

Every rank draws the same global batch from the same seeded generator and trains on its slice of it; the
contrastive loss is computed over the global batch (features gathered from all ranks), so the gradients equal
those of one process on the global batch. Activation counts are summed across ranks after every forward (so
the AGO masks and the merge at the end of a task agree with one process), and only rank 0 writes files. Launch: torchrun --nproc_per_node=N -m rank1_cl train ...
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from rank1_kernels import pool_layers


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_slice(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (equal slices, in rank order)."""
        if global_batch % self.world_size:
            raise ValueError(
                f"train.batch_size={global_batch} is not divisible by the {self.world_size} processes; expected a "
                f"multiple of the world size"
            )
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed(device: str = "cpu") -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); one process without it.
    gloo for CPU training, nccl for CUDA (each rank on cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )  # fmt: skip
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch.device(device))


def wrap_model(model: nn.Module, context: DistContext, find_unused_parameters: bool) -> nn.Module:
    """DDP around the model on more than one process; the model itself otherwise. Buffers are not broadcast:
    the activation counts are summed by synchronize_activation_counts() instead."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters
    )


def gather_with_local_grad(local: torch.Tensor, context: DistContext) -> torch.Tensor:
    """(world_size * n, ...) from every rank's (n, ...), in rank order; only this rank's rows carry gradient.
    Each rank's loss over the gathered batch then differentiates to its own rows' share; DDP averages the ranks'
    gradients, so the caller multiplies the loss by world_size to get the single-process gradient."""
    if not context.distributed:
        return local
    pieces = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(pieces, local.detach().contiguous())
    pieces[context.rank] = local
    return torch.cat(pieces)


def scale_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """`value` itself, whose gradient is multiplied by `factor` on the way back."""
    return value * factor + (value * (1.0 - factor)).detach()


def activation_counts_snapshot(model: nn.Module) -> list:
    """Every pool layer's activation_counts, copied: call before a forward, pass to synchronize_activation_counts."""
    return [layer.activation_counts.clone() for _, layer in pool_layers(model)]


def synchronize_activation_counts(model: nn.Module, before_forward: list, context: DistContext) -> None:
    """After a forward on each rank's slice: add up every rank's new expert choices (one all-reduce for all
    layers), so the counts on every rank are those of one process on the global batch. The AGO mask of the
    current step and the merge at the end of the task then agree across ranks and with a single-process run."""
    if not context.distributed:
        return
    layers = [layer for _, layer in pool_layers(model)]
    increments = torch.cat([layer.activation_counts - old for layer, old in zip(layers, before_forward)])
    dist.all_reduce(increments, op=dist.ReduceOp.SUM)
    for layer, old, increment in zip(layers, before_forward, increments.split([layer.r for layer in layers])):
        layer.activation_counts.copy_(old + increment)


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def shutdown(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()
