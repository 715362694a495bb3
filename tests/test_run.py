"""`fermion run` and `fermion demo`: every stage in order, skipped when up to date, resumed after a kill; the demo's
export loads in transformers with its chat template, and its model card matches the run's records."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import HANG, REPO, SHARED_DATA, cli

from fermion.checkpoint import find, list_checkpoints, trainer_state_of
from fermion.config import load_recipe
from fermion.layout import step_of
from fermion.model.counting import count

STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
WATCH = {"progress": False, "tensorboard": False, "compile": False, "log_every": 10}


def write_recipe(tmp_path, steps: int = 40, **sections) -> tuple:
    run_dir = tmp_path / "run"
    recipe = {
        "run": {"name": "tiny-run", "dir": str(run_dir), "seed": 3},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 176,
                  "context_length": 128},
        "tokenizer": {"vocab_size": 512, "train_bytes": 200_000},
        "data": {"sources": [{"name": "stories", "kind": "books", "paths": [str(STORIES)],
                              "separator": "<|endoftext|>", "max_documents": 800},
                             {"name": "arithmetic", "builtin": "arithmetic", "max_documents": 300}],
                 "val_fraction": 0.05, "num_workers": 1,
                 "prepare": {"workers": 1, "gopher_repetition": False, "gopher_quality": False, "c4": False,
                             "fineweb": False, "minhash": False, "decontaminate": False}},
        "train": {"steps": steps, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 10,
                  "eval_every": 20, "eval_batches": 2, **WATCH},
        "eval": {"tasks": ["arithmetic"], "limit": 8},
        "export": {"formats": ["hf"]},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run_dir


def ledger(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())["steps"]


pytestmark = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} is missing")


def test_killed_during_pretraining_it_resumes_without_redoing_prepare(tmp_path):
    path, run_dir = write_recipe(tmp_path, steps=400)
    command = [sys.executable, "-m", "fermion", "run", str(path)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and process.poll() is None:
        if find(run_dir, warn=lambda *_: None, required=False) is not None:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before a checkpoint could be caught: " + process.stdout.read()
    process.send_signal(signal.SIGKILL)  # a crash: no chance to save
    process.wait()
    killed_at = step_of(find(run_dir))
    assert 0 < killed_at < 400
    records = ledger(run_dir)
    assert records["prepare"]["status"] == "done" and records["tokenizer"]["status"] == "done"
    assert records["pretrain"]["status"] == "started"
    report = next(run_dir.glob("prepared/*/prepare_report.json"))
    tokenizer = run_dir / "tokenizer.json"
    shards = run_dir / "data" / "index.json"
    before = {p: p.stat().st_mtime_ns for p in (report, tokenizer, shards)}

    again = cli("run", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout.replace("\n", " ")
    assert "prepare: up to date, skipped" in out and "tokenizer: up to date, skipped" in out
    assert "resuming from" in out and f"(step {killed_at:,}," in out
    assert {p: p.stat().st_mtime_ns for p in before} == before  # prepare, tokenizer and shards untouched
    assert trainer_state_of(find(run_dir))["step"] == 400
    assert all(record["status"] == "done" for record in ledger(run_dir).values())
    assert (run_dir / "eval" / "results.json").is_file() and (run_dir / "export" / "hf" / "README.md").is_file()

    # once finished, a run again finds every step up to date
    rest = cli("run", str(path))
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert all(f"{step}: up to date, skipped" in rest.stdout for step in ledger(run_dir))
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_stages_skip_when_up_to_date_and_rerun_from_a_change_onwards(tmp_path):
    more = {"name": "more", "data": {"sources": [{"name": "sums", "builtin": "arithmetic", "max_documents": 300,
                                                  "seed": 9}], "val_fraction": 0.05, "num_workers": 1},
            "train": {"steps": 10, "lr": 1e-3}}
    post = {"micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "eval_every": 100, "checkpoint_every": 100, **WATCH}
    path, run_dir = write_recipe(
        tmp_path, steps=20, stages=[more],
        sft={"sources": [{"name": "sums", "builtin": "arithmetic", "max_documents": 200, "seed": 1}],
             "epochs": 1, "train": post},
        dpo={"sources": [{"name": "pairs", "builtin": "arithmetic-pairs", "max_documents": 64, "seed": 2}],
             "epochs": 1, "train": post},
        export={"formats": ["hf", "gguf"]})
    first = cli("run", str(path))
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["prepare", "tokenizer", "pretrain", "more", "sft", "dpo", "eval", "export", "card"]
    records = ledger(run_dir)
    assert list(records) == names and all(r["status"] == "done" for r in records.values())
    # the continued stage starts from pretraining, SFT from it, DPO from SFT; every stage is evaluated
    stage = load_recipe(run_dir / "stages" / "more" / "recipe.yaml", check_paths=False)
    assert stage.train.init_from == str(run_dir) and stage.tokenizer.path == str(run_dir / "tokenizer.json")
    assert load_recipe(run_dir / "sft" / "recipe.yaml", check_paths=False).train.init_from == \
        str(run_dir / "stages" / "more")
    assert load_recipe(run_dir / "dpo" / "recipe.yaml", check_paths=False).train.init_from == str(run_dir / "sft")
    for directory in (run_dir, run_dir / "stages" / "more", run_dir / "sft", run_dir / "dpo"):
        assert (directory / "eval" / "results.json").is_file(), directory
    assert "evaluation by stage" in first.stdout
    assert any((run_dir / "dpo" / "export" / "gguf").glob("*.gguf"))
    assert (run_dir / "dpo" / "export" / "hf" / "README.md").is_file()

    again = cli("run", str(path))
    assert again.returncode == 0, again.stderr
    assert all(f"{name}: up to date, skipped" in again.stdout for name in names)

    # a changed SFT setting reruns SFT and everything after it, and nothing before
    sft_ckpts = list_checkpoints(run_dir / "sft")
    scored = {d: (d / "eval" / "results.json").stat().st_mtime_ns for d in (run_dir, run_dir / "sft")}
    changed = cli("run", str(path), "--set", "sft.train.lr=5e-4")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    for name in names[:4]:
        assert f"{name}: up to date, skipped" in changed.stdout
    for name in names[4:]:
        assert f"{name}: up to date, skipped" not in changed.stdout
    # the eval step scores the retrained stages only
    assert (run_dir / "eval" / "results.json").stat().st_mtime_ns == scored[run_dir]
    assert (run_dir / "sft" / "eval" / "results.json").stat().st_mtime_ns != scored[run_dir / "sft"]
    assert "eval pretrain: unchanged since its results were written, kept" in changed.stdout
    assert "eval more: unchanged since its results were written, kept" in changed.stdout
    superseded = list((run_dir / "sft" / "superseded").glob("*/checkpoints"))
    assert len(superseded) == 1 and {p.name for p in superseded[0].iterdir()} >= {p.name for p in sft_ckpts}

    only = cli("run", str(path), "--set", "sft.train.lr=5e-4", "--only", "card")
    assert only.returncode == 0 and "card: up to date" not in only.stdout
    bad = cli("run", str(path), "--from", "nope")
    assert bad.returncode == 2 and "--from 'nope': this recipe's steps are prepare, tokenizer, pretrain, more" in \
        bad.stderr.replace("\n", " ")


def test_only_needs_the_steps_before_it(tmp_path):
    path, run_dir = write_recipe(tmp_path)
    result = cli("run", str(path), "--only", "eval")
    assert result.returncode == 2
    assert "--only eval: the step before it, prepare, has not finished" in result.stderr.replace("\n", " ")
    assert not (run_dir / "checkpoints").exists()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`fermion demo`, shrunk to a minute: every stage, generated data, eval at every stage, hf + gguf, card."""
    run_dir = tmp_path_factory.mktemp("demo") / "demo"
    quick = [f"run.dir={run_dir}", "model.n_layers=2", "train.steps=12", "train.warmup_steps=2", "train.eval_every=12",
             "train.checkpoint_every=12", "train.compile=false", "tokenizer.train_bytes=400000",
             "data.sources.0.max_documents=40", "data.sources.1.max_documents=300", "data.sources.2.max_documents=200",
             "data.sources.3.max_documents=200", "sft.epochs=1", "sft.sources.0.max_documents=200",
             "sft.sources.1.max_documents=200", "sft.sources.2.max_documents=100", "sft.train.compile=false",
             "eval.limit=6"]
    result = cli("demo", *[arg for item in quick for arg in ("--set", item)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return run_dir, result.stdout


def test_demo_runs_every_stage_and_chats(demo_run):
    run_dir, out = demo_run
    assert all(record["status"] == "done" for record in ledger(run_dir).values())
    assert list(ledger(run_dir)) == ["tokenizer", "pretrain", "sft", "eval", "export", "card"]
    assert "evaluation by stage" in out and "demo finished in" in out
    assert out.count("user ") >= 4 and out.count("assistant ") >= 4
    for directory in (run_dir, run_dir / "sft"):
        results = json.loads((directory / "eval" / "results.json").read_text())
        assert {r["task"] for r in results["results"]} == {"arithmetic", "tinytask", "smoke"}
        assert not any(r["cut_prompts"] for r in results["results"])  # every prompt fits the demo's context
    assert any((run_dir / "sft" / "export" / "gguf").glob("*.gguf"))


def test_demo_export_loads_in_transformers_with_its_chat_template(demo_run):
    transformers = pytest.importorskip("transformers")
    from fermion.chat.templates import ChatTemplate
    from fermion.checkpoint import load
    from fermion.data.tokenizer import Tokenizer

    run_dir, _ = demo_run
    folder = run_dir / "sft" / "export" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 8?"}]
    recipe = load_recipe(run_dir / "sft" / "recipe.yaml", check_paths=False)
    ours = ChatTemplate.get(recipe.tokenizer.chat_template)
    tokenizer = Tokenizer.load(run_dir / "sft" / "tokenizer.json")
    ids = ours.encode(tokenizer, messages, add_generation_prompt=True).ids
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(rendered["input_ids"]) == ids
    assert hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ours.render(messages, tokenizer, add_generation_prompt=True)
    model = load(run_dir / "sft", dtype=torch.float32).model
    with torch.no_grad():  # the export is bf16: compare the same weights (parameters only: the rotary tables stay fp32)
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits
        mine, _ = model(torch.tensor([ids]))
    assert (theirs - mine).abs().max().item() < 1e-4


def test_demo_card_has_every_section_and_the_runs_numbers(demo_run):
    run_dir, _ = demo_run
    text = (run_dir / "sft" / "export" / "hf" / "README.md").read_text()
    for heading in ["## Architecture", "## Parameters", "## Training", "### Loss curves", "## Data",
                    "### Pretraining mix", "## Evaluation", "## Smoke test", "## Sample generations", "## Usage",
                    "### transformers", "### llama.cpp and Ollama", "### fermion", "## Limitations", "## License"]:
        assert f"\n{heading}\n" in text, heading
    recipe = load_recipe(run_dir / "recipe.yaml", check_paths=False)
    counts = count(recipe.model, recipe.seq_len)
    assert f"| total parameters | {counts.total_params:,} |" in text
    for directory in (run_dir, run_dir / "sft"):
        state = trainer_state_of(find(directory))
        assert f"{state['step']:,}" in text and f"{state['tokens_seen']:,}" in text
    index = json.loads((run_dir / "data" / "index.json").read_text())
    for name, entry in index["sources"].items():
        assert f"| {entry['train']['tokens']:,} | {entry['val']['tokens']:,} |" in text, name
    for directory in (run_dir, run_dir / "sft"):
        results = json.loads((directory / "eval" / "results.json").read_text())
        for task in results["results"]:
            for metric in task["metrics"]:
                assert f"{metric['value']:.3f}" in text or f"{metric['value']:.4f}" in text, (directory, metric)
    assert os.path.getsize(run_dir / "sft" / "export" / "hf" / "loss_pretrain.png") > 1000


def test_demo_data_swaps_in_the_users_corpora(tmp_path):
    from fermion.demo import with_user_data

    corpus = tmp_path / "corpus"
    (corpus / "code").mkdir(parents=True)
    (corpus / "notes.txt").write_text("Some notes.\n")
    (corpus / "web.jsonl").write_text('{"text": "a page"}\n')
    (corpus / "code" / "a.txt").write_text("def f(): pass\n")
    (corpus / "ignored.csv").write_text("x,y\n")
    demo = load_recipe(REPO / "configs" / "demo.yaml")
    recipe = with_user_data(demo, corpus)
    assert [(s.name, s.kind, s.paths, s.builtin) for s in recipe.data.sources] == [
        ("code", "code", [str(corpus / "code" / "**" / "*.txt")], None),
        ("notes", "web", [str(corpus / "notes.txt")], None),
        ("web", "web", [str(corpus / "web.jsonl")], None)]
    assert recipe.sft == demo.sft and recipe.dpo == demo.dpo and recipe.eval == demo.eval
    missing = cli("demo", "--data", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli("demo", "--data", str(empty))
    assert nothing.returncode == 2 and "no .txt, .jsonl, .jsonl.gz, .jsonl.zst files" in nothing.stderr
    assert not (REPO / "runs" / "demo-empty").exists() and not (REPO / "runs" / "demo-nope").exists()


def test_gain_table_marks_changes_beyond_two_standard_errors():
    from rich.console import Console

    from fermion.run import gain_table, stage_gains

    def results(exact, se, args):
        return {"results": [{"task": "arithmetic", "metrics": [{"name": "exact", "value": exact, "stderr": se}]},
                            {"task": "tinytask", "metrics": [{"name": "arguments", "value": args}]}]}

    tables = {"pretrain": results(0.04, 0.02, 0.0), "sft": results(0.06, 0.024, 0.18),
              "rl": results(0.20, 0.04, 0.30)}
    gains = {(g[0], g[2]): g for g in stage_gains(tables)}
    _, _, _, change, se = gains["arithmetic", "sft − pretrain"]
    assert change == pytest.approx(0.02) and se == pytest.approx((0.02**2 + 0.024**2) ** 0.5)
    assert gains["tinytask", "rl − sft"][4] is None  # no standard error reported, none invented
    console = Console(record=True, width=120)
    console.print(gain_table(tables))
    text = console.export_text()
    assert "+0.020 ± 0.031" in text and "+0.140 ± 0.047 ▲" in text and "+0.120" in text
    assert gain_table({"pretrain": tables["pretrain"]}) is None


def test_gain_standard_error_is_paired_by_problem_where_each_problem_was_scored():
    """Two stages on the same 40 problems: the second gets 4 more right and none wrong that the first got right.
    Unpaired, +0.10 is within two errors (0.105 each way); paired, the per-problem changes say it is a gain."""
    from fermion.eval.results import mean_metric
    from fermion.run import stage_gains

    def results(right: set[int], ids=range(40)):
        samples = [{"id": f"{i} + 1", "exact": i in right} for i in ids]
        metric = mean_metric("exact", [float(s["exact"]) for s in samples])
        return {"results": [{"task": "arithmetic", "metrics": [{"name": metric.name, "value": metric.value,
                                                                 "stderr": metric.stderr}], "samples": samples}]}

    before, after = results(set(range(10))), results(set(range(14)))
    [(_, _, _, change, se)] = stage_gains({"sft": before, "rl": after})
    se_a, se_b = (t["results"][0]["metrics"][0]["stderr"] for t in (before, after))
    unpaired = (se_a**2 + se_b**2) ** 0.5
    assert change == pytest.approx(0.1) and change < 2 * unpaired
    assert se == pytest.approx(mean_metric("d", [1.0] * 4 + [0.0] * 36).stderr) and change > 2 * se
    # Not the same problems (or no per-problem scores): the unpaired error, never a paired one invented.
    shifted = results(set(range(14)), ids=range(1, 41))
    [(_, _, _, _, other)] = stage_gains({"sft": before, "rl": shifted})
    assert other == pytest.approx((se_a**2 + shifted["results"][0]["metrics"][0]["stderr"] ** 2) ** 0.5)
