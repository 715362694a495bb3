"""Attention kernels and masks: what `model/transformer.py`'s `Attention` calls once q, k and v are made.

Plain causal attention runs SDPA's fused causal kernel. Packed documents and sliding windows need a mask: either a
dense boolean [B, 1, T, T] one for SDPA (`document_mask`, `sliding_window_mask`), which keeps SDPA off its flash
kernels, or FlexAttention's block-sparse `BlockMask` (`flex_block_mask`), with which the kernel skips the blocks no
query may see and reads grouped-query K/V without repeating them. Nothing here is compiled at import time:
FlexAttention's kernels are compiled lazily, once, on first use.

Decoding keeps every sequence's keys and values in a `KVCache`, an argument of the model's forward: each attention
layer writes its new keys and values into it and attends over what the cache holds (`KVCache.attend`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from fermion.config import ModelConfig


def document_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, T] for packed sequences: causal, within the same segment (document), within the window."""
    T = segments.shape[1]
    i = torch.arange(T, device=segments.device)[:, None]
    j = torch.arange(T, device=segments.device)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    return (allowed & (segments[:, :, None] == segments[:, None, :]))[:, None]


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """Boolean [T, T]: position i sees j when i - window < j <= i (Mistral's convention)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over q [B, H, T, hd] and k/v [B, H_kv, T, hd]: causal when `mask` is None, else as the boolean mask
    allows (the mask already holds causality and any window)."""
    if k.shape[1] != q.shape[1]:
        # Expanding K/V keeps SDPA on its fused kernels on every backend.
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if mask is not None:
        if q.device.type == "cpu" and q.shape[2] >= 2 * QUERY_BLOCK and not torch.compiler.is_compiling():
            return _sdpa_by_query_block(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if q.device.type == "cpu" and q.shape[2] <= 1024 and torch.is_grad_enabled() and torch.compiler.is_compiling():
        # Compiled training on a CPU: PyTorch's flash kernel for CPU is slow in backward; the plain kernel
        # (scores materialised, which the compiler fuses) trained 7-10% faster at seq 256 (10M and 30M models).
        # Eager runs keep the fused kernel and its memory (what `fermion model info` predicts).
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


QUERY_BLOCK = 64  # queries per SDPA call on the masked CPU path (`_sdpa_by_query_block`)


def _sdpa_by_query_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked SDPA on a CPU, QUERY_BLOCK queries at a time, each block over only the keys its queries may see
    (from the first to the last key any of them may see, in any row): the masked CPU kernel computes every query
    against every key, so causality and packed documents (a row of packed conversations is mostly masked) cost
    nothing skipped. On the demo's SFT rows (512 positions, conversations of up to 277 tokens) attention alone took
    54 -> 30-35 ms a layer in forward and backward (fp32), the whole eager step 7-8% less (bench/RESULTS.md). Keys
    outside a block's range are masked for all its queries, so the result equals one call's up to float summation
    order. Eager only: the ranges are read from the mask, which a compiled graph would have to break for."""
    T = q.shape[2]
    allowed = mask.reshape(-1, T, T).any(0)  # [queries, keys]: allowed in some row
    starts = list(range(0, T, QUERY_BLOCK))
    seen = torch.stack([allowed[s:s + QUERY_BLOCK].any(0) for s in starts]).int()  # [blocks, keys]
    first = seen.argmax(1).tolist()
    last = (seen.shape[1] - seen.flip(1).argmax(1)).tolist()
    outputs = []
    for s, lo, hi in zip(starts, first, last, strict=True):
        e = min(s + QUERY_BLOCK, T)  # (a block whose queries see nothing gets every key, as in one call)
        outputs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi],
                                                      attn_mask=mask[..., s:e, lo:hi]))
    return torch.cat(outputs, 2)


@functools.cache
def _compiled(function):
    """`function` compiled once, on first use (FlexAttention is fast only as compiled kernels; each new shape or
    mask compiles again). A model compiled as a whole traces flex_attention into its own graph instead."""
    return torch.compile(function, dynamic=False)


def flex_block_mask(seq_len: int, segments: torch.Tensor | None = None, window: int | None = None,
                    device=None) -> BlockMask:
    """FlexAttention's BlockMask for what `document_mask` / `sliding_window_mask` allow: causal, within the
    same segment when `segments` [B, T] is given, within the window when `window` is given."""
    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if segments is not None:
            allowed = allowed & (segments[b, q_idx] == segments[b, kv_idx])
        return allowed

    device = segments.device if segments is not None else torch.device(device or "cpu")
    batch = None if segments is None else segments.shape[0]  # None: one mask broadcast over the batch
    # On CUDA the mask is built by a compiled kernel, block by block, never as a dense [B, T, T] tensor; on a CPU
    # (FlexAttention has no backward there, so forwards only) the plain function saves a compile.
    build = (_compiled(create_block_mask)
             if device.type == "cuda" and not torch.compiler.is_compiling() else create_block_mask)
    return build(mask_mod, batch, None, seq_len, seq_len, device=device)


# PyTorch 2.13's CPU FlexAttention kernel (inductor's C++ template) computes wrong scores for head sizes 8 and 16
# when it is generated for 256-bit vectors (AVX2: every x86 CPU without AVX512, and any CPU under
# ATEN_CPU_CAPABILITY=avx2 or inductor's cpp.simdlen=256). Its Q.K^T micro-kernel handles the last, narrower
# block of keys (width N < 16) with a "transpose, then outer product" branch taken when N, the head size K and
# the vector width line up (N % 8 == 0, K % 8 == 0, K < 24), but that branch is written for the full 16 columns:
# it reads 8 key rows past the tail and stores 8 scores past the row, over the next row's scores or, on the last
# row, over the running row maxima that follow them in the scratch buffer. A key length that leaves a tail of 8
# (40 = 16 + 16 + 8) is enough; what comes out depends on the memory past the keys (off by up to ~3, or NaN).
# (ATEN_CPU_CAPABILITY=avx2 on an AVX512 machine reproduces it, and leaves the faulty kernel in inductor's on-disk
# cache, keyed without the vector width, for later runs without the variable: clear /tmp/torchinductor_$USER then.)
# Minimal reproduction, on such a CPU or with torch._inductor.config.cpp.simdlen = 256:
#     q = k = v = torch.randn(1, 1, 24, 16)
#     torch.compile(flex_attention)(q, k, v, block_mask=create_block_mask(causal, None, None, 24, 24, "cpu"))
#     differs from F.scaled_dot_product_attention(q, k, v, is_causal=True).
# Any other head size takes the kernel's correct branch, so smaller heads are zero-padded to 24 (q.k and the
# weights over v are unchanged; the padded output columns are dropped). Head sizes 8 and 16 only occur in test
# and toy models, and the cost is confined to them. tests/test_flex_attention.py forces the 256-bit kernel.
_CPU_FLEX_MIN_HEAD_DIM = 24


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention over q [B, H, T, hd] and k/v [B, H_kv, T, hd] with the BlockMask; GQA without expanding K/V."""
    head_dim = q.shape[-1]
    pad = _CPU_FLEX_MIN_HEAD_DIM - head_dim if q.device.type == "cpu" else 0
    if pad > 0:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    options = dict(block_mask=block_mask, scale=head_dim ** -0.5, enable_gqa=k.shape[1] != q.shape[1])
    if torch.compiler.is_compiling():
        # Inside a compiled model, contiguous inputs: with GQA and q/k/v as transposed views of the QKV
        # projection, PyTorch 2.13's CPU flex kernel computes wrong outputs in the block's graph (0.9 off against
        # SDPA at head size 32, on AVX512 and AVX2 alike; a separate fault); the copies fuse into the producers.
        y = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), **options)
    else:
        y = _compiled(flex_attention)(q, k, v, **options)
    return y[..., :head_dim] if pad > 0 else y


class KVCache:
    """The keys and values of up to `slots` sequences being decoded, [layers, slots, kv_heads, length, head_dim].

    Each sequence owns one slot (row); its token at position p has its keys and values at index p. A forward with
    the cache (`Transformer.hidden(..., kv_cache=)`) feeds consecutive slots from `first_slot`, one row of tokens
    each, at the row's own positions: every attention layer writes its new keys and values there, then attends over
    the first `keys` positions of those slots, a mask letting a query see only positions <= its own (and within the
    sliding window). Rows at different lengths thus share one forward. The caller picks the slots and the key
    length before each forward (`select`); the model hands the positions over once per forward (`begin`).

    Grouped-query attention reads the cache without expanding it: the queries of the heads that share a KV head are
    folded into one [group * T] query block per KV head.
    """

    def __init__(self, cfg: ModelConfig, slots: int, length: int, *, dtype: torch.dtype, device=None):
        shape = (cfg.n_layers, slots, cfg.kv_heads, length, cfg.dim_per_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.window, self.group = cfg.sliding_window, cfg.n_heads // cfg.kv_heads
        self.first_slot, self.keys = 0, length

    def select(self, first_slot: int, keys: int) -> KVCache:
        """The next forward feeds slots first_slot.. (one per row of its tokens) and reads `keys` positions."""
        self.first_slot, self.keys = first_slot, keys
        return self

    def begin(self, positions: torch.Tensor) -> None:
        """The positions [n, T] of the forward's tokens: where they are written, and the mask they read with."""
        n, T = positions.shape
        self.positions = positions
        self.rows = torch.arange(self.first_slot, self.first_slot + n, device=positions.device)[:, None].expand(n, T)
        keys = torch.arange(self.keys, device=positions.device)
        mask = keys <= positions[..., None]  # [n, T, keys]
        if self.window is not None:
            mask &= keys > positions[..., None] - self.window
        self.mask = mask[:, None, None].expand(n, 1, self.group, T, self.keys).reshape(n, 1, self.group * T, -1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [n, H_kv, T, hd] at each row's positions; attention of q [n, H, T, hd] over the cache."""
        n, heads, T, head_dim = q.shape
        # Scatter to each row's own positions: [n, T, H_kv, hd] at (slot, :, position). In the cache's dtype: under
        # autocast (RL's rollouts from fp32 master weights) k and v arrive in bf16 while the cache has the weights'.
        self.k[layer][self.rows, :, self.positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][self.rows, :, self.positions] = v.transpose(1, 2).to(self.v.dtype)
        slots = slice(self.first_slot, self.first_slot + n)
        k_all, v_all = self.k[layer, slots, :, :self.keys], self.v[layer, slots, :, :self.keys]
        q = q.reshape(n, k.shape[1], self.group * T, head_dim)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self.mask)
        return y.reshape(n, heads, T, head_dim)

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (the engine keeps its live rows contiguous)."""
        self.k[:, target] = self.k[:, source]
        self.v[:, target] = self.v[:, source]
