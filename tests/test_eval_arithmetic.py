"""The arithmetic eval task: held-out problems, prompts for base and chat models, exact answers, preference accuracy."""

import pytest
from conftest import tiny_model

from fermion.data import synthetic
from fermion.eval import arithmetic, runner
from fermion.eval.results import TaskOptions
from fermion.infer.engine import Completion
from fermion.infer.lm import EvalModel, LogLikelihood


def test_problems_are_held_out_distinct_seeded_and_mixed():
    chosen = arithmetic.problems()
    held = set(synthetic.all_problems(split="eval"))
    assert len(chosen) == min(arithmetic.DEFAULT_PROBLEMS, len(held)) and len(set(chosen)) == len(chosen)
    assert set(chosen) <= held
    assert {p.op for p in chosen[:3]} == {"+", "-", "*"}  # the operations take turns
    assert chosen == arithmetic.problems() and chosen[:10] == arithmetic.problems(10)
    assert chosen != arithmetic.problems(seed=1)
    assert "arithmetic" in runner.task_names("all") and runner._task("arithmetic") is arithmetic.run


class Scripted(EvalModel):
    """A tiny model whose answers and log-likelihoods are scripted: right (or wrong) every time."""

    def __init__(self, tokenizer, chat: bool, right: bool):
        super().__init__(tiny_model(vocab_size=512, context_length=512), tokenizer, chat=chat)
        self.right, self.prompts, self.requests = right, [], []

    def generate(self, prompts, params, constraints=None):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            question = prompt[-1]["content"] if self.chat else prompt.split("\n")[0].removeprefix("Question: ")
            a, op, b = question.removeprefix("What is ").removesuffix("?").split()
            answer = synthetic.make_problem(int(a), op, int(b)).answer + (0 if self.right else 1)
            out.append(Completion([], [], f" {answer}" if not self.chat else f"{answer}.", "stop"))
        return out

    def loglikelihood(self, requests):
        self.requests += requests
        # requests come in (right, wrong) pairs for each problem
        return [LogLikelihood(-1.0 if (i % 2 == 0) == self.right else -5.0, False, 1, len(cont))
                for i, (_, cont) in enumerate(requests)]


@pytest.mark.parametrize("chat", [False, True])
def test_a_model_that_is_always_right_scores_one(shakespeare_tokenizer, chat):
    lm = Scripted(shakespeare_tokenizer, chat, right=True)
    result = arithmetic.run(lm, TaskOptions(data_dir=".", limit=30))
    assert result.task == "arithmetic" and result.n == 30 and result.shots == 0
    assert [m.name for m in result.metrics] == ["exact", "pref_acc"]
    assert result.metric("exact").value == result.metric("pref_acc").value == 1.0
    assert all(s["answer"] == s["expected"] and s["wrong"] != s["expected"] for s in result.samples)
    if chat:
        assert lm.prompts[0] == [{"role": "user", "content": lm.prompts[0][0]["content"]}]
        context, right = lm.requests[0]
        assert context.endswith("<|im_start|>assistant\n") and right.endswith("<|im_end|>")
        assert lm.prompts[0][0]["content"] in context
    else:
        assert lm.prompts[0] == f"Question: {result.samples[0]['question']}\nAnswer:"
        assert lm.requests[0] == (lm.prompts[0], f" {result.samples[0]['expected']}\n")
        assert lm.requests[1] == (lm.prompts[0], f" {result.samples[0]['wrong']}\n")
    wrong = arithmetic.run(Scripted(shakespeare_tokenizer, chat, right=False), TaskOptions(data_dir=".", limit=30))
    assert wrong.metric("exact").value == wrong.metric("pref_acc").value == 0.0


@pytest.mark.parametrize("chat", [False, True])
def test_a_random_tiny_model_gets_scores_with_standard_errors(shakespeare_tokenizer, chat):
    lm = EvalModel(tiny_model(vocab_size=512, context_length=512), shakespeare_tokenizer, chat=chat)
    result = arithmetic.run(lm, TaskOptions(data_dir=".", limit=12, max_new_tokens=4))
    assert result.n == 12 and len(result.samples) == 12
    for metric in result.metrics:
        assert 0.0 <= metric.value <= 1.0 and metric.stderr is not None and metric.stderr >= 0
    for sample in result.samples:
        assert sample["logprob_right"] < 0 and sample["logprob_wrong"] < 0
        assert sample["pref_acc"] == (sample["logprob_right"] > sample["logprob_wrong"])
    again = arithmetic.run(lm, TaskOptions(data_dir=".", limit=12, max_new_tokens=4))
    assert again.samples == result.samples  # greedy and seeded: the same run twice


def test_answers_are_read_as_the_first_integer():
    assert arithmetic.first_integer(" 12\n") == 12
    assert arithmetic.first_integer("The answer is 7, not 8.") == 7
    assert arithmetic.first_integer("-3") == -3 and arithmetic.first_integer("none") is None
