"""What `fermion run` checks before it trains anything: that every export the recipe asks for can be made (in the
dtype it names), and, on a GPU, that every training stage fits the device as `fermion model info` predicts; and
that every published recipe fits the hardware its header names."""

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, TINY_STORIES, cli
from rich.console import Console

from fermion.config import RecipeError, load_recipe, recipe_from_dict
from fermion.device import DistInfo
from fermion.export import check
from fermion.model.counting import check_fits, fit_problem
from fermion.run import check_before_training, final_model, training_sections
from fermion.train.pretrain import Pretraining

PUBLISHED = sorted((REPO / "configs" / "published").glob("*.yaml"))
QUIET = Console(file=io.StringIO())


def tiny_recipe(run_dir: Path, **sections) -> dict:
    raw = {
        "run": {"name": "plan", "dir": str(run_dir), "seed": 3},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 160,
                  "context_length": 64},
        "tokenizer": {"vocab_size": 512, "train_bytes": 100_000},
        "data": {"sources": [{"name": "stories", "kind": "books", "paths": [str(TINY_STORIES)],
                              "separator": "<|endoftext|>", "max_documents": 300}],
                 "val_fraction": 0.05, "num_workers": 1},
        "train": {"steps": 4, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32",
                  "compile": False, "progress": False, "tensorboard": False, "eval_every": 4, "eval_batches": 1,
                  "checkpoint_every": 4},
        "eval": {"tasks": ["arithmetic"], "limit": 2},
    }
    raw.update(sections)
    return raw


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------------------ exports


def test_an_export_the_model_cannot_have_is_refused_before_any_training(tmp_path):
    """A sliding window llama.cpp cannot represent: `fermion run` stops at the plan, naming the format, the reason
    and what to change, and writes nothing (no tokenizer, no shards, no checkpoint)."""
    run_dir = tmp_path / "run"
    raw = tiny_recipe(run_dir, export={"formats": ["hf", "gguf"]})
    raw["model"]["sliding_window"] = 16
    result = cli("run", str(write(tmp_path, raw)))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "export.formats: gguf cannot be made" in message and "model.sliding_window (16)" in message
    assert "drop gguf from export.formats" in message
    assert not run_dir.exists()


def test_each_format_is_checked_in_the_dtype_the_recipe_names(tmp_path):
    raw = tiny_recipe(tmp_path / "run", export={"formats": ["hf", "onnx"], "onnx": {"dtype": "bf16"}})
    with pytest.raises(RecipeError, match=r"^export\.onnx\.dtype: unsupported ONNX dtype 'bf16'; valid: fp32, fp16$"):
        check_before_training(recipe_from_dict(raw))
    raw["export"] = {"formats": ["gguf"], "gguf": {"dtype": "q4_0"}}
    with pytest.raises(RecipeError, match=r"^export\.gguf\.dtype: GGUF dtype 'q4_0' .* "
                                         r"f32, f16, q8_0, q4_k_m, q5_k_m, q6_k$"):
        check_before_training(recipe_from_dict(raw))
    raw["export"] = {"formats": ["hf", "gguf", "onnx"], "hf": {"dtype": "fp16"}, "gguf": {"dtype": "q8_0"},
                     "onnx": {"dtype": "fp16"}}
    recipe = recipe_from_dict(raw)
    check_before_training(recipe, QUIET)
    assert recipe.export.dtypes() == {"hf": "fp16", "gguf": "q8_0", "onnx": "fp16"}


@pytest.mark.parametrize("export, message", [
    ({"formats": ["hf", "ggml"]}, r"export\.formats\[1\]: .*'hf', 'gguf' or 'onnx' \(got 'ggml'\)"),
    ({"formats": ["hf"], "ggml": {"dtype": "f16"}}, r"unknown key 'export\.ggml'; did you mean 'export\.gguf'\?"),
    ({"formats": ["hf"], "hf": {"precision": "fp16"}}, r"unknown key 'export\.hf\.precision'"),
])
def test_an_unknown_format_is_named(tmp_path, export, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny_recipe(tmp_path / "run", export=export), check_paths=False)


def mistral_folder(folder: Path, sliding_window: int | None) -> Path:
    """A Hub-style Mistral folder made with transformers, with a SentencePiece-style tokenizer.json (Metaspace
    pre-tokenizer, byte fallback), as `train.init_from` would name it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    config = MistralConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=sliding_window, tie_word_embeddings=False)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_the_plan_checks_the_model_and_tokenizer_of_an_hf_starting_point(tmp_path):
    """With train.init_from a Mistral folder, the exported model is the source's: its window and its tokenizer
    decide what can be exported, not the recipe's own model and tokenizer sections."""
    raw = tiny_recipe(tmp_path / "run", export={"formats": ["hf", "gguf"]})
    del raw["model"]
    raw["train"]["init_from"] = str(mistral_folder(tmp_path / "windowed", sliding_window=32))
    cfg, tokenizer, _ = final_model(recipe_from_dict(raw))
    assert (cfg.sliding_window, cfg.context_length, tokenizer["pre_tokenizer"]["type"]) == (32, 64, "Metaspace")
    with pytest.raises(RecipeError, match=r"gguf cannot be made from the model and tokenizer of train\.init_from "
                                          r".*model\.sliding_window \(32\) < model\.context_length \(64\)"):
        check_before_training(recipe_from_dict(raw))
    raw["train"]["init_from"] = str(mistral_folder(tmp_path / "full", sliding_window=None))
    with pytest.raises(RecipeError, match=r"gguf cannot be made .* byte-level BPE .* Metaspace pre-tokenizer"):
        check_before_training(recipe_from_dict(raw))
    raw["export"] = {"formats": ["hf", "onnx"]}
    check_before_training(recipe_from_dict(raw))  # what its architecture allows


# ----------------------------------------------------------------------------------------------------- memory


def published(name: str, *overrides: str):
    return load_recipe(REPO / "configs" / "published" / f"{name}.yaml", list(overrides), check_paths=False)


def nucleus(*overrides: str):
    """nucleus-1b without its train.init_from (a Hub folder the user downloads, not here)."""
    return published("nucleus-1b", "train.init_from=null", *overrides)


def test_a_plan_that_does_not_fit_a_named_gpu_is_refused_with_the_setting_to_change():
    recipe = nucleus("train.activation_checkpointing=none", "train.micro_batch_size=8")
    with pytest.raises(RecipeError) as refused:
        check_fits(recipe, "h100", 1)
    message = str(refused.value)
    assert message == ("train: a training step needs 97.5 GiB per device and the h100 has 79.2 GiB (fermion model "
                       "info's prediction, allocator slack included); set train.activation_checkpointing: selective, "
                       "which needs 31.9 GiB")
    assert fit_problem(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"activation_checkpointing": "selective"})}), "h100", 1) is None
    on_a_3090 = fit_problem(recipe, "rtx3090", 1)
    assert "rtx3090 has 23.6 GiB" in on_a_3090 and "train.micro_batch_size: 4 (raise grad_accum" in on_a_3090
    assert "no checkpointing or micro-batch setting fits" in fit_problem(recipe, "t4", 1)


def test_the_run_checks_every_stage_it_trains_on_the_gpu():
    """Continued stages and SFT have train sections of their own; on the CPU nothing is refused for memory."""
    assert [name for name, _ in training_sections(nucleus())] == ["train", "stages[0].train"]
    recipe = published("neutrino-7b", "sft.train.activation_checkpointing=none", "sft.train.micro_batch_size=8")
    assert [name for name, _ in training_sections(recipe)] == ["train", "sft.train"]
    with pytest.raises(RecipeError, match=r"^sft\.train: a training step needs 275\.6 GiB .* set "
                                          r"sft\.train\.activation_checkpointing: selective, which needs 62\.1 GiB"):
        check_before_training(recipe, device="h100", world_size=16)
    check_before_training(recipe, device="cpu")


def test_pretraining_on_cuda_refuses_a_step_that_will_not_fit_before_writing_anything(tmp_path, monkeypatch):
    """`fermion pretrain` on a GPU: the stage's plan (before any file or weight) asks the same prediction, with the
    device's own name and memory. The GPU is simulated: CI has none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=0: SimpleNamespace(total_memory=round(79.2 * 2**30)))
    recipe = nucleus("train.activation_checkpointing=none", "train.micro_batch_size=8", f"run.dir={tmp_path / 'run'}")
    setup = Pretraining(recipe)
    with pytest.raises(RecipeError, match=r"needs 97\.5 GiB per device and the NVIDIA H100 80GB HBM3 has 79\.2 GiB"):
        setup.plan(DistInfo(0, 1, 0, torch.device("cuda")), QUIET)
    assert not (tmp_path / "run").exists()
    Pretraining(nucleus(f"run.dir={tmp_path / 'run'}")).plan(DistInfo(0, 1, 0, torch.device("cuda")), QUIET)


def named_hardware(path: Path) -> tuple[str, int]:
    """The `fermion model info ... --device D --world-size N` line in a published recipe's header."""
    found = re.search(rf"fermion model info configs/published/{re.escape(path.name)} --device (\S+) --world-size "
                      r"(\d+)", path.read_text())
    assert found, f"{path.name}: its header names no hardware as a `fermion model info` command"
    return found.group(1), int(found.group(2))


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_every_published_recipe_fits_the_hardware_it_names(path):
    device, world_size = named_hardware(path)
    info = cli("model", "info", str(path), "--device", device, "--world-size", str(world_size), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["train_setup"]["fits"] is True
    recipe = load_recipe(path, check_paths=False)
    for section, train in training_sections(recipe):
        assert fit_problem(recipe, device, world_size, train, section) is None, section
    for fmt, dtype in recipe.export.dtypes().items():
        check(fmt, recipe.model, dtype)  # and what it exports can be made


# --------------------------------------------------------------------------------------------- what a run ships


@pytest.mark.skipif(not TINY_STORIES.is_file(), reason=f"{TINY_STORIES} is missing")
def test_a_run_ships_each_format_in_its_dtype_and_its_card_says_so(tmp_path):
    import onnx
    from safetensors import safe_open

    run_dir = tmp_path / "run"
    raw = tiny_recipe(run_dir, export={"formats": ["hf", "onnx"], "hf": {"dtype": "fp16"}, "onnx": {"dtype": "fp16"}})
    raw["run"]["license"] = "mit"
    result = cli("run", str(write(tmp_path, raw)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exports checked before training: hf (fp16), onnx (fp16)" in result.stdout
    hf = run_dir / "export" / "hf"
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float16"
    with safe_open(hf / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}  # noqa: SIM118
    graph = onnx.load(run_dir / "export" / "onnx" / "model.onnx").graph
    matrices = [t for t in graph.initializer if len(t.dims) == 2]
    assert matrices and {t.data_type for t in matrices} == {onnx.TensorProto.FLOAT16}

    text = (hf / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "mit" and "mit (the recipe's run.license)." in text
    assert meta["datasets"] == [str(TINY_STORIES)] and "llama" in meta["tags"]
    assert f"| hf | fp16 | `{hf}` |" in text and f"| onnx | fp16 | `{run_dir / 'export' / 'onnx'}` |" in text
    assert "No GGUF export for this model" not in text  # not asked for, but the model could have one
