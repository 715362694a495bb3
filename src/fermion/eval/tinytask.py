"""tinytask: tool calling with structured output, small enough for a tiny model to learn.

The problems, their tools and the training data for them are generated in data/synthetic/tinytask.py; this module
asks a model for the calls and scores them. Scoring uses the tools' full JSON Schemas (required fields,
`additionalProperties: false`, enums, integer ranges, a date pattern). Four scores per answer:

    valid_json   the answer (whitespace stripped, a ```json fence allowed) parses as a JSON object
    schema       it validates against the schema of a call: one of the offered tools' names and its arguments
    exact        it equals the expected call (key order aside)
    arguments    partial credit: the share of the expected call's arguments given right (0 for the wrong tool)

`run(..., constrained=True)` decodes under a grammar built from the call's schema (infer/constrain.py), which makes
every answer valid JSON that conforms to the schema; what is left to measure is whether it is the right call.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from fermion.chat.tools import SYSTEM, call_schema, one_line
from fermion.data.synthetic.tinytask import BASE_CUE, Problem, problems, user_text
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.constrain import SEPARATORS
from fermion.infer.sampling import Completion, Prompt, SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

TASK = "tinytask"
DEFAULT_PROBLEMS = 200
MAX_NEW_TOKENS = 96


def prompt(lm: EvalModel, problem: Problem) -> Prompt:
    if lm.chat:
        return lm.as_chat(user_text(problem), system=SYSTEM)
    return f"{SYSTEM}\n\n{user_text(problem)}{BASE_CUE}"


# -------------------------------------------------------------------------------------------------------- scoring

_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def parse_call(text: str) -> dict | None:
    """The answer as a JSON object, or None when it is not one."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _conforms(call: dict, schema: dict) -> bool:
    try:
        import jsonschema
    except ImportError:
        raise ImportError("tinytask scoring needs jsonschema: pip install 'fermion[eval]'") from None
    return jsonschema.Draft202012Validator(schema).is_valid(call)


def score(problem: Problem, text: str) -> dict[str, bool | float]:
    call = parse_call(text)
    if call is None:
        return {"valid_json": False, "schema_ok": False, "exact": False, "arguments": 0.0}
    # Canonical JSON compares types too: 2 and 2.0, or 1 and true, are different arguments.
    exact = json.dumps(call, sort_keys=True) == json.dumps(problem.answer, sort_keys=True)
    return {"valid_json": True, "schema_ok": _conforms(call, call_schema(problem.tools)), "exact": exact,
            "arguments": argument_share(call, problem.answer)}


def argument_share(call: dict, expected: dict) -> float:
    """Partial credit: the share of the expected call's arguments given with their exact value (0 for the wrong
    tool). Moves before `exact` does, which needs every argument right at once."""
    wanted = expected["arguments"]
    given = call.get("arguments")
    if call.get("name") != expected["name"] or not isinstance(given, dict) or not wanted:
        return float(call.get("name") == expected["name"] and given == wanted)
    same = sum(json.dumps(given.get(key, None), sort_keys=True) == json.dumps(value, sort_keys=True)
               and key in given for key, value in wanted.items())
    return same / len(wanted)


# ------------------------------------------------------------------------------------------------------------ run


def longest_json(schema: dict) -> int:
    """Characters in the longest one-line JSON text the schema allows (for the subset of JSON Schema used here)."""
    if "anyOf" in schema:
        return max(map(longest_json, schema["anyOf"]))
    if "const" in schema or "enum" in schema:
        return max(len(one_line(value)) for value in schema.get("enum", [schema.get("const")]))
    if schema["type"] == "object":
        item, key = map(len, SEPARATORS)
        members = [len(one_line(name)) + key + longest_json(value) for name, value in schema["properties"].items()]
        return 2 + sum(members) + item * (len(members) - 1)
    if schema["type"] == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    return 2 + schema["maxLength"]  # a string of plain characters, which patterns here require


def _constraints(lm: EvalModel, chosen: list[Problem]) -> list:
    """One grammar per distinct call schema (there are few), one constraint per problem."""
    from fermion.infer.constrain import JsonSchemaGrammar

    grammars: dict[str, JsonSchemaGrammar] = {}
    out = []
    for problem in chosen:
        schema = call_schema(problem.tools)
        key = one_line(schema)
        if key not in grammars:
            grammars[key] = JsonSchemaGrammar(lm.tokenizer, schema)
        out.append(grammars[key].constraint())
    return out


def _sample(problem: Problem, completion: Completion) -> dict:
    scores = score(problem, completion.text)
    return {"id": problem.id, "request": problem.request, "expected": problem.answer_text,
            "output": completion.text, "finish_reason": completion.finish_reason,
            # A cut answer ran out of tokens before it ended; under a grammar that means it is incomplete JSON.
            "cut": completion.finish_reason == "length",
            "valid_json": scores["valid_json"], "schema": scores["schema_ok"], "exact": scores["exact"],
            "arguments": scores["arguments"]}


def run(lm: EvalModel, options: TaskOptions, constrained: bool = False) -> TaskResult:
    """Greedy answers to the first `options.limit` (default 200) problems of seed `options.seed`, scored."""
    chosen = problems(options.limit or DEFAULT_PROBLEMS, options.seed)
    max_new_tokens = options.max_new_tokens or MAX_NEW_TOKENS
    constraints = None
    if constrained:
        constraints = _constraints(lm, chosen)
        # Every token is at least one byte, so room for the longest valid answer plus EOS means no cut can leave
        # half a document.
        longest = max(longest_json(call_schema(problem.tools)) for problem in chosen)
        max_new_tokens = max(max_new_tokens, longest + 1)
    # A base model's answer is one line; a blank line means it has moved on to something else.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=[] if lm.chat else ["\n\n"])
    completions = lm.generate([prompt(lm, problem) for problem in chosen], params, constraints)
    samples = [_sample(problem, completion) for problem, completion in zip(chosen, completions, strict=True)]
    metrics = [mean_metric(name, [float(s[name]) for s in samples]) for name in ("valid_json", "schema", "exact",
                                                                                        "arguments")]
    return TaskResult(f"{TASK}_constrained" if constrained else TASK, metrics, len(samples), 0, samples)
