"""Can a few minutes of SFT on tinytask's own data teach a small chat model to call tools, and what does
grammar-constrained decoding add? tinytask before and after SFT, each with and without the constraint.

    OMP_NUM_THREADS=2 python bench/tinytask_sft.py runs/stories-chat/sft --out runs/tinytask-sft

The defaults (4,000 conversations, 4 epochs, lr 2e-3) are what it took the 6.5M-parameter stories-chat model to
learn to copy arguments; with 2 epochs at lr 1e-3 it learned the format and the tool names but almost no values.

The SFT data comes from tinytask's training stream, which holds no evaluated call (see data/synthetic/tinytask.py).
Training is fermion's own SFT stage, started from the given run, with the chatml template the model was post-trained
with.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from fermion import checkpoint
from fermion.config import recipe_from_dict
from fermion.data.synthetic import tinytask as tinytask_data
from fermion.data.synthetic import write_jsonl
from fermion.eval import tinytask
from fermion.eval.results import TaskOptions, TaskResult
from fermion.infer.lm import load
from fermion.train.sft import sft


def evaluate(path: str | Path, limit: int, console: Console) -> list[tuple[str, TaskResult, float]]:
    """(label, result, seconds) for tinytask without and with the grammar."""
    lm = load(path, chat=True)
    rows = []
    for constrained in (False, True):
        start = time.perf_counter()
        result = tinytask.run(lm, TaskOptions(data_dir=Path("."), limit=limit), constrained=constrained)
        seconds = time.perf_counter() - start
        rows.append(("constrained" if constrained else "free", result, seconds))
        console.print(f"{path} {rows[-1][0]}: " + ", ".join(f"{m.name} {m.value:.3f}" for m in result.metrics)
                      + f" ({seconds:.0f} s)")
    return rows


def sft_recipe(init: str, data: Path, out: Path, args: argparse.Namespace):
    """The starting run's recipe with an SFT section over `data`, its stage directory at out/sft."""
    raw = checkpoint.load_recipe_of(checkpoint.find(init)).model_dump(mode="json")
    raw.update(data=None, dpo=None, run={"name": "tinytask", "dir": str(out), "seed": args.seed})
    raw["sft"] = {"sources": [{"name": "tinytask", "paths": [str(data)]}], "dir": str(out / "sft"),
                  "val_fraction": 0.02, "epochs": args.epochs,
                  "train": {"init_from": init, "lr": args.lr, "micro_batch_size": args.batch, "warmup_steps": 10,
                            "min_lr_ratio": 0.1, "eval_every": 1000, "eval_batches": 4, "log_every": 10,
                            "checkpoint_every": 1000, "keep_checkpoints": 1, "compile": args.compile,
                            "progress": False, "tensorboard": False}}
    return recipe_from_dict(raw, source="bench/tinytask_sft.py")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def table(rows: list[tuple[str, TaskResult, float]]) -> str:
    lines = ["| model | decoding | valid_json | schema | exact | eval time |", "|---|---|---:|---:|---:|---:|"]
    for label, result, seconds in rows:
        values = " | ".join(f"{result.metric(name).value:.3f} ± {result.metric(name).stderr or 0:.3f}"
                            for name in ("valid_json", "schema", "exact"))
        lines.append(f"| {label} | {values} | {seconds:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("init", nargs="?", default="runs/stories-chat/sft", help="the chat model to start from")
    parser.add_argument("--out", default="runs/tinytask-sft", help="where the SFT data and run go")
    parser.add_argument("--records", type=int, default=4000, help="SFT conversations to write")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=8, help="packed rows per step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the SFT loss")
    parser.add_argument("--limit", type=int, default=tinytask.DEFAULT_PROBLEMS, help="problems to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console, out = Console(), Path(args.out)
    console.print(f"machine: {machine()}")
    rows = [(f"before ({args.init}) | {how}", result, seconds)
            for how, result, seconds in evaluate(args.init, args.limit, console)]
    data = write_jsonl(out / "tinytask_sft.jsonl", tinytask_data.sft_records(args.records, args.seed))
    start = time.perf_counter()
    sft(sft_recipe(args.init, data, out, args), resume="none", console=console)
    train_seconds = time.perf_counter() - start
    rows += [(f"after SFT | {how}", result, seconds) for how, result, seconds in evaluate(out / "sft", args.limit,
                                                                                            console)]
    console.print(f"\nSFT: {args.records} records, {args.epochs:g} epoch(s), lr {args.lr:g}, "
                  f"{train_seconds:.0f} s wall-clock; {args.limit} problems\n")
    print(table(rows))  # plain, so that no line is wrapped


if __name__ == "__main__":
    main()
