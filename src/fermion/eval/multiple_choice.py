"""Multiple-choice benchmarks scored by log-likelihood: HellaSwag, ARC-Easy/Challenge, PIQA, MMLU.

Each question becomes a context and its choices; the model's answer is the choice with the highest log-likelihood
as a continuation of the context (`acc`), or the highest log-likelihood per character of the choice (`acc_norm`,
which stops long choices losing merely for being long). Prompts are lm-evaluation-harness's, word for word, so
accuracies are comparable with published numbers and with lm-eval run on the exported model:

    hellaswag   "{activity}: {context}"                    choices " {ending}"
    arc_*       "Question: {question}\\nAnswer:"            choices " {text}"
    piqa        "Question: {goal}\\nAnswer:"                choices " {solution}"
    mmlu        "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"   choices " A" .. " D"

Few-shot examples (`--shots K`) come from the task's training or dev split when there is one, else from the other
questions of the same file, chosen with a fixed seed and never the question itself; they are joined with blank
lines, each followed by its right answer, as lm-eval does.

Data is read from local files laid out as ../shared/data/eval (text, jsonl, csv), or, when the local file is
missing, from the Hugging Face dataset of the same benchmark (needs network access the first time).
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fermion.config import SourceConfig
from fermion.data.sources import DataError, file_records, iter_records
from fermion.eval.results import TaskOptions, TaskResult, mean_metric

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel


@dataclass
class Question:
    id: str
    text: str  # the question as the prompt shows it, before any few-shot examples
    choices: list[str]
    gold: int
    description: str = ""  # a line before the few-shot examples (MMLU's subject)
    group: str = ""  # MMLU's subject: few-shot examples come from the same group


@dataclass
class Benchmark:
    name: str
    load: Callable[[Path], list[Question]]  # the evaluated split
    shot_pool: Callable[[Path], list[Question]] | None = None  # where few-shot examples come from; None: the split


def evaluate(lm: EvalModel, bench: Benchmark, options: TaskOptions) -> TaskResult:
    questions = bench.load(options.data_dir)
    if options.limit is not None:
        questions = questions[: options.limit]
    shots = options.shots or 0
    pool = bench.shot_pool(options.data_dir) if (shots and bench.shot_pool) else questions
    contexts = [with_shots(q, pool, shots, options.seed) for q in questions]
    requests = [(context, " " + choice) for context, q in zip(contexts, questions, strict=True) for choice in q.choices]
    scores = iter(lm.loglikelihood(requests))
    acc, acc_norm, samples = [], [], []
    for q in questions:
        lls = [next(scores) for _ in q.choices]
        logprobs = [ll.logprob for ll in lls]
        per_char = [ll.logprob / max(len(choice), 1) for ll, choice in zip(lls, q.choices, strict=True)]
        pick, pick_norm = _argmax(logprobs), _argmax(per_char)
        acc.append(float(pick == q.gold))
        acc_norm.append(float(pick_norm == q.gold))
        samples.append({"id": q.id, "gold": q.gold, "pick": pick, "pick_norm": pick_norm,
                        "logprobs": [round(x, 4) for x in logprobs],
                        # choices longer than the window, scored on their last tokens (lm-eval refuses these)
                        "cut_choices": sum(ll.cut for ll in lls)})
    return TaskResult(bench.name, [mean_metric("acc", acc), mean_metric("acc_norm", acc_norm)], len(questions), shots,
                      samples)


def with_shots(question: Question, pool: list[Question], shots: int, seed: int) -> str:
    """The context a question's choices continue: description, K solved examples, the question."""
    if not shots:
        return question.description + question.text
    candidates = [q for q in pool if q.id != question.id and q.group == question.group]
    rng = random.Random(f"{seed}:{question.id}")
    examples = rng.sample(candidates, min(shots, len(candidates)))
    solved = "\n\n".join(f"{q.text} {q.choices[q.gold]}" for q in examples)
    return question.description + solved + "\n\n" + question.text


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------------------------------ reading


def field(record: dict, name: str, where: str):
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(record) or 'none'})")
    return record[name]


def first_existing(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        matches = sorted(folder.glob(name))
        if matches:
            return matches[0]
    return None


def from_hub(path_hint: Path, name: str, subset: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """Records of a Hugging Face dataset, used when the local file is missing."""
    try:
        yield from iter_records(SourceConfig(name=path_hint.name, dataset=name, subset=subset, split=split))
    except DataError as err:
        raise DataError(f"no local data under {path_hint}, and {err}") from None


# ---------------------------------------------------------------------------------------------------- HellaSwag


def hellaswag_clean(text: str) -> str:
    """WikiHow contexts carry markup like "[title]" and "[step]"; lm-eval removes it this way."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_record(record: dict, where: str) -> Question:
    """A Hugging Face / original-jsonl record (activity_label, ctx_a, ctx_b, endings, label)."""
    context = (field(record, "ctx_a", where) + " " + field(record, "ctx_b", where).capitalize())
    endings = field(record, "endings", where)
    return Question(str(record.get("ind", where)), hellaswag_clean(field(record, "activity_label", where) + ": "
                                                                    + context),
                    [hellaswag_clean(e) for e in endings], _label(record, "label", len(endings), where))


def split_context(context: str) -> tuple[str, str]:
    """The text format joins ctx_a and ctx_b; ctx_b is the unfinished sentence at the end, which starts in lower
    case ("A man is sitting on a roof. he"). Splitting it off again lets it be capitalised as lm-eval does."""
    match = re.search(r"^(.*[.!?]) ([a-z][^.!?]*)$", context)
    return (match.group(1), match.group(2)) if match else (context, "")


def hellaswag_text(path: Path) -> list[Question]:
    """The 6-line format: "<activity>: <context>", the gold index, then the four endings."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, four endings per task)")
    out = []
    for start in range(0, len(lines), 6):
        where = f"{path}:{start + 2}"
        label = lines[start + 1].strip()
        if label not in {"0", "1", "2", "3"}:
            raise DataError(f"{where}: the label line must be 0, 1, 2 or 3, got {label!r}")
        activity, _, context = lines[start].partition(": ")
        ctx_a, ctx_b = split_context(context)
        record = {"ind": f"{path.name}:{start // 6}", "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                  "endings": lines[start + 2:start + 6], "label": label}
        out.append(hellaswag_record(record, where))
    return out


def load_hellaswag(data_dir: Path) -> list[Question]:
    folder = data_dir / "hellaswag"
    path = first_existing(folder, ["hellaswag_val*.jsonl", "hellaswag_val*.txt", "*.jsonl", "*.txt"])
    if path is None:
        return [hellaswag_record(r, w) for w, r in from_hub(folder, "Rowan/hellaswag", None, "validation")]
    if path.suffix == ".txt":
        return hellaswag_text(path)
    return [hellaswag_record(r, w) for w, r in file_records(path)]


# ---------------------------------------------------------------------------------------------------------- ARC


def arc_record(record: dict, where: str) -> Question:
    """The original jsonl (question{stem, choices[{text, label}]}) or Hugging Face's (question,
    choices{text, label})."""
    question = field(record, "question", where)
    if isinstance(question, dict):
        stem, options = field(question, "stem", where), field(question, "choices", where)
        texts, labels = [c["text"] for c in options], [c["label"] for c in options]
    else:
        choices = field(record, "choices", where)
        stem, texts, labels = question, list(choices["text"]), list(choices["label"])
    key = str(field(record, "answerKey", where))
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return Question(str(record.get("id", where)), f"Question: {stem}\nAnswer:", texts, labels.index(key))


def arc_loader(level: str, split: str) -> Callable[[Path], list[Question]]:
    def load(data_dir: Path) -> list[Question]:
        folder = data_dir / "arc"
        names = [f"ARC-{level}-{s}.jsonl" for s in ([split] if split == "Train" else ["Test", "Dev"])]
        path = first_existing(folder, names)
        if path is None:
            hub_split = {"Train": "train", "Test": "test"}[split if split == "Train" else "Test"]
            return [arc_record(r, w) for w, r in from_hub(folder, "allenai/ai2_arc", f"ARC-{level}", hub_split)]
        return [arc_record(r, w) for w, r in file_records(path)]
    return load


# --------------------------------------------------------------------------------------------------------- PIQA


def piqa_record(record: dict, where: str, label=None) -> Question:
    label = record.get("label") if label is None else label
    if label is None:
        raise DataError(f"{where}: no label (PIQA keeps labels in a separate .lst file beside the jsonl)")
    return Question(where, f"Question: {field(record, 'goal', where)}\nAnswer:",
                    [field(record, "sol1", where), field(record, "sol2", where)], _label({"label": label}, "label", 2,
                                                                                        where))


def load_piqa(data_dir: Path) -> list[Question]:
    folder = data_dir / "piqa"
    path = first_existing(folder, ["valid*.jsonl", "*.jsonl"])
    if path is None:
        return [piqa_record(r, w) for w, r in from_hub(folder, "ybisk/piqa", None, "validation")]
    records = list(file_records(path))
    labels_path = first_existing(folder, [path.name.replace(".jsonl", ".lst").replace("valid", "valid-labels"),
                                          "*labels*.lst"])
    if labels_path is None:
        return [piqa_record(r, w) for w, r in records]
    labels = labels_path.read_text().split()
    if len(labels) != len(records):
        raise DataError(f"{labels_path}: {len(labels)} labels for the {len(records)} questions of {path}; "
                        "the files must have one line per question, in the same order")
    return [piqa_record(r, w, label) for (w, r), label in zip(records, labels, strict=True)]


# --------------------------------------------------------------------------------------------------------- MMLU

MMLU_LETTERS = ["A", "B", "C", "D"]


def mmlu_question(subject: str, question: str, options: list[str], answer, where: str) -> Question:
    if len(options) != 4:
        raise DataError(f"{where}: MMLU questions have 4 choices, got {len(options)}")
    text = question.strip() + "".join(f"\n{letter}. {option}" for letter, option in
                                      zip(MMLU_LETTERS, options, strict=True)) + "\nAnswer:"
    gold = MMLU_LETTERS.index(answer) if answer in MMLU_LETTERS else _label({"a": answer}, "a", 4, where)
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return Question(where, text, MMLU_LETTERS, gold, description, subject)


def mmlu_csv(path: Path) -> list[Question]:
    """One subject's csv: with a header (question, choice0..3, answer index) or without (question, A-D, letter)."""
    subject = re.sub(r"_(dev|val|test)$", "", path.stem)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:1] == ["question"]:
        rows = rows[1:]
    out = []
    for number, row in enumerate(rows, 1):
        where = f"{path}:{number}"
        if len(row) != 6:
            raise DataError(f"{where}: expected 6 columns (question, four choices, answer), got {len(row)}")
        out.append(mmlu_question(subject, row[0], row[1:5], row[5].strip(), where))
    return out


def mmlu_split(split: str) -> Callable[[Path], list[Question]]:
    def load(data_dir: Path) -> list[Question]:
        folder = data_dir / "mmlu" / split
        files = sorted(folder.glob("*.csv"))
        if not files:
            rows = from_hub(folder, "cais/mmlu", "all", split.replace("val", "validation"))
            return [mmlu_question(r["subject"], r["question"], list(r["choices"]), r["answer"], w) for w, r in rows]
        return [q for path in files for q in mmlu_csv(path)]
    return load


def load_mmlu(data_dir: Path) -> list[Question]:
    """The test split when present; else the dev split (the only one in ../shared/data), whose few-shot examples
    are then the subject's other dev questions."""
    has_test = (data_dir / "mmlu" / "test").is_dir()
    return mmlu_split("test" if has_test else "dev")(data_dir)


def _label(record: dict, name: str, n: int, where: str) -> int:
    try:
        value = int(record[name])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: {name} must be a choice index 0..{n - 1}, got {record.get(name)!r}") from None
    if not 0 <= value < n:
        raise DataError(f"{where}: {name} must be a choice index 0..{n - 1}, got {value}")
    return value


BENCHMARKS = {
    "hellaswag": Benchmark("hellaswag", load_hellaswag),
    "arc_easy": Benchmark("arc_easy", arc_loader("Easy", "Test"), arc_loader("Easy", "Train")),
    "arc_challenge": Benchmark("arc_challenge", arc_loader("Challenge", "Test"), arc_loader("Challenge", "Train")),
    "piqa": Benchmark("piqa", load_piqa),
    "mmlu": Benchmark("mmlu", load_mmlu, mmlu_split("dev")),
}
