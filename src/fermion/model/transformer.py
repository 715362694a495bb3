"""The decoder-only transformer, top to bottom.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU (or a
mixture of SwiGLU experts). Attention runs through `scaled_dot_product_attention`; sliding-window attention
(Mistral) adds a banded causal mask. Q/K/V and gate/up projections are each one fused matmul; export splits them.
The rotary convention is the "rotate half" one used by Hugging Face Llama, so exported weights need no permuting.

Packed documents and sliding windows need a mask: a dense one for SDPA, or (`Transformer.set_attention("flex")`)
one FlexAttention BlockMask per forward. The kernels and masks live in `model/attention.py`, and so does the
`KVCache`: decoding runs this same forward, with the cache as an argument (`Transformer.hidden(..., kv_cache=)`).

Activation checkpointing (`Transformer.set_activation_checkpointing`) trades compute for memory while training;
what each mode keeps between forward and backward, per block, is spelled out in `CHECKPOINTING_MODES`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from fermion.config import ModelConfig
from fermion.device import ATTENTION_MODES
from fermion.model.attention import KVCache, document_mask, flex, flex_block_mask, sdpa, sliding_window_mask
from fermion.model.moe import MoEFeedForward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Llama does, so bf16 runs and exports compute the same thing.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, head_dim], in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the KV cache's layers this one reads and writes
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(cfg.d_model, qkv_out, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # QK-norm (Qwen3, OLMo 2): RMSNorm over each head's query and key before the rotation.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d] -> rotated q [B, H, T, hd] and k, plus v [B, H_kv, T, hd]; cos/sin [T, hd] or [B, 1, T, hd]."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Causal attention when `mask` is None, else as the mask allows (it holds causality and any window); with
        a `cache` (decoding), over the keys and values the cache holds, this call's own included."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v)
        elif isinstance(mask, BlockMask):  # FlexAttention (Transformer.set_attention)
            y = flex(q, k, v, mask)
        else:
            y = sdpa(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up computed as one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up), x.new_zeros((), dtype=torch.float32)


class Block(nn.Module):
    checkpointing = "none"  # see CHECKPOINTING_MODES; set through Transformer.set_activation_checkpointing

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg) if cfg.moe else FeedForward(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask=None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        # Checkpointing lives inside forward so that FSDP2's per-block hooks (all-gather before forward and before
        # backward, where the recomputation runs) and per-block torch.compile wrap it as they wrap the block.
        mode = self.checkpointing if torch.is_grad_enabled() else "none"
        if mode == "full":
            return _checkpoint(self._layers, x, cos, sin, mask, cache)
        if mode == "selective":
            x = x + _checkpoint(self._attention, x, cos, sin, mask, cache)
            ffn_out, aux_loss = _checkpoint(self._feed_forward, x)
            return x + ffn_out, aux_loss
        return self._layers(x, cos, sin, mask, cache)

    def _layers(self, x, cos, sin, mask, cache) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self._attention(x, cos, sin, mask, cache)
        ffn_out, aux_loss = self._feed_forward(x)
        return x + ffn_out, aux_loss

    def _attention(self, x, cos, sin, mask, cache) -> torch.Tensor:
        return self.attn(self.attn_norm(x), cos, sin, mask, cache)

    def _feed_forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    attention = "sdpa"  # see ATTENTION_MODES; set through set_attention
    # True while tracing for export (ONNX): a trace keeps only the side of `T > window` it took, so the sliding
    # window is then a mask at every length (exact: the band equals plain causality when T <= window).
    mask_window_always = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim_per_head, cfg.context_length, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def build(cls, cfg: ModelConfig, device: torch.device | str = "meta", weights: dict | None = None,
              seed: int | None = None) -> Transformer:
        """The one way to make a model: built on the meta device (no memory, no init), and for any other device
        materialised there with `weights` (a state dict), a random init from `seed`, or, with neither, uninitialised
        parameters for the caller to load (the rotary tables are set in every case)."""
        with torch.device("meta"):
            model = cls(cfg)
        if torch.device(device).type == "meta":
            return model
        model.to_empty(device=device)
        if weights is not None:
            model.load_state_dict(weights)
        elif seed is not None:
            model.init_weights(torch.Generator(device).manual_seed(seed))
        model.reset_rope()
        return model

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) everywhere, residual outputs scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight", "w_down")):
                param.normal_(0.0, residual_std, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recompute the rotary tables (after building on the meta device and materialising)."""
        cos, sin = rope_tables(self.cfg.dim_per_head, self.cfg.context_length, self.cfg.rope_theta,
                               device=self.tok_emb.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute activations in backward to save memory: "none", "selective" or "full" (CHECKPOINTING_MODES
        says what each keeps). Applies to training forwards only (grad enabled); call before torch.compile and
        before wrapping with FSDP/DDP."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(CHECKPOINTING_MODES)}")
        for block in self.blocks:
            block.checkpointing = mode

    def set_attention(self, mode: str) -> None:
        """How masked attention runs (packed documents, sliding windows shorter than the sequence): "sdpa" (a dense
        boolean mask, which keeps SDPA off its flash kernels) or "flex" (FlexAttention with a BlockMask built once
        per forward; on CPU forwards only). Plain causal attention and explicit masks passed to `hidden` always
        use SDPA. Call before torch.compile; `device.resolve_attention` turns train.attention into a mode."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
        self.attention = mode

    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                *, head=None, kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] -> (logits [B, T, vocab], summed MoE auxiliary loss).

        Packed sequences pass `positions` (each document's own 0, 1, 2, ...) and `segments` (a document id per
        token): every document then sees only itself, exactly as if it were run alone.

        `head(model, hidden)` replaces the output layer: the result is (head(self, final hidden states), aux loss).
        The chunked cross-entropy uses it to meet the vocabulary a slice of tokens at a time; it runs inside this
        call so that FSDP's and DDP's hooks on the model see the output layer's use of the weights.

        `kv_cache` (decoding, with `positions`): the tokens continue the sequences the cache holds (`KVCache`).
        """
        x, aux_loss = self.hidden(idx, positions, segments, kv_cache=kv_cache)
        return (self.logits(x) if head is None else head(self, x)), aux_loss

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final normalised hidden states [B, T, d_model] (and the MoE auxiliary loss), before the output
        layer: for callers that need logits at a few positions only. An explicit boolean `mask` [B, 1, T, T]
        (with `positions`) lets a caller lay out any attention pattern, such as several continuations sharing one
        context in a row. With a `kv_cache` the tokens, at their `positions` [B, T], attend over the cache."""
        T = idx.shape[1]
        # With explicit positions a row may be longer than the context (several continuations sharing one prefix);
        # the caller keeps each position inside it. (Checking positions.max() here would stop torch.compile.)
        if positions is None and T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.cfg.context_length}")
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        if kv_cache is not None:
            kv_cache.begin(positions)  # the cache masks what each row may see
        elif mask is None:
            mask = self.attention_mask(T, segments, idx.device)
        x = self.tok_emb(idx)
        aux_loss = torch.zeros((), device=idx.device)
        for block in self.blocks:
            x, block_aux = block(x, cos, sin, mask, kv_cache)
            aux_loss = aux_loss + block_aux
        return self.norm(x), aux_loss

    def attention_mask(self, T: int, segments: torch.Tensor | None, device) -> torch.Tensor | BlockMask | None:
        """The mask packed documents (`segments`) and a sliding window shorter than the sequence need, as the
        attention mode wants it (dense or a BlockMask); None for plain causal attention."""
        window = self.cfg.sliding_window
        if window is not None and not (self.mask_window_always or window < T):
            window = None  # the band would cover the whole sequence
        if segments is None and window is None:
            return None
        if self.attention == "flex":
            return flex_block_mask(T, segments, window, device)
        if segments is not None:
            return document_mask(segments, window)
        return sliding_window_mask(T, window, device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits. A quantizer may install `lm_head` even when embeddings are tied."""
        return F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)


# ------------------------------------------------------------------------------------- activation checkpointing

# What each activation-checkpointing mode keeps alive between a block's forward and its backward (B x T tokens):
CHECKPOINTING_MODES = {
    # Every intermediate autograd saves: norm inputs and outputs, the fused QKV output, rotated q and k, the
    # expanded k/v, the attention output and its log-sum-exp, gate/up, silu(gate), their product (and for MoE the
    # router state and the grouped rows), and so on; nothing is recomputed.
    "none": "all intermediates",
    # Two checkpointed regions per block, each a whole sub-layer: (attention norm -> QKV -> RoPE -> SDPA -> output
    # projection) and (FFN norm -> SwiGLU gate/up -> act -> down, or the MoE router and experts). Kept: the two
    # residual-stream tensors that enter them, the block input and the post-attention residual, 2 x [B, T, d_model]
    # in the residual stream's dtype (fp32 under bf16 autocast). In backward each region is re-run once, on its
    # own, so at most one sub-layer's intermediates are live at a time.
    "selective": "block input + post-attention residual (2 x [B, T, d_model])",
    # The whole block is one checkpointed region. Kept: only the block input, 1 x [B, T, d_model]; the block's
    # forward is re-run once in backward and all of its intermediates are live together then.
    "full": "block input (1 x [B, T, d_model])",
}


def _checkpoint(function, *args):
    # Non-reentrant: works with torch.compile, FSDP2 and inputs that do not require grad. The model draws no random
    # numbers, so there is no RNG state to stash and restore.
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)
