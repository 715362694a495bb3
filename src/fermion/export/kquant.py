"""GGUF's K-quants Q4_K, Q5_K and Q6_K, quantized in numpy, and llama.cpp's rule for which tensor gets which type
in a Q4_K_M / Q5_K_M / Q6_K file.

Why our own quantizer: the `gguf` package (0.19) dequantizes K-quants but cannot quantize them, and llama.cpp's
quantizer (llama-cpp-python's `llama_model_quantize`) needs a C++ build that many users do not have. The block
layouts are ggml's (`block_q4_K`, `block_q5_K`, `block_q6_K`, 256 values per super-block) and the fitting follows
ggml's reference quantizers: each 32-value (Q4_K/Q5_K) or 16-value (Q6_K) sub-block gets a scale (and a minimum)
from a small search of candidate scales refitted by weighted least squares, then the sub-block scales are themselves
quantized to 6 (or 8) bits against one fp16 scale per super-block, and the values are rounded again against the
stored scales. The bytes agree with ggml's quantize_row_q*_K_ref but for float rounding in the sums (99.8-99.97% of
bytes on the same rows); tests read them back through gguf's dequantizer and, when llama-cpp-python is installed,
compare with ggml's and let llama.cpp run the files.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256  # values per super-block
# Where a tensor's rows are not a multiple of QK_K, llama.cpp's quantizer (tensor_type_fallback) uses a 32-value
# type of about the same precision; rows not a multiple of 32 either are stored as F16.
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# Ranges below this are treated as all zero (ggml's GROUP_MAX_EPS): their reciprocals would overflow float32.
TINY = 1e-15


def quantize(array: np.ndarray, qtype: Q) -> np.ndarray:
    """`array` (..., row) in the bytes of `qtype`, shaped (..., row // 256 * block bytes), as gguf.quants.quantize
    shapes them."""
    rows = np.ascontiguousarray(array, dtype=np.float32)
    blocks = rows.reshape(-1, QK_K)
    packed = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}[qtype](blocks)
    return packed.reshape(*rows.shape[:-1], -1)


# ------------------------------------------------------------------------------------------ which type per tensor


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, mix: str, n_layers: int, n_experts: int, tied: bool) -> Q:
    """The type llama.cpp's quantizer (llama_tensor_get_type) gives a 2-D/3-D weight in a `mix` file (q4_k_m, q5_k_m,
    q6_k), before any fallback for the row length. The output projection (or, tied, the embedding it reuses) is
    Q6_K; Q4_K_M and Q5_K_M give attn_v and ffn_down of the layers `_more_bits` picks Q6_K, and 8-expert models
    their attention's K and V Q8_0 (and Q4_K_M its attn_output Q5_K)."""
    base = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}[mix]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return Q.Q6_K
    if not name.startswith("blk."):
        return base
    layer = int(name.split(".")[1])
    if ".attn_v." in name:
        if n_experts == 8:
            return Q.Q8_0
        return Q.Q6_K if mix != "q6_k" and _more_bits(layer, n_layers) else base
    if ".attn_k." in name and n_experts == 8:
        return Q.Q8_0
    if ".ffn_down" in name:
        return Q.Q6_K if mix != "q6_k" and _more_bits(layer, n_layers) else base
    if ".attn_output." in name and n_experts == 8 and mix == "q4_k_m":
        return Q.Q5_K
    return base


def fallback(qtype: Q, row: int) -> Q | None:
    """The type a K-quant falls back to for rows of this length (None: it fits), as llama.cpp chooses it (for the
    output projection too: llama.cpp makes it Q8_0 directly, which is Q6_K's fallback)."""
    if qtype not in FALLBACK or row % QK_K == 0:
        return None
    return FALLBACK[qtype] if row % 32 == 0 else Q.F16


# -------------------------------------------------------------------------------------------------- the fitting


def _fit_with_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Per row of x (n, 32): scale >= 0, minimum >= 0 and levels 0..nmax with x ~ scale * level - minimum, chosen among
    nstep + 1 candidate scales by the error weighted towards large values (ggml's make_qkx2_quants)."""
    weights = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)
    high = x.max(axis=1, keepdims=True)
    offset = np.minimum(x.min(axis=1, keepdims=True), 0)
    flat = (high - offset < TINY)[:, 0]  # all (nearly) equal: levels 0, the minimum carries the value

    def levels(numerator):
        # Candidates are spread over the range from the best minimum found so far, as ggml's loop does.
        span = high - offset
        return np.clip(np.rint(numerator / np.where(span >= TINY, span, 1) * (x - offset)), 0, nmax)

    best_levels = levels(nmax)
    scale = (high - offset) / nmax
    best = np.sum(weights * (scale * best_levels + offset - x) ** 2, axis=1, keepdims=True)
    sum_w, sum_x = weights.sum(1, keepdims=True), (weights * x).sum(1, keepdims=True)
    for step in range(nstep + 1):
        lv = levels(rmin + rdelta * step + nmax)
        sum_l, sum_l2, sum_xl = (weights * lv).sum(1, keepdims=True), (weights * lv * lv).sum(1, keepdims=True), \
            (weights * lv * x).sum(1, keepdims=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the minimum is subtracted, never added: refit the scale alone
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale)
        this_min = np.where(positive, 0, this_min)
        error = np.sum(weights * (this_scale * lv + this_min - x) ** 2, axis=1, keepdims=True)
        better = ok & (error < best)
        best = np.where(better, error, best)
        best_levels = np.where(better, lv, best_levels)
        scale, offset = np.where(better, this_scale, scale), np.where(better, this_min, offset)
    scale = np.where(flat[:, None], 0, scale)
    return scale[:, 0], -offset[:, 0], best_levels


def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (n, 16): a signed scale and levels -nmax..nmax-1 with x ~ scale * level, the value of largest
    magnitude landing on -nmax, then 18 nearby scales tried, weighted by x² (ggml's make_qx_quants, rmse_type 1)."""
    weights = x * x
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    zero = np.abs(peak[:, 0]) < TINY
    peak = np.where(zero[:, None], 1, peak)

    def fit(target):
        lv = np.clip(np.rint(-target / peak * x), -nmax, nmax - 1)
        sum_lx, sum_l2 = (weights * x * lv).sum(1, keepdims=True), (weights * lv * lv).sum(1, keepdims=True)
        return lv, sum_lx, sum_l2

    best_levels, sum_lx, sum_l2 = fit(nmax)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, 1), 0)
    best = scale * sum_lx
    for step in [*range(-9, 0), *range(1, 10)]:
        lv, sum_lx, sum_l2 = fit(nmax + 0.1 * step)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        new_scale = sum_lx / np.where(sum_l2 > 0, sum_l2, 1)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sum_lx, best)
        best_levels = np.where(better, lv, best_levels)
    return np.where(zero, 0, scale[:, 0]), best_levels


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


# -------------------------------------------------------------------------------------------------- the packing


def _with_min(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K's shared part: (d and dmin as fp16 bytes, the 12 packed scale bytes, the levels (n, 256))."""
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    scales, mins, levels = _fit_with_min(sub, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1, keepdims=True), mins.max(axis=1, keepdims=True)
    inv_scale = np.where(max_scale > TINY, 63 / np.where(max_scale > TINY, max_scale, 1), 0)
    inv_min = np.where(max_min > TINY, 63 / np.where(max_min > TINY, max_min, 1), 0)
    ls = np.minimum(63, np.rint(inv_scale * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min * mins)).astype(np.uint8)
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    # Rounded again against the scales as stored (6-bit multiples of an fp16), which is what a reader multiplies by.
    step = (d.astype(np.float32) * ls).reshape(n * 8, 1)
    shift = (dmin.astype(np.float32) * lm).reshape(n * 8, 1)
    requantized = np.clip(np.rint((sub + shift) / np.where(step > 0, step, 1)), 0, nmax)
    levels = np.where(step > 0, requantized, levels).astype(np.uint8).reshape(n, QK_K)
    # 12 bytes hold eight 6-bit scales and eight 6-bit minimums: the low 6 bits of the first four of each in bytes
    # 0-3 and 4-7, the last four split into low nibbles (bytes 8-11) and top 2 bits (bytes 0-7's high bits).
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    return d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, levels


def _nibbles(levels: np.ndarray) -> np.ndarray:
    """Low 4 bits of 256 levels in 128 bytes: byte l of each 64-value chunk holds values l and l + 32."""
    chunks = (levels & 0xF).reshape(-1, 4, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _with_min(blocks, 15, -1.0, 20)
    return np.concatenate([d, dmin, scales, _nibbles(levels)], axis=1)  # 144 bytes


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _with_min(blocks, 31, -0.5, 15)
    # The fifth bit: bit j of byte l is value l of sub-block j.
    high = (levels >> 4).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.concatenate([d, dmin, scales, np.bitwise_or.reduce(high, axis=1), _nibbles(levels)], axis=1)  # 176


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    scales, levels = _fit_symmetric(sub, 32)
    scales = scales.reshape(n, 16)
    # The largest-magnitude scale, sign kept, lands on -128 (the int8 scales' full range).
    peak = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    empty = np.abs(peak[:, 0]) < TINY
    peak = np.where(empty[:, None], 1, peak)
    d = _fp16(np.where(empty[:, None], 0, -peak / 128))
    ls = np.minimum(127, np.rint(-128 / peak * scales)).astype(np.int8)
    ls = np.where(empty[:, None], 0, ls).astype(np.int8)
    step = (d.astype(np.float32) * ls).reshape(n * 16, 1)
    requantized = np.clip(np.rint(sub / np.where(step != 0, step, 1)), -32, 31)
    levels = np.where(step != 0, requantized, levels)
    levels = np.where(empty.repeat(16)[:, None], -32, levels)  # an all-zero block is stored as zeros throughout
    levels = (levels + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, quarter, position]
    low = (levels[:, :, :2] & 0xF) | ((levels[:, :, 2:] & 0xF) << 4)  # byte l: quarters 0/2, byte 32 + l: 1/3
    high = np.bitwise_or.reduce((levels >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None], axis=2)
    return np.concatenate([low.reshape(n, 128), high.reshape(n, 64), ls.view(np.uint8),
                           d.view(np.uint8).reshape(n, 2)], axis=1)  # 210 bytes
