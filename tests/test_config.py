"""Recipes: validation errors a user can act on, overrides, and the CLI's model info."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli, fermion

from fermion.config import RecipeError, load_recipe

TINY = REPO / "configs" / "tiny.yaml"


def write_recipe(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["run"]["dir"] = str(tmp_path / "run")
    mutate(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def misspelt(raw):
    raw["train"]["lrr"] = raw["train"].pop("lr")


def negative_lr(raw):
    raw["train"]["lr"] = -0.001


def missing_path(raw):
    raw["data"]["sources"][0]["paths"] = ["no/such/corpus/*.jsonl"]


def warmup_past_steps(raw):
    raw["train"]["warmup_steps"] = 100  # steps: 60


def val_fraction_beside_a_validation_source(raw):
    raw["data"]["sources"].append({"name": "held", "paths": raw["data"]["sources"][0]["paths"], "validation": True})


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (misspelt, "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (negative_lr, "train.lr: Input should be greater than 0 (got -0.001)"),
        (missing_path, "data.sources[0].paths[0]: no file matches 'no/such/corpus/*.jsonl'"),
        (warmup_past_steps, "train.warmup_steps: must not exceed steps (60); lower warmup_steps, or leave it out to "
                            "get 6 (got 100)"),
        (val_fraction_beside_a_validation_source, "data.val_fraction: a source is marked validation (sources[1] "
                                                  "('held')): the marked sources are the held-out split and every "
                                                  "other one is trained on whole; remove val_fraction (got 0.05)"),
    ],
)
def test_bad_recipes_give_one_clear_line_exit_2_and_write_nothing(tmp_path, mutate, expected):
    recipe = write_recipe(tmp_path, mutate)
    result = cli("pretrain", str(recipe))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0] and str(recipe) in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_overrides_apply_and_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(TINY, ["train.lr=3e-4", "model.qk_norm=true", "data.sources.0.weight=2"])
    assert recipe.train.lr == 3e-4 and recipe.model.qk_norm and recipe.data.sources[0].weight == 2
    saved = tmp_path / "resolved.yaml"
    saved.write_text(recipe.to_yaml())
    assert load_recipe(saved) == recipe


def test_override_of_unknown_key_is_named():
    with pytest.raises(RecipeError, match=r"unknown key 'train.warmup'; did you mean 'train.warmup_steps'\?"):
        load_recipe(TINY, ["train.warmup=10"])


def test_cross_field_checks():
    with pytest.raises(RecipeError, match="n_heads .* must be a multiple of n_kv_heads"):
        load_recipe(TINY, ["model.n_kv_heads=3"])
    with pytest.raises(RecipeError, match="top_k .* must be at most n_experts"):
        load_recipe(TINY, ["model.moe={n_experts: 2, top_k: 3}"])
    with pytest.raises(RecipeError, match="train.seq_len .* exceeds model.context_length"):
        load_recipe(TINY, ["train.seq_len=4096"])


def test_model_info_7b_is_instant_and_allocates_nothing():
    code = (
        "import resource, time; t = time.perf_counter();"
        "from fermion.config import load_recipe; from fermion.model.counting import count;"
        "c = count(load_recipe('configs/published/neutrino-7b.yaml', check_paths=False).model);"
        "print(c.total_params, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    total, seconds, max_rss_kib = out.stdout.split()
    assert int(total) == 7_241_732_096
    assert int(max_rss_kib) < 2 * 2**20  # well under the 29 GB the fp32 weights would take


def test_help_lists_the_stages():
    result = fermion("--help")  # in its own process: `python -m fermion` itself starts
    for command in ("pretrain", "tokenizer", "model", "generate", "demo"):
        assert command in result.stdout


def test_warmup_left_out_is_a_tenth_of_the_steps_each_stage_its_own(tmp_path):
    """The default warmup was 100 steps whatever the run, so any recipe of fewer than 100 steps that left it out was
    refused ("warmup_steps (100) must not exceed steps"), and so was a continued stage shorter than that."""
    from fermion.config import TrainConfig
    from fermion.train.schedule import learning_rate

    assert [TrainConfig(steps=steps).warmup for steps in (1, 5, 50, 1000, 5000)] == [1, 1, 5, 100, 100]
    assert learning_rate(TrainConfig(steps=50, lr=1.0), 0) == pytest.approx(0.2)  # 1 of 5 warmup steps
    assert TrainConfig(steps=50, warmup_steps=0).warmup == 0
    path = write_recipe(tmp_path, lambda raw: (raw["train"].pop("warmup_steps"), raw.update(stages=[
        {"name": "more", "data": raw["data"], "train": {"steps": 30}}])))
    recipe = load_recipe(path)
    assert (recipe.train.warmup, recipe.stage_recipe(0).train.warmup) == (6, 3)
    saved = tmp_path / "saved.yaml"
    saved.write_text(recipe.to_yaml())  # as a run records it: the warmup still follows each one's steps
    assert load_recipe(saved).stage_recipe(0).train.warmup == 3


def test_tokenizer_train_reads_only_the_sections_it_needs(tmp_path):
    """`fermion tokenizer train` was refused over the train section it never reads: "warmup_steps (100) must not
    exceed steps (50)" for a recipe with train: {steps: 50}, and any mistake there or in sft/dpo stopped it too."""
    def tokenizer_only(raw):
        raw["train"] = {"steps": 50}
        raw.pop("sft"), raw.pop("dpo")

    result = cli("tokenizer", "train", str(write_recipe(tmp_path, tokenizer_only)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "tokenizer.json").is_file()

    def bad_elsewhere(raw):
        raw["train"]["lr"] = -1
        raw["sft"]["sources"][0]["paths"] = ["no/such/chats.jsonl"]

    again = cli("tokenizer", "train", str(write_recipe(tmp_path, bad_elsewhere)), "--force")
    assert again.returncode == 0, again.stderr
    typo = cli("tokenizer", "train", str(write_recipe(tmp_path, misspelt)))  # a misspelt key is still an error
    assert typo.returncode == 2 and "unknown key 'train.lrr'; did you mean 'train.lr'?" in typo.stderr


def test_tokenizer_train_command_writes_a_tokenizer_with_chat_specials(tmp_path):
    from fermion.data.tokenizer import Tokenizer

    result = cli("tokenizer", "train", str(TINY), "--set", f"run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tokenizer.vocab_size == 512
    assert [tokenizer.token_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")] == \
        [0, 1, 2, 3, 4]


RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_recipe_loads_and_counts(path):
    """What `fermion model info` needs from each recipe under configs/: it validates, and the model can be counted."""
    from fermion.model.counting import count

    recipe = load_recipe(path, check_paths=False)
    counts = count(recipe.model, recipe.seq_len)
    assert 0 < counts.active_params <= counts.total_params
    assert counts.train_flops_per_token > 0
    for i in range(len(recipe.stages)):
        assert recipe.stage_recipe(i).train.steps >= 1  # each continued stage resolves to a pretraining recipe


def test_the_depth_dial_derives_the_shape_and_pretraining_and_each_field_can_be_overridden(tmp_path):
    from fermion.config import sizing

    path = tmp_path / "depth.yaml"
    path.write_text("model: {depth: 6, vocab_size: 512, context_length: 256}\n")
    recipe = load_recipe(path, check_paths=False)
    m = recipe.model
    assert (m.n_layers, m.d_model, m.n_heads, m.kv_heads, m.dim_per_head, m.ffn_hidden) == (6, 384, 6, 6, 64, 1024)
    rule = recipe.depth_sizing()
    # DeepSeek LLM's fits: the model's non-embedding FLOPs per token M is compute-optimal at C, D = C / M.
    assert rule.flops_per_token == 72 * 6 * 384**2 + 6 * 6 * 384 * 256
    assert rule.flops_per_token == pytest.approx(0.1715 * rule.compute**0.5243, rel=1e-9)
    assert rule.tokens == round(rule.compute / rule.flops_per_token)
    assert rule.lr == pytest.approx(0.3118 * rule.compute**-0.125)
    t = recipe.train
    assert (t.lr, t.micro_batch_size, t.grad_accum) == (rule.lr, rule.micro_batch_size, rule.grad_accum)
    assert t.micro_batch_size <= sizing.MAX_MICRO_BATCH
    assert abs(t.micro_batch_size * t.grad_accum * 256 - rule.batch_tokens) <= t.grad_accum * 256
    assert t.steps * t.micro_batch_size * t.grad_accum * 256 >= rule.tokens
    assert (t.steps - 1) * t.micro_batch_size * t.grad_accum * 256 < rule.tokens

    # Field by field: what the recipe sets wins; a set micro-batch keeps the derived batch through grad_accum.
    over = load_recipe(path, ["model.d_model=256", "model.n_heads=4", "train.micro_batch_size=4",
                              "train.steps=50"], check_paths=False)
    assert (over.model.n_layers, over.model.d_model, over.model.n_heads) == (6, 256, 4)
    assert over.train.micro_batch_size == 4 and over.train.steps == 50 and over.train.warmup == 5
    assert over.train.grad_accum == round(over.depth_sizing().batch / 4)
    # The resolved recipe, saved and read again, is the same recipe.
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again, check_paths=False) == recipe
    # Without depth nothing is derived.
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {d_model: 128, n_heads: 2}\n")
    assert load_recipe(plain, check_paths=False).train.lr == 3e-4
