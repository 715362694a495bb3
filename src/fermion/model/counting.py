"""Exact parameter counts, FLOPs per token and memory predictions, all without allocating weights.

Parameters are counted on a model built on the meta device, so a 7B recipe costs nothing. FLOPs follow the
PaLM / nanoGPT convention used for MFU: 6 x (active matmul parameters, output head included, input embedding
excluded) + 12 x layers x heads x head_dim x attended tokens per token of training; a forward pass is a third.
`training_memory` predicts the peak memory of a training step per device (weights, gradients, AdamW, activations
under the chosen checkpointing, logits, DDP/FSDP buffers), `plan_memory` does it for a recipe on a device, and
`check_fits` refuses a plan that will not fit, naming the setting that would make it fit.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from fermion.config import ModelConfig, RecipeError
from fermion.device import resolve_cross_entropy, resolve_precision
from fermion.model.transformer import Transformer


@dataclass(frozen=True)
class ModelCounts:
    total_params: int
    active_params: int  # parameters that touch a token: all but the unrouted experts
    embedding_params: int  # the input embedding table (a lookup, no FLOPs)
    forward_flops_per_token: float
    train_flops_per_token: float


def count(cfg: ModelConfig, seq_len: int | None = None) -> ModelCounts:
    model = Transformer.build(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if cfg.moe:
        unused_share = 1 - cfg.moe.top_k / cfg.moe.n_experts
        expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("ffn.w_gate_up", "ffn.w_down")))
        inactive = round(expert * unused_share)
    active = total - inactive
    embedding = model.tok_emb.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    # With tied embeddings the table is also the output matmul, so it is counted once, as the head.
    matmul = active - norms - (0 if cfg.tie_embeddings else embedding)
    attended = min(seq_len or cfg.context_length, cfg.sliding_window or cfg.context_length)
    attention = 2 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * attended
    forward = 2 * matmul + 2 * attention
    return ModelCounts(total, active, embedding, float(forward), float(3 * forward))


# ------------------------------------------------------------------------------------------------------- memory
#
# The training-memory model follows what eager PyTorch allocates for one micro-step of fermion's trainer: fp32
# weights, fp32 gradients, AdamW's two fp32 moments, and what autograd saves for backward, tensor by tensor, for the
# transformer as written (RMSNorm computed in fp32, fused QKV, RoPE, SDPA with a fused kernel, SwiGLU or grouped
# experts, cross-entropy on fp32 logits). Under bf16 autocast the residual stream stays fp32 (the embedding and the
# additions are not autocast), matmul inputs and outputs are bf16, and the matmuls keep the bf16 copies of their
# weights for backward. The peak is the largest of the phases of a step in steady state (AdamW's moments exist from
# the first step on): the end of forward, the start of backward (the loss's [tokens, vocab] tensors), each block's
# backward as gradients accumulate while saved tensors are released, and the end of backward / the optimizer step.
# tests/test_memory.py checks it against peaks measured on CPU.

CHECKPOINTING = ("none", "selective", "full")
CE_CHUNK_TOKENS = 4096  # tokens per slice of the chunked cross-entropy (objectives.CHUNK_TOKENS)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device for one training micro-step. `peak` is the prediction. The parts are what each kind of
    tensor takes at its most; they overlap in time only partly (gradients grow as saved activations are released),
    so they add up to more than the peak."""

    weights: int  # fp32 parameters resident between steps (this device's shard under FSDP)
    gradients: int  # fp32 gradients once backward is done (this device's shard under FSDP)
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, fp32; Muon's one momentum for its matrices (sharded under FSDP)
    activations: int  # saved for backward at the most (start of backward), autocast's bf16 weight copies included
    logits: int  # the loss's [tokens, vocab] tensors at the start of backward (one chunk's when chunked)
    distributed: int = 0  # DDP's gradient buckets; FSDP's gathered parameters and unsharded gradients at the most
    peak: int = 0  # the predicted peak of a training step, everything included
    phase: str = ""  # where the peak falls: "forward", "backward" or "optimizer step"
    phases: dict[str, int] = field(default_factory=dict)  # each phase's peak, everything included

    @property
    def total(self) -> int:
        """The predicted peak (not the sum of the parts)."""
        return self.peak


@dataclass(frozen=True)
class _Params:
    """Parameter counts by role, from the meta-device model."""

    total: int
    block: int  # one transformer block
    attn_matmul: int  # one block's attention matmul weights (autocast makes bf16 copies of these)
    ffn_matmul: int  # one block's feed-forward (and router) matmul weights
    root: int  # outside the blocks: embedding, final norm, output layer
    head: int  # the output matmul (the embedding table when tied)


def _params(cfg: ModelConfig) -> _Params:
    model = Transformer.build(cfg)
    block = model.blocks[0]

    def matmul(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.ndim >= 2)

    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in block.parameters())
    return _Params(total, per_block, matmul(block.attn), matmul(block.ffn), total - cfg.n_layers * per_block,
                   cfg.vocab_size * cfg.d_model)


def _sublayers_saved_per_token(cfg: ModelConfig, a: int) -> tuple[int, int]:
    """Bytes autograd keeps per token for one block's attention and feed-forward sub-layers (each with its norm),
    without checkpointing; `a` is the size of a matmul activation (2 under bf16 autocast, 4 in fp32)."""
    d, hd, H, K = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.kv_heads
    # RMSNorm runs in fp32 and keeps its fp32 input (the residual stream), the normalised input and 1/rms.
    norm = 4 * d + 4 * d + 4
    attn = norm + a * d  # the QKV matmul's input
    qkv_kept = False
    if cfg.qk_norm:
        if a == 2:  # bf16 q/k go to fp32 for the norm: the fp32 copy and the normalised values are kept
            attn += 8 * (H + K) * hd + 4 * (H + K)
        else:  # fp32: the norm's input is a view of the QKV output, which stays alive whole
            attn += 4 * (H + K) * hd + 4 * (H + K)
            qkv_kept = True
    # SDPA keeps q, k, v (grouped-query K/V repeated to every head), its output (the output projection's input is a
    # view of it) and the fp32 log-sum-exp. RoPE keeps nothing of its own (cos and sin are buffers).
    attn += 2 * a * H * hd + 4 * H
    if K != H:
        attn += 2 * a * H * hd + (a * (H + 2 * K) * hd if qkv_kept else 0)
    else:  # k is the rotated copy; v is a view of the QKV output and keeps it whole
        attn += a * H * hd + a * (H + 2 * K) * hd
    F_ = cfg.ffn_hidden
    if cfg.moe:
        E, k = cfg.moe.n_experts, cfg.moe.top_k
        # The router's input and fp32 scores; per routed copy of a token: the gathered input, gate/up (silu keeps
        # it whole), silu(gate), the product, the expert's output and its weighted fp32 copy (index_add_'s source).
        ffn = norm + a * d + 12 * E + 24 * k + k * (2 * a * d + 4 * d + 4 * a * F_ + 24)
    else:  # SwiGLU: its input, the gate/up output (silu keeps it whole), silu(gate), the product
        ffn = norm + a * d + 4 * a * F_
    return attn, ffn


def _backward_transient_per_token(cfg: ModelConfig, a: int) -> int:
    """Gradients in flight inside one block's backward beyond what it saved: the residual stream's fp32 gradient
    and two gradients the width of the SwiGLU hidden layer (all routed copies: experts run grouped), or of q, k and v
    in attention if wider."""
    width = cfg.ffn_hidden * (cfg.moe.top_k if cfg.moe else 1)
    return 4 * cfg.d_model + max(2 * a * width, 3 * a * cfg.n_heads * cfg.dim_per_head)


def training_memory(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "bf16", *,
                    checkpointing: str = "none", cross_entropy: str = "full", world_size: int = 1,
                    distributed: str = "ddp", chunk_tokens: int = CE_CHUNK_TOKENS,
                    optimizer: str = "adamw") -> MemoryEstimate:
    """Predicted bytes on one device for a training micro-step of `batch` sequences of `seq_len` tokens: fp32
    weights and gradients, AdamW (two fp32 moments per parameter) or Muon (one fp32 momentum per parameter of the
    blocks' matrices, AdamW's two for the rest; its orthogonalisation's few copies of one matrix at a time are
    left out), eager mode.

    precision: "fp32" or "bf16" (autocast; "auto" counts as bf16). checkpointing (see transformer.py): "none" keeps
    all autograd saves; "selective" keeps each block's input and post-attention residual and recomputes one
    sub-layer at a time in backward; "full" keeps each block's input and recomputes a whole block at a time.
    cross_entropy: "full" materialises [tokens, vocab] fp32 logits; "chunked" `chunk_tokens` tokens at a time
    ("auto" counts as full: resolve it with the device first). With world_size > 1, "ddp" replicates everything
    and adds its gradient buckets; "fsdp" shards weights, gradients and AdamW state over the devices but gathers
    the root's parameters (embedding, output layer) for the whole step and two blocks' at a time.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}, not {checkpointing!r}")
    a = 4 if precision == "fp32" else 2
    autocast = a == 2
    p = _params(cfg)
    L, d, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    N = batch * seq_len
    fsdp = world_size > 1 and distributed == "fsdp"
    ddp = world_size > 1 and not fsdp
    shard = world_size if fsdp else 1

    # Between steps: fp32 weights and the optimizer's moments (sharded under FSDP); DDP's flat gradient buckets.
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be adamw or muon, not {optimizer!r}")
    router = cfg.moe.n_experts * d if cfg.moe else 0
    orthogonalised = L * (p.attn_matmul + p.ffn_matmul - router) if optimizer == "muon" else 0
    weights, optimizer = 4 * p.total // shard, (8 * p.total - 4 * orthogonalised) // shard
    buckets = 4 * p.total if ddp else 0

    # What one block saves, sub-layer by sub-layer, bf16 weight copies included. A sliding window wider than the
    # sequence needs no mask; otherwise each block builds and keeps a bool [T, T] one.
    attn_tok, ffn_tok = _sublayers_saved_per_token(cfg, a)
    mask = seq_len * seq_len if cfg.sliding_window and seq_len > cfg.sliding_window else 0
    attn_saved = N * attn_tok + mask + (2 * p.attn_matmul if autocast else 0)
    ffn_saved = N * ffn_tok + (2 * p.ffn_matmul if autocast else 0)
    block_saved = attn_saved + ffn_saved
    # Kept per block between its forward and backward, and at most alive in its backward besides the blocks below.
    if checkpointing == "none":
        kept, in_backward = block_saved, block_saved
    elif checkpointing == "selective":  # the block input and the post-attention residual (fp32 residual stream)
        kept = N * 2 * 4 * d
        in_backward = kept + max(attn_saved, ffn_saved)
    else:  # full: the block input
        kept = N * 4 * d
        in_backward = kept + block_saved
    weight_cache = L * 2 * (p.attn_matmul + p.ffn_matmul) if autocast and checkpointing != "none" else 0

    # After the blocks: the final norm, token ids and targets, and the loss. Full cross-entropy keeps the output
    # matmul's input (and its bf16 weight copy) and the fp32 log-softmax [N, V]; at the start of backward the
    # gradients w.r.t. it and w.r.t. the logits come beside it, 12 bytes per token per vocabulary entry (forward
    # peaks lower: 10 under autocast with the bf16 logits, 8 in fp32). Chunked keeps only the fp32 hidden states and
    # does the same one chunk at a time, recomputing the chunk's logits (and the output matmul's bf16 input and
    # weight copy) in backward.
    head_copy = 2 * p.head if autocast else 0
    final = N * (4 * d + 4 * d + 4 + 16)
    if cross_entropy == "chunked":
        C = min(N, chunk_tokens)
        final += N * 4 * d
        logits_forward = (10 if autocast else 8) * C * V + head_copy
        logits = 12 * C * V + a * C * d + head_copy
    else:
        final += N * a * d + head_copy
        logits_forward = (10 if autocast else 8) * N * V
        logits = 12 * N * V

    # FSDP's working set: the root's parameters stay gathered through forward and backward; blocks are gathered two
    # at a time (the one computing and the one prefetched), and in backward a block's unsharded gradients and the
    # reduce-scatter buffer come on top. The root's gradients stay unsharded until the end of backward.
    gathered = 4 * (p.root - p.root // shard) + 2 * 4 * p.block if fsdp else 0
    gathered_backward = gathered + 2 * 4 * p.block if fsdp else 0
    transient = N * _backward_transient_per_token(cfg, a)

    phases = {"forward": L * kept + weight_cache + final + logits_forward + gathered}
    backward = L * kept + final + logits + gathered_backward
    for i in reversed(range(L)):  # block i's backward: blocks below keep theirs, the root's and later grads exist
        grads = 4 * p.root + (L - 1 - i) * 4 * p.block // shard
        backward = max(backward, i * kept + in_backward + N * 16 + grads + transient + gathered_backward)
    phases["backward"] = backward
    # End of backward and the optimizer step: every gradient (tied embeddings: the embedding's own gradient and its
    # sum with the output layer's are two more [vocab, d] buffers for a moment); fused AdamW needs no temporaries.
    gradients = 4 * p.total // shard
    phases["optimizer step"] = gradients + (8 * p.head if cfg.tie_embeddings else 0) \
        + (4 * (p.root - p.root // shard) if fsdp else 0)
    persistent = weights + optimizer + buckets
    phases = {name: persistent + value for name, value in phases.items()}
    phase = max(phases, key=phases.get)
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optimizer,
        activations=max(L * kept + final, (L - 1) * kept + in_backward + N * 16),
        logits=logits,
        distributed=buckets or gathered_backward,
        peak=phases[phase], phase=phase, phases=phases,
    )


# Memory of common accelerators in GiB, as the driver reports it (a little under the marketed size).
DEVICE_MEMORY_GIB = {
    "h200": 140.4, "h100": 79.2, "h100-80gb": 79.2, "a100": 79.2, "a100-80gb": 79.2, "a100-40gb": 39.4,
    "l40s": 44.4, "l4": 22.0, "a10g": 22.0, "rtx4090": 23.6, "rtx3090": 23.6, "v100": 15.8, "v100-32gb": 31.7,
    "t4": 14.6, "rtx-pro-6000": 95.0,  # the RTX PRO 6000 Blackwell's 96 GB, less the driver's share (approximate)
}
NO_BF16 = {"v100", "v100-32gb", "t4"}  # pre-Ampere: precision auto trains them in fp32
CUDA_RESERVE = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces: device memory the allocator does not count
ALLOCATOR_SLACK = 0.10  # fragmentation in PyTorch's caching allocator, on top of the predicted allocations


@dataclass(frozen=True)
class MemoryPlan:
    """A recipe's training step on a device: the settings it resolves to, the estimate, and whether it fits."""

    estimate: MemoryEstimate
    device: str  # "cpu", "cuda" or an accelerator's name from DEVICE_MEMORY_GIB
    device_type: str  # "cpu" or "cuda"
    device_memory: int | None  # bytes, when known
    world_size: int
    distributed: str
    micro_batch: int
    seq_len: int
    precision: str  # resolved: fp32 or bf16
    checkpointing: str
    cross_entropy: str  # resolved: full or chunked
    compiled: bool = False  # train.compile: the estimate is eager PyTorch's; compiled steps usually keep less

    @property
    def needed(self) -> int:
        """The peak with the device's own overheads: allocator fragmentation and the CUDA context on GPUs."""
        if self.device_type == "cuda":
            return round(self.estimate.peak * (1 + ALLOCATOR_SLACK)) + CUDA_RESERVE
        return self.estimate.peak

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.needed <= self.device_memory


def resolve_device(device: str | None, configured: str = "auto") -> tuple[str, str, int | None]:
    """--device (None: the recipe's train.device) -> (name, "cpu" or "cuda", memory in bytes or None)."""
    name = (device or configured).lower().removeprefix("nvidia-").replace(" ", "")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = None
        return "cpu", "cpu", memory
    if name == "cuda":
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), "cuda", torch.cuda.get_device_properties(0).total_memory
        return "cuda", "cuda", None
    if name in DEVICE_MEMORY_GIB:
        return name, "cuda", round(DEVICE_MEMORY_GIB[name] * 2**30)
    raise ValueError(f"unknown device {device!r}: use cpu, cuda or one of {', '.join(DEVICE_MEMORY_GIB)}")


def plan_memory(recipe, device: str | None = None, world_size: int = 1, micro_batch: int | None = None,
                checkpointing: str | None = None, device_memory_gib: float | None = None,
                train=None) -> MemoryPlan:
    """Predicted peak training memory per device for a recipe (its `train` section unless another is given, such as
    a continued stage's or sft.train), with its precision and cross-entropy "auto" settings resolved for the device
    as the trainer would."""
    train = train or recipe.train
    seq_len = train.seq_len or recipe.model.context_length
    name, device_type, memory = resolve_device(device, train.device)
    if device_memory_gib is not None:
        memory = round(device_memory_gib * 2**30)
    precision = train.precision
    if precision == "auto":
        if device_type == "cuda":
            precision = "fp32" if name in NO_BF16 else "bf16"
        else:
            precision = resolve_precision("auto", torch.device("cpu"))
    cross_entropy = resolve_cross_entropy(getattr(train, "cross_entropy", "full"), torch.device(device_type))
    checkpointing = checkpointing or getattr(train, "activation_checkpointing", "none")
    micro_batch = micro_batch or train.micro_batch_size
    distributed = train.distributed
    estimate = training_memory(recipe.model, micro_batch, seq_len, precision, checkpointing=checkpointing,
                               cross_entropy=cross_entropy, world_size=world_size, distributed=distributed,
                               optimizer=getattr(train, "optimizer", "adamw"))
    return MemoryPlan(estimate, name, device_type, memory, world_size, distributed, micro_batch, seq_len,
                      precision, checkpointing, cross_entropy,
                      train.compile is True or (train.compile == "auto" and device_type == "cuda"))


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


def _remedies(train, world_size: int) -> list[dict]:
    """Settings of a train section that lower the peak: more activation checkpointing at the same micro-batch, then
    halved micro-batches (grad_accum raised to keep the batch) with each checkpointing level; FSDP where DDP
    replicates the model on every device."""
    levels = CHECKPOINTING[CHECKPOINTING.index(train.activation_checkpointing):]
    remedies = [{"activation_checkpointing": level} for level in levels[1:]]
    size = train.micro_batch_size
    while size > 1:
        size //= 2
        remedies += [{"micro_batch_size": size}]
        remedies += [{"activation_checkpointing": level, "micro_batch_size": size} for level in levels[1:]]
    if train.distributed == "ddp" and world_size > 1:
        remedies += [{"distributed": "fsdp"}, {"distributed": "fsdp", "activation_checkpointing": "full"}]
    return remedies


def fit_problem(recipe, device: str | None = None, world_size: int = 1, train=None,
                section: str = "train") -> str | None:
    """None when a training step of the recipe (`train`: another of its train sections, named `section` in the
    message) fits the device, or its memory is unknown; else one line: the memory needed against the device's, and
    the first setting that would fit. The prediction is `plan_memory`'s, as `fermion model info` shows it."""
    train = train or recipe.train
    plan = plan_memory(recipe, device, world_size, train=train)
    if plan.fits is not False:
        return None
    devices = f"{plan.world_size} × {plan.device}" if plan.world_size > 1 else plan.device
    line = (f"{section}: a training step needs {_gib(plan.needed)} per device and the {devices} has "
            f"{_gib(plan.device_memory)} (fermion model info's prediction, allocator slack included)")
    for change in _remedies(train, world_size):
        fixed = plan_memory(recipe, device, world_size, train=train.model_copy(update=change))
        if fixed.fits:
            settings = ", ".join(f"{section}.{key}: {value}" for key, value in change.items())
            keep = " (raise grad_accum to keep the batch)" if "micro_batch_size" in change else ""
            return f"{line}; set {settings}{keep}, which needs {_gib(fixed.needed)}"
    return f"{line}; no checkpointing or micro-batch setting fits it: train on more devices with FSDP, or larger ones"


def check_fits(recipe, device: str | None = None, world_size: int = 1, train=None, section: str = "train") -> None:
    """Raise RecipeError (the line `fit_problem` writes) when the training step will not fit the device."""
    problem = fit_problem(recipe, device, world_size, train, section)
    if problem is not None:
        raise RecipeError(problem)


def inference_memory(cfg: ModelConfig, batch: int = 1, bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes for bf16 weights plus a full-context KV cache."""
    counts = count(cfg)
    window = min(cfg.context_length, cfg.sliding_window or cfg.context_length)
    kv_cache = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * window * batch * bytes_per_value
    weights = counts.total_params * bytes_per_value
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}


def allocation_peak(profiler) -> int:
    """The highest net CPU allocation (bytes above what was held when profiling began) that a finished
    `torch.profiler.profile(profile_memory=True)` saw: the running sum of its allocation and free events, in time
    order: the measured counterpart of `training_memory` (tests/test_memory.py, bench/train_throughput.py)."""
    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.alloc_size))
    if not events:
        raise RuntimeError("the profiler recorded no allocations; profile with profile_memory=True")
    held = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        held += size
        peak = max(peak, held)
    return peak


def as_record(counts, plan: MemoryPlan, inference: dict, sized) -> dict:
    """`fermion model info --json`: the counts, the predicted training memory and setup, inference memory, and what
    model.depth derived (None without it)."""
    mem = plan.estimate
    return {"total_params": counts.total_params, "active_params": counts.active_params,
            "embedding_params": counts.embedding_params, "forward_flops_per_token": counts.forward_flops_per_token,
            "train_flops_per_token": counts.train_flops_per_token, "train_memory_bytes": mem.peak,
            "inference_memory_bytes": inference["total"],
            "train_memory": {"weights": mem.weights, "gradients": mem.gradients, "optimizer": mem.optimizer,
                             "activations": mem.activations, "logits": mem.logits, "distributed": mem.distributed,
                             "peak": mem.peak, "peak_phase": mem.phase, "phases": mem.phases, "needed": plan.needed},
            "train_setup": {"device": plan.device, "device_type": plan.device_type,
                            "device_memory_bytes": plan.device_memory, "fits": plan.fits,
                            "world_size": plan.world_size, "distributed": plan.distributed,
                            "micro_batch": plan.micro_batch, "seq_len": plan.seq_len, "precision": plan.precision,
                            "checkpointing": plan.checkpointing, "cross_entropy": plan.cross_entropy,
                            "compiled": plan.compiled},
            "depth_sizing": dataclasses.asdict(sized) if sized else None}
