"""Training throughput: fermion's default training step vs transformers' LlamaForCausalLM, trained by
transformers' `Trainer` and by a plain loop.

All sides get the same architecture, batch, sequence length and precision, and run in this one process. The fermion
side is the real `Trainer.train_step` with the recipe defaults (the loop `fermion pretrain` runs: precision auto,
torch.compile on); the plain-loop side is what a user would write: forward with labels, backward, clip,
`torch.optim.AdamW`, zero_grad, in eager mode, and again with `torch.compile(model)` for reference. These alternate
timed rounds so that machine noise hits them alike. transformers' `Trainer` (its defaults: eager, its default
optimizer, `bf16=True` when the precision is bf16) runs its own loop, so it is timed afterwards in the same process,
from step-end timestamps in rounds of the same length.

    python bench/train_throughput.py                 # CPU sizes, appends to bench/RESULTS.md
    python bench/train_throughput.py --device cuda --sizes 125m,350m --seq-len 1024
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
from fermion.model.counting import count
from fermion.model.transformer import Transformer
from fermion.train.distributed import DistInfo, resolve_precision
from fermion.train.logging import peak_flops
from fermion.train.objectives import Pretrain
from fermion.train.trainer import Trainer

SIZES = {
    "10m": dict(vocab_size=8192, d_model=320, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=864),
    "30m": dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1408),
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=2048),
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, ffn_hidden=2816),
}
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
    return model, lambda: trainer.train_step()


def transformers_step(cfg: ModelConfig, args, device: torch.device, compiled: bool):
    model = transformers.LlamaForCausalLM(hf_config(cfg)).to(device)
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

    return model, step


def hf_config(cfg: ModelConfig) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")


class RandomDataset(torch.utils.data.Dataset):
    """Random token rows in the form transformers' Trainer takes (labels = inputs; the model shifts them)."""

    def __init__(self, vocab: int, seq_len: int, rows: int):
        self.tokens = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def hf_trainer_rate(cfg: ModelConfig, args, device: torch.device) -> float:
    """tokens/s of transformers' Trainer on the same model and batch: the median round after warm-up."""
    import tempfile

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, *_args, **_kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    total = args.warmup + args.rounds * args.steps
    model = transformers.LlamaForCausalLM(hf_config(cfg)).to(device)
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
    ends = clock.ends[args.warmup - 1:]  # the end of warm-up starts the first round
    rounds = [ends[i + args.steps] - ends[i] for i in range(0, args.rounds * args.steps, args.steps)]
    return args.steps * args.batch * args.seq_len / statistics.median(rounds)


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
    hf_model, hf_eager = transformers_step(cfg, args, device, compiled=False)
    steps = {"fermion": fermion_step(cfg, args, device)[1], "transformers": hf_eager}
    if not args.skip_compiled_reference:
        steps["transformers_compiled"] = transformers_step(cfg, args, device, compiled=True)[1]
    for step in steps.values():
        timed(step, args.warmup, device)
    rounds = {side: [] for side in steps}
    for _ in range(args.rounds):  # alternate, so drifts in machine speed hit every side alike
        for side, step in steps.items():
            rounds[side].append(timed(step, args.steps, device))
    tokens = args.steps * args.batch * args.seq_len
    tok_s = {k: tokens / statistics.median(v) for k, v in rounds.items()}
    tok_s["trainer"] = hf_trainer_rate(cfg, args, device)
    counts = count(cfg, args.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {"size": name, "params": counts.total_params, "fermion_tok_s": tok_s["fermion"],
              "transformers_tok_s": tok_s["transformers"], "ratio": tok_s["fermion"] / tok_s["transformers"],
              "trainer_tok_s": tok_s["trainer"], "trainer_ratio": tok_s["fermion"] / tok_s["trainer"],
              "compiled_tok_s": tok_s.get("transformers_compiled"),
              "mfu": counts.train_flops_per_token * tok_s["fermion"] / peak if peak else None,
              "hf_params": sum(p.numel() for p in hf_model.parameters())}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10m,30m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--skip-compiled-reference", action="store_true",
                        help="do not also time transformers under torch.compile")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    rows = [bench_size(name, args, device) for name in args.sizes.split(",")]
    header = (f"\n### {datetime.date.today()} · {machine(device)}\n\nbatch {args.batch} × seq {args.seq_len}, "
              f"{args.precision} on both sides, median of {args.rounds} rounds of {args.steps} steps\n\n"
              f"| model | params | fermion (default) tok/s | transformers Trainer tok/s | ratio | "
              f"transformers plain loop tok/s | ratio | transformers loop + torch.compile tok/s | fermion MFU |\n"
              f"|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['size']} | {r['params']:,} | {r['fermion_tok_s']:,.0f} | {r['trainer_tok_s']:,.0f} | "
             f"**{r['trainer_ratio']:.2f}x** | {r['transformers_tok_s']:,.0f} | {r['ratio']:.2f}x | "
             f"{format_rate(r['compiled_tok_s'])} | {format_mfu(r['mfu'])} |" for r in rows]
    report = header + "\n".join(lines) + "\n"
    print(report)
    for r in rows:
        assert r["params"] == r["hf_params"], f"{r['size']}: the two models differ in size"
    if not args.no_write:
        with open(RESULTS, "a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
