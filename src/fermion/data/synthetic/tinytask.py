"""tinytask's data: tool calls small enough for a tiny model to learn, as evaluation problems and training records.

Each problem is a request in plain English (booking a flight or a hotel, an arithmetic question, a unit conversion)
and the tools on offer; the answer is one JSON object `{"name": <tool>, "arguments": {...}}`. Values come from small
fixed lists (a dozen cities, four cabins, fourteen units, whole numbers up to 30, dates in 2025-2026), phrased
several ways, so what a model has to learn is the mapping from phrasing to call rather than world knowledge. The
tools' schemas accept more than the requests use (operands up to 9999), as a real calculator's would.

The prompt describes each tool by a one-line signature (`book_hotel(city: city, check_in: YYYY-MM-DD, ...)`), which
a model with a context of a few hundred tokens can afford; the tools' full JSON Schemas (`chat/tools.call_schema`:
required fields, `additionalProperties: false`, enums, integer ranges, a date pattern) are what eval/tinytask.py
scores answers against and constrains decoding by. The prompt format is chat/tools.py's, the one the server renders
an OpenAI `tools` request in, so a model trained on these records calls tools when served.

    problems(n, seed)            the evaluation problems
    training_problems(n, seed)   problems from the training stream (RL's prompts)
    sft_records(n, seed)         training conversations in the evaluation's prompt format
    preference_records(n, seed)  DPO pairs: the right call against the same call with one argument wrong
    documents(n, seed)           the training calls as plain text for a base model to pretrain on

Problems for evaluation and for training are drawn from separate random streams, and each call belongs to one side
only (`held_out`: one call in EVAL_SHARE, by a hash of its JSON), so no evaluated call, and hence no evaluated
request, is ever in the training data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from fermion.chat.tools import SYSTEM, one_line, tools_prompt
from fermion.data.synthetic import seeded

EVAL_SHARE = 5  # one call in EVAL_SHARE (by hash) is for evaluation only, the others for training only
MAX_MISSES = 10_000

BASE_CUE = "\nCall:\n"  # ends a base model's plain prompt, so that its continuation is the call

# ---------------------------------------------------------------------------------------------------------- the tools

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


# ------------------------------------------------------------------------------------------------------- the requests


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


def held_out(call: dict) -> bool:
    """Whether the call belongs to evaluation (never to training data), by a stable hash of its JSON."""
    return seeded.held_out(one_line(call), EVAL_SHARE)


def _draw(n: int, seed: int, stream: str) -> list[Problem]:
    """n distinct problems from one of the two streams, cycling through the tools; each stream keeps only its own
    calls."""
    rng = random.Random(f"tinytask/{stream}/{seed}")
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
        if held_out(answer) != (stream == "eval") or user_text(problem) in prompts:
            misses += 1
            if misses > MAX_MISSES:
                raise ValueError(f"tinytask has fewer than {n} distinct {stream} problems ({len(out)} found)")
            continue
        misses = 0
        prompts.add(user_text(problem))
        out.append(problem)
    return out


def problems(n: int, seed: int = 0) -> list[Problem]:
    """The evaluation problems: the same for the same (n, seed), and the first n of a larger n."""
    return _draw(n, seed, "eval")


def training_problems(n: int, seed: int = 0) -> list[Problem]:
    """Problems from the training stream (no evaluated call): the prompts RL trains on, with their answers."""
    return _draw(n, seed, "train")


# ------------------------------------------------------------------------------------------ prompts, training records


def user_text(problem: Problem) -> str:
    return tools_prompt(problem.tools, problem.request)


def sft_records(n: int, seed: int = 0) -> list[dict]:
    """Training conversations in the evaluation's prompt format, from the training stream (no evaluated call)."""
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(p)},
                          {"role": "assistant", "content": p.answer_text}]} for p in _draw(n, seed, "train")]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """DPO pairs for the training conversations of sft_records(n, seed): the same system and user messages as the
    prompt, the right call as chosen, and as rejected a plausible mistake, the same tool with exactly one argument
    changed to another valid value (so the rejected call conforms to the schema but is wrong). Neither side is ever
    an evaluated call."""
    rng = random.Random(f"tinytask/pairs/{seed}")  # its own stream, so the problems match sft_records'
    records = []
    for p in _draw(n, seed, "train"):
        while True:
            rejected = wrong_call(p.answer, rng)
            if not held_out(rejected):
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



def documents(n: int, seed: int = 0) -> Iterator[str]:
    """The training calls as a base model is prompted for them (system line, tools, request, the cue), followed by
    the call."""
    for record in sft_records(n, seed):
        system, user, assistant = (m["content"] for m in record["messages"])
        yield f"{system}\n\n{user}{BASE_CUE}{assistant}"
