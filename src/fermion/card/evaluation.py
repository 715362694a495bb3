"""The card's evaluation: the final stage's results, every stage's side by side, the benchmarks run during
training, the smoke test, and sample generations (recorded, or generated with fixed seeds)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fermion import layout
from fermion.card.markdown import clip, fenced, number, table
from fermion.card.records import StageRecord

SAMPLE_PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):\n"]
SAMPLE_CHAT_PROMPTS = ["Tell me a short story about a cat.", "What is 2 + 3?", "Name three colours."]
SAMPLE_SEED = 0
SAMPLE_TOKENS = 48

def _results(stage: StageRecord) -> tuple[Path, dict | None]:
    path = layout.eval_results(stage.dir)
    return path, (json.loads(path.read_text()) if path.is_file() else None)


def _with_error(metric: dict) -> str:
    value = f"{metric['value']:.4f}"
    return value + (f" ± {metric['stderr']:.4f}" if metric.get("stderr") is not None else "")


def eval_section(run_arg: str, stages: list[StageRecord]) -> list[str]:
    final = stages[-1]
    path, results = _results(final)
    lines = ["## Evaluation", ""]
    if results is None:
        lines += [f"Not evaluated: run `fermion eval {run_arg}` (it writes `{path}`).", ""]
    else:
        rows = []
        for r in results["results"]:
            for m in r["metrics"]:
                err = f"{m['stderr']:.4f}" if m.get("stderr") is not None else "–"
                rows.append([r["task"], m["name"], f"{m['value']:.4f}", err, str(r["shots"]), str(r["n"])])
        settings = ", ".join(f"{k} {results[k]}" for k in ("limit", "seed", "dtype", "chat") if k in results)
        lines += table(["task", "metric", "value", "± stderr", "shots", "n"], rows)
        lines += ["", f"From `{path}`" + (f" ({settings})." if settings else "."), ""]
    return lines + _across_stages(stages) + _during_training(stages)


def _across_stages(stages: list[StageRecord]) -> list[str]:
    """Each stage's eval/results.json side by side: what every stage of training did to the scores."""
    evaluated = [(s, results) for s in stages if (results := _results(s)[1]) is not None]
    if len(evaluated) < 2:
        return []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for stage, results in evaluated:
        for r in results["results"]:
            for m in r["metrics"]:
                cells.setdefault((r["task"], m["name"]), {})[stage.name] = _with_error(m)
    rows = [[task, metric, *[by_stage.get(s.name, "not evaluated") for s, _ in evaluated]]
            for (task, metric), by_stage in cells.items()]
    lines = ["### Evaluation across stages", "", *table(["task", "metric", *[s.name for s, _ in evaluated]], rows),
             "", "Value ± standard error, from " + ", ".join(f"`{_results(s)[0]}`" for s, _ in evaluated) + "."]
    missing = [s.name for s in stages if s.name not in {e.name for e, _ in evaluated}]
    if missing:
        lines.append(f"Not evaluated: {', '.join(missing)} (no eval/results.json in its directory).")
    return [*lines, ""]


def _during_training(stages: list[StageRecord]) -> list[str]:
    """The benchmarks the trainer ran every eval.every steps (<stage>/eval/step_N/results.json): step by main
    metric (each task's first) per task."""
    lines = []
    for stage in stages:
        paths = sorted(layout.eval_dir(stage.dir).glob(f"{layout.STEP_PREFIX}*/{layout.EVAL_RESULTS}"))
        if not paths:
            continue
        columns: dict[str, None] = {}
        by_step = []
        for path in paths:
            scores = {f"{r['task']} {r['metrics'][0]['name']}": _with_error(r["metrics"][0])
                      for r in json.loads(path.read_text())["results"] if r["metrics"]}
            columns.update(dict.fromkeys(scores))
            by_step.append((layout.step_of(path.parent), scores))
        rows = [[number(step), *[scores.get(c, "not evaluated") for c in columns]] for step, scores in by_step]
        pattern = f"{layout.eval_dir(stage.dir)}/{layout.STEP_PREFIX}*/{layout.EVAL_RESULTS}"
        lines += [f"### Evaluation during training: {stage.name}", "", *table(["step", *columns], rows), "",
                  f"From `{pattern}` (written every eval.every steps).", ""]
    return lines


def smoke_section(run_arg: str, final: StageRecord) -> tuple[list[str], list[dict]]:
    _, results = _results(final)
    smoke = next((r for r in (results or {}).get("results", []) if r["task"] == "smoke"), None)
    lines = ["## Smoke test", ""]
    if smoke is None:
        return [*lines, f"Not run: `fermion eval {run_arg} --tasks smoke`.", ""], []
    counts = Counter(s["verdict"] for s in smoke["samples"])
    lines.append(" / ".join(f"{counts.get(label, 0)} {label}" for label in ("OK", "WEAK", "FAIL")) +
                 f" over {len(smoke['samples'])} answers.")
    rows = [[s["kind"], f"{s['temperature']:g}", s["verdict"], s.get("reason") or "", clip(s["text"], 60)]
            for s in smoke["samples"]]
    return [*lines, "", *table(["kind", "temperature", "verdict", "reason", "answer"], rows), ""], smoke["samples"]


def samples_section(final: StageRecord, smoke_samples: list[dict], generate: bool) -> list[str]:
    lines = ["## Sample generations", ""]
    if smoke_samples:
        lines += ["From the smoke test's records (its prompts, sampled with a seed per prompt):", ""]
        chosen = [s for s in smoke_samples if s["temperature"] == min(x["temperature"] for x in smoke_samples)][:4]
        for s in chosen:
            lines += [f"**Prompt** (temperature {s['temperature']:g}, verdict {s['verdict']}):", "",
                      *fenced(s["prompt"]), "", "**Completion:**", "", *fenced(s["text"]), ""]
        return lines
    if not generate:
        return [*lines, f"None recorded: run `fermion eval {final.dir} --tasks smoke` for a recorded set.", ""]
    return lines + _fresh_samples(final)


def _fresh_samples(final: StageRecord) -> list[str]:
    from fermion import checkpoint
    from fermion.infer.engine import Engine, SamplingParams, prepare_for_decode

    loaded = checkpoint.load(final.checkpoint, warn=lambda *_: None)
    engine = Engine(prepare_for_decode(loaded.model), loaded.tokenizer, max_batch=1)
    chat = final.kind != "pretrain"
    template = loaded.chat_template() if chat else None
    prompts = SAMPLE_CHAT_PROMPTS if chat else SAMPLE_PROMPTS
    lines = [f"Generated for this card from `{final.checkpoint}`: temperature 0.7, top-p 0.95, "
             f"{SAMPLE_TOKENS} new tokens at most, seed {SAMPLE_SEED} + prompt number"
             + (f", through the {loaded.recipe.tokenizer.chat_template} template" if chat else "") + ".", ""]
    for i, prompt in enumerate(prompts):
        text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
        params = SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0.7, top_p=0.95, seed=SAMPLE_SEED + i,
                                stop=list(template.stop_strings) if chat else [])
        completion = engine.complete(text, params)
        lines += [f"**Prompt** (seed {SAMPLE_SEED + i}):", "", *fenced(prompt), "",
                  "**Completion:**", "", *fenced(completion.text), ""]
    return lines
