"""Does `fermion rl` learn? A reward the policy can climb, on a model that starts near zero on it.

    python bench/rl_learns.py                       # configs/tiny.yaml pretrained 20 steps, then 12 RL steps
    python bench/rl_learns.py --init runs/demo/sft --verifiers arithmetic=1,tool_call=1 --builtin arithmetic ...

By default the policy is configs/tiny.yaml pretrained for 20 steps (a 119k-parameter model that cannot do
arithmetic) and the reward is `starts_the` below: 1 when the answer to an arithmetic question starts with "the",
which the pretrained model's samples seldom do. RL on 4 prompts x 8 completions per step should raise both the
rollouts' mean reward and the held-out prompts' greedy reward (the stage reports it beside the starting model's).
With --init and --verifiers it runs any RL setting on any model and prints the same table. No timing is measured.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]


def starts_the(completion: str, record: dict) -> float:
    return float(completion.strip().lower().startswith("the"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", help="a run or checkpoint to start from (default: tiny.yaml pretrained 20 steps)")
    parser.add_argument("--verifiers", default="rl_learns:starts_the=1", help="name=weight,...")
    parser.add_argument("--builtin", action="append", default=None, help="builtin prompt sources (arithmetic, "
                                                                          "tinytask); default arithmetic")
    parser.add_argument("--prompts", type=int, default=60, help="prompts per builtin source")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tools", default="", help="comma-separated registered tools (then max_turns 2)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="rl-learns-")))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # rl_learns:starts_the

    from fermion.config import recipe_from_dict
    from fermion.train.rl import rl

    init = args.init
    if init is None:
        init = str(args.out / "tiny")
        subprocess.run([sys.executable, "-m", "fermion", "pretrain", str(REPO / "configs" / "tiny.yaml"), "--set",
                        f"run.dir={init}", "--set", "train.steps=20", "--set", "train.checkpoint_every=20"],
                       cwd=REPO, check=True, capture_output=True)
    tools = [t for t in args.tools.split(",") if t]
    verifiers = {name: float(weight) for name, weight in (item.split("=") for item in args.verifiers.split(","))}
    sources = [{"name": b, "builtin": b, "max_documents": args.prompts, "seed": 3} for b in args.builtin or
               ["arithmetic"]]
    raw = {"run": {"name": "rl-learns", "dir": str(args.out / "run"), "seed": 1337},
           "rl": {"sources": sources, "verifiers": verifiers, "group_size": args.group_size,
                  "prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
                  "val_fraction": 0.2, "tools": tools, "max_turns": 2 if tools else 1,
                  "train": {"init_from": init, "steps": args.steps, "micro_batch_size": args.group_size,
                            "lr": args.lr, "warmup_steps": 1, "compile": False, "eval_every": args.steps,
                            "eval_batches": 2, "log_every": 1, "checkpoint_every": args.steps,
                            "tensorboard": False, "progress": False}}}
    out = io.StringIO()
    result = rl(recipe_from_dict(yaml.safe_load(yaml.safe_dump(raw))), resume="none",
                console=Console(file=out, width=200))
    records = [json.loads(line) for line in (args.out / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    rewards = [round(r["reward"], 3) for r in records if "reward" in r]
    print(f"init {init} · verifiers {verifiers} · {args.steps} steps of {args.prompts_per_step} x {args.group_size}")
    print(f"rollouts' mean reward per step: {rewards}")
    metrics = result.metrics
    print(f"held-out prompts, greedy: reward {metrics['val_reward_start']:.3f} -> {metrics['val_reward']:.3f}; "
          + ", ".join(f"{k.removeprefix('val_')} {metrics[k + '_start']:.3f} -> {metrics[k]:.3f}"
                      for k in metrics if k.startswith("val_reward_") and not k.endswith("_start")))


if __name__ == "__main__":
    main()
