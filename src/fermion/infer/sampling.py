"""What a caller asks of generation and gets back, without the model: sampling parameters, a constraint on the next
token, a completion, and a prompt. The engine (engine.py) does the generating; the benchmarks in eval/ and the
server build these without importing any model code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

Prompt = str | list[dict]  # plain text, or chat messages to render through the model's chat template
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: -100 bans a token, +100 all but forces it
MAX_TOP_LOGPROBS = 20  # alternatives per token, OpenAI's limit


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, over the prompt and the generated tokens
    presence_penalty: float = 0.0  # OpenAI-style, over the generated tokens: minus this once per distinct token
    frequency_penalty: float = 0.0  # ... and minus this per occurrence
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before all else
    logprobs: int | None = None  # record each token's log-probability and this many alternatives; None: none

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be {wanted}")
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and token >= 0 and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias {{{token!r}: {bias!r}}}: keys must be token ids >= 0 and values "
                                 f"finite in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs = {self.logprobs!r} must be None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class Constraint(Protocol):
    """Limits which tokens a sequence may take next (a JSON schema, a grammar). One object per sequence."""

    def allowed(self) -> torch.Tensor:
        """A bool mask over the vocabulary (the tokenizer's; model rows past its end are never allowed)."""
        ...

    def accept(self, token: int) -> None:
        """The token that was sampled."""
        ...


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution (the log-softmax of its logits,
    before logit_bias, penalties, temperature, truncation or a constraint), and the most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first; SamplingParams.logprobs of them
    offset: int = 0  # where the token's text starts in the completion's text


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos, a stop token or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs asked
