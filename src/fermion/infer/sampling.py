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


@dataclass(frozen=True)
class Bounds:
    """An interval of finite numbers (or of integers), closed unless said otherwise."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False
    integer: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else int | float):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # NaN compares false, inf would pass a bound
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        ends = f"{self.low:g}, {self.high:g}" if not self.integer else f"{self.low}, {self.high}"
        interval = f"{'(' if self.open_low else '['}{ends}{')' if self.open_high else ']'}"
        return f"an integer in {interval}" if self.integer else f"in {interval}"


# What each sampling parameter may be: the engine refuses anything else (SamplingParams), and the server's request
# models take their limits from here. Temperature, top_p, min_p and the OpenAI penalties are OpenAI's and vLLM's
# ranges. The repetition penalty divides (or multiplies) logits: vLLM only asks > 0, which lets 1e-300 through
# (a logit divided by it is inf in float32, and sampling sees NaN); values in use are 1.0-1.5 (CTRL's paper 1.2,
# llama.cpp's default 1.1), so [0.01, 100] leaves every sensible choice and keeps a scaled logit finite. top_k 0 is
# off and any k at or past the vocabulary is too; the bound only keeps it a machine integer. A seed is what
# torch.Generator.manual_seed takes (negative seeds wrap modulo 2^64).
LIMITS = {
    "temperature": Bounds(0.0, 2.0),
    "top_p": Bounds(0.0, 1.0, open_low=True),
    "min_p": Bounds(0.0, 1.0, open_high=True),
    "repetition_penalty": Bounds(0.01, 100.0),
    "presence_penalty": Bounds(-2.0, 2.0),
    "frequency_penalty": Bounds(-2.0, 2.0),
    "top_k": Bounds(0, 2**31 - 1, integer=True),
    "seed": Bounds(-(2**63), 2**64 - 1, integer=True),
}
# Below this a positive temperature is raised to it (as vLLM does): logits divided by 1e-30 overflow float32.
MIN_TEMPERATURE = 0.01


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
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens = {self.max_new_tokens!r} must be an integer >= 1")
        for name, bounds in LIMITS.items():
            value = getattr(self, name)
            if value not in bounds and not (name == "seed" and value is None):
                raise ValueError(f"{name} = {value!r} must be {bounds}")
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
    finish_reason: str  # "stop" (eos, a stop token or a stop string), "length", or "error" (sampling failed)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs asked
    # The stop token (eos or one of stop_token_ids) that ended it, which token_ids leave out; None otherwise. RL
    # trains on it: choosing to stop is one of the model's tokens.
    stop_token: int | None = None
