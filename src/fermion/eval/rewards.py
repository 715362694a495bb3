"""Verifiers: a completion and its prompt's record in, a reward out. The one registry RL (train/rl.py) picks from.

A verifier is a plain function `verifier(completion: str, record: dict) -> float | None`. `completion` is the text
of the model's last turn (after any tool results); `record` is the prompt's record: "answer" (what a right answer
is: a number, a GSM8K solution, a tool call {"name", "arguments"}), "messages", and "tools" when tools are offered.
None means the verifier does not apply to this record (an arithmetic check on a tool-call prompt): it then adds
nothing to the reward, and the logged mean of that verifier leaves the record out.

Built in, each reusing the eval task's own scoring so that what RL rewards is what the benchmarks measure:

    arithmetic  1 when the first integer of the answer is the expected one (eval/arithmetic.first_integer)
    gsm8k       1 when the final number (after "####", else the last number) equals the expected one
                (eval/generative's strict-then-flexible extraction, compared as numbers)
    tool_call   partial credit for a call: 0.2 valid JSON + 0.2 conforms to the offered tools' schema + 0.6 x the
                share of the expected arguments given right (eval/tinytask.score, argument_share); 1 when exact
    format      1 when the answer is only what was asked for: a bare number for a numeric answer, nothing but
                calls of the offered tools (chat/tools.parse_calls) for a call; else 0

A recipe may name its own: "package.module:function", imported when the stage starts.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from fermion.chat.tools import parse_calls
from fermion.config import RecipeError
from fermion.data.synthetic.tinytask import Problem
from fermion.eval.arithmetic import first_integer
from fermion.eval.generative import gsm8k_answer, last_number, same_number
from fermion.eval.tinytask import argument_share, parse_call, score

Verifier = Callable[[str, dict], float | None]
_BARE_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def _integer(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _call(value) -> dict | None:
    return value if isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value else None


def arithmetic(completion: str, record: dict) -> float | None:
    expected = _integer(record.get("answer"))
    if expected is None:
        return None
    return float(first_integer(completion) == expected)


def gsm8k(completion: str, record: dict) -> float | None:
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int | float | str):
        return None
    target = gsm8k_answer(str(answer)) or last_number(str(answer))
    if target is None:
        return None
    return float(same_number(gsm8k_answer(completion) or last_number(completion), target))


def tool_call(completion: str, record: dict) -> float | None:
    expected = _call(record.get("answer"))
    if expected is None:
        return None
    tools = record.get("tools") or []
    scores = score(Problem("", "", tools, expected), completion) if tools else None
    if scores is None:  # no schema offered: exactness and arguments only
        call = parse_call(completion)
        if call is None:
            return 0.0
        scores = {"valid_json": True, "schema_ok": True, "exact": call == expected,
                  "arguments": argument_share(call, expected)}
    if scores["exact"]:
        return 1.0
    return 0.2 * scores["valid_json"] + 0.2 * scores["schema_ok"] + 0.6 * scores["arguments"]


def format_reward(completion: str, record: dict) -> float | None:
    answer = record.get("answer")
    if _call(answer) is not None:
        names = {tool.get("function", tool).get("name") for tool in record.get("tools") or []} or {answer["name"]}
        return float(parse_calls(completion, names) is not None)
    if _integer(answer) is not None or (isinstance(answer, float) and math.isfinite(answer)):
        return float(_BARE_NUMBER.fullmatch(completion) is not None)
    return None


BUILTIN: dict[str, Verifier] = {"arithmetic": arithmetic, "gsm8k": gsm8k, "tool_call": tool_call,
                                "format": format_reward}


def resolve(name: str, field: str = "rl.verifiers") -> Verifier:
    """A built-in verifier by name, or a user's by its Python path "package.module:function"; anything else is a
    RecipeError naming the field and what would be right."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise RecipeError(f"{field}.{name}: unknown verifier; built in: {', '.join(BUILTIN)}, or a Python path "
                          "'package.module:function'")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure to import is the recipe's to fix
        raise RecipeError(f"{field}.{name}: cannot import {module_name} ({type(err).__name__}: {err}); is it on "
                          "PYTHONPATH?") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        what = "has no attribute" if function is None else f"has a {type(function).__name__}, not a function, as"
        raise RecipeError(f"{field}.{name}: {module_name} {what} {attribute!r}; a verifier is a function "
                          "(completion: str, record: dict) -> float | None")
    return function


@dataclass(frozen=True)
class Rewards:
    """The recipe's verifiers, resolved, with their weights."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    functions: tuple[Verifier, ...]

    @classmethod
    def from_recipe(cls, verifiers: dict[str, float], field: str = "rl.verifiers") -> Rewards:
        return cls(tuple(verifiers), tuple(verifiers.values()), tuple(resolve(n, field) for n in verifiers))

    def score(self, completion: str, record: dict) -> tuple[float, list[float | None]]:
        """(the weighted sum of the rewards that apply, each verifier's reward or None)."""
        each = []
        for name, function in zip(self.names, self.functions, strict=True):
            value = function(completion, record)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise RecipeError(f"rl.verifiers.{name}: returned {value!r}; a verifier returns a finite number, "
                                  "or None where it does not apply")
            each.append(None if value is None else float(value))
        total = sum(w * v for w, v in zip(self.weights, each, strict=True) if v is not None)
        return total, each
