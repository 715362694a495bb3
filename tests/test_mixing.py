"""Data mixing by weight: real `fermion pretrain` runs draw tokens from their sources in the recipe's proportions,
a source too small for its weight is repeated and the run says so, and the draw sequence is fixed by the seed and
survives a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SHARED_DATA, cli

from fermion.checkpoint import list_checkpoints
from fermion.config import SourceConfig, TokenizerConfig
from fermion.data import ShardSet, Tokenizer, TokenLoader, interleave_documents
from fermion.data.shards import BLOCK

PRETRAIN = SHARED_DATA / "pretrain"
SEQ_LEN, BATCH, STEPS = 8, 128, 100  # 12,800 windows: a share's standard error is at most 0.0044, a 2% gap is 4.5 of it
SEED = 1337  # configs/tiny.yaml's run.seed

# Sizes are chosen far from the weights, so that sampling in proportion to size would fail the ratio by far.
WIKI = {"name": "wiki", "kind": "wiki", "paths": [str(PRETRAIN / "llamafactory_demo/wiki_demo.txt")],
        "separator": "\n", "max_documents": 3}  # three articles: under a tenth of the stories' tokens
STORIES = {"name": "stories", "kind": "synthetic", "separator": "<|endoftext|>", "max_documents": 1500,
           "paths": [str(PRETRAIN / "tinystories/tinystories_train_sample_2MiB.txt")]}
WEB = {"name": "web", "kind": "web", "paths": [str(PRETRAIN / "llamafactory_demo/c4_demo.jsonl")], "max_documents": 60}
CODE = {"name": "code", "kind": "code", "builtin": "python-stdlib", "max_documents": 150}
MIXES = {
    "two sources, 0.8 / 0.2": [{**WIKI, "weight": 0.8}, {**STORIES, "weight": 0.2}],
    "auto-g-nano-1b, 0.40 / 0.25 / 0.35": [{**WEB, "weight": 0.40}, {**CODE, "weight": 0.25},
                                           {**STORIES, "max_documents": 300, "weight": 0.35}],
}

pytestmark = pytest.mark.skipif(not PRETRAIN.is_dir(), reason=f"needs the shared data sets in {PRETRAIN}")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """One tokenizer for every mix, so each run spends its time on sharding and training only."""
    sources = [SourceConfig(**{**source, "max_documents": 50}) for source in (WIKI, STORIES, WEB, CODE)]
    tokenizer = Tokenizer.train(interleave_documents(sources), TokenizerConfig(vocab_size=512, train_bytes=300_000))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module", params=list(MIXES))
def mixed_run(request, tokenizer_file, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """The run directory of configs/tiny.yaml pretrained on the mix, the mix, and what the run printed."""
    root = tmp_path_factory.mktemp("mix")
    recipe = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    recipe["run"]["dir"] = str(root / "run")
    recipe["tokenizer"]["path"] = str(tokenizer_file)
    recipe["data"].update(sources=MIXES[request.param], val_fraction=0.01)
    recipe["train"].update(steps=STEPS, seq_len=SEQ_LEN, micro_batch_size=BATCH, warmup_steps=5, eval_every=STEPS,
                           eval_batches=1, checkpoint_every=STEPS, log_every=STEPS)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("pretrain", str(root / "recipe.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run", MIXES[request.param], result.stdout


def tokens_drawn(run_dir: Path) -> dict[str, int]:
    """Tokens each source gave the run, from the loader position the final checkpoint records."""
    state = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    return {name: windows * SEQ_LEN for name, windows in state["loader"]["consumed"].items()}


def loader_as_pretrain_builds_it(run_dir: Path, batch_size: int = BATCH, seed: int = SEED) -> TokenLoader:
    return TokenLoader(ShardSet(run_dir / "data", "train"), SEQ_LEN, batch_size, seed)


def test_training_draws_tokens_from_the_sources_in_the_weights_ratio(mixed_run):
    run_dir, sources, _ = mixed_run
    drawn = tokens_drawn(run_dir)
    assert sum(drawn.values()) == STEPS * BATCH * SEQ_LEN
    total_weight = sum(source["weight"] for source in sources)
    for source in sources:
        share = drawn[source["name"]] / sum(drawn.values())
        assert share == pytest.approx(source["weight"] / total_weight, abs=0.02), (source["name"], drawn)


@pytest.mark.parametrize("mixed_run", ["two sources, 0.8 / 0.2"], indirect=True)
def test_a_source_smaller_than_its_share_is_repeated_and_that_is_said(mixed_run):
    run_dir, _, printed = mixed_run
    loader = loader_as_pretrain_builds_it(run_dir)
    held = {name: loader.shards.num_windows(name, SEQ_LEN) * SEQ_LEN for name in ("wiki", "stories")}
    total = STEPS * BATCH * SEQ_LEN
    passes = loader.passes(STEPS)
    assert passes == pytest.approx({"wiki": 0.8 * total / held["wiki"], "stories": 0.2 * total / held["stories"]})
    assert passes["wiki"] > 1 > passes["stories"]
    drawn = tokens_drawn(run_dir)
    assert drawn["wiki"] / held["wiki"] == pytest.approx(passes["wiki"], rel=0.02)  # the note tells what happened
    note = (f"upsampling: source 'wiki' holds {held['wiki']:,} tokens and is repeated {passes['wiki']:.1f} times "
            f"over this run (weight share 0.80 of {total:,} tokens)")
    assert loader.upsampling_notes(STEPS) == [note]
    assert note in printed and "source 'stories'" not in printed


def source_sequence(run_dir: Path, samples: int, seed: int = SEED) -> list[str]:
    """The source of each of the first samples, read one sample per batch from the loader's per-source counts."""
    loader = loader_as_pretrain_builds_it(run_dir, batch_size=1, seed=seed)
    sequence, before = [], loader.state_dict()["consumed"]
    for _ in range(samples):
        loader.next_batch()
        after = loader.state_dict()["consumed"]
        sequence += [name for name in after if after[name] > before[name]]
        before = after
    return sequence


def test_the_seed_fixes_the_source_sequence_whatever_the_batch_size(mixed_run):
    run_dir, sources, _ = mixed_run
    sequence = source_sequence(run_dir, 600)
    assert source_sequence(run_dir, 600) == sequence
    assert source_sequence(run_dir, 600, seed=SEED + 1) != sequence
    batched = loader_as_pretrain_builds_it(run_dir, batch_size=200)
    for end in (200, 400, 600):
        batched.next_batch()
        counts = {source["name"]: sequence[:end].count(source["name"]) for source in sources}
        assert batched.state_dict()["consumed"] == counts


def test_resume_continues_the_same_draws_across_a_block_of_source_choices(mixed_run):
    """The state is saved inside the first block of source choices and the continuation crosses into the next (and,
    for the small wiki source, into further epochs of its window order)."""
    run_dir, _, _ = mixed_run
    batch_size = BLOCK // 16
    uninterrupted = loader_as_pretrain_builds_it(run_dir, batch_size)
    for _ in range(15):
        uninterrupted.next_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    expected = [uninterrupted.next_batch()[0] for _ in range(2)]
    resumed = loader_as_pretrain_builds_it(run_dir, batch_size)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()[0]) for x in expected)
    assert resumed.state_dict() == uninterrupted.state_dict()
