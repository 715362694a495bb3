"""LoRA and QLoRA: adapters on the one model, checkpoints of adapters alone that resume exactly and refuse a changed
base, exports that PEFT and transformers load with fermion's logits, and QLoRA's memory below LoRA's."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, tiny_model
from safetensors.torch import load_file

from fermion import checkpoint
from fermion.config import LoRAConfig, ModelConfig, RecipeError, recipe_from_dict
from fermion.model import lora
from fermion.train.qlora import Int4Frozen, quantize_frozen
from fermion.train.trainer import build_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
STEPS = 12


def lora_args(run: Path, stage_dir: Path, *extra: str) -> list[str]:
    """A LoRA SFT of the shared tiny run: every projection adapted at rank 4, a learning rate that moves B well
    away from zero in a few steps, a checkpoint at step 6 and at the end."""
    return ["--set", f"run.dir={run}", "--set", f"sft.dir={stage_dir}", "--set", "sft.epochs=null",
            "--set", f"sft.train.steps={STEPS}", "--set", "sft.train.checkpoint_every=6",
            "--set", "sft.train.eval_every=6", "--set", "sft.train.lr=1e-2",
            "--set", "sft.lora={rank: 4, alpha: 8, dropout: 0.1}", *extra]


def losses(stage_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def lora_run(tiny_run, tmp_path_factory) -> Path:
    stage_dir = tmp_path_factory.mktemp("lora") / "sft"
    result = cli("sft", TINY, *lora_args(tiny_run, stage_dir))
    assert result.returncode == 0, result.stderr
    assert "trainable in LoRA adapters" in result.stdout
    return stage_dir


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ the adapters


def test_adapters_start_at_the_base_and_merge_into_it_exactly():
    base = tiny_model()
    ids = sample_ids(97)
    model = lora.add_adapters(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8), {"digest": ""})
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    torch.testing.assert_close(logits_of(model, ids), logits_of(base, ids), atol=0, rtol=0)  # B starts at zero
    with torch.no_grad():
        for _, _, layer in lora.adapter_layers(model):
            layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    adapted = logits_of(model, ids)
    assert (adapted - logits_of(base, ids)).abs().max() > 1e-2
    torch.testing.assert_close(logits_of(lora.merge(model), ids), adapted, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_the_optimizer_holds_only_the_adapters_and_muon_leaves_them_to_adamw(tmp_path):
    model = lora.add_adapters(tiny_model(), LoRAConfig(rank=2), {"digest": ""})
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    for name in ("adamw", "muon"):
        recipe = recipe_from_dict({"train": {"optimizer": name}}, check_paths=False)
        optimizer = build_optimizer(model, recipe, torch.device("cpu"))
        held = [p for group in optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in held} == trainable and len(held) == len(trainable)
        muon = [p for group in optimizer.param_groups if group.get("muon") for p in group["params"]]
        assert muon == []


def test_qlora_holds_the_base_in_four_bits_and_trains_only_the_adapters():
    model = lora.add_adapters(tiny_model(), LoRAConfig(rank=4), {"digest": ""})
    quantize_frozen(model)
    frozen = [m for m in model.modules() if isinstance(m, Int4Frozen)]
    assert len(frozen) == 2 * 4 and not any(type(m) is torch.nn.Linear for m in model.blocks.modules())
    assert all(b.dtype in (torch.uint8, torch.bfloat16) for m in frozen for b in m.buffers())
    # The 4-bit matmul's gradient with respect to its input is the dequantized weight's.
    layer = frozen[0]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    expected = 2 * (x.detach() @ layer.weight.t()) @ layer.weight
    torch.testing.assert_close(x.grad, expected, atol=1e-4, rtol=1e-4)
    logits, _ = model(sample_ids(97))
    logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(lora.adapter_state(model))


# ----------------------------------------------------------------------------------------- checkpoints, resume


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(lora_run, tiny_run, tmp_path):
    final = checkpoint.find(lora_run)
    weights = load_file(final / "model.safetensors")
    assert weights and all(".lora_" in name for name in weights if name != "tok_emb.token_rows")
    assert len(weights) == 2 * 2 * 4 + 1  # A and B of 4 projections in each of 2 blocks, and the chat tokens' rows
    record = json.loads((final / "adapter.json").read_text())
    assert record["lora"]["rank"] == 4 and record["base"]["checkpoint"] == str(checkpoint.find(tiny_run).resolve())
    # trainable_tokens "auto": the chatml markers' rows of the (tied) embedding trained, and only they.
    tokens = record["trainable_tokens"]
    assert list(tokens) == ["<|im_start|>", "<|im_end|>"]
    base_rows = checkpoint.load(tiny_run).model.tok_emb.weight[list(tokens.values())]
    assert (weights["tok_emb.token_rows"] - base_rows).abs().amin(dim=1).min() > 0
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights)

    # Stopped after step 6 (its checkpoint the newest), then resumed: the same losses as the straight run.
    halted = tmp_path / "halted"
    shutil.copytree(lora_run, halted)
    shutil.rmtree(checkpoint.find(halted))
    assert checkpoint.find(halted).name.endswith("06")
    resumed = cli("sft", TINY, *lora_args(tiny_run, halted))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    assert losses(halted) == losses(lora_run) and len(losses(lora_run)) == STEPS

    # Resuming with other trainable tokens would load rows into the wrong tokens: refused in one line.
    shutil.rmtree(checkpoint.find(halted))
    changed = cli("sft", TINY, *lora_args(tiny_run, halted), "--set",
                  "sft.lora={rank: 4, alpha: 8, dropout: 0.1, trainable_tokens: ['<|im_end|>']}")
    assert changed.returncode == 2 and "the recipe's lora.trainable_tokens changed" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_a_run_with_adapters_loads_merged_for_every_command(lora_run, tiny_run):
    loaded = checkpoint.load(lora_run)
    apart = checkpoint.load(lora_run, merge_adapters=False).model
    base = checkpoint.load(tiny_run).model
    ids = sample_ids(loaded.recipe.model.vocab_size)
    assert loaded.stage == "sft" and not any(isinstance(m, lora.LoRALinear) for m in loaded.model.modules())
    torch.testing.assert_close(logits_of(loaded.model, ids), logits_of(apart, ids), atol=1e-4, rtol=1e-4)
    assert (logits_of(apart, ids) - logits_of(base, ids)).abs().max() > 1e-2  # the adapters learned something
    generated = cli("generate", str(lora_run), "--prompt", "Once", "--max-new-tokens", "4", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr


def test_adapters_refuse_a_base_that_changed_or_is_gone(tiny_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_run, base)
    stage_dir = tmp_path / "sft"
    trained = cli("sft", TINY, *lora_args(tiny_run, stage_dir, "--set", f"sft.train.init_from={base}",
                                          "--set", "sft.train.steps=2"))
    assert trained.returncode == 0, trained.stderr
    # The base run goes on: its step-20 checkpoint is replaced by a newer one with other weights.
    old = checkpoint.find(base)
    loaded = checkpoint.load(old)
    with torch.no_grad():
        loaded.model.tok_emb.weight.add_(0.01)
    checkpoint.save_weights(loaded.model, loaded.recipe, loaded.tokenizer, base / "checkpoints" / "step_00000040")
    shutil.rmtree(old)
    changed = cli("generate", str(stage_dir), "--prompt", "Once", "--max-new-tokens", "2")
    assert changed.returncode == 2 and "trained on other weights than" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    shutil.rmtree(base)
    gone = cli("export", str(stage_dir), "--out", str(tmp_path / "never"))
    assert gone.returncode == 2 and f"{old.resolve()}, which is gone" in gone.stderr
    assert not (tmp_path / "never").exists()


def test_dpo_trains_qlora_adapters_on_a_four_bit_base(tiny_run, tmp_path):
    stage_dir = tmp_path / "dpo"
    result = cli("dpo", TINY, "--set", f"run.dir={tiny_run}", "--set", f"dpo.dir={stage_dir}",
                 "--set", f"dpo.train.init_from={tiny_run}", "--set", "dpo.epochs=null", "--set", "dpo.train.steps=3",
                 "--set", "dpo.train.checkpoint_every=3", "--set", "dpo.lora={rank: 2, targets: [wqkv, w_down], "
                 "quantize: int4, trainable_tokens: data}")
    assert result.returncode == 0, result.stderr
    final = checkpoint.find(stage_dir)
    assert set(load_file(final / "model.safetensors")) == {f"blocks.{i}.{path}.lora_{side}" for i in range(2)
                                                           for path in ("attn.wqkv", "ffn.w_down") for side in "AB"
                                                           } | {"tok_emb.token_rows"}
    record = json.loads((final / "adapter.json").read_text())
    assert record["lora"]["quantize"] == "int4" and len(record["trainable_tokens"]) > 2  # the pairs' tokens too
    loaded = checkpoint.load(stage_dir)  # merged into the float base
    assert loaded.stage == "dpo" and not any(isinstance(m, lora.LoRALinear) for m in loaded.model.modules())


@pytest.mark.parametrize("setting, message", [
    ("{targets: [q_proj, wo]}", "sft.lora.targets: 'q_proj' is not a projection of this model; valid: wqkv, wo, "
                                "w_gate_up, w_down (q_proj is Hugging Face's name; here it is part of wqkv)"),
    ("{rank: 0}", "sft.lora.rank: Input should be greater than or equal to 1 (got 0)"),
    ("{trainable_tokens: ['<|im_start|>', '<|im_ned|>']}", "sft.lora.trainable_tokens: '<|im_ned|>' is not a token "
                                                           "of the tokenizer's vocabulary; did you mean '<|im_end|>'?"),
])
def test_bad_lora_settings_are_one_line_and_exit_2(tiny_run, tmp_path, setting, message):
    result = cli("sft", TINY, "--set", f"run.dir={tiny_run}", "--set", f"sft.dir={tmp_path / 'sft'}",
                 "--set", f"sft.lora={setting}")
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "sft").exists()


def test_trainable_tokens_data_trains_the_rows_of_every_token_the_conversations_hold(tiny_run, tmp_path):
    stage_dir = tmp_path / "sft"
    result = cli("sft", TINY, *lora_args(tiny_run, stage_dir, "--set", "sft.train.steps=2", "--set",
                                         "sft.lora={rank: 2, trainable_tokens: data}"))
    assert result.returncode == 0, result.stderr
    final = checkpoint.find(stage_dir)
    tokens = json.loads((final / "adapter.json").read_text())["trainable_tokens"]
    assert list(tokens)[:2] == ["<|im_start|>", "<|im_end|>"] and len(tokens) > 100  # alpaca's words, in pieces
    assert load_file(final / "model.safetensors")["tok_emb.token_rows"].shape == (len(tokens), 64)


def test_moe_models_take_adapters_on_attention_only():
    moe = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, ffn_hidden=32, moe={"n_experts": 4})
    assert lora.check_targets(moe, LoRAConfig(), "sft.lora") == ("wqkv", "wo")
    with pytest.raises(RecipeError, match="'w_down' is not a projection of this model; valid: wqkv, wo \\(the "
                                          "experts of an MoE model are stacked tensors"):
        lora.check_targets(moe, LoRAConfig(targets=["w_down"]), "sft.lora")


# ---------------------------------------------------------------------------------------------------- exports


def test_peft_loads_the_adapter_folder_and_the_merged_export_matches(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapter = cli("export", str(lora_run), "--adapter", "--dtype", "fp32", "--out", str(tmp_path / "adapter"))
    assert adapter.returncode == 0, adapter.stderr
    merged = cli("export", str(lora_run), "--format", "hf", "--dtype", "fp32", "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    ours = checkpoint.load(lora_run, merge_adapters=False).model
    # The trained chat-token rows (tied embeddings: one list) are in the folder, and differ from the base's.
    assert config["trainable_token_indices"] == list(ours.adapters["trainable_tokens"].values())
    rows = load_file(tmp_path / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (rows - ours.tok_emb.base.weight[config["trainable_token_indices"]]).abs().max() > 1e-2
    ids = sample_ids(ours.cfg.vocab_size)
    expected = logits_of(ours, ids)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, expected, atol=1e-4, rtol=0)
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(hf_merged(ids).logits, expected, atol=1e-4, rtol=0)
    refused = cli("export", str(lora_run), "--adapter", "--format", "gguf")
    assert refused.returncode == 2 and "other formats take the adapters merged" in refused.stderr


def test_adapter_export_of_a_run_without_adapters_is_refused(tiny_run, tmp_path):
    result = cli("export", str(tiny_run), "--adapter", "--out", str(tmp_path / "adapter"))
    assert result.returncode == 2 and "has no LoRA adapters" in result.stderr
    assert not (tmp_path / "adapter").exists()


# ----------------------------------------------------------------------------------------------------- memory


def test_qlora_trains_in_less_memory_than_lora(tmp_path):
    """bench/lora.py's measurement (the allocation profiler over a whole training step) on a small model."""
    spec = importlib.util.spec_from_file_location("lora_bench", REPO / "bench" / "lora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = {"vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden": 512, "context_length": 32}
    plain, quantized = (bench.training_peak(small, quantize, 1, 32, tmp_path) for quantize in ("none", "int4"))
    # The block matrices are ~1M weights: 4 MiB in fp32, about 0.6 MiB packed with their scales; dequantizing one
    # matrix for its matmul takes a few float copies of it for a moment, so the peak drops by less (about 25%).
    assert quantized < 0.85 * plain, (quantized, plain)
