"""`fermion run RECIPE`: every stage of a recipe in order, each skipped when its output is complete and its inputs
are unchanged.

    prepare -> tokenizer -> pretrain -> <continued stages> -> sft -> dpo -> rl -> eval -> export -> card

The run directory holds everything (the layout is in docs/run.md):

    <run>/run.json                  the ledger: per step its inputs' fingerprint, status, timings, outcome
    <run>/recipe.yaml, tokenizer.json, prepared/, prepare_report.json, data/, checkpoints/, metrics.jsonl
    <run>/stages/<name>/            a continued-pretraining stage, laid out like a pretraining run
    <run>/sft/, <run>/dpo/, <run>/rl/  post-training stages
    <stage dir>/eval/results.json   every trained stage evaluated on the recipe's eval tasks
    <final stage>/export/<format>/  the final model's exports; the model card (README.md) sits in export/hf

A step's fingerprint hashes what it is made from: its recipe sections (minus settings that change how a run is
watched, not what it makes: logging, progress, checkpoint cadence), the files it reads (path, size, mtime), and the
fingerprints of the steps before it, so a change upstream reaches everything downstream. A step whose fingerprint
matches a finished record, and whose output is there, is skipped. A training stage that was stopped (preempted,
killed, crashed) with the same fingerprint resumes from its newest good checkpoint; one whose inputs changed starts
again, and what it had written moves to `<dir>/superseded/<time>/` rather than being deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fermion import layout
from fermion.atomic import replaced_file
from fermion.config import ModelConfig, Recipe, RecipeError, SourceConfig, TrainConfig, file_states
from fermion.errors import ExportError

# Training settings that change how a run is watched or saved, not the weights it makes.
WATCHING = {"progress", "log_every", "tensorboard", "wandb", "keep_checkpoints", "checkpoint_every",
            "async_checkpoint", "eval_every", "eval_batches", "device"}


class Preempted(Exception):
    """A training stage stopped on a signal with a checkpoint saved: the run ends here and resumes next time."""


@dataclass
class Step:
    name: str
    kind: str  # prepare, tokenizer, train, eval, export, card
    inputs: dict
    # (restart: inputs changed or --from/--only, forced: --from/--only) -> a short note on what it did
    action: Callable[[bool, bool], str]
    complete: Callable[[], bool]
    directory: Path | None = None  # a training stage's directory
    fingerprint: str = ""


@dataclass
class Outcome:
    name: str
    status: str  # ran, resumed, restarted, skipped, stopped
    seconds: float = 0.0
    note: str = ""


@dataclass
class RunResult:
    run_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    status: str = "complete"  # complete or preempted


# ------------------------------------------------------------------------------------------------- fingerprints


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _section(config, exclude: set[str] = frozenset()) -> dict:
    return config.model_dump(mode="json", exclude=exclude) if config is not None else {}


def _train(config) -> dict:
    return _section(config, WATCHING)


def _data(config) -> dict:
    return {"config": _section(config), "files": file_states(config.sources)} if config is not None else {}


# ------------------------------------------------------------------------------------------------------ ledger


class Ledger:
    """<run>/run.json: one record per step, rewritten whole after every change."""

    def __init__(self, run_dir: Path):
        self.path = layout.ledger_file(run_dir)
        self.steps: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.steps = json.loads(self.path.read_text()).get("steps", {})
            except (json.JSONDecodeError, AttributeError):
                raise RecipeError(f"{self.path}: not a fermion run ledger (unreadable JSON); move it away to "
                                  "start the run's bookkeeping afresh") from None

    def get(self, name: str) -> dict | None:
        return self.steps.get(name)

    def update(self, name: str, **values) -> None:
        self.steps[name] = {**self.steps.get(name, {}), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_file(self.path) as tmp:
            tmp.write_text(json.dumps({"steps": self.steps}, indent=1) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _supersede(directory: Path, names: tuple[str, ...]) -> Path | None:
    """Move what an earlier attempt wrote into <directory>/superseded/<time>/; returns where, or None."""
    present = [directory / name for name in names if (directory / name).exists()]
    if not present:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target, n = layout.superseded_dir(directory, stamp), 1
    while target.exists():
        n += 1
        target = layout.superseded_dir(directory, f"{stamp}-{n}")
    target.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(target / path.name))
    return target


# ------------------------------------------------------------------------------------------------------ the plan


def trained_stages(recipe: Recipe) -> list[tuple[str, Path]]:
    """(name, directory) of every model the recipe trains, in order."""
    return [(name, directory) for name, directory, section in layout.stages(recipe.run_dir, recipe)
            if name not in layout.POST_TRAINING or section is not None]


def plan(recipe: Recipe, console: Console) -> list[Step]:
    """The recipe's steps in order, with their inputs; fingerprints chain each step to the ones before it."""
    from fermion.checkpoint import find

    run_dir = recipe.run_dir
    steps: list[Step] = []
    if recipe.data is None:
        raise RecipeError("fermion run needs a data section to pretrain on (data.sources); to post-train an "
                          "existing model, run fermion sft and fermion dpo with sft.train.init_from set")
    check_before_training(recipe, console)

    def trained(directory: Path) -> Callable[[], bool]:
        return lambda: find(directory, warn=lambda *_: None, required=False) is not None

    if recipe.data.prepare is not None:
        def prepare(restart: bool, forced: bool) -> str:
            from fermion.train.pretrain import prepare as run_prepare

            # datatrove skips its finished tasks, and a changed plan gets a folder of its own (prepared/<plan>);
            # then the tokenizer and the shards of what it kept, the tokenizer trained anew when this step starts
            # again (so do the stages trained with the old one)
            report = run_prepare(recipe, console=console, force=restart)
            if report is None:
                raise Preempted("prepare: Slurm jobs are running; run again once they have finished")
            kept = report["totals"]["kept"]
            return f"{kept['documents']:,} of {report['totals']['read']['documents']:,} documents kept"

        def prepared() -> bool:
            from fermion.prepare import make_plan

            return (make_plan(recipe).root / layout.PREPARE_REPORT).is_file()

        steps.append(Step("prepare", "prepare", {"data": _data(recipe.data), "seed": recipe.run.seed}, prepare,
                          prepared))

    def tokenizer(restart: bool, forced: bool) -> str:
        from fermion.data.tokenizer import Tokenizer
        from fermion.train.pretrain import train_tokenizer

        # with data.prepare, the prepare step has trained it on what it kept (and retrained it when that changed)
        force = restart and not recipe.tokenizer.path and recipe.data.prepare is None
        path = train_tokenizer(recipe, console, force=force)
        source = "train.init_from's, " if recipe.train.init_from else ""
        return f"{source}{Tokenizer.load(path).vocab_size:,} tokens -> {path}"

    tokenizer_inputs = {"tokenizer": _section(recipe.tokenizer, {"chat_template"}), "data": _data(recipe.data),
                        "seed": recipe.run.seed}  # the seed draws the validation documents it must not read
    if recipe.train.init_from:  # a model to start from brings its tokenizer: none is trained
        console.print(f"tokenizer: train.init_from's ({recipe.train.init_from}); none is trained")
        tokenizer_inputs = {"init_from": recipe.train.init_from, "path": recipe.tokenizer.path}
    elif recipe.tokenizer.path:
        tokenizer_inputs = {"file": file_states([SourceConfig(name="tokenizer", paths=[recipe.tokenizer.path])])}
    steps.append(Step("tokenizer", "tokenizer", tokenizer_inputs, tokenizer,
                      lambda: recipe.tokenizer_file.is_file()))

    def train_step(name: str, stage_recipe: Recipe, runner, directory: Path, inputs: dict) -> Step:
        def action(restart: bool, forced: bool) -> str:
            if restart:
                moved = _supersede(directory, layout.TRAINING_OUTPUTS)
                if moved is not None:
                    console.print(f"{name}: its inputs changed; the earlier attempt's files moved to {moved}")
            result = runner(stage_recipe, resume="auto", console=console)
            if result.status == "preempted":
                raise Preempted(f"{name} stopped at step {result.step:,} with a checkpoint; run again to resume")
            loss = f" · val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            return f"step {result.step:,}{loss}"

        return Step(name, "train", inputs, action, trained(directory), directory)

    from fermion.train.dpo import dpo
    from fermion.train.pretrain import pretrain
    from fermion.train.rl import rl
    from fermion.train.sft import sft

    steps.append(train_step("pretrain", recipe, pretrain, run_dir,
                            {"model": _section(recipe.model), "train": _train(recipe.train),
                             "data": _data(recipe.data), "seed": recipe.run.seed}))
    for i, stage in enumerate(recipe.stages):
        stage_recipe = recipe.stage_recipe(i)
        steps.append(train_step(stage.name, stage_recipe, pretrain, recipe.stage_dir(i),
                                {"train": _train(stage_recipe.train), "data": _data(stage.data)}))
    for name, runner in zip(layout.POST_TRAINING, (sft, dpo, rl), strict=True):
        section = getattr(recipe, name)
        if section is not None:
            directory = dict(trained_stages(recipe))[name]
            inputs = {"section": _section(section, {"train"}), "train": _train(section.train),
                      "files": file_states(section.sources), "template": recipe.tokenizer.chat_template}
            steps.append(train_step(name, recipe, runner, directory, inputs))

    models = trained_stages(recipe)
    final_name, final_dir = models[-1]

    fingerprints = {step.name: "" for step in steps}  # filled in below, once every step has its fingerprint

    def evaluate(restart: bool, forced: bool) -> str:
        tables, reused = {}, []
        for name, directory in models:
            # A stage's own results stand while it and the eval settings are what they were (--from eval redoes
            # them all): a changed DPO stage re-evaluates DPO only.
            key = _digest({"eval": _section(recipe.eval, {"every"}), "stage": fingerprints[name]})
            previous = _read_results(layout.eval_results(directory))
            if not forced and previous is not None and previous.get("fingerprint") == key:
                tables[name] = previous
                reused.append(name)
                console.print(f"eval {name}: unchanged since its results were written, kept")
                continue
            tables[name] = evaluate_stage(recipe, name, directory, console, key)
        console.print(comparison_table(tables))
        gains = gain_table(tables)
        if gains is not None:
            console.print(gains)
        note = f" ({', '.join(reused)} as before)" if reused else ""
        return f"{len(models)} model(s) on {', '.join(recipe.eval.tasks)}{note}"

    def evaluated() -> bool:
        return all(layout.eval_results(directory).is_file() for _, directory in models)

    steps.append(Step("eval", "eval", {"eval": _section(recipe.eval, {"every"})}, evaluate, evaluated))

    def export(restart: bool, forced: bool) -> str:
        from fermion.export import export as run_export

        paths = run_export(final_dir, list(recipe.export.formats), warn=console.print, dtypes=recipe.export.dtypes())
        return " · ".join(str(p) for p in paths)

    def exported() -> bool:
        return all(any(layout.export_dir(final_dir, fmt).glob("*")) for fmt in recipe.export.formats)

    steps.append(Step("export", "export", {"export": _section(recipe.export), "final": final_name,
                                           "template": recipe.tokenizer.chat_template}, export, exported))

    def card(restart: bool, forced: bool) -> str:
        from fermion.card import build_card

        return str(build_card(run_dir))

    steps.append(Step("card", "card", {}, card, lambda: layout.card_file(final_dir).is_file()))

    upstream = ""
    for step in steps:
        step.fingerprint = _digest({"inputs": step.inputs, "upstream": upstream})
        upstream = step.fingerprint
        fingerprints[step.name] = step.fingerprint
    return steps


# ------------------------------------------------------------------------------------ checked before training


def final_model(recipe: Recipe) -> tuple[ModelConfig, dict | None, str]:
    """The model configuration and tokenizer.json the run's final stage exports, and where they come from. With
    train.init_from they are the source's (its configuration is the model's, its tokenizer the run's); else the
    recipe's model, with tokenizer.path's file or None: the byte-level BPE tokenizer the run trains."""
    source = recipe.train.init_from
    if source:
        from fermion.checkpoint import describe

        model, tokenizer_file = describe(source)
        return model, _tokenizer_json(tokenizer_file), f"the model and tokenizer of train.init_from ({source})"
    if recipe.tokenizer.path:
        path = recipe.tokenizer.path
        return recipe.model, _tokenizer_json(Path(path)), f"the recipe's model and tokenizer.path ({path})"
    return recipe.model, None, "the recipe's model and the tokenizer the run trains"


def _tokenizer_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path}: not a readable tokenizer.json ({err})") from None


def training_sections(recipe: Recipe) -> list[tuple[str, TrainConfig]]:
    """(recipe field, train section) of every stage whose step `fermion model info` predicts: pretraining, each
    continued stage and SFT. DPO's step (chosen and rejected together, a reference model) is not modelled."""
    sections = [("train", recipe.train)]
    sections += [(f"stages[{i}].train", recipe.stage_train(i)) for i in range(len(recipe.stages))]
    if recipe.sft is not None:
        sections.append(("sft.train", recipe.sft.train))
    return sections


def check_before_training(recipe: Recipe, console: Console | None = None, device: str | None = None,
                          world_size: int | None = None) -> None:
    """Refuse, before any step runs, a recipe that would fail after training: an export it asks for that cannot be
    made from its model and tokenizer, or (on a GPU: this machine's, or the one `device` names, over `world_size`
    processes, default $WORLD_SIZE) a training stage that `fermion model info` predicts will not fit."""
    from fermion.export import DEFAULT_DTYPES, check
    from fermion.model.counting import fit_problem, resolve_device

    cfg, tokenizer, origin = final_model(recipe)
    dtypes = recipe.export.dtypes()
    for fmt, dtype in dtypes.items():
        try:
            check(fmt, cfg, None, tokenizer)  # the format itself, in its default dtype
        except ExportError as err:
            raise RecipeError(f"export.formats: {fmt} cannot be made from {origin}: {err}; or drop {fmt} from "
                              "export.formats") from None
        try:
            check(fmt, cfg, dtype, tokenizer)
        except ExportError as err:
            raise RecipeError(f"export.{fmt}.dtype: {err}") from None
    if console is not None:
        shipped = ", ".join(f"{fmt} ({dtype or DEFAULT_DTYPES[fmt]})" for fmt, dtype in dtypes.items())
        console.print(f"exports checked before training: {shipped}")
    try:
        _, device_type, _ = resolve_device(device, recipe.train.device)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if device_type != "cuda":
        return
    sized = recipe.model_copy(update={"model": cfg})
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    for section, train in training_sections(sized):
        problem = fit_problem(sized, device, world_size, train, section)
        if problem is not None:
            raise RecipeError(problem)


def _read_results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------------- eval


def evaluate_stage(recipe: Recipe, name: str, directory: Path, console: Console, fingerprint: str = "") -> dict:
    """The recipe's eval tasks on one trained stage (chat prompts for SFT/DPO); <dir>/eval/results.json."""
    from fermion.eval import runner
    from fermion.eval.results import TaskOptions, to_json, write
    from fermion.infer import lm as eval_lm

    model = eval_lm.load(directory)
    options = TaskOptions(data_dir=recipe.eval.resolved_data_dir(), limit=recipe.eval.limit, shots=recipe.eval.shots)
    console.print(f"eval {name} ({'chat' if model.chat else 'base'} prompts): {', '.join(recipe.eval.tasks)}")

    def report(result, seconds):
        console.print(runner.progress(result, seconds, digits=3))

    results = runner.run(model, runner.task_names(recipe.eval.tasks), options, on_result=report)
    extra = {"chat": model.chat, "limit": options.limit, "stage": name, "fingerprint": fingerprint}
    write(results, layout.eval_dir(directory), model=str(directory), extra=extra)
    return to_json(results, str(directory), extra)


def comparison_table(tables: dict[str, dict]) -> Table:
    """Rows task/metric, a column per stage: how each stage moved each score."""
    table = Table("task", "metric", *tables, title="evaluation by stage")
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for stage, data in tables.items():
        for task in data["results"]:
            for metric in task["metrics"]:
                err = f" ± {metric['stderr']:.3f}" if metric.get("stderr") is not None else ""
                rows.setdefault((task["task"], metric["name"]), {})[stage] = f"{metric['value']:.3f}{err}"
    for (task, metric), values in rows.items():
        table.add_row(task, metric, *(values.get(stage, "–") for stage in tables))
    return table


def stage_gains(tables: dict[str, dict]) -> list[tuple[str, str, str, float, float | None]]:
    """What each stage added over the one before it, on the same held-out problems: (task, metric, "b − a", change,
    its standard error) for every metric both stages report. The error is the paired one (of the per-problem
    changes, eval/results.paired_stderr) where both stages kept each problem's score, else the unpaired
    sqrt(se_a² + se_b²), which overstates it: a change is never called beyond two errors that is not."""
    from fermion.eval.results import paired_stderr

    def scores(data: dict) -> dict[tuple[str, str], tuple[float, float | None, list]]:
        return {(task["task"], m["name"]): (m["value"], m.get("stderr"), task.get("samples") or [])
                for task in data["results"] for m in task["metrics"]}

    names = list(tables)
    gains = []
    for before, after in zip(names, names[1:], strict=False):
        old, new = scores(tables[before]), scores(tables[after])
        for key in [k for k in new if k in old]:
            (a, se_a, samples_a), (b, se_b, samples_b) = old[key], new[key]
            se = None if se_a is None or se_b is None else (se_a**2 + se_b**2) ** 0.5
            paired = paired_stderr(samples_a, samples_b, key[1])
            gains.append((*key, f"{after} − {before}", b - a, se if paired is None else paired))
    return gains


def gain_table(tables: dict[str, dict]) -> Table | None:
    """Rows task/metric, a column per stage after the first: its change over the stage before, ± the standard error
    of the change, and "▲"/"▼" where the change is beyond two of them."""
    gains = stage_gains(tables)
    if not gains:
        return None
    columns = list(dict.fromkeys(g[2] for g in gains))
    table = Table("task", "metric", *columns, title="held-out gain by stage (▲ ▼: beyond 2 standard errors)")
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for task, metric, column, change, se in gains:
        mark = "" if se is None or abs(change) <= 2 * se else (" ▲" if change > 0 else " ▼")
        err = "" if se is None else f" ± {se:.3f}"
        rows.setdefault((task, metric), {})[column] = f"{change:+.3f}{err}{mark}"
    for (task, metric), values in rows.items():
        table.add_row(task, metric, *(values.get(column, "–") for column in columns))
    return table


# --------------------------------------------------------------------------------------------------------- run


def run(recipe: Recipe, console: Console | None = None, start: str | None = None, only: str | None = None
        ) -> RunResult:
    """Run the recipe's steps; `start` forces that step and every later one to run again, `only` runs just one
    (forced; the steps before it must be finished)."""
    console = console or Console()
    steps = plan(recipe, console)
    names = [step.name for step in steps]
    for option, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise RecipeError(f"{option} {value!r}: this recipe's steps are {', '.join(names)}")
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(recipe.run_dir)
    result = RunResult(recipe.run_dir)
    forced_from = names.index(start) if start is not None else len(names)
    for index, step in enumerate(steps):
        if only is not None and step.name != only:
            if index < names.index(only) and not _finished(step, ledger):
                raise RecipeError(f"--only {only}: the step before it, {step.name}, has not finished; run "
                                  f"`fermion run RECIPE` (or --from {step.name}) first")
            continue
        forced = index >= forced_from or only == step.name
        record = ledger.get(step.name)
        if not forced and _finished(step, ledger):
            result.outcomes.append(Outcome(step.name, "skipped", note="up to date"))
            console.print(f"[dim]{step.name}: up to date, skipped[/]")
            continue
        changed = record is not None and record.get("fingerprint") != step.fingerprint
        restart = forced or changed
        resuming = step.kind == "train" and not restart and record is not None and record.get("status") == "started"
        console.rule(f"[bold]{step.name}[/]" + (" (resuming)" if resuming else ""))
        ledger.update(step.name, fingerprint=step.fingerprint, status="started", started=_now())
        began = time.perf_counter()
        try:
            note = step.action(restart, forced)
        except Preempted as stop:
            seconds = time.perf_counter() - began
            ledger.update(step.name, seconds=round(seconds, 1))
            result.outcomes.append(Outcome(step.name, "stopped", seconds, str(stop)))
            result.status = "preempted"
            console.print(str(stop))
            break
        seconds = time.perf_counter() - began
        ledger.update(step.name, status="done", finished=_now(), seconds=round(seconds, 1), note=note)
        status = "resumed" if resuming else "restarted" if changed and not forced else "ran"
        result.outcomes.append(Outcome(step.name, status, seconds, note))
    console.print(summary_table(result))
    return result


def _finished(step: Step, ledger: Ledger) -> bool:
    record = ledger.get(step.name)
    return (record is not None and record.get("status") == "done" and record.get("fingerprint") == step.fingerprint
            and step.complete())


def summary_table(result: RunResult) -> Table:
    total = sum(outcome.seconds for outcome in result.outcomes)
    table = Table("step", "status", "time", "result", title=f"fermion run: {result.run_dir} ({result.status}, "
                  f"{_duration(total)})")
    for outcome in result.outcomes:
        table.add_row(outcome.name, outcome.status, _duration(outcome.seconds) if outcome.seconds else "–",
                      outcome.note)
    return table


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"
