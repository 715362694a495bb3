"""DPO: the loss, rewards and accuracy match TRL's DPOTrainer on the same tokens (sigmoid, IPO, hinge); preference
records become the right token sequences with the right reply tokens; skipped and truncated pairs are counted; the
loader is deterministic, world-size independent and resumable; the stage trains, and a resumed run ends exactly
where an uninterrupted one does."""

import copy
import gzip
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, tiny_model
from rich.console import Console
from safetensors.torch import load_file

from fermion import checkpoint
from fermion.chat.conversations import Pair, to_pair
from fermion.chat.templates import ChatTemplate
from fermion.config import recipe_from_dict
from fermion.data.sources import DataError
from fermion.data.synthetic import arithmetic_preferences, arithmetic_problems, write_jsonl
from fermion.export.hf import export_hf
from fermion.train.dpo import PairLoader, Side, TokenPair, collate, dpo, encode_pair, prepare
from fermion.train.objectives import DPO, IGNORE_INDEX, sequence_logps

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

CHATML = ChatTemplate.get("chatml")
PAIRS = [  # TRL's conversational form; one multi-turn prompt, replies of different lengths
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, surely."}]},
    {"prompt": [{"role": "user", "content": "Speak, friend."}],
     "chosen": [{"role": "assistant", "content": "Good morrow to thee."}],
     "rejected": [{"role": "assistant", "content": "Away!"}]},
    {"prompt": [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A player."},
                {"role": "user", "content": "And what play?"}],
     "chosen": [{"role": "assistant", "content": "Hamlet, my lord."}],
     "rejected": [{"role": "assistant", "content": "None of thy business."}]},
    {"prompt": [{"role": "user", "content": "Is it night?"}],
     "chosen": [{"role": "assistant", "content": "Ay, the moon is up."}],
     "rejected": [{"role": "assistant", "content": "It is noon."}]},
]


# ------------------------------------------------------------------------------------------------- TRL parity


@pytest.fixture(scope="module")
def peers(shakespeare_tokenizer, tmp_path_factory):
    """A fermion policy and a perturbed reference, and the same two exported and loaded by transformers."""
    transformers = pytest.importorskip("transformers")
    policy = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=64)
    reference = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=64)
    noise = torch.Generator().manual_seed(5)  # a reference that ranks 3 of the 4 pairs right
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    folder = tmp_path_factory.mktemp("peers")
    hf = {}
    for name, model in (("policy", policy), ("reference", reference)):
        export_hf(model, shakespeare_tokenizer, folder / name, template=CHATML, dtype="fp32")
        hf[name] = transformers.AutoModelForCausalLM.from_pretrained(folder / name).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "policy")
    return policy, reference, hf["policy"], hf["reference"], hf_tokenizer, folder


def trl_batch_and_metrics(hf_policy, hf_reference, hf_tokenizer, folder, loss_type: str, sft_weight: float = 0.0):
    """TRL's collated batch of PAIRS and its loss and metrics for it."""
    datasets, trl = pytest.importorskip("datasets"), pytest.importorskip("trl")
    losses = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(
        loss_type=loss_type)
    # bf16=False: TRL defaults to bf16, and accelerate then runs the reference model under bf16 autocast even on CPU
    args = trl.DPOConfig(output_dir=str(folder / f"trl-{loss_type}"), beta=0.1, report_to=[], **losses,
                         use_cpu=True, bf16=False, precompute_ref_log_probs=False, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, processing_class=hf_tokenizer,
                             train_dataset=datasets.Dataset.from_list(PAIRS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    mode = "train" if trainer.model.training else "eval"
    metrics = {name: values[-1] for name, values in trainer._metrics[mode].items()}
    return batch, loss, metrics


def fermion_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ids and completion mask as fermion's (inputs, targets): the same tokens, the same scored positions."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    return ids[:, :-1], torch.where(completion[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)


@pytest.mark.parametrize("loss_type, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 1.0)])
def test_loss_rewards_and_accuracy_match_trl(peers, loss_type, sft_weight):
    policy, reference, hf_policy, hf_reference, hf_tokenizer, folder = peers
    batch, trl_loss, trl_metrics = trl_batch_and_metrics(hf_policy, hf_reference, hf_tokenizer, folder, loss_type,
                                                         sft_weight)
    inputs, targets = fermion_batch(batch)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, inputs, targets)
        objective = DPO(0.1, loss_type, sft_weight=sft_weight)
        precomputed_loss, metrics = objective.loss(policy, (inputs, targets, ref_logps))
        nan = torch.full_like(ref_logps, float("nan"))
        with_model = DPO(0.1, loss_type, reference=reference, sft_weight=sft_weight)
        model_loss, model_metrics = with_model.loss(policy, (inputs, targets, nan))
    assert precomputed_loss.item() == pytest.approx(trl_loss, abs=1e-4)
    assert metrics["rewards_chosen"].item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
    assert metrics["rewards_rejected"].item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
    assert metrics["margin"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=1e-4)
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-6)
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # a reference that ranks some pairs either way
    # A frozen reference model scoring each batch is the same computation as precomputing with it.
    assert model_loss.item() == precomputed_loss.item()
    assert all(model_metrics[k].item() == metrics[k].item() for k in DPO.logged)


def test_policy_equal_to_reference_gives_log_2_in_both(peers):
    policy, _, hf_policy, _, hf_tokenizer, folder = peers
    batch, trl_loss, _ = trl_batch_and_metrics(hf_policy, copy.deepcopy(hf_policy), hf_tokenizer, folder, "sigmoid")
    inputs, targets = fermion_batch(batch)
    with torch.no_grad():
        loss = DPO(0.1, reference=policy).loss(policy, (inputs, targets, torch.zeros(len(inputs))))[0]
    assert trl_loss == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_fermion_tokenizes_pairs_as_trl_does_and_scores_the_reply_and_its_end_marker(peers, shakespeare_tokenizer):
    """Same ids as TRL; the scored tokens are TRL's completion less the newline after <|im_end|>, which the chatml
    template leaves outside the generation block (as SFT does: the model learns to stop at <|im_end|>)."""
    _, _, hf_policy, hf_reference, hf_tokenizer, folder = peers
    batch, _, _ = trl_batch_and_metrics(hf_policy, hf_reference, hf_tokenizer, folder, "sigmoid")
    for i, record in enumerate(PAIRS):
        pair = to_pair(record, f"pairs[{i}]")
        encoded, _ = encode_pair(CHATML, shakespeare_tokenizer, pair, 1000, "truncate", f"pairs[{i}]")
        for row, side in ((i, encoded.chosen), (len(PAIRS) + i, encoded.rejected)):
            length = int(batch["attention_mask"][row].sum())
            assert side.ids.tolist() == batch["input_ids"][row, :length].tolist()
            completion = batch["completion_mask"][row, :length].nonzero().flatten().tolist()
            assert completion == [*range(side.start, side.end), side.end]
            assert shakespeare_tokenizer.decode(side.ids[side.end:]) == "\n"


# ---------------------------------------------------------------------------------------------------- the data


def reply_and_context(tokenizer, side) -> tuple[str, str]:
    return tokenizer.decode(side.ids[:side.start]), tokenizer.decode(side.ids[side.start:side.end])


def test_hh_transcript_scores_only_the_final_reply(shakespeare_tokenizer):
    turns = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant: "
    pair = to_pair({"chosen": turns + "Farewell.", "rejected": turns + "Go."}, "hh:1")
    encoded, truncated = encode_pair(CHATML, shakespeare_tokenizer, pair, 1000, "truncate", "hh:1")
    assert not truncated
    context = ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
               "<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n")
    assert reply_and_context(shakespeare_tokenizer, encoded.chosen) == (context, "Farewell.<|im_end|>")
    assert reply_and_context(shakespeare_tokenizer, encoded.rejected) == (context, "Go.<|im_end|>")
    assert shakespeare_tokenizer.decode(encoded.chosen.ids[encoded.chosen.end:]) == "\n"


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.")
QUESTION = {  # the context before the reply, per template: without and with a system message
    "chatml": ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "tagged": ("<user>What is 2 + 2?</user>\n<assistant>",
               "<system>Be terse.</system>\n<user>What is 2 + 2?</user>\n<assistant>"),
    "alpaca": (ALPACA_PREAMBLE + "\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n",
               "Be terse.\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n"),
}
END = {"chatml": "<|im_end|>", "tagged": "</assistant>", "alpaca": "<|eos|>"}  # the end of turn, scored too


@pytest.mark.parametrize("template", list(QUESTION))
@pytest.mark.parametrize("record", [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
], ids=["strings", "messages"])
def test_prompt_chosen_rejected_records_score_the_reply_and_its_end_of_turn(shakespeare_tokenizer, record, template):
    context = QUESTION[template][isinstance(record["prompt"], list)]
    encoded, _ = encode_pair(ChatTemplate.get(template), shakespeare_tokenizer, to_pair(record, "r"), 1000,
                             "truncate", "r")
    assert reply_and_context(shakespeare_tokenizer, encoded.chosen) == (context, "4" + END[template])
    assert reply_and_context(shakespeare_tokenizer, encoded.rejected) == (context, "5" + END[template])


def test_collate_puts_chosen_first_and_targets_only_on_reply_tokens(shakespeare_tokenizer):
    pairs = [encode_pair(CHATML, shakespeare_tokenizer, to_pair(r, "r"), 1000, "truncate", "r")[0] for r in PAIRS]
    inputs, targets, ref = collate(pairs[:2], pad_id=shakespeare_tokenizer.pad_id,
                                   ref_logps=np.array([[-1.0, -2.0], [-3.0, -4.0]], dtype=np.float32))
    assert ref.tolist() == [-1.0, -3.0, -2.0, -4.0]
    longest = max(len(side.ids) for pair in pairs[:2] for side in (pair.chosen, pair.rejected))
    assert inputs.shape == targets.shape == (4, 32) and longest - 1 > 24  # the width rounded up to a multiple of 8
    for row, side in enumerate([pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]):
        assert inputs[row, :len(side.ids) - 1].tolist() == side.ids[:-1].tolist()
        assert (inputs[row, len(side.ids) - 1:] == shakespeare_tokenizer.pad_id).all()
        scored = (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(side.start - 1, side.end - 1))
        assert targets[row, scored].tolist() == side.ids[side.start:side.end].tolist()
    assert collate(pairs[:1], 0)[2].isnan().all()  # no precomputed reference: the reference model scores it


def test_overlong_pairs_truncate_or_drop(shakespeare_tokenizer):
    prompt = [{"role": "user", "content": "Tell me."}]
    long_pair = Pair(prompt, "word " * 40, "other " * 40)
    encoded, truncated = encode_pair(CHATML, shakespeare_tokenizer, long_pair, 20, "truncate", "r")
    assert truncated and len(encoded.chosen.ids) == 20 and encoded.chosen.end == 20
    with pytest.raises(DataError, match="longer than the context"):
        encode_pair(CHATML, shakespeare_tokenizer, long_pair, 20, "drop", "r")
    with pytest.raises(DataError, match="no reply token within the context"):
        encode_pair(CHATML, shakespeare_tokenizer, Pair([{"role": "user", "content": "long " * 40}], "a", "b"), 20,
                    "truncate", "r")
    with pytest.raises(DataError, match="identical once truncated"):
        encode_pair(CHATML, shakespeare_tokenizer, Pair(prompt, "word " * 40 + "yes", "word " * 40 + "no"), 20,
                    "truncate", "r")


# --------------------------------------------------------------------------------------------------- the loader


def loader_pairs(n: int) -> list:
    return [TokenPair(Side(np.arange(3 + i % 5), 1, 3), Side(np.arange(4 + i % 3), 1, 4), f"p{i}") for i in range(n)]


def test_loader_is_seeded_world_size_independent_resumable_and_covers_each_epoch():
    pairs = loader_pairs(21)
    one = PairLoader(pairs, batch_size=4, seed=3, pad_id=0, max_width=16)
    ranks = [PairLoader(pairs, batch_size=2, seed=3, pad_id=0, max_width=16, rank=r, world_size=2) for r in (0, 1)]
    assert one.batches_per_epoch == 6  # 21 pairs in batches of 4: the last one topped up from the epoch's start
    seen = []
    for _ in range(6):
        whole = one.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert whole[0][:4, :parts[0][0].shape[1]].tolist() == parts[0][0][:2].tolist() + parts[1][0][:2].tolist()
        seen.extend(one.epoch_batches(0)[one.position - 1].tolist())
    assert set(seen) == set(range(21)) and len(seen) == 24
    state = one.state_dict()
    following = [one.next_batch() for _ in range(3)]
    resumed = PairLoader(pairs, batch_size=4, seed=3, pad_id=0, max_width=16)
    resumed.load_state_dict(state)
    for expected in following:
        assert all(a.equal(b) for a, b in zip(resumed.next_batch(), expected, strict=True) if not a.isnan().any())
    assert not np.array_equal(one.epoch_batches(1), one.epoch_batches(0))  # a fresh order each epoch
    with pytest.raises(DataError, match="differ from those the checkpoint"):
        PairLoader(pairs[:-1], batch_size=4, seed=3, pad_id=0, max_width=16).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ the generator


def plausible(problem, wrong: int) -> bool:
    """The mistakes a person makes: a slip of up to ten, one digit wrong, digits swapped, + and - confused, the
    neighbouring line of the times table."""
    right, a, b = str(problem.answer), problem.a, problem.b
    one_digit = len(str(wrong)) == len(right) and sum(x != y for x, y in zip(str(wrong), right, strict=True)) == 1
    confused = wrong in (a + b, a - b) or (problem.op == "*" and wrong in (a * (b - 1), a * (b + 1), (a - 1) * b,
                                                                         (a + 1) * b, a + b))
    return abs(wrong - problem.answer) <= 10 or one_digit or str(wrong) == right[::-1] or confused


def test_arithmetic_preferences_are_seeded_right_and_plausibly_wrong(tmp_path):
    records = list(arithmetic_preferences(300, seed=4))
    assert records == list(arithmetic_preferences(300, seed=4)) != list(arithmetic_preferences(300, seed=5))
    for record, problem in zip(records, arithmetic_problems(300, seed=4), strict=True):
        a, op, b = record["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(record["chosen"]) == eval(f"{a} {op} {b}") == problem.answer  # noqa: S307 (digits and one op)
        wrong = int(record["rejected"])
        assert wrong != problem.answer and wrong >= 0
        assert plausible(problem, wrong), (problem, wrong)
    assert {r["prompt"].split()[3] for r in records} == {"+", "-", "*"}
    path = write_jsonl(tmp_path / "math.jsonl.gz", records)
    assert [json.loads(line) for line in gzip.open(path, "rt")] == records


# ---------------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def pretrained(tiny_run):
    """A tiny TinyStories model to start DPO from: the session's shared 20-step run (DPO writes elsewhere)."""
    return tiny_run


@pytest.fixture(scope="module")
def math_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("math") / "math.jsonl", arithmetic_preferences(120, seed=0))


def dpo_recipe(run_dir, init_from, paths, **dpo):
    raw = yaml.safe_load(open(TINY))
    raw["run"]["dir"] = str(run_dir)
    train = {"init_from": str(init_from), "steps": 8, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 2,
             "precision": "fp32", "compile": False, "eval_every": 4, "eval_batches": 4, "checkpoint_every": 4,
             "keep_checkpoints": 5, "log_every": 1, "tensorboard": False, "progress": False, **dpo.pop("train", {})}
    raw["dpo"] = {"sources": [{"name": "prefs", "paths": [str(p) for p in paths]}], "epochs": None, "train": train,
                  **dpo}
    return recipe_from_dict(raw)


def run_quietly(recipe) -> tuple:
    out = io.StringIO()
    result = dpo(recipe, console=Console(file=out, width=200))
    return result, out.getvalue()


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(pretrained, math_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result, output = run_quietly(dpo_recipe(run_dir, pretrained, [math_file]))
    return run_dir, result, output


def test_stage_trains_from_log_2_and_writes_its_run(uninterrupted):
    run_dir, result, output = uninterrupted
    assert result.status == "complete" and result.step == 8
    assert set(result.metrics) == {"val_loss", "val_rewards_chosen", "val_rewards_rejected", "val_margin",
                                   "val_accuracy", "val_chosen_nll", "val_chosen_nll_start"}
    # The SFT loss on the held-out chosen replies, now and at the start: the rewards are beta times the difference
    # of the same log-probabilities, so the two figures must agree with them.
    nll_drop = result.metrics["val_chosen_nll_start"] - result.metrics["val_chosen_nll"]
    assert (nll_drop > 0) == (result.metrics["val_rewards_chosen"] > 0)
    assert abs(nll_drop) < 1.0  # 8 steps barely move a reply's per-token loss
    records = [r for r in metrics_of(run_dir) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the first step
    assert records[0]["rewards_chosen"] == pytest.approx(0, abs=1e-5)
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(records[-1])
    report = json.loads((run_dir / "dpo" / "report.json").read_text())
    assert report["records_read"] == 120 and report["train_pairs"] == 108 and report["val_pairs"] == 12
    assert "preference accuracy" in output and "scoring 120 pairs" in output
    assert (run_dir / "dpo" / "reference_logps.safetensors").is_file()
    assert (run_dir / "dpo" / "tokenizer.json").is_file()
    assert checkpoint.stage_of(run_dir / "dpo") == "dpo"


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_does(uninterrupted, pretrained, math_file,
                                                                        tmp_path):
    """As after a crash past step 4: the newest checkpoint is step 4; the resumed run replays steps 5-8 exactly."""
    run_dir, result, _ = uninterrupted
    resumed_dir = tmp_path / "run"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "dpo" / "checkpoints" / "step_00000008")
    resumed, output = run_quietly(dpo_recipe(resumed_dir, pretrained, [math_file]))
    assert "(step 4," in output and "reusing" in output  # and the cached reference log-probabilities
    assert resumed.metrics == result.metrics
    timing = {"tokens_per_s", "elapsed_s", "mfu"}
    untimed = [[{k: v for k, v in r.items() if k not in timing} for r in metrics_of(d)] for d in (resumed_dir, run_dir)]
    assert untimed[0] == untimed[1]  # every step's loss, rewards and accuracy, and both validations, to the bit
    weights, expected = (load_file(d / "dpo" / "checkpoints" / "step_00000008" / "model.safetensors")
                         for d in (resumed_dir, run_dir))
    assert all(weights[k].equal(expected[k]) for k in expected)


def test_reference_model_trains_like_precomputed_reference(uninterrupted, pretrained, math_file, tmp_path):
    run_dir, result, _ = uninterrupted
    with_model, output = run_quietly(dpo_recipe(tmp_path / "run", pretrained, [math_file], reference="model"))
    assert "scoring" not in output
    losses = [r["loss"] for r in metrics_of(tmp_path / "run") if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in metrics_of(run_dir) if "loss" in r], abs=1e-5)
    assert with_model.metrics == pytest.approx(result.metrics, abs=1e-5)


def test_report_counts_skips_and_truncation_and_an_empty_data_set_is_refused(pretrained, tmp_path):
    long_reply = "and so the story went on " * 20
    records = [
        {"prompt": "Hello?", "chosen": "Hi.", "rejected": "Go."},
        {"prompt": "Hello?", "chosen": "Hi.", "rejected": "Hi. "},  # identical once stripped
        {"prompt": "Tell a story.", "chosen": long_reply + "yes", "rejected": long_reply + "no"},  # same when cut
        {"prompt": "Tell a story.", "chosen": long_reply, "rejected": "No."},  # truncated
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Bye."},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    one_step = {"steps": 1, "warmup_steps": 0}
    result, output = run_quietly(dpo_recipe(tmp_path / "a", pretrained, [path], train=one_step))
    assert result.status == "complete"
    report = json.loads((tmp_path / "a" / "dpo" / "report.json").read_text())
    assert (report["records_read"], report["records_used"], report["truncated"]) == (5, 3, 1)
    assert report["skipped"] == {"identical chosen and rejected": 1, "identical once truncated to the context": 1}
    assert report["first_skipped"]["identical chosen and rejected"] == f"{path}:2"
    assert "skipped 1: identical once truncated to the context" in output
    _, _, _, dropped = prepare(dpo_recipe(tmp_path / "b", pretrained, [path], overlong="drop"))
    assert (dropped.used, dropped.truncated) == (2, 0)
    assert dict(dropped.skipped) == {"identical chosen and rejected": 1, "longer than the context": 2}
    useless = write_jsonl(tmp_path / "useless.jsonl", records[1:3])
    with pytest.raises(DataError) as refused:  # names the file and the records, not a report that was never written
        prepare(dpo_recipe(tmp_path / "c", pretrained, [useless]))
    assert str(refused.value) == (
        f"dpo.sources ('prefs' reads {useless} ({Path(useless).stat().st_size:,} bytes)): none of the 2 records is a "
        f"usable preference pair; skipped: 1 identical chosen and rejected (first: {useless}:1); 1 identical once "
        f"truncated to the context (first: {useless}:2); fix those records or add data")


def test_dpo_command_trains_after_sft_and_refuses_bad_data_in_one_line(pretrained, tmp_path):
    """The CLI path: `fermion dpo` on the tiny recipe's HH pairs, starting from its SFT; bad data is one line."""
    common = ["--set", f"run.dir={pretrained}", "--set", f"sft.dir={tmp_path / 'sft'}",
              "--set", f"dpo.dir={tmp_path / 'dpo'}"]
    sft = cli("sft", TINY, *common, "--set", "sft.epochs=null", "--set", "sft.train.steps=3")
    assert sft.returncode == 0, sft.stderr
    result = cli("dpo", TINY, *common, "--set", "dpo.epochs=null", "--set", "dpo.train.steps=4")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "dpo data: 200 records read" in result.stdout and "accuracy" in result.stdout
    assert json.loads((tmp_path / "dpo" / "report.json").read_text())["records_read"] == 200
    useless = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Hi", "chosen": "Yo", "rejected": "Yo"}])
    bad = cli("dpo", TINY, *common, "--set", f"dpo.dir={tmp_path / 'bad'}",
              "--set", f"dpo.sources=[{{name: same, paths: [{useless}]}}]")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"dpo.sources ('same' reads {useless} (" in bad.stderr and f"(first: {useless}:1)" in bad.stderr
    assert "none of the 1 records is a usable preference pair" in bad.stderr and "report.json" not in bad.stderr
