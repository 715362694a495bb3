"""tinytask: the generator, the SFT data it writes, scoring, and grammar-constrained decoding on a tiny model."""

import importlib.util
import json

import pytest
from conftest import tiny_model

from fermion.chat.conversations import to_messages
from fermion.chat.templates import ChatTemplate
from fermion.chat.tools import call_schema
from fermion.config import SourceConfig
from fermion.data.sources import iter_records
from fermion.data.synthetic import tinytask as tinytask_data
from fermion.data.synthetic import write_jsonl
from fermion.eval import tinytask
from fermion.eval.results import TaskOptions
from fermion.infer.lm import EvalModel

needs_llguidance = pytest.mark.skipif(importlib.util.find_spec("llguidance") is None,
                                      reason="llguidance is not installed")


def test_same_seed_same_problems_and_other_seeds_differ():
    first, again = tinytask_data.problems(40, seed=0), tinytask_data.problems(40, seed=0)
    other = tinytask_data.problems(40, seed=1)
    assert first == again
    assert [p.request for p in first] != [p.request for p in other]
    assert tinytask_data.problems(10, seed=0) == first[:10]
    assert {p.answer["name"] for p in first} == set(tinytask_data.TOOLS)


def test_every_expected_answer_is_a_perfect_answer():
    for problem in tinytask_data.problems(200):
        assert tinytask.score(problem, problem.answer_text) == {"valid_json": True, "schema_ok": True, "exact": True,
                                                                "arguments": 1.0}
        assert problem.answer["name"] in [tool["name"] for tool in problem.tools]


def test_training_data_never_holds_an_evaluated_call():
    evaluated = tinytask_data.problems(1000)
    trained = [record["messages"] for record in tinytask_data.sft_records(3000)]
    assert not {p.answer_text for p in evaluated} & {m[2]["content"] for m in trained}
    assert not {tinytask_data.user_text(p) for p in evaluated} & {m[1]["content"] for m in trained}


def test_scores_broken_wrong_and_fenced_answers():
    problem = next(p for p in tinytask_data.problems(8) if p.answer["name"] == "book_flight")
    arguments = problem.answer["arguments"]
    wrong_city = {**arguments, "origin": next(c for c in tinytask_data.CITIES if c != arguments["origin"])}

    def answer(**changes):
        return json.dumps({**problem.answer, **changes})

    cases = {
        problem.answer_text[:-1]: (False, False, False),  # cut short
        "Sure! " + problem.answer_text: (False, False, False),
        "[1, 2]": (False, False, False),  # JSON, but not an object
        answer(arguments={**arguments, "passengers": 12}): (True, False, False),  # out of range
        answer(arguments={**arguments, "passengers": "2"}): (True, False, False),  # a string, not an integer
        answer(arguments={**arguments, "seat": "12A"}): (True, False, False),  # an argument the tool does not take
        answer(arguments={**arguments, "date": "5 May 2025"}): (True, False, False),  # not YYYY-MM-DD
        answer(name="calculate"): (True, False, False),  # a tool that is not offered
        answer(arguments=wrong_city): (True, True, False),
        f"```json\n{problem.answer_text}\n```": (True, True, True),
        json.dumps(problem.answer, indent=2): (True, True, True),
        json.dumps({"arguments": dict(reversed(arguments.items())), "name": problem.answer["name"]}):
            (True, True, True),  # key order does not matter
    }
    for text, expected in cases.items():
        got = tinytask.score(problem, text)
        assert (got["valid_json"], got["schema_ok"], got["exact"]) == expected, text
        assert got["arguments"] == (1.0 if expected[2] else 0.0 if not expected[0] else got["arguments"]), text
    n = len(arguments)
    assert tinytask.score(problem, answer(arguments=wrong_city))["arguments"] == (n - 1) / n
    assert tinytask.score(problem, answer(arguments={**wrong_city, "passengers": 12}))["arguments"] == (n - 2) / n
    assert tinytask.score(problem, answer(name="calculate"))["arguments"] == 0.0
    missing = {k: v for k, v in arguments.items() if k != "origin"}
    assert tinytask.score(problem, answer(arguments=missing))["arguments"] == (n - 1) / n


def test_sft_records_train_through_the_chat_template(tmp_path, shakespeare_tokenizer):
    path = write_jsonl(tmp_path / "tinytask.jsonl", tinytask_data.sft_records(20, seed=3))
    records = list(iter_records(SourceConfig(name="tinytask", paths=[str(path)])))
    assert len(records) == 20
    template = ChatTemplate.get("chatml")
    for where, record in records:
        messages = to_messages(record, where)
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        encoded = template.encode(shakespeare_tokenizer, messages)
        learned = shakespeare_tokenizer.decode([t for t, m in zip(encoded.ids, encoded.mask, strict=True) if m])
        assert learned == messages[2]["content"] + "<|im_end|>"
        assert tinytask.parse_call(messages[2]["content"]) is not None


def test_longest_json_bounds_every_answer():
    for problem in tinytask_data.problems(200):
        assert len(problem.answer_text) <= tinytask.longest_json(call_schema(problem.tools))


@needs_llguidance
def test_constraint_starts_an_object_and_allows_only_eos_once_complete(shakespeare_tokenizer):
    from fermion.infer.constrain import JsonSchemaGrammar

    tokenizer = shakespeare_tokenizer
    problem = tinytask_data.problems(1)[0]
    constraint = JsonSchemaGrammar(tokenizer, call_schema(problem.tools)).constraint()
    first = constraint.allowed().nonzero().flatten().tolist()
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    for token in tokenizer.encode(problem.answer_text):
        assert constraint.allowed()[token], tokenizer.decode([token])
        constraint.accept(token)
    assert constraint.allowed().nonzero().flatten().tolist() == [tokenizer.eos_id]
    constraint.accept(tokenizer.eos_id)


@needs_llguidance
def test_constraint_refuses_a_token_outside_the_grammar(shakespeare_tokenizer):
    from fermion.infer.constrain import json_schema_constraint

    constraint = json_schema_constraint(shakespeare_tokenizer, {"type": "object"})
    outside = shakespeare_tokenizer.encode("x")[0]
    assert not constraint.allowed()[outside]
    with pytest.raises(RuntimeError, match="does not fit the grammar"):
        constraint.accept(outside)


@needs_llguidance
@pytest.mark.parametrize("chat", [False, True])
def test_constrained_decoding_makes_a_random_model_answer_in_schema(shakespeare_tokenizer, chat):
    lm = EvalModel(tiny_model(vocab_size=512, context_length=512), shakespeare_tokenizer, chat=chat)
    free = tinytask.run(lm, TaskOptions(data_dir=".", limit=5))
    # A budget far below the longest answer: the constrained run must raise it rather than cut a document short.
    constrained = tinytask.run(lm, TaskOptions(data_dir=".", limit=5, max_new_tokens=8), constrained=True)
    assert free.task == "tinytask" and constrained.task == "tinytask_constrained"
    assert free.metric("valid_json").value < 1.0
    assert constrained.metric("valid_json").value == constrained.metric("schema").value == 1.0
    assert not any(sample["cut"] for sample in constrained.samples)
    assert all(sample["finish_reason"] == "stop" for sample in constrained.samples)


def test_prompts_cut_to_fit_the_context_are_counted_and_said_beside_the_score(shakespeare_tokenizer):
    """A prompt longer than the context leaves room for loses its beginning (the tools' schemas here), which
    understates the model: the runner counts such prompts per task and its progress line says so."""
    from fermion.eval import runner

    options = TaskOptions(data_dir=".", limit=3, max_new_tokens=4)
    roomy = EvalModel(tiny_model(vocab_size=512, context_length=2048), shakespeare_tokenizer, chat=True)
    [whole] = runner.run(roomy, ["tinytask"], options)
    assert whole.cut_prompts == 0 and "warning" not in runner.progress(whole, 1.0)
    cramped = EvalModel(tiny_model(vocab_size=512, context_length=128), shakespeare_tokenizer, chat=True)
    [cut] = runner.run(cramped, ["tinytask"], options)
    assert cut.cut_prompts == 3
    assert ("warning: 3 of 3 tinytask prompts did not fit the model's context with room to answer"
            in runner.progress(cut, 1.0))
