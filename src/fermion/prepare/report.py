"""What a preparation did, per source and step: documents and characters in and out, why documents left, and the
bad records the readers met; written to prepare_report.json and shown as a table. `inspect` prints examples of
what a step removed.

The numbers come from datatrove's own stats: a `Tally` step after the readers and after every step counts each
source's documents and characters (the tokenizer is trained on the result, so tokens are counted once, in the
shards); a filter's `dropped_<reason>` stats say why documents left. Readers count bad records (invalid JSON,
non-UTF-8 lines, a missing text field) by kind, with their first locations; `--strict` fails on the first.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datatrove.utils.stats import MetricStats
from rich.console import Console
from rich.table import Table

from fermion.atomic import replaced_file
from fermion.config import Recipe, SourceConfig
from fermion.data.sources import DataError, file_records
from fermion.prepare.plan import FORMAT, REPORT_NAME, Plan, Stage, make_plan, step_names
from fermion.prepare.readers import FIRST_PROBLEMS, PROBLEM, PROBLEM_AT
from fermion.prepare.steps import Tally

DEDUP_REASONS = {"exact_dedup": "duplicate", "minhash": "near_duplicate"}  # their filters give no reason of their own


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


def add_tallies(stage: Stage, accounts: dict[str, SourceAccount]) -> None:
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


# ------------------------------------------------------------------------------ examples of what a step removed


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
