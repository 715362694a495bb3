"""The RL stage (`fermion rl`): prompts with verifiable answers -> rollouts sampled by the policy through the
inference engine, tools called on the way -> rewards from the verifiers -> the one trainer with the GRPO objective.

Reads the `rl` section (config/rl.py). The stage starts from the run's DPO model (or its SFT model when the recipe
has no dpo section) unless rl.train.init_from says otherwise, and trains into `<run>/rl` like the other
post-training stages: checkpoints, metrics.jsonl, report.json. What happens in a step is in train/rollout.py (the
rollouts, advantages, the loader and its exact resume) and objectives.GRPO (the loss).

Distributed: DDP or FSDP2. Each process samples its share of the prompts with the whole weights, as decoding needs
them: under DDP the policy's own, under FSDP2 (which shards them) a copy on each process that the shards are
gathered into before each rollout batch and each validation (`Rollouts.sync`): one model's weights more per
process, the price of decoding without a collective per token.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from rich.console import Console

from fermion.chat import toolbox
from fermion.chat.conversations import Skipped
from fermion.chat.templates import TemplateError
from fermion.config import Recipe, RecipeError
from fermion.data.sources import DataError
from fermion.device import DistInfo, resolve_precision
from fermion.eval.rewards import Rewards
from fermion.train.objectives import GRPO
from fermion.train.posttrain import PostTraining, Report, Stage, setup_stage, split
from fermion.train.pretrain import build_model
from fermion.train.rollout import Prompt, RolloutLoader, Rollouts, prompt_ids, source_records, to_prompt
from fermion.train.stage import Parts, run_stage
from fermion.train.trainer import TrainResult


def read_prompts(stage: Stage, tools: list, report: Report) -> list[Prompt]:
    """Every usable prompt of rl.sources; the unusable ones counted in the report by reason."""
    cfg, room = stage.recipe.rl, stage.recipe.seq_len - 1
    prompts, cramped = [], 0
    for source in cfg.sources:
        for where, record in source_records(source):
            report.read += 1
            try:
                prompt = to_prompt(record, where)
                # Rendered and tokenized once, here: the loader, the validation and LoRA's token rows take these.
                prompt = replace(prompt, ids=prompt_ids(stage.template, stage.tokenizer, prompt.messages, tools))
                length = len(prompt.ids)
                if length >= room:
                    raise Skipped(where, "no room to answer", f" (the prompt is {length} tokens of {room + 1})")
            except Skipped as skipped:
                report.skip(skipped.reason, where)
                continue
            cramped += length + cfg.max_new_tokens > room
            prompts.append(prompt)
    if report.read == 0:
        raise DataError(f"rl.sources: no records found ({', '.join(s.name for s in cfg.sources)})")
    report.used = len(prompts)
    # Their completions are cut where the context ends: a long right answer scores as a broken one, and RL learns
    # to avoid it (a tool call with many arguments, say) rather than to get it right.
    report.extra["prompts_short_of_room"] = cramped
    return prompts


def prepare(recipe: Recipe) -> tuple[Stage, list[Prompt], list[Prompt], Report]:
    """The stage, its train and held-out prompts and the report (no model built). Verifiers and tools are resolved
    first, so a misnamed one is reported before anything is read."""
    cfg = recipe.rl
    if cfg is None:
        raise RecipeError("the recipe has no 'rl' section: add rl.sources (prompts with answers) and rl.verifiers")
    Rewards.from_recipe(cfg.verifiers)
    tools = toolbox.get(cfg.tools)
    stage = setup_stage(recipe, "rl")
    if "generation" not in stage.template.source:
        raise TemplateError(f"chat template {stage.template.name!r} has no {{% generation %}} block, so no model "
                            "turn could be told from the template's text")
    report = Report("rl")
    prompts = read_prompts(stage, tools, report)
    if not prompts:
        raise report.nothing_usable("rl", cfg.sources, "prompt with an answer")
    train, val = split(prompts, cfg.val_fraction, recipe.run.seed)
    report.extra.update(train_prompts=len(train), val_prompts=len(val), template=stage.template.name,
                        init_from=stage.init_from, verifiers=cfg.verifiers, tools=cfg.tools,
                        group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step, loss_type=cfg.loss_type,
                        beta=cfg.beta, iterations=cfg.iterations)
    return stage, train, val, report


class RLSetup(PostTraining):
    def token_arrays(self):
        return (np.asarray(p.ids) for p in self.train)

    def plan(self, info: DistInfo, console: Console) -> None:
        cfg, train_cfg = self.cfg, self.recipe.train
        if cfg.prompts_per_step % info.world_size:
            raise RecipeError(f"rl.prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
                              f"{info.world_size} processes")
        rows = cfg.prompts_per_step // info.world_size * cfg.group_size
        if rows % train_cfg.micro_batch_size:
            raise RecipeError(f"rl: each process trains on {rows} completions per step (prompts_per_step × "
                              f"group_size / {info.world_size} processes), not a multiple of "
                              f"rl.train.micro_batch_size ({train_cfg.micro_batch_size})")
        # One optimisation step takes the whole rollout batch, in micro-batches.
        train_cfg = train_cfg.model_copy(update={"grad_accum": rows // train_cfg.micro_batch_size,
                                                 "warmup_steps": min(train_cfg.warmup, train_cfg.steps)})
        self.recipe = self.recipe.model_copy(update={"train": train_cfg})
        self.val = self.val[:train_cfg.eval_batches * train_cfg.micro_batch_size]
        self.report.extra.update(steps=train_cfg.steps, rollouts=-(-train_cfg.steps // cfg.iterations),
                                 val_prompts_scored=len(self.val))

    def write_files(self, console: Console) -> None:
        super().write_files(console)
        cfg, steps = self.cfg, self.recipe.train.steps
        tools = f" · tools {', '.join(cfg.tools)} over up to {cfg.max_turns} turns" if cfg.tools else ""
        console.print(f"rl: {len(self.train):,} training prompts, {len(self.val):,} held out · {steps:,} steps, "
                      f"{self.report.extra['rollouts']:,} rollout batches of {cfg.prompts_per_step} prompts × "
                      f"{cfg.group_size} completions · verifiers "
                      f"{', '.join(f'{n} ×{w:g}' for n, w in cfg.verifiers.items())} · loss {cfg.loss_type}, "
                      f"epsilon {cfg.epsilon:g}/{cfg.clip_high:g}, beta {cfg.beta:g}, {cfg.iterations} "
                      f"iteration(s){tools}")
        if cramped := self.report.extra["prompts_short_of_room"]:
            console.print(f"rl: warning: {cramped:,} of {self.report.used:,} prompts leave fewer than "
                          f"rl.max_new_tokens ({cfg.max_new_tokens}) positions in the {self.recipe.seq_len}-token "
                          "context, so their answers are cut where it ends and score as broken; raise "
                          "model.context_length (or rl.train.seq_len) or lower rl.max_new_tokens")

    def build(self, info: DistInfo, console: Console) -> Parts:
        cfg, train_cfg, stage = self.cfg, self.recipe.train, self.stage
        reference = None
        if cfg.beta > 0:  # built first: with adapters the stage lets go of its copy of the starting weights
            reference = build_model(self.recipe, info.device, stage.weights).eval().requires_grad_(False)
        model = self.with_adapters(build_model(self.recipe, info.device, stage.weights), info)
        precision = resolve_precision(train_cfg.precision, info.device)
        sharded = info.distributed and train_cfg.distributed == "fsdp"
        rollouts = Rollouts(model, stage.tokenizer, stage.template, toolbox.get(cfg.tools),
                            Rewards.from_recipe(cfg.verifiers), cfg, self.recipe.seq_len, precision, info, self.seed,
                            reference, decoder=copy.deepcopy(model).requires_grad_(False) if sharded else None)
        loader = RolloutLoader(rollouts, self.train, train_cfg.micro_batch_size, train_cfg.grad_accum)
        val, val_ids = self.val, [p.ids for p in self.val]

        def validate(indices: list[int]) -> torch.Tensor:
            if indices[0] == 0:  # the first batch of a validation (every process scores them all, in order)
                rollouts.sync()
            return rollouts.greedy_sums([val[i] for i in indices], [val_ids[i] for i in indices])

        objective = GRPO(rollouts.rewards.names, cfg.epsilon, cfg.clip_high, cfg.beta, cfg.loss_type,
                         cfg.temperature, validate)
        chunks = [list(range(i, min(i + train_cfg.micro_batch_size, len(val))))
                  for i in range(0, len(val), train_cfg.micro_batch_size)]
        validation = [(torch.tensor(chunk),) for chunk in chunks]
        if validation:  # the held-out reward of the starting weights, beside every later one (as DPO's start NLL)
            start = objective.summarise(sum(validate(chunk) for chunk in chunks))
            objective.start = {f"{name}_start": value for name, value in start.items()}
            if info.is_main:
                console.print(f"rl: starting model: {objective.describe(start)}")
        return Parts(model, objective, loader, validation, prefetch=False)


def rl(recipe: Recipe, resume: str = "auto", console: Console | None = None) -> TrainResult:
    return run_stage(RLSetup(recipe, prepare(recipe)), resume, console or Console())
