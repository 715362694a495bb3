"""The `data` section: the sources a run pretrains on (SourceConfig serves sft and dpo too), how they are split and
sharded; and the files a source names, as every fingerprint of the data sees them."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fermion.config.base import Section
from fermion.config.prepare import PrepareConfig

DEFAULT_VAL_FRACTION = 0.01


class SourceConfig(Section):
    name: str = Field(min_length=1)
    paths: list[str] = Field(default_factory=list)  # files or globs; which suffixes: fermion.data.sources
    # Text every machine has: python-stdlib (the running Python's standard library source), or fermion's generated
    # data (data/synthetic/): stories, textbook, arithmetic, tinytask documents for pretraining; chat, arithmetic,
    # tinytask records for sft; arithmetic-pairs, tinytask-pairs for dpo. Generated sources take max_documents
    # records from seed.
    builtin: Literal["python-stdlib", "stories", "textbook", "arithmetic", "tinytask", "chat", "arithmetic-pairs",
                     "tinytask-pairs"] | None = None
    seed: int = 0  # generated builtins: the same seed gives the same records on every machine
    dataset: str | None = None  # a Hugging Face dataset name (or local dataset folder), read with `datasets`
    subset: str | None = None  # the dataset's configuration ("name" in datasets.load_dataset), e.g. ARC-Easy
    split: str = "train"  # the dataset's split
    streaming: bool = False  # read the dataset as it is used (an IterableDataset), not downloaded whole first
    # SFT/DPO record layout; auto recognises messages, alpaca, dolly, prompt/completion, prompt/chosen/rejected, HH.
    format: Literal["auto", "messages", "alpaca", "dolly", "prompt_completion", "preference", "hh"] = "auto"
    text_field: str = "text"  # the field holding the text in jsonl records
    separator: str | None = None  # splits a .txt file into documents (e.g. "<|endoftext|>"); None: one per file
    kind: str = "web"
    weight: float = Field(1.0, gt=0)
    max_documents: int | None = Field(None, ge=1)
    # All of this source is validation data: none of it is trained on, and the tokenizer never reads it. When any
    # source in data.sources is marked, every other one goes wholly to train (data.val_fraction then must not be
    # set: the marked sources are the held-out split). Pretraining data only: sft and dpo hold out their own
    # val_fraction of records.
    validation: bool = False

    @model_validator(mode="after")
    def _has_input(self) -> SourceConfig:
        if not self.paths and self.builtin is None and self.dataset is None:
            raise ValueError("give paths (files or globs), a dataset, or a builtin (python-stdlib, stories, ...)")
        if self.streaming and self.dataset is None:
            raise ValueError("streaming: true reads a dataset as it goes: set dataset, or remove streaming")
        if self.builtin not in (None, "python-stdlib") and self.max_documents is None:
            raise ValueError(f"builtin: {self.builtin} is generated: set max_documents to how many records to make")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    # The share held out for validation where no source is marked `validation` (None: 0.01; not to be set when one
    # is). A source of one document (a single .txt file without a separator: tinyshakespeare's input.txt) gives the
    # last val_fraction of its text, as nanoGPT splits it; a source of several documents gives each document with
    # that probability, by a seeded hash of its number (data/splits.py).
    val_fraction: float | None = Field(None, ge=0, lt=1)
    shard_dir: str | None = None  # default: <run dir>/data
    shard_tokens: int = Field(50_000_000, ge=1000)  # tokens per shard file
    num_workers: int = Field(2, ge=1)
    prepare: PrepareConfig | None = None  # clean, filter and deduplicate the sources first (`fermion prepare`)

    @field_validator("val_fraction")
    @classmethod
    def _not_with_marked_sources(cls, value: float | None, info: ValidationInfo) -> float | None:
        marked = [f"sources[{i}] ({source.name!r})" for i, source in enumerate(info.data.get("sources", []))
                  if source.validation]
        if value is not None and marked:
            raise ValueError(f"a source is marked validation ({', '.join(marked)}): the marked sources are the "
                             "held-out split and every other one is trained on whole; remove val_fraction")
        return value

    @model_validator(mode="after")
    def _something_to_train_on(self) -> DataConfig:
        if all(source.validation for source in self.sources):
            raise ValueError("every source is marked validation: leave at least one to train on")
        return self

    @property
    def marked(self) -> bool:
        """Whether sources marked `validation` make the split (then every other source is trained on whole)."""
        return any(source.validation for source in self.sources)

    @property
    def fraction_held_out(self) -> float:
        """The share of each unmarked source held out for validation: val_fraction, 0.01 when unset, none where
        sources are marked."""
        if self.marked:
            return 0.0
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction


def matching_files(pattern: str) -> list[str]:
    """The files a data path or glob names (relative to the working directory, ~ expanded)."""
    return [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]


def file_states(sources: list[SourceConfig]) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of every file the sources' paths and globs name, in the order written: what a
    fingerprint of the data holds (a run's steps, the shards, a tokenizer's record), so an edited file is noticed."""
    states = []
    for source in sources:
        for pattern in source.paths:
            for path in sorted(matching_files(pattern)):
                stat = Path(path).stat()
                states.append((path, stat.st_size, stat.st_mtime_ns))
    return states


def no_match_message(pattern: str) -> str:
    return f"no file matches {pattern!r} (paths are relative to the directory you run fermion from: {os.getcwd()})"
