"""fermion eval: scoring, the benchmark readers, answer extraction, perplexity, the runner, the CLI and the trainer
hook. lm-eval parity is in test_eval_lmeval.py; IFEval, HumanEval, tinytask and the smoke test have their own files."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SHARED_DATA, cli, tiny_model

from fermion.data.sources import DataError
from fermion.eval import generative, multiple_choice, runner
from fermion.eval.perplexity import text_nll, windows
from fermion.eval.results import Metric, TaskOptions, TaskResult, mean_metric, to_markdown
from fermion.infer.lm import EvalModel

EVAL_DATA = SHARED_DATA / "eval"
needs_data = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"{EVAL_DATA} is missing")


def naive_logprob(lm: EvalModel, context: str, continuation: str) -> float:
    """The textbook computation: one row per request, the whole sequence through the model, no sharing."""
    ctx, cont = lm._fit(*lm.encode_pair(context, continuation))
    logits, _ = lm.model(torch.tensor([ctx + cont[:-1]]))
    logprobs = F.log_softmax(logits[0, len(ctx) - 1:].float(), dim=-1)
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8}, {"n_kv_heads": 4, "tie_embeddings": True}])
def test_shared_context_scoring_equals_one_row_per_request(shakespeare_tokenizer, overrides):
    lm = EvalModel(tiny_model(vocab_size=512, **overrides), shakespeare_tokenizer, batch_tokens=96)
    long_context = "KING HENRY: " + "Once more unto the breach, dear friends, once more; " * 4
    requests = [("ROMEO: But soft, what light", " through yonder window breaks"),
                ("ROMEO: But soft, what light", " is"), ("ROMEO: But soft, what light", " x"),
                ("ROMEO: But soft, what light ", "breaks"),  # trailing space moves to the continuation
                ("", "To be or not to be"),  # empty context: the BOS token stands in
                (long_context, " or close the wall up"),  # longer than the window: its last tokens are kept
                ("First Citizen:", " " + "speak, speak " * 30)]  # continuation itself longer than the window
    with torch.no_grad():
        got = lm.loglikelihood(requests)
        for (context, continuation), result in zip(requests, got, strict=True):
            assert result.logprob == pytest.approx(naive_logprob(lm, context, continuation), abs=1e-4)
    assert got[1].tokens == 1 and got[1].chars == 3
    assert [r.cut for r in got] == [False] * 6 + [True]


def test_encode_pair_moves_trailing_whitespace_like_lm_eval(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    context, continuation = lm.encode_pair("Question: who?\nAnswer: ", "Romeo")
    assert context == shakespeare_tokenizer.encode("Question: who?\nAnswer:")
    assert context + continuation == shakespeare_tokenizer.encode("Question: who?\nAnswer: Romeo")


# ----------------------------------------------------------------------------------------------- the readers


@needs_data
@pytest.mark.parametrize("task, count", [("hellaswag", 2008), ("arc_easy", 570), ("arc_challenge", 299),
                                         ("piqa", 367), ("mmlu", 285)])
def test_benchmark_files_read_whole(task, count):
    questions = multiple_choice.BENCHMARKS[task].load(EVAL_DATA)
    assert len(questions) == count
    assert all(0 <= q.gold < len(q.choices) for q in questions)
    assert len({q.id for q in questions}) == count


@needs_data
def test_prompts_are_lm_evals():
    hellaswag = multiple_choice.load_hellaswag(EVAL_DATA)[0]
    assert hellaswag.text == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert hellaswag.gold == 3 and hellaswag.choices[3] == "starts pulling up roofing on a roof."
    arc = multiple_choice.BENCHMARKS["arc_easy"].load(EVAL_DATA)[0]
    assert arc.text == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices[arc.gold] == "cellular telephone"
    mmlu = multiple_choice.load_mmlu(EVAL_DATA)[0]
    assert mmlu.description == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert mmlu.text.endswith("\nC. 2\nD. 3\nAnswer:") and mmlu.choices == ["A", "B", "C", "D"]
    assert multiple_choice.split_context("She bends down. the lady") == ("She bends down.", "the lady")
    assert multiple_choice.split_context("Mix the flour. Add eggs.") == ("Mix the flour. Add eggs.", "")
    assert multiple_choice.hellaswag_clean("A man [title] Fix it. [step] Then  go") == "A man. Fix it. Then go"


@needs_data
def test_few_shot_examples_never_include_the_question_and_stay_in_its_subject():
    mmlu = multiple_choice.load_mmlu(EVAL_DATA)
    question = mmlu[7]
    context = multiple_choice.with_shots(question, mmlu, 5, seed=0)
    same_subject = [q for q in mmlu if q.group == question.group and q.id != question.id]
    assert context.startswith(question.description) and context.endswith("\n\n" + question.text)
    assert context.count("\nAnswer: ") == len(same_subject) == 4  # leave-one-out: the dev split has 5 a subject
    assert context == multiple_choice.with_shots(question, mmlu, 5, seed=0)
    assert context != multiple_choice.with_shots(question, mmlu, 2, seed=0)


def test_hugging_face_records_read_like_local_ones():
    arc = multiple_choice.arc_record({"id": "x", "question": "Why?", "answerKey": "B",
                                      "choices": {"text": ["a", "b"], "label": ["A", "B"]}}, "hub[0]")
    assert (arc.text, arc.choices, arc.gold) == ("Question: Why?\nAnswer:", ["a", "b"], 1)
    swag = multiple_choice.hellaswag_record({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "she",
                                             "endings": ["a", "b", "c", "d"], "label": "2"}, "hub[0]")
    assert (swag.text, swag.gold) == ("Baking: She mixes flour. She", 2)
    mmlu = multiple_choice.mmlu_question("high_school_physics", "Q?", ["1", "2", "3", "4"], 3, "hub[0]")
    assert mmlu.gold == 3 and "high school physics" in mmlu.description


def test_bad_benchmark_files_are_named(tmp_path):
    swag = tmp_path / "hellaswag" / "hellaswag_val.txt"
    swag.parent.mkdir()
    swag.write_text("Cooking: she\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"hellaswag_val.txt:2: the label line must be 0, 1, 2 or 3, got '7'"):
        multiple_choice.load_hellaswag(tmp_path)
    swag.write_text("Cooking: she\n1\na\nb\n")
    with pytest.raises(DataError, match="not a multiple of 6"):
        multiple_choice.load_hellaswag(tmp_path)
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g"\n')
    (piqa / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match=r"valid.jsonl:2: not valid JSON"):
        multiple_choice.load_piqa(tmp_path)
    (piqa / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(DataError, match="2 labels for the 1 questions"):
        multiple_choice.load_piqa(tmp_path)
    arc = tmp_path / "arc" / "ARC-Easy-Dev.jsonl"
    arc.parent.mkdir()
    arc.write_text(json.dumps({"question": {"stem": "?", "choices": [{"text": "a", "label": "A"}]},
                               "answerKey": "C"}) + "\n")
    with pytest.raises(DataError, match=r"ARC-Easy-Dev.jsonl:1: answerKey 'C' is not one of the choice labels"):
        multiple_choice.BENCHMARKS["arc_easy"].load(tmp_path)
    mmlu = tmp_path / "mmlu" / "dev" / "anatomy_dev.csv"
    mmlu.parent.mkdir(parents=True)
    mmlu.write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,1\n")
    with pytest.raises(DataError, match=r"anatomy_dev.csv:1: expected 6 columns"):
        multiple_choice.load_mmlu(tmp_path)


class Oracle:
    """Scores the gold choice highest; the longest choice highest per character (so acc and acc_norm differ)."""

    def __init__(self, golds: dict[str, str]):
        self.golds = golds

    def loglikelihood(self, requests):
        from fermion.infer.lm import LogLikelihood

        return [LogLikelihood(-1.0 if self.golds.get(ctx) == cont.strip() else -2.0, False, 1, len(cont))
                for ctx, cont in requests]


def test_accuracy_and_length_normalised_accuracy(tmp_path):
    path = tmp_path / "arc" / "ARC-Easy-Dev.jsonl"
    path.parent.mkdir()
    questions = [("Q1", ["short", "a much longer choice"], "A"), ("Q2", ["x", "y"], "B")]
    path.write_text("".join(json.dumps({"id": q, "answerKey": key, "question": {
        "stem": q, "choices": [{"text": t, "label": label} for t, label in zip(texts, "AB", strict=True)]}}) + "\n"
        for q, texts, key in questions))
    golds = {"Question: Q1\nAnswer:": "short", "Question: Q2\nAnswer:": "y"}
    result = multiple_choice.evaluate(Oracle(golds), multiple_choice.BENCHMARKS["arc_easy"],
                                      TaskOptions(data_dir=tmp_path))
    assert result.metric("acc").value == 1.0
    assert result.metric("acc_norm").value == 0.5  # Q1: -1 / 5 characters loses to -2 / 20
    assert result.n == 2 and result.samples[0]["pick_norm"] == 1


# --------------------------------------------------------------------------------------------------- generative


def test_gsm8k_answers_are_extracted_as_numbers():
    assert generative.gsm8k_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert generative.gsm8k_answer("The answer is 12.") is None
    assert generative.last_number("She pays $1,200.50 then 7 more, total $1,207.50.") == "1207.50"
    assert generative.same_number("18", "18.0") and not generative.same_number("18", None)


def test_bbh_answers_and_normalisation():
    assert generative.bbh_answer("... So the answer is (B).") == "(B)"
    assert generative.bbh_answer("So the answer is No. Then more text") == "No"
    assert generative.bbh_normalise("(C) 12/25/1937.") == "(C)" and generative.bbh_normalise(" True.") == "true"
    assert generative.bbh_normalise(None) == ""


@needs_data
def test_bbh_prompts_split_into_three_worked_examples():
    text = generative.bbh_prompt_file(EVAL_DATA / "bbh" / "cot-prompts" / "boolean_expressions.txt")
    description, shots = generative.bbh_shots(text)
    assert description == "Evaluate the result of a random Boolean expression."
    assert len(shots) == 3
    assert all(q.startswith("Q: ") and q.endswith("\nA:") and a.startswith("Let's think step by step.")
               for q, a in shots)


def test_few_shot_prompts_for_base_and_chat_models(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    shots = [("Question: 1+1?\nAnswer:", "2\n#### 2")]
    assert generative.few_shot_prompt(lm, shots, "Question: 2+2?\nAnswer:") == \
        "Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: 2+2?\nAnswer:"
    lm.chat = True
    turns = generative.few_shot_prompt(lm, shots, "Question: 2+2?\nAnswer:")
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]


@needs_data
def test_generative_tasks_run_end_to_end(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512, context_length=512), shakespeare_tokenizer)
    gsm = generative.gsm8k(lm, TaskOptions(data_dir=EVAL_DATA, limit=2, shots=2, max_new_tokens=4))
    assert gsm.n == 2 and gsm.shots == 2 and {m.name for m in gsm.metrics} == {"exact_match_strict",
                                                                               "exact_match_flexible"}
    bbh = generative.bbh(lm, TaskOptions(data_dir=EVAL_DATA, limit=1, max_new_tokens=4))
    assert bbh.n == 27 and len({s["task"] for s in bbh.samples}) == 27


# --------------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n, length, stride", [(10, 4, 2), (3, 8, 4), (100, 16, 8), (17, 16, 5)])
def test_perplexity_windows_score_every_token_once(n, length, stride):
    spans = windows(n, length, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n + 1))
    assert all(end - start <= length + 1 for start, end, _ in spans)


def test_perplexity_matches_a_direct_computation(shakespeare_tokenizer):
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    nll, tokens, n_bytes = text_nll(lm, text)
    ids = torch.tensor([[shakespeare_tokenizer.eos_id] + shakespeare_tokenizer.encode(text)])
    with torch.no_grad():
        logits, _ = lm.model(ids[:, :-1])
    assert nll == pytest.approx(float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum")), rel=1e-5)
    assert tokens == ids.shape[1] - 1 and n_bytes == len(text.encode())
    long_nll, long_tokens, _ = text_nll(lm, text * 8)  # several windows
    assert long_tokens == len(shakespeare_tokenizer.encode(text * 8)) and math.isfinite(long_nll)


# ------------------------------------------------------------------------------------------------------ runner


def test_task_names_expand_groups_and_refuse_unknown_ones():
    assert runner.task_names("mc,arc_easy") == runner.MULTIPLE_CHOICE
    assert runner.task_names(["smoke", "perplexity=x.txt"]) == ["smoke", "perplexity=x.txt"]
    with pytest.raises(runner.TaskError, match="unknown task 'helaswag'"):
        runner.task_names("helaswag")


def test_standard_error_and_markdown():
    metric = mean_metric("acc", [1.0, 0.0, 1.0, 1.0])
    assert metric.value == 0.75 and metric.stderr == pytest.approx(0.25)
    table = to_markdown([TaskResult("arc_easy", [metric, Metric("acc_norm", 0.5)], 4, 0)], "m")
    assert "| arc_easy | acc | 0.7500 | 0.2500 | 0 | 4 |" in table and "| acc_norm | 0.5000 | – |" in table


@needs_data
def test_eval_command_writes_results(tiny_run, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little dog. " * 20)
    out = tmp_path / "results"
    result = cli("eval", str(tiny_run), "--tasks", f"arc_easy,piqa,perplexity={text}", "--limit", "5",
                 "--data-dir", str(EVAL_DATA), "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in saved["results"]] == ["arc_easy", "piqa", "perplexity:text.txt"]
    assert saved["results"][0]["n"] == 5 and len(saved["results"][0]["samples"]) == 5
    assert "| piqa | acc |" in (out / "results.md").read_text()
    bad = cli("eval", str(tiny_run), "--tasks", "arc_easy,helaswag")
    assert bad.returncode == 2 and "unknown task 'helaswag'" in bad.stderr
    missing = cli("eval", str(tiny_run), "--tasks", "perplexity=/nonexistent.txt")
    assert missing.returncode == 2 and "/nonexistent.txt: file not found" in missing.stderr


@needs_data
def test_training_runs_the_recipe_benchmarks_at_intervals(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("pretrain", str(REPO / "configs" / "tiny.yaml"), "--set", f"run.dir={run_dir}",
                 "--set", "train.steps=10", "--set", "train.checkpoint_every=10", "--set", "eval.every=5",
                 "--set", "eval.tasks=[arc_easy]", "--set", "eval.limit=4", "--set", f"eval.data_dir={EVAL_DATA}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/arc_easy/acc" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert Path(run_dir / "eval" / "step_00000010" / "results.json").is_file()


def test_missing_local_files_fall_back_to_the_hub_with_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"no local data under .*arc, and source 'arc': cannot load dataset "
                                        r"'allenai/ai2_arc' \(ARC-Easy\) split 'test'.*no network"):
        multiple_choice.BENCHMARKS["arc_easy"].load(tmp_path)
    saved = tmp_path / "saved"  # a dataset folder stands in for the Hub: the same reading code after loading
    datasets.Dataset.from_list([{"id": "q1", "question": "Why?", "answerKey": "A",
                                 "choices": {"text": ["because", "no"], "label": ["A", "B"]}}]).save_to_disk(saved)
    (question,) = [multiple_choice.arc_record(r, w) for w, r in multiple_choice.from_hub(tmp_path, str(saved), None,
                                                                                         "train")]
    assert question.choices == ["because", "no"] and question.gold == 0


def test_prompting_follows_the_stage_recorded_in_the_checkpoint_not_the_run_name(tmp_path):
    """A pretrained run named `base-sft` is a base model: base prompts. Its continuation is continued pretraining.
    A checkpoint from before the stage kind was recorded falls back to the run's name."""
    import io

    from rich.console import Console

    from fermion import checkpoint
    from fermion.config import load_recipe
    from fermion.infer import lm as eval_lm
    from fermion.train.pretrain import pretrain

    quiet = Console(file=io.StringIO())
    base, continued = tmp_path / "base-sft", tmp_path / "continued-dpo"
    short = ["train.steps=2", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=2",
             "train.compile=false"]
    pretrain(load_recipe(REPO / "configs" / "tiny.yaml", [f"run.dir={base}", "run.name=base-sft", *short]),
             console=quiet)
    assert checkpoint.stage_of(base) == "pretrain"
    assert not eval_lm.load(base).chat
    pretrain(load_recipe(REPO / "configs" / "tiny.yaml", [f"run.dir={continued}", "run.name=continued-dpo",
                                                          f"train.init_from={base}", *short]), console=quiet)
    assert checkpoint.stage_of(continued) == "continued" and not eval_lm.load(continued).chat

    # Written before the trainer recorded the stage: the name decides, as it used to.
    ckpt = checkpoint.find(base)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stage"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    checkpoint._write_manifest(ckpt, state["step"])
    assert checkpoint.stage_of(base) == "sft" and eval_lm.load(base).chat
