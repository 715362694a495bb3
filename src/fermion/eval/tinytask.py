"""tinytask: tool calling with structured output, small enough for a tiny model to learn.

Each problem is a request in plain English (booking a flight or a hotel, an arithmetic question, a unit conversion)
and the tools on offer; the answer is one JSON object `{"name": <tool>, "arguments": {...}}`. Values come from small
fixed lists (a dozen cities, four cabins, fourteen units, whole numbers up to 30, dates in 2025-2026), phrased
several ways, so what a model has to learn is the mapping from phrasing to call rather than world knowledge. The
tools' schemas accept more than the requests use (operands up to 9999), as a real calculator's would.

The prompt describes each tool by a one-line signature (`book_hotel(city: city, check_in: YYYY-MM-DD, ...)`), which
a model with a context of a few hundred tokens can afford; scoring uses the tools' full JSON Schemas (required
fields, `additionalProperties: false`, enums, integer ranges, a date pattern). Four scores per answer:

    valid_json   the answer (whitespace stripped, a ```json fence allowed) parses as a JSON object
    schema       it validates against the schema of a call: one of the offered tools' names and its arguments
    exact        it equals the expected call (key order aside)
    arguments    partial credit: the share of the expected call's arguments given right (0 for the wrong tool)

`sft_records` writes training data for the same tools in the same prompt format, and `preference_records` DPO pairs
(the right call against the same call with one argument wrong). Problems for evaluation and for training are drawn
from separate random streams, and each call belongs to one side only (by a hash of its JSON), so no evaluated call,
and hence no evaluated request, is ever in the training data.

`run(..., constrained=True)` decodes under a grammar built from the call's schema (infer/constrain.py), which makes
every answer valid JSON that conforms to the schema; what is left to measure is whether it is the right call.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from fermion.eval.lm import EvalModel, Prompt
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.constrain import SEPARATORS
from fermion.infer.engine import Completion, SamplingParams

TASK = "tinytask"
DEFAULT_PROBLEMS = 200
MAX_NEW_TOKENS = 96
EVAL_SHARE = 5  # one call in EVAL_SHARE (by hash) is for evaluation only, the others for training only
MAX_MISSES = 10_000

SYSTEM = 'Call one of the tools. Reply with JSON only: {"name": tool, "arguments": {...}}.'
BASE_CUE = "\nCall:\n"  # ends a base model's plain prompt, so that its continuation is the call

# ------------------------------------------------------------------------------------------------------ the tools

CITIES = ("Paris", "Rome", "London", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo", "Athens",
          "Tokyo")
CABINS = {"economy": "economy", "premium": "premium economy", "business": "business", "first": "first"}
OPERATIONS = ("add", "subtract", "multiply", "divide")
UNITS = {  # by dimension: a conversion stays within one
    "length": ("meter", "kilometer", "centimeter", "mile", "foot", "inch"),
    "mass": ("gram", "kilogram", "pound", "ounce"),
    "volume": ("liter", "milliliter", "gallon", "cup"),
}
PLURALS = {"foot": "feet", "inch": "inches"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen")
NUMBERS = range(1, 31)  # the operands and quantities requests use
DATE_PATTERN = r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"


def _integer(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _enum(values, description: str | None = None) -> dict:
    schema = {"type": "string", "enum": list(values)}
    return {**schema, "description": description} if description else schema


# "description" is what the prompt's signature shows for an argument; enums without one list their values.
CITY = _enum(CITIES, "city")
UNIT = _enum([unit for units in UNITS.values() for unit in units], "singular unit")
DATE = {"type": "string", "pattern": DATE_PATTERN, "minLength": 10, "maxLength": 10, "description": "YYYY-MM-DD"}


def _tool(name: str, **arguments: dict) -> dict:
    """A tool as function-calling APIs describe one: its name and the JSON Schema of its arguments."""
    parameters = {"type": "object", "properties": arguments, "required": list(arguments),
                  "additionalProperties": False}
    return {"name": name, "parameters": parameters}


TOOLS = {tool["name"]: tool for tool in (
    _tool("book_flight", origin=CITY, destination=CITY, date=DATE, passengers=_integer(1, 9), cabin=_enum(CABINS)),
    _tool("book_hotel", city=CITY, check_in=DATE, nights=_integer(1, 14), guests=_integer(1, 6)),
    _tool("calculate", operation=_enum(OPERATIONS), a=_integer(0, 9999), b=_integer(0, 9999)),
    _tool("convert_units", value=_integer(1, 1000), from_unit=UNIT, to_unit=UNIT),
)}
FAMILY = {"book_flight": ("book_flight", "book_hotel"), "book_hotel": ("book_flight", "book_hotel"),
          "calculate": ("calculate", "convert_units"), "convert_units": ("calculate", "convert_units")}


def signature(tool: dict) -> str:
    """A tool in one line, e.g. `book_hotel(city: city, check_in: YYYY-MM-DD, nights: 1-14, guests: 1-6)`."""
    def hint(schema: dict) -> str:
        if "description" in schema:
            return schema["description"]
        if "enum" in schema:
            return "|".join(schema["enum"])
        return f"{schema['minimum']}-{schema['maximum']}"

    arguments = tool["parameters"]["properties"]
    return f"{tool['name']}({', '.join(f'{name}: {hint(schema)}' for name, schema in arguments.items())})"


def call_schema(tools: list[dict]) -> dict:
    """The JSON Schema of an answer: a call of any one of `tools`, with that tool's arguments."""
    return {"anyOf": [{"type": "object",
                       "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]}


# ------------------------------------------------------------------------------------------------- the requests


def _count(n: int, rng: random.Random, nouns: tuple[str, str]) -> str:
    """'3 nights', 'three nights', 'one night'."""
    number = NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)
    return f"{number} {nouns[0] if n == 1 else nouns[1]}"


def _plural(unit: str) -> str:
    return PLURALS.get(unit, unit + "s")


def _people(n: int, rng: random.Random, *nouns: tuple[str, str]) -> str:
    return _count(n, rng, rng.choice(nouns))


def _date(rng: random.Random) -> tuple[str, str]:
    """(ISO date, the way the request says it)."""
    year, month, day = rng.choice((2025, 2026)), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year}-{month:02d}-{day:02d}"
    said = rng.choice((iso, f"{MONTHS[month - 1]} {day}, {year}", f"{day} {MONTHS[month - 1]} {year}"))
    return iso, said


FLIGHT_REQUESTS = (
    "Book a flight from {origin} to {destination} on {date} for {people}, {cabin} class.",
    "I need {cabin} class tickets from {origin} to {destination} on {date} for {people}.",
    "Fly {people} from {origin} to {destination} on {date} in {cabin}.",
    "Can you book {people} on {a_cabin} flight to {destination} from {origin} on {date}?",
    "{date}: flight {origin} to {destination}, {people}, {cabin} class please.",
)
HOTEL_REQUESTS = (
    "Book a hotel in {city} from {date} for {nights} for {guests}.",
    "I need a room in {city} for {guests}, checking in on {date} for {nights}.",
    "Reserve {nights} in {city} starting {date} for {guests}.",
    "Find us a hotel in {city}: {guests}, {nights}, arriving {date}.",
)
CALCULATE_REQUESTS = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What is the sum of {a} and {b}?"),
    "subtract": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
                 "How much is {a} take away {b}?"),
    "multiply": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
                 "What is the product of {a} and {b}?"),
    "divide": ("What is {a} divided by {b}?", "Divide {a} by {b}.", "Compute {a} / {b}.",
               "How much is {a} over {b}?"),
}
CONVERT_REQUESTS = (
    "Convert {value} {source} to {targets}.",
    "How many {targets} are in {value} {source}?",
    "What is {value} {source} in {targets}?",
    "{value} {source} is how many {targets}?",
)


def _flight(rng: random.Random) -> tuple[str, dict]:
    origin, destination = rng.sample(CITIES, 2)
    (date, said), passengers, cabin = _date(rng), rng.randint(1, 9), rng.choice(list(CABINS))
    people = _people(passengers, rng, ("passenger", "passengers"), ("person", "people"), ("adult", "adults"))
    words = CABINS[cabin]
    text = rng.choice(FLIGHT_REQUESTS).format(origin=origin, destination=destination, date=said, people=people,
                                              cabin=words, a_cabin=("an " if words[0] in "aeiou" else "a ") + words)
    return text, {"origin": origin, "destination": destination, "date": date, "passengers": passengers,
                  "cabin": cabin}


def _hotel(rng: random.Random) -> tuple[str, dict]:
    city, (date, said), nights, guests = rng.choice(CITIES), _date(rng), rng.randint(1, 14), rng.randint(1, 6)
    text = rng.choice(HOTEL_REQUESTS).format(city=city, date=said, nights=_count(nights, rng, ("night", "nights")),
                                             guests=_people(guests, rng, ("guest", "guests"), ("person", "people")))
    return text, {"city": city, "check_in": date, "nights": nights, "guests": guests}


def _calculate(rng: random.Random) -> tuple[str, dict]:
    operation, a, b = rng.choice(OPERATIONS), rng.choice(NUMBERS), rng.choice(NUMBERS)
    return rng.choice(CALCULATE_REQUESTS[operation]).format(a=a, b=b), {"operation": operation, "a": a, "b": b}


def _convert(rng: random.Random) -> tuple[str, dict]:
    source, target = rng.sample(UNITS[rng.choice(list(UNITS))], 2)
    value = rng.choice(NUMBERS)
    text = rng.choice(CONVERT_REQUESTS).format(value=value, source=source if value == 1 else _plural(source),
                                               targets=_plural(target))
    return text, {"value": value, "from_unit": source, "to_unit": target}


REQUESTS = {"book_flight": _flight, "book_hotel": _hotel, "calculate": _calculate, "convert_units": _convert}


@dataclass(frozen=True)
class Problem:
    id: str
    request: str  # what the user asks, in words
    tools: list[dict]  # offered, in the order the prompt lists them
    answer: dict  # the expected call: {"name", "arguments"}

    @property
    def answer_text(self) -> str:
        return one_line(self.answer)


def one_line(value: object) -> str:
    """JSON as the answers are written, and as constrained decoding writes it."""
    return json.dumps(value, separators=SEPARATORS)


def _for_evaluation(answer: dict) -> bool:
    digest = hashlib.sha256(one_line(answer).encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0


def _draw(n: int, seed: int, stream: str) -> list[Problem]:
    """n distinct problems from one of the two streams, cycling through the tools; each stream keeps only its own
    calls."""
    rng = random.Random(f"{TASK}/{stream}/{seed}")
    names = list(REQUESTS)
    out: list[Problem] = []
    prompts: set[str] = set()
    misses = 0  # draws in a row that were rejected: many means a tool has run out of new problems
    while len(out) < n:
        name = names[len(out) % len(names)]
        request, arguments = REQUESTS[name](rng)
        answer = {"name": name, "arguments": arguments}
        tools = [TOOLS[t] for t in rng.sample(FAMILY[name], len(FAMILY[name]))]
        problem = Problem(f"{stream}-{seed}-{len(out)}", request, tools, answer)
        if _for_evaluation(answer) != (stream == "eval") or user_text(problem) in prompts:
            misses += 1
            if misses > MAX_MISSES:
                raise ValueError(f"{TASK} has fewer than {n} distinct {stream} problems ({len(out)} found)")
            continue
        misses = 0
        prompts.add(user_text(problem))
        out.append(problem)
    return out


def problems(n: int = DEFAULT_PROBLEMS, seed: int = 0) -> list[Problem]:
    """The evaluation problems: the same for the same (n, seed), and the first n of a larger n."""
    return _draw(n, seed, "eval")


# --------------------------------------------------------------------------------------------------- prompts, SFT


def user_text(problem: Problem) -> str:
    tools = "\n".join(signature(tool) for tool in problem.tools)
    return f"Tools:\n{tools}\nRequest: {problem.request}"


def prompt(lm: EvalModel, problem: Problem) -> Prompt:
    if lm.chat:
        return lm.as_chat(user_text(problem), system=SYSTEM)
    return f"{SYSTEM}\n\n{user_text(problem)}{BASE_CUE}"


def sft_records(n: int, seed: int = 0) -> list[dict]:
    """Training conversations in the evaluation's prompt format, from the training stream (no evaluated call)."""
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(p)},
                          {"role": "assistant", "content": p.answer_text}]} for p in _draw(n, seed, "train")]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """DPO pairs for the training conversations of sft_records(n, seed): the same system and user messages as the
    prompt, the right call as chosen, and as rejected a plausible mistake, the same tool with exactly one argument
    changed to another valid value (so the rejected call conforms to the schema but is wrong). Neither side is ever
    an evaluated call."""
    rng = random.Random(f"{TASK}/pairs/{seed}")  # its own stream, so the problems match sft_records'
    records = []
    for p in _draw(n, seed, "train"):
        while True:
            rejected = wrong_call(p.answer, rng)
            if not _for_evaluation(rejected):
                break
        records.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(p)}],
                        "chosen": p.answer_text, "rejected": one_line(rejected)})
    return records


def wrong_call(call: dict, rng: random.Random) -> dict:
    """The call with one argument, drawn at random, changed to another value its tool's schema allows: another city
    (never the flight's other one), another date (day, month or year moved), a nearby or another number within the
    range requests use, another cabin or operation, another unit of the same dimension (never the other unit)."""
    arguments = dict(call["arguments"])
    key = rng.choice(list(arguments))
    value = arguments[key]
    if key in ("origin", "destination", "city"):
        taken = {arguments.get("origin"), arguments.get("destination"), value}
        new = rng.choice([c for c in CITIES if c not in taken])
    elif key in ("date", "check_in"):
        year, month, day = map(int, value.split("-"))
        part = rng.choice(("year", "month", "day", "day"))
        if part == "year":
            year = 2025 if year == 2026 else 2026
        elif part == "month":
            month = rng.choice([m for m in range(1, 13) if m != month])
        else:
            day = rng.choice([d for d in range(1, 29) if d != day])
        new = f"{year}-{month:02d}-{day:02d}"
    elif key == "cabin":
        new = rng.choice([c for c in CABINS if c != value])
    elif key == "operation":
        new = rng.choice([o for o in OPERATIONS if o != value])
    elif key in ("from_unit", "to_unit"):
        units = next(units for units in UNITS.values() if value in units)
        new = rng.choice([u for u in units if u not in (arguments["from_unit"], arguments["to_unit"])])
    else:  # a number: one nearby, as a misread would give, or any other within the tool's range and NUMBERS'
        schema = TOOLS[call["name"]]["parameters"]["properties"][key]
        low, high = max(schema["minimum"], NUMBERS[0]), min(schema["maximum"], NUMBERS[-1])
        near = [value + d for d in (-2, -1, 1, 2) if low <= value + d <= high]
        new = rng.choice(near) if near and rng.random() < 0.5 else rng.choice(
            [v for v in range(low, high + 1) if v != value])
    arguments[key] = new
    return {"name": call["name"], "arguments": arguments}


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
