"""The `fermion` command: one Typer app, each command a thin function over a module."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fermion.config import Recipe, RecipeError, load_recipe

app = typer.Typer(help="Fermion: pretrain, post-train, evaluate and ship a small language model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect model architectures.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
console = Console(soft_wrap=True)  # log lines stay whole when piped to a file

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: --set train.lr=3e-4")]
RecipeArg = Annotated[Path, typer.Argument(help="The run's YAML recipe.")]
DEMO_PROMPTS = ["def ", "import os\n", "class ", '    """Return the ', "for i in range("]


def fail(message: str, code: int = 2) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def recipe_or_exit(path: Path, overrides: list[str] | None, check_paths: bool = True) -> Recipe:
    try:
        return load_recipe(path, overrides, check_paths=check_paths)
    except RecipeError as err:
        fail(str(err))


def run_guarded(action):
    """Run a stage, turning the project's own errors into one clear line and an exit code."""
    from fermion.data.sources import DataError
    from fermion.train.checkpoint import CheckpointError
    from fermion.train.trainer import TrainingError

    try:
        return action()
    except (RecipeError, DataError, CheckpointError) as err:
        fail(str(err), code=2)
    except TrainingError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt:  # outside training (which checkpoints on Ctrl-C): nothing half-written is kept
        fail("interrupted", code=130)


@app.command()
def pretrain(
    recipe: RecipeArg,
    set_: SetOption = None,
    resume: Annotated[str, typer.Option(help="auto: continue from the newest good checkpoint if any; "
                                             "none: start fresh; or a checkpoint directory")] = "auto",
) -> None:
    """Pretrain from the recipe (tokenizer and shards are built first if missing)."""
    from fermion.train.pretrain import pretrain as run_pretrain

    loaded = recipe_or_exit(recipe, set_)
    result = run_guarded(lambda: run_pretrain(loaded, resume=resume, console=console))
    if result.status == "preempted":
        raise typer.Exit(0)


@tokenizer_app.command("train")
def tokenizer_train(recipe: RecipeArg, set_: SetOption = None,
                    force: Annotated[bool, typer.Option(help="Retrain even if the run has a tokenizer.")] = False):
    """Train the recipe's byte-level BPE tokenizer into the run directory."""
    from fermion.train.pretrain import train_tokenizer

    loaded = recipe_or_exit(recipe, set_)
    run_guarded(lambda: train_tokenizer(loaded, console, force=force))


@model_app.command("info")
def model_info(recipe: RecipeArg, set_: SetOption = None,
               as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False):
    """Parameters (total/active), FLOPs per token and memory, computed without allocating weights."""
    from fermion.model.counting import count, inference_memory, training_memory

    loaded = recipe_or_exit(recipe, set_, check_paths=False)
    cfg, train = loaded.model, loaded.train
    counts = count(cfg, loaded.seq_len)
    train_mem = training_memory(cfg, train.micro_batch_size, loaded.seq_len, train.precision)
    infer_mem = inference_memory(cfg)
    if as_json:
        print(json.dumps({"total_params": counts.total_params, "active_params": counts.active_params,
                          "embedding_params": counts.embedding_params,
                          "forward_flops_per_token": counts.forward_flops_per_token,
                          "train_flops_per_token": counts.train_flops_per_token,
                          "train_memory_bytes": train_mem.total, "inference_memory_bytes": infer_mem["total"]}))
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
    table.add_row("parameters", f"{counts.total_params:,}")
    table.add_row("active parameters", f"{counts.active_params:,}")
    table.add_row("embedding parameters", f"{counts.embedding_params:,}")
    table.add_row(f"FLOPs/token (seq {loaded.seq_len:,})",
                  f"forward {counts.forward_flops_per_token / 1e9:,.3f} G · training "
                  f"{counts.train_flops_per_token / 1e9:,.3f} G")
    table.add_row(f"training memory (micro-batch {train.micro_batch_size} × {loaded.seq_len:,}, {train.precision})",
                  f"{_gib(train_mem.total)} = weights {_gib(train_mem.weights)} + grads {_gib(train_mem.gradients)}"
                  f" + AdamW {_gib(train_mem.optimizer)} + activations {_gib(train_mem.activations)}"
                  f" + logits {_gib(train_mem.logits)}")
    table.add_row("inference memory (bf16, batch 1, full context)",
                  f"{_gib(infer_mem['total'])} = weights {_gib(infer_mem['weights'])} + KV cache "
                  f"{_gib(infer_mem['kv_cache'])}")
    console.print(table)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="A run directory or a checkpoint directory.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt text; repeat for several.")] = ["def "],  # noqa: B006
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="0 disables top-k.")] = 50,
    seed: int = 0,
) -> None:
    """Sample continuations of prompts from a trained checkpoint."""
    from fermion.infer.generate import generate_text, load_for_inference

    model, tokenizer = run_guarded(lambda: load_for_inference(run, warn=console.print))
    for text in prompt:
        completion = generate_text(model, tokenizer, text, max_new_tokens, temperature, top_k or None, seed)
        console.rule(repr(text))
        console.print(text + completion, highlight=False, markup=False)


@app.command()
def demo(
    set_: SetOption = None,
    resume: Annotated[str, typer.Option(help="auto, none, or a checkpoint directory")] = "auto",
) -> None:
    """The built-in recipe, offline: a tokenizer and a small model trained on the Python standard library."""
    from fermion.infer.generate import generate_text, load_for_inference
    from fermion.train.pretrain import pretrain as run_pretrain

    with resources.as_file(resources.files("fermion") / "recipes" / "demo.yaml") as path:
        loaded = recipe_or_exit(path, set_)
    console.print(f"[bold]fermion demo[/]: a {loaded.model.n_layers}-layer model, {loaded.train.steps} steps on the "
                  f"Python standard library\nrun directory: {loaded.run_dir}")
    result = run_guarded(lambda: run_pretrain(loaded, resume=resume, console=console))
    if result.status == "preempted":
        raise typer.Exit(0)
    model, tokenizer = run_guarded(lambda: load_for_inference(loaded.run_dir, warn=console.print))
    for i, text in enumerate(DEMO_PROMPTS):
        console.rule(f"sample {i + 1}: {text!r}")
        console.print(text + generate_text(model, tokenizer, text, 80, temperature=0.7, seed=i),
                      highlight=False, markup=False)
    if result.val_loss is not None:
        console.print(f"[bold]final validation loss {result.val_loss:.4f} · {result.val_bpb:.4f} bits/byte[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
