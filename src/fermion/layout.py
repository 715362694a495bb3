"""Every path of a run and its stages, as docs/run.md draws them; the one place that spells a run's file names.

    runs/<name>/                    run_dir(run)
      run.json                      ledger_file
      recipe.yaml                   recipe_file
      prepared/<plan>/              prepared_dir (+ PREPARE_REPORT)
      tokenizer.json                tokenizer_file
      tokenizer_trained_on.json     tokenizer_record: what the run's tokenizer was trained on
      data/                         shard_dir (+ shard_index)
      checkpoints/step_NNNNNNNN/    checkpoints_dir, checkpoint_dir; checkpoints/latest: latest_file
      metrics.jsonl, tensorboard/   metrics_file, tensorboard_dir
      report.json                   report_file (SFT/DPO: what the stage read)
      reference_logps.safetensors   reference_cache (DPO)
      eval/results.json, .md        eval_dir, eval_results; eval/step_NNNNNNNN/: eval_step_dir
      stages/<name>/                continued_stage_dir: laid out like the run itself
      sft/, dpo/, rl/               post_training_dir: likewise
      export/<format>/              export_dir; the model card: card_file
      superseded/<time>/            superseded_dir: an earlier attempt's TRAINING_OUTPUTS

Functions take the directory of a run or stage (the stage's own files sit in it the same way) and, where the
recipe can move a path elsewhere, the section that says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The recipe's sections (fermion.config's RunConfig, DataConfig, StageConfig, SFTConfig, DPOConfig) are taken as they
# come: config imports this module for Recipe.run_dir and the stage directories, so this one cannot import config.
Section = Any

LEDGER = "run.json"
RECIPE = "recipe.yaml"
TOKENIZER = "tokenizer.json"
TOKENIZER_RECORD = "tokenizer_trained_on.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_PREFIX = "step_"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
REPORT = "report.json"
REFERENCE_CACHE = "reference_logps.safetensors"
ADAPTER = "adapter.json"
EVAL = "eval"
EVAL_RESULTS = "results.json"
EXPORT = "export"
CARD = "README.md"
SHARD_INDEX = "index.json"
PREPARE_REPORT = "prepare_report.json"
SUPERSEDED = "superseded"
# What `fermion card` writes into an export folder (README.md and loss_<stage>.png); re-exporting keeps them.
CARD_FILES = (CARD, "loss_*.png")
POST_TRAINING = ("sft", "dpo", "rl")
# What a training stage writes into its directory (moved aside together when the stage starts again).
TRAINING_OUTPUTS = (CHECKPOINTS, METRICS, TENSORBOARD, EVAL, EXPORT, REPORT)


def run_dir(run: Section) -> Path:
    """run.dir, else runs/<run.name> (relative to where fermion runs)."""
    return Path(run.dir or os.path.join("runs", run.name))


def ledger_file(run: Path) -> Path:
    return Path(run) / LEDGER


def recipe_file(directory: Path) -> Path:
    """The resolved recipe a run, a stage or a checkpoint keeps."""
    return Path(directory) / RECIPE


def tokenizer_file(directory: Path, path: str | None = None) -> Path:
    """The tokenizer of a run (`path`, the recipe's tokenizer.path, where it names one), a stage or a checkpoint."""
    return Path(path) if path else Path(directory) / TOKENIZER


def tokenizer_record(tokenizer: Path) -> Path:
    """Beside a tokenizer a run trained: what it was trained on (fermion.data.tokenizer's record of it)."""
    return Path(tokenizer).with_name(TOKENIZER_RECORD)


def shard_dir(directory: Path, data: Section) -> Path:
    """data.shard_dir, else <dir>/data."""
    return Path(data.shard_dir) if data.shard_dir else Path(directory) / "data"


def prepared_dir(directory: Path, data: Section) -> Path:
    """Where `fermion prepare` keeps its plans: data.prepare.dir, else <dir>/prepared (a plan in each <plan>/)."""
    return Path(data.prepare.dir) if data.prepare.dir else Path(directory) / "prepared"


def checkpoints_dir(directory: Path) -> Path:
    return Path(directory) / CHECKPOINTS


def checkpoint_dir(directory: Path, step: int) -> Path:
    return checkpoints_dir(directory) / step_name(step)


def step_name(step: int) -> str:
    """step_00000060: the folder of a checkpoint, and of the trainer's evaluation, at that step."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(folder: Path) -> int | None:
    """The step a step_NNNNNNNN folder is of; None for any other name."""
    digits = Path(folder).name.removeprefix(STEP_PREFIX)
    return int(digits) if Path(folder).name.startswith(STEP_PREFIX) and digits.isdigit() else None


def latest_file(directory: Path) -> Path:
    """checkpoints/latest: the name of the newest complete checkpoint."""
    return checkpoints_dir(directory) / LATEST


def adapter_file(checkpoint: Path) -> Path:
    """A LoRA checkpoint's record of its adapters and their base (checkpoint.py)."""
    return checkpoint / ADAPTER


def metrics_file(directory: Path) -> Path:
    return Path(directory) / METRICS


def tensorboard_dir(directory: Path) -> Path:
    return Path(directory) / TENSORBOARD


def report_file(directory: Path) -> Path:
    return Path(directory) / REPORT


def reference_cache(directory: Path) -> Path:
    """A DPO stage's reference log-probabilities of its pairs, scored once by the starting model."""
    return Path(directory) / REFERENCE_CACHE


def eval_dir(directory: Path) -> Path:
    return Path(directory) / EVAL


def eval_results(directory: Path) -> Path:
    """<dir>/eval/results.json: the stage's scores on the recipe's eval tasks (results.md beside it)."""
    return eval_dir(directory) / EVAL_RESULTS


def eval_step_dir(directory: Path, step: int) -> Path:
    """Where the trainer writes the benchmarks it runs every eval.every steps."""
    return eval_dir(directory) / step_name(step)


def export_dir(directory: Path, fmt: str) -> Path:
    return Path(directory) / EXPORT / fmt


def modelfile(gguf: Path) -> Path:
    """The Ollama Modelfile that names this GGUF file: one per file (demo-q4_k_m.gguf, demo-q4_k_m.Modelfile), so
    dtypes exported into one folder each keep their own."""
    return Path(gguf).with_suffix(".Modelfile")


def card_file(directory: Path) -> Path:
    """The model card: README.md in the Hugging Face export."""
    return export_dir(directory, "hf") / CARD


def continued_stage_dir(run: Path, stage: Section) -> Path:
    """stage.dir, else <run>/stages/<name>."""
    return Path(stage.dir) if stage.dir else Path(run) / "stages" / stage.name


def post_training_dir(run: Path, name: str, section: Section = None) -> Path:
    """An SFT, DPO or RL stage's directory: its section's dir, else <run>/sft, <run>/dpo or <run>/rl."""
    return Path(section.dir) if section is not None and section.dir else Path(run) / name


def stages(run: Path, recipe: Section) -> list[tuple[str, Path, Section]]:
    """(name, directory, the section it trains on) of every stage a run of `recipe` laid out under `run` can have,
    in training order: pretrain (recipe.data), each continued stage (its own section), sft, dpo and rl (their
    sections, None where the recipe has none)."""
    found = [("pretrain", Path(run), recipe.data)]
    found += [(stage.name, continued_stage_dir(run, stage), stage.data) for stage in recipe.stages]
    found += [(name, post_training_dir(run, name, getattr(recipe, name)), getattr(recipe, name))
              for name in POST_TRAINING]
    return found


def superseded_dir(directory: Path, stamp: str) -> Path:
    return Path(directory) / SUPERSEDED / stamp


def output_root(path: Path, kind: str) -> Path:
    """Where a command's outputs of `kind` (eval, export) go for what it was pointed at: <run>/<kind> for a run
    directory or one of its checkpoints; beside the folder otherwise (a Hugging Face folder: <folder>-<kind>)."""
    path = Path(path)
    if checkpoints_dir(path).is_dir():
        return path / kind
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent / kind
    return path.parent / f"{path.name}-{kind}"
