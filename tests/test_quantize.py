"""Weight-only int8 / int4 quantization: each quantized layer against a dequantise-then-matmul reference (which pins
the kernels' argument layouts and zero-point convention), whole models against their float logits, MoE dispatch,
stored bytes, and the modes refused."""

import copy

import pytest
import torch
from conftest import cli
from torch import nn

from fermion.config import ModelConfig, MoEConfig
from fermion.infer import quantize as quantize_module
from fermion.infer.quantize import (
    KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    _quantized_linear,
    int4_group_size,
    quantize,
    quantize_experts,
    quantize_int4,
    quantize_int8,
    quantized_bytes,
    report_lines,
)
from fermion.model.moe import MoEFeedForward
from fermion.model.transformer import Transformer

TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=48,
            rope_theta=5000.0)
GROUP = 32  # the tiny layers' in-features (64, 96) are multiples of 32, not of the default 128


def build(**overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def tokens(batch=2, length=48) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def uneven_weight(n: int, k: int, group: int = GROUP) -> torch.Tensor:
    """Rows and input groups of very different magnitudes, so a scale applied to the wrong row or group shows."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.02
    row_scale = torch.linspace(0.25, 4.0, n)[:, None]
    group_scale = torch.arange(1, k // group + 1, dtype=torch.float32).repeat_interleave(group)[None, :]
    return w * row_scale * group_scale


def assert_matches_to_bf16_rounding(got: torch.Tensor, expected: torch.Tensor):
    # The CPU kernels take bf16 activations and return bf16: one bf16 ulp (2^-8 relative) plus summation order.
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-3 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------- single layers


def test_int8_rounding_is_within_half_a_step():
    w = uneven_weight(48, 64)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-9).all()


@pytest.mark.parametrize("rows", [1, 5, KERNEL_MAX_ROWS + 8])  # the kernel for few rows, widened weights for many
def test_int8_linear_matches_dequantised_reference(rows):
    w = uneven_weight(48, 64)
    layer = Int8Linear(w)
    x = torch.randn(64, 2, rows, generator=torch.Generator().manual_seed(3)).permute(1, 2, 0)  # [2, rows, 64], strided
    dequantised = layer.qweight.float() * layer.scales.float()[:, None]
    got = layer(x)
    assert got.shape == (2, rows, 48) and got.dtype == torch.float32
    assert_matches_to_bf16_rounding(got, x.bfloat16().float() @ dequantised.t())


def test_int4_rounding_is_within_half_a_step_with_float_zero_point():
    w = uneven_weight(64, 128)
    q, scales, zeros = quantize_int4(w, GROUP)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15
    expand = lambda t: t.repeat_interleave(GROUP, dim=1)
    dequantised = (q.float() - 8) * expand(scales) + expand(zeros)
    assert ((dequantised - w).abs() <= expand(scales) / 2 + 1e-7).all()


def test_int4_linear_matches_dequantised_reference():
    w = uneven_weight(64, 128)
    layer = Int4Linear(w, GROUP)
    q, scales, zeros = quantize_int4(w, GROUP)
    # scales_and_zeros is [K / group, N, 2]: group-major, then output channel, then (scale, zero).
    assert torch.equal(layer.scales_and_zeros, torch.stack([scales.t(), zeros.t()], dim=-1).bfloat16())
    scales_bf16, zeros_bf16 = (t.bfloat16().float().repeat_interleave(GROUP, dim=1) for t in (scales, zeros))
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
    x_bf16 = x.bfloat16().float()
    got = layer(x)
    assert got.shape == (3, 5, 64) and got.dtype == torch.float32
    assert_matches_to_bf16_rounding(got, x_bf16 @ ((q.float() - 8) * scales_bf16 + zeros_bf16).t())
    # The convention is not a detail: an integer-style zero point (q * scale + zero) would be far off.
    wrong = x_bf16 @ (q.float() * scales_bf16 + zeros_bf16).t()
    assert relative_error(got, wrong) > 0.5


def test_int4_layer_refuses_input_on_another_device():
    with pytest.raises(RuntimeError, match="packed for cpu"):
        Int4Linear(uneven_weight(64, 128), GROUP)(torch.randn(1, 128, device="meta"))


def test_int4_kernel_that_disagrees_with_the_reference_falls_back_to_int8(monkeypatch):
    # The guard that protects the (untested here) CUDA packing: a kernel given a wrong layout is caught at
    # conversion time and the layer is stored as int8 instead.
    pack = Int4Linear._pack
    monkeypatch.setattr(Int4Linear, "_pack", lambda self, q: pack(self, 15 - q))
    model = quantize(build(), "int4", group_size=GROUP)
    assert set(model.quant_report["layers"].values()) == {"int8"}
    assert "disagrees" in model.quant_report["fallbacks"]["blocks.0.attn.wqkv"]


# ------------------------------------------------------------------------------------------------- whole models


# Measured on this config: int8 0.62% (tied) / 0.73% (untied) relative logit error, int4 (group 32) 2.8% / 3.8%.
@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.08)])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_logits_stay_close_to_float(mode, bound, tied):
    float_model = build(tie_embeddings=tied)
    embedding = float_model.tok_emb.weight
    embedding_before = embedding.detach().clone()
    with torch.no_grad():
        expected, _ = float_model(tokens())
        model = quantize(float_model, mode, group_size=GROUP)
        got, _ = model(tokens())
    assert model is float_model
    assert relative_error(got, expected) < bound
    # The embedding lookup keeps the same float table, untouched; the projection got its own quantized copy.
    assert model.tok_emb.weight is embedding and torch.equal(embedding, embedding_before)
    assert isinstance(model.lm_head, Int8Linear)  # 97 output rows: off the int4 tile, so int8 in both modes
    report = model.quant_report
    if mode == "int4":
        assert report["fallbacks"] == {"lm_head": "out-features 97 not a multiple of 16"}
        block_layers = ("attn.wqkv", "attn.wo", "ffn.w_gate_up", "ffn.w_down")
        int4_layers = {name for name, kind in report["layers"].items() if kind == "int4"}
        assert int4_layers == {f"blocks.{i}.{layer}" for i in range(2) for layer in block_layers}
    else:
        assert report["fallbacks"] == {} and set(report["layers"].values()) == {"int8"}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_model_keeps_its_dtype(mode):
    model = build().to(torch.bfloat16)
    with torch.no_grad():
        expected, _ = model(tokens())
        got, _ = quantize(model, mode, group_size=GROUP)(tokens())
    assert got.dtype == torch.bfloat16 and model.tok_emb.weight.dtype == torch.bfloat16
    assert relative_error(got, expected.float()) < (0.03 if mode == "int8" else 0.08)  # measured: 0.71%, 2.7%


def test_quantizing_a_copy_leaves_the_tied_float_model_tied():
    float_model = build()
    quantized = quantize(copy.deepcopy(float_model), "int8")
    assert float_model.lm_head is None and float_model.output_weight() is float_model.tok_emb.weight
    with torch.no_grad():  # and the float path still projects through the embedding table
        hidden = torch.randn(1, 3, TINY["d_model"])
        assert torch.equal(float_model.logits(hidden), hidden @ float_model.tok_emb.weight.t())
    assert quantized.tok_emb.weight.dtype == torch.float32


def test_int4_group_size_adapts_to_the_in_features_instead_of_falling_back():
    float_model = build()
    with torch.no_grad():
        expected, _ = float_model(tokens())
        model = quantize(float_model, "int4")  # the default group 128 divides neither 64 nor 96 in-features
        got, _ = model(tokens())
    report = model.quant_report
    assert {name for name, kind in report["layers"].items() if kind == "int8"} == {"lm_head"}  # 97 rows: off the tile
    assert report["group_sizes"]["blocks.0.attn.wqkv"] == 64 and report["group_sizes"]["blocks.1.ffn.w_down"] == 32
    assert model.get_submodule("blocks.1.ffn.w_down").group_size == 32
    assert report["adapted"]["blocks.0.attn.wqkv"] == "group size 64: in-features 64 not a multiple of 128"
    assert report["adapted"]["blocks.1.ffn.w_down"] == "group size 32: in-features 96 not a multiple of 128"
    assert relative_error(got, expected) < 0.08  # as good as asking for group 32 outright


def test_int4_group_size_never_grows_past_the_asked_one():
    assert int4_group_size(512, 64) == 64 and int4_group_size(512, 256) == 256 and int4_group_size(704, 128) == 64
    assert int4_group_size(96, 32) == 32 and int4_group_size(80, 128) is None


# One test per reason a layer asked to be int4 ends up int8; each reason reaches the command's output.


def test_int4_falls_back_when_no_group_size_divides_the_in_features():
    model = quantize(build(ffn_hidden=80), "int4")  # w_down takes 80 in-features: a multiple of 16, not of 32
    assert model.quant_report["fallbacks"]["blocks.0.ffn.w_down"] == (
        "in-features 80 not a multiple of 32, the smallest int4 group size")
    assert isinstance(model.get_submodule("blocks.0.ffn.w_down"), Int8Linear)


def test_int4_falls_back_when_the_out_features_are_off_the_tile():
    model = quantize(build(), "int4", group_size=GROUP)
    assert model.quant_report["fallbacks"] == {"lm_head": "out-features 97 not a multiple of 16"}


def test_int4_falls_back_on_a_device_without_the_kernel():
    layer, why = _quantized_linear(torch.zeros(32, 64, device="meta"), "int4", 64)
    assert isinstance(layer, Int8Linear) and why == "no int4 kernel on meta"


def test_int4_falls_back_when_the_kernel_fails(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image for this CPU\nmore detail")

    monkeypatch.setattr(quantize_module, "_INT4_MM_CPU", broken)
    model = quantize(build(), "int4", group_size=GROUP)
    assert model.quant_report["fallbacks"]["blocks.0.attn.wo"] == "int4 kernel failed: no kernel image for this CPU"


def test_report_lines_name_every_layer_not_quantized_as_asked_with_the_reason():
    heard = []
    quantize(build(n_layers=3, ffn_hidden=80), "int4", say=heard.append)
    head, *notes = heard
    assert head.startswith("quantized (int4, group size 128): 9 int4, 4 int8 layers · CPU ")
    assert notes == [
        "  int4 with a smaller group size: blocks.0-2.attn.wqkv, blocks.0-2.attn.wo, blocks.0-2.ffn.w_gate_up: "
        "group size 64: in-features 64 not a multiple of 128",
        "  int8 instead of int4: blocks.0-2.ffn.w_down: in-features 80 not a multiple of 32, the smallest int4 group "
        "size",
        "  int8 instead of int4: lm_head: out-features 97 not a multiple of 16"]
    assert report_lines({"mode": "int8", "group_size": 128, "layers": {"lm_head": "int8"}, "adapted": {},
                         "fallbacks": {}}) == ["quantized (int8): 1 int8 layers"]


def test_quantized_layers_compute_in_the_cpus_fast_dtype(monkeypatch):
    # Kernels take bf16 on every CPU; a prefill's widened int8 matmul runs in bf16 only where bf16 is native.
    for native, widened in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(quantize_module, "resolve_precision", lambda *_, n=native: "bf16" if n else "fp32")
        layer = Int8Linear(uneven_weight(48, 64))
        assert layer.scales.dtype == torch.bfloat16 and layer.widened_dtype == widened
        x = torch.randn(KERNEL_MAX_ROWS + 8, 64, generator=torch.Generator().manual_seed(3))
        expected = x.to(widened).float() @ (layer.qweight.float() * layer.scales.float()[:, None]).t()
        assert_matches_to_bf16_rounding(layer(x), expected)


# ------------------------------------------------------------------------------------------------- MoE

MOE = MoEConfig(n_experts=4, top_k=2)


def test_int8_moe_runs_each_token_through_its_experts():
    float_moe = build(moe=MOE).blocks[0].ffn
    quantized = quantize_experts(copy.deepcopy(float_moe), lambda w, name: Int8Linear(w), "ffn")
    # The float module with its experts replaced by the dequantised int8 weights ([in, out] stacks) is the reference.
    reference = float_moe
    with torch.no_grad():
        for e in range(MOE.n_experts):
            for name in ("w_gate_up", "w_down"):
                stack, layer = getattr(reference, name), getattr(quantized, name)[e]
                stack[e] = (layer.qweight.float() * layer.scales.float()[:, None]).t()
        x = torch.randn(2, 7, TINY["d_model"], generator=torch.Generator().manual_seed(4))
        got, got_aux = quantized(x)
        expected, expected_aux = reference(x)
    assert got.shape == x.shape
    assert relative_error(got, expected) < 1e-2  # bf16 activations only; a token sent to a wrong expert is O(1)
    assert torch.equal(got_aux, expected_aux)  # same float router, same routing and auxiliary loss


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.08)])  # measured: 0.62%, 3.0%
def test_quantized_moe_model_stays_close_to_float(mode, bound):
    model = build(moe=MOE)
    with torch.no_grad():
        expected, expected_aux = model(tokens())
        quantize(model, mode, group_size=GROUP)
        got, got_aux = model(tokens())
    assert relative_error(got, expected) < bound
    assert torch.allclose(got_aux, expected_aux, rtol=1e-3)
    assert not any(isinstance(p, nn.Parameter) for m in model.modules() if isinstance(m, MoEFeedForward)
                   for p in (m.w_gate_up, m.w_down))  # every expert matmul quantized
    layers = model.quant_report["layers"]
    assert layers["blocks.0.ffn.router"] == "float"
    assert layers["blocks.1.ffn.w_gate_up.3"] == layers["blocks.1.ffn.w_down.0"] == mode  # [192, 64], [64, 96]: int4
    assert isinstance(model.get_submodule("blocks.1.ffn.w_gate_up.3"), Int4Linear if mode == "int4" else Int8Linear)


# ------------------------------------------------------------------------------------------------- bytes and modes


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_store_a_quarter_or_an_eighth_of_the_float_bytes(mode):
    float_model = build(tie_embeddings=False)
    float_bytes = {name: 4 * p.numel() for name, p in float_model.named_parameters()}
    model = quantize(copy.deepcopy(float_model), mode, group_size=GROUP)
    for name, kind in model.quant_report["layers"].items():
        n, k = float_model.get_submodule(name).weight.shape
        # int8: a byte per weight + a bf16 scale per row; int4: half a byte + a bf16 (scale, zero) per group of 32.
        expected_ratio = 1 / 4 + 1 / (2 * k) if kind == "int8" else 1 / 8 + 1 / GROUP
        ratio = quantized_bytes(model.get_submodule(name)) / float_bytes[f"{name}.weight"]
        assert ratio == pytest.approx(expected_ratio)
    assert quantized_bytes(model) < quantized_bytes(float_model) * (0.35 if mode == "int8" else 0.28)


def test_quantized_bytes_counts_tied_weights_once():
    model = build()
    assert quantized_bytes(model) == 4 * sum(p.numel() for p in model.parameters())


def test_modes():
    model = build()
    assert quantize(model, "none") is model and not hasattr(model, "quant_report")
    with pytest.raises(ValueError, match="valid modes: none, int8, int4"):
        quantize(model, "fp8")
    with pytest.raises(ValueError, match="group_size"):
        quantize(model, "int4", group_size=48)
    quantize(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int4")


# ------------------------------------------------------------------------------------------------- commands


def test_generate_and_eval_print_what_was_quantized(tiny_run, tmp_path):
    # configs/tiny.yaml: d_model 64 and ffn_hidden 160, so no layer takes the default group size 128.
    result = cli("generate", str(tiny_run), "--prompt", "Once", "--max-new-tokens", "3", "--temperature", "0",
                 "--quant", "int4")
    assert result.returncode == 0, result.stderr
    assert "quantized (int4, group size 128): 9 int4 layers · CPU " in result.stdout
    assert ("int4 with a smaller group size: blocks.0-1.attn.wqkv, blocks.0-1.attn.wo, blocks.0-1.ffn.w_gate_up, "
            "lm_head: group size 64: in-features 64 not a multiple of 128") in result.stdout
    assert "blocks.0-1.ffn.w_down: group size 32: in-features 160 not a multiple of 128" in result.stdout
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little cat. " * 10, encoding="utf-8")
    scored = cli("eval", str(tiny_run), "--tasks", f"perplexity={text}", "--out", str(tmp_path / "eval"),
                 "--quant", "int8")
    assert scored.returncode == 0, scored.stderr
    assert "quantized (int8): 9 int8 layers" in scored.stdout and "bits_per_byte" in scored.stdout
    assert cli("eval", str(tiny_run), "--quant", "int3").returncode == 2
