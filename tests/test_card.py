"""`fermion card`: the model card renders every section, and every number in it is the run's own."""

import io
import json
import shutil

import pytest
import yaml
from conftest import REPO, SHARED_DATA, cli
from rich.console import Console

from fermion.card import StageRecord, build_card, training_section
from fermion.card import front_matter as card_metadata
from fermion.checkpoint import find, trainer_state_of
from fermion.config import DataConfig, MoEConfig, SourceConfig, load_recipe, recipe_from_dict
from fermion.errors import ExportError
from fermion.eval import runner
from fermion.eval.results import TaskOptions, write
from fermion.infer import lm as eval_lm
from fermion.model.counting import count
from fermion.train.dpo import dpo
from fermion.train.pretrain import pretrain
from fermion.train.sft import sft

EVAL_DATA = SHARED_DATA / "eval"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["## Architecture", "## Parameters", "## Training", "### Loss curves", "## Data", "### Pretraining mix",
            "### Filtering", "## Evaluation", "## Smoke test", "## Sample generations", "## Usage",
            "### transformers", "### llama.cpp and Ollama", "### fermion", "## Limitations", "## License"]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"{EVAL_DATA} is missing")
def test_card_renders_every_section_from_the_records(run_copy):
    out = run_copy / "eval"
    result = cli("eval", str(run_copy), "--tasks", "arc_easy,smoke", "--limit", "5", "--max-new-tokens", "8",
                 "--data-dir", str(EVAL_DATA), "--out", str(out))
    assert result.returncode == 0, result.stderr
    card = cli("card", str(run_copy))
    assert card.returncode == 0, card.stderr
    readme = run_copy / "export" / "hf" / "README.md"
    assert card.stdout.strip() == str(readme)
    text = readme.read_text()

    meta = front_matter(text)
    assert {"license", "language", "datasets", "tags", "pipeline_tag", "library_name"} <= set(meta)
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert "fermion" in meta["tags"] and meta["license"] == "apache-2.0"
    recipe = load_recipe(run_copy / "recipe.yaml", check_paths=False)
    assert meta["datasets"] == recipe.data.sources[0].paths
    for heading in SECTIONS:
        assert f"\n{heading}\n" in text, heading

    counts = count(recipe.model, recipe.seq_len)
    assert f"| total parameters | {counts.total_params:,} |" in text
    assert f"| active parameters per token | {counts.active_params:,} |" in text
    state = trainer_state_of(find(run_copy))
    assert f"| steps | {state['step']:,} |" in text
    assert f"| tokens seen | {state['tokens_seen']:,} |" in text
    assert f"| wall-clock (training steps) | {state['elapsed_s']:,.1f} s" in text
    hw = state["hardware"]
    assert f"| hardware | 1 × {hw['name']} (cpu, {hw['cpu_cores']:,} CPU cores) |" in text
    assert f"| precision | {state['precision']} (train.precision: fp32) |" in text

    index = json.loads((run_copy / "data" / "index.json").read_text())
    for name, entry in index["sources"].items():
        assert f"| {entry['train']['tokens']:,} | {entry['val']['tokens']:,} |" in text, name
    assert "No filtering: the recipe has no `data.prepare` section" in text

    saved = json.loads((out / "results.json").read_text())
    for r in saved["results"]:
        for m in r["metrics"]:
            err = f"{m['stderr']:.4f}" if m["stderr"] is not None else "–"
            assert f"| {r['task']} | {m['name']} | {m['value']:.4f} | {err} | {r['shots']} | {r['n']} |" in text
    smoke = next(r for r in saved["results"] if r["task"] == "smoke")
    verdicts = [s["verdict"] for s in smoke["samples"]]
    assert " / ".join(f"{verdicts.count(v)} {v}" for v in ("OK", "WEAK", "FAIL")) in text
    assert "From the smoke test's records" in text

    metrics = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    last_val = [m for m in metrics if "val_loss" in m][-1]
    assert f"| final validation loss | {last_val['val_loss']:.4f} (step {last_val['step']:,}) |" in text
    png = readme.parent / "loss_pretrain.png"
    assert png.read_bytes().startswith(PNG_MAGIC) and "![loss_pretrain.png](loss_pretrain.png)" in text

    hf, gguf = run_copy / "export" / "hf", run_copy / "export" / "gguf"
    assert f'AutoModelForCausalLM.from_pretrained("{hf}")' in text
    assert f"llama-cli -m {gguf / 'tiny-f16.gguf'}" in text and f"-f {gguf / 'tiny-f16.Modelfile'}" in text
    assert f"fermion chat {run_copy}" in text
    assert not list(readme.parent.glob(".*tmp*"))  # nothing half-written left behind


def test_card_without_eval_says_so_and_samples_with_a_seed(run_copy, tmp_path):
    out = tmp_path / "card"
    readme = build_card(run_copy, out)
    text = readme.read_text()
    assert readme == out / "README.md" and (out / "loss_pretrain.png").read_bytes().startswith(PNG_MAGIC)
    assert f"Not evaluated: run `fermion eval {run_copy}`" in text
    assert f"Not run: `fermion eval {run_copy} --tasks smoke`" in text
    assert "seed 0 + prompt number" in text and "**Prompt** (seed 0):" in text
    assert build_card(run_copy, out).read_text() == text  # fixed seeds: the same card again


def test_card_bad_input_is_one_line_and_writes_nothing(tmp_path):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    out = tmp_path / "out"
    result = cli("card", str(not_a_run), "--out", str(out))
    assert result.returncode == 2
    assert "is not a run directory" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ExportError, match="no such folder"):
        build_card(tmp_path / "nope", out)
    (not_a_run / "recipe.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ExportError, match="not valid YAML"):
        build_card(not_a_run, out)
    assert not out.exists()


def test_the_card_and_the_hf_export_share_their_folder_in_either_order(run_copy):
    """`fermion card` before `fermion export` is accepted, and a re-export keeps the card and its plots."""
    readme = build_card(run_copy, generate=False)
    card_text = readme.read_text()
    plots = sorted(p.name for p in readme.parent.glob("loss_*.png"))
    assert plots
    for _ in range(2):
        result = cli("export", str(run_copy), "--format", "hf")
        assert result.returncode == 0, result.stderr
        assert (readme.parent / "config.json").is_file() and readme.read_text() == card_text
        assert sorted(p.name for p in readme.parent.glob("loss_*.png")) == plots
    other = run_copy / "export" / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = cli("export", str(run_copy), "--format", "hf", "--out", str(other))
    assert refused.returncode == 2 and "is not an earlier export" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- every stage of a long run

STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"
ALICE = SHARED_DATA / "pretrain" / "gutenberg_nltk" / "carroll-alice.txt"
ALPACA = SHARED_DATA / "sft" / "alpaca" / "alpaca_small_2k.json"
HH = SHARED_DATA / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def staged_recipe(run_dir):
    """configs/tiny.yaml cut to a few steps, with a continued stage on Alice in Wonderland, SFT and DPO, and the
    arc_easy benchmark run by the trainer every 3 steps."""
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["run"]["dir"] = str(run_dir)
    raw["data"]["sources"][0].update(paths=[str(STORIES)], max_documents=300)
    raw["train"].update(steps=6, warmup_steps=2, eval_every=6, eval_batches=2, checkpoint_every=6, log_every=1)
    raw["stages"] = [{"name": "alice", "train": {"steps": 4, "lr": 1e-3, "eval_every": 4, "checkpoint_every": 4},
                      "data": {"sources": [{"name": "alice", "kind": "books", "paths": [str(ALICE)],
                                            "separator": "\n", "max_documents": 400}],
                               "val_fraction": 0.05, "num_workers": 1}}]
    short = {"steps": 4, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "log_every": 1}
    raw["sft"].update(sources=[{"name": "alpaca", "paths": [str(ALPACA)], "max_documents": 64}], epochs=None)
    raw["sft"]["train"].update(short)
    raw["dpo"].update(sources=[{"name": "hh", "paths": [str(HH)], "max_documents": 32}], epochs=None)
    raw["dpo"]["train"].update({**short, "steps": 3, "eval_every": 3, "checkpoint_every": 3})
    raw["eval"] = {"tasks": ["arc_easy"], "data_dir": str(EVAL_DATA), "limit": 4, "every": 3}
    return recipe_from_dict(raw)


def evaluate_stage(directory, text_file):
    """What `fermion eval STAGE_DIR` (and `fermion run` after training) writes: <stage>/eval/results.json. The
    perplexity of a text gives each stage its own numbers; arc_easy's come with standard errors."""
    model = eval_lm.load(directory)
    options = TaskOptions(data_dir=EVAL_DATA, limit=4)
    results = runner.run(model, ["arc_easy", f"perplexity={text_file}"], options)
    return json.loads(write(results, directory / "eval", model=str(directory), extra={"limit": 4}).read_text())


def cells(text: str, label: str) -> list[str]:
    """The cells after `label` (one cell, or several joined with " | ") of the first table row it starts."""
    prefix = f"| {label} |"
    row = next(line for line in text.splitlines() if line.startswith(prefix))
    return [c.strip() for c in row[len(prefix):].strip().strip("|").split(" | ")]


def with_error(metric: dict) -> str:
    return f"{metric['value']:.4f}" + (f" ± {metric['stderr']:.4f}" if metric["stderr"] is not None else "")


@pytest.mark.skipif(not (EVAL_DATA.is_dir() and ALICE.is_file() and HH.is_file()), reason="shared data is missing")
def test_card_covers_continued_sft_and_dpo_stages_and_their_evaluations(tmp_path):
    run = tmp_path / "run"
    recipe = staged_recipe(run)
    quiet = Console(file=io.StringIO())
    pretrain(recipe, console=quiet)
    pretrain(recipe.stage_recipe(0), console=quiet)
    sft(recipe, console=quiet)
    dpo(recipe, console=quiet)
    dirs = {"pretrain": run, "alice": run / "stages" / "alice", "sft": run / "sft", "dpo": run / "dpo"}
    text_file = tmp_path / "alice.txt"
    text_file.write_text(ALICE.read_text()[:4000])
    saved = {name: evaluate_stage(d, text_file) for name, d in dirs.items() if name != "alice"}  # alice: not evaluated

    text = build_card(run, tmp_path / "card", generate=False).read_text()
    assert "(pretrain → alice → sft → dpo)" in text
    training = text.split("\n## Training\n")[1].split("\n## ")[0]
    assert cells(training, "") == list(dirs)  # the training table's columns, in training order
    states = {name: trainer_state_of(find(d)) for name, d in dirs.items()}
    assert cells(training, "steps") == [f"{s['step']:,}" for s in states.values()] == ["6", "4", "4", "3"]
    assert cells(training, "tokens seen") == [f"{s['tokens_seen']:,}" for s in states.values()]
    assert cells(training, "wall-clock (training steps)")[0].startswith(f"{states['pretrain']['elapsed_s']:,.1f} s")
    hardware = states["dpo"]["hardware"]
    assert hardware["device"] == "cpu" and hardware["count"] == 1 and hardware["name"]
    assert cells(training, "hardware") == [f"1 × {s['hardware']['name']} (cpu, {s['hardware']['cpu_cores']:,} CPU "
                                           f"cores)" for s in states.values()]
    assert cells(training, "precision") == ["fp32 (train.precision: fp32)"] * 4
    assert cells(training, "compiled") == ["no (train.compile: false)"] * 4
    for name in dirs:
        assert f"![loss_{name}.png](loss_{name}.png)" in text and (tmp_path / "card" / f"loss_{name}.png").is_file()

    index = json.loads((dirs["alice"] / "data" / "index.json").read_text())
    assert "### Continued pretraining: alice" in text
    assert f"| alice | {ALICE} | books | 1 | {index['sources']['alice']['train']['documents']:,} |" in text
    assert "### SFT data" in text and "### DPO data" in text

    assert "### Evaluation across stages" in text
    assert "Not evaluated: alice (no eval/results.json in its directory)." in text
    across = text.split("### Evaluation across stages\n")[1].split("\n### ")[0]
    assert cells(across, "task | metric") == ["pretrain", "sft", "dpo"]
    for i, result in enumerate(saved["dpo"]["results"]):
        for j, metric in enumerate(result["metrics"]):
            assert cells(across, f"{result['task']} | {metric['name']}") == [
                with_error(saved[s]["results"][i]["metrics"][j]) for s in ("pretrain", "sft", "dpo")]
            assert f"| {result['task']} | {metric['name']} | {metric['value']:.4f} |" in text  # the final table
    perplexity = saved["dpo"]["results"][1]
    assert len(set(cells(across, f"{perplexity['task']} | {perplexity['metrics'][0]['name']}"))) == 3  # 3 models
    for name, directory in dirs.items():
        steps = sorted((directory / "eval").glob("step_*/results.json"))
        assert steps, name  # eval.every: 3 wrote them in every stage
        during = text.split(f"### Evaluation during training: {name}\n")[1].split("\n### ")[0]
        for path in steps:
            main = json.loads(path.read_text())["results"][0]["metrics"][0]
            step = int(path.parent.name.removeprefix("step_"))
            assert f"| {step:,} | {with_error(main)} |" in during


def test_training_rows_of_a_checkpoint_without_hardware_records_say_so(tiny_run):
    """Checkpoints written before the trainer recorded hardware, precision and compilation."""
    recipe = load_recipe(tiny_run / "recipe.yaml", check_paths=False)
    state = trainer_state_of(find(tiny_run))
    old = {k: v for k, v in state.items() if k not in ("hardware", "precision", "compiled")}
    text = "\n".join(training_section([StageRecord("pretrain", "pretrain", tiny_run, recipe, recipe.data,
                                                    find(tiny_run), old)]))
    assert "| hardware | not recorded (the checkpoint predates hardware records) |" in text
    assert "| precision | not recorded (train.precision: fp32) |" in text
    assert "| compiled | not recorded (train.compile: false) |" in text


# ------------------------------------------------------------------------------------- provenance and metadata


@pytest.mark.parametrize("shape, family", [({}, "llama"), ({"sliding_window": 16}, "mistral"),
                                           ({"moe": MoEConfig(n_experts=4, top_k=2)}, "mixtral"),
                                           ({"qk_norm": True}, "qwen3")])
def test_metadata_tags_the_family_the_hf_export_writes_and_lists_each_dataset(tiny_run, shape, family):
    recipe = load_recipe(tiny_run / "recipe.yaml", check_paths=False)
    shaped = recipe.model_copy(update={"model": recipe.model.model_copy(update=shape)})
    data = DataConfig(sources=[SourceConfig(name="two", paths=["web/a.jsonl", "web/b/*.jsonl"]),
                               SourceConfig(name="hub", dataset="nampdn-ai/tiny-textbooks", subset="default"),
                               SourceConfig(name="made", builtin="stories", max_documents=5)])
    stage = StageRecord("pretrain", "pretrain", tiny_run, shaped, data, find(tiny_run), {})
    meta = front_matter(card_metadata([stage], "mit", "en"))
    assert family in meta["tags"] and "llama-style" not in meta["tags"]
    assert ("mixture-of-experts" in meta["tags"]) == (family == "mixtral")
    assert meta["datasets"] == ["web/a.jsonl", "web/b/*.jsonl", "nampdn-ai/tiny-textbooks", "stories"]
    assert meta["license"] == "mit"


def test_a_run_started_from_another_model_says_where_it_continued_from(tiny_run, tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["run"]["dir"] = str(tmp_path / "continued")
    raw["data"]["sources"][0].update(paths=[str(STORIES)], max_documents=100)
    raw["train"].update(init_from=str(tiny_run), steps=2, warmup_steps=1, eval_every=2, checkpoint_every=2)
    pretrain(recipe_from_dict(raw), console=Console(file=io.StringIO()))
    text = build_card(tmp_path / "continued", tmp_path / "card", generate=False).read_text()
    assert f"trained with fermion, continued from `{tiny_run}` (pretrain)." in text
    assert "from scratch" not in text


def test_the_license_is_the_recipes_unless_the_command_line_names_one(run_copy):
    text = build_card(run_copy, generate=False).read_text()
    assert front_matter(text)["license"] == "apache-2.0"
    assert "apache-2.0 (the recipe records no license, so the card falls back to fermion's own" in text
    recipe = run_copy / "recipe.yaml"
    raw = yaml.safe_load(recipe.read_text())
    raw["run"]["license"] = "mit"  # as a recipe that records its license writes it
    recipe.write_text(yaml.safe_dump(raw))
    text = build_card(run_copy, generate=False).read_text()
    assert front_matter(text)["license"] == "mit" and "mit (the recipe's run.license)." in text
    result = cli("card", str(run_copy), "--license", "cc-by-4.0", "--no-samples")
    assert result.returncode == 0, result.stderr
    text = (run_copy / "export" / "hf" / "README.md").read_text()
    assert front_matter(text)["license"] == "cc-by-4.0" and "cc-by-4.0 (set with `fermion card --license`)." in text
