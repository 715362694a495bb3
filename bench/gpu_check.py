"""One-shot check of fermion on a lent NVIDIA GPU (an H100 80GB or an H200): one table in at most 8 minutes.

Each row, as measured on the GPU (`--smoke` runs the same code on the CPU with tiny shapes and a few steps, to prove
the script before a GPU is spent on it):

1a, 1b  Dense models trained by fermion's own `Trainer.train_step` with the recipe defaults (bf16 autocast,
        torch.compile of model + loss, fused AdamW, chunked cross-entropy, deterministic kernels) on random
        tokens: bench/train_throughput.py's "125m" shape at seq 1024 and its "350m" at seq 2048, with untied
        embeddings as in Llama (124.7M and 336.1M parameters). tokens/s: the median of timed rounds after warm-up
        steps (the first compiles). MFU: model/counting.py's training FLOPs per token (6 x matmul parameters +
        attention) x tokens/s / the device's listed dense bf16 peak (train/logging.py). Peak memory: one more,
        untimed step, measured as bench/train_throughput.py does (the state the step starts with plus
        torch.cuda.max_memory_allocated above the step's start), against `fermion model info`'s prediction for the
        recipe (counting.plan_memory's peak, before allocator slack and the CUDA context) as a ratio.
2       The 125m under FSDP2 on one GPU: a process group of this one process (nccl) and train.distributed=fsdp, so
        the trainer shards every block, compiles each block and gathers bf16 parameters, as under torchrun.
3       FlexAttention against SDPA with a dense mask (model/attention.py's two paths) in fp32 on packed rows
        (documents of random lengths) with a sliding window shorter than the row, grouped-query heads: the logits
        and every parameter's gradient of the cross-entropy, max abs error and max relative error (per tensor,
        max |difference| / max |SDPA's|); relative errors above 1e-3 fail the row. On a CPU, forwards only:
        PyTorch has no FlexAttention backward there.
4       The 125m's mixture-of-experts twin (8 experts, top-2, each expert half the dense SwiGLU's width, so a
        token's FLOPs stay the same; experts run as grouped matmuls, model/moe.py): tokens/s, MFU on active
        parameters, peak memory against the prediction.
5       Muon against AdamW (train.optimizer) on the 125m: optimizer steps/s of each, in alternating rounds.
6       A DCP checkpoint and its resume: the 125m under FSDP2 trains 3 steps, saves through the trainer's own
        Checkpointer (DCP shards), trains 2 more; a fresh trainer restores the checkpoint (Trainer.restore, the
        resume `fermion pretrain` runs) and trains the same 2. The next step's loss must be the same exactly, or
        within bf16 tolerance (|difference| <= 1e-3 x loss; the row says which); the step after shows the
        restored optimizer state.
7       transformers' Trainer (its defaults: eager, its AdamW, bf16) on LlamaForCausalLM of the 125m's shape, batch
        and sequence (bench/train_throughput.py's hf_trainer_run, under the process-wide deterministic setting
        fermion's trainer makes, as there): tokens/s and peak, and row 1a's tokens/s over it.
8       Decode tokens/s of fermion's Engine (compile=True: its static-shape step in reduce-overhead mode) against
        transformers' `generate` with a static cache (which transformers compiles on CUDA) on the same weights
        (written by fermion's HF export), bf16, greedy, end-of-sequence off, at batch 1 and 8. As in
        bench/decode.py, decode tokens/s leaves out the prefill: (new tokens - 1) x batch / (time for all of them
        - time for the first).

Every row is guarded: an exception or a row running past its cap (an alarm) is written into its row and the next
row runs; a row that would start past the time budget is "skipped: time budget". Nothing is downloaded: the models
are random, the tokenizer is a byte-level BPE trained in-process on the Python standard library's source.

    python bench/gpu_check.py            # on a CUDA machine: prints the table, appends it to bench/RESULTS-gpu.md
    python bench/gpu_check.py --smoke    # the same code on the CPU, tiny shapes: prints, writes only a temp file
    python bench/gpu_check.py --only 1a,8 --budget 200
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import signal
import statistics
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from train_throughput import MOE, SIZES, hf_trainer_run, measured_peak, timed

from fermion import checkpoint
from fermion.chat.templates import ChatTemplate
from fermion.config import ModelConfig, Recipe, RunConfig, TokenizerConfig, TrainConfig
from fermion.data.tokenizer import Tokenizer
from fermion.device import DistInfo, resolve_dtype, resolve_precision
from fermion.export.hf import export_hf
from fermion.infer.engine import Engine, SamplingParams, prepare_for_decode
from fermion.model.counting import plan_memory
from fermion.model.transformer import Transformer
from fermion.train.objectives import Pretrain
from fermion.train.trainer import Trainer, cpu_model

START = time.monotonic()
RESULTS = Path(__file__).with_name("RESULTS-gpu.md")
RESUME_TOLERANCE = 1e-3  # bf16 tolerance of a resumed loss, relative to the loss
FLEX_TOLERANCE = 1e-3  # FlexAttention against SDPA in fp32: max |difference| / max |SDPA's|, per tensor


@dataclass(frozen=True)
class Plan:
    """The shapes, steps and time limits of one mode."""

    small: dict  # the "125m" rows' model shape (1a, 2, 4 with experts, 5, 6, 7, 8)
    large: dict  # row 1b's
    small_run: tuple[int, int]  # (sequence length, micro-batch)
    large_run: tuple[int, int]
    flex: dict  # row 3's model shape
    flex_run: tuple[int, int, int]  # (batch, sequence length, sliding window)
    warmup: int  # untimed steps before the timed rounds (the first compiles)
    rounds: int
    steps: int  # per timed round
    decode: tuple[int, int]  # (prompt tokens, new tokens)
    compile: bool
    budget: float  # seconds for all rows, from the start of the script
    caps: dict  # seconds per row at most


def untied(name: str) -> dict:
    return {**SIZES[name], "tie_embeddings": False}


def with_experts(shape: dict) -> dict:
    """bench/train_throughput.py's MoE twin of a dense shape: 8 experts, top-2, each half the SwiGLU width."""
    return {**shape, "ffn_hidden": shape["ffn_hidden"] // MOE["top_k"], "moe": MOE}


GPU = Plan(small=untied("125m"), large=untied("350m"), small_run=(1024, 16), large_run=(2048, 8),
           flex=dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=1408),
           flex_run=(4, 2048, 512), warmup=3, rounds=3, steps=10, decode=(64, 256), compile=True, budget=440,
           caps={"1a": 80, "1b": 80, "2": 45, "3": 35, "4": 50, "5": 30, "6": 40, "7": 30, "8": 100})
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, tie_embeddings=False)
SMOKE = Plan(small=TINY, large={**TINY, "d_model": 96, "n_layers": 3, "ffn_hidden": 192}, small_run=(64, 2),
             large_run=(128, 2), flex={**TINY, "d_model": 128}, flex_run=(2, 64, 16), warmup=1, rounds=1, steps=2,
             decode=(8, 8), compile=False, budget=600, caps=dict.fromkeys(GPU.caps, 120))


@dataclass
class Context:
    plan: Plan
    device: torch.device
    tmp: Path
    tokenizer_path: Path
    text: str  # what the tokenizer was trained on; decode prompts come from it
    deadline: float
    kept: dict = field(default_factory=dict)  # what later rows compare against: row 1a's trainer and seconds/step
    trainers: list = field(default_factory=list)  # made by the row running now (their loaders are closed after it)
    partial: list = field(default_factory=list)  # what the row running now has measured so far, kept if it fails

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return resolve_precision("auto", self.device)


class CheckFailed(Exception):
    """The row ran, and what it measured is wrong (FlexAttention off SDPA, a resume off the run it continues)."""


class Overtime(BaseException):
    """A row ran past its cap. A BaseException, so that no `except Exception` on the way (torch.compile's) keeps it."""


class RandomBatches:
    """Random token batches for the trainer; batch i comes from seed i, so the position is a count that a checkpoint
    records and a resume restores."""

    def __init__(self, vocab: int, batch: int, seq_len: int):
        self.vocab, self.batch, self.seq_len, self.position = vocab, batch, seq_len, 0

    def next_batch(self):
        generator = torch.Generator().manual_seed(self.position)
        self.position += 1
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@dataclass(frozen=True)
class OneRank(DistInfo):
    """DistInfo counts a run as distributed from two processes on; a process group of one is run as distributed
    here, so the trainer shards (FSDP2) and checkpoints (DCP) exactly as under torchrun."""

    @property
    def distributed(self) -> bool:
        return True


@contextlib.contextmanager
def one_rank_group(ctx: Context):
    """This process as a process group of one (nccl on CUDA, gloo on a CPU), left again afterwards."""
    store = ctx.tmp / f"store-{time.monotonic_ns()}"
    if dist.is_initialized():  # left by a row stopped at its cap while leaving it
        dist.destroy_process_group()
    dist.init_process_group("nccl" if ctx.cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield OneRank(rank=0, world_size=1, local_rank=0, device=ctx.device)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ training rows


def build_trainer(ctx: Context, shape: dict, run: tuple[int, int], info: DistInfo | None = None,
                  run_dir: str = "run", **train) -> Trainer:
    """fermion's Trainer on a recipe of this shape, the train section's defaults but for what is given."""
    seq_len, batch = run
    cfg = ModelConfig(**shape, context_length=seq_len)
    recipe = Recipe(run=RunConfig(name="gpu-check", dir=str(ctx.tmp / run_dir)), model=cfg,
                    train=TrainConfig(steps=10_000, micro_batch_size=batch, seq_len=seq_len, warmup_steps=10,
                                      compile=ctx.plan.compile, tensorboard=False, progress=False, **train))
    model = Transformer.build(cfg, ctx.device, seed=0)
    trainer = Trainer(recipe, model, Pretrain(torch.ones(cfg.vocab_size, dtype=torch.int32)),
                      RandomBatches(cfg.vocab_size, batch, seq_len), [], info or DistInfo(0, 1, 0, ctx.device),
                      ctx.tokenizer_path)
    ctx.trainers.append(trainer)
    return trainer


def seconds_per_step(ctx: Context, trainers: dict[str, Trainer]) -> dict[str, float]:
    """Median seconds per optimizer step of each trainer: warm-up steps first (the first compiles), then timed
    rounds taken in turn, so that drifts in clock speed hit every side alike."""
    plan = ctx.plan
    for trainer in trainers.values():
        timed(trainer.train_step, plan.warmup, ctx.device)
    rounds: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(plan.rounds):
        for name, trainer in trainers.items():
            rounds[name].append(timed(trainer.train_step, plan.steps, ctx.device))
    return {name: statistics.median(times) / plan.steps for name, times in rounds.items()}


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def training_row(ctx: Context, trainer: Trainer, seconds: float) -> str:
    """Parameters, shape, tokens/s, MFU and measured against predicted peak memory of a trainer timed at
    `seconds` per step (the peak from one more, untimed step)."""
    counts, train = trainer.counts, trainer.cfg
    tok_s = trainer.tokens_per_step / seconds
    params, label = f"{counts.total_params / 1e6:.1f}M params", "MFU"
    if counts.active_params != counts.total_params:  # FLOPs per token count the active parameters only
        params, label = params + f" ({counts.active_params / 1e6:.1f}M active)", "MFU on active parameters"
    mfu = (f"{label} {100 * counts.train_flops_per_token * tok_s / trainer.peak_flops:.1f}%" if trainer.peak_flops
           else f"{label} n/a (no listed peak)")
    peak = measured_peak(trainer.train_step, trainer.model, trainer.optimizer, ctx.device)
    predicted = plan_memory(trainer.recipe, ctx.device.type).estimate.peak
    compiled = ", compiled" if trainer.compiled else ""
    return (f"{params} · {train.micro_batch_size} × {trainer.recipe.seq_len}, {trainer.precision}{compiled} · "
            f"**{tok_s:,.0f} tok/s** · {mfu} · peak {mib(peak)}, model info predicts {mib(predicted)} "
            f"(measured/predicted {peak / predicted:.2f})")


def dense_small(ctx: Context) -> str:
    trainer = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run)
    seconds = seconds_per_step(ctx, {"adamw": trainer})["adamw"]
    ctx.kept.update(small_trainer=trainer, small_seconds=seconds)
    return training_row(ctx, trainer, seconds)


def dense_large(ctx: Context) -> str:
    trainer = build_trainer(ctx, ctx.plan.large, ctx.plan.large_run)
    return training_row(ctx, trainer, seconds_per_step(ctx, {"adamw": trainer})["adamw"])


def fsdp_small(ctx: Context) -> str:
    with one_rank_group(ctx) as info:
        trainer = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run, info, distributed="fsdp")
        seconds = seconds_per_step(ctx, {"fsdp": trainer})["fsdp"]
        row = f"FSDP2, 1 rank ({dist.get_backend()}) · " + training_row(ctx, trainer, seconds)
    if "small_seconds" in ctx.kept:
        row += f" · {ctx.kept['small_seconds'] / seconds:.2f}x row 1a's tokens/s"
    return row


def moe_small(ctx: Context) -> str:
    trainer = build_trainer(ctx, with_experts(ctx.plan.small), ctx.plan.small_run)
    seconds = seconds_per_step(ctx, {"moe": trainer})["moe"]
    ffn = trainer.raw_model.blocks[0].ffn
    dtype = torch.bfloat16 if trainer.precision == "bf16" else torch.float32
    experts = "torch._grouped_mm" if ffn._use_grouped(dtype) else "a loop over experts"
    return f"{ffn.n_experts} experts, top-{ffn.top_k}, through {experts} · " + training_row(ctx, trainer, seconds)


def muon_vs_adamw(ctx: Context) -> str:
    adamw = ctx.kept.pop("small_trainer", None)
    if adamw is None:
        adamw = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run)
    else:
        ctx.trainers.append(adamw)  # row 1a's, timed again beside Muon's
    muon = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run, optimizer="muon")
    seconds = seconds_per_step(ctx, {"adamw": adamw, "muon": muon})
    matrices = sum(len(g["params"]) for g in muon.optimizer.param_groups if g.get("muon"))
    return (f"AdamW {1 / seconds['adamw']:.2f} steps/s, Muon {1 / seconds['muon']:.2f} steps/s: a Muon step takes "
            f"**{seconds['muon'] / seconds['adamw']:.2f}x** AdamW's ({matrices} matrices orthogonalised; "
            f"{muon.cfg.micro_batch_size} × {muon.recipe.seq_len} tokens per step)")


def dcp_resume(ctx: Context) -> str:
    with one_rank_group(ctx) as info:
        first = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run, info, run_dir="resume", distributed="fsdp")
        for _ in range(3):  # what the training loop does around each step, as far as a checkpoint records it
            first.train_step()
            first.step += 1
            first.tokens_seen += first.tokens_per_step
        started = time.perf_counter()
        path = first.checkpointer.save(first, wait=True)
        saved_s = time.perf_counter() - started
        expected = [first.train_step()[0] for _ in range(2)]
        del first
        second = build_trainer(ctx, ctx.plan.small, ctx.plan.small_run, info, run_dir="resume", distributed="fsdp")
        started = time.perf_counter()
        second.restore(path)
        loaded_s = time.perf_counter() - started
        got = [second.train_step()[0] for _ in range(2)]
    saved = checkpoint.trainer_state_of(path)["format"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    diffs = [abs(a - b) for a, b in zip(expected, got, strict=True)]
    if diffs[0] == 0:
        verdict = "**exact**"
    elif diffs[0] <= RESUME_TOLERANCE * abs(expected[0]):
        verdict = f"**within bf16 tolerance** (difference {diffs[0]:.1e})"
    else:
        verdict = f"**off** by {diffs[0]:.1e}"
    row = (f"{saved} checkpoint of step 3 ({mib(size)}) saved in {saved_s:.1f} s, restored by a fresh trainer in "
           f"{loaded_s:.1f} s · next step's loss {expected[0]:.6f} vs {got[0]:.6f}: {verdict} · the step after "
           f"(restored optimizer state): difference {diffs[1]:.1e}")
    if "off" in verdict:
        raise CheckFailed(row)
    return row


def hf_trainer(ctx: Context) -> str:
    plan = ctx.plan
    seq_len, batch = plan.small_run
    cfg = ModelConfig(**plan.small, context_length=seq_len)
    args = SimpleNamespace(batch=batch, seq_len=seq_len, precision=ctx.precision, warmup=plan.warmup,
                           rounds=plan.rounds, steps=plan.steps)
    tok_s, peak = hf_trainer_run(cfg, args, ctx.device)
    row = (f"transformers {transformers.__version__} Trainer, LlamaForCausalLM, {batch} × {seq_len}, "
           f"{ctx.precision}, eager: **{tok_s:,.0f} tok/s**, peak {mib(peak)}")
    if "small_seconds" in ctx.kept:
        fermion = batch * seq_len / ctx.kept["small_seconds"]
        row += f" · fermion (row 1a) {fermion:,.0f} tok/s = **{fermion / tok_s:.2f}x**"
    return row


# ----------------------------------------------------------------------------------------------- attention row


def packed_rows(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, segments) [batch, seq_len] of rows packed with documents of random lengths."""
    segments = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in segments:
        cuts = torch.randperm(seq_len - 1, generator=generator)[: max(1, seq_len // 300)] + 1
        row[cuts] = 1
    segments = segments.cumsum(1)
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool), segments[:, 1:] != segments[:, :-1]], 1)
    index = torch.arange(seq_len).expand(batch, -1)
    positions = index - torch.cummax(torch.where(starts, index, 0), 1).values
    return positions, segments


def flex_vs_sdpa(ctx: Context) -> str:
    batch, seq_len, window = ctx.plan.flex_run
    cfg = ModelConfig(**ctx.plan.flex, context_length=seq_len, sliding_window=window)
    model = Transformer.build(cfg, ctx.device, seed=0).train()
    generator = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, cfg.vocab_size, (2, batch, seq_len), generator=generator).to(ctx.device)
    positions, segments = (t.to(ctx.device) for t in packed_rows(batch, seq_len, generator))
    backward = ctx.cuda  # PyTorch has no FlexAttention backward on a CPU
    outputs = {}
    for mode in ("sdpa", "flex"):
        model.set_attention(mode)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits, _ = model(ids, positions, segments)
            if backward:
                F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        grads = {name: p.grad for name, p in model.named_parameters()} if backward else {}
        outputs[mode] = {"logits": logits.detach(), **grads}
    errors = {}
    for name, reference in outputs["sdpa"].items():
        diff = (outputs["flex"][name] - reference).abs().max().item()
        errors[name] = (diff, diff / max(reference.abs().max().item(), 1e-30))
    worst = max(errors, key=lambda name: errors[name][1])
    documents = int(segments[:, -1].sum() + batch)
    row = (f"fp32, {batch} × {seq_len} packed ({documents} documents), window {window}, {cfg.n_heads} query / "
           f"{cfg.kv_heads} KV heads · logits max abs err {errors['logits'][0]:.1e}")
    if backward:
        row += (f" · gradients of {len(errors) - 1} tensors: max abs err {max(e[0] for e in errors.values()):.1e}, "
                f"max rel err {errors[worst][1]:.1e} ({worst})")
    else:
        row += " (forward only: no FlexAttention backward on a CPU)"
    if errors[worst][1] > FLEX_TOLERANCE:
        raise CheckFailed(row)
    return row


# -------------------------------------------------------------------------------------------------- decode row


def decode_rate(generate, batch: int, new_tokens: int, device: torch.device) -> float:
    """Decode tokens/s of `generate(n)` (n new tokens for each of `batch` rows), the prefill left out as in
    bench/decode.py. The first call, untimed, compiles."""
    generate(new_tokens)
    first = timed(lambda: generate(1), 1, device)
    whole = timed(lambda: generate(new_tokens), 1, device)
    return batch * (new_tokens - 1) / max(whole - first, 1e-9)


def fermion_decode(model: Transformer, tokenizer: Tokenizer, prompt: list[int], batch: int, new_tokens: int) -> float:
    engine = Engine(model, tokenizer, max_batch=batch, max_seq=len(prompt) + new_tokens + 1, compile=True)

    def generate(n: int):
        engine.generate([prompt] * batch, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))

    return decode_rate(generate, batch, new_tokens, model.tok_emb.weight.device)


def hf_decode(model, prompt: list[int], batch: int, new_tokens: int, cache: str | None) -> float:
    ids = torch.tensor([prompt] * batch, device=model.device)
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, cache_implementation=cache)

    @torch.no_grad()
    def generate(n: int):
        model.generate(ids, max_new_tokens=n, **options)

    return decode_rate(generate, batch, new_tokens, model.device)


def decode(ctx: Context) -> str:
    prompt_tokens, new_tokens = ctx.plan.decode
    torch.use_deterministic_algorithms(False)  # the trainers of earlier rows set it; fermion's inference never does
    dtype = resolve_dtype("auto", ctx.device)
    cfg = ModelConfig(**ctx.plan.small, context_length=ctx.plan.small_run[0])
    tokenizer = Tokenizer.load(ctx.tokenizer_path)
    prompt = tokenizer.encode(ctx.text[:20 * prompt_tokens])[:prompt_tokens]
    model = Transformer.build(cfg, "cpu", seed=0)
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    folder = export_hf(model, tokenizer, ctx.tmp / "hf", template=ChatTemplate.get("chatml"), dtype=dtype_name)
    model = prepare_for_decode(model.to(device=ctx.device, dtype=dtype).eval())
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(ctx.device).eval()
    hf.generation_config.eos_token_id = None  # every call makes exactly the tokens asked for
    cache, note = "static", "static cache, compiled by transformers" if ctx.cuda else "static cache, eager on a CPU"
    for batch in (1, 8):
        ours = fermion_decode(model, tokenizer, prompt, batch, new_tokens)
        try:
            theirs = hf_decode(hf, prompt, batch, new_tokens, cache)
        except Exception as err:  # noqa: BLE001 - an older transformers without a static cache for this model
            cache, note = None, f"dynamic cache: the static one failed, {type(err).__name__}: {err}"[:200]
            theirs = hf_decode(hf, prompt, batch, new_tokens, cache)
        ctx.partial.append(f"batch {batch}: fermion **{ours:,.0f}** vs transformers {theirs:,.0f} tok/s = "
                           f"**{ours / theirs:.2f}x**")
    engine = "compiled, CUDA graphs" if ctx.cuda else "eager on a CPU"
    return (f"{dtype_name}, prompt {len(prompt)} + {new_tokens} new tokens, greedy · fermion Engine ({engine}) vs "
            f"transformers generate ({note}) · " + " · ".join(ctx.partial))


# --------------------------------------------------------------------------------------------------- the table

ROWS = [
    ("1a", "dense ~125M, seq 1024: tok/s, MFU, peak vs model info", dense_small),
    ("1b", "dense ~350M, seq 2048: tok/s, MFU, peak vs model info", dense_large),
    ("2", "~125M under FSDP2 on one GPU", fsdp_small),
    ("3", "FlexAttention vs SDPA gradients, packed + window", flex_vs_sdpa),
    ("4", "MoE 8 experts top-2 (grouped matmul): MFU on active", moe_small),
    ("5", "Muon vs AdamW steps/s, ~125M", muon_vs_adamw),
    ("6", "DCP save and resume under FSDP2: next-step loss", dcp_resume),
    ("7", "transformers Trainer, same ~125M: tok/s ratio", hf_trainer),
    ("8", "decode tok/s: fermion Engine vs transformers generate", decode),
]


@dataclass
class Row:
    key: str
    check: str
    status: str = "not run"
    result: str = ""
    seconds: float = 0.0


def run_row(row: Row, measure, ctx: Context) -> None:
    """Run one row under its cap and the budget; whatever happens is written into the row."""
    left = ctx.deadline - time.monotonic()
    if left < 5:
        row.status = "skipped: time budget"
        return
    cap = min(ctx.plan.caps[row.key], left)

    def overtime(_signum, _frame):
        raise Overtime

    ctx.partial.clear()
    previous = signal.signal(signal.SIGALRM, overtime)
    signal.setitimer(signal.ITIMER_REAL, cap)
    started = time.monotonic()
    try:
        try:
            row.result, row.status = measure(ctx), "ok"
        finally:  # the alarm is off before anything below runs (it fires once at most)
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Overtime:
        row.status, row.result = f"timed out ({cap:.0f} s cap)", " · ".join(ctx.partial)
        torch._dynamo.reset()  # a compile stopped half-way leaves nothing behind for the next row
    except CheckFailed as failed:
        row.status, row.result = "FAILED", str(failed)
    except Exception as err:  # noqa: BLE001 - every row is guarded: report it, run the next
        traceback.print_exc()
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        row.status, row.result = "error", " · ".join([*ctx.partial, message])
    finally:
        signal.signal(signal.SIGALRM, previous)
        row.seconds = time.monotonic() - started
        for trainer in ctx.trainers:  # stop their prefetching threads (a kept trainer's restarts when used)
            trainer.loader.close()
        ctx.trainers.clear()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    print(f"[{time.monotonic() - START:5.0f} s] {row.key}: {row.status} ({row.seconds:.0f} s) {row.result}",
          flush=True)


def machine(device: torch.device) -> str:
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB), CUDA {torch.version.cuda}, {versions}"
    return f"{cpu_model()} (no GPU: smoke run), {torch.get_num_threads()} threads, {versions}"


def table(rows: list[Row], device: torch.device, smoke: bool) -> str:
    mode = "`python bench/gpu_check.py --smoke` (tiny shapes on the CPU)" if smoke else "`python bench/gpu_check.py`"
    lines = [f"## GPU check, {datetime.date.today()} · {machine(device)}", "",
             f"{mode}: {time.monotonic() - START:.0f} s in all. What each row measures and how: the script's "
             "docstring. Random weights and random tokens throughout.", "",
             "| # | check | status | result | s |", "|---|---|---|---|---:|"]
    lines += [f"| {r.key} | {r.check} | {r.status} | {r.result.replace('|', '/')} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def stdlib_text(limit: int = 1_000_000) -> str:
    """Python source from the standard library: text every machine has, for the tokenizer and the prompts."""
    text = ""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += path.read_text(encoding="utf-8", errors="ignore")
        if len(text) >= limit:
            break
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every row on the CPU with tiny shapes and few steps")
    parser.add_argument("--out", type=Path, help="the markdown file the table is appended to (default "
                                                 "bench/RESULTS-gpu.md; with --smoke a file in the temp directory)")
    parser.add_argument("--only", help=f"comma-separated rows among {', '.join(key for key, _, _ in ROWS)}")
    parser.add_argument("--budget", type=float, help="seconds for all rows (default 440; 600 with --smoke)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: this check is for a GPU machine (--smoke runs it on the CPU)")
    plan = SMOKE if args.smoke else GPU
    device = torch.device("cpu" if args.smoke else "cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "fermion-gpu-check-smoke.md" if args.smoke else RESULTS)
    only = set(args.only.split(",")) if args.only else {key for key, _, _ in ROWS}
    rows = [Row(key, check) for key, check, _ in ROWS]
    # Each row's model compiles with static shapes, as in a process of its own (`fermion pretrain` compiles one
    # model): by default dynamo would recompile the second shape it meets with dynamic shapes instead.
    torch._dynamo.config.automatic_dynamic_shapes = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        text = stdlib_text()
        tokenizer = Tokenizer.train([text], TokenizerConfig(vocab_size=min(1024, plan.small["vocab_size"]),
                                                            train_bytes=300_000))
        tokenizer.save(Path(tmp) / "tokenizer.json")
        ctx = Context(plan, device, Path(tmp), Path(tmp) / "tokenizer.json", text,
                      START + (args.budget or plan.budget))
        for row, (_, _, measure) in zip(rows, ROWS, strict=True):
            if row.key in only:
                run_row(row, measure, ctx)
        ctx.kept.clear()
    report = table([row for row in rows if row.key in only], device, args.smoke)
    print("\n" + report)
    if not out.exists():
        out.write_text("# GPU check (`bench/gpu_check.py`)\n\nEach table was printed by the run its heading names, "
                       "newest last; nothing is edited by hand.\n")
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n" + report)
    print(f"appended to {out}")
    bad = [row.key for row in rows if row.key in only and row.status not in ("ok", "skipped: needs CUDA")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
