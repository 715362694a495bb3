"""Fermion's multiple-choice eval against lm-evaluation-harness on the same examples: both accuracies, and every
choice's log-likelihood side by side.

The model is exported to a Hugging Face folder in fp32, which lm-eval's `hf` model scores; fermion scores its own
checkpoint. lm-eval runs its standard task configs (hellaswag, arc_easy, arc_challenge, piqa, and mmlu's per-subject
tasks, 0-shot): each local task `include:`s the installed standard YAML and replaces only where the data comes
from (a jsonl in the Hugging Face dataset's schema, written here from ../shared/data/eval), so lm-eval's own
process_docs, doc_to_text, doc_to_choice and doc_to_target build the prompts. MMLU's standard config scores acc
only; acc_norm is added to its metric list so both metrics come from lm-eval's own code. A question with a choice
longer than the model's context window is left out of both sides (lm-eval stops with an assertion on it) and
counted in the table. tests/test_eval_lmeval.py runs the same comparison on a tiny model.

HellaSwag: the shared file keeps each context as one line "<activity_label>: <ctx>", where ctx = ctx_a + " " + ctx_b
as the dataset's `ctx` field joins them. The records given to lm-eval split it where fermion's reader does
(`multiple_choice.split_context`: ctx_b is the unfinished lower-case sentence at the end), and lm-eval's own
process_docs then capitalises ctx_b ("Roof shingle removal: A man is sitting on a roof. He").

    python bench/lmeval_parity.py                       # runs/demo, 200 examples per task
    python bench/lmeval_parity.py --model RUN_OR_CKPT --n 50 --tasks arc_easy,piqa
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# No network here: lm-eval and datasets must not try the Hub (read when they are imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fermion import checkpoint  # noqa: E402
from fermion.eval import multiple_choice  # noqa: E402
from fermion.eval.results import TaskOptions  # noqa: E402
from fermion.export.hf import export_hf  # noqa: E402
from fermion.infer.lm import EvalModel, load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "eval"
STANDARD_TASKS = Path(lm_eval.__file__).parent / "tasks"
BENCHMARKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "mmlu"]
METRICS = ["acc", "acc_norm"]


@dataclass
class LocalTask:
    """An lm-eval standard task over local records: its config, with only the data source replaced."""
    name: str
    standard: str  # the installed task's YAML, relative to lm_eval/tasks
    docs: list[dict]  # records in the schema of the Hugging Face dataset the standard task reads


@dataclass
class Parity:
    task: str
    n: int
    fermion: dict[str, float]  # metric -> value
    lmeval: dict[str, float]
    max_delta: float  # largest |fermion - lm-eval| over every choice's log-likelihood
    too_long: list[str]  # question ids left out of both sides: a choice does not fit in the context window
    prompt_mismatches: list[str]  # question ids whose (context, continuation) pairs differ between the sides
    gold_mismatches: list[str]
    pick_mismatches: list[str]  # question ids where the two sides pick differently (acc or acc_norm)
    seconds: dict[str, float]  # side -> wall time of scoring this task, model already loaded


# ------------------------------------------------------------------------ shared files -> Hugging Face records


def hellaswag_tasks(data_dir: Path, n: int) -> list[LocalTask]:
    """Rowan/hellaswag records from the 6-line text file (context, label, four endings)."""
    lines = (data_dir / "hellaswag" / "hellaswag_val.first20pct.txt").read_text(encoding="utf-8").split("\n")
    docs = []
    for i in range(min(n, len(lines) // 6)):
        head = lines[6 * i]
        activity, _, context = head.partition(": ")
        ctx_a, ctx_b = multiple_choice.split_context(context)
        docs.append({"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": context,
                     "endings": lines[6 * i + 2:6 * i + 6], "label": lines[6 * i + 1]})
    return [LocalTask("parity_hellaswag", "hellaswag/hellaswag.yaml", docs)]


def arc_tasks(level: str) -> Callable[[Path, int], list[LocalTask]]:
    """allenai/ai2_arc records (question, choices{text, label}, answerKey) from the original Dev jsonl, which is
    the dataset's validation split and what fermion scores when the Test split is withheld."""
    def tasks(data_dir: Path, n: int) -> list[LocalTask]:
        lines = (data_dir / "arc" / f"ARC-{level}-Dev.jsonl").read_text(encoding="utf-8").splitlines()
        docs = []
        for line in lines[:n]:
            record = json.loads(line)
            options = record["question"]["choices"]
            docs.append({"id": record["id"], "question": record["question"]["stem"],
                         "choices": {"text": [o["text"] for o in options], "label": [o["label"] for o in options]},
                         "answerKey": record["answerKey"]})
        return [LocalTask(f"parity_arc_{level.lower()}", f"arc/arc_{level.lower()}.yaml", docs)]
    return tasks


def piqa_tasks(data_dir: Path, n: int) -> list[LocalTask]:
    """PIQA records (goal, sol1, sol2, label) from the jsonl and its separate labels file."""
    folder = data_dir / "piqa"
    lines = (folder / "valid.first20pct.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    labels = (folder / "valid-labels.first20pct.lst").read_text().split()[:n]
    docs = [{**json.loads(line), "label": int(label)} for line, label in zip(lines, labels, strict=True)]
    return [LocalTask("parity_piqa", "piqa/piqa.yaml", docs)]


def mmlu_tasks(data_dir: Path, n: int) -> list[LocalTask]:
    """cais/mmlu records, one lm-eval task per subject (each carries its subject's description), covering the
    first n questions in fermion's order: subjects alphabetically, each file in order."""
    out = []
    for path in sorted((data_dir / "mmlu" / "dev").glob("*.csv")):
        if n <= 0:
            break
        subject = path.stem.removesuffix("_dev")
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))[:n]
        docs = [{"question": r["question"], "subject": subject, "choices": [r[f"choice{i}"] for i in range(4)],
                 "answer": int(r["answer"])} for r in rows]
        out.append(LocalTask(f"parity_mmlu_{subject}", f"mmlu/default/mmlu_{subject}.yaml", docs))
        n -= len(docs)
    return out


LOCAL_TASKS = {"hellaswag": hellaswag_tasks, "arc_easy": arc_tasks("Easy"), "arc_challenge": arc_tasks("Challenge"),
               "piqa": piqa_tasks, "mmlu": mmlu_tasks}


def write_task(folder: Path, task: LocalTask) -> None:
    """The records as jsonl, and a YAML that includes the standard task and points it at them."""
    data = folder / f"{task.name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in task.docs), encoding="utf-8")
    config = {
        "include": str(STANDARD_TASKS / task.standard), "task": task.name,
        "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"eval": str(data)}, "cache_dir": str(folder / "datasets_cache")},
        "training_split": None, "validation_split": None, "test_split": "eval", "fewshot_split": None,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }
    (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


# -------------------------------------------------------------------------------------------------- both sides


def lmeval_model(hf_dir: Path, batch_size: int) -> HFLM:
    return HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=batch_size)


def lmeval_samples(model: HFLM, folder: Path, tasks: list[LocalTask]) -> list[dict]:
    """lm-eval's logged samples for the tasks, in the tasks' order and each task's document order."""
    out = lm_eval.simple_evaluate(model=model, tasks=[t.name for t in tasks], num_fewshot=0, log_samples=True,
                                  bootstrap_iters=0, task_manager=TaskManager(include_path=str(folder),
                                                                              include_defaults=False))
    return [s for t in tasks for s in sorted(out["samples"][t.name], key=lambda s: s["doc_id"])]


def compare(benchmark: str, lm: EvalModel, hflm: HFLM, folder: Path, n: int, data_dir: Path = DATA_DIR) -> Parity:
    """Score the first n questions of a benchmark on both sides and line them up question by question. Questions
    with a choice longer than the context window are left out of both: lm-eval refuses them (an assertion stops
    the whole run), fermion scores the choice's last tokens."""
    bench = multiple_choice.BENCHMARKS[benchmark]
    questions = bench.load(data_dir)[:n]
    fits = [all(len(lm.encode_pair(context(q), " " + c)[1]) <= lm.max_length for c in q.choices) for q in questions]
    kept = [q for q, fit in zip(questions, fits, strict=True) if fit]
    tasks = LOCAL_TASKS[benchmark](data_dir, n)
    if sum(len(t.docs) for t in tasks) != len(questions):
        raise ValueError(f"{benchmark}: fermion read {len(questions)} questions, the lm-eval records hold "
                         f"{sum(len(t.docs) for t in tasks)}")
    fit_of_doc = iter(fits)
    tasks = [LocalTask(t.name, t.standard, [doc for doc in t.docs if next(fit_of_doc)]) for t in tasks]
    tasks = [t for t in tasks if t.docs]
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        write_task(folder, task)

    started = time.perf_counter()
    theirs = lmeval_samples(hflm, folder, tasks)
    lmeval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = multiple_choice.evaluate(lm, multiple_choice.Benchmark(benchmark, lambda _: kept),
                                      TaskOptions(data_dir=data_dir, shots=0))
    fermion_seconds = time.perf_counter() - started

    parity = Parity(benchmark, result.n, {m: result.metric(m).value for m in METRICS},
                    {m: sum(s[m] for s in theirs) / len(theirs) for m in METRICS}, 0.0,
                    [q.id for q, fit in zip(questions, fits, strict=True) if not fit], [], [], [],
                    {"fermion": fermion_seconds, "lm-eval": lmeval_seconds})
    for question, mine, sample in zip(kept, result.samples, theirs, strict=True):
        check_question(parity, question, mine, sample)
    return parity


def context(question: multiple_choice.Question) -> str:
    """The context fermion's evaluate gives a question's choices at 0 shots."""
    return multiple_choice.with_shots(question, [], 0, 0)


def check_question(parity: Parity, question: multiple_choice.Question, mine: dict, sample: dict) -> None:
    """Record where fermion's scoring of one question differs from lm-eval's sample of the same document."""
    if [tuple(pair) for pair in sample["arguments"]] != [(context(question), " " + c) for c in question.choices]:
        parity.prompt_mismatches.append(question.id)
    if sample["target"] != question.gold:
        parity.gold_mismatches.append(question.id)
    lls = [ll for ll, _ in sample["filtered_resps"]]
    # lm-eval normalises by the choice's length without the " " that joins it to the context, as fermion does.
    lengths = [len(continuation) - 1 for _, continuation in sample["arguments"]]
    picks = (argmax(lls), argmax([ll / length for ll, length in zip(lls, lengths, strict=True)]))
    if picks != (mine["pick"], mine["pick_norm"]):
        parity.pick_mismatches.append(question.id)
    deltas = [abs(a - b) for a, b in zip(mine["logprobs"], lls, strict=True)]
    parity.max_delta = max(parity.max_delta, *deltas)


def argmax(values: list[float]) -> int:
    """The first index of the largest value, as numpy's argmax (lm-eval's) and fermion's both break ties."""
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------------------------------ report


def table(rows: list[Parity]) -> str:
    lines = ["| task | n | left out | fermion acc / acc_norm | lm-eval acc / acc_norm | max \\|Δ loglik\\| | "
             "prompts differ | picks differ | fermion s | lm-eval s |", "|---|" + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r.task} | {r.n} | {len(r.too_long)} | "
                     f"{r.fermion['acc']:.4f} / {r.fermion['acc_norm']:.4f} | "
                     f"{r.lmeval['acc']:.4f} / {r.lmeval['acc_norm']:.4f} | {r.max_delta:.1e} | "
                     f"{len(r.prompt_mismatches)} | {len(r.pick_mismatches)} | {r.seconds['fermion']:.1f} | "
                     f"{r.seconds['lm-eval']:.1f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "runs" / "demo"), help="a fermion run or checkpoint")
    parser.add_argument("--n", type=int, default=200, help="examples per task (the first n)")
    parser.add_argument("--tasks", default=",".join(BENCHMARKS))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load(args.model, dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        loaded = checkpoint.load(args.model, dtype=torch.float32, warn=lambda *_: None)
        model, tokenizer = loaded.model, loaded.tokenizer
        hf_dir = export_hf(model, tokenizer, Path(tmp) / "hf", template=lm.template, dtype="fp32")
        hflm = lmeval_model(hf_dir, args.batch_size)
        rows = [compare(name, lm, hflm, Path(tmp) / "tasks" / name, args.n, args.data_dir)
                for name in args.tasks.split(",")]
    print(f"### {datetime.date.today()} · {cpu_name()}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, lm-eval {lm_eval.__version__}\n")
    print(f"`{args.model}` (fermion) and its fp32 Hugging Face export (lm-eval `hf`), first {args.n} examples per "
          f"task, 0-shot; lm-eval batch size {args.batch_size}; fermion's per-choice log-likelihoods are logged "
          "to 4 decimals, so |Δ| below 5e-5 is rounding; seconds: scoring one task with the models loaded (lm-eval's "
          "include building the task from its jsonl)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
