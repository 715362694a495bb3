"""Which split, train or val, each piece of pretraining text goes to: the one definition that both the shard writer
and tokenizer training read, so that the tokenizer never trains on validation text and the shards hold out exactly
what it left out.

Per source of a `data` section, in this order:
- sources marked `validation: true` are the validation split, whole; every other source is then trained on whole;
- otherwise a source that yields one document (a single .txt file without a separator, such as tinyshakespeare's
  input.txt) is split by position, as nanoGPT splits it: the last data.val_fraction of its text (in characters) is
  validation, the rest train, each part then tokenized on its own;
- a source of several documents sends each one to validation with probability val_fraction, by a hash of (run seed,
  source name, document number): the same split for any order of work or number of workers;
- a corpus whose hashes drew no validation document at all (a small one) gives up one document after all: the last
  one of its largest source, by train tokens (the shard writer moves it, once it knows the tokens). Tokenizer
  training cannot know in advance whether that will happen, so it leaves out a source's last document unless a
  validation document has already been seen: a document that could be moved (`Piece.movable`) is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from fermion.config import DataConfig, SourceConfig
from fermion.data.sources import interleave, iter_documents

RULE = "fermion-split/2"  # /1 split every source by the hash alone: a one-document corpus had no train split


class Piece(NamedTuple):
    split: str  # "train" or "val"
    text: str
    movable: bool  # a source's last document, train, which goes to val if the whole corpus draws no val document


def split_settings(data: DataConfig, seed: int) -> dict:
    """What the split depends on besides the sources and their files: for the shards' fingerprint and the tokenizer's
    record of what it was trained on, so that changing it makes both anew."""
    if data.marked:
        return {"rule": RULE, "validation": [source.name for source in data.sources if source.validation]}
    return {"rule": RULE, "val_fraction": data.fraction_held_out, "seed": seed}


def source_pieces(source: SourceConfig, data: DataConfig, seed: int) -> Iterator[Piece]:
    """The source's text in the order it is read, each piece with its split (the rules above)."""
    documents = iter_documents(source)
    if data.marked:
        split = "val" if source.validation else "train"
        yield from (Piece(split, text, False) for text in documents)
        return
    fraction = data.fraction_held_out
    current = next(documents, None)
    following = next(documents, None)  # one document ahead: whether `current` is the last
    if current is not None and following is None:
        yield from _by_position(current, fraction)
        return
    number, drew_val = 0, False
    while current is not None:
        split = "val" if goes_to_val(seed, source.name, number, fraction) else "train"
        drew_val |= split == "val"
        yield Piece(split, current, following is None and not drew_val and fraction > 0)
        number, current, following = number + 1, following, next(documents, None)


def training_texts(data: DataConfig, seed: int) -> Iterator[str]:
    """What tokenizer training reads: the train pieces of every source, taken in turn (so a budget-capped trainer
    sees every source), blank ones and any that could still move to validation left out."""
    seen_val = False
    for piece in interleave(source_pieces(source, data, seed) for source in data.sources):
        seen_val |= piece.split == "val"
        if piece.split == "train" and piece.text.strip() and not (piece.movable and not seen_val):
            yield piece.text


def goes_to_val(seed: int, source: str, number: int, fraction: float) -> bool:
    return stable_hash(seed, source, number) < fraction * 2**64


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of JSON-able parts that, unlike hash(), is the same in every process and Python version."""
    digest = hashlib.blake2b(json.dumps(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _by_position(text: str, fraction: float) -> Iterable[Piece]:
    """A one-document source: its head to train, its last `fraction` of characters to val (nanoGPT's
    data[:int(n * 0.9)] and data[int(n * 0.9):]); a part that comes out empty is left out."""
    cut = int(len(text) * (1 - fraction))
    head, tail = text[:cut], text[cut:]
    return [Piece("train", head, not tail and fraction > 0)] * bool(head) + [Piece("val", tail, False)] * bool(tail)
