"""Continued stages on their own (`fermion pretrain RECIPE --stage NAME`, as torchrun would start it), and training
lengths given as epochs: a stage takes exactly one of steps and epochs, and epochs become the steps that cover its
shards that many times at its batch and sequence length."""

import math
import re
import shutil

import pytest
import yaml
from conftest import REPO, cli

from fermion.checkpoint import find, load_recipe_of, trainer_state_of
from fermion.config import RecipeError, load_recipe
from fermion.data.shards import ShardSet
from fermion.train.pretrain import settle_epochs

TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def with_stages(tmp_path, run_dir, stages: list[dict], **train) -> str:
    """configs/tiny.yaml as the tiny_run fixture trained it (20 steps), in run_dir, with these stages."""
    raw = {**TINY, "run": {**TINY["run"], "dir": str(run_dir)},
           "train": {**TINY["train"], "steps": 20, "checkpoint_every": 20, "eval_every": 20, **train},
           "stages": stages}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def stage(name: str, seed: int, **train) -> dict:
    return {"name": name, "data": {"sources": [{"name": "sums", "builtin": "arithmetic", "max_documents": 300,
                                                "seed": seed}], "val_fraction": 0.05, "num_workers": 1},
            "train": {"lr": 1e-3, "warmup_steps": 1, "eval_every": 1000, "checkpoint_every": 1000, **train}}


@pytest.mark.parametrize("change, message", [
    ({"stages": [stage("more", 1, steps=5, epochs=1)]}, "stages[0].train: give one of steps and epochs"),
    ({"stages": [stage("more", 1)]}, "stages[0].train: give one of steps and epochs"),
    ({"train": {"steps": 5, "epochs": 2}}, "train: give steps (5) or epochs (2), not both"),
    ({"sft": {**TINY["sft"], "train": {"epochs": 2}}}, "sft.train.epochs: sft counts its passes over the data in "
                                                       "sft.epochs"),
    ({"stages": [stage("more", 1, epochs=0)]}, "stages[0].train.epochs: Input should be greater than 0"),
])
def test_steps_or_epochs_one_of_them(tmp_path, change, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}))
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)


def test_a_stages_steps_or_epochs_replace_the_base_sections_ones(tmp_path):
    path = with_stages(tmp_path, tmp_path / "run", [stage("a", 1, epochs=2), stage("b", 2, steps=7)], epochs=None)
    recipe = load_recipe(path)
    first, second = recipe.stage_recipe(0).train, recipe.stage_recipe(1).train
    assert first.epochs == 2 and "steps" not in first.model_fields_set
    assert (second.steps, second.epochs) == (7, None)


def test_unknown_stage_and_stage_before_its_previous_one_finished(tmp_path):
    path = with_stages(tmp_path, tmp_path / "nothing-yet", [stage("sums", 1, epochs=1), stage("more", 2, steps=3)])
    unknown = cli("pretrain", path, "--stage", "textbooks")
    assert unknown.returncode == 2
    assert "--stage 'textbooks' is not a stage of this recipe: its stages are sums, more" in unknown.stderr
    early = cli("pretrain", path, "--stage", "sums")
    assert early.returncode == 2
    assert (f"--stage sums continues from pretraining, which has no checkpoint yet in {tmp_path / 'nothing-yet'}; "
            "run `fermion pretrain RECIPE` first") in early.stderr
    none = cli("pretrain", str(REPO / "configs" / "tiny.yaml"), "--stage", "sums")
    assert none.returncode == 2 and "it has no stages section" in none.stderr


def test_each_stage_runs_on_its_own_from_the_one_before(tmp_path, tiny_run):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    path = with_stages(tmp_path, run_dir, [stage("sums", 1, epochs=1), stage("more", 2, steps=3)])

    before = cli("pretrain", path, "--stage", "more")
    assert before.returncode == 2
    assert ("--stage more continues from stage 'sums', which has no checkpoint yet in "
            f"{run_dir / 'stages' / 'sums'}; run `fermion pretrain RECIPE --stage sums` first") in before.stderr

    sums = cli("pretrain", path, "--stage", "sums")
    assert sums.returncode == 0, sums.stdout + sums.stderr
    stage_dir = run_dir / "stages" / "sums"
    shards = ShardSet(stage_dir / "data", "train")
    windows = sum(shards.num_windows(name, 64) for name in shards.sources)
    steps = math.ceil(windows / 4)  # one pass at 4 sequences a step, one process
    assert f"train.epochs 1: {windows:,} windows of 64 tokens in the train shards, 4 sequences a step -> " \
           f"{steps:,} steps" in sums.stdout
    assert f"{steps:,} steps ×" in sums.stdout  # the trainer's plan
    ckpt = find(stage_dir)
    assert trainer_state_of(ckpt)["step"] == steps
    assert load_recipe_of(ckpt).train.init_from == str(run_dir)
    assert load_recipe(stage_dir / "recipe.yaml", check_paths=False).train.steps == steps
    # under torchrun with 2 processes a step draws twice the sequences: half the steps for the same epoch
    on_two, note = settle_epochs(load_recipe(path).stage_recipe(0), world_size=2)
    assert on_two.train.steps == math.ceil(windows / 8) and note.endswith(f"8 sequences a step -> "
                                                                          f"{on_two.train.steps:,} steps")

    more = cli("pretrain", path, "--stage", "more")
    assert more.returncode == 0, more.stdout + more.stderr
    ckpt = find(run_dir / "stages" / "more")
    assert trainer_state_of(ckpt)["step"] == 3 and load_recipe_of(ckpt).train.init_from == str(stage_dir)
