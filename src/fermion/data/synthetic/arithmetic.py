"""Arithmetic problems with a held-out split: the problems, SFT records, preference pairs and pretraining documents.

Arithmetic is the one task where a model of a few million parameters can learn a preference that generalises, and
where the right answer is known, so a run can be checked rather than eyeballed. A problem (a, op, b) is held out
for evaluation iff the hash of "a op b" falls in one share of EVAL_SHARE (seeded.held_out: one problem in five);
`arithmetic_problems` draws from one side (split="train", the default, "eval" or "all"), and every training-side
generator (SFT, pairs, the arithmetic documents and the textbook's worked examples) uses training problems only, so
the `arithmetic` eval task measures generalisation rather than recall. Default sizes (operands up to MAX_OPERAND =
20, factors up to MAX_FACTOR = 10) are ones a tiny model can learn in minutes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import NamedTuple

from fermion.data.synthetic import seeded

OPERATIONS = ("+", "-", "*")
MAX_OPERAND = 20  # additions and subtractions: operands 1..MAX_OPERAND
MAX_FACTOR = 10  # multiplications: factors 2..MAX_FACTOR
EVAL_SHARE = 5  # one problem in EVAL_SHARE (by hash) is for evaluation only
SPLITS = ("train", "eval", "all")


class Problem(NamedTuple):
    question: str
    answer: int
    a: int
    op: str
    b: int


def held_out(a: int, op: str, b: int) -> bool:
    """Whether the problem `a op b` belongs to evaluation (never to training data), by a stable hash of "a op b"."""
    return seeded.held_out(f"{a} {op} {b}", EVAL_SHARE)


def make_problem(a: int, op: str, b: int) -> Problem:
    return Problem(f"What is {a} {op} {b}?", solve(a, op, b), a, op, b)


def _in_split(a: int, op: str, b: int, split: str) -> bool:
    return split == "all" or held_out(a, op, b) == (split == "eval")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = MAX_OPERAND, max_factor: int = MAX_FACTOR,
                        split: str = "train") -> Iterator[Problem]:
    """n problems: additions and subtractions of numbers up to max_operand (never below zero), and multiplications
    of numbers up to max_factor (times tables), in equal shares, drawn with replacement from one side of the
    held-out rule (split "train", "eval" or "all")."""
    _check_split(split)
    rng = seeded.rng("arithmetic", seed)
    made = 0
    while made < n:
        op = rng.choice(OPERATIONS)
        if op == "*":
            a, b = rng.randint(2, max_factor), rng.randint(2, max_factor)
        else:
            a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
            if op == "-" and b > a:
                a, b = b, a
        if _in_split(a, op, b, split):
            made += 1
            yield make_problem(a, op, b)


def all_problems(max_operand: int = MAX_OPERAND, max_factor: int = MAX_FACTOR, split: str = "all") -> list[Problem]:
    """Every distinct problem arithmetic_problems can draw with these sizes, on one side of the split, in a fixed
    order (+, -, *; then by operands)."""
    _check_split(split)
    pairs = {"+": [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)],
             "-": [(a, b) for a in range(1, max_operand + 1) for b in range(1, a + 1)],
             "*": [(a, b) for a in range(2, max_factor + 1) for b in range(2, max_factor + 1)]}
    return [make_problem(a, op, b) for op in OPERATIONS for a, b in pairs[op] if _in_split(a, op, b, split)]


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
    candidates.add(solve(problem.a, "-" if problem.op == "+" else "+", problem.b))
    if problem.op == "*":
        candidates.update((right - problem.a, right + problem.a, right - problem.b, right + problem.b))
    return rng.choice(sorted(c for c in candidates if c >= 0 and c != right))


def arithmetic_examples(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n SFT records from training problems: the question and its answer. `sizes` (max_operand, max_factor) go to
    arithmetic_problems."""
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "completion": str(problem.answer)}


def arithmetic_preferences(n: int, seed: int = 0, **sizes) -> Iterator[dict]:
    """n preference records from training problems: the question, its answer as chosen, a plausible wrong answer as
    rejected. `sizes` (max_operand, max_factor) go to arithmetic_problems."""
    rng = random.Random(f"wrong answers {seed}")  # its own stream, so the problems match arithmetic_problems'
    for problem in arithmetic_problems(n, seed, **sizes):
        yield {"prompt": problem.question, "chosen": str(problem.answer),
               "rejected": str(wrong_answer(problem, rng))}


def qa_text(problem: Problem, answer: int | None = None) -> str:
    """A solved problem in the base-model format: 'Question: What is 7 + 5?\\nAnswer: 12' (the right answer unless
    another is given)."""
    return f"{base_prompt(problem)} {problem.answer if answer is None else answer}"


def base_prompt(problem: Problem) -> str:
    """What a base model is asked: 'Question: What is 7 + 5?\\nAnswer:'."""
    return f"Question: {problem.question}\nAnswer:"


def arithmetic_documents(n: int, seed: int = 0, **sizes) -> Iterator[str]:
    """n pretraining documents, each 4 to 12 solved training problems, one 'Question: ...\\nAnswer: ...' pair after
    another (one newline apart), as the `arithmetic` eval task prompts a base model."""
    rng = seeded.rng("arithmetic documents", seed)
    problems = arithmetic_problems(n * 12, seed, **sizes)
    for _ in range(n):
        yield "\n".join(qa_text(next(problems)) for _ in range(rng.randint(4, 12)))


def solve(a: int, op: str, b: int) -> int:
    """The answer to `a op b`."""
    return a + b if op == "+" else a - b if op == "-" else a * b
