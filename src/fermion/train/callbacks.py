"""Callbacks the stages add to the training loop (the interface, `Callback`, and the trainer's own `Checkpointer` are
in trainer.py): the recipe's benchmarks during training."""

from __future__ import annotations

from pathlib import Path

from fermion import layout
from fermion.chat.templates import ChatTemplate
from fermion.config import Recipe
from fermion.data.tokenizer import Tokenizer
from fermion.eval import runner
from fermion.eval.results import TaskOptions, write
from fermion.infer import lm as eval_lm
from fermion.train.trainer import Callback, Trainer, due


class Benchmarks(Callback):
    """The recipe's eval tasks on the model being trained every eval.every steps and at the last one, on the main
    process; the scores go to the metrics log and <run>/eval/step_N. Other processes wait for it at the next step's
    gradient sync. Chat prompts when the stage is a post-training one (checkpoint.POST_TRAINED)."""

    def __init__(self, recipe: Recipe, tokenizer_path: Path, chat: bool):
        cfg = recipe.eval
        self.recipe, self.every, self.chat = recipe, cfg.every, chat
        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.template = ChatTemplate.get(recipe.tokenizer.chat_template)
        self.tasks = runner.task_names(cfg.tasks)
        self.options = TaskOptions(data_dir=cfg.resolved_data_dir(), limit=cfg.limit, shots=cfg.shots,
                                   seed=recipe.run.seed)

    def on_step_end(self, trainer: Trainer) -> None:
        if not due(trainer.step, self.every, trainer.cfg.steps) or not trainer.info.is_main:
            return
        if trainer.sharded:
            trainer.warn("eval.every is skipped under FSDP (the weights are sharded); evaluate the checkpoints "
                         "with `fermion eval`")
            return
        # A new EvalModel each time: its decoding engine's KV cache is freed before training goes on.
        model = eval_lm.EvalModel(trainer.raw_model, self.tokenizer, template=self.template,
                                  chat=self.chat, recipe=self.recipe)
        try:
            results = runner.run(model, self.tasks, self.options)
        finally:
            trainer.raw_model.train()
        scores = {f"eval/{r.task}/{m.name}": m.value for r in results for m in r.metrics}
        if trainer.logger is not None:
            trainer.logger.log({"step": trainer.step, **scores})
        run_dir = self.recipe.run_dir
        write(results, layout.eval_step_dir(run_dir, trainer.step), model=f"{run_dir} step {trainer.step}")
        trainer.say(f"step {trainer.step:,}: " + " · ".join(
            f"{r.task} {r.metrics[0].name} {r.metrics[0].value:.4f}" for r in results))
