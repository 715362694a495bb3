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
from pathlib import Path

import yaml

from fermion import layout
from fermion.atomic import replaced_file
from fermion.card.data import data_section, dataset_names
from fermion.card.evaluation import eval_section, samples_section, smoke_section
from fermion.card.markdown import duration, number, table
from fermion.card.records import StageRecord, gather, started_from
from fermion.config import Recipe
from fermion.errors import ExportError

__all__ = ["StageRecord", "build_card", "gather", "render", "training_section"]


def architecture_tag(cfg) -> str | None:
    """The transformers model family the Hugging Face export writes (llama, mistral, mixtral, qwen3, qwen3_moe), the
    tag the Hub files such models under; None for a model no family computes."""
    from fermion.model.hf import architecture

    try:
        return architecture(cfg)
    except ExportError:
        return None


def front_matter(stages: list[StageRecord], license: str, language: str) -> str:
    """The metadata Hugging Face reads; datasets are the sources of the stages the model went through."""
    model = stages[-1].recipe.model
    sources = [source for s in stages if s.data is not None for source in s.data.sources]
    family = architecture_tag(model)
    tags = ["fermion", *([family] if family else []), "causal-lm"] + (["mixture-of-experts"] if model.moe else [])
    tags += [s.kind for s in stages if s.kind in layout.POST_TRAINING]
    meta = {"license": license, "language": [language], "datasets": dataset_names(sources), "tags": tags,
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
    rows = [["transformers architecture", hf_arch], ["layers", number(cfg.n_layers)], ["d_model", number(cfg.d_model)],
            ["attention heads", number(cfg.n_heads)], ["key/value heads", number(cfg.n_kv_heads or cfg.n_heads)],
            ["head dim", number(cfg.head_dim or cfg.d_model // cfg.n_heads)], ["SwiGLU hidden", number(cfg.ffn_hidden)],
            ["vocabulary", number(cfg.vocab_size)], ["context length", number(cfg.context_length)],
            ["RoPE theta", f"{cfg.rope_theta:g}"], ["tied embeddings", str(cfg.tie_embeddings).lower()],
            ["QK norm", str(cfg.qk_norm).lower()],
            ["sliding window", number(cfg.sliding_window) if cfg.sliding_window else "none"]]
    if cfg.moe:
        rows += [["experts", number(cfg.moe.n_experts)], ["experts per token", number(cfg.moe.top_k)]]
    lines = ["## Architecture", "", *table(["", ""], rows), "",
             "## Parameters", "", *table(["", "count"], [["total parameters", number(counts.total_params)],
                                                          ["active parameters per token", number(counts.active_params)],
                                                          ["input embedding", number(counts.embedding_params)]]), ""]
    return lines


def _optimizer(train) -> str:
    if getattr(train, "optimizer", "adamw") == "muon":
        return (f"Muon for the blocks' matrices (lr {train.muon_lr or train.lr:g}, Nesterov momentum "
                f"{train.muon_momentum:g}, update RMS matched to AdamW's) and " + _adamw(train) + " for the rest")
    return _adamw(train)


def _adamw(train) -> str:
    return (f"AdamW (betas {train.betas[0]:g}/{train.betas[1]:g}, eps {train.eps:g}, weight decay "
            f"{train.weight_decay:g}" + (f", grad clip {train.grad_clip:g}" if train.grad_clip else "") + ")")


def _schedule(train) -> str:
    text = f"{train.schedule}, peak lr {train.lr:g}, warmup {number(train.warmup)} steps"
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
    cores = f", {number(hw['cpu_cores'])} CPU cores" if hw.get("cpu_cores") else ""
    return f"{number(hw['count'])} × {hw['name']} ({hw['device']}{cores})"


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
        ["sequence length", *[number(s.recipe.seq_len) for s in stages]],
        ["batch (sequences per step)", *[number(s.state["global_batch"]) if "global_batch" in s.state
                                         else "not recorded" for s in stages]],
        ["tokens per step", *[number(s.tokens // s.step) if s.step else "not recorded" for s in stages]],
        ["world size", *[number(s.state["world_size"]) if "world_size" in s.state else "not recorded" for s in stages]],
        ["steps", *[number(s.step) for s in stages]],
        ["tokens seen", *[number(s.tokens) for s in stages]],
        ["wall-clock (training steps)", *[duration(s.state["elapsed_s"]) if "elapsed_s" in s.state
                                          else "not recorded" for s in stages]],
        ["throughput", *[_throughput(s) for s in stages]],
        ["final train loss", *[_last(s, "loss") for s in stages]],
        ["final validation loss", *[_last(s, "val_loss") for s in stages]],
        ["checkpoint", *[f"`{s.checkpoint}`" for s in stages]],
    ]
    return ["## Training", "", *table(header, rows), ""]


def _last(stage: StageRecord, key: str) -> str:
    for record in reversed(stage.metrics):
        if isinstance(record.get(key), (int, float)):
            return f"{record[key]:.4f} (step {number(record['step'])})"
    return "not recorded"


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


def _exports(recipe: Recipe, final: StageRecord) -> list[str]:
    """What `fermion run` ships (the recipe's export section: formats and dtypes), and where each one is."""
    from fermion.export import DEFAULT_DTYPES

    rows = []
    for fmt, dtype in recipe.export.dtypes().items():
        folder = layout.export_dir(final.dir, fmt)
        where = f"`{folder}`" if folder.is_dir() and any(folder.iterdir()) else "not exported yet"
        rows.append([fmt, dtype or DEFAULT_DTYPES[fmt], where])
    return ["### Exports", "", *table(["format", "dtype", "folder"], rows), "",
            "The recipe's `export` section: what `fermion run` exports.", ""]


def _gguf_problem(final: StageRecord) -> str | None:
    """Why this model has no GGUF (the exporter's own check), or None."""
    from fermion.export import check

    tokenizer_file = layout.tokenizer_file(final.checkpoint)
    tokenizer = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else None
    try:
        check("gguf", final.recipe.model, None, tokenizer)
    except ExportError as err:
        return str(err)
    return None


def usage_section(run_arg: str, final: StageRecord, recipe: Recipe) -> list[str]:
    hf, gguf_dir = layout.export_dir(final.dir, "hf"), layout.export_dir(final.dir, "gguf")
    ggufs = sorted(gguf_dir.glob("*.gguf"))
    name = final.recipe.run.name
    lines = ["## Usage", "", *_exports(recipe, final), "### transformers", ""]
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
    problem = None if ggufs else _gguf_problem(final)
    if problem is not None:
        lines += [f"No GGUF export for this model: {problem}.", ""]
    else:
        gguf = ggufs[0] if ggufs else gguf_dir / f"{name}-f16.gguf"
        if not ggufs:
            lines += [f"Export first: `fermion export {run_arg} --format gguf` (writes `{gguf}` and a Modelfile).",
                      ""]
        lines += ["```sh", f'llama-cli -m {gguf} -p "Once upon a time" -n 64', "",
                  f"ollama create {name} -f {layout.modelfile(gguf)}", f"ollama run {name}", "```", ""]
    lines += ["### fermion", "", "```sh", f"fermion chat {run_arg}",
              f'fermion generate {run_arg} "Once upon a time"', f"fermion serve {run_arg}", "```", ""]
    return lines


def limitations_section(final: StageRecord, stages: list[StageRecord]) -> list[str]:
    total = sum(s.tokens for s in stages)
    lines = ["## Limitations", "",
             f"- A small model trained on {number(total)} tokens in all "
             f"({' + '.join(number(s.tokens) for s in stages)} "
             f"over {', '.join(s.name for s in stages)}): expect factual errors, repetition and incoherent text.",
             f"- The context is {number(final.recipe.model.context_length)} tokens; longer prompts are cut.",
             "- It knows only what its training data holds (see Data); the language tag is the recipe author's, "
             "not measured.",
             "- It has had no safety training" + (" beyond the DPO stage's preference data" if final.kind == "dpo"
                                                  else "") + "; do not use it where harmful output matters.",
             "- Evaluation numbers with small n (see the table) have wide error bars."]
    return [*lines, ""]


def _license(recipe: Recipe, chosen: str | None) -> tuple[str, str]:
    """The card's license and where it comes from: `fermion card --license`, else the recipe's run.license, else
    apache-2.0 (fermion's own), said to be a fallback."""
    if chosen:
        return chosen, "set with `fermion card --license`"
    if recipe.run.license:
        return recipe.run.license, "the recipe's run.license"
    return "apache-2.0", ("the recipe records no license, so the card falls back to fermion's own; set run.license "
                          "in the recipe or pass `fermion card --license`")


def _introduction(stages: list[StageRecord], run_dir: Path) -> str:
    final = stages[-1]
    path = " → ".join(s.name for s in stages)
    kind, source = started_from(stages)
    how = {"scratch": f"trained with fermion from scratch ({path})",
           "continued": f"trained with fermion, continued from `{source}` ({path})",
           "fine-tuned": f"fine-tuned with fermion from `{source}` ({path})"}[kind]
    return (f"A {number(final.recipe.model.n_layers)}-layer language model {how}. This card describes the final "
            f"{final.name} checkpoint `{final.checkpoint}` (step {number(final.step)}); every number below is read "
            f"from the run's records in `{run_dir}`.")


def render(run_dir: Path, license: str | None = None, language: str = "en",
           generate: bool = True) -> tuple[str, dict[str, bytes], Path]:
    """The README's text, the loss plots (file name -> PNG bytes) and the final stage's directory; nothing is
    written. `license` None: the recipe's run.license (see `_license`)."""
    run_dir = Path(run_dir)
    recipe, stages = gather(run_dir)
    final = stages[-1]
    run_arg = str(final.dir)  # the final stage: what `fermion eval/export/chat` must be pointed at
    plots = loss_plots(stages)
    smoke, smoke_samples = smoke_section(run_arg, final)
    license, license_origin = _license(recipe, license)
    lines = [front_matter(stages, license, language), f"# {final.recipe.run.name}", "",
             _introduction(stages, run_dir), ""]
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
    lines += usage_section(run_arg, final, recipe)
    lines += limitations_section(final, stages)
    lines += ["## License", "", f"{license} ({license_origin}).", ""]
    return "\n".join(lines), plots, final.dir


def build_card(run_dir: str | Path, out_dir: str | Path | None = None, *, license: str | None = None,
               language: str = "en", generate: bool = True) -> Path:
    """Write <out_dir>/README.md and its loss plots; return the README's path. The default folder is the final
    stage's Hugging Face export: <run>/export/hf, or <run>/sft/export/hf, <run>/dpo/export/hf after post-training.
    `license` None: the recipe's run.license, else apache-2.0 (the card says which)."""
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
