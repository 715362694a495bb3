"""Where a process runs and what "auto" means there: the device, the process group a torchrun launch joins, and
the resolvers that turn each "auto" setting (precision, inference dtype, attention, cross-entropy) into a choice.
Every stage asks these, so a setting means the same thing in training, evaluation, export and serving."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

ATTENTION_MODES = ("sdpa", "flex")  # see Transformer.set_attention
CROSS_ENTROPY_MODES = ("full", "chunked")


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


def all_gather_object(obj, info: DistInfo) -> list:
    """Every process's `obj`, in rank order (a list of one in a single process)."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the device computes it natively (as training's precision: auto), else fp32."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype != "auto" and dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
    return names[resolve_precision(dtype, device)] if dtype == "auto" else names[dtype]


def resolve_attention(setting: str, device: torch.device) -> str:
    """train.attention -> the mode for Transformer.set_attention. auto: FlexAttention on CUDA (where it runs as
    Triton kernels, forward and backward), SDPA elsewhere. FlexAttention has no backward on CPU (PyTorch <= 2.13
    at least), so training with "flex" there is refused up front rather than at the first backward."""
    device = torch.device(device)
    if setting == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if setting == "flex" and device.type == "cpu":
        raise ValueError(f"train.attention=flex needs a GPU: FlexAttention has no backward on CPU in PyTorch "
                         f"{torch.__version__}; use sdpa (or auto)")
    if setting not in ATTENTION_MODES:
        raise ValueError(f"attention {setting!r} is not one of auto, {', '.join(ATTENTION_MODES)}")
    return setting


def resolve_cross_entropy(setting: str, device: torch.device) -> str:
    """train.cross_entropy -> "full" or "chunked": auto is chunked on CUDA (where memory binds), full elsewhere."""
    if setting == "auto":
        return "chunked" if device.type == "cuda" else "full"
    if setting not in CROSS_ENTROPY_MODES:
        raise ValueError(f"cross_entropy {setting!r} is not one of auto, full, chunked")
    return setting
