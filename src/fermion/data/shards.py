"""Tokenized shards on disk, and the loaders that read training and validation windows from them.

A shard directory holds, per split and source, raw little-endian token files plus the start offset of every
document inside each file, all described by one index.json:

    index.json
    <source>-train-00000.bin        tokens (uint16, or uint32 for vocabularies over 65535), np.memmap-able
    <source>-train-00000.docs.npy   int64 start offset of each document in that .bin (np.save format)
    <source>-val-00000.bin ...

Every document is stored as its tokens followed by one eos token; no document is split across files. Which split a
document goes to is data/splits.py's to say (a one-document source is cut in two: its last val_fraction of text
is a document of the val split).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fermion.atomic import replaced_dir
from fermion.config import DataConfig, SourceConfig, file_states
from fermion.data.sources import DataError, no_documents
from fermion.data.splits import source_pieces, split_settings, stable_hash
from fermion.data.tokenizer import Tokenizer
from fermion.layout import SHARD_INDEX

FORMAT = "fermion-shards/1"
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # text per worker task: enough to amortise inter-process traffic, small enough to stream
BLOCK = 65536  # samples per block of source draws; any sample's source is reproducible from its block alone
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # source names become file names
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)")

Progress = Callable[[str, int, int], None]
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs x and targets y, int64 [batch, seq_len]
Writers = dict[str, dict[str, "_ShardWriter"]]  # source name -> split -> writer
EncodedBatch = tuple[str, int, list[str], list[np.ndarray], list[int]]  # see _encoded_batches


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every token id."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


# ---------------------------------------------------------------------------------------------- writing


def write_shards(
    data: DataConfig, tokenizer: Tokenizer, out_dir: str | os.PathLike, seed: int, progress: Progress | None = None
) -> dict:
    """Tokenize every source into `out_dir` and return the index; reuse what is there if it was made the same way.

    `progress(source_name, documents, tokens)` is called after each batch with that source's running totals.
    The work happens in a temporary sibling directory renamed into place at the end, so an interrupted run
    leaves `out_dir` as it was. Workers are spawned, not forked, so a script calling this must do so under
    `if __name__ == "__main__":`.
    """
    out_dir = Path(out_dir).absolute()  # so that "." still has a name for the temporary sibling
    _remove_stale_temporaries(out_dir)
    fingerprint = data_fingerprint(data, tokenizer, seed)
    existing = _reusable_index(out_dir, fingerprint)
    if existing is not None:
        return existing
    _check_source_names(data.sources)
    with replaced_dir(out_dir, SHARD_INDEX, DataError, "a shard directory") as temporary:
        writers = _tokenize_sources(temporary, data, tokenizer, seed, progress)
        index = _build_index(writers, data, tokenizer, fingerprint)
        (temporary / SHARD_INDEX).write_text(json.dumps(index, indent=1))
    return index


def data_fingerprint(data: DataConfig, tokenizer: Tokenizer, seed: int) -> str:
    """Identifies what the shards' content depends on (file layout settings like shard_tokens aside): the sources
    as written and their files as they are now (an edited file makes the shards anew), the tokenizer, the split."""
    made_from = {
        "format": FORMAT,
        "sources": [source.model_dump(mode="json") for source in data.sources],
        "files": file_states(data.sources),
        "split": split_settings(data, seed),
        "seed": seed,
        "tokenizer": tokenizer.hash,
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode("utf-8")).hexdigest()


def _reusable_index(out_dir: Path, fingerprint: str) -> dict | None:
    if not (out_dir / SHARD_INDEX).is_file():
        if out_dir.is_dir() and any(out_dir.iterdir()):  # never replace a directory we did not make
            raise DataError(
                f"{out_dir}: exists and is not a shard directory (no {SHARD_INDEX}); "
                "choose a new or empty data.shard_dir"
            )
        return None
    try:
        index = load_index(out_dir)
    except DataError:
        return None  # unreadable: make it again
    return index if index.get("fingerprint") == fingerprint else None


def _check_source_names(sources: list[SourceConfig]) -> None:
    seen: set[str] = set()
    for number, source in enumerate(sources):
        if not SOURCE_NAME.fullmatch(source.name):
            raise DataError(
                f"data.sources[{number}].name: {source.name!r} cannot be used in file names; "
                "use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        if source.name in seen:
            raise DataError(f"data.sources[{number}].name: {source.name!r} is used twice; source names must be unique")
        seen.add(source.name)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete what interrupted runs left behind, sparing directories of runs that are still going."""
    if not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and match["name"] == out_dir.name and not _is_other_live_process(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _is_other_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tokenize_sources(
    directory: Path, data: DataConfig, tokenizer: Tokenizer, seed: int, progress: Progress | None
) -> Writers:
    """Encode all documents into per-source, per-split writers, which are returned closed."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        source.name: {split: _ShardWriter(directory, source.name, split, dtype, data.shard_tokens) for split in SPLITS}
        for source in data.sources
    }
    for name, first, splits, documents, byte_counts in _encoded_batches(data, tokenizer, seed):
        for split, tokens, byte_count in zip(splits, documents, byte_counts, strict=True):
            writers[name][split].add(tokens, byte_count)
        if progress is not None:
            progress(name, first + len(documents), sum(writer.tokens for writer in writers[name].values()))
    _ensure_val_document(writers, data.fraction_held_out)  # none held out where sources are marked validation
    for writer in itertools.chain.from_iterable(split_writers.values() for split_writers in writers.values()):
        writer.close()
    return writers


def _ensure_val_document(writers: Writers, val_fraction: float) -> None:
    """A small dataset can draw no val document at all; then the largest source gives up its last one (a piece
    data/splits.py marks movable, so tokenizer training never read it)."""
    if val_fraction == 0 or any(split_writers["val"].documents for split_writers in writers.values()):
        return
    largest = max(writers.values(), key=lambda split_writers: split_writers["train"].tokens)
    document = largest["train"].take_last()
    if document is not None:
        largest["val"].add(*document)


def _build_index(writers: Writers, data: DataConfig, tokenizer: Tokenizer, fingerprint: str) -> dict:
    splits = {split: {"tokens": 0, "documents": 0, "shards": []} for split in SPLITS}
    sources = {}
    for source in data.sources:
        sources[source.name] = {"kind": source.kind, "weight": source.weight}
        for split, writer in writers[source.name].items():
            sources[source.name][split] = writer.totals()
            splits[split]["tokens"] += writer.tokens
            splits[split]["documents"] += writer.documents
            splits[split]["shards"] += writer.shards
    _check_splits(splits, data)
    return {
        "format": FORMAT,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "fingerprint": fingerprint,
        "sources": sources,
        "splits": splits,
    }


def _check_splits(splits: dict, data: DataConfig) -> None:
    if not splits["train"]["documents"] and not splits["val"]["documents"]:
        raise DataError(no_documents(data.sources))
    marked = [source for source in data.sources if source.validation]
    if not splits["train"]["documents"]:
        unmarked = [source for source in data.sources if not source.validation]
        raise DataError(no_documents(unmarked, "to train on") if marked else
                        f"the train split is empty: all {splits['val']['documents']} document(s) went to val; lower "
                        "data.val_fraction or add data")
    if marked and not splits["val"]["documents"]:
        raise DataError(no_documents(marked, "for validation (the sources marked validation)"))


class _ShardWriter:
    """Appends one source's documents of one split to numbered .bin files of at most `limit` tokens each."""

    def __init__(self, directory: Path, source: str, split: str, dtype: np.dtype, limit: int):
        self.directory, self.source, self.split, self.dtype, self.limit = directory, source, split, dtype, limit
        self.tokens = self.documents = self.bytes = 0  # totals, including the held-back document
        self.shards: list[dict] = []  # index entries of the finished files
        self._file = None
        self._starts: list[int] = []  # offsets of the documents in the open file
        self._held: tuple[np.ndarray, int] | None = None  # newest document, unwritten so take_last can move it

    def add(self, tokens: np.ndarray, byte_count: int) -> None:
        if self._held is not None:
            self._write(self._held[0])
        self._held = (tokens, byte_count)
        self._count(tokens, byte_count, +1)

    def take_last(self) -> tuple[np.ndarray, int] | None:
        """Remove and return the most recently added document (tokens, UTF-8 bytes), if any."""
        held, self._held = self._held, None
        if held is not None:
            self._count(*held, -1)
        return held

    def close(self) -> None:
        if self._held is not None:
            self._write(self._held[0])
            self._held = None
        if self._file is not None:
            self._finish_file()

    def totals(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}

    def _count(self, tokens: np.ndarray, byte_count: int, sign: int) -> None:
        self.tokens += sign * len(tokens)
        self.documents += sign
        self.bytes += sign * byte_count

    def _write(self, tokens: np.ndarray) -> None:
        if self._file is not None and self._file_tokens() + len(tokens) > self.limit:
            self._finish_file()
        if self._file is None:
            self._file = open(self.directory / f"{self._stem()}.bin", "wb")
        self._starts.append(self._file_tokens())
        self._file.write(tokens.tobytes())

    def _file_tokens(self) -> int:
        return self._file.tell() // self.dtype.itemsize

    def _finish_file(self) -> None:
        stem = self._stem()
        file_tokens = self._file_tokens()
        self._file.close()
        self._file = None
        np.save(self.directory / f"{stem}.docs.npy", np.array(self._starts, dtype=np.int64))
        self.shards.append(
            {"file": f"{stem}.bin", "source": self.source, "tokens": file_tokens, "documents": len(self._starts)}
        )
        self._starts = []

    def _stem(self) -> str:
        return f"{self.source}-{self.split}-{len(self.shards):05d}"


# ---------------------------------------------------------------------------------------------- parallel encoding

_worker_tokenizer: Tokenizer | None = None  # set once in each worker process by _start_worker


def _start_worker(tokenizer: Tokenizer) -> None:
    """`tokenizer` arrives pickled, whole: its vocabulary and the names of its bos/eos/pad tokens."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; nested threads would only contend
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
    """All texts' tokens, each followed by eos, concatenated; plus each document's token and UTF-8 byte counts."""
    tokenizer = _worker_tokenizer
    encoded = tokenizer.encode_batch(texts)
    eos = [tokenizer.eos_id]
    dtype = token_dtype(tokenizer.vocab_size)
    flat = np.fromiter(itertools.chain.from_iterable(ids + eos for ids in encoded), dtype=dtype)
    return flat, [len(ids) + 1 for ids in encoded], [len(text.encode("utf-8")) for text in texts]


def _encoded_batches(data: DataConfig, tokenizer: Tokenizer, seed: int) -> Iterator[EncodedBatch]:
    """(source name, number of its first piece, per-piece split, tokens and bytes), in corpus order."""
    # spawn, not fork: the parent may hold torch and tokenizers threads, which a forked child would inherit broken
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(data.num_workers, context, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        in_flight: deque[tuple[str, int, list[str], Future]] = deque()  # bounded: reading never runs far ahead
        for name, first, splits, texts in _document_batches(data, seed):
            in_flight.append((name, first, splits, pool.submit(_encode_in_worker, texts)))
            if len(in_flight) > 2 * data.num_workers:
                yield _split_result(*in_flight.popleft())
        while in_flight:
            yield _split_result(*in_flight.popleft())


def _split_result(name: str, first: int, splits: list[str], future: Future) -> EncodedBatch:
    flat, token_counts, byte_counts = future.result()
    return name, first, splits, np.split(flat, np.cumsum(token_counts)[:-1]), byte_counts


def _document_batches(data: DataConfig, seed: int) -> Iterator[tuple[str, int, list[str], list[str]]]:
    """(source name, number of the first piece, their splits, texts) in batches of about BATCH_CHARS characters."""
    for source in data.sources:
        first, splits, batch, size = 0, [], [], 0
        for split, text, _ in source_pieces(source, data, seed):
            splits.append(split)
            batch.append(text)
            size += len(text)
            if size >= BATCH_CHARS:
                yield source.name, first, splits, batch
                first, splits, batch, size = first + len(batch), [], [], 0
        if batch:
            yield source.name, first, splits, batch


# ---------------------------------------------------------------------------------------------- reading


def load_index(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / SHARD_INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; tokenize the data into {shard_dir} first") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err}); delete {shard_dir} and tokenize again") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise DataError(f"{path}: format is {found!r}, expected {FORMAT!r}; delete {shard_dir} and tokenize again")
    return index


def check_tokenizer(index: dict, tokenizer: Tokenizer, shard_dir: str | os.PathLike) -> None:
    if index["tokenizer_hash"] != tokenizer.hash:
        raise DataError(
            f"shards in {shard_dir} were made with tokenizer {index['tokenizer_hash'][:12]} but this run's tokenizer "
            f"is {tokenizer.hash[:12]}; re-run tokenization or point tokenizer.path at the tokenizer that made them"
        )


class ShardSet:
    """One split of a shard directory, memory-mapped read-only.

    Window k of a source is tokens[i*seq_len : i*seq_len + seq_len + 1] of one of its files (inputs plus the
    shifted targets); windows never cross files, and their numbering runs on from one file of the source to the next.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.index = load_index(self.shard_dir)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.sources = list(self.index["sources"])
        self.weights = {name: float(entry["weight"]) for name, entry in self.index["sources"].items()}
        self.tokens = int(self.index["splits"][split]["tokens"])
        self._shards: dict[str, list[dict]] = {name: [] for name in self.sources}  # each source's files, in order
        for shard in self.index["splits"][split]["shards"]:
            self._shards[shard["source"]].append(shard)
        self._maps = {shard["file"]: self._map(shard) for shard in self.index["splits"][split]["shards"]}
        self._window_ends: dict[tuple[str, int], np.ndarray] = {}

    def num_windows(self, source: str, seq_len: int) -> int:
        ends = self._cumulative_windows(source, seq_len)
        return int(ends[-1]) if len(ends) else 0

    def window(self, source: str, k: int, seq_len: int) -> np.ndarray:
        """int64 [seq_len + 1]: the k-th window of the source."""
        if not 0 <= k < self.num_windows(source, seq_len):
            raise IndexError(f"window {k} of source {source!r} does not exist at seq_len {seq_len}")
        ends = self._cumulative_windows(source, seq_len)
        file_number = int(np.searchsorted(ends, k, side="right"))
        start = (k - (int(ends[file_number - 1]) if file_number else 0)) * seq_len
        tokens = self._maps[self._shards[source][file_number]["file"]]
        return np.array(tokens[start : start + seq_len + 1], dtype=np.int64)

    def documents(self, source: str) -> list[tuple[str, int, int]]:
        """(file, start, end) of each document: file_tokens(file)[start:end] are its tokens, without the eos."""
        spans = []
        for shard in self._shards[source]:
            starts = np.load(self.shard_dir / (shard["file"].removesuffix(".bin") + ".docs.npy"))
            ends = np.append(starts[1:], shard["tokens"]) - 1  # each document ends with its eos token
            spans += [(shard["file"], int(start), int(end)) for start, end in zip(starts, ends, strict=True)]
        return spans

    def file_tokens(self, file: str) -> np.ndarray:
        return self._maps[file]

    def _map(self, shard: dict) -> np.ndarray:
        path = self.shard_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
            raise DataError(
                f"{path}: missing or not {shard['tokens']} tokens long; delete {self.shard_dir} and tokenize again"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],))

    def _cumulative_windows(self, source: str, seq_len: int) -> np.ndarray:
        key = (source, seq_len)
        if key not in self._window_ends:
            counts = [(shard["tokens"] - 1) // seq_len for shard in self._shards[source]]
            self._window_ends[key] = np.cumsum(np.array(counts, dtype=np.int64))
        return self._window_ends[key]


class TokenLoader:
    """Deterministic, resumable, distributed-aware training batches.

    There is one global, infinite sequence of samples. The source of sample n is drawn in proportion to the source
    weights by a generator seeded with (seed, n // BLOCK), so any position is reachable without replaying. The k-th
    sample of source s is window perm_e[k mod W_s] of a permutation seeded with (seed, s, e), e = k // W_s, so a
    small source repeats in a fresh order every epoch. Each batch consumes batch_size * world_size samples, of which
    rank r takes [r * batch_size, (r + 1) * batch_size): the global sequence is the same for any world size.
    """

    def __init__(self, shards: ShardSet, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(
                f"need seq_len >= 1, batch_size >= 1 and 0 <= rank < world_size; got {seq_len}, "
                f"{batch_size}, rank {rank} of {world_size}"
            )
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        usable = [i for i, name in enumerate(shards.sources) if shards.num_windows(name, seq_len)]
        if not usable:
            raise DataError(
                f"{shards.shard_dir}: no source of the {shards.split} split has {seq_len + 1} tokens in one file; "
                "use a shorter seq_len or more data"
            )
        self._source_numbers = usable  # positions in shards.sources, which seed the permutations
        self._names = [shards.sources[i] for i in usable]
        self._windows = [shards.num_windows(name, seq_len) for name in self._names]
        weights = np.array([shards.weights[name] for name in self._names])
        self._probabilities = weights / weights.sum()
        self.position = 0  # global samples consumed so far
        self._consumed = np.zeros(len(usable), dtype=np.int64)  # samples taken from each usable source
        self._block: tuple[int, np.ndarray] | None = None
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # per usable source: (epoch, permutation)

    def next_batch(self) -> Batch:
        """x and y, int64 [batch_size, seq_len], y being x shifted left by one token."""
        total = self.batch_size * self.world_size
        choices = self._source_choices(self.position, self.position + total)
        ordinals = self._take(choices)
        self.position += total
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        windows = np.stack([self._window(int(j), int(k)) for j, k in zip(choices[mine], ordinals[mine], strict=True)])
        return _inputs_and_targets(windows)

    def state_dict(self) -> dict:
        consumed = {name: int(count) for name, count in zip(self._names, self._consumed, strict=True)}
        return {"position": self.position, "consumed": consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key} {state.get(key)!r}, this loader {getattr(self, key)!r}")
        saved = sorted(state.get("consumed", {}))
        if saved != sorted(self._names):
            raise DataError(f"loader state covers sources {saved}, but this loader reads {sorted(self._names)}")
        self.position = int(state["position"])
        self._consumed = np.array([state["consumed"][name] for name in self._names], dtype=np.int64)

    def passes(self, batches: int) -> dict[str, float]:
        """How many times over its windows each source is drawn, on average, in the first `batches` batches."""
        samples = batches * self.batch_size * self.world_size
        shares = zip(self._names, self._probabilities, self._windows, strict=True)
        return {name: float(share * samples / windows) for name, share, windows in shares}

    def upsampling_notes(self, batches: int) -> list[str]:
        """A line for each source that `batches` batches repeat: its weight asks for more tokens than it holds."""
        total = batches * self.batch_size * self.world_size * self.seq_len
        return [
            f"upsampling: source '{name}' holds {windows * self.seq_len:,} tokens and is repeated {times:.1f} times "
            f"over this run (weight share {share:.2f} of {total:,} tokens)"
            for (name, times), share, windows in zip(self.passes(batches).items(), self._probabilities,
                                                     self._windows, strict=True)
            if times > 1
        ]

    def _source_choices(self, start: int, stop: int) -> np.ndarray:
        """The usable-source number of each global sample in [start, stop)."""
        pieces = []
        while start < stop:
            block, offset = divmod(start, BLOCK)
            count = min(stop - start, BLOCK - offset)
            pieces.append(self._block_choices(block)[offset : offset + count])
            start += count
        return np.concatenate(pieces)

    def _block_choices(self, block: int) -> np.ndarray:
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng(stable_hash("sources", self.seed, block))
            self._block = (block, rng.choice(len(self._names), size=BLOCK, p=self._probabilities))
        return self._block[1]

    def _take(self, choices: np.ndarray) -> np.ndarray:
        """For each sample, how many samples its source had given before it; advances the per-source counts."""
        ordinals = np.empty(len(choices), dtype=np.int64)
        for j in range(len(self._names)):
            chosen = choices == j
            count = int(chosen.sum())
            ordinals[chosen] = self._consumed[j] + np.arange(count)
            self._consumed[j] += count
        return ordinals

    def _window(self, j: int, k: int) -> np.ndarray:
        epoch, offset = divmod(k, self._windows[j])
        return self.shards.window(self._names[j], int(self._permutation(j, epoch)[offset]), self.seq_len)

    def _permutation(self, j: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(j)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(stable_hash("windows", self.seed, self._source_numbers[j], epoch))
            cached = self._permutations[j] = (epoch, rng.permutation(self._windows[j]))
        return cached[1]


def val_batches(shards: ShardSet, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
    """A fixed set of up to batch_size * n_batches windows, shared equally by the sources and evenly spaced in each.

    With fewer windows than that, all of them are used and the last batch may be smaller.
    """
    counts = np.array([shards.num_windows(name, seq_len) for name in shards.sources], dtype=np.int64)
    if not counts.sum():
        raise DataError(
            f"{shards.shard_dir}: the {shards.split} split has no {seq_len + 1} tokens in one file; "
            "raise data.val_fraction (or add to the sources marked validation) or use a shorter seq_len"
        )
    shares = _equal_shares(counts, min(batch_size * n_batches, int(counts.sum())))
    windows = [
        shards.window(name, int(k), seq_len)
        for name, count, share in zip(shards.sources, counts, shares, strict=True)
        for k in np.arange(share) * count // max(share, 1)
    ]
    return [_inputs_and_targets(np.stack(windows[i : i + batch_size])) for i in range(0, len(windows), batch_size)]


def _equal_shares(capacities: np.ndarray, wanted: int) -> np.ndarray:
    """Split `wanted` as equally as the capacities allow; what a small one cannot take goes to the larger ones."""
    shares = np.zeros_like(capacities)
    order = np.argsort(capacities, kind="stable")
    for position, j in enumerate(order):
        shares[j] = min(capacities[j], wanted // (len(order) - position))
        wanted -= shares[j]
    return shares


def _inputs_and_targets(windows: np.ndarray) -> Batch:
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
