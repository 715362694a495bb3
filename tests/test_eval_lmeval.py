"""Fermion's multiple-choice eval against lm-evaluation-harness on the same examples, 0-shot.

lm-eval runs its own standard task configs (hellaswag, arc_easy, arc_challenge, piqa, mmlu's per-subject tasks) with
only the data source replaced by local jsonl files (bench/lmeval_parity.py writes them) and scores the model's fp32
Hugging Face export; fermion scores the model itself. Every (context, continuation) pair, gold answer and pick, both
accuracies, and every choice's log-likelihood must agree.
"""

import importlib.util
import sys

import pytest
from conftest import REPO, tiny_model

from fermion.chat.templates import ChatTemplate
from fermion.eval.multiple_choice import BENCHMARKS
from fermion.export.hf import export_hf
from fermion.infer.lm import EvalModel

pytest.importorskip("lm_eval")

# The first 50 questions of each task. At a 512-token context a few of MMLU's prompts are longer than the window
# (the Shakespeare tokenizer spends many tokens on them), so truncation to the last tokens is compared as well.
N = 50
CONTEXT_LENGTH = 512


@pytest.fixture(scope="module")
def parity():
    """bench/lmeval_parity.py, imported and used with the Hugging Face Hub switched off for lm-eval and datasets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        spec = importlib.util.spec_from_file_location("lmeval_parity", REPO / "bench" / "lmeval_parity.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look the module up there
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def sides(parity, shakespeare_tokenizer, tmp_path_factory):
    """The same weights on both sides: fermion's model, and lm-eval's `hf` model loading its fp32 export."""
    model = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=CONTEXT_LENGTH)
    hf_dir = export_hf(model, shakespeare_tokenizer, tmp_path_factory.mktemp("lmeval") / "hf",
                       template=ChatTemplate.get("chatml"), dtype="fp32")
    return EvalModel(model, shakespeare_tokenizer), parity.lmeval_model(hf_dir, batch_size=16)


@pytest.mark.parametrize("task", list(BENCHMARKS))
def test_multiple_choice_scores_equal_lm_eval(parity, sides, task, tmp_path):
    fermion, lmeval = sides
    result = parity.compare(task, fermion, lmeval, tmp_path, N)
    assert result.too_long == []  # every choice fits in the window, so all N questions are compared
    assert result.n == N
    assert result.prompt_mismatches == []  # the same contexts and " choice" continuations, string for string
    assert result.gold_mismatches == []
    assert result.pick_mismatches == []  # the same answer by acc and by acc_norm on every question
    assert result.max_delta < 1e-3
    assert result.fermion == result.lmeval  # acc and acc_norm, exactly
