"""The smoke test's verdict rules, its summary and table, and one run through a tiny model."""

import re
from collections import Counter

import pytest
import torch
import yaml
from conftest import SHARED_DATA, tiny_model
from rich.console import Console

from fermion.chat.templates import ChatTemplate
from fermion.config import RecipeError, SmokeSettings, load_recipe
from fermion.eval import smoke
from fermion.eval.results import TaskOptions, TaskResult
from fermion.infer.lm import EvalModel

CAT, FIB, FRANCE, COLOURS = (smoke.PROMPTS[i] for i in (0, 3, 6, 9))
MARKERS = list(smoke.TEMPLATE_MARKERS)
CAT_STORY = "Tom was a little cat who loved to play with his red ball. One day he lost it under the bed."
FIB_CODE = "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.mark.parametrize("prompt, text, finish_reason, chat, label, reason", [
    (CAT, "", "stop", False, "FAIL", "empty"),
    (CAT, " \n\t ", "length", False, "FAIL", "empty"),
    (CAT, "the cat " * 12, "length", False, "FAIL", "loop: 'the cat ' repeated"),
    (CAT, "Tom saw a bird.\nThe cat ran after it.\n" * 3, "length", False, "FAIL", "loop: line"),
    (CAT, "Tom said " + "a" * 40, "length", False, "FAIL", "loop: 'a' repeated"),
    (CAT, "Tom looked at the sky.\n" + "-" * 40, "length", False, "FAIL", "loop: '-' repeated"),  # stuck when cut
    (CAT, "the cat sat on the mat and " * 5, "length", False, "FAIL", "distinct 4-grams"),
    (CAT, CAT_STORY + "<|im_end|>", "stop", True, "FAIL", "template leak"),
    (CAT, "### Response:\n" + CAT_STORY, "stop", False, "FAIL", "template leak"),
    (CAT, "The stock market fell sharply on Monday as investors worried about rates.", "stop", False,
     "WEAK", "off topic"),
    (CAT, "Tom purred.", "stop", False, "WEAK", "too short"),
    # A base model's continuation starts with the space after the prompt: that is not indented code.
    (CAT, " The stock market fell sharply on Monday as investors worried.", "stop", False, "WEAK", "off topic"),
    (CAT, "Tom had a ball. Tom had a ball. Tom had a hat. Tom had a ball. Tom had a cup. Tom had a ball.",
     "length", False, "WEAK", "repetitive"),
    (CAT, "def cat(tom):\n    return tom\n", "stop", False, "WEAK", "code, not prose"),
    (CAT, CAT_STORY, "length", False, "OK", ""),
    (FIB, FIB_CODE, "length", False, "OK", ""),
    (FIB, "Here it is:\n```python\ndef fibonacci(n):\n" + FIB_CODE + "```", "stop", True, "OK", ""),
    (FIB, "The Fibonacci numbers grow quickly.", "stop", True, "WEAK", "prose, not code"),
    (FIB, "    # =================================\n" + FIB_CODE, "length", False, "OK", ""),
    (FIB, FIB_CODE + " " * 40, "length", False, "OK", ""),  # cut off in deep indentation
    (FRANCE, "Paris.", "stop", True, "OK", ""),
    (FRANCE, "The capital of France is Paris.", "stop", True, "OK", ""),
    (FRANCE, "The capital of France is London.", "stop", True, "WEAK", "expected answer 'paris' missing"),
    (COLOURS, "Red, blue and green are three", "length", True, "WEAK", "cut off mid-sentence"),
    (COLOURS, "Red, blue and green are three", "length", False, "OK", ""),  # a base model never knows where to stop
    (COLOURS, "Red, blue and green.", "length", True, "OK", ""),
])
def test_verdict_rules(prompt, text, finish_reason, chat, label, reason):
    verdict = smoke.verdict(prompt, text, finish_reason, MARKERS, chat=chat)
    assert verdict.label == label, verdict
    assert reason in verdict.reason, verdict


def test_keywords_match_whole_words_and_plurals():
    assert smoke.mentions("Two Cats sat", "cat")
    assert not smoke.mentions("they will locate it tomorrow", "cat")
    assert not smoke.mentions("see you tomorrow", "tom")
    assert smoke.mentions("return n % 2 == 0", "%")


def test_prompts_cover_each_kind_three_times():
    assert len(smoke.PROMPTS) == 12
    assert Counter(p.kind for p in smoke.PROMPTS) == {kind: 3 for kind in smoke.KINDS}
    assert all(p.keywords and p.chat_text and p.plain_text for p in smoke.PROMPTS)


def sample(label: str) -> dict:
    return {"kind": "story", "prompt": "p", "temperature": 0.3, "text": "[bold]x[/bold]\nnext line", "verdict": label,
            "reason": "why"}


def test_summary_counts_each_verdict():
    result = TaskResult("smoke", [], n=12, shots=0,
                        samples=[sample("OK")] * 9 + [sample("WEAK")] * 3)
    assert smoke.summary(result) == "9 OK / 3 WEAK / 0 FAIL"


def test_table_shows_answers_literally():
    result = TaskResult("smoke", [], n=2, shots=0, samples=[sample("OK"), sample("FAIL")])
    console = Console(width=200, record=True)
    console.print(smoke.table(result))
    shown = console.export_text()
    assert "[bold]x[/bold] next line" in shown  # markup-looking text is not swallowed, newlines are flattened
    assert "1 OK / 0 WEAK / 1 FAIL" in shown


def test_run_judges_every_prompt_at_both_temperatures(shakespeare_tokenizer):
    torch.set_num_threads(1)
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    result = smoke.run(lm, TaskOptions(data_dir=SHARED_DATA / "eval", max_new_tokens=8))
    assert (result.task, result.n, result.shots) == ("smoke", 24, 0)
    assert Counter(s["temperature"] for s in result.samples) == {0.3: 12, 1.0: 12}
    assert {s["verdict"] for s in result.samples} <= set(smoke.LABELS)
    fractions = [result.metric(name).value for name in ("ok", "weak", "fail")]
    assert sum(fractions) == pytest.approx(1.0)
    counts = [int(part.split()[0]) for part in smoke.summary(result).split(" / ")]
    assert sum(counts) == 24
    assert [s["prompt"] for s in result.samples[:12]] == [p.plain_text for p in smoke.PROMPTS]  # a base model
    limited = smoke.run(lm, TaskOptions(data_dir=SHARED_DATA / "eval", max_new_tokens=8, limit=3))
    assert limited.n == 6 and [s["prompt"] for s in limited.samples[:3]] == [p.plain_text for p in smoke.PROMPTS[:3]]


def test_markers_add_the_templates_stops_and_special_tokens(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer, template=ChatTemplate.get("tagged"))
    markers = smoke.markers_for(lm)
    assert {"</assistant>", shakespeare_tokenizer.eos_token, "<|im_start|>"} <= set(markers)
    assert smoke.verdict(CAT, CAT_STORY + "</assistant>", "stop", markers).label == "FAIL"


def test_a_recipe_chooses_the_prompts_and_temperatures(shakespeare_tokenizer, tmp_path):
    """eval.smoke: the recipe's own prompts at its own temperatures, in the result's samples; a prompt without
    keywords is not judged off topic. Without the section, the built-in dozen at 0.3 and 1.0."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"eval": {"smoke": {"temperatures": [0.0, 0.7, 1.2], "prompts": [
        {"prompt": "What is the capital of France?", "opening": "The capital of France is", "kind": "factual",
         "keywords": ["paris"]},
        {"prompt": "Say something."}]}}}))
    recipe = load_recipe(path)
    torch.set_num_threads(1)
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer, recipe=recipe)
    result = smoke.run(lm, TaskOptions(data_dir=SHARED_DATA / "eval", max_new_tokens=8))
    assert result.n == 6
    assert [(s["prompt"], s["temperature"]) for s in result.samples] == [
        (text, t) for t in (0.0, 0.7, 1.2) for text in ("The capital of France is", "Say something.")]
    france, free = smoke.prompts_of(recipe.eval.smoke)
    assert (france.kind, france.chat_text, france.keywords) == ("factual", "What is the capital of France?", ("paris",))
    assert (free.kind, free.keywords) == ("instruction", ())
    assert smoke.weakness(free, "Birds sing in the morning.", "stop", chat=False) is None
    assert smoke.prompts_of(SmokeSettings()) is smoke.PROMPTS and SmokeSettings().temperatures == [0.3, 1.0]


@pytest.mark.parametrize("smoke_section, message", [
    ("{temperatures: [-0.5]}", "eval.smoke.temperatures[0]"),
    ("{temperatures: []}", "eval.smoke.temperatures"),
    ("{prompts: [{prompt: Hi, kind: poem}]}", "eval.smoke.prompts[0].kind"),
    ("{prompts: [{text: Hi}]}", "'eval.smoke.prompts[0].prompt' is required"),
])
def test_bad_smoke_settings_name_the_field(tmp_path, smoke_section, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"eval:\n  smoke: {smoke_section}\n")
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
