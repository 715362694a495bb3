"""A byte-level BPE tokenizer: a thin layer over `tokenizers.Tokenizer` with the ids and facts Fermion needs.

Byte-level means every string is encodable (the 256 byte symbols are always in the vocabulary) and
decode(encode(text)) == text. Special tokens are never added implicitly; written literally in text they are
recognised as the special token.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fermion.config import TokenizerConfig
from fermion.data.sources import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


class Tokenizer:
    def __init__(self, inner: tokenizers.Tokenizer):
        self.inner = inner

    @classmethod
    def train(cls, texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
        """Train byte-level BPE on at most `config.train_bytes` bytes of `texts`; specials get ids 0..n-1 in order."""
        inner = tokenizers.Tokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=config.special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(_first_bytes(texts, config.train_bytes), trainer=trainer)
        return cls(inner)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found; train one first or fix tokenizer.path")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for unparsable files
            raise DataError(f"{path}: not a valid tokenizer.json ({err})") from None
        for token in (BOS, EOS, PAD):
            if inner.token_to_id(token) is None:
                raise DataError(f"{path}: tokenizer lacks the special token {token!r}, which Fermion needs")
        return cls(inner)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, so a crash never leaves a truncated tokenizer.json behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.inner.save(str(temporary))
        os.replace(temporary, path)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.inner.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    def token_id(self, token: str) -> int:
        found = self.inner.token_to_id(token)
        if found is None:
            raise DataError(f"token {token!r} is not in the tokenizer's vocabulary")
        return found

    @cached_property
    def hash(self) -> str:
        """sha256 of the canonical JSON: equal for tokenizers that encode and decode identically."""
        return hashlib.sha256(self.inner.to_str().encode("utf-8")).hexdigest()

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each id decodes to (0 for special tokens), for bits-per-byte."""
        specials = {i for i, token in self.inner.get_added_tokens_decoder().items() if token.special}
        # In a byte-level vocabulary every character of a token's string stands for exactly one byte.
        counts = [0 if i in specials else len(self.inner.id_to_token(i)) for i in range(self.vocab_size)]
        return np.array(counts, dtype=np.int32)


def _first_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    """The texts until `budget` UTF-8 bytes have been given, the last one cut to fit."""
    for text in texts:
        encoded = text.encode("utf-8")
        if len(encoded) >= budget:
            yield encoded[:budget].decode("utf-8", errors="ignore")  # the cut may split a character
            return
        budget -= len(encoded)
        yield text
