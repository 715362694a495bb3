"""Perplexity and bits per byte of a model on any text file.

The text is tokenized whole and scored in windows of the model's context length that overlap by half, so every
token after the first window is predicted with at least half a context of history; each token is scored once.
The first token is predicted after the end-of-text token, which is what precedes every document in training.
Bits per byte (total negative log-likelihood in bits / UTF-8 bytes) is the number to compare across tokenizers; the
bytes are the tokenizer's own count (`Tokenizer.token_bytes`), the one training's validation bits per byte uses too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from fermion.data.sources import DataError
from fermion.eval.results import Metric, TaskResult

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel


def windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) over the token sequence [prefix, t0, t1, ...] so that every t_i is scored once."""
    out, scored = [], 1  # position 0 is the end-of-text prefix, never scored
    total = n_tokens + 1
    while scored < total:
        end = min(scored + stride, total) if out else min(length + 1, total)
        start = max(0, end - length - 1)
        out.append((start, end, scored))
        scored = end
    return out


def text_nll(lm: EvalModel, text: str, limit_windows: int | None = None) -> tuple[float, int, int]:
    """(total negative log-likelihood in nats, tokens scored, bytes of the text scored)."""
    ids = [lm.tokenizer.eos_id] + lm.tokenizer.encode(text)
    length = lm.max_length
    spans = windows(len(ids) - 1, length, max(1, length // 2))[:limit_windows]
    total, scored, n_bytes = 0.0, 0, 0
    for start, end, first in spans:
        total += lm.token_nll(ids[start:end], first - start)
        scored += end - first
        n_bytes += lm.tokenizer.count_bytes(ids[first:end])
    return total, scored, n_bytes


def perplexity(lm: EvalModel, path: Path, limit_windows: int | None = None) -> TaskResult:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (perplexity needs a text file: --tasks perplexity=PATH)") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); convert it first") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    nll, tokens, n_bytes = text_nll(lm, text, limit_windows)
    metrics = [Metric("bits_per_byte", nll / math.log(2) / n_bytes), Metric("token_perplexity", math.exp(nll / tokens)),
               Metric("byte_perplexity", math.exp(nll / n_bytes))]
    return TaskResult(f"perplexity:{Path(path).name}", metrics, tokens, 0,
                      [{"file": str(path), "tokens": tokens, "bytes": n_bytes, "nll": nll}])
