"""`fermion demo`: the built-in recipe (recipes/demo.yaml) end to end, optionally on the user's own corpora, and a
few sample chats with the final model. The command itself (options, errors) is in cli.py."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from fermion.config import DataConfig, Recipe, SourceConfig, load_recipe, matching_files
from fermion.data.sources import DOCUMENT_SUFFIXES, DataError

CHATS = ["Hello!", "Tell me a story about a brave rabbit named Pip.", "What is a map?", "What is 7 + 8?"]


def recipe(overrides: list[str], data: Path | None = None) -> Recipe:
    """The demo recipe with `overrides`; with `data`, in runs/demo-<folder> and pretraining on the corpora there
    (the overrides still have the last word)."""
    named = [f"run.name=demo-{data.resolve().name}", f"run.dir=runs/demo-{data.resolve().name}"] if data else []
    with resources.as_file(resources.files("fermion") / "recipes" / "demo.yaml") as path:
        loaded = load_recipe(path, named + list(overrides))
    return loaded if data is None else with_user_data(loaded, data)


def with_user_data(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe with its pretraining sources replaced by the corpora in `folder`: one source per file or
    subfolder."""
    kinds = ", ".join(DOCUMENT_SUFFIXES)
    if not folder.is_dir():
        raise DataError(f"--data {folder}: not a folder; give a folder of {kinds} files")
    sources = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.name.endswith(DOCUMENT_SUFFIXES):
            paths = [str(entry)]
        elif entry.is_dir():
            paths = [pattern for suffix in DOCUMENT_SUFFIXES
                     if matching_files(pattern := str(entry / "**" / f"*{suffix}"))]
        else:
            continue
        if paths:
            name = entry.name.split(".")[0] or entry.name
            sources.append(SourceConfig(name=name, paths=paths, kind="code" if name == "code" else "web"))
    if not sources:
        raise DataError(f"--data {folder}: no {kinds} files in it")
    data = DataConfig(**{**recipe.data.model_dump(), "sources": [s.model_dump() for s in sources]})
    return recipe.model_copy(update={"data": data})


def final_dir(recipe: Recipe) -> Path:
    """The directory of the run's last trained stage (its dpo or sft folder, else the run)."""
    from fermion.run import trained_stages

    return trained_stages(recipe)[-1][1]


def sample_chats(recipe: Recipe, console: Console) -> None:
    """A few answers from the final model through its chat template (greedy, so they repeat), the last one a
    held-out tinytask tool call."""
    from fermion import checkpoint
    from fermion.data.synthetic import tinytask
    from fermion.device import resolve_dtype
    from fermion.infer.engine import Engine, SamplingParams, prepare_for_decode

    loaded = checkpoint.load(final_dir(recipe), dtype=resolve_dtype("auto", torch.device("cpu")), warn=console.print)
    engine = Engine(prepare_for_decode(loaded.model), loaded.tokenizer, max_batch=8)
    template = loaded.chat_template()
    params = SamplingParams(max_new_tokens=160, temperature=0.0, stop=template.stop_strings)
    problem = tinytask.problems(1, seed=1)[0]
    chats = [(q, [{"role": "user", "content": q}]) for q in CHATS]
    chats.append((f"[tools: {', '.join(t['name'] for t in problem.tools)}] {problem.request}",
                  [{"role": "system", "content": tinytask.SYSTEM},
                   {"role": "user", "content": tinytask.user_text(problem)}]))
    prompts = [template.encode(engine.tokenizer, messages, add_generation_prompt=True).ids for _, messages in chats]
    for (shown, _), completion in zip(chats, engine.generate(prompts, params), strict=True):
        console.print(f"[bold cyan]user[/] {escape(shown)}\n[bold green]assistant[/] {escape(completion.text.strip())}",
                      highlight=False)
