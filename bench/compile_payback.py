"""When does torch.compile pay for itself in a CPU training run? The measurements behind `train.compile: auto`.

For each model size, fermion's own training step (`Trainer.train_step`, precision auto, the recipe's other defaults)
runs in a fresh process three ways: compiled on an empty inductor cache (the first step includes compiling from
scratch), compiled again on the cache that run left (a warm start: what a later stage or a resumed run pays), and
eager. Each reports its first step and the median of its next steps. From them:

    compile (cold / warm) = first compiled step - a steady compiled step
    speedup               = steady eager step / steady compiled step
    eager FLOP/s          = training FLOPs per step (model/counting.py) / steady eager step

A run gains from compiling when its eager time times (1 - 1/speedup) exceeds the compile time; both scale with the
CPU's speed, so the threshold is kept as FLOPs: train/distributed.py's `compile_decision` compiles on CPU when the
run's training FLOPs times (1 - 1/speedup) exceed the cold compile time times the eager FLOP/s measured here.

    python bench/compile_payback.py                 # every size, appends a table to bench/RESULTS.md
    python bench/compile_payback.py --sizes tiny --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # model shape, micro-batch, sequence length
    "tiny": (dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160,
                  context_length=64), 4, 64),
    "demo": (dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_hidden=704,
                  context_length=256), 16, 256),
    "10m": (dict(vocab_size=8192, d_model=320, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=864,
                 context_length=256), 8, 256),
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def measure(size: str, compile: bool, steps: int) -> dict:
    """In this process: the first step's and the steady steps' seconds of fermion's training step."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import RandomTokens

    from fermion.config import ModelConfig, Recipe, TrainConfig
    from fermion.device import DistInfo
    from fermion.model.counting import count
    from fermion.model.transformer import Transformer
    from fermion.train.objectives import Pretrain
    from fermion.train.trainer import Trainer

    shape, batch, seq = SIZES[size]
    cfg = ModelConfig(**shape)
    recipe = Recipe(model=cfg, train=TrainConfig(steps=10_000, micro_batch_size=batch, warmup_steps=10,
                                                 compile=compile, tensorboard=False, progress=False))
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(recipe, model, Pretrain(torch.ones(cfg.vocab_size, dtype=torch.int32)),
                      RandomTokens(cfg.vocab_size, batch, seq), [], info, Path("unused"))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
    flops = count(cfg, seq).train_flops_per_token * batch * seq
    return {"first": times[0], "steady": statistics.median(times[1:]), "flops_per_step": flops,
            "precision": trainer.precision, "compiled": trainer.compiled}


def in_process(size: str, compile: bool, steps: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, __file__, "--child", size, str(int(compile)), str(steps)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--steps", type=int, default=8, help="steady steps timed after the first")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.child:
        size, compile, steps = args.child
        print(json.dumps(measure(size, bool(int(compile)), int(steps))))
        return
    import torch

    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            cold = in_process(size, True, args.steps, cache)
            warm = in_process(size, True, args.steps, cache)
            eager = in_process(size, False, args.steps, cache)
        speedup = eager["steady"] / cold["steady"]
        eager_flops = eager["flops_per_step"] / eager["steady"]
        compile_cold = cold["first"] - cold["steady"]
        compile_warm = warm["first"] - warm["steady"]
        rows.append((size, SIZES[size][0]["n_layers"], eager["precision"], eager["steady"], cold["steady"], speedup,
                     compile_cold, compile_warm, eager_flops, compile_cold * eager_flops))
        print(rows[-1], flush=True)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    lines = [f"### {datetime.date.today()} · {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             "", f"fermion's training step, median of {args.steps} steady steps after the first; fresh processes",
             "", "| size | layers | precision | eager s/step | compiled s/step | speedup | compile cold s "
             "| compile warm s | eager FLOP/s | cold compile as FLOPs |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, layers, precision, eager_s, compiled_s, speedup, cold_s, warm_s, flops, equiv in rows:
        lines.append(f"| {size} | {layers} | {precision} | {eager_s:.3f} | {compiled_s:.3f} | {speedup:.2f}x | "
                     f"{cold_s:.0f} | {warm_s:.0f} | {flops:.2e} | {equiv:.2e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        text = RESULTS.read_text()
        heading = "## Compile payback (`bench/compile_payback.py`)"
        if heading not in text:
            text += f"\n{heading}\n\nSee the script's docstring for what is measured.\n"
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + table)


if __name__ == "__main__":
    main()
