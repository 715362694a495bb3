"""Log-probabilities in OpenAI's two shapes, from the engine's per-token entries (`infer.sampling.TokenLogprob`: the
model's own log-softmax, before any sampling transform; see infer/engine.py).

    chat         choices[i].logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]
    completions  choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}

A token's text is its bytes decoded as UTF-8, a piece of a character shown as U+FFFD (its `bytes` are exact). The
completions shape's top_logprobs holds the `logprobs` most likely tokens and the sampled one, as OpenAI's does (so up
to logprobs + 1 entries; `logprobs: 0` gives the sampled token's alone).
"""

from __future__ import annotations

from fermion.data.tokenizer import Tokenizer
from fermion.infer.sampling import TokenLogprob


def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.piece(token).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob] | None) -> dict | None:
    if entries is None:
        return None

    def one(token: int, logprob: float) -> dict:
        return {"token": _text(tokenizer, token), "logprob": logprob, "bytes": list(tokenizer.piece(token))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """`offset`: characters before the generated text in the choice's text."""
    if entries is None:
        return None
    return {"tokens": [_text(tokenizer, e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(tokenizer, t): lp for t, lp in [*e.top, (e.token, e.logprob)]} for e in entries],
            "text_offset": [offset + e.offset for e in entries]}
