"""How a model is made ready to train on the devices at hand, kept apart from the training loop: `parallelize`
applies activation checkpointing, compile and DDP/FSDP2 wrapping in that order (torchtitan's `parallelize` is the
model); the process group itself is joined in fermion.device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fermion.config import TrainConfig
from fermion.device import DistInfo, can_compile, resolve_attention, resolve_cross_entropy
from fermion.model.transformer import Transformer
from fermion.train.objectives import Objective

# train.compile: auto on CPU (bench/compile_payback.py measures both; see bench/RESULTS.md). Compiling pays when
# the run's eager time x (1 - 1/speedup) exceeds the compile time. Both scale with the CPU's speed, so the rule is
# kept in FLOPs: the compile time of a cold cache expressed as the training FLOPs an eager step does meanwhile,
# per layer (the compiled graph grows with the layers), and the steady speedup.
CPU_COMPILE_SPEEDUP = 1.15
CPU_COMPILE_FLOPS_PER_LAYER = 2.6e11


def compile_decision(cfg: TrainConfig, info: DistInfo, n_layers: int, run_flops: float) -> tuple[bool, str]:
    """Whether to compile, and why in a few words (the plan line says it). `run_flops`: the training FLOPs of the
    whole run on one process. On CUDA `auto` compiles; on CPU when the run is long enough to repay the compile."""
    if cfg.compile is False:
        return False, "train.compile false"
    if not can_compile(info.device):
        return False, "no C++ compiler for torch.compile on CPU"
    if cfg.compile is True:
        return True, "train.compile true"
    if info.device.type != "cpu":
        return True, "compile auto on a GPU"
    saved = run_flops * (1 - 1 / CPU_COMPILE_SPEEDUP)
    cost = CPU_COMPILE_FLOPS_PER_LAYER * n_layers
    verdict = "repays" if saved > cost else "would not repay"
    return saved > cost, f"compile auto: the run {verdict} compiling ({saved / cost:.1f}x its cost)"


def parallelize(model: Transformer, objective: Objective, cfg: TrainConfig, info: DistInfo, precision: str,
                warn: Callable[[str], None], compile: bool) -> tuple[nn.Module, Callable, bool]:
    """(the model to train, wrapped for `info`'s processes; the loss function the loop calls as loss(model, batch);
    whether it is compiled, as `compile` (compile_decision) says). In this order, each seeing what the one before
    set: the memory settings (activation checkpointing, the attention kernel, cross-entropy), then torch.compile,
    then DDP or FSDP2."""
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    model.set_attention(resolve_attention(cfg.attention, info.device))
    objective.set_cross_entropy(resolve_cross_entropy(cfg.cross_entropy, info.device))
    compiled = compile
    if cfg.compile is True and not can_compile(info.device):
        warn("train.compile needs a C++ compiler on CPU and none was found; training in eager mode")
    loss_fn = objective.loss
    if compiled and info.distributed and cfg.distributed == "fsdp":
        for block in model.blocks:
            block.compile()  # per block before sharding (torchtitan); parameter names stay unchanged
    elif compiled:
        # The loss with the model inside: one graph from embeddings to cross-entropy lets the compiler fuse the
        # norms, rotary embeddings, SwiGLU and the loss (1.2x over compiling the model alone on CPU).
        loss_fn = torch.compile(objective.loss)
    return wrap(model, cfg.distributed, info, precision), loss_fn, compiled


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
