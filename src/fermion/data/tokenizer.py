"""A byte-level BPE tokenizer: a thin layer over `tokenizers.Tokenizer` with the ids and facts Fermion needs.

Byte-level means every string is encodable (the 256 byte symbols are always in the vocabulary) and
decode(encode(text)) == text. Special tokens are never added implicitly; written literally in text they are
recognised as the special token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fermion.atomic import replaced_file
from fermion.config import TokenizerConfig
from fermion.data.sources import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


CONFIG_NAME = "tokenizer_config.json"  # Hugging Face's name; holds which tokens play bos/eos/pad when not ours


class Tokenizer:
    def __init__(self, inner: tokenizers.Tokenizer, bos: str = BOS, eos: str = EOS, pad: str | None = PAD):
        self.inner = inner
        self.bos_token, self.eos_token = bos, eos
        self.pad_token = pad if pad is not None else eos  # imported tokenizers often have no pad: reuse eos

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
        """tokenizer.json, plus the bos/eos/pad names from a tokenizer_config.json beside it when there is one."""
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found; train one first or fix tokenizer.path")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for unparsable files
            raise DataError(f"{path}: not a valid tokenizer.json ({err})") from None
        names = {"bos": BOS, "eos": EOS, "pad": PAD}
        config_path = Path(path).with_name(CONFIG_NAME)
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{config_path}: not valid JSON ({err})") from None
            for role in names:
                value = config.get(f"{role}_token", names[role] if role != "pad" else None)
                names[role] = value.get("content") if isinstance(value, dict) else value
        for role, token in names.items():
            if token is None and role == "pad":
                continue
            if token is None or inner.token_to_id(token) is None:
                raise DataError(f"{path}: tokenizer lacks the {role} token {token!r}; Fermion needs bos and eos tokens "
                                f"(name them as {role}_token in {CONFIG_NAME} beside it)")
        return cls(inner, names["bos"], names["eos"], names["pad"])

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically, so a crash never leaves a truncated tokenizer.json behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_file(path) as temporary:
            self.inner.save(str(temporary))
        if (self.bos_token, self.eos_token, self.pad_token) != (BOS, EOS, PAD):
            config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
            with replaced_file(path.with_name(CONFIG_NAME)) as temporary:
                temporary.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

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
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

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
