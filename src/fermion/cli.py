"""The `fermion` command: one Typer app, each command a thin function over a module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fermion.config import TOKENIZER_SECTIONS, Recipe, RecipeError, load_recipe

app = typer.Typer(help="Fermion: pretrain, post-train, evaluate and ship a small language model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect model architectures.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
console = Console(soft_wrap=True)  # log lines stay whole when piped to a file

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: --set train.lr=3e-4")]
RecipeArg = Annotated[Path, typer.Argument(help="The run's YAML recipe.")]


def fail(message: str, code: int = 2) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def recipe_or_exit(path: Path, overrides: list[str] | None, check_paths: bool = True, sections=None) -> Recipe:
    try:
        return load_recipe(path, overrides, check_paths=check_paths, sections=sections)
    except RecipeError as err:
        fail(str(err))


def run_guarded(action):
    """Run a stage, turning the project's own errors into one clear line and an exit code."""
    from fermion.chat.templates import TemplateError
    from fermion.data.sources import DataError
    from fermion.errors import CheckpointError, DamagedFileError, ExportError, StorageError
    from fermion.train.trainer import TrainingError

    try:
        return action()
    except (RecipeError, DataError, CheckpointError, ExportError, TemplateError, StorageError, DamagedFileError) as err:
        fail(str(err), code=2)
    except TrainingError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt:  # outside training (which checkpoints on Ctrl-C): nothing half-written is kept
        fail("interrupted", code=130)


ResumeOption = Annotated[str, typer.Option(help="auto: continue from the newest good checkpoint if any; "
                                                 "none: start fresh; or a checkpoint directory")]


def train_stage(stage, loaded: Recipe, resume: str) -> None:
    """Run a training stage on a loaded recipe; a preempted run (SIGTERM, checkpoint saved) exits 0."""
    result = run_guarded(lambda: stage(loaded, resume=resume, console=console))
    if result.status == "preempted":
        raise typer.Exit(0)


@app.command()
def pretrain(recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = "auto",
             stage: Annotated[str | None, typer.Option(help="Run this continued stage (stages:) on its own, from "
                                                            "the finished stage before it.")] = None) -> None:
    """Pretrain from the recipe (tokenizer and shards are built first if missing)."""
    loaded = recipe_or_exit(recipe, set_)  # a recipe's mistakes are reported before PyTorch is imported
    from fermion.train.pretrain import pretrain as run_pretrain

    train_stage(lambda loaded, **kw: run_pretrain(loaded, stage=stage, **kw), loaded, resume)


@app.command()
def prepare(
    recipe: RecipeArg,
    set_: SetOption = None,
    inspect: Annotated[str | None, typer.Option(help="Print examples of what STEP (e.g. minhash, c4) removed in the "
                                                     "finished preparation, instead of running it.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first invalid record instead of counting it.")] = False,
) -> None:
    """Clean, filter and deduplicate data.sources with datatrove (data.prepare), then train the tokenizer and write
    the shards from what was kept; prints and writes prepare_report.json."""
    loaded = recipe_or_exit(recipe, set_)
    from fermion.train.pretrain import prepare as run_prepare

    if inspect is None:
        run_guarded(lambda: run_prepare(loaded, strict=strict, console=console))
        return
    if loaded.data is None or loaded.data.prepare is None:
        fail("--inspect needs a recipe with a data.prepare section")
    from fermion.prepare import inspect as show_removed

    run_guarded(lambda: show_removed(loaded, inspect, console))


@app.command()
def sft(recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = "auto") -> None:
    """Supervised fine-tuning on the recipe's sft.sources, loss on assistant tokens only (into <run>/sft)."""
    loaded = recipe_or_exit(recipe, set_)
    from fermion.train.sft import sft as run_sft

    train_stage(run_sft, loaded, resume)


@app.command()
def dpo(recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = "auto") -> None:
    """Direct preference optimisation on the recipe's dpo.sources, from the SFT model (into <run>/dpo)."""
    loaded = recipe_or_exit(recipe, set_)
    from fermion.train.dpo import dpo as run_dpo

    train_stage(run_dpo, loaded, resume)


@app.command()
def rl(recipe: RecipeArg, set_: SetOption = None, resume: ResumeOption = "auto") -> None:
    """GRPO with verifiable rewards (rl.verifiers) on rl.sources' prompts, from the DPO or SFT model (into <run>/rl)."""
    loaded = recipe_or_exit(recipe, set_)
    from fermion.train.rl import rl as run_rl

    train_stage(run_rl, loaded, resume)


@tokenizer_app.command("train")
def tokenizer_train(recipe: RecipeArg, set_: SetOption = None,
                    force: Annotated[bool, typer.Option(help="Retrain even if the run has a tokenizer.")] = False):
    """Train the recipe's byte-level BPE tokenizer into the run directory (only the sections it reads are checked)."""
    loaded = recipe_or_exit(recipe, set_, sections=TOKENIZER_SECTIONS)
    from fermion.train.pretrain import train_tokenizer

    run_guarded(lambda: train_tokenizer(loaded, console, force=force))


@model_app.command("info")
def model_info(
    recipe: RecipeArg, set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    device: Annotated[str | None, typer.Option(help="Where training runs: cpu, cuda (this machine's GPU) or a GPU "
                                                    "name (h100, h200, a100-40gb, a100-80gb, l4, ...); default: "
                                                    "the recipe's train.device.")] = None,
    world_size: Annotated[int, typer.Option(min=1, help="Processes (devices) training together; train.distributed "
                                                        "says DDP or FSDP.")] = 1,
    micro_batch: Annotated[int | None, typer.Option(min=1, help="Sequences per device per micro-step; default: "
                                                               "train.micro_batch_size.")] = None,
    checkpointing: Annotated[str | None, typer.Option(help="Activation checkpointing: none, selective or full; "
                                                          "default: train.activation_checkpointing.")] = None,
    device_memory: Annotated[float | None, typer.Option(help="The device's memory in GiB, to say whether the step "
                                                             "fits (known for cpu and named GPUs).")] = None,
):
    """Parameters (total/active), FLOPs per token, and the predicted peak training memory per device (weights,
    gradients, optimizer state, activations under the chosen checkpointing, logits), computed without allocating
    weights."""
    loaded = recipe_or_exit(recipe, set_, check_paths=False)
    from fermion.model.counting import CHECKPOINTING, as_record, count, inference_memory, plan_memory

    if checkpointing is not None and checkpointing not in CHECKPOINTING:
        fail(f"--checkpointing must be one of {', '.join(CHECKPOINTING)}, not {checkpointing!r}")
    cfg = loaded.model
    counts = count(cfg, loaded.seq_len)
    try:
        plan = plan_memory(loaded, device, world_size, micro_batch, checkpointing, device_memory)
    except ValueError as err:
        fail(str(err))
    mem = plan.estimate

    def size(n_bytes: float) -> str:
        return _gib(n_bytes) if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"

    infer_mem = inference_memory(cfg)
    sized = loaded.depth_sizing()
    if as_json:
        print(json.dumps(as_record(counts, plan, infer_mem, sized)))
        return
    table = Table(title=f"{loaded.run.name} ({recipe})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    ffn = f"{cfg.moe.n_experts} experts × {cfg.ffn_hidden:,}, top-{cfg.moe.top_k}" if cfg.moe else f"{cfg.ffn_hidden:,}"
    table.add_row("architecture", f"{cfg.n_layers} layers · d_model {cfg.d_model:,} · {cfg.n_heads} heads "
                  f"({cfg.kv_heads} KV, dim {cfg.dim_per_head}) · SwiGLU {ffn}")
    extras = [f"context {cfg.context_length:,}", f"vocab {cfg.vocab_size:,}", f"RoPE θ {cfg.rope_theta:,.0f}",
              "tied" if cfg.tie_embeddings else "untied"]
    extras += ["QK-norm"] * cfg.qk_norm + ([f"sliding window {cfg.sliding_window:,}"] if cfg.sliding_window else [])
    table.add_row("", " · ".join(extras))
    if sized:
        train = loaded.train
        table.add_row(f"depth {cfg.depth}", f"{sized.describe()}; this recipe trains {train.steps:,} steps × "
                      f"{train.micro_batch_size} × {train.grad_accum} at lr {train.lr:.2e} (a field the recipe "
                      "sets wins over the rule)")
    table.add_row("parameters", f"{counts.total_params:,}")
    table.add_row("active parameters", f"{counts.active_params:,}")
    table.add_row("embedding parameters", f"{counts.embedding_params:,}")
    table.add_row(f"FLOPs/token (seq {loaded.seq_len:,})",
                  f"forward {counts.forward_flops_per_token / 1e9:,.3f} G · training "
                  f"{counts.train_flops_per_token / 1e9:,.3f} G")
    mode = f" ({plan.distributed})" if plan.world_size > 1 else ""
    table.add_row("training step", f"{plan.world_size} × {plan.device}{mode} · micro-batch {plan.micro_batch} × "
                  f"{plan.seq_len:,} · {plan.precision} · checkpointing {plan.checkpointing} · cross-entropy "
                  f"{plan.cross_entropy}{' · compiled (estimated as eager: usually less)' if plan.compiled else ''}")
    per = " per device" if plan.world_size > 1 else ""
    sharded = " (sharded)" if plan.world_size > 1 and plan.distributed == "fsdp" else ""
    optimizer = {"adamw": "AdamW", "muon": "Muon + AdamW"}[loaded.train.optimizer]
    table.add_row(f"  model state{per}", f"weights {size(mem.weights)} · grads {size(mem.gradients)} · {optimizer} "
                  f"{size(mem.optimizer)}{sharded}")
    table.add_row("  activations", f"saved {size(mem.activations)} · logits {size(mem.logits)}")
    if mem.distributed:
        what = "DDP gradient buckets" if plan.distributed == "ddp" else "FSDP gathered params and grads"
        table.add_row(f"  {what}", size(mem.distributed))
    verdict = ""
    if plan.fits is not None:
        overhead = " with allocator slack and CUDA context" if plan.device_type == "cuda" else ""
        verdict = (f" · {'fits' if plan.fits else '[red]does not fit[/]'} in {size(plan.device_memory)}"
                   f" ({size(plan.needed)} needed{overhead})")
    elif plan.device_type == "cuda":
        verdict = " · device memory unknown: pass --device NAME or --device-memory GiB"
    table.add_row(f"training memory peak{per}", f"{size(mem.peak)} (during the {mem.phase}){verdict}")
    table.add_row("inference memory (bf16, batch 1, full context)",
                  f"{size(infer_mem['total'])} = weights {size(infer_mem['weights'])} + KV cache "
                  f"{size(infer_mem['kv_cache'])}")
    console.print(table)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


QuantOption = Annotated[str, typer.Option(help="Weight-only quantization for inference: none, int8 or int4.")]
DtypeOption = Annotated[str, typer.Option(help="Inference dtype: auto (bf16 where native, else fp32), fp32, bf16, "
                                               "fp16.")]
ModelArg = Annotated[Path, typer.Argument(help="A run directory, a checkpoint directory or a Hugging Face folder.")]


def load_engine(path: Path, quant: str = "none", device: str = "cpu", dtype: str = "auto", max_batch: int = 8):
    """Any checkpoint-like path (checkpoint.load) in the inference dtype, quantized if asked, weights laid out for
    decoding, wrapped in an engine; returned with what was loaded (recipe, chat template, stage kind)."""
    import torch

    from fermion import checkpoint
    from fermion.device import resolve_dtype
    from fermion.infer.engine import Engine, prepare_for_decode
    from fermion.infer.quantize import quantize

    try:
        torch_dtype = resolve_dtype(dtype, torch.device(device))
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    loaded = run_guarded(lambda: checkpoint.load(path, device=device, dtype=torch_dtype, warn=console.print))
    try:
        quantize(loaded.model, quant, say=console.print)
    except ValueError as err:
        fail(str(err))
    return Engine(prepare_for_decode(loaded.model), loaded.tokenizer, max_batch=max_batch), loaded


@app.command()
def generate(
    run: ModelArg,
    prompt: Annotated[list[str], typer.Option(help="Prompt text; repeat for several.")] = ["def "],  # noqa: B006
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="0 disables top-k.")] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeat for several.")] = None,
    seed: int = 0,
    chat: Annotated[bool, typer.Option(help="Send each prompt as a user message through the chat template.")] = False,
    quant: QuantOption = "none",
    dtype: DtypeOption = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Continue prompts with the KV-cache engine, streaming the text as it is generated."""
    import time

    from fermion.infer.engine import SamplingParams

    engine, loaded = load_engine(run, quant, device, dtype)
    template = run_guarded(loaded.chat_template) if chat else None
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                stop=list(stop or []) + (template.stop_strings if template else []))
    except ValueError as err:
        fail(str(err))
    for text in prompt:
        console.rule(repr(text))
        message = [{"role": "user", "content": text}]
        ids = (run_guarded(lambda m=message: template.encode(engine.tokenizer, m, add_generation_prompt=True)).ids
               if template else engine.tokenizer.encode(text))
        if not template:
            console.out(text, end="", highlight=False)
        start, pieces = time.perf_counter(), 0
        try:
            for piece in engine.stream(ids, params):
                console.out(piece, end="", highlight=False)
                pieces += 1
        except ValueError as err:
            fail(str(err))
        seconds = time.perf_counter() - start
        tokens = len(engine.last.token_ids) if engine.last else pieces
        console.print(f"\n[dim]{tokens} tokens in {seconds:.2f} s · {tokens / seconds:,.1f} tokens/s · "
                      f"finish: {engine.last.finish_reason if engine.last else '?'}[/]")


@app.command()
def chat(
    run: ModelArg,
    template: Annotated[str | None, typer.Option(help="chatml, alpaca, tagged, tagged-lines or a .jinja file; "
                                                      "default: the run's own template.")] = None,
    system: Annotated[str | None, typer.Option(help="The system prompt to start with.")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy; /temp changes it.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Longest answer; default: a quarter of the "
                                                                   "context, at most 512.")] = None,
    seed: Annotated[int | None, typer.Option(help="Fix sampling for reproducible answers.")] = None,
    quant: QuantOption = "none",
    dtype: DtypeOption = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Talk to a model: a streaming multi-turn REPL with history and /commands (/help lists them)."""
    from fermion.infer.engine import SamplingParams
    from fermion.infer.repl import ChatSession, run_repl

    engine, loaded = load_engine(run, quant, device, dtype, max_batch=1)
    chat_template = run_guarded(lambda: loaded.chat_template(template))
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens or min(512, max(1, engine.max_seq // 4)),
                                temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as err:
        fail(str(err))
    run_repl(ChatSession(engine, chat_template, params, system), console, interactive=sys.stdin.isatty())


@app.command()
def serve(
    run: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on; the default answers this machine only. "
                                           "0.0.0.0 opens it to the network (set --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="FERMION_API_KEY", help="Require 'Authorization: Bearer "
                                                                               "KEY' on /v1 (env FERMION_API_KEY).")]
    = None,
    model_name: Annotated[str | None, typer.Option(help="The model id clients send (default: the run's name).")]
    = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the run's own).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together (engine slots).")] = 16,
    max_waiting: Annotated[int, typer.Option(min=1, help="Requests that may wait for a slot before 429.")] = 256,
    max_request_bytes: Annotated[int | None, typer.Option(min=1024, help="Largest request body before 413 (default: "
                                                          "what a full context of text can take, at least 1 MiB).")]
    = None,
    quant: QuantOption = "none",
    dtype: DtypeOption = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions) with a chat page at /."""
    import ipaddress

    try:
        from fermion.serve.app import ServerConfig
        from fermion.serve.app import serve as run_server
    except ModuleNotFoundError as err:
        fail(f"fermion serve needs the '{err.name}' package: pip install 'fermion[serve]'")
    engine, loaded = load_engine(run, quant, device, dtype, max_batch=max_batch)
    chat_template = run_guarded(lambda: loaded.chat_template(template))
    name = model_name or loaded.recipe.run.name
    try:
        public = not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        public = host != "localhost"
    if public and not api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this "
                      "machine can use the model")
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving [bold]{escape(name)}[/] ({engine.max_batch} slots, context {engine.max_seq}) on "
                  f"http://{shown}:{port} · OpenAI API at /v1 · chat page at /", highlight=False)
    try:
        run_server(engine, ServerConfig(name, chat_template, api_key=api_key, max_waiting=max_waiting,
                                        max_request_bytes=max_request_bytes), host, port)
    except OSError as err:
        fail(str(err))


@app.command("eval")
def eval_cmd(
    run: ModelArg,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks or groups (mc, all); perplexity=PATH for "
                                                   "a text file. Default: the recipe's eval.tasks.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="The first N examples of each task.")] = None,
    shots: Annotated[int | None, typer.Option(min=0, help="Few-shot examples (default: each task's standard).")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Eval data laid out as <benchmark>/<files> (default: eval.data_dir, $FERMION_EVAL_DATA, "
             "~/.cache/fermion/eval).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where results.json/.md go (default: <run>/eval).")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Prompt generative tasks through the chat "
                                              "template (default: yes for SFT/DPO checkpoints).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Generation length (default: per task).")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32 (default, what lm-eval compares with), bf16, fp16, auto.")] = "fp32",
    quant: QuantOption = "none",
) -> None:
    """Evaluate a run, checkpoint or Hugging Face folder on benchmarks; writes results.json and results.md."""
    from fermion.eval import runner
    from fermion.eval.results import TaskOptions, write
    from fermion.infer import lm as eval_lm
    from fermion.layout import EVAL, output_root

    try:
        model = run_guarded(lambda: eval_lm.load(run, device=device, dtype=dtype, chat=chat, quant=quant, say=print))
    except ValueError as err:
        fail(str(err))
    recipe_eval = model.recipe.eval
    try:
        names = runner.task_names(tasks or recipe_eval.tasks)
    except runner.TaskError as err:
        fail(str(err))
    folder = data_dir or recipe_eval.resolved_data_dir()
    options = TaskOptions(data_dir=folder, limit=limit or recipe_eval.limit,
                          shots=shots if shots is not None else recipe_eval.shots, max_new_tokens=max_new_tokens,
                          seed=seed)
    console.print(f"evaluating {run} ({'chat' if model.chat else 'base'} prompts) on {', '.join(names)} · data "
                  f"{folder}" + (f" · first {options.limit} examples each" if options.limit else ""))

    def report(result, seconds):
        console.print(runner.progress(result, seconds))
        if result.task == "smoke":
            from fermion.eval import smoke

            console.print(smoke.table(result))

    results = run_guarded(lambda: runner.run(model, names, options, on_result=report))
    table = Table("task", "metric", "value", "± stderr", "shots", "n")
    for result in results:
        for m in result.metrics:
            table.add_row(result.task, m.name, f"{m.value:.4f}", f"{m.stderr:.4f}" if m.stderr is not None else "–",
                          str(result.shots), str(result.n))
    console.print(table)
    path = write(results, out or output_root(run, EVAL), model=str(run),
                 extra={"chat": model.chat, "limit": options.limit, "seed": seed, "dtype": dtype, "quant": quant})
    console.print(f"results: {path} and {path.with_suffix('.md')}")


SYNTH_KINDS = {"chat": "general conversations: story requests, definitions, facts, small talk (SFT)",
               "tinytask": "tool-calling conversations for the tinytask eval (SFT)",
               "tinytask-pairs": "tool calls, the right one against one with a wrong argument (DPO)",
               "arithmetic": "arithmetic questions and answers (SFT)",
               "arithmetic-pairs": "arithmetic questions with a right and a plausible wrong answer (DPO)"}


@app.command()
def synth(
    kind: Annotated[str, typer.Argument(help="; ".join(f"{k}: {v}" for k, v in SYNTH_KINDS.items()))],
    out: Annotated[Path, typer.Argument(help="The .jsonl file to write (.jsonl.gz compresses it).")],
    n: Annotated[int, typer.Option(min=1, help="Records to write.")] = 2000,
    seed: int = 0,
) -> None:
    """Write generated training data for `sft.sources` / `dpo.sources` (the same seed gives the same file; no
    record holds an evaluated problem). A recipe can also name them directly: `builtin: KIND`."""
    from fermion.data import synthetic

    if kind not in SYNTH_KINDS:
        fail(f"unknown kind {kind!r}; one of {', '.join(SYNTH_KINDS)}")
    console.print(f"{n:,} {kind} records -> {synthetic.write_jsonl(out, synthetic.generated_records(kind, n, seed))}")


@app.command("export")
def export_cmd(
    run: ModelArg,
    format_: Annotated[list[str], typer.Option("--format", help="hf, gguf or onnx; repeat for several.")] = ["hf"],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/export/<format>).")] = None,
    dtype: Annotated[str | None, typer.Option(help="hf: bf16|fp16|fp32 (bf16); gguf: f32|f16|q8_0|q4_k_m|q5_k_m|"
                                                   "q6_k (f16); onnx: fp32|fp16 (fp32).")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the recipe's).")] = None,
    adapter: Annotated[bool, typer.Option(help="LoRA: a PEFT adapter folder (base inside), not merged.")] = False,
) -> None:
    """Export a checkpoint to a Hugging Face folder, a GGUF file (+ Ollama Modelfile) or an ONNX model."""
    from fermion.export import export
    formats = [f.strip() for spec in format_ for f in spec.split(",") if f.strip()]
    try:
        paths = run_guarded(lambda: export(run, formats, out, dtype, template, console.print, adapter=adapter))
    except ModuleNotFoundError as err:
        fail(f"the export needs the '{err.name}' package: pip install 'fermion[export]'")
    for fmt, path in zip(formats, paths, strict=True):
        console.print(f"{'adapter' if adapter else fmt}: {path}")


@app.command()
def card(
    run: Annotated[Path, typer.Argument(help="The run directory.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the final stage's export/hf: "
                                                  "<run>/export/hf, <run>/sft/export/hf or <run>/dpo/export/hf).")]
    = None,
    license: Annotated[str | None, typer.Option(help="The license in the card's metadata; default: the recipe's "
                                                     "run.license, else apache-2.0.")] = None,
    language: Annotated[str, typer.Option(help="The language tag in the card's metadata.")] = "en",
    samples: Annotated[bool, typer.Option("--samples/--no-samples", help="Generate sample answers (seeded) when "
                                          "the run has no recorded smoke test.")] = True,
) -> None:
    """Write a model card (README.md with loss plots) from the run's own records."""
    from fermion.card import build_card

    console.print(str(run_guarded(lambda: build_card(run, out, license=license, language=language,
                                                     generate=samples))), highlight=False, markup=False)


@app.command("import")
def import_cmd(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face Llama/Mistral/Qwen3/Mixtral/Qwen3-MoE folder.")],
    out: Annotated[Path, typer.Argument(help="The fermion checkpoint directory to write.")],
) -> None:
    """Turn a Hugging Face folder into a fermion checkpoint (for generate, export, or train.init_from)."""
    from fermion.checkpoint import save_weights
    from fermion.model.hf import imported_recipe

    model, tokenizer, recipe = run_guarded(lambda: imported_recipe(folder))
    path = run_guarded(lambda: save_weights(model, recipe, tokenizer, out))
    console.print(f"imported {folder} ({recipe.model.n_layers} layers, vocab {recipe.model.vocab_size:,}) -> {path}")


@app.command("run")
def run_cmd(
    recipe: RecipeArg,
    set_: SetOption = None,
    from_: Annotated[str | None, typer.Option("--from", help="Run this step and every later one again, even if up "
                                                             "to date (prepare, tokenizer, pretrain, a continued "
                                                             "stage's name, sft, dpo, rl, eval, export, "
                                                             "card).")] = None,
    only: Annotated[str | None, typer.Option(help="Run just this step (again); the ones before it must have "
                                                  "finished.")] = None,
) -> None:
    """Every stage of the recipe in order: prepare, tokenizer, pretrain, continued stages, sft, dpo, rl, eval,
    export, card; a step whose output is complete and whose inputs are unchanged is skipped, a stopped one resumes."""
    from fermion.run import run as run_all

    if from_ is not None and only is not None:
        fail("--from and --only cannot be used together")
    loaded = recipe_or_exit(recipe, set_)
    result = _run_or_exit(lambda: run_all(loaded, console, start=from_, only=only))
    raise typer.Exit(0 if result.status in ("complete", "preempted") else 1)


def _run_or_exit(action):
    try:
        return run_guarded(action)
    except ModuleNotFoundError as err:
        fail(f"this step needs the '{err.name}' package: pip install 'fermion[export,eval]'")


@app.command()
def demo(
    data: Annotated[Path | None, typer.Option(help="Pretrain on your own corpora instead: a folder of .txt, .jsonl, "
                                                   ".jsonl.gz or .jsonl.zst files (one source per file or "
                                                   "subfolder).")]
    = None,
    set_: SetOption = None,
    from_: Annotated[str | None, typer.Option("--from", help="Run this step and every later one again.")] = None,
) -> None:
    """The built-in recipe end to end, offline: pretraining on the Python standard library and generated stories,
    textbook text, arithmetic and tool calls; SFT and DPO on generated data; eval; hf and gguf export; a model card;
    sample chats."""
    import time

    from fermion import demo as built_in
    from fermion.layout import card_file
    from fermion.run import run as run_all

    started = time.perf_counter()
    loaded = run_guarded(lambda: built_in.recipe(list(set_ or []), data))
    sources = ", ".join(f"{s.name}" for s in loaded.data.sources)
    console.print(f"[bold]fermion demo[/]: a {loaded.model.n_layers}-layer model pretrained on {sources}; then "
                  f"{', '.join(n for n in ('sft', 'dpo', 'rl') if getattr(loaded, n))}, eval, export, card\n"
                  f"run directory: {loaded.run_dir}")
    result = _run_or_exit(lambda: run_all(loaded, console, start=from_))
    if result.status != "complete":
        raise typer.Exit(0)
    run_guarded(lambda: built_in.sample_chats(loaded, console))
    final = built_in.final_dir(loaded)
    console.print(f"[bold]demo finished in {time.perf_counter() - started:.0f} s[/] · chat with it: fermion chat "
                  f"{final} · model card: {card_file(final)}")

def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
