"""Reading a source into datatrove documents: its files (.txt, .jsonl(.gz/.zst), .parquet), a Hugging Face dataset
or a built-in corpus, each document tagged with its source's name. Records without usable text are counted by kind,
their first locations kept for the report, or, under --strict, fail the run.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import HuggingFaceDatasetReader
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader

from fermion.config import SourceConfig
from fermion.data.sources import PREPARE_SUFFIXES, DataError, expand_paths, iter_documents

PROBLEM, PROBLEM_AT = "problem:", "problem_at:"  # stat names of the readers' bad-record counts and locations
FIRST_PROBLEMS = 5  # locations of each kind of bad record a task keeps for the report


def source_files(source: SourceConfig) -> list[str]:
    """The files a source reads, as absolute paths in a fixed order."""
    return [os.path.abspath(path) for path in expand_paths(source, PREPARE_SUFFIXES)]


class _RecordChecks:
    """For readers: a record without usable text is counted by kind, its location kept among the first few
    (as stat names, so they travel with datatrove's per-task stats), or under --strict fails the run."""

    source: SourceConfig
    strict: bool

    def bad_record(self, kind: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {kind} (--strict stops at the first bad record)")
        self.stat_update(PROBLEM + kind)
        if self.stats[PROBLEM + kind].total <= FIRST_PROBLEMS:
            self.stat_update(f"{PROBLEM_AT}{kind}|{where}")

    def document(self, record: dict, where: str) -> Document | None:
        field = self.source.text_field
        text = record.get(field)
        if not isinstance(text, str):
            detail = f"no {field!r} field" if field not in record else f"field {field!r} is not text"
            self.bad_record(detail, f"{where} (fields: {', '.join(map(str, record)) or 'none'})")
            return None
        if not text.strip():
            return None
        return Document(text=text, id=where, metadata={"source": self.source.name})


class SourceFileReader(_RecordChecks, BaseDiskReader):
    """A source's files. datatrove's disk reader shards them across tasks and counts them; fermion reads each
    format: .txt (split on the source's separator), .jsonl(.gz/.zst) line by line, .parquet by its text column."""

    name = "📄 Source files"

    def __init__(self, source: SourceConfig, folder: str, paths_file: str, strict: bool):
        super().__init__(folder, paths_file=paths_file, add_file_path=False)
        self.source, self.strict = source, strict

    def read_file(self, filepath: str) -> DocumentsPipeline:
        path = self.data_folder.resolve_paths(filepath)
        if path.endswith(".txt"):
            return self._text_documents(path)
        if path.endswith(".parquet"):
            return self._parquet_documents(filepath, path)
        return self._jsonl_documents(filepath, path)

    def _text_documents(self, path: str) -> DocumentsPipeline:
        one_file = self.source.model_copy(update={"paths": [path], "dataset": None, "builtin": None,
                                                  "max_documents": None})
        for number, text in enumerate(iter_documents(one_file), start=1):
            yield Document(text=text, id=f"{path}#{number}", metadata={"source": self.source.name})

    def _jsonl_documents(self, filepath: str, path: str) -> DocumentsPipeline:
        import orjson

        try:
            with self.data_folder.open(filepath, "rb", compression="infer") as raw:
                # zstandard's reader has no readline: buffering gives every compression line iteration
                for number, line in enumerate(io.BufferedReader(raw), start=1):
                    where = f"{path}:{number}"
                    try:
                        record = orjson.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        self.bad_record("not valid UTF-8", where)
                        continue
                    except orjson.JSONDecodeError:
                        if line.strip():
                            self.bad_record("not valid JSON", where)
                        continue
                    if not isinstance(record, dict):
                        self.bad_record("not a JSON object", where)
                        continue
                    document = self.document(record, where)
                    if document is not None:
                        yield document
        except (OSError, EOFError) as err:  # a truncated or corrupt .gz/.zst
            raise DataError(f"{path}: cannot be read ({err})") from None

    def _parquet_documents(self, filepath: str, path: str) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        field = self.source.text_field
        with self.data_folder.open(filepath, "rb") as raw, pq.ParquetFile(raw) as table:
            if field not in table.schema_arrow.names:
                raise DataError(f"{path}: no column {field!r} (it has: {', '.join(table.schema_arrow.names)}); "
                                "set text_field to the column that holds the text")
            rows = itertools.chain.from_iterable(batch.column(0).to_pylist()
                                                 for batch in table.iter_batches(columns=[field]))
            for number, text in enumerate(rows, start=1):
                document = self.document({field: text}, f"{path}#{number}")
                if document is not None:
                    yield document


class DatasetReader(_RecordChecks, HuggingFaceDatasetReader):
    """A Hugging Face dataset (a Hub name or a folder written by save_to_disk), sharded by datatrove across tasks."""

    def __init__(self, source: SourceConfig, strict: bool):
        local = (Path(source.dataset) / "dataset_info.json").is_file()
        options = {"split": source.split, **({"name": source.subset} if source.subset else {})}
        super().__init__(source.dataset, dataset_options=None if local else options, load_from_disk=local,
                         streaming=source.streaming and not local)
        self.source, self.strict = source, strict

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str) -> Document | None:
        return self.document(data, f"{source_file}[{self.source.split}]#{id_in_file}")


class BuiltinReader(BaseReader):
    """A builtin source (the running Python's standard library, or fermion's generated data), read by the first
    task."""

    name = "🐍 Built-in corpus"

    def __init__(self, source: SourceConfig):
        super().__init__()
        self.source = source

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if rank != 0:
            return
        builtin_only = self.source.model_copy(update={"paths": [], "dataset": None})
        for number, text in enumerate(iter_documents(builtin_only), start=1):
            document = Document(text=text, id=f"{self.source.builtin}#{number}", metadata={"source": self.source.name})
            self.update_doc_stats(document)
            yield document


class FirstDocuments(PipelineStep):
    """Passes on the first `limit` documents: a source's max_documents (such a source is read by one task)."""

    type = "✂️ - LIMIT"
    name = "🔢 First documents"

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        yield from itertools.islice(data, self.limit)

