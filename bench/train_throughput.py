"""Training throughput and peak memory: fermion's default training step vs transformers' LlamaForCausalLM (dense
sizes) or MixtralForCausalLM (the "-moe" sizes), trained by transformers' `Trainer` and by a plain loop.

All sides get the same architecture, batch, sequence length and precision, and run in this one process. The fermion
side is the real `Trainer.train_step` with the recipe defaults (the loop `fermion pretrain` runs: precision auto,
torch.compile on); the plain-loop side is what a user would write: forward with labels, backward, clip,
`torch.optim.AdamW`, zero_grad, in eager mode, and again with `torch.compile(model)` for reference. These alternate
timed rounds so that machine noise hits them alike. transformers' `Trainer` (its defaults: eager, its default
optimizer, `bf16=True` when the precision is bf16) runs its own loop, so it is timed afterwards in the same process,
from step-end timestamps in rounds of the same length.

MoE sizes ("10m-moe", ...): 8 experts, top-2, Mixtral-style routing (softmax, top-k, renormalise), no capacity limit,
each expert a SwiGLU of half the dense size's hidden width, so a token's FLOPs equal the dense size's. The
transformers side is MixtralForCausalLM with the same shapes (its default experts implementation, `grouped_mm` where
PyTorch has it) and tied embeddings as fermion's; the router's load-balancing loss is on at both sides with the same
coefficient (fermion's default, 0.01; `output_router_logits=True` in transformers). The two definitions differ by
constant factors (transformers pools the layers and counts top-k slots, fermion sums per-layer losses) and fermion
also adds its router z-loss (0.001): that changes the loss value, not measurably the cost.

Peak memory of each side: its parameters, buffers and optimizer state (counted exactly from the tensors) plus the
highest allocation above them during one extra, untimed training step after the timed rounds. On CUDA that is
`torch.cuda.max_memory_allocated` after a reset, minus what was allocated when the step began; on CPU the running
sum of the allocation and free events torch.profiler(profile_memory=True) records during the step (as in
tests/test_memory.py). transformers' `Trainer` is measured the same way on one extra step of its own loop, from its
on_step_begin / on_step_end callbacks.

MFU needs the device's peak FLOP/s: looked up for CUDA devices, given with `--peak-flops` elsewhere (n/a without).

    python bench/train_throughput.py                 # CPU sizes, appends to bench/RESULTS.md
    python bench/train_throughput.py --sizes 10m,3m-moe
    python bench/train_throughput.py --device cuda --sizes 125m,125m-moe,350m --seq-len 1024
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from fermion.config import ModelConfig, Recipe, TrainConfig
from fermion.device import DistInfo, resolve_precision
from fermion.model.counting import allocation_peak, count
from fermion.model.transformer import Transformer
from fermion.train.logging import peak_flops
from fermion.train.objectives import Pretrain
from fermion.train.trainer import Trainer

SIZES = {
    "10m": dict(vocab_size=8192, d_model=320, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=864),
    "30m": dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1408),
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=2048),
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, ffn_hidden=2816),
}
# Mixture-of-experts versions: 8 experts, top-2, each expert half the dense hidden width (same FLOPs per token).
MOE = dict(n_experts=8, top_k=2)
SIZES.update({f"{name}-moe": {**shape, "ffn_hidden": shape["ffn_hidden"] // MOE["top_k"], "moe": MOE}
              for name, shape in list(SIZES.items())})
# Small enough for a CPU (each side's step under a second on 2 cores); named, like the others, by active parameters.
SIZES["3m-moe"] = dict(vocab_size=8192, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=256, moe=MOE)
RESULTS = Path(__file__).with_name("RESULTS.md")


class RandomTokens:
    """A loader of random token batches with the interface the trainer expects."""

    def __init__(self, vocab: int, batch: int, seq_len: int, seed: int = 0):
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.generator)
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self):
        return {}


def fermion_step(cfg: ModelConfig, args, device: torch.device):
    recipe = Recipe(model=cfg, train=TrainConfig(steps=10_000, micro_batch_size=args.batch, seq_len=args.seq_len,
                                                 warmup_steps=10, precision=args.precision, tensorboard=False,
                                                 progress=False))
    model = Transformer(cfg).to(device)
    model.init_weights()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    trainer = Trainer(recipe, model, Pretrain(torch.ones(cfg.vocab_size, dtype=torch.int32)),
                      RandomTokens(cfg.vocab_size, args.batch, args.seq_len), [], info, Path("unused"))
    return model, lambda: trainer.train_step(), trainer.optimizer


def hf_model(cfg: ModelConfig, device: torch.device) -> transformers.PreTrainedModel:
    cls = transformers.MixtralForCausalLM if cfg.moe else transformers.LlamaForCausalLM
    return cls(hf_config(cfg)).to(device)


def transformers_step(cfg: ModelConfig, args, device: torch.device, compiled: bool):
    model = hf_model(cfg, device)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loader = RandomTokens(cfg.vocab_size, args.batch, args.seq_len)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def step():
        model.train()
        inputs, _ = loader.next_batch()
        inputs = inputs.to(device)
        with autocast:
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step, optimizer


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    shape = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    if not cfg.moe:
        return transformers.LlamaConfig(**shape)
    # Mixtral as fermion's export maps it (fermion/export/hf.py), with the load-balancing loss switched on.
    return transformers.MixtralConfig(
        **shape, num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k, sliding_window=None,
        router_jitter_noise=0.0, router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=True)


class RandomDataset(torch.utils.data.Dataset):
    """Random token rows in the form transformers' Trainer takes (labels = inputs; the model shifts them)."""

    def __init__(self, vocab: int, seq_len: int, rows: int):
        self.tokens = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def hf_trainer_run(cfg: ModelConfig, args, device: torch.device) -> tuple[float, int]:
    """transformers' Trainer on the same model and batch: (tokens/s, the median round after warm-up; peak bytes of
    one extra step after the timed ones, measured from its step-begin and step-end callbacks)."""
    import tempfile

    timed_steps = args.warmup + args.rounds * args.steps

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.meter: PeakMeter | None = None
            self.peak = 0

        def on_step_begin(self, _args, state, _control, model=None, optimizer=None, **_kwargs):
            if state.global_step == timed_steps:  # the extra, measured step
                self.meter = PeakMeter(device, state_bytes(model, optimizer))
                self.meter.start()

        def on_step_end(self, _args, state, _control, **_kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if self.meter is not None:
                self.peak = self.meter.stop()
                self.meter = None

    total = timed_steps + 1
    model = hf_model(cfg, device)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=total, learning_rate=1e-4,
            weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=0, bf16=args.precision == "bf16",
            use_cpu=device.type == "cpu", report_to=[], logging_strategy="no", save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=training, callbacks=[clock],
                                       train_dataset=RandomDataset(cfg.vocab_size, args.seq_len, total * args.batch))
        trainer.train()
    assert clock.peak, "the measured step of transformers' Trainer did not run"
    ends = clock.ends[args.warmup - 1:]  # the end of warm-up starts the first round
    rounds = [ends[i + args.steps] - ends[i] for i in range(0, args.rounds * args.steps, args.steps)]
    return args.steps * args.batch * args.seq_len / statistics.median(rounds), clock.peak


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers and optimizer state a training step starts with (tied weights once; under
    FSDP2 this process's shards: a DTensor's own data_ptr() is 0, its local tensor's is real)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around transformers' optimizer
    held = [*model.parameters(), *model.buffers()]
    for per_param in optimizer.state.values():
        held += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    tensors = {t.data_ptr(): t for t in (t.to_local() if hasattr(t, "to_local") else t for t in held)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PeakMeter:
    """Peak bytes of one training step: the state it starts with plus the highest allocation above that."""

    def __init__(self, device: torch.device, held: int):
        self.device, self.held, self.profiler = device, held, None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return self.held + torch.cuda.max_memory_allocated(self.device) - self.base
        self.profiler.stop()
        peak = allocation_peak(self.profiler)
        return self.held + peak


def measured_peak(step, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Peak bytes of one (untimed) call of `step`; run it after warm-up, when the optimizer state exists."""
    meter = PeakMeter(device, state_bytes(model, optimizer))
    meter.start()
    step()
    return meter.stop()


def timed(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_size(name: str, args, device: torch.device) -> dict:
    cfg = ModelConfig(**SIZES[name], context_length=args.seq_len, tie_embeddings=True)
    torch.manual_seed(0)
    sides = {"fermion": fermion_step(cfg, args, device),
             "transformers": transformers_step(cfg, args, device, compiled=False)}
    if not args.skip_compiled_reference:
        sides["transformers_compiled"] = transformers_step(cfg, args, device, compiled=True)
    steps = {side: step for side, (_, step, _) in sides.items()}
    for step in steps.values():
        timed(step, args.warmup, device)
    rounds = {side: [] for side in steps}
    for _ in range(args.rounds):  # alternate, so drifts in machine speed hit every side alike
        for side, step in steps.items():
            rounds[side].append(timed(step, args.steps, device))
    # One more step per side, untimed, for its peak memory (after the rounds, so the profiler cannot touch timing).
    mem = {side: measured_peak(step, model, optimizer, device) for side, (model, step, optimizer) in sides.items()}
    tokens = args.steps * args.batch * args.seq_len
    tok_s = {k: tokens / statistics.median(v) for k, v in rounds.items()}
    tok_s["trainer"], mem["trainer"] = hf_trainer_run(cfg, args, device)
    counts = count(cfg, args.seq_len)
    peak = args.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    hf_eager = sides["transformers"][0]
    result = {"size": name, "params": counts.total_params, "active_params": counts.active_params,
              "moe": cfg.moe is not None, "fermion_tok_s": tok_s["fermion"],
              "transformers_tok_s": tok_s["transformers"], "ratio": tok_s["fermion"] / tok_s["transformers"],
              "trainer_tok_s": tok_s["trainer"], "trainer_ratio": tok_s["fermion"] / tok_s["trainer"],
              "compiled_tok_s": tok_s.get("transformers_compiled"),
              "mfu": counts.train_flops_per_token * tok_s["fermion"] / peak if peak else None,
              "hf_params": sum(p.numel() for p in hf_eager.parameters()),
              "hf_experts": getattr(hf_eager.config, "_experts_implementation", None) if cfg.moe else None,
              **{f"{side}_mib": bytes_ / 2**20 for side, bytes_ in mem.items()}}
    return result


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def format_rate(tok_s: float | None) -> str:
    return "not run" if tok_s is None else f"{tok_s:,.0f}"


def format_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def format_mib(mib: float | None) -> str:
    return "not run" if mib is None else f"{mib:,.0f}"


def format_params(r: dict) -> str:
    return f"{r['params']:,} ({r['active_params']:,} active)" if r["moe"] else f"{r['params']:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10m,30m", help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--skip-compiled-reference", action="store_true",
                        help="do not also time transformers under torch.compile")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the device's peak FLOP/s at this precision, for MFU (looked up by name on CUDA)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    names = args.sizes.split(",")
    unknown = [name for name in names if name not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {', '.join(unknown)}; known: {', '.join(SIZES)}")
    rows = [bench_size(name, args, device) for name in names]
    mfu_from = ("" if args.peak_flops is None and device.type != "cuda"
                else f", MFU against {args.peak_flops:.3g} FLOP/s given" if args.peak_flops is not None
                else ", MFU against the device's listed peak")
    experts = sorted({str(r["hf_experts"]) for r in rows if r["moe"]})
    moe_note = (f"; MoE rows: 8 experts, top-2, transformers' MixtralForCausalLM (experts implementation "
                f"{', '.join(experts)}), load-balancing loss on at both sides (coefficient 0.01)" if experts else "")
    header = (f"\n### {datetime.date.today()} · {machine(device)}\n\nbatch {args.batch} × seq {args.seq_len}, "
              f"{args.precision} on both sides, median of {args.rounds} rounds of {args.steps} steps{mfu_from}"
              f"{moe_note}. Peak MiB: parameters, buffers and optimizer state plus the highest allocation above "
              f"them during one extra, untimed step ("
              f"{'max_memory_allocated' if device.type == 'cuda' else 'torch.profiler memory events'}).\n\n"
              f"| model | params | fermion (default) tok/s | transformers Trainer tok/s | ratio | "
              f"transformers plain loop tok/s | ratio | transformers loop + torch.compile tok/s | fermion MFU | "
              f"fermion peak MiB | Trainer peak MiB | plain loop peak MiB | loop + compile peak MiB |\n"
              f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['size']} | {format_params(r)} | {r['fermion_tok_s']:,.0f} | {r['trainer_tok_s']:,.0f} | "
             f"**{r['trainer_ratio']:.2f}x** | {r['transformers_tok_s']:,.0f} | {r['ratio']:.2f}x | "
             f"{format_rate(r['compiled_tok_s'])} | {format_mfu(r['mfu'])} | {format_mib(r['fermion_mib'])} | "
             f"{format_mib(r['trainer_mib'])} | {format_mib(r['transformers_mib'])} | "
             f"{format_mib(r.get('transformers_compiled_mib'))} |" for r in rows]
    report = header + "\n".join(lines) + "\n"
    print(report)
    for r in rows:
        assert r["params"] == r["hf_params"], f"{r['size']}: the two models differ in size"
    if not args.no_write:
        with open(RESULTS, "a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
