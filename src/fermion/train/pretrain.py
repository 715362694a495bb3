"""The pretraining stage: tokenizer -> shards -> model -> the trainer with the pretraining objective."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from rich.console import Console

from fermion import layout
from fermion.chat.templates import ChatTemplate, default_template
from fermion.checkpoint import find, list_checkpoints, load_recipe_of, trainer_state_of
from fermion.config import DataConfig, Recipe, RecipeError
from fermion.data.shards import ShardSet, TokenLoader, check_tokenizer, load_index, val_batches, write_shards
from fermion.data.sources import DataError, no_documents
from fermion.data.splits import training_texts
from fermion.data.tokenizer import Tokenizer, changed_inputs, recorded_inputs, training_inputs
from fermion.device import DistInfo
from fermion.model.counting import check_fits
from fermion.model.transformer import Transformer
from fermion.train.objectives import Pretrain
from fermion.train.stage import Parts, StageSetup, run_stage
from fermion.train.trainer import TrainResult


def training_data(recipe: Recipe) -> DataConfig:
    """The sources the tokenizer and the shards are made from: data.sources as they are, or, with data.prepare,
    what `fermion prepare` kept of them."""
    if recipe.data.prepare is None:
        return recipe.data
    from fermion.prepare import prepared_data  # datatrove is only imported by recipes that use it

    return prepared_data(recipe)


def require_data(recipe: Recipe) -> None:
    if recipe.data is None:
        raise RecipeError("the recipe has no 'data' section: add data.sources (paths or builtin: python-stdlib)")


def train_tokenizer(recipe: Recipe, console: Console, force: bool = False) -> Path:
    """The run's tokenizer (`fermion tokenizer train`, the tokenizer step of `fermion run`): trained into the run
    directory unless the recipe names one, the model to start from brings its own (train.init_from), or the one
    there was trained on what the recipe has now. `force` trains anew whatever is there: what was trained with
    the old one starts again too."""
    trained = _tokenizer_to_train(recipe, console, force)
    if trained is not None:
        _save_trained(recipe, *trained, console)
    return recipe.tokenizer_file


def tokenize_data(recipe: Recipe, console: Console, force: bool = False) -> None:
    """The run's tokenizer (as `train_tokenizer`) and the shards made with it. A tokenizer trained here is saved
    only once its shards are written, so a run that fails on its data leaves no tokenizer behind."""
    trained = _tokenizer_to_train(recipe, console, force)
    prepare_shards(recipe, trained[0] if trained else None)
    if trained is not None:
        _save_trained(recipe, *trained, console)


def _tokenizer_to_train(recipe: Recipe, console: Console, force: bool) -> tuple[Tokenizer, dict] | None:
    """A tokenizer trained (in memory) on the recipe's data, with what it was trained on; None where the run's
    tokenizer stands as it is. A run starting from a model (train.init_from) adopts the source's here."""
    path = recipe.tokenizer_file
    if recipe.train.init_from:
        tokenizer = source_tokenizer(recipe.train.init_from)
        _adopt_tokenizer(recipe, tokenizer)
        console.print(f"tokenizer: train.init_from's ({recipe.train.init_from}), {tokenizer.vocab_size:,} tokens -> "
                      f"{path}")
        return None
    if recipe.tokenizer.path:
        return None
    require_data(recipe)
    data = training_data(recipe)
    inputs = training_inputs(data, recipe.tokenizer, recipe.run.seed)
    if path.is_file() and not force and not _retrain(recipe, inputs, console):
        return None
    texts = training_texts(data, recipe.run.seed)  # the train split only, every source within train_bytes
    first = next(texts, None)  # refused before training: a tokenizer of the 256 bytes alone would be useless
    if first is None:
        raise DataError(no_documents(data.sources, "to train the tokenizer on"))
    with console.status(f"training a {recipe.tokenizer.vocab_size:,}-token byte-level BPE tokenizer"):
        return Tokenizer.train(itertools.chain([first], texts), recipe.tokenizer), inputs


def _retrain(recipe: Recipe, inputs: dict, console: Console) -> bool:
    """Whether the run's tokenizer must be trained anew: its record shows other data or settings. Refused where
    what was made with it would not fit a new one: the run's checkpoints, shards another run owns (data.shard_dir).
    A tokenizer without a record (from before records) is used as it is."""
    path = recipe.tokenizer_file
    recorded = recorded_inputs(path)
    if recorded is None:
        if path not in _UNRECORDED:
            _UNRECORDED.add(path)
            console.print(f"tokenizer: {path} has no record of what it was trained on (an earlier fermion made it, "
                          "or it was put there by hand); used as it is: delete it to train one on this recipe's data")
        return False
    change = changed_inputs(recorded, inputs)
    if change is None:
        return False
    shards = layout.shard_dir(recipe.run_dir, recipe.data)
    made_with_it = [str(layout.checkpoints_dir(recipe.run_dir))] * bool(list_checkpoints(recipe.run_dir))
    made_with_it += [str(shards)] * bool(recipe.data.shard_dir and (shards / layout.SHARD_INDEX).is_file())
    if made_with_it:
        raise DataError(f"{path} was trained on other data or settings ({change}), and {' and '.join(made_with_it)} "
                        "were made with it: a new tokenizer would not fit them; put the data back as it was, or start "
                        "afresh in a new run.dir (or move them aside)")
    console.print(f"tokenizer: {path} was trained on other data or settings ({change}); training it anew")
    return True


_UNRECORDED: set[Path] = set()  # tokenizers without a record already mentioned: one line per process is enough


def _save_trained(recipe: Recipe, tokenizer: Tokenizer, inputs: dict, console: Console) -> None:
    tokenizer.save(recipe.tokenizer_file, trained_on=inputs)
    console.print(f"tokenizer: {tokenizer.vocab_size:,} tokens -> {recipe.tokenizer_file}")


def source_tokenizer(source: str) -> Tokenizer:
    """The tokenizer of a model to start from (a run, a checkpoint or a Hugging Face folder), weights not read."""
    from fermion import checkpoint

    return Tokenizer.load(checkpoint.describe(source)[1])


def _adopt_tokenizer(recipe: Recipe, tokenizer: Tokenizer) -> None:
    """The init_from source's tokenizer becomes the run's; a different one named by the recipe is refused."""
    path = recipe.tokenizer_file
    if path.is_file() and Tokenizer.load(path).hash != tokenizer.hash:
        raise RecipeError(f"{path} differs from the tokenizer of train.init_from ({recipe.train.init_from}); "
                          "a model must keep the tokenizer it was trained with")
    if not path.is_file():
        tokenizer.save(path)


def prepare_shards(recipe: Recipe, tokenizer: Tokenizer | None = None) -> None:
    """Tokenize the sources into the run's shards with `tokenizer` (default: the run's) unless they are up to date.
    Shards the recipe points to with data.shard_dir and that already exist are only read: another run may own
    them (a new tokenizer that did not make them is refused here, before it is saved)."""
    out = layout.shard_dir(recipe.run_dir, recipe.data)
    if recipe.data.shard_dir and (out / layout.SHARD_INDEX).is_file():
        if tokenizer is not None:
            check_tokenizer(load_index(out), tokenizer, out)
        return
    write_shards(training_data(recipe), tokenizer or Tokenizer.load(recipe.tokenizer_file), out, recipe.run.seed)


def prepare(recipe: Recipe, strict: bool = False, console: Console | None = None, force: bool = False
            ) -> dict | None:
    """`fermion prepare`: data.prepare's pipeline, then the tokenizer and the shards from what it kept (`force`:
    the tokenizer trained anew, as `train_tokenizer`'s). Returns the pipeline's report; None without a data.prepare
    section or while Slurm jobs are still to finish."""
    console = console or Console()
    require_data(recipe)
    if recipe.data.prepare is None:
        console.print("the recipe has no data.prepare section: its sources are tokenized as they are")
        tokenize_data(recipe, console, force)
        return None
    from fermion import prepare as preparation

    report = preparation.run(recipe, console, strict)
    if report is None:
        return None
    # A tokenizer from before records that the report does not name was trained on other documents: train it anew.
    path = recipe.tokenizer_file
    unrecorded = path.is_file() and not recipe.tokenizer.path and recorded_inputs(path) is None
    tokenize_data(recipe, console, force or (unrecorded and Tokenizer.load(path).hash != report["tokenizer_hash"]))
    shards = load_index(layout.shard_dir(recipe.run_dir, recipe.data))
    preparation.add_tokens(preparation.make_plan(recipe), report, shards)
    console.print(preparation.report_table(report))
    return report


def build_model(recipe: Recipe, device: torch.device, weights: dict | None = None) -> Transformer:
    """Build on the meta device, then materialise on the target device: the given weights, or a random init from
    the run's seed."""
    return Transformer.build(recipe.model, device, weights, seed=recipe.run.seed)


def start_from(recipe: Recipe) -> tuple[Recipe, dict | None, Tokenizer | None]:
    """For train.init_from: the recipe with the source's model (and chat template), its weights and tokenizer.

    A model section the recipe writes out must describe the source exactly; one it leaves out is taken from it.
    """
    source = recipe.train.init_from
    if not source:
        return recipe, None, None
    from fermion.train.posttrain import check_same_model, load_source

    source_recipe, weights, tokenizer = load_source(source, "train.init_from")
    check_same_model(recipe, source_recipe, source, "train.init_from")
    update = {"model": source_recipe.model}
    if "chat_template" not in recipe.tokenizer.model_fields_set:
        update["tokenizer"] = recipe.tokenizer.model_copy(update={"chat_template":
                                                                  source_recipe.tokenizer.chat_template})
    return recipe.model_copy(update=update), weights, tokenizer


def with_chat_template(recipe: Recipe, tokenizer: Tokenizer) -> Recipe:
    """The recipe with the chat template its stages render and its exports write. One the recipe names must not need
    special tokens the vocabulary lacks (refused here, before any training); when it names none, an existing
    tokenizer's own template is kept (`default_template`)."""
    if "chat_template" in recipe.tokenizer.model_fields_set:
        ChatTemplate.get(recipe.tokenizer.chat_template).require_tokens(tokenizer)
        return recipe
    if recipe.train.init_from:  # the source's, which start_from took
        return recipe
    tokenizer_config = recipe.tokenizer.model_copy(update={"chat_template": default_template(tokenizer)})
    return recipe.model_copy(update={"tokenizer": tokenizer_config})


def continued_stage(recipe: Recipe, name: str) -> Recipe:
    """`fermion pretrain RECIPE --stage NAME`: the recipe of continued stage NAME (its data, train settings and
    directory), once the model it continues (the stage before it, or the base pretraining) has finished."""
    names = [stage.name for stage in recipe.stages]
    if name not in names:
        known = f"its stages are {', '.join(names)}" if names else "it has no stages section"
        raise RecipeError(f"--stage {name!r} is not a stage of this recipe: {known}")
    index = names.index(name)
    before = f"stage {names[index - 1]!r}" if index else "pretraining"
    command = "fermion pretrain RECIPE" + (f" --stage {names[index - 1]}" if index else "")
    previous = recipe.stage_dir(index - 1) if index else recipe.run_dir
    ckpt = find(previous, warn=lambda *_: None, required=False)
    if ckpt is None:
        raise RecipeError(f"--stage {name} continues from {before}, which has no checkpoint yet in {previous}; "
                          f"run `{command}` first")
    step, steps = trainer_state_of(ckpt)["step"], load_recipe_of(ckpt).train.steps
    if step < steps:
        raise RecipeError(f"--stage {name} continues from {before}, which has trained to step {step:,} of "
                          f"{steps:,} ({ckpt}); finish it first with `{command}`")
    return recipe.stage_recipe(index)


def settle_epochs(recipe: Recipe, world_size: int) -> tuple[Recipe, str | None]:
    """With train.epochs: the recipe with the steps that draw as many training windows (seq_len + 1 tokens) as
    the train shards hold, that many times over, at the global batch (micro-batch x accumulation x processes),
    and a line saying so. Sources are drawn by weight, so a source whose weight exceeds its share of the tokens
    is seen more often than that and a smaller one less. Without epochs: the recipe as it is, and None."""
    train = recipe.train
    if train.epochs is None:
        return recipe, None
    shards = ShardSet(layout.shard_dir(recipe.run_dir, recipe.data), "train")
    windows = sum(shards.num_windows(name, recipe.seq_len) for name in shards.sources)
    batch = train.micro_batch_size * train.grad_accum * world_size
    steps = max(1, math.ceil(train.epochs * windows / batch))
    if train.warmup_steps is not None and train.warmup_steps > steps:  # left out, it follows the steps
        raise RecipeError(f"train.warmup_steps ({train.warmup_steps}) exceeds the {steps:,} steps that "
                          f"train.epochs {train.epochs:g} makes; lower warmup_steps, or leave it out")
    note = (f"train.epochs {train.epochs:g}: {windows:,} windows of {recipe.seq_len} tokens in the train shards, "
            f"{batch} sequences a step -> {steps:,} steps")
    return recipe.model_copy(update={"train": train.model_copy(update={"steps": steps, "epochs": None})}), note


class Pretraining(StageSetup):
    """Pretraining from scratch, or continued from train.init_from: the run's tokenizer and shards, a model."""

    def __init__(self, recipe: Recipe):
        require_data(recipe)
        self.recipe, self.weights, self.source_tokenizer = start_from(recipe)
        existing = self.source_tokenizer or (Tokenizer.load(recipe.tokenizer_file) if recipe.tokenizer.path else None)
        if existing is not None:  # a tokenizer trained here has chatml's markers (the default special tokens)
            self.recipe = with_chat_template(self.recipe, existing)
        self.kind = "continued" if self.recipe.train.init_from else "pretrain"
        self.tokenizer_path = self.recipe.tokenizer_file

    def plan(self, info: DistInfo, console: Console) -> None:
        self.world_size = info.world_size  # train.epochs become steps at the global batch
        if info.device.type == "cuda":  # refused before any file is written or any weight allocated
            check_fits(self.recipe, "cuda", info.world_size)

    def write_files(self, console: Console) -> None:
        recipe = self.recipe
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        if self.source_tokenizer is not None:  # starting from a model: its tokenizer is the run's
            _adopt_tokenizer(recipe, self.source_tokenizer)
            prepare_shards(recipe)
        else:
            tokenize_data(recipe, console)
        self.recipe, note = settle_epochs(recipe, self.world_size)
        if note:
            console.print(note)
        layout.recipe_file(recipe.run_dir).write_text(self.recipe.to_yaml())  # with the steps epochs came to

    def build(self, info: DistInfo, console: Console) -> Parts:
        self.recipe, _ = settle_epochs(self.recipe, info.world_size)  # the other processes: from the same shards
        recipe = self.recipe
        tokenizer = Tokenizer.load(self.tokenizer_path)
        if recipe.model.vocab_size < tokenizer.vocab_size:
            raise RecipeError(f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} tokens; set model.vocab_size to at least that")
        shards = layout.shard_dir(recipe.run_dir, recipe.data)
        train_shards = ShardSet(shards, "train")
        check_tokenizer(train_shards.index, tokenizer, shards)
        loader = TokenLoader(train_shards, recipe.seq_len, recipe.train.micro_batch_size, recipe.run.seed,
                             info.rank, info.world_size)
        if info.is_main:
            for note in loader.upsampling_notes(recipe.train.steps * recipe.train.grad_accum):
                console.print(note)
        validation = val_batches(ShardSet(shards, "val"), recipe.seq_len, recipe.train.micro_batch_size,
                                 recipe.train.eval_batches)
        objective = Pretrain(torch.from_numpy(tokenizer.token_bytes()))
        return Parts(build_model(recipe, info.device, self.weights), objective, loader, validation)


def pretrain(recipe: Recipe, resume: str = "auto", console: Console | None = None, stage: str | None = None
             ) -> TrainResult:
    """Pretrain the recipe's model, or with `stage` run that continued stage of it on its own."""
    return run_stage(Pretraining(continued_stage(recipe, stage) if stage else recipe), resume, console or Console())
