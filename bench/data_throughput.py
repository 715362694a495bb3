"""Data preparation throughput on the shared pretraining corpora: the whole `fermion prepare`, and tokenization alone.

Tokenization alone is `write_shards`: it reads the sources, encodes them in a pool of worker processes and writes
the token shards. It runs once per worker count in --workers, into a fresh directory each round (it would otherwise
reuse its own output), and the median round is reported. Its wall time includes starting the workers, which import
fermion (and so torch); a run over one short document measures that fixed cost alone. For comparison, the tokenizers
library encodes the same documents on one thread of this process, with no pool and no files.

The whole pipeline is `fermion prepare` in a subprocess on a recipe over the same sources with the default
data.prepare steps (datatrove cleaning, quality filters, exact and MinHash dedup, decontamination against
shared/data/eval), then the tokenizer training and the shards; it runs once, on all cores.

MB are 10^6 bytes of UTF-8 document text of the sources as read. "Per core" divides by the CPU time the machine
spent (Linux's /proc/stat), so it does not depend on how many cores there are; run it on an otherwise idle machine.
Prints markdown for bench/RESULTS.md.

    python bench/data_throughput.py [--workers 1,2] [--rounds 3] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tokenizers
import yaml

from fermion.config import DataConfig, SourceConfig, TokenizerConfig
from fermion.data import Tokenizer, interleave_documents, iter_documents, write_shards

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO.parent / "shared" / "data" / "pretrain"
EVAL = REPO.parent / "shared" / "data" / "eval"
FERMION = Path(sys.executable).with_name("fermion")
TRAIN_BYTES = 4_000_000  # tokenizer training text: every corpus is represented, and training takes seconds


def corpora(workdir: Path) -> list[SourceConfig]:
    """The shared pretraining corpora, split into documents the way their usual readers split them.

    llamafactory_demo/wiki_demo.txt is left out: each of its articles is one line that ends without punctuation, so
    prepare's c4 filter removes all of them, and prepare stops on a source it emptied.
    """
    wikitext = workdir / "wiki.test.txt"  # the reader knows .txt, not WikiText's .raw; the bytes are the same
    wikitext.symlink_to(PRETRAIN / "wikitext-2-raw" / "wiki.test.raw")
    return [
        SourceConfig(name="tinystories", paths=[str(PRETRAIN / "tinystories" / "*.txt")], separator="<|endoftext|>"),
        SourceConfig(name="tinyshakespeare", paths=[str(PRETRAIN / "tinyshakespeare" / "input.txt")],
                     separator="\n\n"),  # one speech per document
        SourceConfig(name="gutenberg", paths=[str(PRETRAIN / "gutenberg_nltk" / "*.txt")]),  # one book per document
        SourceConfig(name="wikitext", paths=[str(wikitext)], separator="\n"),  # a line per row, as on the Hub
        SourceConfig(name="c4", paths=[str(PRETRAIN / "llamafactory_demo" / "c4_demo.jsonl")]),
    ]


def cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy: the only count that includes the processes datatrove forks from
    its forkserver, which are not this process's children. Meaningful while nothing else runs."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:9]]  # cpu user nice system idle iowait irq ...
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed_write(data: DataConfig, tokenizer: Tokenizer, workdir: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, index) of one write_shards into a directory of its own."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "shards"
    cpu, wall = cpu_seconds(), time.perf_counter()
    index = write_shards(data, tokenizer, out, seed=0)
    return time.perf_counter() - wall, cpu_seconds() - cpu, index


def text_bytes(index: dict) -> int:
    return sum(entry[split]["bytes"] for entry in index["sources"].values() for split in ("train", "val"))


def text_tokens(index: dict) -> int:
    return sum(index["splits"][split]["tokens"] for split in ("train", "val"))


def rates(run: str, workers: str, wall: float, cpu: float, megabytes: float, fixed: float | None = None) -> dict:
    return {"run": run, "workers": workers, "wall": wall, "fixed": fixed, "mb_s": megabytes / wall,
            "mb_s_core": megabytes / cpu}


def tokenization(sources: list[SourceConfig], tokenizer: Tokenizer, workers: int, rounds: int,
                 workdir: Path) -> tuple[dict, dict]:
    """The median of `rounds` write_shards runs with `workers` workers, and the index it wrote."""
    data = DataConfig(sources=sources, num_workers=workers)
    runs = sorted((timed_write(data, tokenizer, workdir) for _ in range(rounds)), key=lambda run: run[0])
    wall, cpu, index = runs[len(runs) // 2]
    fixed = fixed_cost(tokenizer, workers, rounds, workdir)
    return rates(f"tokenization (`write_shards`), median of {rounds}", str(workers), wall, cpu,
                 text_bytes(index) / 1e6, fixed), index


def fixed_cost(tokenizer: Tokenizer, workers: int, rounds: int, workdir: Path) -> float:
    """Median wall seconds of write_shards over one short document: starting the pool, writing the index."""
    document = workdir / "one.txt"
    document.write_text("A single short document.\n")
    data = DataConfig(sources=[SourceConfig(name="one", paths=[str(document)])], val_fraction=0, num_workers=workers)
    return statistics.median(timed_write(data, tokenizer, workdir)[0] for _ in range(rounds))


def library(sources: list[SourceConfig], tokenizer: Tokenizer, megabytes: float) -> dict:
    """The tokenizers library encoding the same documents on one thread of this process, without a pool or files:
    what one worker could reach if the writer cost nothing."""
    documents = [list(iter_documents(source)) for source in sources]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in each worker
    cpu, wall = cpu_seconds(), time.perf_counter()
    for texts in documents:
        tokenizer.encode_batch(texts)
    return rates("tokenizers `encode_batch_fast` alone, no pool, no files", "1 thread",
                 time.perf_counter() - wall, cpu_seconds() - cpu, megabytes)


def whole_prepare(sources: list[SourceConfig], vocab_size: int, megabytes: float, workdir: Path) -> dict:
    """One `fermion prepare` over the sources with the default steps, on all cores."""
    cores = len(os.sched_getaffinity(0))
    recipe = {
        "run": {"dir": str(workdir / "prepare-run")},
        "tokenizer": {"vocab_size": vocab_size, "train_bytes": TRAIN_BYTES},
        "data": {"sources": [source.model_dump(mode="json", exclude_defaults=True) for source in sources],
                 "num_workers": cores, "prepare": {"workers": cores, "decontaminate": {"eval_dir": str(EVAL)}}},
    }
    path = workdir / "prepare.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = subprocess.run([str(FERMION), "prepare", str(path)], cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    if result.returncode:
        raise SystemExit(f"fermion prepare failed ({result.returncode}):\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    return rates("whole `fermion prepare` (default steps, tokenizer, shards), one run", str(cores), wall, cpu,
                 megabytes)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # /proc/cpuinfo is Linux's; elsewhere platform's name will do
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, tokenizers {tokenizers.__version__}"


def report(rows: list[dict], index: dict) -> str:
    documents = sum(entry[split]["documents"] for entry in index["sources"].values() for split in ("train", "val"))
    lines = [
        f"### {datetime.date.today()} · {machine()}",
        "",
        f"shared/data/pretrain: {', '.join(index['sources'])} ({documents:,} documents, "
        f"{text_bytes(index) / 1e6:.1f} MB of text, {text_tokens(index):,} tokens at vocabulary "
        f"{index['vocab_size']:,})",
        "",
        "| run | workers | seconds | of which fixed start-up | MB/s | MB/s per core (CPU time) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        fixed = "" if row["fixed"] is None else f"{row['fixed']:.2f}"
        lines.append(f"| {row['run']} | {row['workers']} | {row['wall']:.2f} | {fixed} | {row['mb_s']:.2f} | "
                     f"{row['mb_s_core']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default=",".join(str(n) for n in range(1, len(os.sched_getaffinity(0)) + 1)),
                        help="worker counts to time tokenization with")
    parser.add_argument("--rounds", type=int, default=3, help="tokenization runs per worker count")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        sources = corpora(Path(workdir))
        tokenizer = Tokenizer.train(interleave_documents(sources),
                                    TokenizerConfig(vocab_size=args.vocab_size, train_bytes=TRAIN_BYTES))
        timed = [tokenization(sources, tokenizer, int(n), args.rounds, Path(workdir)) for n in args.workers.split(",")]
        index = timed[0][1]
        megabytes = text_bytes(index) / 1e6
        rows = [whole_prepare(sources, args.vocab_size, megabytes, Path(workdir)), *(row for row, _ in timed),
                library(sources, tokenizer, megabytes)]
    print(report(rows, index))


if __name__ == "__main__":
    main()
