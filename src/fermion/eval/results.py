"""What an evaluation produces: per-task metrics with standard errors, and the files a run writes.

Every task returns a TaskResult: its metrics (each a mean over examples, with the standard error of that mean,
as lm-evaluation-harness reports it), the number of examples, the shots, and one record per example so a user can
see what the model answered. A run writes `results.json` (everything, machine-readable, comparable across runs)
and `results.md` (the table).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fermion.atomic import replaced_file
from fermion.layout import EVAL_RESULTS


@dataclass
class Metric:
    name: str
    value: float
    stderr: float | None = None


@dataclass
class TaskResult:
    task: str
    metrics: list[Metric]
    n: int  # examples scored
    shots: int
    samples: list[dict] = field(default_factory=list)  # per example: its id, what the model said, the score
    # Prompts longer than the model's context leaves room for with the answer: each kept its last tokens (its
    # beginning, often the instructions, was lost), so the score understates the model. Said beside the score.
    cut_prompts: int = 0

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"{self.task} has no metric {name!r} (it has {', '.join(m.name for m in self.metrics)})")


def mean_metric(name: str, values: Sequence[float]) -> Metric:
    """The mean of per-example scores and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return Metric(name, float("nan"), None)
    mean = sum(values) / n
    if n < 2:
        return Metric(name, mean, None)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(name, mean, math.sqrt(variance / n))


def paired_stderr(before: Sequence[dict], after: Sequence[dict], metric: str) -> float | None:
    """The standard error of the mean per-example change of `metric` between two runs of a task on the same
    examples (matched by id), or None when the samples do not allow it (a score not kept per example, different or
    repeated ids). Each example's difficulty cancels out of its change, so this is the error a comparison of two
    models on one problem set has; the unpaired sqrt(se_a² + se_b²) overstates it."""
    def per_example(samples: Sequence[dict]) -> dict[str, float] | None:
        out = {}
        for sample in samples:
            value = sample.get(metric)
            if "id" not in sample or not isinstance(value, bool | int | float):
                return None
            out[json.dumps(sample["id"])] = float(value)
        return out if len(out) == len(samples) else None

    old, new = per_example(before), per_example(after)
    if not old or not new or old.keys() != new.keys() or len(old) < 2:
        return None
    return mean_metric("change", [new[key] - old[key] for key in old]).stderr


def to_json(results: list[TaskResult], model: str, extra: dict | None = None) -> dict:
    return {"model": model, **(extra or {}),
            "results": [{**asdict(r), "metrics": [asdict(m) for m in r.metrics]} for r in results]}


def to_markdown(results: list[TaskResult], model: str) -> str:
    lines = [f"Model: `{model}`", "", "| task | metric | value | ± stderr | shots | n |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for m in r.metrics:
            err = f"{m.stderr:.4f}" if m.stderr is not None else "–"
            lines.append(f"| {r.task} | {m.name} | {m.value:.4f} | {err} | {r.shots} | {r.n} |")
    return "\n".join(lines) + "\n"


def write(results: list[TaskResult], out_dir: str | os.PathLike, model: str, extra: dict | None = None) -> Path:
    """results.json and results.md in out_dir, each written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EVAL_RESULTS
    with replaced_file(path) as tmp:
        tmp.write_text(json.dumps(to_json(results, model, extra), indent=2) + "\n")
    with replaced_file(path.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(results, model))
    return path


@dataclass
class TaskOptions:
    data_dir: Path  # holds <benchmark>/<files>, laid out as ../shared/data/eval
    limit: int | None = None  # the first N examples (in the file's order), for quick runs
    shots: int | None = None  # None: the task's standard number
    max_new_tokens: int | None = None  # None: the task's default
    seed: int = 0
