"""Process groups, devices and model wrapping (DDP or FSDP2), kept apart from the training loop."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes bf16 where the device has native bf16 arithmetic, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def can_compile(device: torch.device) -> bool:
    """torch.compile needs a C++ compiler to generate CPU kernels (GPU kernels come from Triton)."""
    if device.type != "cpu":
        return True
    return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


def setup(preference: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()  # gloo aborts if a rank leaves while another still has collectives in flight
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce(value: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return value


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, mode: str, info: DistInfo, precision: str = "fp32") -> nn.Module:
    """DDP replicates the model; FSDP2 shards each block and then the rest (torchtitan's layout).

    `precision` is the resolved train precision. Under FSDP2 with bf16, each block's parameters are all-gathered
    and used in bf16 while the sharded fp32 parameters stay the optimizer's master weights, and gradients are
    reduce-scattered in fp32 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as torchtitan): half
    the all-gather traffic, no bf16 rounding of the summed gradients. The blocks' inputs are not cast
    (cast_forward_inputs=False) and the root (embeddings, final norm, output layer) keeps fp32 parameters, so the
    residual stream stays fp32 exactly as under autocast in one process; autocast makes every matmul bf16 anyway.
    Works on NCCL and on gloo (CPU)."""
    if not info.distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        block_options = {}
        if precision == "bf16":
            block_options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                              cast_forward_inputs=False)
        for block in model.blocks:
            fully_shard(block, **block_options)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
