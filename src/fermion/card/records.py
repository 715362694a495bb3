"""What the card is written from: the run's recipe and, per trained stage, its recipe, newest good checkpoint,
trainer state, metrics and post-training report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fermion import layout
from fermion.config import Recipe, RecipeError, load_recipe
from fermion.errors import ExportError
from fermion.train.logging import read_metrics


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
    metrics_path = layout.metrics_file(directory)
    metrics = []  # a torn last line is left out quietly here: resuming the stage repairs the file, with a warning
    if metrics_path.is_file():
        metrics = [r for r in read_metrics(metrics_path, warn=lambda *_: None) if r["step"] <= state["step"]]
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


def started_from(stages: list[StageRecord]) -> tuple[str, str | None]:
    """How the run's first trained stage began: ("continued", source) when pretraining started from
    train.init_from, ("fine-tuned", source) when the run post-trains a model from elsewhere, ("scratch", None)."""
    first = stages[0]
    source = first.recipe.train.init_from
    if not source:
        return "scratch", None
    return ("fine-tuned" if first.kind in layout.POST_TRAINING else "continued"), source
