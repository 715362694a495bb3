"""One dial for the size of a run: `model.depth: N` gives the model's shape and, for pretraining, its learning rate,
batch size and number of tokens. Every derived field can still be set in the recipe, and then that value is used.

The shape (nanochat's rule: the width grows with the depth at a fixed aspect ratio):
    n_layers = N, d_model = 64 N, n_heads = N (64-wide heads) and as many KV heads (plain multi-head attention),
    ffn_hidden = 8/3 d_model rounded up to a multiple of 64 (Llama's SwiGLU width for a 4 d_model budget).

The training (DeepSeek LLM, Bi et al. 2024, section 3: power laws fitted on compute budgets from 1e17 to 3e20
FLOPs, extrapolated here to smaller ones), with M the non-embedding FLOPs per token as that paper counts them,
M = 72 n_layers d_model^2 + 6 n_layers d_model seq_len, and C = M D the compute of D tokens:
    the model is compute-optimal for C with M = 0.1715 C^0.5243, so C = (M / 0.1715)^(1 / 0.5243) and D = C / M;
    batch B = 0.2920 C^0.3271 tokens (rounded to whole sequences); learning rate = 0.3118 C^-0.1250.
Muon takes the same learning rate (its update is scaled to AdamW's RMS, see train/muon.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HEAD_DIM = 64
MAX_MICRO_BATCH = 16  # sequences per micro-step when the batch is derived; more goes to gradient accumulation


def shape(depth: int) -> dict:
    """The model fields `depth` derives."""
    d_model = HEAD_DIM * depth
    return {"n_layers": depth, "d_model": d_model, "n_heads": depth,  # n_kv_heads left unset: as many as n_heads
            "ffn_hidden": math.ceil(8 * d_model / 3 / 64) * 64}


@dataclass(frozen=True)
class Sizing:
    flops_per_token: float  # M, non-embedding
    compute: float  # C, FLOPs
    tokens: int  # D
    batch_tokens: float  # B before rounding to sequences
    lr: float
    batch: int  # sequences per optimizer step (B rounded)
    micro_batch_size: int
    grad_accum: int
    steps: int
    warmup_steps: int

    def describe(self) -> str:
        return (f"compute-optimal for {self.compute:.2e} FLOPs (DeepSeek LLM's fits): {self.tokens:,} tokens, "
                f"batch {self.batch} sequences ({self.micro_batch_size} × {self.grad_accum} accumulation), "
                f"{self.steps:,} steps, lr {self.lr:.2e}, warmup {self.warmup_steps}")


def training(n_layers: int, d_model: int, seq_len: int) -> Sizing:
    """The pretraining settings the rule above gives a model of this shape."""
    m = 72 * n_layers * d_model**2 + 6 * n_layers * d_model * seq_len
    compute = (m / 0.1715) ** (1 / 0.5243)
    tokens = compute / m
    batch_tokens = 0.2920 * compute**0.3271
    batch = max(1, round(batch_tokens / seq_len))
    grad_accum = math.ceil(batch / MAX_MICRO_BATCH)
    micro = math.ceil(batch / grad_accum)
    steps = max(1, math.ceil(tokens / (micro * grad_accum * seq_len)))
    return Sizing(float(m), compute, round(tokens), batch_tokens, 0.3118 * compute**-0.125, micro * grad_accum,
                  micro, grad_accum, steps, default_warmup(steps))


def default_warmup(steps: int) -> int:
    """train.warmup_steps when a recipe leaves it out, sized by depth or not: a tenth of the run, at most 100 steps
    and at least 1."""
    return min(100, max(1, steps // 10))


def fill_train(model: dict, train: dict, seq_len: int) -> dict:
    """`train` with the derived settings in every field it does not set (a given micro_batch_size keeps the
    batch by setting grad_accum; a given steps or epochs keeps its length). The warmup follows from the steps
    as in any recipe (default_warmup)."""
    sizing = training(model["n_layers"], model["d_model"], seq_len)
    derived = {"lr": sizing.lr, "micro_batch_size": sizing.micro_batch_size, "grad_accum": sizing.grad_accum}
    if "micro_batch_size" in train and "grad_accum" not in train:
        derived["grad_accum"] = max(1, round(sizing.batch / train["micro_batch_size"]))
    if "epochs" not in train:
        batch = train.get("micro_batch_size", derived["micro_batch_size"]) * \
            train.get("grad_accum", derived["grad_accum"])
        derived["steps"] = max(1, math.ceil(sizing.tokens / (batch * seq_len)))
    return {**derived, **train}
