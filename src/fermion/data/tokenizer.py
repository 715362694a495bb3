"""A tokenizer: a thin layer over `tokenizers.Tokenizer` with the ids and facts Fermion needs.

Fermion trains byte-level BPE (every string is encodable, the 256 byte symbols always in the vocabulary, and
decode(encode(text)) == text) and reads existing ones too: GPT-2's byte-level BPE, or a SentencePiece-style BPE with
byte fallback and a metaspace (Llama, Mistral). Special tokens are never added implicitly; written literally in text
they are recognised as the special token.

Which tokens play bos, eos and pad, and the chat template the tokenizer came with, live in a Hugging Face
tokenizer_config.json beside tokenizer.json (written only when they differ from Fermion's own; a chat_template.jinja
there, as transformers 5 saves it, is read too). They belong to the
tokenizer: `load` and `save` carry them, and so does pickling (the shard writer's worker processes get the whole
object), so no copy of a tokenizer falls back to Fermion's default names.

A tokenizer a run trains is saved with a record of what it was trained on (`training_inputs`: the trainer's
settings, the sources, their files' sizes and times, the validation split it left out) in tokenizer_trained_on.json
beside it, naming the tokenizer
by its hash; a later run compares it with what it would train on now (`changed_inputs`) and trains anew, or refuses,
when they differ, rather than reuse a tokenizer made from other data without a word.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fermion import layout
from fermion.atomic import replaced_file
from fermion.config import DataConfig, TokenizerConfig, file_states
from fermion.data.sources import DataError
from fermion.data.splits import split_settings

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


CONFIG_NAME = "tokenizer_config.json"  # Hugging Face's name; holds which tokens play bos/eos/pad when not ours
TEMPLATE_NAME = "chat_template.jinja"  # where transformers 5 saves a tokenizer's chat template
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte tokens: one raw byte each
_METASPACE = "\u2581"  # ▁, SentencePiece's stand-in for a space
_BYTE_LEVEL_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte symbols
RECORD_FORMAT = "fermion-tokenizer-record/1"
TRAINER_SETTINGS = {"vocab_size", "min_frequency", "special_tokens", "train_bytes"}  # what `Tokenizer.train` reads


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet as a map from symbol to byte: printable bytes stand for themselves, the others
    (control characters, space, 127-160, 173) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_SYMBOL = _byte_symbols()


class Tokenizer:
    def __init__(self, inner: tokenizers.Tokenizer, bos: str = BOS, eos: str = EOS, pad: str | None = PAD,
                 chat_template: str | None = None):
        self.inner = inner
        self.bos_token, self.eos_token = bos, eos
        self.pad_token = pad if pad is not None else eos  # imported tokenizers often have no pad: reuse eos
        self.chat_template = chat_template  # the Jinja template it came with (tokenizer_config.json), if any

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
        """tokenizer.json, plus the bos/eos/pad names and chat template of a tokenizer_config.json beside it."""
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found; train one first or fix tokenizer.path")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for unparsable files
            raise DataError(f"{path}: not a valid tokenizer.json ({err})") from None
        config = _read_config(Path(path).with_name(CONFIG_NAME))
        names = {"bos": BOS, "eos": EOS, "pad": PAD} if config is None else {
            role: _token_name(config.get(f"{role}_token", None if role == "pad" else default))
            for role, default in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
        for role, token in names.items():
            if token is None and role == "pad":
                continue
            if token is None or inner.token_to_id(token) is None:
                raise DataError(f"{path}: tokenizer lacks the {role} token {token!r}; Fermion needs bos and eos tokens "
                                f"(name them as {role}_token in {CONFIG_NAME} beside it)")
        return cls(inner, names["bos"], names["eos"], names["pad"], _chat_template(Path(path).parent, config))

    def save(self, path: str | os.PathLike, trained_on: dict | None = None) -> None:
        """Write atomically, so a crash never leaves a truncated tokenizer.json behind; tokenizer_config.json beside
        it when the bos/eos/pad names are not Fermion's or the tokenizer came with a chat template, and the record of
        what it was trained on (`training_inputs`) when given. The record goes last and names the tokenizer by its
        hash: a crash in between leaves a tokenizer without a record, never a record of another tokenizer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_file(path) as temporary:
            self.inner.save(str(temporary))
        if (self.bos_token, self.eos_token, self.pad_token) != (BOS, EOS, PAD) or self.chat_template:
            config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
            if self.chat_template:
                config["chat_template"] = self.chat_template
            with replaced_file(path.with_name(CONFIG_NAME)) as temporary:
                temporary.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if trained_on is not None:
            record = {"format": RECORD_FORMAT, "tokenizer_hash": self.hash, "trained_on": trained_on}
            with replaced_file(layout.tokenizer_record(path)) as temporary:
                temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

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
        """int32 [vocab_size]: the UTF-8 bytes of text each id stands for (0 for special tokens), for bits per byte.

        The one byte count of Fermion: training's validation and the perplexity task both sum it over the tokens
        they score. A byte-level token's characters are GPT-2 byte symbols, one byte each; a SentencePiece byte
        token <0xNN> is one byte; a metaspace ▁ is a space (so a text's first token counts the space the tokenizer
        puts before it: one byte per document more than the text holds); any other token is its own UTF-8 text.
        """
        return self._token_bytes.copy()

    def count_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 bytes the tokens stand for, by `token_bytes`."""
        return int(self._token_bytes[np.asarray(list(ids), dtype=np.int64)].sum())

    def piece(self, token_id: int) -> bytes:
        """The bytes a token stands for in text (a special token: its own name, as decode writes it; an id past the
        vocabulary, as a model's padded rows are: none), e.g. for the `bytes` of OpenAI's logprobs."""
        pieces = self._pieces
        return pieces[token_id][0] if 0 <= token_id < len(pieces) else b""

    @cached_property
    def _token_bytes(self) -> np.ndarray:
        return np.array([0 if special else len(piece) for piece, special in self._pieces], dtype=np.int32)

    @cached_property
    def _pieces(self) -> list[tuple[bytes, bool]]:
        """(bytes, is special) per id: a byte-level token's characters are GPT-2 byte symbols, one byte each; a
        SentencePiece byte token <0xNN> is one byte; a metaspace ▁ is a space; any other token is its own text."""
        spec = json.loads(self.inner.to_str())
        byte_level = "ByteLevel" in _types(spec.get("decoder"))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        added = {token.content: token.special for token in self.inner.get_added_tokens_decoder().values()}
        pieces = [(b"", True)] * self.vocab_size
        for token, i in self.inner.get_vocab(with_added_tokens=True).items():
            if token in added:  # matched in raw text: specials stand for no text, the others for their own
                pieces[i] = (token.encode("utf-8"), added[token])
            elif byte_fallback and _BYTE_FALLBACK.fullmatch(token):
                pieces[i] = (bytes([int(token[3:5], 16)]), False)
            elif byte_level and _BYTE_LEVEL_ALPHABET.issuperset(token):
                pieces[i] = (bytes(_BYTE_OF_SYMBOL[c] for c in token), False)
            else:
                pieces[i] = (token.replace(_METASPACE, " ").encode("utf-8"), False)
        return pieces


def training_inputs(data: DataConfig, config: TokenizerConfig, seed: int) -> dict:
    """What a tokenizer trained on the train split of the data depends on: the trainer's settings, the sources as
    written (mixing weights aside: the trainer takes the sources in turn; fields at their defaults aside, so a field
    added to SourceConfig later changes no record), the path, size and mtime of every file they read, and what
    decides the split it leaves out (data/splits.py)."""
    written = [source.model_dump(mode="json", exclude={"weight"}, exclude_defaults=True) for source in data.sources]
    return {"settings": config.model_dump(mode="json", include=TRAINER_SETTINGS), "sources": written,
            "files": [list(state) for state in file_states(data.sources)], "split": split_settings(data, seed)}


def recorded_inputs(path: str | os.PathLike) -> dict | None:
    """What the tokenizer at `path` was trained on, by the record beside it; None without one (a tokenizer from
    before records, or one put there by hand) or when the record is of another tokenizer."""
    try:
        record = json.loads(layout.tokenizer_record(Path(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    return record.get("trained_on") if record.get("tokenizer_hash") == Tokenizer.load(path).hash else None


def changed_inputs(then: dict, now: dict) -> str | None:
    """The first difference between what a tokenizer was trained on and what it would be trained on now, in
    words ("stories.txt has changed: 0 bytes then, 9,120 now"); None when there is none."""
    for key, value in now["settings"].items():
        if then["settings"].get(key) != value:
            return f"tokenizer.{key} was {then['settings'].get(key)!r}, now {value!r}"
    for number, (old, new) in enumerate(itertools.zip_longest(then["sources"], now["sources"])):
        if old != new:
            return f"data.sources[{number}] was {json.dumps(old)}, now {json.dumps(new)}"
    if then.get("split") != now["split"]:
        before = json.dumps(then["split"]) if "split" in then else "not recorded (validation text was read too)"
        return f"the validation split it leaves out was {before}, now {json.dumps(now['split'])}"
    before = {path: (size, mtime) for path, size, mtime in then["files"]}
    for path, size, mtime in now["files"]:
        if path not in before:
            return f"{path} is new"
        size_then, mtime_then = before.pop(path)
        if (size_then, mtime_then) != (size, mtime):
            sizes = f"{size_then:,} bytes then, {size:,} now" if size_then != size else "same size, modified since"
            return f"{path} has changed: {sizes}"
    return f"{next(iter(before))} is gone" if before else None


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object with bos_token, eos_token, pad_token")
    return config


def _token_name(value: object) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # older files write {"content": ...}


def _chat_template(folder: Path, config: dict | None) -> str | None:
    """The tokenizer's own template: chat_template.jinja beside it (where transformers 5 saves it), else the
    tokenizer_config.json's; of the multi-template form (a list), the one named default."""
    if (folder / TEMPLATE_NAME).is_file():
        return (folder / TEMPLATE_NAME).read_text(encoding="utf-8") or None
    template = (config or {}).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def _types(component: dict | None) -> set[str]:
    """The types of a tokenizer.json pipeline component, through Sequence nesting."""
    if not component:
        return set()
    nested = component.get("decoders") or component.get("pretokenizers") or []
    return {component.get("type")}.union(*(_types(part) for part in nested))


def _first_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    """The texts until `budget` UTF-8 bytes have been given, the last one cut to fit."""
    for text in texts:
        encoded = text.encode("utf-8")
        if len(encoded) >= budget:
            yield encoded[:budget].decode("utf-8", errors="ignore")  # the cut may split a character
            return
        budget -= len(encoded)
        yield text
