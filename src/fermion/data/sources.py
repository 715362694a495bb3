"""Reading raw documents from the files (or built-in corpus) a `SourceConfig` names.

Everything streams: files are read line by line, and a Hugging Face dataset row by row (with `streaming: true`
without downloading it whole first), so a corpus larger than memory is fine as long as no single document is.
`DocumentStream` holds a source's position, so an interrupted pass can go on at the same next document. Any
problem with the input becomes a `DataError` whose one-line message names the file, the line and what would be
right.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from fermion.config import SourceConfig, file_states, matching_files, no_match_message

# The files a source may name, by how their names end; the one list every reader checks (config validation only
# checks that a path or glob matches files: matching_files). A last suffix .gz or .zst is decompressed (open_bytes).
DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")  # documents to pretrain on and train tokenizers
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")  # SFT/DPO records
PREPARE_SUFFIXES = (*DOCUMENT_SUFFIXES, ".parquet")  # `fermion prepare` reads parquet too (its output is .jsonl.gz)
# Folders of the standard library that are not representative Python (tests, vendored tools) or not stdlib at all.
EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
T = TypeVar("T")


class DataError(ValueError):
    """Input data that cannot be used; the message is meant to be shown to the user as is."""


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Yield the source's documents in a deterministic order, at most `source.max_documents` of them."""
    return iter(DocumentStream(source))


class DocumentStream:
    """A source's documents in order (its files, its dataset's rows, its builtin corpus), at most max_documents,
    with a position that can be saved and restored, so that an interrupted pass resumes at the same next document.

    The position is the number of documents taken from each of the three parts. For the dataset it also holds
    `datasets`' own IterableDataset state (shard and row), which resumes a streamed Hub corpus without reading
    the rows before it again; files and builtins are skipped through, being local.
    """

    PARTS = ("files", "dataset", "builtin")

    def __init__(self, source: SourceConfig):
        self.source = source
        self.files = expand_paths(source)  # resolved first, so a bad path fails before any reading starts
        self.consumed = dict.fromkeys(self.PARTS, 0)
        self._rows = None  # the dataset as an IterableDataset, once reading reaches it
        self._dataset_state: dict | None = None  # its state to resume from (load_state_dict)

    @property
    def position(self) -> int:
        """Documents consumed so far."""
        return sum(self.consumed.values())

    def state_dict(self) -> dict:
        rows = self._rows.state_dict() if self._rows is not None and self.consumed["dataset"] else None
        return {"source": self.source.name, "consumed": dict(self.consumed), "dataset": rows}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`'s position; call before iterating."""
        if state.get("source") != self.source.name or set(state.get("consumed", {})) != set(self.PARTS):
            raise DataError(f"source {self.source.name!r}: the saved position is of another source "
                            f"({state.get('source')!r}); start the pass afresh")
        self.consumed = {part: int(state["consumed"][part]) for part in self.PARTS}
        self._dataset_state = state.get("dataset")

    def __iter__(self) -> Iterator[str]:
        limit = self.source.max_documents
        for part in self.PARTS:
            room = None if limit is None else limit - self.position
            if room == 0:
                return
            for text in itertools.islice(self._part(part), room):  # never reads a row past the limit
                self.consumed[part] += 1
                yield text

    def _part(self, part: str) -> Iterator[str]:
        """The part's documents after those already consumed."""
        skip, source = self.consumed[part], self.source
        if part == "files":
            documents = itertools.chain.from_iterable(_file_documents(path, source) for path in self.files)
        elif part == "dataset" and source.dataset is not None:
            self._rows, first = dataset_rows(source), 0
            if skip and self._dataset_state is not None:
                self._rows.load_state_dict(self._dataset_state)  # datasets goes to the same row itself
                first, skip = skip, 0
            documents = (_record_text(row, source.text_field, f"{source.dataset}[{source.split}]#{number}")
                         for number, row in enumerate(_read_rows(self._rows, source), start=first))
        elif part == "builtin" and source.builtin == "python-stdlib":
            documents = _stdlib_documents()
        elif part == "builtin" and source.builtin is not None:
            documents = _generated(source, "documents")
        else:
            return iter(())
        return itertools.islice(documents, skip, None)


def interleave_documents(sources: Iterable[SourceConfig]) -> Iterator[str]:
    """Round-robin over the sources' documents, so a budget-capped consumer (tokenizer training) sees every source."""
    return interleave(iter_documents(source) for source in sources)


def interleave(streams: Iterable[Iterator[T]]) -> Iterator[T]:
    """One item of each stream in turn, until all are spent."""
    active, done = list(streams), object()
    while active:
        for stream in list(active):
            item = next(stream, done)
            if item is done:
                active.remove(stream)
            else:
                yield item


def iter_records(source: SourceConfig) -> Iterator[tuple[str, dict]]:
    """(where, record) for each JSON object of a source: jsonl lines, a .json file's array, or a Hugging Face
    dataset's rows. `where` ("file:line", "file[index]", "dataset[split]#row") is what error messages cite."""
    files = expand_paths(source, RECORD_SUFFIXES)
    records = itertools.chain.from_iterable(file_records(path) for path in files)
    if source.dataset is not None:
        records = itertools.chain(records, _dataset_records(source))
    if source.builtin is not None:
        records = itertools.chain(records, ((f"builtin {source.builtin} #{i}", record) for i, record
                                            in enumerate(_generated(source, "records"))))
    return itertools.islice(records, source.max_documents)


def _generated(source: SourceConfig, kind: str) -> Iterator:
    """fermion's generated data (data/synthetic/) for a `builtin:` source: documents to pretrain on, or records
    for SFT/DPO; a builtin of the other kind is refused with the names that would do."""
    from fermion.data import synthetic

    names = synthetic.GENERATED_DOCUMENTS if kind == "documents" else synthetic.GENERATED_RECORDS
    if source.builtin not in names:
        use = "pretraining data" if kind == "documents" else "sft/dpo records"
        raise DataError(f"source {source.name!r}: builtin {source.builtin!r} cannot be used as {use}; builtins that "
                        f"can: {', '.join(names if kind == 'records' else ('python-stdlib', *names))}")
    make = synthetic.generated_documents if kind == "documents" else synthetic.generated_records
    return make(source.builtin, source.max_documents, source.seed)


def file_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) for each object of one .jsonl / .jsonl.gz file (or a .json file's array)."""
    path = str(path)
    if path.endswith(".json"):
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a valid UTF-8 JSON file ({err}); expected an array of objects") from None
        if isinstance(data, dict):  # {"data": [...]}-style wrappers are common; take the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects at the top level, got {type(data).__name__}")
        for index, record in enumerate(data):
            yield _checked_record(record, f"{path}[{index}]")
        return
    for number, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); "
                            "each line must be one JSON object") from None
        yield _checked_record(record, f"{path}:{number}")


def _checked_record(record: object, where: str) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def _dataset_records(source: SourceConfig) -> Iterator[tuple[str, dict]]:
    for index, row in enumerate(_read_rows(dataset_rows(source), source)):
        yield f"{source.dataset}[{source.split}]#{index}", dict(row)


def _read_rows(rows, source: SourceConfig) -> Iterator[dict]:
    """The rows, with a failure while reading them (a streamed file that breaks off, a bad file) as a DataError."""
    try:
        yield from rows
    except Exception as err:  # as in dataset_rows: datasets and the file systems under it raise many types
        raise DataError(f"source {source.name!r}: reading dataset {source.dataset!r} failed "
                        f"({type(err).__name__}: {err})") from None


def dataset_rows(source: SourceConfig):
    """The rows of a source's Hugging Face dataset (a name on the Hub, a local folder of data files, or a folder
    written by `save_to_disk`) as a `datasets.IterableDataset`: read as it goes when the source sets streaming,
    else downloaded and cached whole by `datasets` first. Either way it can save and restore its position."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"source {source.name!r}: reading a dataset needs the 'datasets' package "
                        "(pip install datasets)") from None
    try:
        if Path(source.dataset).is_dir() and (Path(source.dataset) / "dataset_info.json").is_file():
            table = datasets.load_from_disk(source.dataset)
            if isinstance(table, datasets.DatasetDict):
                table = table[source.split]
        else:
            table = datasets.load_dataset(source.dataset, source.subset, split=source.split,
                                          streaming=source.streaming)
    except Exception as err:  # datasets raises many unrelated types (network, missing split, bad files)
        raise DataError(f"source {source.name!r}: cannot load dataset {source.dataset!r}"
                        f"{f' ({source.subset})' if source.subset else ''} split {source.split!r} "
                        f"({type(err).__name__}: {err})") from None
    return table if isinstance(table, datasets.IterableDataset) else table.to_iterable_dataset()


def expand_paths(source: SourceConfig, suffixes: tuple[str, ...] = DOCUMENT_SUFFIXES) -> list[str]:
    """The files the source's paths and globs name, sorted and without duplicates."""
    files: set[str] = set()
    for pattern in source.paths:
        matches = matching_files(pattern)
        if not matches:
            raise DataError(f"source {source.name!r}: {no_match_message(pattern)}")
        files.update(matches)
    for path in files:
        if not path.endswith(suffixes):
            raise DataError(f"{path}: unsupported file type in source {source.name!r}; use {', '.join(suffixes)} files")
    return sorted(files)


def what_sources_read(sources: list[SourceConfig]) -> str:
    """What each source reads, for messages about what came of it: its files with their sizes (an empty one is the
    usual culprit), its dataset, its builtin corpus."""
    parts = []
    for source in sources:
        files = [f"{path} ({size:,} bytes)" for path, size, _ in file_states([source])]
        read = files[:3] + [f"{len(files) - 3} more files"] * (len(files) > 3)
        read += [f"dataset {source.dataset!r}"] * (source.dataset is not None)
        read += [f"builtin {source.builtin!r}"] * (source.builtin is not None)
        parts.append(f"{source.name!r} reads {', '.join(read) or 'nothing'}")
    return "; ".join(parts)


def no_documents(sources: list[SourceConfig], purpose: str = "") -> str:
    """The one message for sources that yield no document (`purpose`: "to train the tokenizer on")."""
    purpose = f" {purpose}" if purpose else ""
    return (f"data.sources yielded no documents{purpose} ({what_sources_read(sources)}); add text to them (blank "
            "documents are skipped)")


def _file_documents(path: str, source: SourceConfig) -> Iterator[str]:
    if path.endswith(".txt"):
        return _text_documents(path, source.separator)
    return _jsonl_documents(path, source.text_field)


def _text_documents(path: str, separator: str | None) -> Iterator[str]:
    lines = (line for _, line in _numbered_lines(path))
    if separator is None:
        text = "".join(lines)
        if text.strip():
            yield text
        return
    for document in _split_stream(lines, separator):
        document = document.strip()
        if document:
            yield document


def _split_stream(chunks: Iterable[str], separator: str) -> Iterator[str]:
    """Split streamed text on `separator`, scanning each character about once even for very long documents."""
    keep = len(separator) - 1  # a separator can straddle two chunks, so the end of each chunk is searched again
    current: list[str] = []  # the current document's text that can no longer be part of a separator
    carry = ""
    for chunk in chunks:
        *complete, rest = (carry + chunk).split(separator)
        if complete:
            complete[0] = "".join(current) + complete[0]
            current = []
            yield from complete
        cut = max(0, len(rest) - keep)
        current.append(rest[:cut])
        carry = rest[cut:]
    yield "".join(current) + carry


def _jsonl_documents(path: str, field: str) -> Iterator[str]:
    for where, record in file_records(path):
        yield _record_text(record, field, where)


def _record_text(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DataError(
            f"{where}: record has no field {field!r} (it has: {', '.join(map(str, record)) or 'none'}); "
            "set text_field to the field that holds the text"
        )
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    return text


def open_bytes(path: str) -> BinaryIO:
    """A file opened for reading lines of bytes, decompressed when its name ends in .gz or .zst."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # zstandard's own reader cannot iterate lines
    return open(path, "rb")


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs of a UTF-8 file, decompressed by open_bytes."""
    try:
        with open_bytes(path) as raw:
            for number, line in enumerate(raw, start=1):
                try:
                    yield number, line.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not valid UTF-8 text; re-encode the file as UTF-8") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError, a truncated .gz an EOFError
        raise DataError(f"{path}: cannot be read ({err})") from None


def _stdlib_documents() -> Iterator[str]:
    """The running Python's standard library .py files, one document each, in order of relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for relative in sorted(_stdlib_files(root), key=lambda path: path.as_posix()):
        try:
            text = (root / relative).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately undecodable test data
        if text.strip():
            yield text


def _stdlib_files(root: Path) -> Iterator[Path]:
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in EXCLUDED_STDLIB_DIRS]
        for name in names:
            if name.endswith(".py"):
                yield Path(folder, name).relative_to(root)
