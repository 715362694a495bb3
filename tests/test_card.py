"""`fermion card`: the model card renders every section, and every number in it is the run's own."""

import json
import shutil

import pytest
import yaml
from conftest import SHARED_DATA, fermion

from fermion.card import build_card
from fermion.config import load_recipe
from fermion.export import ExportError
from fermion.model.counting import count
from fermion.train.checkpoint import newest_good, trainer_state_of

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
    result = fermion("eval", str(run_copy), "--tasks", "arc_easy,smoke", "--limit", "5", "--max-new-tokens", "8",
                     "--data-dir", str(EVAL_DATA), "--out", str(out))
    assert result.returncode == 0, result.stderr
    card = fermion("card", str(run_copy))
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
    state = trainer_state_of(newest_good(run_copy))
    assert f"| steps | {state['step']:,} |" in text
    assert f"| tokens seen | {state['tokens_seen']:,} |" in text
    assert f"| wall-clock (training steps) | {state['elapsed_s']:,.1f} s" in text
    assert "| hardware | not recorded" in text

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
    assert f"llama-cli -m {gguf / 'tiny-f16.gguf'}" in text and f"-f {gguf / 'Modelfile'}" in text
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
    result = fermion("card", str(not_a_run), "--out", str(out))
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
        result = fermion("export", str(run_copy), "--format", "hf")
        assert result.returncode == 0, result.stderr
        assert (readme.parent / "config.json").is_file() and readme.read_text() == card_text
        assert sorted(p.name for p in readme.parent.glob("loss_*.png")) == plots
    other = run_copy / "export" / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = fermion("export", str(run_copy), "--format", "hf", "--out", str(other))
    assert refused.returncode == 2 and "is not an earlier export" in refused.stderr
    assert (other / "notes.txt").read_text() == "mine"
