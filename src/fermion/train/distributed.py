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

# train.compile: auto on a CPU, from bench/compile_payback.py (bench/RESULTS.md, 2-core AMD EPYC). Compiling pays
# when the run's eager time x (1 - 1/speedup) exceeds the compile time. Both scale with the CPU's speed, so the cost
# is kept in FLOPs: the cold compile time times the eager FLOP/s, 7.2e12 and 7.7e12 for the demo's 6-layer and a
# 10M 8-layer model (43-48 s of compiling). In bf16 (CPUs with AVX512-BF16) the compiled step measured 1.21-1.55x
# faster; in fp32 (CPUs without it, imitated with AVX2 kernels) 1.13x at the demo's size and 0.93x at 10M: no
# dependable gain, so auto leaves fp32 CPU runs eager.
CPU_COMPILE_COST_FLOPS = 7.5e12
CPU_BF16_COMPILE_SPEEDUP = 1.25


def compile_decision(cfg: TrainConfig, info: DistInfo, precision: str, run_flops: float) -> tuple[bool, str]:
    """Whether to compile, and why in a few words (the plan line says it). `run_flops`: the training FLOPs of the
    whole run on one process. On a GPU `auto` compiles; on a CPU when the run is long enough to repay it."""
    if cfg.compile is False:
        return False, "train.compile false"
    if not can_compile(info.device):
        return False, "no C++ compiler for torch.compile on CPU"
    if cfg.compile is True:
        return True, "train.compile true"
    if info.device.type != "cpu":
        return True, "compile auto on a GPU"
    if precision != "bf16":
        return False, "compile auto: in fp32 a CPU gains too little from it"
    saved = run_flops * (1 - 1 / CPU_BF16_COMPILE_SPEEDUP)
    verdict = "repays" if saved > CPU_COMPILE_COST_FLOPS else "would not repay"
    return saved > CPU_COMPILE_COST_FLOPS, f"compile auto: the run {verdict} compiling " \
        f"({saved / CPU_COMPILE_COST_FLOPS:.1f}x its cost)"


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
