"""The ship commands end to end on a trained run: export to every format, import a Hugging Face folder, continue
pretraining from it, and generate (also quantized) from a run, a checkpoint and a Hugging Face folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


run = cli


@pytest.fixture(scope="module")
def trained(tiny_run) -> Path:
    return tiny_run


def test_export_every_format_from_a_run(trained, tmp_path):
    trained = shutil.copytree(trained, tmp_path / "run")  # the export goes into the run: not into the shared one
    result = run("export", str(trained), "--format", "hf,gguf,onnx")
    assert result.returncode == 0, result.stderr
    export = trained / "export"
    config = json.loads((export / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"
    assert (export / "gguf" / "tiny-f16.Modelfile").is_file() and list((export / "gguf").glob("*.gguf"))
    assert (export / "onnx" / "model.onnx").is_file()
    bad = run("export", str(trained), "--format", "safetensors")
    assert bad.returncode == 2 and "not one of hf, gguf, onnx" in bad.stderr


def test_import_then_continue_pretraining_from_the_hf_folder(trained, tmp_path):
    exported = run("export", str(trained), "--format", "hf", "--dtype", "fp32", "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    imported = run("import", str(tmp_path / "hf"), str(tmp_path / "imported"))
    assert imported.returncode == 0, imported.stderr
    source = load_file(trained / "checkpoints" / "step_00000020" / "model.safetensors")
    assert all(torch.equal(source[k], v) for k, v in load_file(tmp_path / "imported" / "model.safetensors").items())

    # Continued pretraining from the folder: a negligible learning rate leaves the imported weights in place,
    # which a random init could not match.
    result = run("pretrain", TINY, "--set", f"run.dir={tmp_path / 'continued'}", "--set", "train.steps=2",
                 "--set", f"train.init_from={tmp_path / 'hf'}", "--set", "train.lr=1e-12",
                 "--set", "train.warmup_steps=0", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2")
    assert result.returncode == 0, result.stderr
    after = load_file(tmp_path / "continued" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert all(torch.allclose(source[k], after[k], atol=1e-6) for k in source)

    mismatch = run("pretrain", TINY, "--set", f"run.dir={tmp_path / 'bad'}", "--set", "model.d_model=128",
                   "--set", f"train.init_from={tmp_path / 'hf'}")
    assert mismatch.returncode == 2 and "model.d_model (128 here, 64 in" in mismatch.stderr


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_generate_streams_from_run_checkpoint_and_hf_folder(trained, tmp_path, quant):
    assert run("export", str(trained), "--format", "hf", "--out", str(tmp_path / "hf")).returncode == 0
    ckpt = trained / "checkpoints" / "step_00000020"
    outputs = []
    for source in (trained, ckpt):
        result = run("generate", str(source), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                     "--temperature", "0", "--quant", quant)
        assert result.returncode == 0, result.stderr
        assert "Once upon a time" in result.stdout and "tokens/s" in result.stdout
        outputs.append(result.stdout.split("tokens in")[0])
    assert outputs[0] == outputs[1]
    hf = run("generate", str(tmp_path / "hf"), "--prompt", "Once upon a time", "--max-new-tokens", "5",
             "--quant", quant)
    assert hf.returncode == 0, hf.stderr
    bad = run("generate", str(trained), "--quant", "int3")
    assert bad.returncode == 2 and "int8" in bad.stderr


def test_int8_stays_close_to_float_on_a_trained_model(trained):
    """Measured on this run: teacher-forced top-1 agreement and free-running greedy agreement of int8 vs fp32."""
    from fermion.checkpoint import load
    from fermion.infer.engine import Engine, SamplingParams
    from fermion.infer.quantize import quantize

    loaded = load(trained)
    model, tokenizer, quantized = loaded.model, loaded.tokenizer, load(trained).model
    quantize(quantized, "int8")
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends."
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        top1 = (model(ids)[0].argmax(-1) == quantized(ids)[0].argmax(-1)).float().mean().item()
    assert top1 >= 0.95
    prompts = [tokenizer.encode(p) for p in ("Once upon a time", "The little dog", "Tom and Sue went")]
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    ours = Engine(model, tokenizer).generate(prompts, greedy)
    theirs = Engine(quantized, tokenizer).generate(prompts, greedy)
    same = sum(a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x.token_ids, y.token_ids, strict=True))
    assert same / 96 >= 0.75, f"int8 greedy agreement {same / 96:.0%}"


def test_chat_prompt_goes_through_the_template(trained):
    result = run("generate", str(trained), "--chat", "--prompt", "Tell me a story.", "--max-new-tokens", "8",
                 "--temperature", "0", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
