"""The one training loop. It takes a model, an objective (objectives.Objective, the only interface it uses), a loader
and a recipe, and owns the rest: optimizer, schedule, gradient accumulation, clipping, mixed precision, distributed
wrapping, validation, metrics, checkpoints (its Checkpointer), exact resume, and stopping cleanly on SIGTERM/SIGINT
or on repeated non-finite losses. What else runs between steps (benchmarks) comes in as callbacks."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from fermion import checkpoint
from fermion.config import Recipe
from fermion.device import (
    DistInfo,
    all_reduce,
    resolve_precision,
)
from fermion.model import lora
from fermion.model.counting import count
from fermion.train.distributed import compile_decision, parallelize
from fermion.train.logging import MetricsLogger, format_stats, make_progress, peak_flops
from fermion.train.muon import Muon
from fermion.train.objectives import Objective
from fermion.train.prefetch import Prefetcher
from fermion.train.schedule import learning_rate


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where the last good state is."""


class StepInterrupted(BaseException):
    """A stop signal arrived during a step's forward or backward pass (which, compiling, can take minutes): the step
    is abandoned and the run stops at the state before it. A BaseException, so that no `except Exception` on the
    way (torch.compile's among them) takes it for an error of its own."""


@dataclass
class TrainResult:
    status: str  # "complete" or "preempted"
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's, as the objective names them

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")


def to_device(batch, device: torch.device):
    """A batch is a tuple (or dict) of tensors, in whatever layout its objective reads."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def hardware(info: DistInfo) -> dict:
    """What the run trained on, recorded in every checkpoint for the model card."""
    device = info.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"device": device.type, "name": name, "count": info.world_size, "cpu_cores": os.cpu_count()}


def build_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                    precision: str = "fp32") -> torch.optim.Optimizer:
    """train.optimizer: AdamW for every parameter, or Muon for the blocks' matrices and AdamW for the rest
    (train/muon.py), its orthogonalisation in bf16 when training is (as on CUDA always). Weight decay goes to matmul
    weights only (norms and embeddings excluded unless configured). Frozen parameters (a LoRA base) get no state."""
    cfg = recipe.train
    fused = device.type in ("cpu", "cuda")  # one kernel for all parameters where PyTorch has it
    decay, no_decay, matrices = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if cfg.optimizer == "muon" and muon_takes(name, param):
            matrices.append(param)
            continue
        exempt = param.ndim < 2 or "tok_emb" in name
        (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    muon_lr = cfg.muon_lr or cfg.lr
    groups.append({"params": matrices, "muon": True, "weight_decay": cfg.weight_decay, "lr": muon_lr,
                   "lr_scale": muon_lr / cfg.lr})
    return Muon(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, momentum=cfg.muon_momentum, fused=fused,
                ns_dtype=torch.bfloat16 if precision == "bf16" else None)


def muon_takes(name: str, param: torch.nn.Parameter) -> bool:
    """Whether Muon trains this parameter: the matrices inside the transformer blocks, the MoE router excepted
    (see train/muon.py for why), and LoRA's factors too: rank-r matrices, B starting at zero, which AdamW trains
    as LoRA was designed and tuned with."""
    return (param.ndim in (2, 3) and re.search(r"(^|\.)blocks\.", name) is not None and ".router." not in name
            and ".lora_" not in name)


# ------------------------------------------------------------------------------------------------- callbacks
# What the loop calls after every step, built once before training (OLMo-core's callbacks are the model). The loop
# runs its objective's validation, then every callback's `on_step_end` in order, the trainer's own Checkpointer last,
# so a checkpoint holds the step that the metrics and benchmarks before it describe; when the loop completes, every
# `on_end`. A callback reads what it needs from the trainer (step, recipe, model, logger) and never changes
# training's state: that keeps exact resume exact.


class Callback:
    """Hooks of the training loop (see above); each does nothing unless overridden."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After step `trainer.step` (already counted) is logged and validated, on every process."""

    def on_end(self, trainer: Trainer) -> None:
        """After the last step, on every process (not when the run stops early on a signal or an error)."""


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs at `step`: every `every` steps and at the last one."""
    return step % every == 0 or step == last


class Checkpointer(Callback):
    """Writes the trainer's state every train.checkpoint_every steps and at the last one (waiting for that one), and
    whenever the trainer asks (a stop signal, repeated non-finite losses). With train.async_checkpoint the files are
    written in the background and the directory appears under its name only once they are complete (see
    checkpoint.PendingSave); at most one save is pending, and every rank finishes it before the next."""

    def __init__(self, recipe: Recipe, tokenizer_path: Path):
        self.recipe, self.cfg, self.run_dir, self.tokenizer_path = recipe, recipe.train, recipe.run_dir, tokenizer_path
        self.last: Path | None = None  # the newest checkpoint this process has saved (its final name)
        self._pending: checkpoint.PendingSave | None = None  # an asynchronous save still being written
        self._group = None  # DCP's async writer talks over its own process group, not training's

    def save(self, trainer: Trainer, wait: bool = False) -> Path:
        """Checkpoint the trainer's current step and return its directory; `wait` finishes an asynchronous save
        before returning. An earlier pending save is always finished first."""
        self.finish_pending()
        asynchronous = self.cfg.async_checkpoint
        if asynchronous and trainer.sharded and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank is here: saves are collective
        pending = checkpoint.start_save(self.run_dir, trainer.step, trainer.model if trainer.sharded else
                                        trainer.raw_model, trainer.optimizer, trainer.trainer_state(), trainer.info,
                                        trainer.sharded, self.recipe, self.tokenizer_path, self.cfg.keep_checkpoints,
                                        asynchronous=asynchronous, process_group=self._group)
        self.last = pending.final
        trainer._saved_step = trainer.step
        if not asynchronous or wait:
            return pending.finish()
        self._pending = pending
        return pending.final

    def writing(self) -> bool:
        """Whether this rank is still writing its share of a pending save."""
        return self._pending is not None and not self._pending.done()

    def pending(self) -> bool:
        return self._pending is not None

    def finish_pending(self) -> Path | None:
        """Wait for an asynchronous save (every rank calls this), then put it in place; its directory or None."""
        pending, self._pending = self._pending, None
        return pending.finish() if pending is not None else None

    def on_step_end(self, trainer: Trainer) -> None:
        if due(trainer.step, self.cfg.checkpoint_every, self.cfg.steps):
            self.save(trainer, wait=trainer.step == self.cfg.steps)

    def on_end(self, trainer: Trainer) -> None:
        self.finish_pending()


class Trainer:
    """`stage` is the kind of stage being trained (checkpoint.STAGES), recorded in every checkpoint; `callbacks` run
    after every step in order, before the trainer's own checkpointer (see callbacks.py); `prefetch` False keeps
    batches from being read ahead of their step (RL's rollouts need the step's own weights)."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, objective: Objective, loader, val_batches: list,
                 info: DistInfo, tokenizer_path: Path, console: Console | None = None, *, stage: str = "pretrain",
                 callbacks: Sequence[Callback] = (), prefetch: bool = True):
        if stage not in checkpoint.STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(checkpoint.STAGES)}")
        self.recipe, self.cfg, self.info, self.stage = recipe, recipe.train, info, stage
        self.objective, self.val_batches = objective, val_batches
        # Batches reach the device ahead of use (pinned, non-blocking, on CUDA); its state is what was consumed.
        self.loader = Prefetcher(loader, info.device, threaded=None if prefetch else False)
        self.console = console or Console()
        self.run_dir = recipe.run_dir
        self.sharded = info.distributed and self.cfg.distributed == "fsdp"
        self.precision = resolve_precision(self.cfg.precision, info.device)
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable GEMMs
        torch.use_deterministic_algorithms(self.cfg.deterministic, warn_only=True)
        self.raw_model = model
        self.tokens_per_step = self.cfg.micro_batch_size * recipe.seq_len * self.cfg.grad_accum * info.world_size
        self.counts = count(recipe.model, recipe.seq_len)
        run_flops = self.counts.train_flops_per_token * self.tokens_per_step * self.cfg.steps / info.world_size
        compile, self.compile_reason = compile_decision(self.cfg, info, self.precision, run_flops)
        self.model, self.loss_fn, self.compiled = parallelize(model, objective, self.cfg, info, self.precision,
                                                              self.warn, compile)
        self.optimizer = build_optimizer(self.model, recipe, info.device, self.precision)
        self.hardware = hardware(info)
        gpu_name = self.hardware["name"] if info.device.type == "cuda" else None
        self.peak_flops = self.cfg.peak_flops or peak_flops(gpu_name)
        self.step, self.tokens_seen, self.nonfinite_streak, self.elapsed = 0, 0, 0, 0.0
        self._stop_signal: str | None = None
        self._interruptible = False  # in a step's forward/backward, where a stop signal abandons the step
        self._loader_at_step_start: dict | None = None  # what a checkpoint of an abandoned step records
        self._saved_step: int | None = None  # the step of the newest checkpoint on disk that this run holds
        self.checkpointer = Checkpointer(recipe, tokenizer_path)
        self.callbacks = [*callbacks, self.checkpointer]
        self.logger: MetricsLogger | None = None  # on the main process while fit runs

    # ------------------------------------------------------------------------------------------------ state

    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes: what a resume on another world size must keep."""
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.info.world_size

    def trainer_state(self) -> dict:
        loader = self._loader_at_step_start if self._loader_at_step_start is not None else self.loader.state_dict()
        return {"tokens_seen": self.tokens_seen, "loader": loader, "elapsed_s": self.elapsed,
                "nonfinite_streak": self.nonfinite_streak, "lr": learning_rate(self.cfg, max(self.step - 1, 0)),
                "global_batch": self.global_batch(), "micro_batch_size": self.cfg.micro_batch_size,
                "grad_accum": self.cfg.grad_accum, "hardware": self.hardware, "precision": self.precision,
                "compiled": self.compiled, "stage": self.stage, "objective": self.objective.state_dict()}

    def restore(self, ckpt: Path) -> None:
        saved = checkpoint.load_recipe_of(ckpt)
        if saved.model != self.recipe.model:
            raise TrainingError(f"{ckpt} holds a different model than this recipe's 'model' section; "
                                f"use another run.dir or restore the recipe's model section")
        self._check_global_batch(ckpt)
        state = checkpoint.load_training(ckpt, self.model if self.sharded else self.raw_model, self.optimizer,
                                         self.info, self.sharded)
        if state["world_size"] != self.info.world_size or (state["format"] == "dcp") != self.sharded:
            self.say(f"resharding {ckpt.name}: written by {state['world_size']} process(es) as {state['format']}, "
                      f"resumed on {self.info.world_size} as {'dcp' if self.sharded else 'safetensors'}")
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._saved_step = self.step
        self.nonfinite_streak, self.elapsed = state["nonfinite_streak"], state["elapsed_s"]
        self.loader.load_state_dict(state["loader"])
        self.objective.load_state_dict(state.get("objective", {}))  # absent from checkpoints written before it

    def _check_global_batch(self, ckpt: Path) -> None:
        """The loader's position counts samples of one global sequence, so any world size can continue it, but
        only with the same number of sequences per step; otherwise the steps (and the schedule) would differ."""
        state = checkpoint.trainer_state_of(ckpt)
        saved = state.get("global_batch")
        if saved is None and state.get("step"):  # written before global_batch was recorded
            saved = state["tokens_seen"] // state["step"] // self.recipe.seq_len
        ours = self.global_batch()
        if saved is None or saved == ours:
            return
        was = ""
        if "micro_batch_size" in state:
            was = (f" ({state['micro_batch_size']} micro-batch × {state['grad_accum']} accumulation × "
                   f"{state['world_size']} processes)")
        need = saved / (self.cfg.micro_batch_size * self.info.world_size)
        hint = (f"set train.grad_accum={int(need)}" if need == int(need) and need >= 1 else
                "change train.micro_batch_size or train.grad_accum")
        raise TrainingError(
            f"{ckpt} was trained with a global batch of {saved} sequences per step{was}; this run has {ours} "
            f"({self.cfg.micro_batch_size} × {self.cfg.grad_accum} × {self.info.world_size} processes). Keep the "
            f"global batch when resuming on another number of processes: {hint}"
        )

    def _resume_from(self, resume: str) -> Path | None:
        if resume == "none":
            if checkpoint.list_checkpoints(self.run_dir):
                raise TrainingError(f"{self.run_dir} already has checkpoints; pass --resume auto to continue it, "
                                    f"or set run.dir to start a new run")
            return None
        if resume == "auto":
            return checkpoint.find(self.run_dir, warn=self.warn, required=False)
        return checkpoint.find(resume, warn=self.warn)

    def warn(self, message: str) -> None:
        if self.info.is_main:
            self.console.print(f"[yellow]warning:[/] {message}")

    # --------------------------------------------------------------------------------------------- signals

    @contextlib.contextmanager
    def _stop_on_signals(self):
        def request_stop(signum, _frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C means now
            self._stop_signal = signal.Signals(signum).name
            if self._interruptible:  # one process only: ranks stopping mid-collective would wait on each other
                # Python swallows an exception raised where the signal happens to land in a weakref callback or
                # a __del__ (torch.compile runs many): try again every 0.2 s until one reaches the loop.
                signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
                raise StepInterrupted

        def retry(_signum, _frame):
            if not self._interruptible:
                signal.setitimer(signal.ITIMER_REAL, 0)
                return
            raise StepInterrupted

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, retry)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal. The same all-reduce asks whether every rank has written its share
        of a pending asynchronous save, which is then put in place without waiting for the next one."""
        flags = [1.0 if self._stop_signal else 0.0, 1.0 if self.checkpointer.writing() else 0.0]
        flags = all_reduce(torch.tensor(flags, device=self.info.device), self.info, op="max").tolist()
        if self.checkpointer.pending() and flags[1] == 0.0:
            self.checkpointer.finish_pending()
        return bool(flags[0])

    # ------------------------------------------------------------------------------------------------ steps

    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _sync_gradients(self, sync: bool):
        if not self.info.distributed:
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def train_step(self) -> tuple[float, float, dict[str, float]]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, gradient norm, mean metrics)."""
        self.model.train()
        self._loader_at_step_start = self.loader.state_dict()
        self._interruptible = not self.info.distributed
        for group in self.optimizer.param_groups:  # Muon's matrices keep their own ratio to the schedule
            group["lr"] = learning_rate(self.cfg, self.step) * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.info.device)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.cfg.grad_accum):
            batch = to_device(self.loader.next_batch(), self.info.device)
            with self._sync_gradients(micro == self.cfg.grad_accum - 1), self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / self.cfg.grad_accum).backward()
            total += loss.detach()
            for name in self.objective.logged:
                sums[name] = sums.get(name, 0) + metrics[name].detach().float()
        self._interruptible = False  # from here the step changes the weights: it finishes
        self._loader_at_step_start = None
        mean_loss = all_reduce(total / self.cfg.grad_accum, self.info) / self.info.world_size
        extra = {}
        if sums:  # one reduction for all of them
            stacked = all_reduce(torch.stack(list(sums.values())) / self.cfg.grad_accum, self.info)
            extra = dict(zip(sums, (stacked / self.info.world_size).tolist(), strict=True))
        if self.cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = mean_loss.item(), grad_norm.item()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, extra

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        sums = None
        for batch in self.val_batches:
            with self._autocast():
                batch_sums = self.objective.eval_sums(self.model, to_device(batch, self.info.device))
            sums = batch_sums if sums is None else sums + batch_sums
        return self.objective.summarise(sums) if sums is not None else {}

    # ------------------------------------------------------------------------------------------------- loop

    def plan(self) -> str:
        counts, steps = self.counts, self.cfg.steps
        mode = f" ({self.cfg.distributed})" if self.info.distributed else ""
        adapters = lora.adapted(self.raw_model)
        trained = f", {lora.trainable_parameters(self.raw_model):,} trainable in LoRA adapters" if adapters else ""
        return (f"plan: {counts.total_params:,} parameters ({counts.active_params:,} active{trained}) · {steps:,} "
                f"steps × "
                f"{self.tokens_per_step:,} tokens = {steps * self.tokens_per_step:,} tokens · "
                f"{self.info.world_size} × {self.info.device.type}{mode} · {self.precision}"
                f" · {'compiled' if self.compiled else 'eager'} ({self.compile_reason}) · {self.run_dir}")

    def fit(self, resume: str = "auto") -> TrainResult:
        self.say(self.plan())
        ckpt = self._resume_from(resume)
        if ckpt is not None:
            self.restore(ckpt)
            self.say(f"resuming from [bold]{ckpt}[/] (step {self.step:,}, {self.tokens_seen:,} tokens seen)")
        if self.step >= self.cfg.steps:
            self.say(f"already trained to step {self.step:,} of {self.cfg.steps:,}; nothing to do")
            return TrainResult("complete", self.step, ckpt, self.evaluate())
        if self.info.is_main:
            self.logger = MetricsLogger(self.run_dir, self.step, self.cfg.tensorboard, self.cfg.wandb,
                                        self.recipe.model_dump(mode="json"), self.console)
        try:
            with self._stop_on_signals():
                return self._loop()
        except BaseException:
            # One process can still complete a save that was being written; with several, the others may be gone,
            # and the half-written checkpoint stays hidden under its temporary name.
            if self.checkpointer.pending() and not self.info.distributed:
                self.checkpointer.finish_pending()
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None

    def _loop(self) -> TrainResult:
        last_eval: dict[str, float] = {}
        logger = self.logger
        progress = make_progress(self.console, self.cfg.progress and self.info.is_main)
        with progress:
            task = progress.add_task(self.objective.name, total=self.cfg.steps, completed=self.step, stats="")
            while self.step < self.cfg.steps:
                if self._stop_requested():
                    path = self.checkpointer.save(self, wait=True)
                    self.say(f"received {self._stop_signal or 'a stop request'}: saved {path}; resume with "
                             f"--resume auto")
                    return TrainResult("preempted", self.step, path, last_eval)
                started = time.perf_counter()
                try:
                    loss, grad_norm, metrics = self.train_step()
                except StepInterrupted:
                    self._interruptible = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    return self._stop_mid_step(last_eval)
                seconds = time.perf_counter() - started
                self.elapsed += seconds
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                record = {**self._step_record(loss, grad_norm, seconds), **metrics}
                if logger is not None:
                    logger.log(record)
                    progress.update(task, completed=self.step, stats=format_stats(record))
                    if self.step % self.cfg.log_every == 0 and progress.disable:
                        self.say(f"step {self.step:>6,}/{self.cfg.steps:,}  {format_stats(record)}")
                if self.nonfinite_streak:
                    self._handle_nonfinite(loss, grad_norm)
                if due(self.step, self.cfg.eval_every, self.cfg.steps):
                    last_eval = self.evaluate()
                    if last_eval:  # no validation data, no validation
                        if logger is not None:
                            logger.log({"step": self.step, **last_eval})
                        self.say(f"step {self.step:,}: {self.objective.describe(last_eval)}")
                for callback in self.callbacks:
                    callback.on_step_end(self)
        for callback in self.callbacks:
            callback.on_end(self)
        return TrainResult("complete", self.step, self.checkpointer.last, last_eval)

    def _stop_mid_step(self, last_eval: dict[str, float]) -> TrainResult:
        """A stop signal abandoned step `self.step + 1` before it changed any weight: checkpoint the state before it
        (unless a checkpoint of that step exists, or nothing has been trained) and stop."""
        self.optimizer.zero_grad(set_to_none=True)
        path = None
        if self.step > 0 and self._saved_step != self.step:
            path = self.checkpointer.save(self, wait=True)
        elif self._saved_step == self.step:
            path = self.checkpointer.last or checkpoint.find(self.run_dir, warn=self.warn, required=False)
        self._loader_at_step_start = None
        where = f"saved {path}; resume with --resume auto" if path else "nothing was trained yet"
        self.say(f"received {self._stop_signal} during step {self.step + 1:,} (compiling or running it): stopped "
                 f"at step {self.step:,}; {where}")
        return TrainResult("preempted", self.step, path, last_eval)

    def _step_record(self, loss: float, grad_norm: float, seconds: float) -> dict:
        tokens_per_s = self.tokens_per_step / seconds
        mfu = None
        if self.peak_flops:
            mfu = self.counts.train_flops_per_token * tokens_per_s / (self.peak_flops * self.info.world_size)
        return {"step": self.step, "loss": loss, "lr": learning_rate(self.cfg, self.step - 1),
                "grad_norm": grad_norm, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "mfu": mfu,
                "elapsed_s": self.elapsed}

    def _handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.say(f"[yellow]step {self.step:,}: non-finite loss {loss} / gradient norm {grad_norm}; "
                  f"update skipped ({self.nonfinite_streak} in a row)[/]")
        if self.nonfinite_streak >= self.cfg.max_nonfinite:
            path = self.checkpointer.save(self, wait=True)
            raise TrainingError(
                f"the loss was not finite for {self.nonfinite_streak} steps in a row (up to step {self.step:,}); "
                f"stopped. The last good weights are saved in {path}. Lower train.lr, raise train.warmup_steps "
                f"or check the data."
            )

    def say(self, message: str) -> None:
        if self.info.is_main:
            self.console.print(message)
