"""Generated data for demos and tests: small arithmetic problems, as SFT examples or as preference pairs.

Arithmetic is the one task where a model of a few million parameters can learn a preference that generalises, and
where the right answer is known, so a run can be checked rather than eyeballed. Everything is seeded: the same
(n, seed) gives the same records on every machine.

    arithmetic_problems(n, seed)     Problem("What is 17 + 25?", 42, ...), ...
    arithmetic_examples(n, seed)     {"prompt": "What is 17 + 25?", "completion": "42"}, ...          (SFT)
    arithmetic_preferences(n, seed)  {"prompt": "What is 17 + 25?", "chosen": "42", "rejected": "43"}, ...  (DPO)
    write_jsonl(path, records)       one JSON object a line (gzipped when the name ends in .gz)
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

OPERATIONS = ("+", "-", "*")


class Problem(NamedTuple):
    question: str
    answer: int
    a: int
    op: str
    b: int


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 99, max_factor: int = 12) -> Iterator[Problem]:
    """n problems: additions and subtractions of numbers up to max_operand (never below zero), and multiplications
    of numbers up to max_factor (times tables), in equal shares."""
    rng = random.Random(seed)
    for _ in range(n):
        op = rng.choice(OPERATIONS)
        if op == "*":
            a, b = rng.randint(2, max_factor), rng.randint(2, max_factor)
        else:
            a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
            if op == "-" and b > a:
                a, b = b, a
        yield Problem(f"What is {a} {op} {b}?", _apply(a, op, b), a, op, b)


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible mistake: off by one or two, off by ten (a carry or borrow gone wrong), one digit changed, the
    digits swapped, the wrong operation (+ for -, - for +, + for *), or a neighbouring line of the times table.
    Never the right answer, never negative."""
    right = problem.answer
    digits = str(right)
    candidates = {right + d for d in (-2, -1, 1, 2, -10, 10)}
    if len(digits) > 1 and digits[-1] != "0":  # a reversal with a leading zero would drop a digit
        candidates.add(int(digits[::-1]))
    position = rng.randrange(len(digits))
    allowed = "123456789" if position == 0 and len(digits) > 1 else "0123456789"
    candidates.add(int(digits[:position] + rng.choice([d for d in allowed if d != digits[position]])
                       + digits[position + 1:]))
    candidates.add(_apply(problem.a, "-" if problem.op == "+" else "+", problem.b))
    if problem.op == "*":
        candidates.update((right - problem.a, right + problem.a, right - problem.b, right + problem.b))
    return rng.choice(sorted(c for c in candidates if c >= 0 and c != right))


def arithmetic_examples(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n SFT records: the question and its answer."""
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "completion": str(problem.answer)}


def arithmetic_preferences(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n preference records: the question, its answer as chosen, a plausible wrong answer as rejected. `sizes`
    (max_operand, max_factor) go to arithmetic_problems."""
    rng = random.Random(f"wrong answers {seed}")  # its own stream, so the problems match arithmetic_problems'
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "chosen": str(problem.answer),
               "rejected": str(wrong_answer(problem, rng))}


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write the records one a line (gzip when the name ends in .gz), under a temporary name renamed when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b
