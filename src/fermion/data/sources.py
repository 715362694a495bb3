"""Reading raw documents from the files (or built-in corpus) a `SourceConfig` names.

Everything streams: files are read line by line, so a corpus larger than memory is fine as long as no single
document is. Any problem with the input becomes a `DataError` whose one-line message names the file, the line and
what would be right.
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
from typing import BinaryIO

from fermion.config import SourceConfig, matching_files, no_match_message

# The files a source may name, by how their names end; the one list every reader checks (config validation only
# checks that a path or glob matches files: matching_files). A last suffix .gz or .zst is decompressed (open_bytes).
DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")  # documents to pretrain on and train tokenizers
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")  # SFT/DPO records
PREPARE_SUFFIXES = (*DOCUMENT_SUFFIXES, ".parquet")  # `fermion prepare` reads parquet too (its output is .jsonl.gz)
# Folders of the standard library that are not representative Python (tests, vendored tools) or not stdlib at all.
EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


class DataError(ValueError):
    """Input data that cannot be used; the message is meant to be shown to the user as is."""


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Yield the source's documents in a deterministic order, at most `source.max_documents` of them."""
    files = expand_paths(source)  # resolved first, so a bad path fails before any reading starts
    documents = itertools.chain.from_iterable(_file_documents(path, source) for path in files)
    if source.builtin == "python-stdlib":
        documents = itertools.chain(documents, _stdlib_documents())
    elif source.builtin is not None:
        documents = itertools.chain(documents, _generated(source, "documents"))
    return itertools.islice(documents, source.max_documents)


def interleave_documents(sources: Iterable[SourceConfig]) -> Iterator[str]:
    """Round-robin over the sources' documents, so a budget-capped consumer (tokenizer training) sees every source."""
    streams = [iter_documents(source) for source in sources]
    while streams:
        for stream in list(streams):
            document = next(stream, None)
            if document is None:
                streams.remove(stream)
            else:
                yield document


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
    """Rows of a Hugging Face dataset: a name on the Hub (downloaded and cached by `datasets`) or a local folder
    written by `save_to_disk`."""
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
            table = datasets.load_dataset(source.dataset, source.subset, split=source.split)
    except Exception as err:  # datasets raises many unrelated types (network, missing split, bad files)
        raise DataError(f"source {source.name!r}: cannot load dataset {source.dataset!r}"
                        f"{f' ({source.subset})' if source.subset else ''} split {source.split!r} "
                        f"({type(err).__name__}: {err})") from None
    for index, row in enumerate(table):
        yield f"{source.dataset}[{source.split}]#{index}", dict(row)


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
