"""Decode speed of fermion's quantized paths against its fp32 path on two CPU kinds, and what quantization costs in
held-out perplexity; llama.cpp at equal precision beside it when llama-cpp-python is installed.

Each model size (random weights: speed does not depend on what was learned) decodes in fp32 (the layout
`prepare_for_decode` gives, what `fermion generate --dtype fp32` runs), int8 and int4 (`infer/quantize.py`, default
group size): `--batch` sequences at once greedily generate `--new-tokens` tokens after the same prompt, end of
sequence off. Decode tokens/s counts the tokens after the prefill (a one-token run is timed apart and subtracted).
The three take turns within each of `--repeats` rounds, so a shared machine's load falls on all of them alike; the
table gives medians, and each ratio is the median of the rounds' ratios.

Each CPU kind runs in its own process: this CPU as it is and, unless --no-avx2, the same CPU imitating one without
AVX512 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`: PyTorch's kernels take their AVX2 builds and bf16 is not
native, so `precision: auto` would run fp32 there).

With --checkpoint RUN --heldout FILE, the held-out token perplexity of that trained model in fp32, int8 and int4,
through the project's scorer (eval/perplexity.py, the one `fermion eval --tasks perplexity=FILE --quant` runs).

    python bench/decode.py                                   # 30m and 125m, batch 1 and 8, both CPU kinds
    python bench/decode.py --checkpoint runs/x --heldout val.txt --sizes tiny,30m,125m
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
SIZES = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=352),  # issue 22's report: d_model 96-128
    "30m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1408),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=3072),
}
MODES = ("fp32", "int8", "int4")
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
LLAMA_CPP = {"fp32": "f32", "int8": "q8_0", "int4": "q4_k_m"}  # GGUF type of equal precision


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


# ------------------------------------------------------------------------------------------ one CPU kind (a child)


def variant(model, mode: str):
    from fermion.infer.engine import prepare_for_decode
    from fermion.infer.quantize import quantize

    twin = copy.deepcopy(model)
    return prepare_for_decode(twin) if mode == "fp32" else quantize(twin, mode)


def decode_speed(engine, prompt: list[int], batch: int, new_tokens: int) -> float:
    from fermion.infer.engine import SamplingParams

    prompts = [prompt] * batch
    one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prefill = timed(lambda: engine.generate(prompts, one))
    whole = timed(lambda: engine.generate(prompts, full))
    return batch * (new_tokens - 1) / max(whole - prefill, 1e-9)


def speed_rows(args, tokenizer, prompt) -> list[dict]:
    import torch

    from fermion.config import ModelConfig
    from fermion.infer.engine import Engine
    from fermion.infer.quantize import quantized_bytes
    from fermion.model.transformer import Transformer

    rows = []
    for size in args.sizes.split(","):
        model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=512, **SIZES[size]))
        model.init_weights(torch.Generator().manual_seed(0))
        variants = {mode: variant(model.eval(), mode) for mode in MODES}
        megabytes = {mode: quantized_bytes(m) / 1e6 for mode, m in variants.items()}
        for batch in map(int, args.batch.split(",")):
            engines = {mode: Engine(m, tokenizer, max_batch=batch) for mode, m in variants.items()}
            for engine in engines.values():  # warm-up
                decode_speed(engine, prompt, batch, 4)
            speeds = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode, engine in engines.items():
                    speeds[mode].append(decode_speed(engine, prompt, batch, args.new_tokens))
            row = {"size": size, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
                   "megabytes": megabytes, "tok_s": {m: statistics.median(v) for m, v in speeds.items()},
                   "ratio": {m: statistics.median(a / b for a, b in zip(v, speeds["fp32"], strict=True))
                             for m, v in speeds.items()}}
            if batch == 1 and args.llama_cpp:
                row["llama_cpp"] = llama_cpp_speeds(model, tokenizer, prompt, args.new_tokens)
            rows.append(row)
            print(f"  {size} batch {batch}: " + " · ".join(f"{m} {row['tok_s'][m]:.1f} tok/s ({row['ratio'][m]:.2f}x)"
                                                          for m in MODES), file=sys.stderr, flush=True)
    return rows


def llama_cpp_speeds(model, tokenizer, prompt, new_tokens) -> dict[str, float]:
    """Batch-1 tokens/s of llama.cpp on GGUF exports of the same model, at each precision the exporter offers."""
    from llama_cpp import Llama

    from fermion.errors import ExportError
    from fermion.export.gguf import export_gguf

    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, kind in LLAMA_CPP.items():
            try:
                path = export_gguf(model, tokenizer, Path(tmp) / kind, dtype=kind, name="bench")
            except (ExportError, ValueError):
                continue  # an exporter without this type
            llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=_threads(), verbose=False)
            speeds[mode] = statistics.median(llama_cpp_speed(llm, prompt, new_tokens) for _ in range(3))
    return speeds


def llama_cpp_speed(llm, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one greedy run: the clock starts once the first token (which pays the prefill) is out."""
    llm.reset()
    stream = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
    next(stream)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(stream)
    return (new_tokens - 1) / (time.perf_counter() - start)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def heldout_perplexity(checkpoint: str, heldout: str, windows: int | None) -> dict[str, float]:
    from fermion.eval.perplexity import perplexity
    from fermion.infer import lm

    out = {}
    for mode in MODES:
        model = lm.load(checkpoint, dtype="fp32", quant="none" if mode == "fp32" else mode)
        result = perplexity(model, Path(heldout), limit_windows=windows)
        out[mode] = next(m.value for m in result.metrics if m.name == "token_perplexity")
        print(f"  perplexity {mode}: {out[mode]:.4f}", file=sys.stderr, flush=True)
    return out


def child(args) -> None:
    import torch

    from fermion.config import TokenizerConfig
    from fermion.data.tokenizer import Tokenizer
    from fermion.infer.quantize import cpu_plan

    torch.set_num_threads(args.threads)
    text = CORPUS.read_text(encoding="utf-8")
    tokenizer = Tokenizer.train([text], TokenizerConfig(vocab_size=8192))
    prompt = tokenizer.encode(text[:4000])[: args.prompt_tokens]
    try:
        import llama_cpp  # noqa: F401

        args.llama_cpp = args.kind == "native"  # llama.cpp picks its own kernels: one CPU kind is enough
    except ImportError:
        args.llama_cpp = False
    result = {"kind": args.kind, "plan": cpu_plan(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_before": os.getloadavg(), "rows": speed_rows(args, tokenizer, prompt),
              "llama_cpp_installed": args.llama_cpp or args.kind != "native"}
    if args.checkpoint:
        result["perplexity"] = heldout_perplexity(args.checkpoint, args.heldout, args.windows)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------- the parent


def markdown(results: list[dict], args) -> str:
    when = date.today()
    lines = [f"\n## Quantized decode (`bench/decode.py`, {when}, {cpu_name()}, {results[0]['threads']} thread(s), "
             f"torch {results[0]['torch']})\n",
             f"`python bench/decode.py {' '.join(args.argv)}`: prompt {args.prompt_tokens} tokens, "
             f"{args.new_tokens} new tokens a sequence, greedy, end-of-sequence off, random-weight models (vocabulary "
             f"8,192, context 512), int4 at the default group size 128. Decode tokens/s excludes the prefill; medians "
             f"of {args.repeats} interleaved rounds, ratios to fp32 the median of the rounds' ratios. Weights: MB as "
             "stored (fp32 / int8 / int4, the float embedding table included).\n"]
    for result in results:
        plan = result["plan"]
        kind = ("this CPU as it is" if result["kind"] == "native" else
                "the same CPU imitating one without AVX512 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`)")
        lines += [f"**{kind}**: capability {plan['capability']}, native bf16 {plan['native_bf16']} (kernels take "
                  f"{plan['kernel']}, prefill matmuls {plan['prefill']}); load average "
                  f"{result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f} after (2 cores).\n",
                  "| model | params | weights MB | batch | fp32 tok/s | int8 tok/s | int4 tok/s "
                  "| llama.cpp F32 / Q8_0 / Q4_K_M tok/s (fermion ÷ llama.cpp) |", "|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            t, r, mb = row["tok_s"], row["ratio"], row["megabytes"]
            cpp = row.get("llama_cpp")
            cpp_cell = " / ".join(f"{cpp[m]:.1f} ({t[m] / cpp[m]:.2f}x)" if m in cpp else "–" for m in MODES) if cpp \
                else ("not installed" if not result["llama_cpp_installed"] else "–")
            lines.append(f"| {row['size']} | {row['params'] / 1e6:.1f}M | {mb['fp32']:.0f} / {mb['int8']:.0f} / "
                         f"{mb['int4']:.0f} | {row['batch']} | {t['fp32']:.1f} | {t['int8']:.1f} ({r['int8']:.2f}x) | "
                         f"{t['int4']:.1f} ({r['int4']:.2f}x) | {cpp_cell} |")
        lines.append("")
    with_ppl = [r for r in results if "perplexity" in r]
    if with_ppl:
        lines += [f"Held-out token perplexity of `{args.checkpoint}` on `{args.heldout}` (eval/perplexity.py"
                  + (f", first {args.windows} windows" if args.windows else "") + "):\n",
                  "| CPU kind | fp32 | int8 | int4 |", "|---|---|---|---|"]
        for result in with_ppl:
            p = result["perplexity"]
            lines.append(f"| {result['plan']['capability']} | {p['fp32']:.4f} | {p['int8']:.4f} "
                         f"({p['int8'] / p['fp32'] - 1:+.2%}) | {p['int4']:.4f} ({p['int4'] / p['fp32'] - 1:+.2%}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="30m,125m", help=f"random-weight models among {', '.join(SIZES)}")
    parser.add_argument("--batch", default="1,8", help="batch sizes (sequences decoded together)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: what one core gives)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", help="a trained run or checkpoint for the perplexity table")
    parser.add_argument("--heldout", help="held-out text for the perplexity table")
    parser.add_argument("--windows", type=int, help="score only the first N context windows of --heldout")
    parser.add_argument("--no-avx2", action="store_true", help="skip the imitated CPU without AVX512")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--kind", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.heldout):
        parser.error("--checkpoint and --heldout go together")
    if args.kind:
        child(args)
        return
    args.argv = sys.argv[1:]
    results = []
    for kind in ("native",) + (() if args.no_avx2 else ("avx2",)):
        print(f"{kind}:", file=sys.stderr, flush=True)
        env = {**os.environ, **(AVX2 if kind == "avx2" else {})}
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--kind", kind], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = markdown(results, args)
    print(table)
    if not args.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    main()
