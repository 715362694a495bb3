"""Smoke test: a dozen fixed prompts at two temperatures, each answer given a heuristic verdict OK / WEAK / FAIL.
A recipe may give its own prompts and temperatures (eval.smoke).

It answers "does this model produce anything sensible at all?" in a minute, before any benchmark is worth running.
The verdicts come from rules a reader can check by eye: FAIL for output nobody could use (empty, looping, leaking
chat-template control strings), WEAK for output that is usable but poor (off topic, a wrong factual answer, very
short, repetitive, or a chat answer cut off mid-sentence), OK otherwise. Each prompt comes in two forms: a request
for chat models and an opening a base model continues, so both kinds get a fair chance.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from fermion.config import SmokeSettings
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

KINDS = ("story", "code", "factual", "instruction")
LABELS = ("OK", "WEAK", "FAIL")
# eval.smoke.temperatures defaults to 0.3 and 1.0: a low temperature shows what the model most believes; 1.0 shows
# whether its distribution holds together.
TOP_P = 0.95
MAX_NEW_TOKENS = 96

# Control strings that should never appear in an answer whatever the model's template; the caller adds the
# model's own stop strings and special tokens.
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|endoftext|>", "<|system|>",
                    "<|user|>", "<|assistant|>", "### Instruction:", "### Response:")

# Thresholds, each chosen so that ordinary text from a small model passes and degenerate text does not:
# - a unit of 1-10 characters repeated back to back over 30+ characters is a loop when the unit holds a letter
#   or digit ("aaaa...", "hahaha...") or the repeats run to the answer's end (the model was still stuck in them
#   when cut off: "#\n#\n#\n...", "-----..."); a code banner such as "# ==========" among code passes, and so
#   does deep indentation (a unit of whitespace only);
LOOP_SPAN = 30
# - a line of 8+ characters (short lines such as "else:" or "}" repeat in normal code) seen 3+ times is a loop;
REPEATED_LINE_CHARS, REPEATED_LINE_TIMES = 8, 3
# - the share of distinct word 4-grams, judged once there are 12+ of them (fewer says little): natural text sits
#   near 1.0, a story with a refrain near 0.8, "the cat the cat ..." near 0; below LOOP it is a loop, below MILD
#   the answer is repetitive but may still say something;
MIN_NGRAMS, LOOP_DISTINCT, MILD_DISTINCT = 12, 0.35, 0.7
# - fewer than 3 words is too short for anything but a factual answer;
MIN_WORDS = 3
# - an answer is code when at least half its non-empty lines look like code: a lead-in sentence or a markdown
#   fence around a function does not change that, nor does "return" in a line of a story. Indentation counts from
#   two spaces: a base model's continuation starts with the one space that follows the prompt.
CODE_LINES = 0.5
CODE_LINE = re.compile(r"^(( {2,}|\t)\S|\s*(def|class|return|import)\b)|\w\(|\s=\s")


@dataclass(frozen=True)
class SmokePrompt:
    kind: str  # one of KINDS
    chat_text: str  # the request as a chat model's user turn
    plain_text: str  # the same request as an opening a base model continues
    keywords: tuple[str, ...]  # an on-topic answer mentions one of these; for factual prompts, the expected answer;
    # none: any topic will do (a recipe's own prompt may give none)


@dataclass(frozen=True)
class Verdict:
    label: str  # one of LABELS
    reason: str  # why, in a few words


PROMPTS = (
    SmokePrompt("story", "Write a short story about a little cat named Tom.",
                "Once upon a time, there was a little cat named Tom.", ("tom", "cat", "kitten", "meow")),
    SmokePrompt("story", "Tell me a story about a girl who finds a red ball in the park.",
                "Lily was playing in the park when she found a red ball.", ("ball", "park", "girl", "lily")),
    SmokePrompt("story", "Write a story about a dog who is afraid of the rain.",
                "Max the dog was afraid of the rain.", ("dog", "max", "rain", "rainy", "raining", "puddle", "wet")),
    SmokePrompt("code", "Write a Python function fibonacci(n) that returns the n-th Fibonacci number.",
                'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
                ("fibonacci", "fib", "n - 1", "a + b")),
    SmokePrompt("code", "Write a Python function that returns the sum of a list of numbers.",
                'def sum_list(numbers):\n    """Return the sum of a list of numbers."""\n',
                ("sum", "total", "+=", "for")),
    SmokePrompt("code", "Write a Python function is_even(n) that tells whether a number is even.",
                'def is_even(n):\n    """Return True if n is even."""\n', ("%", "even", "& 1")),
    SmokePrompt("factual", "What is the capital of France?", "The capital of France is", ("paris",)),
    SmokePrompt("factual", "What color is the sky on a sunny day?", "On a sunny day, the sky is", ("blue",)),
    SmokePrompt("factual", "What do bees make?", "Bees live in a hive and make", ("honey",)),
    SmokePrompt("instruction", "List three colors.", "Here are three colors: red,",
                ("red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "brown")),
    SmokePrompt("instruction", "Write one sentence about the sun.", "Here is one sentence about the sun:",
                ("sun", "warm", "bright", "hot", "shine", "shining", "light", "sky")),
    SmokePrompt("instruction", "Give me one tip for staying healthy.", "One good tip for staying healthy is to",
                ("eat", "sleep", "water", "exercise", "drink", "walk", "fruit", "vegetable", "healthy", "rest")),
)


# ---------------------------------------------------------------------------------------------------- the rules


def mentions(text: str, keyword: str) -> bool:
    """Whether `keyword` or its plural in -s is a whole word of `text`, in any case: "cat" finds "Cats" but not
    "locate", "tom" not "tomorrow". A keyword such as "%" needs no word boundary."""
    pattern = re.escape(keyword)
    if keyword[0].isalnum():
        pattern = r"\b" + pattern
    if keyword[-1].isalnum():
        pattern += r"s?\b"
    return re.search(pattern, text, re.IGNORECASE) is not None


def looks_like_code(text: str) -> bool:
    """Whether CODE_LINES of the non-empty lines are indented, start with def/class/return/import, call
    name(...) or assign with " = "."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and sum(CODE_LINE.search(line) is not None for line in lines) >= CODE_LINES * len(lines)


def back_to_back_repeat(text: str) -> str | None:
    """A unit of 1-10 characters, not all whitespace, repeated back to back over LOOP_SPAN+ characters, that holds
    a letter or digit or whose repeats run to the end of the text (within one unit: the last may be cut short)."""
    for match in re.finditer(r"(.{1,10}?)\1{2,}", text, re.DOTALL):
        unit = match.group(1)
        at_end = len(text.rstrip()) - match.end() < len(unit)
        if len(match.group(0)) >= LOOP_SPAN and unit.strip() and (re.search(r"\w", unit) or at_end):
            return unit
    return None


def repeated_line(text: str) -> str | None:
    counts = Counter(line.strip() for line in text.splitlines() if len(line.strip()) >= REPEATED_LINE_CHARS)
    line, times = counts.most_common(1)[0] if counts else ("", 0)
    return line if times >= REPEATED_LINE_TIMES else None


def distinct_4grams(words: list[str]) -> float | None:
    """The share of distinct word 4-grams, or None when there are too few to judge."""
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) if len(grams) >= MIN_NGRAMS else None


def failure(text: str, template_markers: list[str]) -> str | None:
    """Why the answer is unusable, or None."""
    if not text.strip():
        return "empty"
    leaked = [m for m in template_markers if m in text]
    if leaked:
        return f"template leak {leaked[0]!r}"
    unit = back_to_back_repeat(text)
    if unit is not None:
        return f"loop: {unit!r} repeated"
    line = repeated_line(text)
    if line is not None:
        return f"loop: line {line[:30]!r} repeated"
    distinct = distinct_4grams(text.lower().split())
    if distinct is not None and distinct < LOOP_DISTINCT:
        return f"loop: {distinct:.0%} distinct 4-grams"
    return None


def weakness(prompt: SmokePrompt, text: str, finish_reason: str, chat: bool) -> str | None:
    """Why a usable answer is poor, or None."""
    if looks_like_code(text) != (prompt.kind == "code"):
        return "prose, not code" if prompt.kind == "code" else "code, not prose"
    on_topic = not prompt.keywords or any(mentions(text, k) for k in prompt.keywords)
    if prompt.kind == "factual" and not on_topic:
        return f"expected answer {prompt.keywords[0]!r} missing"
    if not on_topic:
        return "off topic"
    words = text.lower().split()
    if prompt.kind != "factual" and len(words) < MIN_WORDS:
        return f"too short ({len(words)} words)"
    distinct = distinct_4grams(words)
    if distinct is not None and distinct < MILD_DISTINCT:
        return f"repetitive: {distinct:.0%} distinct 4-grams"
    # A chat model should end a short answer by itself; stories and code may rightly outgrow the token budget,
    # and a base model never knows where to stop.
    cut = finish_reason == "length" and not re.search(r"[.!?\"')\]]\s*$", text)
    if chat and prompt.kind in ("factual", "instruction") and cut:
        return "cut off mid-sentence"
    return None


def verdict(prompt: SmokePrompt, text: str, finish_reason: str, template_markers: list[str], *,
            chat: bool = False) -> Verdict:
    """The verdict on one answer: the first FAIL rule that matches, else the first WEAK rule, else OK."""
    reason = failure(text, template_markers)
    if reason is not None:
        return Verdict("FAIL", reason)
    reason = weakness(prompt, text, finish_reason, chat)
    if reason is not None:
        return Verdict("WEAK", reason)
    return Verdict("OK", "")


# ---------------------------------------------------------------------------------------------------- the task


def markers_for(lm: EvalModel) -> list[str]:
    """Everything that must not show in an answer: the fixed markers, the template's stops, the special tokens."""
    specials = [lm.tokenizer.bos_token, lm.tokenizer.eos_token, lm.tokenizer.pad_token]
    return list(dict.fromkeys([*TEMPLATE_MARKERS, *lm.template.stop_strings, *specials]))


def prompts_of(settings: SmokeSettings) -> tuple[SmokePrompt, ...]:
    """The recipe's smoke prompts (eval.smoke.prompts), else the built-in dozen."""
    if settings.prompts is None:
        return PROMPTS
    return tuple(SmokePrompt(p.kind, p.prompt, p.opening or p.prompt, tuple(p.keywords)) for p in settings.prompts)


def run(lm: EvalModel, options: TaskOptions) -> TaskResult:
    """Every prompt (the first `limit`, as for every task) at every temperature (the model's recipe's eval.smoke,
    else the built-in dozen at 0.3 and 1.0), one batch per temperature, each answer with its verdict."""
    settings = lm.recipe.eval.smoke
    prompts = prompts_of(settings)[:options.limit]
    texts = [p.chat_text if lm.chat else p.plain_text for p in prompts]
    markers = markers_for(lm)
    samples = []
    for temperature in settings.temperatures:
        # A seed per prompt: with one seed for all, sampled answers start alike and the verdicts are correlated.
        params = [SamplingParams(max_new_tokens=options.max_new_tokens or MAX_NEW_TOKENS, temperature=temperature,
                                 top_p=TOP_P, seed=options.seed * 1000 + i) for i in range(len(texts))]
        completions = lm.generate([lm.as_chat(t) for t in texts], params)
        for prompt, text, completion in zip(prompts, texts, completions, strict=True):
            judged = verdict(prompt, completion.text, completion.finish_reason, markers, chat=lm.chat)
            samples.append({"kind": prompt.kind, "prompt": text, "temperature": temperature, "text": completion.text,
                            "finish_reason": completion.finish_reason, "verdict": judged.label,
                            "reason": judged.reason})
    metrics = [mean_metric(label.lower(), [float(s["verdict"] == label) for s in samples]) for label in LABELS]
    return TaskResult("smoke", metrics, n=len(samples), shots=0, samples=samples)


def summary(result: TaskResult) -> str:
    """Counts per verdict, e.g. "9 OK / 3 WEAK / 0 FAIL"."""
    counts = Counter(s["verdict"] for s in result.samples)
    return " / ".join(f"{counts[label]} {label}" for label in LABELS)


COLOURS = {"OK": "green", "WEAK": "yellow", "FAIL": "red"}
PREVIEW_CHARS = 60


def table(result: TaskResult) -> Table:
    """One row per answer: its kind, temperature, verdict, the reason and the answer's beginning."""
    grid = Table(title=f"smoke: {summary(result)}")
    for column in ("kind", "temp", "verdict", "reason", "answer"):
        grid.add_column(column)
    for s in result.samples:
        preview = " ".join(s["text"].split())  # newlines and indentation would break the row
        if len(preview) > PREVIEW_CHARS:
            preview = preview[:PREVIEW_CHARS - 1] + "…"
        # Text() rather than str: answers are shown literally, never read as rich markup ("[red]", code's "[i]").
        grid.add_row(s["kind"], f"{s['temperature']:g}", Text(s["verdict"], style=COLOURS[s["verdict"]]),
                     Text(s["reason"]), Text(preview))
    return grid
