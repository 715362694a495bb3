"""What a preparation does and where: its folder, the steps each source goes through, and the stages (datatrove
pipelines) that run them, stage by stage:

    clean-<source>      one per source: read -> normalize -> length -> prose rules (gopher_repetition,
                        gopher_quality, c4, fineweb) or, for sources of kind "code", the code rules
    exact_dedup-*       signatures -> duplicates -> filter, on a normalised copy of the text (datatrove's
                        simplify_text: lower case, no punctuation, collapsed whitespace)
    minhash-*           signatures -> buckets -> clusters -> filter
    final-<source>      one per source: decontaminate -> perplexity

Steps a recipe turns off are left out, and so are stages left with no step. Every filter writes what it drops to
`excluded/<step>/<source>/` (for `fermion prepare --inspect`).

Layout of a preparation, `<data.prepare.dir>/<plan>/`, where <plan> is a hash of everything the output depends
on (the sources as written, minus their mixing weights, and the step settings), so a changed recipe gets a fresh
folder and its shards a fresh fingerprint:

    inputs/<source>.txt            the files each source reads (datatrove's paths_file); a rerun checks them
    work/<pass>/<source>/*.jsonl.gz  documents between passes;  dedup/<exact_dedup|minhash>/  their signatures
    logs/<stage>/                  datatrove's logging dir: completions/, stats/<task>.json, logs/task_*.log
    excluded/<step>/<source>/*.jsonl.gz
    kept/<source>/*.jsonl.gz       what training reads: same source names, kinds and weights, field "text"
    prepare_report.json            written last: its presence is what makes the preparation usable

Task counts depend on the input files only (one task per file, one for a dataset, a built-in corpus or a source with
max_documents), never on the number of workers, so an interrupted run resumes with the same task split whatever the
machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from fermion import layout
from fermion.atomic import replaced_file
from fermion.config import DataConfig, PrepareConfig, Recipe, RecipeError, SourceConfig
from fermion.data.shards import SOURCE_NAME
from fermion.data.sources import DataError
from fermion.prepare.readers import BuiltinReader, DatasetReader, FirstDocuments, SourceFileReader, source_files
from fermion.prepare.steps import (
    CodeQualityFilter,
    DecontaminationFilter,
    EnglishWords,
    LengthFilter,
    NormalizeText,
    PerplexityFilter,
    Tally,
    normalized_content,
)

FORMAT = "fermion-prepare/1"
REPORT_NAME = layout.PREPARE_REPORT  # the plan's finished report, where docs/run.md puts it
OUTPUT_NAME = "${source}/${rank}.jsonl.gz"  # datatrove fills in the document's metadata and the task's rank
PROSE_STEPS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
CLEAN_STEPS = ("normalize", "length", *PROSE_STEPS, "code")  # the steps of the per-source clean pass


# ----------------------------------------------------------------------------------------------------- the plan


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
    return Plan(recipe, layout.prepared_dir(recipe.run_dir, recipe.data) / plan_id(recipe))


def plan_id(recipe: Recipe) -> str:
    """A hash of what the prepared documents depend on: the sources as written (weights aside: they only mix; fields
    left at their defaults aside, so a field added to SourceConfig later changes no existing plan) and the step
    settings (where and how it runs aside)."""
    settings = recipe.data.prepare
    made_from = {
        "format": FORMAT,
        "sources": [source.model_dump(mode="json", exclude={"weight"}, exclude_defaults=True)
                    for source in recipe.data.sources],
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


# ------------------------------------------------------------------------------------------------------- stages


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


def plan_stages(plan: Plan, strict: bool) -> list[Stage]:
    """Every stage of the plan, in order, still without their executors (runner.build_stages adds them)."""
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


# --------------------------------------------------------------------------------------------- using the output


def prepared_data(recipe: Recipe) -> DataConfig:
    """The data section training reads after `fermion prepare`: the kept documents under the same source names,
    kinds, weights and validation marks. Refuses a preparation that has not finished (no report)."""
    plan = make_plan(recipe)
    if not (plan.root / REPORT_NAME).is_file():
        raise DataError(f"{plan.root}: no finished preparation of this recipe's data (no {REPORT_NAME}); run "
                        "`fermion prepare RECIPE` first")
    sources = [SourceConfig(name=source.name, paths=[str(plan.kept_dir(source.name) / "*.jsonl.gz")],
                            kind=source.kind, weight=source.weight, validation=source.validation)
               for source in recipe.data.sources]
    return recipe.data.model_copy(update={"sources": sources, "prepare": None})
