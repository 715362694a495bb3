"""arithmetic: the held-out problems of fermion.data.synthetic, answered and scored, for a model trained on the others.

The problems are the evaluation side of synthetic's held-out rule (a hash of "a op b"), at the sizes the generated
training data uses (operands up to synthetic.MAX_OPERAND, factors up to synthetic.MAX_FACTOR), so no evaluated
problem is ever in the generated pretraining, SFT or DPO data. Each is asked once; the order is a fixed shuffle for
`options.seed`, taking +, - and * in turn while each has problems left. Two scores per problem:

    exact     (the main metric) the greedy answer's first integer is the right answer
    pref_acc  log P(right answer) > log P(a plausible wrong answer) as the continuation of the same prompt: what DPO
              on synthetic's preference pairs trains directly, and a finer signal than exact on a weak model

Prompts: a base model gets "Question: What is 7 + 5?\\nAnswer:" (the format of synthetic.arithmetic_documents) and
its answer is the line that follows; a chat model (`lm.chat`) gets the question as the user turn, as the SFT and DPO
records put it, and its answer is the assistant's reply. For pref_acc, each answer is scored with what ends it in
training: a newline for a base model, the template's end of turn for a chat model (so "1" cannot win merely by being
a prefix of "13").
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from fermion.data import synthetic
from fermion.data.synthetic import Problem
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.sampling import Prompt, SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

TASK = "arithmetic"
DEFAULT_PROBLEMS = 200
MAX_NEW_TOKENS = 8
_INTEGER = re.compile(r"-?\d+")


def problems(n: int | None = DEFAULT_PROBLEMS, seed: int = 0) -> list[Problem]:
    """Up to n distinct evaluation problems (all there are when fewer), in a fixed order for the seed."""
    rng = random.Random(f"{TASK} eval order {seed}")
    by_op: dict[str, list[Problem]] = {op: [] for op in synthetic.OPERATIONS}
    for problem in synthetic.all_problems(split="eval"):
        by_op[problem.op].append(problem)
    for group in by_op.values():
        rng.shuffle(group)
    out: list[Problem] = []
    while any(by_op.values()):
        out += [group.pop(0) for group in by_op.values() if group]
    return out if n is None else out[:n]


def prompt(lm: EvalModel, problem: Problem) -> Prompt:
    return lm.as_chat(problem.question) if lm.chat else synthetic.base_prompt(problem)


def first_integer(text: str) -> int | None:
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def scoring_request(lm: EvalModel, problem: Problem, answer: int) -> tuple[str, str]:
    """(context, continuation) whose log-likelihood is the model's score for `answer`."""
    if not lm.chat:
        return synthetic.base_prompt(problem), f" {answer}\n"
    messages = [{"role": "user", "content": problem.question}, {"role": "assistant", "content": str(answer)}]
    text, spans = lm.template.render_spans(messages, lm.tokenizer)
    if spans:  # the reply as training sees it: the generation block, end of turn included
        start, end = spans[-1]
        return text[:start], text[start:end]
    context = lm.template.render(messages[:1], lm.tokenizer, add_generation_prompt=True)
    return context, str(answer) + (lm.template.stop_strings[0] if lm.template.stop_strings else "")


def run(lm: EvalModel, options: TaskOptions) -> TaskResult:
    """Greedy answers to the first `options.limit` (default 200) evaluation problems of seed `options.seed`, and
    the right answer's log-likelihood against a wrong one's."""
    chosen = problems(options.limit or DEFAULT_PROBLEMS, options.seed)
    # A base model's answer is the rest of the line; a chat model's ends with its turn.
    params = SamplingParams(max_new_tokens=options.max_new_tokens or MAX_NEW_TOKENS, temperature=0.0,
                            stop=[] if lm.chat else ["\n"])
    completions = lm.generate([prompt(lm, problem) for problem in chosen], params)
    rng = random.Random(f"{TASK} wrong answers {options.seed}")
    wrongs = [synthetic.wrong_answer(problem, rng) for problem in chosen]
    requests = [scoring_request(lm, problem, answer) for problem, wrong in zip(chosen, wrongs, strict=True)
                for answer in (problem.answer, wrong)]
    scores = lm.loglikelihood(requests)
    samples = []
    for i, (problem, completion, wrong) in enumerate(zip(chosen, completions, wrongs, strict=True)):
        right_lp, wrong_lp = scores[2 * i].logprob, scores[2 * i + 1].logprob
        got = first_integer(completion.text)
        samples.append({"id": f"{problem.a} {problem.op} {problem.b}", "question": problem.question,
                        "expected": problem.answer, "output": completion.text, "answer": got,
                        "exact": got == problem.answer, "wrong": wrong, "logprob_right": round(right_lp, 4),
                        "logprob_wrong": round(wrong_lp, 4), "pref_acc": right_lp > wrong_lp})
    # Each sample keeps its scores under the metrics' names, so two runs can be compared problem by problem.
    metrics = [mean_metric(name, [float(s[name]) for s in samples]) for name in ("exact", "pref_acc")]
    return TaskResult(TASK, metrics, len(samples), 0, samples)
