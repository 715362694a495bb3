"""`fermion card RUN`: a Hugging Face model card (README.md) written from the run's own records.

Every number in the card is read from what the run wrote: the recipes (recipe.yaml of the run and of each
continued-pretraining and post-training stage), the newest good checkpoint's trainer_state.json (steps, tokens
seen, wall-clock, batch, hardware, precision), metrics.jsonl (loss curves, throughput), the shard index (tokens per
source), the `fermion prepare` report (filtering counts), the SFT/DPO report.json (records read, used, skipped),
each stage's eval/results.json (benchmarks and smoke-test verdicts, compared across stages) and the trainer's
eval/step_N/results.json (benchmarks during training). Parameter counts come from fermion.model.counting. A section
whose records are missing says so and names the command that would produce them; nothing is estimated.

The stages are pretrain, each continued-pretraining stage (recipe `stages:`), sft and dpo, in that order, where
they have checkpoints. The card describes the final model: the last of them. The README and the loss plots are
rendered in memory first and then each file is renamed into place, so an error leaves no half-written card.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fermion import layout
from fermion.atomic import replaced_file
from fermion.config import Recipe, RecipeError, load_recipe
from fermion.errors import ExportError

SAMPLE_PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):\n"]
SAMPLE_CHAT_PROMPTS = ["Tell me a short story about a cat.", "What is 2 + 3?", "Name three colours."]
SAMPLE_SEED = 0
SAMPLE_TOKENS = 48


@dataclass
class StageRecord:
    name: str  # pretrain, a continued stage's name, sft or dpo
    kind: str  # pretrain (the base run and continued stages), sft or dpo
    dir: Path
    recipe: Recipe  # the stage's own recipe.yaml
    data: object  # the section whose sources it trained on: DataConfig, SFTConfig or DPOConfig (None if absent)
    checkpoint: Path
    state: dict
    metrics: list[dict] = field(default_factory=list)
    report: dict | None = None  # sft/dpo report.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokens(self) -> int:
        return int(self.state["tokens_seen"])


def _load_recipe(path: Path) -> Recipe:
    try:
        return load_recipe(path, check_paths=False)
    except RecipeError as err:
        raise ExportError(f"cannot write a model card: {err}") from None


def _stage(name: str, kind: str, directory: Path, data) -> StageRecord | None:
    from fermion import checkpoint

    ckpt = checkpoint.find(directory, warn=lambda *_: None, required=False)
    if ckpt is None:
        return None
    recipe_path = layout.recipe_file(directory)
    recipe = _load_recipe(recipe_path if recipe_path.is_file() else layout.recipe_file(ckpt))
    state = checkpoint.trainer_state_of(ckpt)
    state.setdefault("step", layout.step_of(ckpt))
    metrics = []
    metrics_path = layout.metrics_file(directory)
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("step", 0) <= state["step"]:
                    metrics.append(record)
    report_path = layout.report_file(directory)
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return StageRecord(name, kind, directory, recipe, data, ckpt, state, metrics, report)


def gather(run_dir: Path) -> tuple[Recipe, list[StageRecord]]:
    """The run's recipe and its trained stages (pretrain, continued stages, sft, dpo: those with checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run directory (no such folder)")
    if not layout.recipe_file(run_dir).is_file():
        raise ExportError(f"{run_dir} is not a run directory: it has no {layout.RECIPE}")
    recipe = _load_recipe(layout.recipe_file(run_dir))
    # Default stage directories are taken under run_dir (where the run is now), not under the recipe's run.dir.
    planned = [(name, name if name in layout.POST_TRAINING else "pretrain", directory, section)
               for name, directory, section in layout.stages(run_dir, recipe)]
    stages = [stage for args in planned if (stage := _stage(*args)) is not None]
    if not stages:
        raise ExportError(f"{run_dir} has no complete checkpoint yet: train it first (fermion pretrain RECIPE)")
    return recipe, stages


# ------------------------------------------------------------------------------------------------- formatting


def _n(value: int) -> str:
    return f"{value:,}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{seconds:,.1f} s"
    if hours >= 1:
        text += f" ({int(hours)} h {int(minutes)} min)"
    elif minutes >= 1:
        text += f" ({int(minutes)} min {secs:.0f} s)"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def _source_label(source) -> str:
    if source.dataset:
        return source.dataset + (f" ({source.subset})" if source.subset else "")
    if source.builtin:
        return source.builtin
    return ", ".join(source.paths) or source.name


# --------------------------------------------------------------------------------------------------- sections


def front_matter(recipe: Recipe, stages: list[StageRecord], license: str, language: str) -> str:
    """The metadata Hugging Face reads; datasets are the sources of the stages the model went through."""
    final = stages[-1]
    sources = [source for s in stages if s.data is not None for source in s.data.sources]
    datasets = list(dict.fromkeys(_source_label(s) for s in sources))
    model = final.recipe.model
    tags = ["fermion", "llama-style" if not model.moe else "moe", "causal-lm"]
    if model.moe:
        tags.append("mixture-of-experts")
    tags += [s.kind for s in stages if s.kind in layout.POST_TRAINING]
    meta = {"license": license, "language": [language], "datasets": datasets, "tags": tags,
            "pipeline_tag": "text-generation", "library_name": "transformers"}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def architecture_section(final: StageRecord) -> list[str]:
    from fermion.model.counting import count
    from fermion.model.hf import architecture

    cfg = final.recipe.model
    counts = count(cfg, final.recipe.seq_len)
    try:
        hf_arch = architecture(cfg)
    except ExportError as err:
        hf_arch = f"none ({err})"
    rows = [["transformers architecture", hf_arch], ["layers", _n(cfg.n_layers)], ["d_model", _n(cfg.d_model)],
            ["attention heads", _n(cfg.n_heads)], ["key/value heads", _n(cfg.n_kv_heads or cfg.n_heads)],
            ["head dim", _n(cfg.head_dim or cfg.d_model // cfg.n_heads)], ["SwiGLU hidden", _n(cfg.ffn_hidden)],
            ["vocabulary", _n(cfg.vocab_size)], ["context length", _n(cfg.context_length)],
            ["RoPE theta", f"{cfg.rope_theta:g}"], ["tied embeddings", str(cfg.tie_embeddings).lower()],
            ["QK norm", str(cfg.qk_norm).lower()],
            ["sliding window", _n(cfg.sliding_window) if cfg.sliding_window else "none"]]
    if cfg.moe:
        rows += [["experts", _n(cfg.moe.n_experts)], ["experts per token", _n(cfg.moe.top_k)]]
    lines = ["## Architecture", "", *_table(["", ""], rows), "",
             "## Parameters", "", *_table(["", "count"], [["total parameters", _n(counts.total_params)],
                                                          ["active parameters per token", _n(counts.active_params)],
                                                          ["input embedding", _n(counts.embedding_params)]]), ""]
    return lines


def _optimizer(train) -> str:
    return (f"AdamW (betas {train.betas[0]:g}/{train.betas[1]:g}, eps {train.eps:g}, weight decay "
            f"{train.weight_decay:g}" + (f", grad clip {train.grad_clip:g}" if train.grad_clip else "") + ")")


def _schedule(train) -> str:
    text = f"{train.schedule}, peak lr {train.lr:g}, warmup {_n(train.warmup_steps)} steps"
    if train.schedule != "constant":
        text += f", min lr ratio {train.min_lr_ratio:g}"
    if train.schedule == "wsd":
        text += f", decay fraction {train.decay_fraction:g}"
    return text


def _throughput(stage: StageRecord) -> str:
    rates = [r["tokens_per_s"] for r in stage.metrics if isinstance(r.get("tokens_per_s"), (int, float))]
    mfu = [r["mfu"] for r in stage.metrics if isinstance(r.get("mfu"), (int, float))]
    if not rates:
        return "not recorded"
    text = f"{sum(rates) / len(rates):,.0f} tokens/s (mean of {len(rates)} logged steps)"
    if mfu:
        text += f", MFU {100 * sum(mfu) / len(mfu):.1f}%"
    return text


def _hardware(state: dict) -> str:
    hw = state.get("hardware")
    if not hw:
        return "not recorded (the checkpoint predates hardware records)"
    cores = f", {_n(hw['cpu_cores'])} CPU cores" if hw.get("cpu_cores") else ""
    return f"{_n(hw['count'])} × {hw['name']} ({hw['device']}{cores})"


def _precision(stage: StageRecord) -> str:
    setting = f"train.precision: {stage.recipe.train.precision}"
    return f"{stage.state['precision']} ({setting})" if "precision" in stage.state else f"not recorded ({setting})"


def _compiled(stage: StageRecord) -> str:
    setting = f"train.compile: {str(stage.recipe.train.compile).lower()}"
    if "compiled" not in stage.state:
        return f"not recorded ({setting})"
    return f"{'yes' if stage.state['compiled'] else 'no'} ({setting})"


def training_section(stages: list[StageRecord]) -> list[str]:
    header = ["", *[s.name for s in stages]]
    rows = [
        ["hardware", *[_hardware(s.state) for s in stages]],
        ["device setting", *[s.recipe.train.device for s in stages]],
        ["precision", *[_precision(s) for s in stages]],
        ["compiled", *[_compiled(s) for s in stages]],
        ["optimizer", *[_optimizer(s.recipe.train) for s in stages]],
        ["schedule", *[_schedule(s.recipe.train) for s in stages]],
        ["sequence length", *[_n(s.recipe.seq_len) for s in stages]],
        ["batch (sequences per step)", *[_n(s.state["global_batch"]) if "global_batch" in s.state else "not recorded"
                                         for s in stages]],
        ["tokens per step", *[_n(s.tokens // s.step) if s.step else "not recorded" for s in stages]],
        ["world size", *[_n(s.state["world_size"]) if "world_size" in s.state else "not recorded" for s in stages]],
        ["steps", *[_n(s.step) for s in stages]],
        ["tokens seen", *[_n(s.tokens) for s in stages]],
        ["wall-clock (training steps)", *[_duration(s.state["elapsed_s"]) if "elapsed_s" in s.state
                                          else "not recorded" for s in stages]],
        ["throughput", *[_throughput(s) for s in stages]],
        ["final train loss", *[_last(s, "loss") for s in stages]],
        ["final validation loss", *[_last(s, "val_loss") for s in stages]],
        ["checkpoint", *[f"`{s.checkpoint}`" for s in stages]],
    ]
    return ["## Training", "", *_table(header, rows), ""]


def _last(stage: StageRecord, key: str) -> str:
    for record in reversed(stage.metrics):
        if isinstance(record.get(key), (int, float)):
            return f"{record[key]:.4f} (step {_n(record['step'])})"
    return "not recorded"


def data_section(stages: list[StageRecord]) -> list[str]:
    lines = ["## Data", ""]
    for stage in stages:
        if stage.kind == "pretrain":
            lines += _pretraining_data(stage)
        else:
            lines += _post_training_data(stage)
    return lines


def _pretraining_data(stage: StageRecord) -> list[str]:
    """The mix of the base run or of a continued stage: tokens per source from its shard index, and filtering."""
    title = "Pretraining mix" if stage.name == "pretrain" else f"Continued pretraining: {stage.name}"
    lines = [f"### {title}", ""]
    if stage.data is None:
        return [*lines, "Not recorded: the recipe has no data section for this stage.", ""]
    index_path = layout.shard_dir(stage.dir, stage.data) / layout.SHARD_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    rows = []
    for source in stage.data.sources:
        entry = (index or {}).get("sources", {}).get(source.name)
        if entry:
            rows.append([source.name, _source_label(source), entry["kind"], f"{entry['weight']:g}",
                         _n(entry["train"]["documents"]), _n(entry["train"]["tokens"]), _n(entry["val"]["tokens"])])
        else:
            rows.append([source.name, _source_label(source), source.kind, f"{source.weight:g}",
                         "not recorded", "not recorded", "not recorded"])
    lines += _table(["source", "from", "kind", "weight", "train documents", "train tokens", "val tokens"], rows)
    if index:
        lines += ["", f"Total: {_n(index['splits']['train']['tokens'])} train tokens, "
                      f"{_n(index['splits']['val']['tokens'])} validation tokens (`{index_path}`)."]
    else:
        lines += ["", f"No shard index at `{index_path}`: token counts per source are not recorded."]
    heading = "### Filtering" if stage.name == "pretrain" else f"#### Filtering ({stage.name})"
    return [*lines, "", heading, "", *_filtering(stage.dir, stage.recipe), ""]


def _post_training_data(stage: StageRecord) -> list[str]:
    lines = [f"### {stage.name.upper()} data", ""]
    if stage.data is not None:
        lines += [f"Sources: {', '.join(f'{s.name} ({_source_label(s)})' for s in stage.data.sources)}.", ""]
    report = stage.report
    if report is None:
        return [*lines, f"No `{layout.report_file(stage.dir)}`: record counts are not recorded.", ""]
    rows = [["records read", _n(report["records_read"])], ["records used", _n(report["records_used"])]]
    rows += [[f"skipped: {reason}", _n(n)] for reason, n in report.get("skipped", {}).items()]
    for key in ("truncated", "train_conversations", "val_conversations", "train_pairs", "val_pairs",
                "train_tokens", "assistant_tokens"):
        if isinstance(report.get(key), int):
            rows.append([key.replace("_", " "), _n(report[key])])
    return [*lines, *_table(["", "count"], rows), ""]


def _filtering(run_dir: Path, recipe: Recipe) -> list[str]:
    if recipe.data.prepare is None:
        return ["No filtering: the recipe has no `data.prepare` section, so the sources were tokenized as read "
                "(no per-source filtering counts exist)."]
    from fermion.prepare import plan_id

    base = layout.prepared_dir(run_dir, recipe.data)
    path = base / plan_id(recipe) / layout.PREPARE_REPORT
    if not path.is_file():
        found = sorted(base.glob(f"*/{layout.PREPARE_REPORT}"))
        if len(found) != 1:
            return [f"Not recorded: no `fermion prepare` report at `{path}`."]
        path = found[0]
    report = json.loads(path.read_text())
    rows = []
    for name, source in report["sources"].items():
        removed = Counter()
        for step in source.get("steps", []):
            removed[step["step"]] += step["documents_in"] - step["documents_out"]
        dropped = ", ".join(f"{step} {_n(n)}" for step, n in removed.items() if n) or "none"
        kept_tokens = source["kept"].get("tokens")
        rows.append([name, _n(source["read"]["documents"]), _n(source["kept"]["documents"]),
                     _n(kept_tokens) if kept_tokens is not None else "not recorded", dropped])
    return [*_table(["source", "documents read", "documents kept", "tokens kept", "removed by step"], rows), "",
            f"From `{path}`."]


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
        lines += _table(["task", "metric", "value", "± stderr", "shots", "n"], rows)
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
    lines = ["### Evaluation across stages", "", *_table(["task", "metric", *[s.name for s, _ in evaluated]], rows),
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
        rows = [[_n(step), *[scores.get(c, "not evaluated") for c in columns]] for step, scores in by_step]
        pattern = f"{layout.eval_dir(stage.dir)}/{layout.STEP_PREFIX}*/{layout.EVAL_RESULTS}"
        lines += [f"### Evaluation during training: {stage.name}", "", *_table(["step", *columns], rows), "",
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
    rows = [[s["kind"], f"{s['temperature']:g}", s["verdict"], s.get("reason") or "", _clip(s["text"], 60)]
            for s in smoke["samples"]]
    return [*lines, "", *_table(["kind", "temperature", "verdict", "reason", "answer"], rows), ""], smoke["samples"]


def _fenced(text: str) -> list[str]:
    """A code block that a run of backticks inside the text cannot close early."""
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + "text", text.rstrip(), fence]


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def samples_section(final: StageRecord, smoke_samples: list[dict], generate: bool) -> list[str]:
    lines = ["## Sample generations", ""]
    if smoke_samples:
        lines += ["From the smoke test's records (its prompts, sampled with a seed per prompt):", ""]
        chosen = [s for s in smoke_samples if s["temperature"] == min(x["temperature"] for x in smoke_samples)][:4]
        for s in chosen:
            lines += [f"**Prompt** (temperature {s['temperature']:g}, verdict {s['verdict']}):", "",
                      *_fenced(s["prompt"]), "", "**Completion:**", "", *_fenced(s["text"]), ""]
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
        lines += [f"**Prompt** (seed {SAMPLE_SEED + i}):", "", *_fenced(prompt), "",
                  "**Completion:**", "", *_fenced(completion.text), ""]
    return lines


def loss_plots(stages: list[StageRecord]) -> dict[str, bytes]:
    """loss_<stage>.png per stage with logged losses: train loss per step, validation loss where evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = {}
    for stage in stages:
        train = [(r["step"], r["loss"]) for r in stage.metrics if isinstance(r.get("loss"), (int, float))]
        val = [(r["step"], r["val_loss"]) for r in stage.metrics if isinstance(r.get("val_loss"), (int, float))]
        if not train and not val:
            continue
        figure = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        if train:
            axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if val:
            axes.plot(*zip(*val, strict=True), "o-", label="validation loss")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(f"{stage.name} ({stage.recipe.run.name})")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plots[f"loss_{stage.name}.png"] = buffer.getvalue()
    return plots


def usage_section(run_arg: str, final: StageRecord) -> list[str]:
    hf, gguf_dir = layout.export_dir(final.dir, "hf"), layout.export_dir(final.dir, "gguf")
    ggufs = sorted(gguf_dir.glob("*.gguf"))
    name = final.recipe.run.name
    lines = ["## Usage", "", "### transformers", ""]
    if not (hf / "config.json").is_file():
        lines += [f"Export first: `fermion export {run_arg} --format hf` (writes `{hf}`).", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{hf}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{hf}")']
    if final.kind == "pretrain":
        lines += ['inputs = tokenizer("Once upon a time", return_tensors="pt")']
    else:
        lines += ['messages = [{"role": "user", "content": "Hello!"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
                  " return_dict=True)"]
    lines += ["output = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.7)",
              "print(tokenizer.decode(output[0], skip_special_tokens=True))", "```", "",
              "### llama.cpp and Ollama", ""]
    gguf = ggufs[0] if ggufs else gguf_dir / f"{name}-f16.gguf"
    if not ggufs:
        lines += [f"Export first: `fermion export {run_arg} --format gguf` (writes `{gguf}` and a Modelfile).", ""]
    lines += ["```sh", f'llama-cli -m {gguf} -p "Once upon a time" -n 64', "",
              f"ollama create {name} -f {gguf_dir / 'Modelfile'}", f"ollama run {name}", "```", "",
              "### fermion", "", "```sh", f"fermion chat {run_arg}",
              f'fermion generate {run_arg} "Once upon a time"', f"fermion serve {run_arg}", "```", ""]
    return lines


def limitations_section(final: StageRecord, stages: list[StageRecord]) -> list[str]:
    total = sum(s.tokens for s in stages)
    lines = ["## Limitations", "",
             f"- A small model trained on {_n(total)} tokens in all ({' + '.join(_n(s.tokens) for s in stages)} "
             f"over {', '.join(s.name for s in stages)}): expect factual errors, repetition and incoherent text.",
             f"- The context is {_n(final.recipe.model.context_length)} tokens; longer prompts are cut.",
             "- It knows only what its training data holds (see Data); the language tag is the recipe author's, "
             "not measured.",
             "- It has had no safety training" + (" beyond the DPO stage's preference data" if final.kind == "dpo"
                                                  else "") + "; do not use it where harmful output matters.",
             "- Evaluation numbers with small n (see the table) have wide error bars."]
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------------ card


def render(run_dir: Path, license: str = "apache-2.0", language: str = "en",
           generate: bool = True) -> tuple[str, dict[str, bytes], Path]:
    """The README's text, the loss plots (file name -> PNG bytes) and the final stage's directory; nothing is
    written."""
    run_dir = Path(run_dir)
    recipe, stages = gather(run_dir)
    final = stages[-1]
    run_arg = str(final.dir)  # the final stage: what `fermion eval/export/chat` must be pointed at
    plots = loss_plots(stages)
    smoke, smoke_samples = smoke_section(run_arg, final)
    stage_names = " → ".join(s.name for s in stages)
    lines = [front_matter(recipe, stages, license, language), f"# {final.recipe.run.name}", "",
             f"A {_n(final.recipe.model.n_layers)}-layer language model trained with "
             f"fermion from scratch ({stage_names}). This card describes the final "
             f"{final.name} checkpoint `{final.checkpoint}` (step {_n(final.step)}); every number below is read "
             f"from the run's records in `{run_dir}`.", ""]
    lines += architecture_section(final)
    lines += training_section(stages)
    lines += ["### Loss curves", ""]
    if plots:
        lines += [f"![{name}]({name})" for name in plots] + [""]
    else:
        lines += ["Not recorded: the run has no metrics.jsonl.", ""]
    lines += data_section(stages)
    lines += eval_section(run_arg, stages)
    lines += smoke
    lines += samples_section(final, smoke_samples, generate)
    lines += usage_section(run_arg, final)
    lines += limitations_section(final, stages)
    lines += ["## License", "", f"{license} (set with `fermion card --license`; the recipe records no license).",
              ""]
    return "\n".join(lines), plots, final.dir


def build_card(run_dir: str | Path, out_dir: str | Path | None = None, *, license: str = "apache-2.0",
               language: str = "en", generate: bool = True) -> Path:
    """Write <out_dir>/README.md and its loss plots; return the README's path. The default folder is the final
    stage's Hugging Face export: <run>/export/hf, or <run>/sft/export/hf, <run>/dpo/export/hf after post-training."""
    run_dir = Path(run_dir)
    try:
        text, plots, final_dir = render(run_dir, license=license, language=language, generate=generate)
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ExportError(f"cannot write a model card for {run_dir}: its records are unreadable ({err})") from None
    # Beside the final model's Hugging Face export (`fermion export` writes <final stage>/export/hf).
    out = Path(out_dir) if out_dir is not None else layout.card_file(final_dir).parent
    out.mkdir(parents=True, exist_ok=True)
    for name, data in plots.items():
        with replaced_file(out / name) as tmp:
            tmp.write_bytes(data)
    with replaced_file(out / layout.CARD) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out / layout.CARD
