"""Batch-1 decode speed: fermion's KV-cache engine vs transformers' `generate` vs llama.cpp, on the same model.

One fermion model per size (random weights: speed does not depend on what was learned) is exported to a Hugging
Face folder and to GGUF; each contender then greedily generates the same number of tokens after the same prompt,
with end-of-sequence disabled so every run produces exactly `--new-tokens`. Decode tokens/s counts only the tokens
after the first (the prompt's prefill is timed apart), best of `--repeats` runs.

    python bench/decode.py                       # sizes 6m,30m,100m on CPU, appends to bench/RESULTS.md
    python bench/decode.py --device cuda --sizes 125m --compile
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from fermion import checkpoint
from fermion.chat.templates import ChatTemplate
from fermion.config import ModelConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.export.hf import export_hf
from fermion.infer.engine import Engine, SamplingParams, prepare_for_decode
from fermion.infer.quantize import quantize
from fermion.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
SIZES = {
    "6m": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_hidden=704),
    "30m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1408),
    "100m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=2048),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=3072),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fermion_decode(model, tokenizer, prompt, new_tokens, device, compile_) -> tuple[float, list[int]]:
    engine = Engine(model, tokenizer, max_batch=1, compile=compile_)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up (and compilation)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = timed(lambda: (engine.generate([prompt], one), sync()))
    whole = timed(lambda: (engine.generate([prompt], params), sync()))
    tokens = engine.generate([prompt], params)[0].token_ids
    return (new_tokens - 1) / max(whole - first, 1e-9), tokens


def hf_decode(folder, prompt, new_tokens, device, dtype=torch.float32) -> tuple[float, list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=False, pad_token_id=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        first = timed(lambda: (model.generate(ids, max_new_tokens=1, **kwargs), sync()))
        whole = timed(lambda: (model.generate(ids, max_new_tokens=new_tokens, **kwargs), sync()))
        tokens = model.generate(ids, max_new_tokens=new_tokens, **kwargs)[0, len(prompt):].tolist()
    return (new_tokens - 1) / max(whole - first, 1e-9), tokens


def llama_cpp_decode(gguf_path, prompt, new_tokens, threads) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_batch=512,
                verbose=False)

    def run(n):
        llm.reset()
        stream = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        for _ in range(n):
            next(stream)

    run(new_tokens)
    first = timed(lambda: run(1))
    whole = timed(lambda: run(new_tokens))
    return (new_tokens - 1) / max(whole - first, 1e-9)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def fermion_copy(model: Transformer, device: str, dtype: torch.dtype) -> Transformer:
    copy = Transformer(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.to(device=device, dtype=dtype).eval()


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="6m,30m,100m", help=f"random-weight models among {', '.join(SIZES)}")
    parser.add_argument("--checkpoint", help="also a trained run/checkpoint (agreement numbers mean more there)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode path (CUDA)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    text = CORPUS.read_text(encoding="utf-8")
    shared_tokenizer = Tokenizer.train([text], TokenizerConfig(vocab_size=8192))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    models = []
    for size in filter(None, args.sizes.split(",")):
        cfg = ModelConfig(vocab_size=shared_tokenizer.vocab_size, context_length=512, **SIZES[size])
        model = Transformer(cfg)
        model.init_weights(torch.Generator().manual_seed(0))
        models.append((f"{size} (random)", model.eval(), shared_tokenizer))
    if args.checkpoint:
        loaded = checkpoint.load(args.checkpoint)
        model, tokenizer = loaded.model, loaded.tokenizer
        models.append((f"{Path(args.checkpoint).name} (trained)", model, tokenizer))
    rows = []
    for label, model, tokenizer in models:
        prompt = tokenizer.encode(text[:4000])[: min(args.prompt_tokens, model.cfg.context_length // 4)]
        new_tokens = min(args.new_tokens, model.cfg.context_length - len(prompt) - 1)
        params = sum(p.numel() for p in model.parameters())
        r: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf(model, tokenizer, Path(tmp) / "hf", template=ChatTemplate.get("chatml"), dtype="fp32")
            r["hf fp32"], hf_tokens = hf_decode(folder, prompt, new_tokens, args.device)
            r["hf bf16"], _ = hf_decode(folder, prompt, new_tokens, args.device, torch.bfloat16)
            try:
                from fermion.export.gguf import export_gguf

                for kind in ("f32", "q8_0"):
                    path = export_gguf(model, tokenizer, Path(tmp) / "gguf", dtype=kind, name="bench")
                    speed = llama_cpp_decode(path, prompt, new_tokens, threads)
                    if speed:
                        r[f"llama.cpp {kind}"] = speed
            except ImportError:
                pass
        fp32 = prepare_for_decode(fermion_copy(model, args.device, torch.float32))
        r["fp32"], tokens = fermion_decode(fp32, tokenizer, prompt, new_tokens, args.device, False)
        r["agree hf"] = agreement(tokens, hf_tokens)
        if args.compile and args.device == "cuda":
            r["fp32 compiled"], _ = fermion_decode(fp32, tokenizer, prompt, new_tokens, args.device, True)
        r["bf16"], bf16_tokens = fermion_decode(fermion_copy(model, args.device, torch.bfloat16), tokenizer, prompt,
                                                new_tokens, args.device, False)
        r["agree bf16"] = agreement(bf16_tokens, tokens)
        for mode in ("int8", "int4"):
            quantized = quantize(fermion_copy(model, args.device, torch.float32), mode, group_size=64)
            r[mode], q_tokens = fermion_decode(quantized, tokenizer, prompt, new_tokens, args.device, False)
            r[f"agree {mode}"] = agreement(q_tokens, tokens)
        rows.append((label, params, r))
        print(f"{label}: {params / 1e6:.1f}M params · " + " · ".join(
            f"{k} {v:.0%}" if k.startswith("agree") else f"{k} {v:.1f} tok/s" for k, v in r.items()), flush=True)
    if args.no_record:
        return
    lines = [f"\n## Decode, batch 1 ({date.today()}, {device_name}, {threads} threads, torch {torch.__version__})\n",
             f"`python bench/decode.py{' --checkpoint ' + args.checkpoint if args.checkpoint else ''}`: prompt "
             f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens (fewer when the context is shorter), greedy, "
             "end-of-sequence off. Decode tokens/s excludes the prefill. Ratios: fermion fp32 and its quantized "
             "variants against transformers fp32, fermion bf16 against transformers bf16. Agreement: share of "
             "greedy tokens equal to fermion fp32's (first column: transformers fp32 against fermion fp32).\n",
             "| model | params | transformers fp32 | fermion fp32 | transformers bf16 | fermion bf16 | fermion int8 "
             "| fermion int4 (g64) | llama.cpp F32 | llama.cpp Q8_0 | greedy agreement: HF / bf16 / int8 / int4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, params, r in rows:
        hf32, hf16 = r["hf fp32"], r["hf bf16"]
        cpp = [f"{r[k]:.1f}" if k in r else "n/a" for k in ("llama.cpp f32", "llama.cpp q8_0")]
        lines.append(
            f"| {label} | {params / 1e6:.1f}M | {hf32:.1f} | {r['fp32']:.1f} ({r['fp32'] / hf32:.2f}x) | {hf16:.1f} | "
            f"{r['bf16']:.1f} ({r['bf16'] / hf16:.2f}x) | {r['int8']:.1f} ({r['int8'] / hf32:.2f}x) | "
            f"{r['int4']:.1f} ({r['int4'] / hf32:.2f}x) | {cpp[0]} | {cpp[1]} | {r['agree hf']:.0%} / "
            f"{r['agree bf16']:.0%} / {r['agree int8']:.0%} / {r['agree int4']:.0%} |")
    with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
