"""SFT: the loss mask of every template spelled out token by token, packing that changes no sample's loss, the
record formats, bad input counted or refused with the record named, and the stage end to end with exact resume."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import HANG, cli, tiny_model

from fermion import checkpoint
from fermion.chat.conversations import Skipped, to_messages
from fermion.chat.templates import ChatTemplate
from fermion.data.sources import DataError
from fermion.train.objectives import IGNORE_INDEX
from fermion.train.sft import Example, SFTLoader, collate_packed, encode, pack

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
FERMION = [sys.executable, "-m", "fermion"]
TWO_TURNS = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "A small model."},
    {"role": "user", "content": "Can you count?"},
    {"role": "assistant", "content": "One, two, three."},
]
# Exactly the text that carries loss in each template: each assistant turn and the marker that ends it.
EXPECTED_TRAINED = {
    "chatml": ["A small model.<|im_end|>", "One, two, three.<|im_end|>"],
    "alpaca": ["A small model.<|eos|>", "One, two, three.<|eos|>"],
    "tagged": ["A small model.</assistant>", "One, two, three.</assistant>"],
    "tagged-lines": ["A small model.\n</assistant>", "One, two, three.\n</assistant>"],
}


def spans(tokenizer, ids, mask) -> tuple[list[str], list[str]]:
    """The decoded runs of consecutive tokens with loss, and without."""
    runs: dict[bool, list[str]] = {True: [], False: []}
    current, flag = [], None
    for token, m in zip(ids, mask, strict=True):
        if m != flag and current:
            runs[flag].append(tokenizer.decode(current))
            current = []
        current.append(token)
        flag = m
    runs[flag].append(tokenizer.decode(current))
    return runs[True], runs[False]


@pytest.mark.parametrize("name", list(EXPECTED_TRAINED))
def test_loss_mask_is_exactly_the_assistant_turns_and_their_end_markers(shakespeare_tokenizer, name):
    template = ChatTemplate.get(name)
    encoded = template.encode(shakespeare_tokenizer, TWO_TURNS)
    trained, untrained = spans(shakespeare_tokenizer, encoded.ids, encoded.mask)
    assert trained == EXPECTED_TRAINED[name]
    # The system prompt, the user turns and the template's own markup before each reply carry none.
    assert "Be kind." in untrained[0] and "Hi, who are you?" in untrained[0] and "Can you count?" in untrained[1]
    # As training targets: every kept target is the next token of an assistant span, nothing else.
    example, truncated = encode(template, shakespeare_tokenizer, TWO_TURNS, 10_000, "truncate", "t")
    assert not truncated
    kept = example.targets != IGNORE_INDEX
    assert np.array_equal(example.targets[kept], np.array(encoded.ids)[1:][np.array(encoded.mask[1:])])


def test_the_alpaca_template_renders_the_classic_prompt(shakespeare_tokenizer):
    messages = to_messages({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, "r")
    text = ChatTemplate.get("alpaca").render(messages, shakespeare_tokenizer)
    assert text == ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                    "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5<|eos|>\n\n")


@pytest.mark.parametrize("window", [None, 5])
def test_packed_rows_give_each_conversation_the_loss_it_has_alone(window):
    model = tiny_model(sliding_window=window)
    rng = np.random.default_rng(0)
    examples = []
    for length in (9, 14, 6):
        ids = rng.integers(0, 97, length)
        targets = np.where(rng.random(length - 1) < 0.6, ids[1:], IGNORE_INDEX)
        examples.append(Example(ids, targets))
    rows = pack(examples, seq_len=32, rng=random.Random(0))
    assert len(rows) == 1 and len(rows[0]) == 3  # all three share one row (29 of 32 positions)
    examples = rows[0]  # longest first
    inputs, targets, positions, segments = collate_packed(rows, 32, pad_id=0)
    with torch.no_grad():
        logits, _ = model(inputs, positions, segments)
        packed = F.cross_entropy(logits[0], targets[0], ignore_index=IGNORE_INDEX, reduction="none")
        for s, example in enumerate(examples):
            alone, _ = model(torch.from_numpy(example.ids[None, :-1]))
            expected = F.cross_entropy(alone[0], torch.from_numpy(example.targets), ignore_index=IGNORE_INDEX,
                                       reduction="none")
            torch.testing.assert_close(packed[segments[0] == s], expected, atol=1e-5, rtol=1e-5)


def test_packing_fills_rows_best_fit_longest_first_and_keeps_every_conversation_once():
    lengths = [9, 3, 7, 5, 2, 6, 8, 4, 1, 5, 7]  # in this order, filling rows as they come needs 7 rows of 10
    examples = [Example(np.arange(n + 1), np.arange(1, n + 1)) for n in lengths]
    rows = pack(examples, seq_len=10, rng=random.Random(0))
    assert sorted(len(e.targets) for row in rows for e in row) == sorted(lengths)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert all(sum(len(e.targets) for e in row) <= 10 for row in rows)
    assert len(rows) == 6  # 57 tokens: 6 rows is the fewest that can hold them
    assert [[len(e.targets) for e in row] for row in pack(examples, 10, random.Random(0))] == \
        [[len(e.targets) for e in row] for row in rows]  # the same seed, the same rows in the same order
    orders = {tuple(tuple(len(e.targets) for e in row) for row in pack(examples, 10, random.Random(seed)))
              for seed in range(5)}
    assert len(orders) > 1  # rows are shuffled, not left longest-first


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ({"instruction": "q", "input": "x", "output": "a"},
     [{"role": "user", "content": "q", "input": "x"}, {"role": "assistant", "content": "a"}]),
    ({"instruction": "q", "context": "", "response": "a"},
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ({"prompt": "q", "completion": "a"}, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
])
def test_record_formats_become_conversations(record, expected):
    assert to_messages(record, "f.jsonl:1") == expected


def test_bad_records_name_the_record():
    with pytest.raises(DataError, match=r"f.jsonl:3: messages\[1\] has unknown role 'robot'"):
        to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "f.jsonl:3")
    with pytest.raises(Skipped, match="no assistant turn") as skipped:
        to_messages({"messages": [{"role": "user", "content": "q"}]}, "f.jsonl:4")
    assert skipped.value.reason == "no assistant turn"
    with pytest.raises(DataError, match="f.jsonl:5: fields colour, size match no"):
        to_messages({"colour": "red", "size": 3}, "f.jsonl:5")


def test_overlong_conversations_are_truncated_or_dropped(shakespeare_tokenizer):
    template = ChatTemplate.get("chatml")
    long = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 200}]
    example, truncated = encode(template, shakespeare_tokenizer, long, 40, "truncate", "r")
    assert truncated and len(example.ids) == 40 and (example.targets != IGNORE_INDEX).any()
    with pytest.raises(Skipped, match="longer than the context"):
        encode(template, shakespeare_tokenizer, long, 40, "drop", "r")
    early = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    with pytest.raises(Skipped, match="no assistant tokens within the context"):
        encode(template, shakespeare_tokenizer, early, 40, "truncate", "r")


@pytest.mark.parametrize("packing", [True, False])
def test_loader_is_resumable_and_independent_of_world_size(packing):
    rng = np.random.default_rng(1)
    examples = [Example(ids := rng.integers(0, 50, n), ids[1:]) for n in rng.integers(3, 20, 60)]
    one = SFTLoader(examples, 24, 4, seed=3, pad_id=0, packing=packing)
    batches = [one.next_batch() for _ in range(12)]  # crosses an epoch boundary
    resumed = SFTLoader(examples, 24, 4, seed=3, pad_id=0, packing=packing)
    for _ in range(5):
        resumed.next_batch()
    state = resumed.state_dict()
    again = SFTLoader(examples, 24, 4, seed=3, pad_id=0, packing=packing)
    again.load_state_dict(state)
    for expected in batches[5:]:
        assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), expected, strict=True))
    if packing:  # two ranks of 2 rows each see the same rows as one rank of 4
        ranks = [SFTLoader(examples, 24, 2, seed=3, pad_id=0, packing=True, rank=r, world_size=2) for r in (0, 1)]
        for expected in batches[:6]:
            halves = [rank.next_batch() for rank in ranks]
            assert all(torch.equal(torch.cat([h[i] for h in halves]), expected[i]) for i in range(4))


run = cli


@pytest.fixture(scope="module")
def pretrained(tiny_run) -> Path:
    return tiny_run


def sft_losses(stage_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sft_stage_runs_reports_and_resumes_exactly(pretrained, tmp_path):
    straight = tmp_path / "straight"
    args = ["--set", f"run.dir={pretrained}", "--set", "sft.epochs=null", "--set", "sft.train.steps=24"]
    result = run("sft", TINY, *args, "--set", f"sft.dir={straight}")
    assert result.returncode == 0, result.stderr
    report = json.loads((straight / "report.json").read_text())
    # The tiny model's 64-token context cuts most Alpaca answers short and leaves some with no answer at all.
    used, skipped = report["records_used"], report["skipped"]["no assistant tokens within the context"]
    assert report["records_read"] == 300 and used + skipped == 300 and report["truncated"] > 0
    assert f"sft data: 300 records read, {used} used, {report['truncated']} truncated" in result.stdout
    assert report["val_conversations"] == -(-used // 10) and report["train_conversations"] + report[
        "val_conversations"] == used
    assert "val loss" in result.stdout and "(assistant tokens)" in result.stdout
    assert checkpoint.stage_of(straight) == "sft" and checkpoint.stage_of(pretrained) == "pretrain"

    # Interrupted mid-run (SIGTERM: the trainer checkpoints and exits), then resumed: the same losses throughout.
    halted = tmp_path / "halted"
    proc = subprocess.Popen([*FERMION, "sft", TINY, *args, "--set", f"sft.dir={halted}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + HANG
    while not ((halted / "metrics.jsonl").is_file() and len(sft_losses(halted)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG) == 0
    assert "received SIGTERM" in proc.stdout.read()
    assert len(sft_losses(halted)) < 24
    second = run("sft", TINY, *args, "--set", f"sft.dir={halted}")
    assert second.returncode == 0 and "resuming from" in second.stdout, second.stderr
    assert sft_losses(halted) == sft_losses(straight)


def test_sft_bad_input_is_reported_not_a_traceback(pretrained, tmp_path):
    data = tmp_path / "chats.jsonl"
    lines = [{"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn: skipped, counted
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    args = ["--set", f"run.dir={pretrained}", "--set", f"sft.dir={tmp_path / 'sft'}",
            "--set", f"sft.sources=[{{name: chats, paths: [{data}]}}]", "--set", "sft.val_fraction=0",
            "--set", "sft.train.micro_batch_size=1", "--set", "sft.train.eval_every=100"]
    result = run("sft", TINY, *args)
    assert result.returncode == 0, result.stderr
    assert "skipped 3: no assistant turn (first: " in result.stdout and f"{data}:1)" in result.stdout
    report = json.loads((tmp_path / "sft" / "report.json").read_text())
    assert report["skipped"] == {"no assistant turn": 3} and report["records_used"] == 3

    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    empty = run("sft", TINY, *args[:2], "--set", f"sft.dir={tmp_path / 'empty'}", *args[4:])
    assert empty.returncode == 2  # names the data file and the record, and no file the failed stage never wrote
    assert (f"sft.sources ('chats' reads {data} ({data.stat().st_size:,} bytes)): none of the 1 records is a usable "
            f"conversation; skipped: 1 no assistant turn (first: {data}:1)") in empty.stderr
    assert "report.json" not in empty.stderr and not (tmp_path / "empty").exists()
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}\n')
    bad = run("sft", TINY, *args[:2], "--set", f"sft.dir={tmp_path / 'bad'}", *args[4:])
    assert bad.returncode == 2 and f"{data}:1: messages[1] has unknown role 'wizard'" in bad.stderr


def test_custom_template_and_a_dataset_folder(pretrained, tmp_path, shakespeare_tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe", "never", "always", "soon")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    custom = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
              "{% else %}A: {% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    template = ChatTemplate.get(custom)
    encoded = template.encode(shakespeare_tokenizer, to_messages(rows[0], "r"))
    assert encoded.text == "Q: Say yes.\nA: yes<|eos|>"  # trim_blocks eats the newline after a block tag, as in HF
    # " y" merges the template's space with the reply; like transformers' assistant mask, it counts as the reply's.
    assert spans(shakespeare_tokenizer, encoded.ids, encoded.mask)[0] == [" yes<|eos|>"]
    args = ["--set", f"run.dir={pretrained}", "--set", f"sft.dir={tmp_path / 'sft'}",
            "--set", f"sft.sources=[{{name: ds, dataset: {tmp_path / 'ds'}}}]", "--set", "sft.val_fraction=0",
            "--set", "sft.train.micro_batch_size=1", "--set", f"tokenizer.chat_template={json.dumps(custom)}"]
    result = run("sft", TINY, *args)
    assert result.returncode == 0, result.stderr
    assert "sft data: 6 records read, 6 used" in result.stdout
    saved = yaml.safe_load((tmp_path / "sft" / "recipe.yaml").read_text())
    assert saved["tokenizer"]["chat_template"] == custom  # the run carries the template export will write
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    refused = run("sft", TINY, *args[:-1], f"tokenizer.chat_template={json.dumps(plain)}")
    assert refused.returncode == 2 and "has no {% generation %} block" in refused.stderr
