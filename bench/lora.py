"""LoRA against full SFT on the demo's SFT data, and QLoRA's training memory against LoRA's.

Quality: the demo recipe (configs/demo.yaml: 6 layers x 256 wide, 5.5M parameters) is pretrained (or an existing
pretrained run is given with --base), then fine-tuned on the demo's SFT data three ways from the same weights, with
the same steps, batch, schedule and held-out conversations: every weight (the demo's sft.train: lr 2e-3), LoRA and
QLoRA (rank 16, alpha 32, on every projection, lr 1e-2: adapters want a larger step than full fine-tuning, and 1e-2
was the best of 2e-3 to 4e-2 measured; with trainable_tokens: data, the embedding rows of every token the SFT data
holds train too, without which LoRA stays 17% or more above full SFT: bench/RESULTS.md). Each is scored on the same
held-out conversations (the SFT validation split, assistant tokens) at its last step. `--set` changes the adapter
sides' recipe (learning rate, rank, trainable tokens) and `--tag` names such a variation's folders and results;
a side whose folder holds a finished run is read back, not retrained. results.json gathers every side measured.

Memory: one LoRA training step of a ~30M model (12 layers x 512, fp32), with and without the 4-bit base: the bytes
held (weights, buffers, optimizer state) plus the most the step allocates beyond them, measured with the project's
allocation profiler (model/counting.allocation_peak, as tests/test_memory.py) on its second step.

    python bench/lora.py --work /tmp/lora-bench [--base runs/demo] [--pretrain-steps 260] [--sft-steps 120]
        [--sides full,lora,qlora] [--set sft.train.lr=2e-3 --tag lr2e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fermion.config import LoRAConfig, load_recipe, recipe_from_dict  # noqa: E402
from fermion.device import DistInfo  # noqa: E402
from fermion.model import lora  # noqa: E402
from fermion.model.counting import allocation_peak  # noqa: E402
from fermion.model.transformer import Transformer  # noqa: E402
from fermion.train.objectives import Pretrain  # noqa: E402
from fermion.train.qlora import quantize_frozen  # noqa: E402
from fermion.train.trainer import Trainer  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
ADAPTERS = "rank: 16, alpha: 32, trainable_tokens: data"
SIDES = {"full": [], "lora": ["sft.train.lr=1e-2", f"sft.lora={{{ADAPTERS}}}"],
         "qlora": ["sft.train.lr=1e-2", f"sft.lora={{{ADAPTERS}, quantize: int4}}"]}
MEMORY_MODEL = {"vocab_size": 8192, "d_model": 512, "n_layers": 12, "n_heads": 8, "n_kv_heads": 4,
                "ffn_hidden": 1408, "context_length": 256}


def pretrained(work: Path, steps: int) -> Path:
    from fermion.train.pretrain import pretrain

    run = work / "base"
    recipe = load_recipe(DEMO, [f"run.dir={run}", f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                "train.compile=false", f"train.eval_every={steps}"])
    pretrain(recipe)
    return run


def fine_tune(base: Path, work: Path, side: str, steps: int, extra: list[str], tag: str) -> dict:
    from fermion.train.sft import sft

    stage_dir = work / (side + tag)
    overrides = [f"run.dir={base}", f"sft.dir={stage_dir}", "sft.epochs=null", f"sft.train.steps={steps}",
                 f"sft.train.eval_every={steps}", f"sft.train.checkpoint_every={steps}", "sft.train.compile=false",
                 "sft.train.micro_batch_size=8", "sft.train.eval_batches=4", *SIDES[side],
                 *(extra if side != "full" else [])]
    started = time.perf_counter()
    result = sft(load_recipe(DEMO, overrides), resume="none" if not stage_dir.exists() else "auto")
    from fermion import checkpoint

    model = checkpoint.load(stage_dir, merge_adapters=False).model
    trainable = lora.trainable_parameters(model) if lora.adapted(model) else sum(p.numel() for p in model.parameters())
    return {"val_loss": result.val_loss, "trainable": trainable, "total": sum(
        p.numel() for p in checkpoint.load(base).model.parameters()), "seconds": time.perf_counter() - started}


def training_peak(model_cfg: dict, quantize: str, batch: int, seq: int, work: Path) -> int:
    """Bytes held at the peak of a LoRA step: weights and buffers, optimizer state, and the most the second step
    allocates beyond what it started with (the allocation profiler). tests/test_lora.py runs it on a small model."""
    from torch.profiler import ProfilerActivity, profile

    recipe = recipe_from_dict({"run": {"dir": str(work / quantize)}, "model": model_cfg, "train": {
        "steps": 4, "micro_batch_size": batch, "seq_len": seq, "precision": "fp32", "compile": False,
        "progress": False, "tensorboard": False, "device": "cpu", "cross_entropy": "full"}}, check_paths=False)
    model = Transformer.build(recipe.model, "cpu", seed=0)
    lora.add_adapters(model, LoRAConfig(rank=16, alpha=32, quantize=quantize), {"digest": ""})
    if quantize == "int4":
        quantize_frozen(model)
    vocab = recipe.model.vocab_size
    fixed = (torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq)))
    loader = type("Fixed", (), {"next_batch": lambda self: fixed, "state_dict": lambda self: {}})()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(recipe, model.train(), Pretrain(torch.ones(vocab)), loader, [], info, work / "tokenizer.json")
    trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    moments = sum(t.numel() * t.element_size() for state in trainer.optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t))
    return held + moments + allocation_peak(prof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="a pretrained demo run to start from (default: pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=260)
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--sides", default="full,lora,qlora")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the adapter sides (sft.train.lr=2e-3, sft.lora.rank=32)")
    parser.add_argument("--tag", default="", help="appended to each side's folder and result name (a variation)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "load": os.getloadavg(), "torch": torch.__version__}
    saved = args.work / "results.json"
    results = {**(json.loads(saved.read_text()) if saved.is_file() else {}), "machine": machine}
    if not args.skip_memory:
        params = sum(p.numel() for p in Transformer.build(recipe_from_dict(
            {"model": MEMORY_MODEL}, check_paths=False).model).parameters())
        results["memory"] = {"parameters": params, **{q: training_peak(MEMORY_MODEL, q, 1, 256, args.work)
                                                      for q in ("none", "int4")}}
        print(json.dumps(results["memory"]), flush=True)
    base = args.base or pretrained(args.work, args.pretrain_steps)
    for side in args.sides.split(","):
        name = side + args.tag
        results[name] = {**fine_tune(base, args.work, side, args.sft_steps, args.overrides, args.tag),
                         "steps": args.sft_steps, "overrides": SIDES[side] + (args.overrides if side != "full" else []),
                         "load_after": os.getloadavg()}
        print(name, json.dumps(results[name]), flush=True)
        saved.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
