"""Generative benchmarks scored by exact match of an extracted answer: GSM8K and BIG-Bench Hard.

GSM8K: K solved training problems (default 5, in lm-eval's "Question: ...\\nAnswer: ..." format, chain of thought
ending in "#### <number>"), then the question; the model's answer is the number after "####" (`strict`) or, failing
that, the last number it wrote (`flexible`), compared as numbers.

BBH: each of the 27 tasks with its own 3-shot chain-of-thought prompt (the files in bbh/cot-prompts), then
"Q: <input>\\nA: Let's think step by step."; the answer is what follows "So the answer is", compared with the target
after normalising case, a trailing period and, for multiple choice, "(B) text" to "(B)". `--limit N` takes the first
N examples of every task.

Chat models get the same few-shot examples as earlier turns of the conversation (user: question, assistant:
worked answer), then the question as the last user turn. Generation is greedy.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from fermion.data.sources import DataError, file_records
from fermion.eval.multiple_choice import field, first_existing, from_hub
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.sampling import Prompt, SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

# ------------------------------------------------------------------------------------------------------- GSM8K

NUMBER = r"-?[$0-9.,]*[0-9]"


def gsm8k_answer(solution: str) -> str | None:
    """The number after '####' (the reference format), or None."""
    match = re.search(r"#### (" + NUMBER + ")", solution)
    return _clean_number(match.group(1)) if match else None


def last_number(text: str) -> str | None:
    found = re.findall(NUMBER, text)
    return _clean_number(found[-1]) if found else None


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def few_shot_prompt(lm: EvalModel, shots: list[tuple[str, str]], question: str, prefix: str = "") -> Prompt:
    """Solved (question, answer) pairs then the open question: one text for base models, turns for chat models."""
    if lm.chat:
        turns = []
        for q, a in shots:
            turns += [{"role": "user", "content": prefix + q}, {"role": "assistant", "content": a}]
        return turns + [{"role": "user", "content": prefix + question}]
    return "".join(f"{prefix}{q} {a}\n\n" for q, a in shots) + prefix + question


def _problems(records) -> list[tuple[str, str, str]]:
    return [(w, field(r, "question", w), field(r, "answer", w)) for w, r in records]


def gsm8k(lm: EvalModel, options: TaskOptions) -> TaskResult:
    folder = options.data_dir / "gsm8k"
    train, test = first_existing(folder, ["train.jsonl"]), first_existing(folder, ["test.jsonl"])
    if train is None:  # nothing local: the Hub's train split for the shots, its test split to evaluate
        pool = _problems(from_hub(folder, "openai/gsm8k", "main", "train"))
        problems = _problems(from_hub(folder, "openai/gsm8k", "main", "test"))
    else:
        # Without a test split (as in ../shared/data) the training file is evaluated, each problem with shots
        # other than itself.
        pool = _problems(file_records(train))
        problems = pool if test is None else _problems(file_records(test))
    problems = problems[: options.limit] if options.limit is not None else problems
    k = 5 if options.shots is None else options.shots
    prompts = []
    for where, question, _ in problems:
        rng = random.Random(f"{options.seed}:{where}")
        shots = rng.sample([p for p in pool if p[0] != where], k)
        prompts.append(few_shot_prompt(lm, [(f"Question: {q}\nAnswer:", a) for _, q, a in shots],
                                       f"Question: {question}\nAnswer:"))
    params = SamplingParams(max_new_tokens=options.max_new_tokens or 256, temperature=0.0, stop=["Question:"])
    outputs = lm.generate(prompts, params)
    strict, flexible, samples = [], [], []
    for (where, _, solution), out in zip(problems, outputs, strict=True):
        target = gsm8k_answer(solution)
        if target is None:
            raise DataError(f"{where}: the answer has no '#### <number>' line")
        got_strict, got_flexible = gsm8k_answer(out.text), gsm8k_answer(out.text) or last_number(out.text)
        strict.append(float(same_number(got_strict, target)))
        flexible.append(float(same_number(got_flexible, target)))
        samples.append({"id": where, "target": target, "strict": got_strict, "flexible": got_flexible,
                        "response": out.text})
    metrics = [mean_metric("exact_match_strict", strict), mean_metric("exact_match_flexible", flexible)]
    return TaskResult("gsm8k", metrics, len(problems), k, samples)


# --------------------------------------------------------------------------------------------------------- BBH


def bbh_prompt_file(path: Path) -> str:
    """The few-shot part of a cot-prompts file: everything after the canary line and the '-----' rule."""
    text = path.read_text(encoding="utf-8")
    return text.split("-----\n", 1)[1].strip() if "-----\n" in text else text.strip()


def bbh_shots(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """A cot prompt -> (task description, [(question, worked answer)]) so chat models can get them as turns."""
    blocks = re.split(r"\n\n(?=Q: )", prompt)
    description = blocks[0] if not blocks[0].startswith("Q: ") else ""
    shots = []
    for block in blocks[1 if description else 0:]:
        question, _, answer = block.partition("\nA: ")
        shots.append((question + "\nA:", answer))
    return description, shots


def bbh_answer(text: str) -> str | None:
    match = re.search(r"answer is (.+?)(?:\.\s|\.$|\n|$)", text)
    return match.group(1).strip() if match else None


def bbh_normalise(answer: str | None) -> str:
    if answer is None:
        return ""
    answer = answer.strip().rstrip(".").strip()
    choice = re.match(r"^\(([A-R])\)", answer)
    return f"({choice.group(1)})" if choice else answer.lower()


def bbh(lm: EvalModel, options: TaskOptions) -> TaskResult:
    folder = options.data_dir / "bbh"
    tasks = sorted((folder / "bbh").glob("*.json"))
    if not tasks:
        raise DataError(f"{folder / 'bbh'}: no task files (<task>.json with an 'examples' list)")
    items, prompts = [], []
    for path in tasks:
        prompt_path = folder / "cot-prompts" / f"{path.stem}.txt"
        if not prompt_path.is_file():
            raise DataError(f"{prompt_path}: missing; every BBH task needs its chain-of-thought prompt file")
        description, shots = bbh_shots(bbh_prompt_file(prompt_path))
        try:
            examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: expected a JSON object with an 'examples' list ({err})") from None
        for i, example in enumerate(examples[: options.limit] if options.limit is not None else examples):
            where = f"{path}:examples[{i}]"
            question = f"Q: {field(example, 'input', where)}\nA:"
            shots_used = shots[: options.shots] if options.shots is not None else shots
            body = few_shot_prompt(lm, shots_used, question)
            if isinstance(body, str):
                body = (description + "\n\n" if description else "") + body + " Let's think step by step."
            elif description:
                body[0]["content"] = description + "\n\n" + body[0]["content"]
            items.append((path.stem, where, str(field(example, "target", where))))
            prompts.append(body)
    params = SamplingParams(max_new_tokens=options.max_new_tokens or 256, temperature=0.0, stop=["\n\nQ:"])
    outputs = lm.generate(prompts, params)
    scores, samples = [], []
    for (task, where, target), out in zip(items, outputs, strict=True):
        got = bbh_answer(out.text)
        scores.append(float(bbh_normalise(got) == bbh_normalise(target)))
        samples.append({"id": where, "task": task, "target": target, "answer": got, "response": out.text})
    shots_n = 3 if options.shots is None else options.shots
    return TaskResult("bbh", [mean_metric("exact_match", scores)], len(items), shots_n, samples)
