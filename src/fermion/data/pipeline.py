"""`fermion prepare`: data.sources -> cleaned, filtered, deduplicated documents, with a report of what left and why.

The pipeline is built from datatrove's readers, filters, dedup stages, writers and executors, with fermion's own
steps (fermion.data.steps) where datatrove has none. It runs as a chain of datatrove executor runs ("stages"):

    clean-<source>      one per source: read -> normalize -> length -> prose rules (gopher_repetition,
                        gopher_quality, c4, fineweb) or, for sources of kind "code", the code rules
    exact_dedup-*       signatures -> duplicates -> filter, on a normalised copy of the text (datatrove's
                        simplify_text: lower case, no punctuation, collapsed whitespace)
    minhash-*           signatures -> buckets -> clusters -> filter
    final-<source>      one per source: decontaminate -> perplexity

Deduplication runs across all sources together: the same page in a web crawl and in a Wikipedia dump is one
document too many, whichever source it came from. Steps a recipe turns off are left out, and so are stages left
with no step. Every filter writes what it drops to `excluded/<step>/<source>/` (for `fermion prepare --inspect`).

Layout of a preparation, `<data.prepare.dir>/<plan>/`, where <plan> is a hash of everything the output depends
on (the sources as written, minus their mixing weights, and the step settings), so a changed recipe gets a fresh
folder and its shards a fresh fingerprint:

    inputs/<source>.txt            the files each source reads (datatrove's paths_file); a rerun checks them
    work/<pass>/<source>/*.jsonl.gz  documents between passes;  dedup/<exact_dedup|minhash>/  their signatures
    logs/<stage>/                  datatrove's logging dir: completions/, stats/<task>.json, logs/task_*.log
    excluded/<step>/<source>/*.jsonl.gz
    kept/<source>/*.jsonl.gz       what training reads: same source names, kinds and weights, field "text"
    prepare_report.json            written last: its presence is what makes the preparation usable

Re-running skips every task that datatrove marked complete. A failed or interrupted run writes no report, so
training never reads its partial output. Task counts depend on the input files only (one task per file, one for
a dataset, a built-in corpus or a source with max_documents), never on the number of workers, so an interrupted
run resumes with the same task split whatever the machine.

The numbers come from datatrove's own stats: a `Tally` step after the readers and after every step counts each
source's documents and characters (the tokenizer is trained on the result, so tokens are counted once, in the
shards); a filter's `dropped_<reason>` stats say why documents left. Readers count bad records (invalid JSON,
non-UTF-8 lines, a missing text field) by kind, with their first locations; `--strict` fails on the first.

The same recipe runs on datatrove's Slurm or Ray executor with `data.prepare.executor`, `executor_options` being
the executor's keyword arguments (partition and time are required for Slurm). Slurm jobs are submitted, chained
stage after stage, and the command returns: run it again once they have all finished (not before: datatrove would
submit the unfinished tasks a second time) to write the report, the tokenizer and the shards. Ray runs in the
command, on the cluster RAY_ADDRESS names or else a local one; its logs dir must be on storage all nodes share.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.logging import logger, setup_default_logger
from datatrove.utils.stats import MetricStats
from datatrove.utils.text import simplify_text
from datatrove.utils.word_tokenizers import WhitespaceTokenizer
from rich.console import Console
from rich.table import Table

from fermion.atomic import replaced_file
from fermion.config import DataConfig, PrepareConfig, Recipe, RecipeError, SourceConfig
from fermion.data.shards import SOURCE_NAME
from fermion.data.sources import DataError, expand_paths, file_records, iter_documents
from fermion.data.steps import (
    CodeQualityFilter,
    DecontaminationFilter,
    LengthFilter,
    NormalizeText,
    PerplexityFilter,
)

FORMAT = "fermion-prepare/1"
REPORT_NAME = "prepare_report.json"
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
OUTPUT_NAME = "${source}/${rank}.jsonl.gz"  # datatrove fills in the document's metadata and the task's rank
PROSE_STEPS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
CLEAN_STEPS = ("normalize", "length", *PROSE_STEPS, "code")  # the steps of the per-source clean pass
DEDUP_REASONS = {"exact_dedup": "duplicate", "minhash": "near_duplicate"}  # their filters give no reason of their own
PROBLEM, PROBLEM_AT = "problem:", "problem_at:"  # stat names of the readers' bad-record counts and locations
FIRST_PROBLEMS = 5  # locations of each kind of bad record a task keeps for the report


# ---------------------------------------------------------------------------------------------- reading sources


class EnglishWords(WhitespaceTokenizer):
    """Words and punctuation runs, for datatrove's English rules and MinHash shingles. datatrove's English word
    tokenizer needs spaCy, which fermion does not depend on; this splits text much as spaCy's blank English
    pipeline does (punctuation apart from words), and keeps datatrove's regex sentence splitter."""

    WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text)


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
        one_file = self.source.model_copy(update={"paths": [path], "builtin": None, "max_documents": None})
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
        super().__init__(source.dataset, dataset_options=None if local else options, load_from_disk=local)
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


class Tally(PipelineStep):
    """Counts, per source, the documents and characters that get past this point: the report's numbers.
    `label` names the step it follows ("read" after the readers, "input" at the start of a later pass)."""

    type = "📊 - STATS"
    name = "🧮 Tally"

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for document in data:
            source = document.metadata["source"]
            self.stat_update(f"documents:{source}")
            self.stat_update(f"chars:{source}", value=len(document.text), unit="doc")
            yield document


def normalized_content(document: Document) -> str:
    """What exact dedup compares: documents equal up to case, punctuation and spacing are duplicates."""
    return simplify_text(document.text)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """One preparation: its folder and what it reads."""

    recipe: Recipe
    root: Path

    @property
    def settings(self) -> PrepareConfig:
        return self.recipe.data.prepare

    @property
    def sources(self) -> list[SourceConfig]:
        return self.recipe.data.sources

    def kept_dir(self, source: str) -> Path:
        return self.root / "kept" / source

    def input_list(self, source: str) -> Path:
        return self.root / "inputs" / f"{source}.txt"


def make_plan(recipe: Recipe) -> Plan:
    settings = recipe.data.prepare
    base = Path(settings.dir) if settings.dir else recipe.run_dir / "prepared"
    return Plan(recipe, base / plan_id(recipe))


def plan_id(recipe: Recipe) -> str:
    """A hash of what the prepared documents depend on: the sources as written (weights aside: they only mix) and
    the step settings (where and how it runs aside)."""
    settings = recipe.data.prepare
    made_from = {
        "format": FORMAT,
        "sources": [source.model_dump(mode="json", exclude={"weight"}) for source in recipe.data.sources],
        "steps": settings.model_dump(mode="json", exclude={"dir", "workers", "executor", "executor_options"}),
        "eval_dir": str(settings.decontaminate.resolved_eval_dir().absolute()) if settings.decontaminate else None,
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def step_names(plan: Plan, source: SourceConfig) -> list[str]:
    """The steps a source goes through, in order."""
    settings = plan.settings
    if source.kind == "code":
        rules = ["code"] if settings.code else []
    else:
        rules = [name for name in PROSE_STEPS if getattr(settings, name)]
    names = ["normalize"] * settings.normalize + ["length"] * (settings.length is not None) + rules
    names += [name for name in ("exact_dedup", "minhash", "decontaminate", "perplexity") if getattr(settings, name)]
    return names


def check_plan(plan: Plan) -> None:
    """Problems worth knowing before any work starts."""
    names = [source.name for source in plan.sources]
    for number, name in enumerate(names):
        if not SOURCE_NAME.fullmatch(name) or names.index(name) != number:
            raise RecipeError(f"data.sources[{number}].name: {name!r} must be unique and usable as a folder name "
                              "(letters, digits, '.', '_', '-')")
    decontaminate = plan.settings.decontaminate
    if decontaminate is not None and not decontaminate.resolved_eval_dir().is_dir():
        raise RecipeError(f"data.prepare.decontaminate: evaluation data folder {decontaminate.resolved_eval_dir()} "
                          "not found; set its eval_dir (or $FERMION_EVAL_DATA), or decontaminate: false")
    if plan.settings.perplexity is not None and not Path(plan.settings.perplexity.checkpoint).exists():
        raise RecipeError(f"data.prepare.perplexity.checkpoint: {plan.settings.perplexity.checkpoint} not found")


def source_files(source: SourceConfig) -> list[str]:
    """The files a source reads, as absolute paths in a fixed order."""
    return [os.path.abspath(path) for path in expand_paths(source, FILE_SUFFIXES)]


def write_input_lists(plan: Plan) -> None:
    """inputs/<source>.txt: the source's files relative to their common folder. A rerun must read the same files,
    or datatrove's record of finished tasks would not describe its tasks."""
    for source in plan.sources:
        files = source_files(source)
        if not files:
            continue
        folder = _common_folder(files)
        listing = "".join(os.path.relpath(path, folder) + "\n" for path in files)
        path = plan.input_list(source.name)
        if path.is_file() and path.read_text(encoding="utf-8") != listing:
            raise DataError(f"the files of source {source.name!r} changed since {plan.root} was started; delete "
                            "that folder to prepare the data again")
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_file(path) as temporary:
            temporary.write_text(listing, encoding="utf-8")


def _common_folder(files: list[str]) -> str:
    return os.path.commonpath([os.path.dirname(path) for path in files])


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One executor run. A document pass (`sources` not empty) writes documents and is tallied for the report;
    a `shared` pass carries all sources at once."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int
    sources: tuple[str, ...] = ()
    shared: bool = False
    executor: PipelineExecutor | None = None  # set by build_stages

    @property
    def logging_dir(self) -> Path:
        return Path(self.executor.logging_dir.path)


def build_stages(plan: Plan, strict: bool) -> list[Stage]:
    """Every stage of the plan, each executor depending on the one before (Slurm chains the jobs that way)."""
    stages, previous = _stages(plan, strict), None
    for stage in stages:
        stage.executor = make_executor(plan.settings, stage.name, stage.pipeline, stage.tasks,
                                       plan.root / "logs" / stage.name, previous)
        previous = stage.executor
    return stages


def _stages(plan: Plan, strict: bool) -> list[Stage]:
    passes = ["clean"] + [name for name in ("exact_dedup", "minhash") if getattr(plan.settings, name)]
    passes += ["final"] * (plan.settings.decontaminate is not None or plan.settings.perplexity is not None)
    tasks = {source.name: _clean_tasks(source) for source in plan.sources}
    stages = []
    for number, name in enumerate(passes):
        source_dir = plan.root / "work" / passes[number - 1] if number else None
        out_dir = plan.root / "kept" if number == len(passes) - 1 else plan.root / "work" / name
        if name == "clean":
            stages += [_clean_stage(plan, source, tasks[source.name], out_dir, strict) for source in plan.sources]
        elif name == "final":
            stages += [_final_stage(plan, source, tasks[source.name], source_dir, out_dir) for source in plan.sources]
        else:
            dedup = _exact_dedup_stages if name == "exact_dedup" else _minhash_stages
            stages += dedup(plan, sum(tasks.values()), source_dir, out_dir)
    return stages


def _clean_tasks(source: SourceConfig) -> int:
    """One task per file: datatrove shards a source by file. A capped source is read whole by one task."""
    return 1 if source.max_documents else max(1, len(source_files(source)))


def _counted(readers: list[PipelineStep], steps: list[tuple[str, PipelineStep]], out_dir: Path,
             first_label: str) -> list[PipelineStep]:
    """readers -> Tally -> (step -> Tally)... -> writer."""
    pipeline = [*readers, Tally(first_label)]
    for name, step in steps:
        pipeline += [step, Tally(name)]
    return [*pipeline, JsonlWriter(str(out_dir), output_filename=OUTPUT_NAME)]


def _excluded(plan: Plan, step: str) -> JsonlWriter:
    return JsonlWriter(str(plan.root / "excluded" / step), output_filename=OUTPUT_NAME)


def _clean_stage(plan: Plan, source: SourceConfig, tasks: int, out_dir: Path, strict: bool) -> Stage:
    wanted = step_names(plan, source)
    steps = [(name, _clean_step(plan, name)) for name in wanted if name in CLEAN_STEPS]
    pipeline = _counted(_source_readers(plan, source, strict), steps, out_dir, "read")
    return Stage(f"clean-{source.name}", pipeline, tasks, (source.name,))


def _clean_step(plan: Plan, name: str) -> PipelineStep:
    settings, words = plan.settings, EnglishWords()
    if name == "normalize":
        return NormalizeText()
    exclusion = _excluded(plan, name)
    if name == "length":
        return LengthFilter(settings.length.min_chars, settings.length.max_chars, exclusion_writer=exclusion)
    if name == "code":
        return CodeQualityFilter(**settings.code.model_dump(), exclusion_writer=exclusion)
    rules = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
             "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
    return rules[name](exclusion_writer=exclusion, language=words)


def _source_readers(plan: Plan, source: SourceConfig, strict: bool) -> list[PipelineStep]:
    """Reads the source's files (listed by write_input_lists), dataset and built-in corpus, in that order."""
    readers: list[PipelineStep] = []
    files = source_files(source)
    if files:
        readers.append(SourceFileReader(source, _common_folder(files), str(plan.input_list(source.name)), strict))
    if source.dataset is not None:
        readers.append(DatasetReader(source, strict))
    if source.builtin is not None:
        readers.append(BuiltinReader(source))
    if source.max_documents:
        readers.append(FirstDocuments(source.max_documents))
    return readers


def _documents_of(folder: Path, shared: bool) -> JsonlReader:
    """A reader of a pass's output: <source>/<task>.jsonl.gz files under `folder`, or one source's folder."""
    return JsonlReader(str(folder), glob_pattern="*/*.jsonl.gz" if shared else "*.jsonl.gz", add_file_path=False)


def _exact_dedup_stages(plan: Plan, tasks: int, source_dir: Path, out_dir: Path) -> list[Stage]:
    """datatrove's exact dedup: each task hashes its documents, one task finds the repeated hashes, then each task
    drops its repeats (the copy met first stays)."""
    work = plan.root / "dedup" / "exact_dedup"
    config = ExactDedupConfig(content_getter=normalized_content)
    step = ExactDedupFilter(str(work / "duplicates"), config, exclusion_writer=_excluded(plan, "exact_dedup"))
    signatures = [_documents_of(source_dir, True), ExactDedupSignature(str(work / "signatures"), config)]
    duplicates = [ExactFindDedups(str(work / "signatures"), str(work / "duplicates"), config)]
    kept = _counted([_documents_of(source_dir, True)], [("exact_dedup", step)], out_dir, "input")
    return [Stage("exact_dedup-signatures", signatures, tasks), Stage("exact_dedup-duplicates", duplicates, 1),
            Stage("exact_dedup-filter", kept, tasks, _names(plan), shared=True)]


def _minhash_stages(plan: Plan, tasks: int, source_dir: Path, out_dir: Path) -> list[Stage]:
    """datatrove's MinHash dedup: signatures, pairs sharing a bucket, clusters of such pairs, then each task drops
    all but one document of every cluster."""
    work = plan.root / "dedup" / "minhash"
    config = MinhashConfig(**plan.settings.minhash.model_dump())
    step = MinhashDedupFilter(str(work / "clusters"), exclusion_writer=_excluded(plan, "minhash"))
    signatures = [_documents_of(source_dir, True),
                  MinhashDedupSignature(str(work / "signatures"), config, language=EnglishWords())]
    buckets = [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)]
    clusters = [MinhashDedupCluster(str(work / "buckets"), str(work / "clusters"), config=config)]
    kept = _counted([_documents_of(source_dir, True)], [("minhash", step)], out_dir, "input")
    return [Stage("minhash-signatures", signatures, tasks),
            Stage("minhash-buckets", buckets, config.num_buckets),  # datatrove: one task per bucket
            Stage("minhash-clusters", clusters, 1), Stage("minhash-filter", kept, tasks, _names(plan), shared=True)]


def _final_stage(plan: Plan, source: SourceConfig, tasks: int, source_dir: Path, out_dir: Path) -> Stage:
    """Benchmark decontamination, then perplexity: the costliest scoring runs on the fewest documents. A source's
    documents are spread over at most as many files as it had clean tasks, so that many tasks cover them."""
    settings, steps = plan.settings, []
    if settings.decontaminate is not None:
        steps.append(("decontaminate", DecontaminationFilter(str(settings.decontaminate.resolved_eval_dir()),
                                                             settings.decontaminate.n,
                                                             exclusion_writer=_excluded(plan, "decontaminate"))))
    if settings.perplexity is not None:
        ppl = settings.perplexity
        steps.append(("perplexity", PerplexityFilter(ppl.checkpoint, ppl.low, ppl.high,
                                                     exclusion_writer=_excluded(plan, "perplexity"))))
    pipeline = _counted([_documents_of(source_dir / source.name, False)], steps, out_dir, "input")
    return Stage(f"final-{source.name}", pipeline, tasks, (source.name,))


def _names(plan: Plan) -> tuple[str, ...]:
    return tuple(source.name for source in plan.sources)


# ---------------------------------------------------------------------------------------------- executors


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


DISCARD = _Discard()


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, minus the copy of every task's log and stats it prints to stderr (each task's
    log is still written to logs/<stage>/logs/, and fermion prints its own summary)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with contextlib.redirect_stderr(DISCARD):  # datatrove adds a sink on sys.stderr as each task starts
            return super()._run_for_rank(rank, local_rank, node_rank)


@contextlib.contextmanager
def _quiet_datatrove() -> Iterator[None]:
    """Also silence the executor's own messages in this process; datatrove's default logger comes back after."""
    with contextlib.redirect_stderr(DISCARD):
        logger.remove()
        logger.add(sys.stderr)
        try:
            yield
        finally:
            logger.remove()
    setup_default_logger()


def make_executor(settings: PrepareConfig, name: str, pipeline: list[PipelineStep], tasks: int, logging_dir: Path,
                  depends: PipelineExecutor | None) -> PipelineExecutor:
    """The executor the recipe asks for, given data.prepare.executor_options as keyword arguments."""
    from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

    options = dict(settings.executor_options)
    if settings.executor == "local":
        executor_class = QuietLocalExecutor
        options = {"workers": min(tasks, settings.workers or os.cpu_count() or 1), **options}
    elif settings.executor == "slurm":
        executor_class = SlurmPipelineExecutor
        options = {"job_name": f"fermion-{name}", **options}
    else:
        executor_class = RayPipelineExecutor
    try:
        return executor_class(pipeline, tasks=tasks, logging_dir=str(logging_dir), depends=depends, **options)
    except TypeError as err:
        raise RecipeError(f"data.prepare.executor_options: not accepted by datatrove's {executor_class.__name__} "
                          f"({err})") from None


# ---------------------------------------------------------------------------------------------- running


def run(recipe: Recipe, console: Console, strict: bool = False) -> dict | None:
    """Run the pipeline (skipping finished tasks), write the report and return it; None when the work was handed
    to Slurm."""
    plan = make_plan(recipe)
    check_plan(plan)
    write_input_lists(plan)
    stages = build_stages(plan, strict)
    pending = sum(len(stage.executor.get_incomplete_ranks()) for stage in stages)
    total = sum(stage.executor.world_size for stage in stages)
    console.print(f"prepare: {len(stages)} stages, {total:,} tasks ({total - pending:,} done before) on the "
                  f"{plan.settings.executor} executor -> {plan.root}")
    accounts = _run_stages(plan, stages, console)
    if accounts is None:
        return None
    if strict:  # bad records counted by an earlier run without --strict
        for account in accounts.values():
            account.check_no_problems()
    report = build_report(plan, accounts)
    write_report(plan, report)
    return report


def _run_stages(plan: Plan, stages: list[Stage], console: Console) -> dict[str, SourceAccount] | None:
    """Run the stages in order and account for each source's documents; None while Slurm jobs are unfinished."""
    queued = plan.settings.executor == "slurm"  # Slurm only queues the jobs: they are counted once all are done
    accounts = {source.name: SourceAccount(source) for source in plan.sources}
    for stage in stages:
        _run_stage(stage, plan.settings, console)
        if not queued:
            _account(stage, accounts)  # before the next stage: a source left with nothing stops the run here
    if not queued:
        return accounts
    if any(stage.executor.get_incomplete_ranks() for stage in stages):
        console.print("Slurm jobs submitted; run this command again once they have finished to write the report, "
                      f"the tokenizer and the shards (logs: {plan.root / 'logs'})")
        return None
    for stage in stages:
        _account(stage, accounts)
    return accounts


def _run_stage(stage: Stage, settings: PrepareConfig, console: Console) -> None:
    pending = len(stage.executor.get_incomplete_ranks())
    start = time.perf_counter()
    quiet = _quiet_datatrove() if settings.executor == "local" else contextlib.nullcontext()
    try:
        with quiet:
            stage.executor.run()
    except (DataError, RecipeError):
        raise
    except Exception as err:  # anything a step raised in a task: one line here, the traceback in the task's log
        raise DataError(f"prepare stage {stage.name} failed ({type(err).__name__}: {err}); task logs are in "
                        f"{stage.logging_dir / 'logs'}") from err
    done = f"{time.perf_counter() - start:.1f} s" if pending else "done before"
    console.print(f"  {stage.name}: {stage.executor.world_size} task(s), {done}")


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class Count:
    documents: int = 0
    chars: int = 0

    def as_dict(self) -> dict:
        return {"documents": self.documents, "chars": self.chars}


class SourceAccount:
    """What happened to one source's documents: read, then each step's in and out, and why they left."""

    def __init__(self, source: SourceConfig):
        self.source = source
        self.read = Count()
        self.problems: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.kept = Count()

    def add_step(self, step: str, after: Count, removed: dict[str, int]) -> None:
        self.steps.append({"step": step, "documents_in": self.kept.documents, "documents_out": after.documents,
                           "chars_in": self.kept.chars, "chars_out": after.chars, "removed": removed})
        self.kept = after

    def check_not_empty(self) -> None:
        if self.kept.documents:
            return
        name = self.source.name
        if not self.read.documents:
            bad = "; ".join(f"{entry['count']:,} {kind} (first: {', '.join(entry['first'])})"
                            for kind, entry in self.problems.items())
            raise DataError(f"source {name!r} yielded no documents: " + (bad or "are its files empty?"))
        removed = "; ".join(f"{row['step']} removed {row['documents_in'] - row['documents_out']:,} "
                            f"({_reasons(row['removed'])})" for row in self.steps if row["removed"])
        raise DataError(f"source {name!r}: all {self.read.documents:,} of its documents were removed ({removed}); "
                        "loosen or turn off those steps in data.prepare, or drop the source")

    def check_no_problems(self) -> None:
        for kind, entry in self.problems.items():
            raise DataError(f"{entry['first'][0]}: {kind} (--strict; source {self.source.name!r} has "
                            f"{entry['count']:,} such records)")

    def as_dict(self) -> dict:
        return {"kind": self.source.kind, "read": self.read.as_dict(), "problems": self.problems,
                "steps": self.steps, "kept": self.kept.as_dict()}


def merged_stats(logging_dir: Path) -> list[Counter]:
    """Per pipeline step, in order: the totals of its stats, summed over every finished task of a stage."""
    totals: list[Counter] = []
    for path in sorted((logging_dir / "stats").glob("*.json")):
        for position, step in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            if position == len(totals):
                totals.append(Counter())
            for key, value in step["stats"].items():
                totals[position][key] += int(MetricStats.from_dict(value).total)
    return totals


def _account(stage: Stage, accounts: dict[str, SourceAccount]) -> None:
    """Add a finished document pass's tallies to its sources' accounts; a source left with nothing stops the run."""
    if not stage.sources:
        return
    stats = merged_stats(stage.logging_dir)
    pipeline = stage.executor.pipeline
    for position, step in enumerate(pipeline):
        if not isinstance(step, Tally):
            continue
        for name in stage.sources:
            count = Count(stats[position][f"documents:{name}"], stats[position][f"chars:{name}"])
            if step.label == "read":
                accounts[name].read = accounts[name].kept = count
                accounts[name].problems = _problems(stats[:position])
            elif step.label != "input":
                removed = _removed(stats[position - 1], step.label, accounts[name].kept.documents - count.documents,
                                   stage.shared)
                accounts[name].add_step(step.label, count, removed)
    for name in stage.sources:
        accounts[name].check_not_empty()


def _removed(stats: Counter, step: str, count: int, shared: bool) -> dict[str, int]:
    """Documents removed by a step, by reason. A shared pass's reasons cover all sources, so there each source's
    count goes to the step's one reason."""
    if not count:
        return {}
    if shared:
        return {DEDUP_REASONS[step]: count}
    reasons = {key.removeprefix("dropped_"): value for key, value in stats.items()
               if key.startswith("dropped_") and value}
    unexplained = count - sum(reasons.values())
    return reasons | ({"unspecified": unexplained} if unexplained > 0 else {})


def _problems(reader_stats: list[Counter]) -> dict[str, dict]:
    """Bad records by kind: how many, and where the first ones are (in the order the tasks met them)."""
    problems: dict[str, dict] = {}
    for stats in reader_stats:
        for key, value in stats.items():
            if key.startswith(PROBLEM) and value:
                problems.setdefault(key.removeprefix(PROBLEM), {"count": 0, "first": []})["count"] += value
        for key in stats:
            if key.startswith(PROBLEM_AT):
                kind, where = key.removeprefix(PROBLEM_AT).split("|", 1)
                problems[kind]["first"].append(where)
    for entry in problems.values():
        entry["first"] = entry["first"][:FIRST_PROBLEMS]
    return problems


def build_report(plan: Plan, accounts: dict[str, SourceAccount]) -> dict:
    """The report of a finished run; the tokenizer an earlier run made the shards with (add_tokens) stays named."""
    sources = {name: account.as_dict() for name, account in accounts.items()}
    totals = {part: {key: sum(source[part][key] for source in sources.values()) for key in ("documents", "chars")}
              for part in ("read", "kept")}
    path = plan.root / REPORT_NAME
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"format": FORMAT, "plan": plan.root.name, "dir": str(plan.root), "kept_dir": str(plan.root / "kept"),
            "settings": plan.settings.model_dump(mode="json"), "sources": sources, "totals": totals,
            "tokenizer_hash": earlier.get("tokenizer_hash")}


def write_report(plan: Plan, report: dict) -> Path:
    path = plan.root / REPORT_NAME
    with replaced_file(path) as temporary:
        temporary.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def add_tokens(plan: Plan, report: dict, shard_index: dict) -> None:
    """Record the kept tokens per source (eos included, as the shards hold them) and the tokenizer that counted
    them, and rewrite the report."""
    report["tokenizer_hash"] = shard_index["tokenizer_hash"]
    for name, source in report["sources"].items():
        entry = shard_index["sources"][name]
        source["kept"]["tokens"] = sum(entry[split]["tokens"] for split in ("train", "val"))
    report["totals"]["kept"]["tokens"] = sum(source["kept"]["tokens"] for source in report["sources"].values())
    write_report(plan, report)


def report_table(report: dict) -> Table:
    """Per source and step: documents and characters in -> out, and why documents left."""
    table = Table("source", "step", "documents", "characters", "why documents left",
                  title=f"prepare report: {Path(report['dir']) / REPORT_NAME}")
    for name, source in report["sources"].items():
        problems = "; ".join(f"{entry['count']:,} {kind} (first: {', '.join(map(os.path.basename, entry['first']))})"
                             for kind, entry in source["problems"].items())  # the full paths are in the report
        table.add_row(name, "read", f"{source['read']['documents']:,}", f"{source['read']['chars']:,}", problems)
        for row in source["steps"]:
            table.add_row("", row["step"], f"{row['documents_in']:,} → {row['documents_out']:,}",
                          f"{row['chars_in']:,} → {row['chars_out']:,}", _reasons(row["removed"]))
        kept = source["kept"]
        tokens = f"{kept['tokens']:,} tokens" if "tokens" in kept else ""
        table.add_row("", "kept", f"{kept['documents']:,}", f"{kept['chars']:,}", tokens, end_section=True)
    return table


def _reasons(removed: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in removed.items())


# ---------------------------------------------------------------------------------------------- using the output


def prepared_data(recipe: Recipe) -> DataConfig:
    """The data section training reads after `fermion prepare`: the kept documents under the same source names,
    kinds and weights. Refuses a preparation that has not finished (no report)."""
    plan = make_plan(recipe)
    if not (plan.root / REPORT_NAME).is_file():
        raise DataError(f"{plan.root}: no finished preparation of this recipe's data (no {REPORT_NAME}); run "
                        "`fermion prepare RECIPE` first")
    sources = [SourceConfig(name=source.name, paths=[str(plan.kept_dir(source.name) / "*.jsonl.gz")],
                            kind=source.kind, weight=source.weight) for source in recipe.data.sources]
    return recipe.data.model_copy(update={"sources": sources, "prepare": None})


def inspect(recipe: Recipe, step: str, console: Console, examples: int = 3) -> None:
    """Print the first few documents each source lost to `step`, with the reason recorded for each."""
    plan = make_plan(recipe)
    enabled = sorted({name for source in plan.sources for name in step_names(plan, source)} - {"normalize"})
    if step not in enabled:
        raise DataError(f"--inspect {step!r}: not a filtering step of this recipe's pipeline; one of: "
                        f"{', '.join(enabled) or 'none'} (normalize rewrites text and removes nothing)")
    folder = plan.root / "excluded" / step
    sources = sorted(path for path in folder.glob("*") if path.is_dir())
    if not sources:
        finished = (plan.root / REPORT_NAME).is_file()
        console.print(f"{step} removed no documents" + ("" if finished else " (yet: the preparation has not "
                                                                             "finished; run `fermion prepare`)"))
        return
    for source in sources:
        files = sorted(source.glob("*.jsonl.gz"))
        records = itertools.islice(itertools.chain.from_iterable(file_records(path) for path in files), examples)
        for _, record in records:
            _print_example(console, step, source.name, record)


def _print_example(console: Console, step: str, source: str, record: dict) -> None:
    metadata = record.get("metadata", {})
    reason = metadata.get("filter_reason", DEDUP_REASONS.get(step, step))
    details = {key: value for key, value in metadata.items() if key not in ("source", "filter_reason")}
    console.rule(f"{step} · {source} · {record.get('id', '?')}", style="dim")
    console.print(f"reason: {reason}" + "".join(f" · {key}: {value}" for key, value in details.items()),
                  markup=False, highlight=False)
    text = record.get("text", "")
    console.print(text[:600] + (" […]" if len(text) > 600 else ""), markup=False, highlight=False)
