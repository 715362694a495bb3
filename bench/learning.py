"""What a fixed amount of CPU buys: recipes trained on the same text for the same CPU time, scored on the same
held-out text in bits per byte (the one loss that does not depend on the tokenizer).

Each side is a real process on one thread: fermion's sides run `fermion pretrain` on a recipe written here; the
baseline is a plain PyTorch loop over transformers' LlamaForCausalLM at the hyperparameters nanoGPT documents for
its CPU Shakespeare run (char-level, AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices, 100 warmup
steps, cosine to 1e-4, batch 12 x 64, gradient clipping 1.0), the usual starting point of someone training a small
model on a CPU.

How the time is made equal: every side first runs two short probes (10 and 30 steps: the difference of their CPU
seconds is its cost per step, the rest its fixed costs: imports, model, first step); its run then gets as many steps
as fit the budget of CPU seconds, so that its schedule (warmup, decay) ends where its time does. The runs are
interleaved: they are started together and take turns of a few seconds each (SIGSTOP/SIGCONT), so a change in the
machine's load falls on every side alike. Each side's CPU time is the kernel's count for its process, startup
included.

Held-out text: tinyshakespeare's last 10% (nanoGPT's split), TinyStories' last 5% of whole stories; fermion's
sides mark it as a `validation` source, so neither training nor the tokenizer reads it. Every side is scored the
way `fermion eval --tasks perplexity` scores (eval/perplexity.py: windows of the side's context, overlapping by
half, every byte once), in fp32 after training.

Model sizes (non-embedding parameters equal across sides): tinyshakespeare 4 layers x 128 wide, 4 heads (nanoGPT's
CPU run, ~0.8M); TinyStories 6 x 384, 6 heads (nanoGPT's shakespeare-char shape, ~10.6M). Llama blocks on every
side (SwiGLU at 8/3 of the width, RoPE, RMSNorm, tied embeddings).

    python bench/learning.py --corpus tinyshakespeare --minutes 8
    python bench/learning.py --corpus tinystories --minutes 8 --sides nanogpt,today,default,default-adamw
    python bench/learning.py --corpus tinyshakespeare --minutes 3 --sides today \\
        --side "muon-8e-3=train.optimizer=muon train.lr=8e-3"        # a sweep point: today's recipe, overridden
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO.parent / "shared" / "data" / "pretrain"
CORPORA = {  # path, document separator, share held out, model shape
    "tinyshakespeare": (PRETRAIN / "tinyshakespeare" / "input.txt", None, 0.10,
                        dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=352)),
    "tinystories": (PRETRAIN / "tinystories" / "tinystories_train_sample_2MiB.txt", "<|endoftext|>", 0.05,
                    dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_hidden=1024)),
}
# Fermion's AdamW recipe before the sweep: configs/tinystories-cpu.yaml's tokenizer, context and train section as
# they stood when issue 20 was filed (compile aside: `auto` on every fermion side, see the plan line in the logs).
TODAY = {"tokenizer.vocab_size": 4096, "model.context_length": 512, "train.micro_batch_size": 16,
         "train.optimizer": "adamw", "train.lr": 2e-3, "train.min_lr_ratio": 0.1, "train.schedule": "cosine",
         "train.warmup_steps": 100, "train.weight_decay": 0.1}
# The shipped CPU recipes: the "default" side reads its settings from them (configs/*-cpu.yaml).
RECIPES = {"tinyshakespeare": REPO / "configs" / "tinyshakespeare-cpu.yaml",
           "tinystories": REPO / "configs" / "tinystories-cpu.yaml"}
RECIPE_FIELDS = ("tokenizer.vocab_size", "model.context_length", "train.micro_batch_size", "train.grad_accum",
                 "train.optimizer", "train.lr", "train.muon_lr", "train.min_lr_ratio", "train.schedule",
                 "train.decay_fraction", "train.warmup_steps", "train.weight_decay", "train.betas")
NANOGPT = dict(lr=1e-3, min_lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, warmup=100, batch=12, block=64, clip=1.0)
PROBE_STEPS = 30
SLICE_S = 5.0


def split_corpus(corpus: str, work: Path) -> tuple[Path, Path]:
    """train.txt and val.txt under `work`: the last share of the text (tinyshakespeare, by characters as nanoGPT
    splits it) or of the documents (TinyStories, whole stories joined by blank lines)."""
    path, separator, share, _ = CORPORA[corpus]
    text = path.read_text(encoding="utf-8")
    if separator is None:
        cut = int(len(text) * (1 - share))
        train, val = text[:cut], text[cut:]
    else:
        docs = [doc.strip() for doc in text.split(separator) if doc.strip()]
        cut = int(len(docs) * (1 - share))
        train, val = "\n\n".join(docs[:cut]) + "\n", "\n\n".join(docs[cut:]) + "\n"
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text(train, encoding="utf-8")
    (work / "val.txt").write_text(val, encoding="utf-8")
    return work / "train.txt", work / "val.txt"


# ------------------------------------------------------------------------------------------------ fermion sides

def recipe_settings(path: Path) -> dict:
    """The RECIPE_FIELDS a shipped recipe sets, as dotted overrides."""
    recipe = yaml.safe_load(path.read_text())
    out = {}
    for field in RECIPE_FIELDS:
        section, key = field.split(".")
        if key in (recipe.get(section) or {}):
            out[field] = recipe[section][key]
    return out


def side_settings(name: str, corpus: str, custom: dict[str, dict]) -> dict | None:
    """The overrides of a fermion side (None: the nanoGPT baseline)."""
    if name == "nanogpt":
        return None
    if name == "today":
        return dict(TODAY)
    if name in ("default", "default-adamw"):
        settings = recipe_settings(RECIPES[corpus])
        if name == "default-adamw":
            settings["train.optimizer"] = "adamw"
            settings.pop("train.muon_lr", None)
        return settings
    return {**TODAY, **custom[name]}


def write_recipe(directory: Path, corpus: str, settings: dict, train: Path, val: Path) -> Path:
    shape = CORPORA[corpus][3]
    recipe = {"run": {"name": directory.name, "dir": str(directory / "run"), "seed": 1337},
              "model": {**shape, "tie_embeddings": True},
              "tokenizer": {},
              "data": {"sources": [{"name": "train", "kind": "books", "paths": [str(train)]},
                                   {"name": "val", "kind": "books", "paths": [str(val)], "validation": True}]},
              "train": {"steps": 1, "eval_batches": 4, "log_every": 1, "tensorboard": False, "progress": False,
                        "keep_checkpoints": 1}}
    for field, value in settings.items():
        section, key = field.split(".")
        recipe[section][key] = list(value) if isinstance(value, tuple) else value
    recipe["model"]["vocab_size"] = recipe["tokenizer"].setdefault("vocab_size", 4096)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fermion_command(recipe: Path, settings: dict, steps: int) -> list[str]:
    warmup = settings.get("train.warmup_steps")
    extra = [f"train.warmup_steps={min(warmup, steps)}"] if warmup is not None else []
    sets = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}", *extra]
    return [sys.executable, "-m", "fermion", "pretrain", str(recipe),
            *[arg for item in sets for arg in ("--set", item)]]


def metrics(path: Path) -> list[dict]:
    """The training-step records of a side's metrics.jsonl (fermion's one reader of the file; evals left out)."""
    from fermion.train.logging import read_metrics

    return [record for record in read_metrics(path) if "tokens_per_s" in record]


# ------------------------------------------------------------------------------------------- the nanoGPT baseline

def char_vocab(work: Path) -> list[str]:
    """nanoGPT's shakespeare_char vocabulary: every character of the corpus, sorted."""
    text = (work / "train.txt").read_text(encoding="utf-8") + (work / "val.txt").read_text(encoding="utf-8")
    return sorted(set(text))


def llama(corpus: str, vocab: int, block: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = CORPORA[corpus][3]
    config = LlamaConfig(vocab_size=vocab, hidden_size=shape["d_model"], intermediate_size=shape["ffn_hidden"],
                         num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                         num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=block,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def nanogpt_worker(corpus: str, work: Path, out: Path, steps: int) -> None:
    """nanoGPT's training loop (train.py) for LlamaForCausalLM: random windows of the train text, its lr schedule,
    AdamW with decay on matrices only, clipping; writes metrics.jsonl and the model."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(1337)
    vocab = char_vocab(work)
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in (work / "train.txt").read_text(encoding="utf-8")], dtype=torch.long)
    cfg = NANOGPT
    model = llama(corpus, len(vocab) + 1, cfg["block"])  # + the id that stands before the text when scoring
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=cfg["betas"])

    def lr_at(it: int) -> float:
        if it < cfg["warmup"]:
            return cfg["lr"] * (it + 1) / (cfg["warmup"] + 1)
        ratio = min(1.0, (it - cfg["warmup"]) / max(1, steps - cfg["warmup"]))
        return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg["lr"] - cfg["min_lr"])

    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    elapsed, tokens = 0.0, 0
    for it in range(steps):
        started = time.perf_counter()
        ix = torch.randint(len(data) - cfg["block"], (cfg["batch"],))
        x = torch.stack([data[i:i + cfg["block"]] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + cfg["block"]] for i in ix])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        optimizer.step()
        elapsed += time.perf_counter() - started
        tokens += x.numel()
        log.write(json.dumps({"step": it + 1, "loss": loss.item(), "tokens": tokens, "elapsed_s": elapsed,
                              "tokens_per_s": x.numel() / (time.perf_counter() - started)}) + "\n")
    log.close()
    model.save_pretrained(out / "model")


class CharLM:
    """The nanoGPT-style model as eval/perplexity.py's `text_nll` scores a model: `tokenizer` (encode, eos_id,
    count_bytes), `max_length`, `token_nll`."""

    def __init__(self, model, vocab: list[str], block: int):
        self.model, self.vocab, self.max_length, self.tokenizer = model.eval(), vocab, block, self
        self.index = {ch: i for i, ch in enumerate(vocab)}
        self.eos_id = len(vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index[ch] for ch in text]

    def count_bytes(self, ids) -> int:
        return sum(len(self.vocab[i].encode("utf-8")) for i in ids if i < len(self.vocab))

    def token_nll(self, ids: list[int], first: int) -> float:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            chunk = torch.tensor(ids)[None]
            logits = self.model(input_ids=chunk[:, :-1]).logits[0, first - 1:].float()
            return float(F.cross_entropy(logits, chunk[0, first:], reduction="sum"))


# ----------------------------------------------------------------------------------------------- running sides

def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(side: str, corpus: str, work: Path, settings: dict | None, steps: int) -> list[str]:
    directory = work / side
    if settings is None:
        return [sys.executable, __file__, "--worker", corpus, str(work), str(directory), str(steps)]
    recipe = write_recipe(directory, corpus, settings, work / "train.txt", work / "val.txt")
    from fermion import layout  # a fresh run each time, on the tokenizer and shards already there

    for name in layout.TRAINING_OUTPUTS:
        path = directory / "run" / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return fermion_command(recipe, settings, steps)


def metrics_file(side: str, work: Path, settings: dict | None) -> Path:
    return work / side / ("metrics.jsonl" if settings is None else "run/metrics.jsonl")


def run_alone(cmd: list[str], log: Path) -> float:
    """Run to the end; its CPU seconds."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{cmd[:5]} failed ({proc.returncode}); see {log}")
    return usage.ru_utime + usage.ru_stime


def run_interleaved(cmds: dict[str, list[str]], logs: dict[str, Path]) -> dict[str, float]:
    """Start every command stopped, then let each run SLICE_S seconds in turn until all have ended; their CPU
    seconds."""
    procs, cpu = {}, {}
    for side, cmd in cmds.items():
        procs[side] = subprocess.Popen(cmd, stdout=logs[side].open("w"), stderr=subprocess.STDOUT, env=child_env(),
                                       cwd=REPO, start_new_session=True)
        os.killpg(procs[side].pid, signal.SIGSTOP)
    try:
        while len(cpu) < len(procs):
            for side, proc in procs.items():
                if side in cpu:
                    continue
                os.killpg(proc.pid, signal.SIGCONT)
                deadline = time.monotonic() + SLICE_S
                while time.monotonic() < deadline:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        if proc.returncode:
                            raise SystemExit(f"{side} failed ({proc.returncode}); see {logs[side]}")
                        cpu[side] = usage.ru_utime + usage.ru_stime
                        break
                    time.sleep(0.05)
                else:
                    os.killpg(proc.pid, signal.SIGSTOP)
    finally:
        for side, proc in procs.items():
            if side not in cpu and proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return cpu


def score(side: str, corpus: str, work: Path, settings: dict | None) -> dict:
    """Held-out bits per byte, as eval/perplexity.py counts them, in fp32."""
    import torch

    from fermion.eval.perplexity import text_nll
    from fermion.infer.lm import load

    torch.set_num_threads(1)
    val = (work / "val.txt").read_text(encoding="utf-8")
    if settings is None:
        from transformers import LlamaForCausalLM

        lm = CharLM(LlamaForCausalLM.from_pretrained(work / side / "model"), char_vocab(work), NANOGPT["block"])
        params = sum(p.numel() for p in lm.model.parameters())
        embedding = lm.model.get_input_embeddings().weight.numel()
    else:
        from fermion.model.counting import count

        lm = load(work / side / "run")
        counts = count(lm.model.cfg)
        params, embedding = counts.total_params, counts.embedding_params
    nll, tokens, n_bytes = text_nll(lm, val)
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "val_tokens": tokens, "val_bytes": n_bytes,
            "params": params, "non_embedding_params": params - embedding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="tinyshakespeare")
    parser.add_argument("--minutes", type=float, default=8.0, help="CPU minutes per side")
    parser.add_argument("--sides", default="nanogpt,today,default,default-adamw")
    parser.add_argument("--side", action="append", default=[], metavar="NAME=FIELD=VALUE ...",
                        help="a side of its own: today's recipe with these overrides (space-separated)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fermion-learning"))
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        corpus, work, out, steps = args.worker
        nanogpt_worker(corpus, Path(work), Path(out), int(steps))
        return
    custom = {}
    for spec in args.side:
        name, _, rest = spec.partition("=")
        custom[name] = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in rest.split())}
    sides = [s for s in args.sides.split(",") if s] + list(custom)
    work = args.work / args.corpus
    split_corpus(args.corpus, work)
    settings = {side: side_settings(side, args.corpus, custom) for side in sides}
    budget = args.minutes * 60
    plan = {}
    for side in sides:  # two probes, in CPU seconds (immune to the machine's load): per step, and fixed costs
        (work / side).mkdir(parents=True, exist_ok=True)
        if settings[side] is not None:  # the tokenizer and the shards first, so that the probes time a run's costs
            run_alone(command(side, args.corpus, work, settings[side], 1), work / side / "prepare.log")
        short, long = (run_alone(command(side, args.corpus, work, settings[side], n), work / side / "probe.log")
                       for n in (PROBE_STEPS // 3, PROBE_STEPS))
        per_step = (long - short) / (PROBE_STEPS - PROBE_STEPS // 3)
        fixed = short - per_step * (PROBE_STEPS // 3)
        steps = max(PROBE_STEPS, int((budget - fixed) / per_step))
        plan[side] = {"probe_cpu_s": long, "s_per_step": per_step, "fixed_s": fixed, "steps": steps}
        print(f"{side}: {per_step:.3f} CPU s/step, {fixed:.0f} s fixed -> {steps} steps", flush=True)
    cpu = run_interleaved({side: command(side, args.corpus, work, settings[side], plan[side]["steps"])
                           for side in sides}, {side: work / side / "train.log" for side in sides})
    rows = []
    for side in sides:
        records = metrics(metrics_file(side, work, settings[side]))
        last = records[-1]
        rows.append({"side": side, "settings": settings[side], **plan[side], "cpu_s": cpu[side],
                     "tokens": last["tokens"],
                     "tokens_per_s": last["tokens"] / (cpu[side] - plan[side]["fixed_s"]),
                     "final_train_loss": last["loss"],
                     **score(side, args.corpus, work, settings[side])})
        print(json.dumps(rows[-1]), flush=True)
    print(table(args.corpus, args.minutes, rows))
    if args.out:
        args.out.write_text(json.dumps({"corpus": args.corpus, "minutes": args.minutes, "cpu": cpu_name(),
                                        "rows": rows}, indent=1))


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                    platform.machine())
        info.seek(0)
        bf16 = "avx512_bf16" in info.read()
    return f"{name} ({'with' if bf16 else 'without'} AVX512-BF16)"


def table(corpus: str, minutes: float, rows: list[dict]) -> str:
    base = next((row["bits_per_byte"] for row in rows if row["side"] == "nanogpt"), None)
    lines = [f"{corpus}, {minutes:g} CPU-minutes per side, one thread each, interleaved · {cpu_name()}", "",
             "| side | val bits/byte | vs nanoGPT-style | steps | tokens seen | tokens/s | CPU s | params "
             "(non-embedding) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['bits_per_byte'] / base - 1:+.1%}" if base else "-"
        lines.append(f"| {row['side']} | {row['bits_per_byte']:.3f} | {ratio} | {row['steps']:,} | "
                     f"{row['tokens']:,} | {row['tokens_per_s']:,.0f} | {row['cpu_s']:.0f} | "
                     f"{row['params'] / 1e6:.2f}M ({row['non_embedding_params'] / 1e6:.2f}M) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
