"""IFEval: does the model follow instructions a program can check?

The benchmark (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models") is 541 prompts, each
carrying one to three verifiable instructions: "answer in fewer than 100 words", "wrap your whole response in double
quotes", "highlight at least 3 sections with markdown". The model answers each prompt greedily and a checker per
instruction type decides whether the answer follows it. Four numbers, as the paper reports them:

    prompt_strict / prompt_loose   the share of prompts whose instructions are all followed
    inst_strict / inst_loose       the share of instructions followed, over all instructions of all prompts

Loose scoring forgives the commonest false negatives: an instruction counts as followed when the response, or the
response without its first line (a "Sure, here is..." preamble), without its last line (a closing remark) or without
both, each also with its markdown asterisks removed, follows it.

The checkers are fermion's own, written from the paper's description of each instruction. Where the paper leaves a
detail open they decide as the benchmark's reference checkers do, so scores compare with published ones: a word is a
run of letters, digits or underscores; paragraphs are separated by a *** divider (by a blank line for the
"first word of paragraph n" instruction); keywords match anywhere, case-insensitively, and forbidden words only as
whole words; an empty response follows nothing.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

from fermion.data.sources import DataError, file_records
from fermion.eval.multiple_choice import field, from_hub
from fermion.eval.results import Metric, TaskOptions, TaskResult, mean_metric
from fermion.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel


@dataclass
class Prompt:
    key: int
    prompt: str
    instructions: list[str]  # instruction ids, e.g. "punctuation:no_comma"
    kwargs: list[dict]  # one dict per instruction: the parameters its checker takes


# ------------------------------------------------------------------------------------------------ text units

WORD = re.compile(r"\w+")
# A sentence ends at a run of . ! ? (and any closing quotes or brackets) followed by whitespace or the end.
SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
# Words whose period does not end a sentence: titles, "etc.", initials ("J.", but not the pronoun "I"), dotted
# abbreviations ("e.g.", "U.S.", "Ph.D."), and the numbers of a numbered list ("1." at the start of a line).
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "approx"})
DOTTED = re.compile(r"(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}|[A-HJ-Z]")
LIST_NUMBER = re.compile(r"(?:^|\n)[ \t]*\d+$")
PARAGRAPH_DIVIDER = re.compile(r"\s?\*\s?\*\s?\*\s?")  # "***" or "* * *" on its own or between paragraphs
BLANK_LINE = re.compile(r"\n\s*\n")
RELATIONS = ("less than", "at least")


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """The sentences of a text. Line breaks are plain whitespace: a heading or a list item without a final period
    runs into the next sentence, as in the reference splitter, so counts stay comparable."""
    sentences, start = [], 0
    for end in SENTENCE_END.finditer(text):
        if not _ends_in_abbreviation(text[start:end.start()], end.group()):
            sentences.append(text[start:end.end()])
            start = end.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def _ends_in_abbreviation(before: str, mark: str) -> bool:
    if mark.rstrip("\"'”’)]") != ".":
        return False
    words = before.split()
    last_word = words[-1].lstrip("\"'“‘([") if words else ""
    return last_word.lower() in ABBREVIATIONS or bool(DOTTED.fullmatch(last_word) or LIST_NUMBER.search(before))


def _compare(count: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise ValueError(f"relation {relation!r} must be one of {', '.join(map(repr, RELATIONS))}")


def _language_is(text: str, language: str) -> bool:
    """Whether langdetect takes `text` to be in `language` (an ISO 639-1 code). A text it cannot place (no letters)
    counts as in the language, as in the reference checker, so scores stay comparable."""
    DetectorFactory.seed = 0  # langdetect samples features at random; a fixed seed makes its answer repeatable
    try:
        return detect(text) == language
    except LangDetectException:
        return True


# ------------------------------------------------------------------------------------------------- checkers
# One function per instruction type: the response, then the instruction's kwargs by the names the data file uses.


def no_comma(response: str) -> bool:
    return "," not in response


def number_words(response: str, relation: str, num_words: int) -> bool:
    return _compare(count_words(response), relation, num_words)


def number_sentences(response: str, relation: str, num_sentences: int) -> bool:
    return _compare(len(split_sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly n paragraphs between *** dividers. A divider before the first or after the last paragraph is
    forgiven; two dividers with nothing between them are not."""
    parts = [part.strip() for part in PARAGRAPH_DIVIDER.split(response)]
    inner = parts[1:-1]
    return all(inner) and sum(map(bool, parts)) == num_paragraphs


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly n paragraphs separated by blank lines, and paragraph `nth_paragraph` (from 1) starting with the word.
    Quotes before the word are skipped; anything else before it (markdown asterisks) is left to loose scoring."""
    paragraphs = [p.strip() for p in BLANK_LINE.split(response) if p.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    leading_word = re.match(r"\w*", paragraphs[nth_paragraph - 1].lstrip("\"'“‘"))
    return leading_word.group().lower() == first_word.strip().lower()


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    highlights = re.findall(r"(\*{1,2})([^\n*]+)\1", response)  # *italic* or **bold**, within one line
    return sum(1 for _, text in highlights if text.strip()) >= num_highlights


def json_format(response: str) -> bool:
    """The whole response is JSON, optionally inside a ``` or ```json fence."""
    unfenced = re.sub(r"^```(?:json)?|```$", "", response.strip(), flags=re.IGNORECASE)
    try:
        json.loads(unfenced)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    return any(text.strip() for text in re.findall(r"<<([^\n]+?)>>", response))


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least n sections, each opened by the splitter word and its number ("SECTION 1", "Day 2")."""
    markers = re.findall(rf"{re.escape(section_spliter.strip())}\s?\d+", response)
    return len(markers) >= num_sections


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly n markdown bullets: lines starting with "* " (not "**", which is bold) or "-"."""
    return len(re.findall(r"^[ \t]*(?:\*[^*\n]|-)", response, flags=re.MULTILINE)) == num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    return any(option in response for option in CONSTRAINED_RESPONSES)


def keywords_existence(response: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(keyword), response, flags=re.IGNORECASE) for keyword in keywords)


def keyword_frequency(response: str, keyword: str, relation: str, frequency: int) -> bool:
    return _compare(len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE)), relation, frequency)


def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(word)}\b", response, flags=re.IGNORECASE) for word in forbidden_words)


def letter_frequency(response: str, letter: str, let_relation: str, let_frequency: int) -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


def english_lowercase(response: str) -> bool:
    return response.islower() and _language_is(response, "en")


def english_capital(response: str) -> bool:
    return response.isupper() and _language_is(response, "en")


def capital_word_frequency(response: str, capital_relation: str, capital_frequency: int) -> bool:
    """Words written all in capitals ("NASA", "I", "HELLO,"), words being whitespace-separated."""
    capital_words = sum(1 for word in response.split() if word.isupper())
    return _compare(capital_words, capital_relation, capital_frequency)


def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == text[-1] == '"'


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Two different answers separated by ******. Empty text before the first or after the last separator is
    forgiven; an empty answer between separators is not."""
    parts = [part.strip() for part in response.split("******")]
    answers = [part for part in parts if part]
    return all(parts[1:-1]) and len(answers) == 2 and answers[0] != answers[1]


def postscript(response: str, postscript_marker: str) -> bool:
    """A postscript opened by the marker, in any case and with or without spaces after its periods ("p. s.")."""
    marker = re.escape(postscript_marker.strip().lower()).replace(r"\.", r"\.\s?")
    return re.search(rf"(?<!\w){marker}", response.lower()) is not None


def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def response_language(response: str, language: str) -> bool:
    return _language_is(response, language)


Checker = Callable[..., bool]
INSTRUCTIONS: dict[str, Checker] = {
    "punctuation:no_comma": no_comma,
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "keywords:existence": keywords_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "change_case:english_lowercase": english_lowercase,
    "change_case:english_capital": english_capital,
    "change_case:capital_word_frequency": capital_word_frequency,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "combination:repeat_prompt": repeat_prompt,
    "combination:two_responses": two_responses,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
    "language:response_language": response_language,
}


def _given(kwargs: dict) -> dict:
    """The kwargs an instruction was given: some copies of the data set list every kwarg name of every instruction
    type on each instruction, null where unused."""
    return {name: value for name, value in kwargs.items() if value is not None}


def check(instruction_id: str, kwargs: dict, prompt_text: str, response: str) -> bool:
    """Whether `response` follows the instruction, taken literally (strict). `prompt_text` is the prompt the response
    answers; every checker of the benchmark gets what it needs from its kwargs (even the text to repeat), so none
    reads it."""
    return bool(response.strip()) and INSTRUCTIONS[instruction_id](response, **_given(kwargs))


def loose_variants(response: str) -> list[str]:
    """The response as loose scoring reads it: whole, without its first line, its last line or both, and each of
    these without markdown asterisks."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return trimmed + [text.replace("*", "") for text in trimmed]


def check_loose(instruction_id: str, kwargs: dict, prompt_text: str, response: str) -> bool:
    return any(check(instruction_id, kwargs, prompt_text, variant) for variant in loose_variants(response))


# ---------------------------------------------------------------------------------------------------- data


def load(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """The prompts of an IFEval input_data.jsonl, the first `limit` of them when given. Every instruction is checked
    against the registry here, so a bad file fails before any generation starts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; IFEval's prompts are input_data.jsonl (fields key, prompt, "
                        "instruction_id_list, kwargs), one JSON object a line")
    return from_records(file_records(path), limit)


def from_records(records: Iterator[tuple[str, dict]], limit: int | None = None) -> list[Prompt]:
    return [_prompt(record, where) for where, record in itertools.islice(records, limit)]


def _prompt(record: dict, where: str) -> Prompt:
    instructions, kwargs = field(record, "instruction_id_list", where), field(record, "kwargs", where)
    if not isinstance(instructions, list) or not isinstance(kwargs, list):
        raise DataError(f"{where}: instruction_id_list and kwargs must be lists, got "
                        f"{type(instructions).__name__} and {type(kwargs).__name__}")
    if len(kwargs) != len(instructions):
        raise DataError(f"{where}: {len(kwargs)} kwargs for {len(instructions)} instructions; kwargs must hold one "
                        "dict per entry of instruction_id_list, in the same order ({} where there are none)")
    for instruction_id, given in zip(instructions, kwargs, strict=True):
        _validate(instruction_id, given, where)
    return Prompt(field(record, "key", where), field(record, "prompt", where), instructions,
                  [_given(given) for given in kwargs])


def _validate(instruction_id: object, kwargs: object, where: str) -> None:
    if not isinstance(instruction_id, str) or instruction_id not in INSTRUCTIONS:
        close = difflib.get_close_matches(str(instruction_id), INSTRUCTIONS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known instructions: {', '.join(INSTRUCTIONS)}"
        raise DataError(f"{where}: unknown instruction {instruction_id!r}; {hint}")
    if not isinstance(kwargs, dict):
        raise DataError(f"{where}: the kwargs of {instruction_id} must be a JSON object, got {type(kwargs).__name__}")
    checker = INSTRUCTIONS[instruction_id]
    try:
        inspect.signature(checker).bind("", **_given(kwargs))
    except TypeError as err:
        wanted = [name for name in inspect.signature(checker).parameters if name != "response"]
        raise DataError(f"{where}: {instruction_id} takes kwargs ({', '.join(wanted) or 'none'}), "
                        f"got ({', '.join(_given(kwargs)) or 'none'}): {err}") from None
    for name, value in _given(kwargs).items():
        if name.endswith("relation") and value not in RELATIONS:
            raise DataError(f"{where}: {instruction_id} {name} {value!r} must be one of "
                            f"{', '.join(map(repr, RELATIONS))}")


# ------------------------------------------------------------------------------------------------- scoring


def score(prompts: list[Prompt], responses: list[str]) -> tuple[list[Metric], list[dict]]:
    """Prompt- and instruction-level accuracy, strict and loose, and one record per prompt."""
    if len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    samples = [_sample(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
    metrics = []
    for mode in ("strict", "loose"):
        followed = [inst[mode] for sample in samples for inst in sample["instructions"]]
        metrics += [mean_metric(f"prompt_{mode}", [float(sample[mode]) for sample in samples]),
                    mean_metric(f"inst_{mode}", [float(ok) for ok in followed])]
    return metrics, samples


def _sample(prompt: Prompt, response: str) -> dict:
    results = [{"id": instruction_id,
                "strict": check(instruction_id, kwargs, prompt.prompt, response),
                "loose": check_loose(instruction_id, kwargs, prompt.prompt, response)}
               for instruction_id, kwargs in zip(prompt.instructions, prompt.kwargs, strict=True)]
    return {"key": prompt.key, "response": response, "strict": all(r["strict"] for r in results),
            "loose": all(r["loose"] for r in results), "instructions": results}


def run(lm: EvalModel, options: TaskOptions) -> TaskResult:
    """Zero-shot: each prompt as the model's user turn, answered greedily."""
    path = options.data_dir / "ifeval" / "input_data.jsonl"
    prompts = (load(path, options.limit) if path.is_file()
               else from_records(from_hub(path.parent, "google/IFEval", None, "train"), options.limit))
    params = SamplingParams(max_new_tokens=options.max_new_tokens or 512, temperature=0.0)
    completions = lm.generate([lm.as_chat(prompt.prompt) for prompt in prompts], params)
    metrics, samples = score(prompts, [completion.text for completion in completions])
    return TaskResult("ifeval", metrics, len(prompts), 0, samples)
