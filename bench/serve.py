"""Serving throughput under concurrent load: `fermion serve` (continuous batching) vs `transformers serve`.

One random-weight fermion model (a size from bench/decode.py; speed does not depend on what was learned) is
exported to a Hugging Face folder (fp32), and each server is started on it as a subprocess. The load generator is
the official `openai` client (AsyncOpenAI) in this process: for each concurrency c, c workers send streaming
/v1/completions requests back to back (the same short prompt, greedy, `--tokens` new tokens, end-of-sequence off
where the server lets us) until `--requests` have finished. Per level it reports the aggregate completion tokens/s
(tokens generated, as the server's `usage` counts them, over the level's wall time), the mean time to first token,
the mean per-stream decode rate (tokens after the first over the time after the first), and for fermion the mean
number of sequences per decode step (from /health). The headline is aggregate(c=8) / aggregate(c=1).

Peers: `fermion` (`fermion serve --max-batch 16`), `transformers` (`transformers serve`, one request at a time),
`transformers-cb` (`transformers serve --continuous-batching`, paged attention). Both transformers servers are
told to stay offline (HF_HUB_OFFLINE=1) and load only the local folder.

    python bench/serve.py                                     # 30m, c = 1,2,4,8,16, all peers, appends RESULTS.md
    python bench/serve.py --size 6m --tokens 32 --concurrency 1,8 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from fermion.chat.templates import ChatTemplate
from fermion.config import ModelConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.export.hf import export_hf
from fermion.model.transformer import Transformer

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "decode.py")
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)
SIZES, CORPUS, REPO, cpu_name = decode.SIZES, decode.CORPUS, decode.REPO, decode.cpu_name

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
PEERS = ("fermion", "transformers", "transformers-cb")
MODEL_NAME = "bench"  # fermion's --model-name; transformers serve wants the folder path itself


# ------------------------------------------------------------------------------------------------- the model


def build_folder(size: str, context: int, out: Path) -> tuple[Path, int]:
    """A random-weight model of `size` with a TinyStories tokenizer, exported (fp32) to out/hf."""
    tokenizer = Tokenizer.train([CORPUS.read_text(encoding="utf-8")], TokenizerConfig(vocab_size=8192))
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=context, **SIZES[size])
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    folder = export_hf(model.eval(), tokenizer, out / "hf", template=ChatTemplate.get("chatml"), dtype="fp32")
    return Path(folder), params


# ------------------------------------------------------------------------------------------------ the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_cli() -> list[str]:
    script = Path(sys.executable).with_name("transformers")
    if script.is_file():
        return [str(script)]
    found = shutil.which("transformers")
    if found:
        return [found]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]


@dataclass
class Server:
    peer: str
    folder: Path
    threads: int
    max_batch: int
    log_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def model(self) -> str:
        return MODEL_NAME if self.peer == "fermion" else str(self.folder)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.peer}.log"

    def command(self) -> list[str]:
        if self.peer == "fermion":
            return [sys.executable, "-m", "fermion", "serve", str(self.folder), "--host", "127.0.0.1",
                    "--port", str(self.port), "--dtype", "fp32", "--max-batch", str(self.max_batch),
                    "--model-name", MODEL_NAME]
        cmd = [*transformers_cli(), "serve", str(self.folder), "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        return cmd + ["--continuous-batching"] if self.peer == "transformers-cb" else cmd

    def start(self, timeout: float = 600.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer} exited with {self.proc.returncode} before it was ready:\n"
                                   + self.tail())
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.peer} was not ready after {timeout:.0f} s:\n" + self.tail())

    def health(self) -> dict:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def cpu_seconds(self) -> float | None:
        """The server process's CPU time so far (Linux /proc), to see how busy it kept the machine."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # its own session (start_new_session): the server and its children only
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# -------------------------------------------------------------------------------------------------- the load


@dataclass
class Sample:
    latency: float  # request sent -> stream closed
    ttft: float  # request sent -> first text
    tokens: int  # completion tokens (the server's usage, else the text chunks)
    text: str = ""


@dataclass
class Level:
    concurrency: int
    requests: int
    wall: float
    samples: list[Sample]
    per_step: float | None = None  # mean sequences per decode step (fermion's /health)
    server_cpu: float | None = None  # server CPU seconds / wall seconds (2.0 = two cores busy)
    client_cpu: float | None = None  # the same for this process (the openai clients)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall

    @property
    def ttft(self) -> float:
        return sum(s.ttft for s in self.samples) / len(self.samples)

    @property
    def stream_rate(self) -> float:
        rates = [(s.tokens - 1) / (s.latency - s.ttft) for s in self.samples if s.tokens > 1 and s.latency > s.ttft]
        return sum(rates) / len(rates) if rates else float("nan")

    @property
    def mean_tokens(self) -> float:
        return self.tokens / len(self.samples)


def request_body(peer: str, tokens: int) -> dict:
    """The create() extras: vLLM's ignore_eos for fermion; transformers serve refuses unknown fields, so there
    min_new_tokens in its `generation_config` JSON keeps end-of-sequence away (max_tokens still sets the length)."""
    if peer == "fermion":
        return {"stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    config = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    return {"extra_body": {"generation_config": json.dumps(config)}}


async def one_request(client, server: Server, tokens: int) -> Sample:
    start = time.perf_counter()
    first, chunks, used, text = None, 0, None, []
    stream = await client.completions.create(model=server.model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                             stream=True, **request_body(server.peer, tokens))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            text.append(chunk.choices[0].text)
            if first is None:
                first = time.perf_counter()
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Sample(end - start, (first or end) - start, used if used is not None else chunks, "".join(text))


async def run_level(server: Server, concurrency: int, requests: int, tokens: int) -> Level:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600,
                           http_client=httpx.AsyncClient(limits=limits, timeout=600)) as client:
        samples: list[Sample] = []
        left = [requests]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                samples.append(await one_request(client, server, tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Level(concurrency, requests, wall, samples)


def bench_peer(server: Server, levels: list[int], requests: int | None, tokens: int) -> tuple[list[Level], str]:
    warm = asyncio.run(run_level(server, 1, 1, tokens))  # warm-up (and transformers-cb's lazy start)
    results = []
    for c in levels:
        n = requests or default_requests(c)
        before, cpu, own = server.health(), server.cpu_seconds(), time.process_time()
        level = asyncio.run(run_level(server, c, n, tokens))
        after, cpu_after = server.health(), server.cpu_seconds()
        level.client_cpu = (time.process_time() - own) / level.wall
        if cpu is not None and cpu_after is not None:
            level.server_cpu = (cpu_after - cpu) / level.wall
        if "steps" in before and "steps" in after and after["steps"] > before["steps"]:
            level.per_step = (after["tokens"] - before["tokens"]) / (after["steps"] - before["steps"])
        results.append(level)
        print(f"  {server.peer:<16} c={c:<3} {n:>3} requests  {level.wall:6.1f} s  {level.aggregate:7.1f} tok/s  "
              f"ttft {level.ttft * 1000:7.0f} ms  stream {level.stream_rate:6.1f} tok/s  "
              f"tokens/request {level.mean_tokens:.1f}"
              + (f"  seqs/step {level.per_step:.2f}" if level.per_step else "")
              + (f"  cpu: server {level.server_cpu:.2f} client {level.client_cpu:.2f}" if level.server_cpu else ""),
              flush=True)
    return results, warm.samples[0].text


def default_requests(concurrency: int) -> int:
    return max(16, 4 * concurrency)


# ------------------------------------------------------------------------------------------------- reporting


def table(results: dict[str, list[Level] | str], levels: list[int]) -> list[str]:
    """One row per concurrency: each peer's aggregate tok/s, TTFT, per-stream tok/s; fermion's seqs/step and
    its aggregate over each transformers peer's."""
    ok = {peer: r for peer, r in results.items() if not isinstance(r, str)}
    head = ["c"]
    for peer in ok:
        head += [f"{peer} tok/s", f"{peer} TTFT ms", f"{peer} stream tok/s"]
    if "fermion" in ok:
        head.append("fermion seqs/step")
        head += [f"fermion / {peer}" for peer in ok if peer != "fermion"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, c in enumerate(levels):
        row = [str(c)]
        for r in ok.values():
            lv = r[i]
            row += [f"{lv.aggregate:.1f}", f"{lv.ttft * 1000:.0f}", f"{lv.stream_rate:.1f}"]
        if "fermion" in ok:
            f = ok["fermion"][i]
            row.append(f"{f.per_step:.2f}" if f.per_step else "n/a")
            row += [f"{f.aggregate / r[i].aggregate:.2f}x" for peer, r in ok.items() if peer != "fermion"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def scaling(results: dict[str, list[Level] | str], levels: list[int]) -> list[str]:
    if 1 not in levels or 8 not in levels:
        return []
    out = []
    for peer, r in results.items():
        if isinstance(r, str):
            continue
        one, eight = r[levels.index(1)].aggregate, r[levels.index(8)].aggregate
        target = " (target >= 3x)" if peer == "fermion" else ""
        out.append(f"- {peer}: aggregate c=8 / c=1 = {eight / one:.2f}x ({eight:.1f} / {one:.1f} tok/s){target}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="30m", choices=list(SIZES), help="random-weight model size")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, help="requests per level (default: max(16, 4 x concurrency))")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"among {', '.join(PEERS)}")
    parser.add_argument("--max-batch", type=int, default=16, help="fermion serve --max-batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the servers")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))} (choose among {', '.join(PEERS)})")
    if args.context < 512 or args.context <= args.tokens + 32:
        parser.error("--context must be at least 512 and leave room for the prompt and --tokens")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers

    import transformers

    started = time.perf_counter()
    results: dict[str, list[Level] | str] = {}
    texts: dict[str, str] = {}  # each peer's greedy warm-up text: the same model should say the same thing
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder, params = build_folder(args.size, args.context, Path(tmp))
        print(f"{args.size} random model: {params / 1e6:.1f}M parameters, context {args.context}, fp32 HF export; "
              f"{args.threads} server threads; {args.tokens} tokens per request", flush=True)
        for peer in peers:
            server = Server(peer, folder, args.threads, args.max_batch, Path(tmp))
            try:
                t0 = time.perf_counter()
                server.start()
                print(f"{peer}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
                results[peer], texts[peer] = bench_peer(server, levels, args.requests, args.tokens)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one peer failing still reports the others
                why = f"{type(err).__name__}: {err}".strip()
                tail = server.tail(10)
                results[peer] = why.splitlines()[0][:300]
                print(f"{peer}: FAILED: {why}\n{tail}", flush=True)
            finally:
                server.stop()
    elapsed = time.perf_counter() - started

    title = (f"## Serving under concurrent load (`bench/serve.py`, {date.today()}, {cpu_name()}, {args.threads} "
             f"threads, torch {torch.__version__}, transformers {transformers.__version__})")
    command = " ".join(["python bench/serve.py", *(a for a in sys.argv[1:] if a != "--no-write")])
    lines = [
        title, "",
        f"`{command}`: {args.size} random-weight model ({params / 1e6:.1f}M parameters, fp32 HF export, "
        f"context {args.context}); each level runs c openai-client workers sending streaming /v1/completions back "
        f"to back (same {len(PROMPT)}-character prompt, greedy, max_tokens {args.tokens}, end-of-sequence off: "
        "fermion `ignore_eos`, transformers `min_new_tokens`) until its requests are done "
        f"({args.requests or 'max(16, 4c)'} per level). tok/s: completion tokens "
        "(server `usage`) over the level's wall time; TTFT: mean time to first text; stream tok/s: mean per-request "
        "decode rate after the first token; seqs/step: mean sequences per fermion decode step (/health). "
        f"fermion serve --max-batch {args.max_batch}; transformers serve with and without --continuous-batching. "
        f"Client and servers share the machine. Whole run {elapsed / 60:.1f} min.", "",
        *table(results, levels), "",
        *scaling(results, levels),
    ]
    tokens_seen = {peer: {round(lv.mean_tokens, 1) for lv in r}
                   for peer, r in results.items() if not isinstance(r, str)}
    short = [f"{peer} averaged {sorted(t)} tokens per request" for peer, t in tokens_seen.items()
             if t != {float(args.tokens)}]
    lines += [f"- note: {s} (asked for {args.tokens})" for s in short]
    if "fermion" in texts:
        lines += [f"- {peer}'s greedy text {'matches' if text == texts['fermion'] else 'differs from'} fermion's"
                  for peer, text in texts.items() if peer != "fermion"]
    lines += [f"- {peer}: did not run: {why}" for peer, why in results.items() if isinstance(why, str)]
    print("\n" + "\n".join(lines))
    if not args.no_write:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (servers stopped)")
