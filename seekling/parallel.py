"""Data parallelism, applied after the model is built and kept apart from it (as torchtitan keeps
`parallelize.py`): the torchrun process group (gloo on CPU, NCCL on GPU), the DDP or FSDP2 wrap, and
the few collectives the trainers use. In one process (no torchrun) every helper here is a no-op.

    torchrun --nproc_per_node=2 -m seekling.cli pretrain --data runs/data --out runs/pt --distributed fsdp
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from seekling.errors import ConfigError, check_choice


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (gloo on CPU, NCCL on
    GPU). Without torchrun it is one process on `device` (default: cuda when available, else cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but torch sees no GPU")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def destroy_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_model(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """Data parallelism applied after the model is built (and weights loaded): DDP, or FSDP2
    `fully_shard` on each block and MTP module, then on the root. A no-op in one process."""
    check_choice(mode, ("ddp", "fsdp"), "--distributed mode")
    if info.world_size == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The routing bias is a buffer every rank updates identically from the all-reduced load, so
        # there is nothing to broadcast before each forward.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, **no_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # The MTP module's block only: its shared_head.norm runs outside the module's forward, so it stays
    # with the root (unsharded for the whole root forward).
    blocks = list(getattr(model, "layers", [])) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 DTensor gathered from every rank (a collective), any other as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without backward (an evaluation);
    shard them again so the registered parameters are the ones the optimiser holds. No-op otherwise."""
    if hasattr(model, "reshard"):
        model.reshard()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module with the model's own parameter names (DDP keeps it in `.module`)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last of a gradient-accumulation step."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
