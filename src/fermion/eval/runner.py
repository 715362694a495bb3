"""`fermion eval`: run named tasks on a model, print the table, write results.json and results.md.

Task names: hellaswag, arc_easy, arc_challenge, piqa, mmlu (log-likelihood multiple choice), gsm8k, bbh
(generative, exact match), ifeval, humaneval, tinytask (structured output; `tinytask_constrained` decodes under
the JSON schema), arithmetic (held-out generated problems: exact answers and preference accuracy), smoke (the
OK/WEAK/FAIL smoke test), and perplexity=PATH (bits per byte on a text file; plain `perplexity` uses WikiText-2's
test file beside the eval data when it is there). Groups: `mc` (the five
multiple-choice tasks), `all` (everything but perplexity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fermion.eval import generative, multiple_choice
from fermion.eval.results import TaskOptions, TaskResult

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

MULTIPLE_CHOICE = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu"]
GENERATIVE = ["gsm8k", "bbh", "ifeval", "humaneval", "tinytask", "tinytask_constrained", "arithmetic", "smoke"]
GROUPS = {"mc": MULTIPLE_CHOICE, "all": MULTIPLE_CHOICE + GENERATIVE}
DEFAULT_TEXT = Path("..") / "pretrain" / "wikitext-2-raw" / "wiki.test.raw"  # relative to the eval data folder


class TaskError(ValueError):
    """A task name or option that cannot be run; the message says what can."""


def _task(name: str) -> Callable[[EvalModel, TaskOptions], TaskResult]:
    if name in multiple_choice.BENCHMARKS:
        bench = multiple_choice.BENCHMARKS[name]
        return lambda lm, options: multiple_choice.evaluate(lm, bench, options)
    if name == "gsm8k":
        return generative.gsm8k
    if name == "bbh":
        return generative.bbh
    if name == "ifeval":
        from fermion.eval import ifeval

        return ifeval.run
    if name == "humaneval":
        from fermion.eval import humaneval

        return humaneval.run
    if name in ("tinytask", "tinytask_constrained"):
        from fermion.eval import tinytask

        constrained = name == "tinytask_constrained"
        return lambda lm, options: tinytask.run(lm, options, constrained=constrained)
    if name == "arithmetic":
        from fermion.eval import arithmetic

        return arithmetic.run
    if name == "smoke":
        from fermion.eval import smoke

        return smoke.run
    if name == "perplexity" or name.startswith("perplexity="):
        from fermion.eval.perplexity import perplexity

        path = name.partition("=")[2]
        return lambda lm, options: perplexity(lm, Path(path) if path else options.data_dir / DEFAULT_TEXT,
                                              options.limit)
    raise TaskError(f"unknown task {name!r}; tasks: {', '.join(MULTIPLE_CHOICE + GENERATIVE)}, perplexity=PATH, "
                    f"or a group: {', '.join(GROUPS)}")


def task_names(spec: str | list[str]) -> list[str]:
    """'hellaswag,arc_easy' or ['mc', 'gsm8k'] -> the task names, groups expanded, each once, checked."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names: list[str] = []
    for part in (p.strip() for p in parts if p.strip()):
        for name in GROUPS.get(part, [part]):
            _task(name)
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError("no tasks given; for example --tasks hellaswag,arc_easy or --tasks mc")
    return names


def run(lm: EvalModel, names: list[str], options: TaskOptions,
        on_result: Callable[[TaskResult, float], None] | None = None) -> list[TaskResult]:
    """Run each task in turn; `on_result(result, seconds)` after each (for progress output)."""
    results = []
    for name in names:
        started = time.perf_counter()
        lm.cut_prompts = 0
        result = _task(name)(lm, options)
        result.cut_prompts = lm.cut_prompts
        results.append(result)
        if on_result is not None:
            on_result(result, time.perf_counter() - started)
    return results


def progress(result: TaskResult, seconds: float, digits: int = 4) -> str:
    """The line a task's result is reported with as it finishes, and a warning when prompts did not fit."""
    main = result.metrics[0]
    err = f" ± {main.stderr:.{digits}f}" if main.stderr is not None else ""
    line = f"  {result.task}: {main.name} {main.value:.{digits}f}{err} · n={result.n} · {seconds:.1f} s"
    if result.cut_prompts:
        line += (f"\n  warning: {result.cut_prompts} of {result.n} {result.task} prompts did not fit the model's "
                 "context with room to answer and lost their beginning; a longer model.context_length scores them "
                 "whole")
    return line
