"""IFEval: every instruction type's checker on handwritten responses that follow it and that break it, strict versus
loose scoring, the data file's instructions all known, bad files named by line, and a run with a tiny model."""

import json

import pytest
from conftest import SHARED_DATA, tiny_model

from fermion.data.sources import DataError
from fermion.eval import ifeval
from fermion.eval.results import TaskOptions
from fermion.infer.lm import EvalModel

DATA = SHARED_DATA / "eval" / "ifeval" / "input_data.jsonl"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} is missing")

PROSE = "The river ran fast and cold through the valley, and the village slept beside it until the spring."
ITALIAN = "Oggi il tempo è bello e andiamo al mare con i nostri amici per tutto il pomeriggio."

# (instruction id, kwargs shaped like the data file's, a response that follows the instruction, one that breaks it)
CASES = [
    ("punctuation:no_comma", {}, "Tokyo then Kyoto then Osaka.", "Tokyo, then Kyoto."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "one two three four five", "one two three four"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "one two three four", "one two three four five"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith met Mr. Jones in the U.S. on Monday. It rained.", "It rained. It poured. It stopped."),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "Is it wet? Yes! It rained.", "Is it wet? Yes, e.g. it rained."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.\n***\nThird part.\n***", "First part.\n***\nSecond part.\n\nThird part."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n* * *\nSecond part.", "First part.\n***\n***\nSecond part."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"},
     "Intro here.\n\n\"Summary: it works.\"\n\nThe end.", "Intro here.\n\nIn summary it works.\n\nThe end."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"},
     "Elm trees grow tall.\n\nThey live long.", "Elm trees grow tall.\nThey live long."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*Early life* and then **Career** followed.", "*Early life* and then ** ** followed."),
    ("detectable_format:json_format", {}, '```json\n{"name": "fermion", "size": 3}\n```', 'Here: {"name": "fermion"}'),
    ("detectable_format:title", {}, "<<A Letter to My Boss>>\nI quit.", "<< >>\nA Letter to My Boss\nI quit."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nHistory.\nSECTION 2\nToday.", "SECTION 1\nHistory.\nSection 2\nToday."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Fruit:\n* apple\n* pear\n- plum\n**Note** ripe only.", "Fruit:\n* apple\n* pear"),
    ("detectable_format:constrained_response", {}, "I thought about it. My answer is maybe.", "My answer is: yes."),
    ("keywords:existence", {"keywords": ["intern", "grow"]}, "Interns GROW fast.", "Interns learn fast."),
    ("keywords:frequency", {"keyword": "fake", "relation": "at least", "frequency": 2},
     "Fake news is fake.", "Fake news is false."),
    ("keywords:frequency", {"keyword": "war", "relation": "less than", "frequency": 2},
     "War is bad.", "War and war."),
    ("keywords:forbidden_words", {"forbidden_words": ["can", "ride"]},
     "Cannot stop the riders.", "You CAN go."),
    ("keywords:letter_frequency", {"letter": "q", "let_relation": "at least", "let_frequency": 2},
     "Quick quiz.", "A quick test."),
    ("keywords:letter_frequency", {"letter": "!", "let_relation": "less than", "let_frequency": 2},
     "Wow! Great.", "Wow! Great!"),
    ("change_case:english_lowercase", {}, PROSE.lower(), PROSE),
    ("change_case:english_lowercase", {}, PROSE.lower(), ITALIAN.lower()),
    ("change_case:english_capital", {}, PROSE.upper(), PROSE),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "The NASA team and ESA, together.", "The NASA team and Esa, together."),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "The NASA team and Esa.", "The NASA team and ESA."),
    ("startend:end_checker", {"end_phrase": "Peace!"}, '"Go home. peace!"', "Peace! Go home."),
    ("startend:quotation", {}, '  "Wrapped in quotes."\n', 'Not "wrapped" in quotes.'),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a limerick about Hannah."},
     "write a limerick about hannah. There once was...", "Sure! Write a limerick about Hannah."),
    ("combination:two_responses", {}, "Jehovah\n******\nAllah\n******", "Jehovah\n******\nJehovah"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\n\np. p. s. Call me.", "Bye.\nP.S. Call."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. Call me.", "Bye. PS call me."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name], see you at (address)."),
    ("language:response_language", {"language": "it"}, ITALIAN, PROSE),
]


def case_id(case) -> str:
    return case[0].split(":")[1] + "-" + "-".join(str(v) for v in case[1].values() if isinstance(v, (str, int)))


@pytest.mark.parametrize("instruction_id, kwargs, follows, breaks", CASES, ids=map(case_id, CASES))
def test_checker_passes_a_following_response_and_fails_a_breaking_one(instruction_id, kwargs, follows, breaks):
    assert ifeval.check(instruction_id, kwargs, "prompt", follows)
    assert not ifeval.check(instruction_id, kwargs, "prompt", breaks)


@pytest.mark.parametrize("text, sentences", [
    ("Dr. Smith met J. R. Tolkien in the U.S. today. It rained e.g. twice!", 2),
    ("1. Buy milk.\n2. Buy eggs.", 2),
    ("Prices rose 3.5 percent. See example.com. Neither do I. Then...", 4),
    ('"Stop!" he said. Why? ', 3),
    ("A heading\nruns into its first sentence. Like this", 2),
])
def test_sentences_end_at_terminal_punctuation_but_not_abbreviations(text, sentences):
    assert len(ifeval.split_sentences(text)) == sentences


def test_every_registered_instruction_has_cases():
    assert {case[0] for case in CASES} == set(ifeval.INSTRUCTIONS)


def test_an_empty_response_follows_nothing():
    assert not ifeval.check("punctuation:no_comma", {}, "prompt", "  \n")
    assert not ifeval.check_loose("punctuation:no_comma", {}, "prompt", "")


def test_null_kwargs_are_ignored():
    kwargs = {"num_words": 2, "relation": "at least", "keywords": None, "language": None}
    assert ifeval.check("length_constraints:number_words", kwargs, "prompt", "two words")


@needs_data
def test_every_instruction_in_the_data_file_is_checked():
    ids_in_file = {i for line in DATA.open() for i in json.loads(line)["instruction_id_list"]}
    assert ids_in_file == set(ifeval.INSTRUCTIONS)
    prompts = ifeval.load(DATA)
    assert len(prompts) == 541
    for prompt in prompts:
        for instruction_id, kwargs in zip(prompt.instructions, prompt.kwargs, strict=True):
            for check in (ifeval.check, ifeval.check_loose):
                assert isinstance(check(instruction_id, kwargs, prompt.prompt, "A dummy answer.\n*Done*"), bool)


@pytest.mark.parametrize("instruction_id, kwargs, response", [
    ("startend:quotation", {}, 'Sure, here is my answer:\n"Wrapped in quotes."'),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done.\n**Is there anything else I can help with?**"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "summary"},
     "**Summary** of the book.\n\nIt ends well."),
    ("detectable_format:json_format", {}, 'Sure, here is the JSON:\n{"a": 1}\nHope this helps!'),
])
def test_loose_forgives_a_preamble_or_markdown_asterisks(instruction_id, kwargs, response):
    assert not ifeval.check(instruction_id, kwargs, "prompt", response)
    assert ifeval.check_loose(instruction_id, kwargs, "prompt", response)


def test_score_is_prompt_and_instruction_accuracy_strict_and_loose():
    prompts = [ifeval.Prompt(1, "p1", ["punctuation:no_comma", "startend:quotation"], [{}, {}]),
               ifeval.Prompt(2, "p2", ["punctuation:no_comma"], [{}])]
    responses = ['Sure here it is:\n"No commas here."', "One, two."]
    metrics, samples = ifeval.score(prompts, responses)
    values = {m.name: m.value for m in metrics}
    # prompt 1: no_comma passes both ways, quotation only loosely; prompt 2 fails both ways
    assert values == {"prompt_strict": 0.0, "inst_strict": 1 / 3, "prompt_loose": 0.5, "inst_loose": 2 / 3}
    assert [m.name for m in metrics] == ["prompt_strict", "inst_strict", "prompt_loose", "inst_loose"]
    assert samples[0] == {"key": 1, "response": responses[0], "strict": False, "loose": True, "instructions": [
        {"id": "punctuation:no_comma", "strict": True, "loose": True},
        {"id": "startend:quotation", "strict": False, "loose": True}]}
    with pytest.raises(ValueError, match="1 responses for 2 prompts"):
        ifeval.score(prompts, ["only one"])


def write_lines(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


GOOD = {"key": 1, "prompt": "Say hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("bad_line, message", [
    ('{"key": 2, "prompt": ', r"input_data.jsonl:2: not valid JSON"),
    ({"key": 2, "instruction_id_list": [], "kwargs": []}, r":2: missing field 'prompt'"),
    ({**GOOD, "kwargs": [{}, {}]}, r":2: 2 kwargs for 1 instructions; kwargs must hold one dict per entry"),
    ({**GOOD, "instruction_id_list": ["punctuation:no_comas"]},
     r":2: unknown instruction 'punctuation:no_comas'; did you mean 'punctuation:no_comma'\?"),
    ({**GOOD, "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 5}]},
     r":2: length_constraints:number_words takes kwargs \(relation, num_words\), got \(num_words\)"),
    ({**GOOD, "instruction_id_list": ["keywords:frequency"],
      "kwargs": [{"keyword": "a", "relation": "at most", "frequency": 2}]},
     r":2: keywords:frequency relation 'at most' must be one of 'less than', 'at least'"),
])
def test_load_names_the_bad_line_and_what_is_expected(tmp_path, bad_line, message):
    path = tmp_path / "input_data.jsonl"
    write_lines(path, [GOOD, bad_line])
    with pytest.raises(DataError, match=message):
        ifeval.load(path)


def test_load_keeps_the_first_prompts_and_drops_null_kwargs(tmp_path):
    path = tmp_path / "input_data.jsonl"
    write_lines(path, [{**GOOD, "kwargs": [{"num_words": None}]}, {**GOOD, "key": 2}, '{"broken'])
    assert ifeval.load(path, limit=2) == [ifeval.Prompt(1, "Say hi", ["punctuation:no_comma"], [{}]),
                                          ifeval.Prompt(2, "Say hi", ["punctuation:no_comma"], [{}])]
    with pytest.raises(DataError, match="not found"):
        ifeval.load(tmp_path / "missing.jsonl")


@needs_data
def test_run_generates_and_scores_the_first_prompts(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    result = ifeval.run(lm, TaskOptions(data_dir=SHARED_DATA / "eval", limit=3, max_new_tokens=8))
    assert (result.task, result.n, result.shots, len(result.samples)) == ("ifeval", 3, 0, 3)
    assert [m.name for m in result.metrics] == ["prompt_strict", "inst_strict", "prompt_loose", "inst_loose"]
    assert all(0.0 <= m.value <= 1.0 for m in result.metrics)
    assert [s["key"] for s in result.samples] == [p.key for p in ifeval.load(DATA, limit=3)]
