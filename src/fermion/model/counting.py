"""Exact parameter counts, FLOPs per token and a memory estimate, all without allocating weights.

Parameters are counted on a model built on the meta device, so a 7B recipe costs nothing. FLOPs follow the
PaLM / nanoGPT convention used for MFU: 6 x (active matmul parameters, output head included, input embedding
excluded) + 12 x layers x heads x head_dim x attended tokens per token of training; a forward pass is a third.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fermion.config import ModelConfig
from fermion.model.transformer import Transformer


@dataclass(frozen=True)
class ModelCounts:
    total_params: int
    active_params: int  # parameters that touch a token: all but the unrouted experts
    embedding_params: int  # the input embedding table (a lookup, no FLOPs)
    forward_flops_per_token: float
    train_flops_per_token: float


def build_on_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def count(cfg: ModelConfig, seq_len: int | None = None) -> ModelCounts:
    model = build_on_meta(cfg)
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


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def training_memory(cfg: ModelConfig, batch: int, seq_len: int, precision: str) -> MemoryEstimate:
    """Bytes on one device for plain (unsharded) training with AdamW and fp32 master weights.

    Activations count the tensors each block keeps for backward with a fused attention kernel (no T x T scores):
    norm inputs/outputs, the Q/K/V projections and their rotated copies, the attention output, the SwiGLU
    intermediates of the active experts; the logits and their gradient are kept in fp32.
    """
    counts = count(cfg, seq_len)
    act_bytes = 4 if precision == "fp32" else 2  # "auto" is bf16 on the accelerators this estimate is for
    d, hd, heads, kv = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.kv_heads
    ffn_active = cfg.ffn_hidden * (cfg.moe.top_k if cfg.moe else 1)
    per_token_layer = 4 * d + (heads + 2 * kv) * hd + 4 * heads * hd + 4 * ffn_active
    tokens = batch * seq_len
    return MemoryEstimate(
        weights=4 * counts.total_params,
        gradients=4 * counts.total_params,
        optimizer=8 * counts.total_params,
        activations=act_bytes * tokens * (cfg.n_layers * per_token_layer + 2 * d),
        logits=2 * 4 * tokens * cfg.vocab_size,
    )


def inference_memory(cfg: ModelConfig, batch: int = 1, bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes for bf16 weights plus a full-context KV cache."""
    counts = count(cfg)
    window = min(cfg.context_length, cfg.sliding_window or cfg.context_length)
    kv_cache = 2 * cfg.n_layers * cfg.kv_heads * cfg.dim_per_head * window * batch * bytes_per_value
    weights = counts.total_params * bytes_per_value
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache}
