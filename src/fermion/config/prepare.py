"""data.prepare: the settings of `fermion prepare`, the datatrove pipeline run on a recipe's sources before
tokenization (the pipeline itself is fermion/prepare/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fermion.config.base import Section, eval_data_dir


def _check_range(low: float | None, high: float | None, names: str) -> None:
    if low is not None and high is not None and low > high:
        raise ValueError(f"{names}: the lower bound ({low}) exceeds the upper one ({high})")


class LengthRules(Section):
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthRules:
        _check_range(self.min_chars, self.max_chars, "min_chars, max_chars")
        return self


class CodeRules(Section):
    max_line_length: int = Field(1000, ge=1)
    max_mean_line_length: int = Field(100, ge=1)
    min_alnum_fraction: float = Field(0.25, ge=0, le=1)


class MinHashSettings(Section):
    # datatrove's defaults: documents sharing ~75% of their 5-word shingles are found with high probability
    n_grams: int = Field(5, ge=1)
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)


class PerplexitySettings(Section):
    checkpoint: str  # a fermion run or checkpoint directory whose model scores every document
    low: float | None = Field(None, gt=0)  # keep documents with perplexity in [low, high]; None: no bound
    high: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PerplexitySettings:
        _check_range(self.low, self.high, "low, high")
        return self


class DecontaminationSettings(Section):
    eval_dir: str | None = None  # default: $FERMION_EVAL_DATA, else ~/.cache/fermion/eval
    n: int = Field(13, ge=1)  # documents sharing an n-word run with a benchmark prompt are dropped

    def resolved_eval_dir(self) -> Path:
        return eval_data_dir(self.eval_dir)


class PrepareConfig(Section):
    """`fermion prepare`: the datatrove pipeline run on data.sources before tokenization. Each step is optional:
    `false` turns it off, `true` uses its defaults; steps with settings also take a mapping of them."""

    dir: str | None = None  # default: <run dir>/prepared
    workers: int | None = Field(None, ge=1)  # processes of the local executor; None: all cores
    executor: Literal["local", "slurm", "ray"] = "local"
    # Keyword arguments of datatrove's executor, e.g. partition and time (both required) for Slurm.
    executor_options: dict[str, Any] = Field(default_factory=dict)
    normalize: bool = True  # Unicode NFC, no control characters
    length: LengthRules | None = None
    gopher_repetition: bool = True  # the prose rules apply to sources whose kind is not "code"
    gopher_quality: bool = True
    c4: bool = True
    fineweb: bool = True
    code: CodeRules | None = Field(default_factory=CodeRules)  # for sources of kind "code"
    exact_dedup: bool = True
    minhash: MinHashSettings | None = Field(default_factory=MinHashSettings)
    decontaminate: DecontaminationSettings | None = Field(default_factory=DecontaminationSettings)
    perplexity: PerplexitySettings | None = None

    @field_validator("length", "code", "minhash", "decontaminate", "perplexity", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`true` is the step with its default settings, `false` no step."""
        if isinstance(value, bool):
            return {} if value else None
        return value
