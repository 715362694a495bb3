"""What an SFT step costs, and how full its rows are: the measurements behind best-fit packing (train/sft.pack) and
the output layer at targets only (objectives.target_nll's only_targets).

Reads a run's recipe and its trained tokenizer (the demo's: `fermion demo` first, or any run with an sft section),
tokenizes the SFT conversations as `fermion sft` does, then:
- packing: rows per epoch and the share of row positions that hold a conversation, filling rows in the shuffled
  order (how fermion packed before) and best-fit decreasing (how it packs now);
- the step: forward + backward + AdamW on `--rows` best-fit rows of the context length, in the CPU's precision
  (bf16 autocast where it has native bf16), eager or compiled, with the output layer at every position and at the
  targets only, interleaved (`--rounds` rounds of `--steps` timed steps after `--warmup`), the median per side.

    python bench/sft_step.py runs/demo/recipe.yaml
    python bench/sft_step.py runs/demo/recipe.yaml --compile --rows 8 --steps 10
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fermion.config import load_recipe  # noqa: E402
from fermion.device import resolve_precision  # noqa: E402
from fermion.model.transformer import Transformer  # noqa: E402
from fermion.train import sft  # noqa: E402
from fermion.train.objectives import SFT  # noqa: E402


def in_order_rows(examples: list, seq_len: int) -> int:
    rows, used = 0, seq_len
    for example in examples:
        if used + len(example.targets) > seq_len:
            rows, used = rows + 1, 0
        used += len(example.targets)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--rows", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compiling, when --compile)")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, [])
    _, train, _, _ = sft.prepare(recipe)
    seq_len = recipe.model.context_length
    tokens = sum(len(e.targets) for e in train)
    order = list(train)
    random.Random(0).shuffle(order)
    greedy, best = in_order_rows(order, seq_len), sft.pack(order, seq_len, random.Random(0))
    learned = sum(int((e.targets != sft.IGNORE_INDEX).sum()) for e in train)
    print(f"{platform.processor() or platform.machine()} · torch {torch.__version__} · {torch.get_num_threads()} "
          f"threads · {len(train):,} conversations, {tokens:,} tokens ({learned / tokens:.0%} of them learned) · "
          f"rows of {seq_len}")
    print(f"packing in order: {greedy:,} rows an epoch, {tokens / (greedy * seq_len):.1%} full")
    print(f"packing best-fit: {len(best):,} rows an epoch, {tokens / (len(best) * seq_len):.1%} full")

    precision = resolve_precision("auto", torch.device("cpu"))
    need = args.rows * (args.warmup + args.steps * args.rounds)
    batches = [sft.collate_packed(best[i % len(best):i % len(best) + args.rows], seq_len, 0)
               for i in range(0, need, args.rows)]
    sides = {}
    for only in (False, True):
        model = Transformer(recipe.model).train()
        objective = SFT(torch.ones(recipe.model.vocab_size, dtype=torch.long))
        objective.only_targets = only
        loss_fn = torch.compile(objective.loss) if args.compile else objective.loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sides["targets only" if only else "every position"] = (model, loss_fn, optimizer)

    def step(side, batch) -> float:
        model, loss_fn, optimizer = side
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for side in sides.values():
        for batch in batches[:args.warmup]:
            step(side, batch)
    times = {name: [] for name in sides}
    timed = batches[args.warmup:]
    for r in range(args.rounds):
        for name, side in sides.items():
            times[name] += [step(side, b) for b in timed[r * args.steps:(r + 1) * args.steps]]
    mode = "compiled" if args.compile else "eager"
    base = statistics.median(times["every position"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"step, {args.rows} x {seq_len}, {precision}, {mode}, output layer at {name}: {median:.3f} s "
              f"({base / median:.2f}x)")


if __name__ == "__main__":
    main()
