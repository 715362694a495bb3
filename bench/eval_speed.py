"""How long `fermion eval` takes on the multiple-choice tasks for a ~10M-parameter model on this machine.

The model is randomly initialised (speed does not depend on what it learned) with the shape of a small from-scratch
run: 8,192-token vocabulary from runs/stories-chat (or a fresh one trained on TinyStories text), 512 context. Each
task scores its first --limit examples (200 by default); the time per task and the total are printed as a markdown
table, with the machine, for bench/RESULTS.md.

    python bench/eval_speed.py [--limit 200] [--data ../shared/data/eval] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from fermion.config import ModelConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.eval import multiple_choice
from fermion.eval.results import TaskOptions
from fermion.infer.engine import prepare_for_decode
from fermion.infer.lm import EvalModel
from fermion.model.counting import count
from fermion.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "data" / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"


def tokenizer() -> Tokenizer:
    trained = REPO / "runs" / "stories-chat" / "tokenizer.json"
    if trained.is_file():
        return Tokenizer.load(trained)
    return Tokenizer.train([STORIES.read_text(encoding="utf-8")], TokenizerConfig(vocab_size=8192))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "eval")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    tok = tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=320, n_layers=6, n_heads=5, n_kv_heads=5, ffn_hidden=864,
                      context_length=512, tie_embeddings=True)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model.reset_rope()
    lm = EvalModel(prepare_for_decode(model.eval()), tok)
    params = count(cfg, cfg.context_length).total_params
    print(f"{params / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, context {cfg.context_length}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| task | examples | requests | seconds |\n|---|---:|---:|---:|")
    total = 0.0
    for name, bench in multiple_choice.BENCHMARKS.items():
        options = TaskOptions(data_dir=args.data, limit=args.limit)
        started = time.perf_counter()
        result = multiple_choice.evaluate(lm, bench, options)
        seconds = time.perf_counter() - started
        total += seconds
        requests = sum(len(s["logprobs"]) for s in result.samples)
        print(f"| {name} | {result.n} | {requests} | {seconds:.1f} |")
    print(f"| **all five** | | | **{total:.1f}** |")


if __name__ == "__main__":
    main()
