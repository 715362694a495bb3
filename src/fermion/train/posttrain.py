"""What the post-training stages (SFT, DPO, RL) share: where they start from, their own run directory and recipe,
reading and counting their records, and the train/validation split.

Each stage is the one trainer with its own objective and its own `train` section (learning rate, schedule,
batch): the stage's recipe is the run's recipe with `train` replaced and `run.dir` pointing at the stage's
directory (`<run>/sft`, `<run>/dpo`, `<run>/rl`), so checkpoints, metrics and exact resume work as in pretraining.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fermion import layout
from fermion.atomic import replaced_file
from fermion.chat.conversations import Skipped
from fermion.chat.templates import ChatTemplate
from fermion.checkpoint import base_reference
from fermion.config import Recipe, RecipeError, SourceConfig
from fermion.data.sources import DataError, iter_records, what_sources_read
from fermion.data.tokenizer import Tokenizer
from fermion.model.lora import add_adapters, check_targets, trainable_tokens
from fermion.train.qlora import quantize_frozen
from fermion.train.stage import StageSetup


def load_source(source: str, field_name: str | None = None) -> tuple[Recipe, dict[str, torch.Tensor], Tokenizer]:
    """Weights to start from: a fermion run or checkpoint directory, or a Hugging Face folder (checkpoint.load).
    `field_name`: the recipe field that named it, for the error when there is nothing there."""
    from fermion import checkpoint

    if field_name and not Path(source).exists():
        raise RecipeError(f"{field_name}: {source} does not exist; give a fermion run or checkpoint directory, or a "
                          f"Hugging Face model folder (config.json, *.safetensors, tokenizer.json) downloaded first")
    loaded = checkpoint.load(source)
    return loaded.recipe, loaded.model.state_dict(), loaded.tokenizer


def check_same_model(recipe: Recipe, source_recipe: Recipe, source: str, field_name: str) -> None:
    """A model section the recipe writes out must describe the source exactly; one it leaves out is taken from it."""
    if "model" in recipe.model_fields_set and recipe.model != source_recipe.model:
        ours, theirs = recipe.model.model_dump(), source_recipe.model.model_dump()
        diff = [f"model.{k} ({ours[k]} here, {theirs[k]} in {source})" for k in ours if ours[k] != theirs[k]]
        raise RecipeError(f"{field_name}: the recipe's model differs from the source's: {', '.join(diff)}; "
                          "remove the model section to take the source's")


@dataclass
class Stage:
    name: str  # "sft", "dpo" or "rl"
    recipe: Recipe  # the run's recipe with this stage's train section and directory
    weights: dict[str, torch.Tensor] | None  # the starting weights (released once a LoRA model is built)
    tokenizer: Tokenizer
    tokenizer_path: Path
    template: ChatTemplate
    init_from: str


def default_init(recipe: Recipe, name: str) -> str:
    """SFT starts from the run's pretraining (its last continued stage), DPO from its SFT, RL from its DPO (or its
    SFT when the recipe has no dpo section), unless train.init_from says otherwise."""
    if name == "sft":
        return str(recipe.pretrained_dir)
    return str(recipe.post_training_dir("dpo" if name == "rl" and recipe.dpo is not None else "sft"))


def setup_stage(recipe: Recipe, name: str) -> Stage:
    section = getattr(recipe, name)
    if section is None:
        raise RecipeError(f"the recipe has no '{name}' section: add {name}.sources (the {name.upper()} data)")
    init_from = section.train.init_from or default_init(recipe, name)
    source_recipe, weights, tokenizer = load_source(init_from, section.train.init_from and f"{name}.train.init_from")
    check_same_model(recipe, source_recipe, init_from, f"{name}.train.init_from")
    template_spec = (recipe.tokenizer.chat_template if "chat_template" in recipe.tokenizer.model_fields_set
                     else source_recipe.tokenizer.chat_template)
    directory = recipe.post_training_dir(name)
    stage_recipe = recipe.model_copy(update={
        "model": source_recipe.model,
        "train": section.train.model_copy(update={"init_from": init_from}),  # recorded: where the stage started
        "run": recipe.run.model_copy(update={"dir": str(directory), "name": f"{recipe.run.name}-{name}"}),
        "tokenizer": source_recipe.tokenizer.model_copy(update={"chat_template": template_spec}),
    })
    if stage_recipe.train.seq_len and stage_recipe.train.seq_len > stage_recipe.model.context_length:
        raise RecipeError(f"{name}.train.seq_len ({stage_recipe.train.seq_len}) exceeds the model's context length "
                          f"({stage_recipe.model.context_length})")
    template = ChatTemplate.get(template_spec)
    template.require_tokens(tokenizer)
    if section.lora is not None:  # refused here, before the stage writes anything
        check_targets(source_recipe.model, section.lora, f"{name}.lora")
        trainable_tokens(section.lora, tokenizer, template, f"{name}.lora")
    return Stage(name, stage_recipe, weights, tokenizer, layout.tokenizer_file(directory), template, init_from)


@dataclass
class Report:
    """Counts of what a stage read and what it left out, by reason, with the first example of each."""

    stage: str
    read: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    extra: dict = field(default_factory=dict)
    noted: Counter = field(default_factory=Counter)  # records used, but changed on the way (by reason)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)

    def note(self, reason: str, where: str) -> None:
        self.noted[reason] += 1
        self.first.setdefault(reason, where)

    def lines(self) -> list[str]:
        out = [f"{self.stage} data: {self.read:,} records read, {self.used:,} used"
               + (f", {self.truncated:,} truncated to fit the context" if self.truncated else "")]
        for reason, n in self.skipped.most_common():
            out.append(f"  skipped {n:,}: {reason} (first: {self.first[reason]})")
        for reason, n in self.noted.most_common():
            out.append(f"  note: {n:,} records: {reason} (first: {self.first[reason]})")
        return out

    def nothing_usable(self, section: str, sources: list[SourceConfig], kind: str) -> DataError:
        """The error for sources of which no record can be used (`kind`: "conversation"): the files read, and for
        each reason records were skipped, how many and where the first was (file:line). Raised before the stage
        writes anything, so it names no file of the stage's."""
        reasons = "; ".join(f"{n:,} {reason} (first: {self.first[reason]})" for reason, n in self.skipped.most_common())
        return DataError(f"{section}.sources ({what_sources_read(sources)}): none of the {self.read:,} records is a "
                         f"usable {kind}; skipped: {reasons}; fix those records or add data")

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {"stage": self.stage, "records_read": self.read, "records_used": self.used,
                "truncated": self.truncated, "skipped": dict(self.skipped), "first_skipped": self.first,
                "noted": dict(self.noted), **self.extra}
        with replaced_file(layout.report_file(directory)) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_examples(sources: list[SourceConfig], convert: Callable[[dict, str, str], object], report: Report,
                  section: str) -> Iterator[tuple[str, object]]:
    """(where, converted) for every usable record of the sources; skipped ones are counted in the report."""
    for source in sources:
        for where, record in iter_records(source):
            report.read += 1
            try:
                yield where, convert(record, where, source.format)
            except Skipped as skipped:
                report.skip(skipped.reason, where)
    if report.read == 0:
        raise DataError(f"{section}.sources: no records found ({what_sources_read(sources)})")


def encode_all(examples: Iterator[tuple[str, object]], encode: Callable[[object, str], tuple[object, bool]],
               report: Report) -> list:
    """Tokenize every (where, example) with `encode` -> (encoded, truncated); Skipped ones are counted, not kept."""
    encoded = []
    for where, example in examples:
        try:
            item, truncated = encode(example, where)
        except Skipped as skipped:
            report.skip(skipped.reason, where)
            continue
        report.truncated += truncated
        encoded.append(item)
    report.used = len(encoded)
    return encoded


class PostTraining(StageSetup):
    """What SFT, DPO and RL share as stages: the Stage they start from, and the data report the main rank writes with
    the stage's tokenizer and resolved recipe (also printed)."""

    def __init__(self, recipe: Recipe, prepared: tuple[Stage, list, list, Report]):
        """`prepared`: the stage, its train and validation examples and its report (the stage module's prepare)."""
        self.stage, self.train, self.val, self.report = prepared
        self.kind, self.tokenizer_path = self.stage.name, self.stage.tokenizer_path
        self.cfg, self.seed = getattr(recipe, self.kind), recipe.run.seed  # the recipe's sft or dpo section

    @property
    def recipe(self) -> Recipe:
        return self.stage.recipe

    @recipe.setter
    def recipe(self, recipe: Recipe) -> None:
        self.stage.recipe = recipe

    def token_arrays(self) -> Iterator[np.ndarray]:
        """The token ids of every training example (lora.trainable_tokens: data); each stage says where they are."""
        raise NotImplementedError

    def with_adapters(self, model: torch.nn.Module, info) -> torch.nn.Module:
        """The model to train: with the section's `lora`, its adapters (QLoRA: on a 4-bit base) and the rest
        frozen, recording the base they are trained on; else the model itself."""
        if self.cfg.lora is None:
            return model
        if info.distributed and self.recipe.train.distributed == "fsdp":
            raise RecipeError(f"{self.kind}.lora: adapters train under DDP, not FSDP (the frozen base would be "
                              f"sharded into every checkpoint); set {self.kind}.train.distributed: ddp")
        base = base_reference(self.stage.init_from, self.stage.weights)
        self.stage.weights = None  # the model holds its own copy: a second float one would undo QLoRA's saving
        field = self.kind + ".lora"
        tokens = trainable_tokens(self.cfg.lora, self.stage.tokenizer, self.stage.template, field,
                                  self.token_arrays() if self.cfg.lora.trainable_tokens == "data" else ())
        add_adapters(model, self.cfg.lora, base, field=field, tokens=tokens)
        return quantize_frozen(model) if self.cfg.lora.quantize == "int4" else model

    def write_files(self, console) -> None:
        directory = self.recipe.run_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.stage.tokenizer.save(self.stage.tokenizer_path)
        layout.recipe_file(directory).write_text(self.recipe.to_yaml())
        self.report.write(directory)
        for line in self.report.lines():
            console.print(line, markup=False, highlight=False)


def split(items: list, val_fraction: float, seed: int, key: Callable[[object], object] | None = None
          ) -> tuple[list, list]:
    """A seeded shuffle, then the last val_fraction (at least one when asked for any) held out.

    With `key`, items sharing a key (pairs with the same prompt) go to the same side, so the held-out set measures
    prompts training never saw rather than new replies to familiar ones.
    """
    groups: dict = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item) if key else index, []).append(item)
    order = list(groups)
    random.Random(seed).shuffle(order)
    wanted = math.ceil(len(items) * val_fraction) if val_fraction > 0 and len(items) > 1 else 0
    val: list = []
    while order and len(val) < wanted and len(order) > 1:
        val.extend(groups[order.pop()])
    return [item for k in order for item in groups[k]], val


def steps_for(epochs: float | None, batches_per_epoch: int, configured: int) -> int:
    return max(1, math.ceil(epochs * batches_per_epoch)) if epochs is not None else configured
