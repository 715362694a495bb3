"""Model wrapping for many processes (DDP or FSDP2), kept apart from the training loop; the process group itself
is joined in fermion.device."""

from __future__ import annotations

import torch
from torch import nn

from fermion.device import DistInfo


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
