"""How every training stage runs, written once: process group -> seed -> the main rank's files -> barrier -> model,
objective and data -> the trainer -> fit -> teardown. Pretraining, SFT, DPO and RL each supply a `StageSetup` with
what is theirs (see pretrain.py, sft.py, dpo.py, rl.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from fermion import device as distributed
from fermion.checkpoint import POST_TRAINED
from fermion.config import Recipe
from fermion.device import DistInfo
from fermion.train.callbacks import Benchmarks, Callback
from fermion.train.objectives import Objective
from fermion.train.trainer import Trainer, TrainResult


@dataclass
class Parts:
    """What a stage hands the trainer."""

    model: torch.nn.Module
    objective: Objective
    loader: object  # next_batch(), state_dict(), load_state_dict()
    validation: list
    # Whether batches may be read ahead of the step that uses them (train/prefetch.py). RL's may not: a rollout
    # must be sampled by the weights of the step it trains.
    prefetch: bool = True


class StageSetup:
    """One stage's specifics. `recipe` is the stage's own (its train section, its directory) and may still change
    in `plan`; `kind` (checkpoint.STAGES) is recorded in every checkpoint the stage writes."""

    kind: str
    recipe: Recipe
    tokenizer_path: Path

    def plan(self, info: DistInfo, console: Console) -> None:
        """Every rank, before any file is written: settle what depends on the world size (steps from epochs)."""

    def write_files(self, console: Console) -> None:
        """The main rank only: what every rank reads once the barrier is passed (recipe.yaml, tokenizer, data)."""
        raise NotImplementedError

    def build(self, info: DistInfo, console: Console) -> Parts:
        """Every rank, after the barrier: the model on info.device, the objective, the loader and validation."""
        raise NotImplementedError


def callbacks(setup: StageSetup) -> list[Callback]:
    """Between steps, besides checkpoints: the recipe's benchmarks when eval.every asks for them."""
    if not setup.recipe.eval.every:
        return []
    return [Benchmarks(setup.recipe, setup.tokenizer_path, chat=setup.kind in POST_TRAINED)]


def run_stage(setup: StageSetup, resume: str, console: Console) -> TrainResult:
    info = distributed.setup(setup.recipe.train.device)
    # No teardown on errors: its barrier would wait for ranks that may never arrive; the process exits anyway.
    torch.manual_seed(setup.recipe.run.seed + info.rank)
    setup.plan(info, console)
    if info.is_main:
        setup.write_files(console)
    distributed.barrier(info)
    parts = setup.build(info, console)
    trainer = Trainer(setup.recipe, parts.model, parts.objective, parts.loader, parts.validation, info,
                      setup.tokenizer_path, console, stage=setup.kind, callbacks=callbacks(setup),
                      prefetch=parts.prefetch)
    result = trainer.fit(resume)
    distributed.teardown(info)
    return result
