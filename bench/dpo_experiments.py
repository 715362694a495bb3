"""Does DPO learn preferences? Preference accuracy (the share of pairs whose implicit reward ranks the chosen reply
above the rejected one) on the training pairs and on held-out pairs, after DPO on two data sets:

    hh     Anthropic HH helpful-base pairs (../shared/data/preference/hh-rlhf/helpful-base/test.jsonl.gz, a subset)
    math   generated arithmetic pairs (fermion.data.synthetic): the right answer against a plausible wrong one

    python bench/dpo_experiments.py                          # starts from a small TinyStories model it pretrains
    python bench/dpo_experiments.py --init runs/stories-chat/sft

Every run lives under --work (default runs/dpo-bench) and is resumed or reused when run again. The likelihood
ranking of the starting model (does it already give the chosen reply the higher log-probability?) is printed as the
baseline: DPO's rewards start at zero, so its accuracy before training is 0 by definition.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors import safe_open

from fermion import checkpoint, layout
from fermion.config import load_recipe, recipe_from_dict
from fermion.data.synthetic import arithmetic_examples, arithmetic_preferences, write_jsonl
from fermion.train.dpo import dpo, prepare, val_batches
from fermion.train.objectives import DPO
from fermion.train.pretrain import build_model, pretrain
from fermion.train.sft import sft

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
BASE = {  # a small TinyStories model, a few CPU minutes: tiny.yaml made wider, deeper and longer
    "model": {"vocab_size": 2048, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 352,
              "context_length": 256},
    "tokenizer": {"vocab_size": 2048, "train_bytes": 2_000_000},
    "train": {"steps": 400, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "precision": "auto",
              "checkpoint_every": 200, "eval_every": 200, "log_every": 100},
}


def pretrained_base(work: Path, console: Console) -> Path:
    run_dir = work / "base"
    overrides = [f"run.dir={run_dir}", "data.sources.0.max_documents=100000"]
    overrides += [f"{section}.{key}={value}" for section, values in BASE.items() for key, value in values.items()]
    started = time.perf_counter()
    result = pretrain(load_recipe(REPO / "configs" / "tiny.yaml", overrides), console=console)
    console.print(f"base model: {run_dir} · val loss {result.val_loss:.3f} · {time.perf_counter() - started:.0f} s")
    return run_dir


def arithmetic_sft(work: Path, init: Path, n: int, sizes: dict, console: Console) -> Path:
    """SFT on n other problems (seed 1) first, as the DPO paper does when there is no SFT model: the reference
    then knows what an answer looks like."""
    path = write_jsonl(work / "math-sft.jsonl", arithmetic_examples(n, seed=1, **sizes))
    train = {"init_from": str(init), "micro_batch_size": 16, "lr": 2e-3, "warmup_steps": 10, "compile": False,
             "eval_every": 1000, "eval_batches": 4, "checkpoint_every": 1000, "progress": False, "tensorboard": False}
    raw = {"run": {"dir": str(work / "math-sft")},
           "sft": {"sources": [{"name": "arithmetic", "paths": [str(path)]}], "epochs": 1, "val_fraction": 0.02,
                   "train": train}}
    result = sft(recipe_from_dict(raw), console=Console(file=io.StringIO()))
    console.print(f"math: SFT on {n} problems first · assistant-token val loss {result.val_loss:.3f}")
    return work / "math-sft" / "sft"


def dpo_recipe(run_dir: Path, init: Path, source: dict, **settings) -> dict:
    train = {"init_from": str(init), "micro_batch_size": 8, "lr": 1e-4, "warmup_steps": 10, "precision": "auto",
             "compile": False, "eval_every": 1000, "eval_batches": 1000, "checkpoint_every": 100, "log_every": 25,
             "progress": False, "tensorboard": False, **settings.pop("train", {})}
    seed = settings.pop("seed", 1337)
    return {"run": {"name": run_dir.name, "dir": str(run_dir), "seed": seed},
            "dpo": {"sources": [source], "val_fraction": 0.1, **settings, "train": train}}


@torch.no_grad()
def accuracies(raw: dict, console: Console) -> dict:
    """Preference accuracy of the final weights on the training and the held-out pairs, and the starting model's
    likelihood ranking of the same pairs."""
    recipe = recipe_from_dict(raw)
    stage, train, val, _ = prepare(recipe)
    with safe_open(str(layout.reference_cache(stage.recipe.run_dir)), framework="np") as cache:
        ref = {"train": cache.get_tensor("train"), "val": cache.get_tensor("val")}
    model = build_model(stage.recipe, torch.device("cpu"))
    checkpoint.load_weights(checkpoint.find(stage.recipe.run_dir), model)
    model.eval()
    objective = DPO(recipe.dpo.beta, recipe.dpo.loss)
    out = {}
    for name, pairs in (("train", train), ("held-out", val[:len(ref["val"])])):
        scores = ref["train" if name == "train" else "val"]
        batches = val_batches(pairs, 16, stage.tokenizer.pad_id, stage.recipe.seq_len, scores)
        sums = sum(objective.eval_sums(model, batch) for batch in batches)
        metrics = objective.summarise(sums)
        out[name] = {"pairs": len(pairs), "accuracy": metrics["val_accuracy"], "margin": metrics["val_margin"],
                     "reference ranks chosen higher": float(np.mean(scores[:, 0] > scores[:, 1])),
                     "chosen nll": metrics["val_chosen_nll"], "chosen nll start": metrics["val_chosen_nll_start"]}
    return out


def run(name: str, raw: dict, console: Console) -> None:
    started = time.perf_counter()
    log = io.StringIO()
    result = dpo(recipe_from_dict(raw), console=Console(file=log, width=160))
    seconds = time.perf_counter() - started
    report = [line for line in log.getvalue().splitlines() if line.startswith(("dpo", "  skipped", "plan"))]
    for line in report:
        console.print(f"  {line}", markup=False, highlight=False)
    for split_name, numbers in accuracies(raw, console).items():
        console.print(f"  {name} {split_name}: {numbers['pairs']} pairs · preference accuracy "
                      f"{100 * numbers['accuracy']:.1f}% · margin {numbers['margin']:.3f} · starting model's "
                      f"likelihood prefers chosen {100 * numbers['reference ranks chosen higher']:.1f}% · SFT loss "
                      f"on chosen replies {numbers['chosen nll start']:.3f} -> {numbers['chosen nll']:.3f} "
                      "nats/token")
    console.print(f"  {name}: {result.step} steps · {seconds:.0f} s (includes reference scoring when not cached)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, help="a fermion run or checkpoint to start from (default: pretrain one)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "dpo-bench")
    parser.add_argument("--hh-records", type=int, default=600)
    parser.add_argument("--hh-epochs", type=float, default=4)
    parser.add_argument("--hh-lr", type=float, default=5e-4)
    parser.add_argument("--math-pairs", type=int, default=3000)
    parser.add_argument("--math-epochs", type=float, default=3)
    parser.add_argument("--math-max-operand", type=int, default=99)
    parser.add_argument("--math-max-factor", type=int, default=12)
    parser.add_argument("--math-lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337, help="run.seed: the train/held-out split and batch order")
    parser.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid")
    parser.add_argument("--math-sft", type=int, default=0, help="SFT on this many other problems before DPO")
    parser.add_argument("--sft-weight", type=float, default=0.0, help="dpo.sft_weight (RPO); runs go to *-rpo dirs")
    parser.add_argument("--only", choices=["hh", "math"])
    parser.add_argument("--threads", type=int, help="torch threads (1 when another process shares the cores: "
                        "oversubscribed cores run ten times slower)")
    args = parser.parse_args()
    console = Console(highlight=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    init = args.init or pretrained_base(args.work, console)
    console.print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; starting from {init}")
    if args.only in (None, "hh"):
        source = {"name": "hh-helpful", "paths": [str(HH)], "max_documents": args.hh_records}
        suffix = "-rpo" if args.sft_weight else ""
        raw = dpo_recipe(args.work / f"hh{suffix}", init, source, epochs=args.hh_epochs, train={"lr": args.hh_lr},
                         sft_weight=args.sft_weight)
        console.print(f"hh: DPO on the first {args.hh_records} HH helpful-base records, {args.hh_epochs} epochs, "
                      f"lr {args.hh_lr}")
        run("hh", raw, console)
    if args.only in (None, "math"):
        sizes = {"max_operand": args.math_max_operand, "max_factor": args.math_max_factor}
        start = init
        if args.math_sft:
            start = arithmetic_sft(args.work, init, args.math_sft, sizes, console)
        path = write_jsonl(args.work / "math.jsonl", arithmetic_preferences(args.math_pairs, seed=0, **sizes))
        name = ("math-rpo" if args.sft_weight else "math") + (f"-lr{args.math_lr:g}" if args.math_lr != 1e-3 else "")
        name += f"-beta{args.beta:g}" if args.beta != 0.1 else ""
        name += f"-{args.loss}" if args.loss != "sigmoid" else ""
        name += f"-ep{args.math_epochs:g}" if args.math_epochs != 3 else ""
        name += f"-seed{args.seed}" if args.seed != 1337 else ""
        raw = dpo_recipe(args.work / name, start, {"name": "arithmetic", "paths": [str(path)]},
                         epochs=args.math_epochs, train={"micro_batch_size": 32, "lr": args.math_lr},
                         sft_weight=args.sft_weight, beta=args.beta, loss=args.loss, seed=args.seed)
        console.print(f"math: DPO on {args.math_pairs} generated arithmetic pairs ({sizes})")
        run("math", raw, console)


if __name__ == "__main__":
    main()
