"""GGUF K-quant exports (q4_k_m, q5_k_m, q6_k): fermion's numpy quantizer read back through gguf's own dequantizer,
the per-tensor types of llama.cpp's mixes, the fallbacks for rows that are not whole 256-value super-blocks named in
the command's output, and, when llama-cpp-python is installed, llama.cpp running the files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import cli
from test_export_gguf import CORPUS, build, read, tokenizer  # noqa: F401 - tokenizer is a fixture

from fermion.chat.templates import ChatTemplate
from fermion.export import kquant
from fermion.export.gguf import export_gguf
from fermion.export.hf import export_hf

Q = gguf.GGMLQuantizationType
# Relative RMS error of the dequantized weights on Gaussian data. Measured with this quantizer: Q4_K 0.071, Q5_K
# 0.036, Q6_K 0.018 (gguf's own Q4_0 0.086, Q5_1 0.038, Q8_0 0.005 on the same data): each added bit about halves
# it. The bounds leave ~11% room, far below what a misplaced nibble or scale does (errors of order 1).
RELATIVE_RMS = {Q.Q4_K: 0.080, Q.Q5_K: 0.041, Q.Q6_K: 0.020}
WIDE = dict(d_model=256, n_heads=4, n_kv_heads=2, ffn_hidden=256)  # every row a whole number of super-blocks


@pytest.mark.parametrize("qtype", list(RELATIVE_RMS), ids=lambda q: q.name)
def test_quantized_blocks_dequantize_close_to_the_originals(qtype):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    weights[1, 256:] *= 50  # one super-block far larger than the rest of its row
    weights[2] = 0  # all-zero blocks stay exactly zero
    weights[3, :256] = 0.5  # a constant block
    weights[4, :32] = -1e-3  # one sub-block much smaller than the others of its super-block
    weights[4, 256:] = 1e-39  # so small that its reciprocal overflows float32: stored as zero
    data = kquant.quantize(weights, qtype)
    assert data.dtype == np.uint8 and data.shape == (64, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(data, qtype)
    assert back.shape == weights.shape
    error = back - weights
    plain = slice(5, None)  # the rows of Gaussian values only
    assert np.sqrt((error[plain] ** 2).mean() / (weights[plain] ** 2).mean()) < RELATIVE_RMS[qtype]
    # Block by block too, so one badly packed sub-block cannot hide in the average. A sub-block's scale is stored
    # relative to its super-block's largest, so its error is bounded by the super-block's size, not its own (the
    # tiny one in row 4 is 17-29% off by itself).
    super_rms = np.sqrt((weights.reshape(-1, 256) ** 2).mean(axis=1))
    super_error = np.sqrt((error.reshape(-1, 256) ** 2).mean(axis=1))
    assert (super_error <= 1.5 * RELATIVE_RMS[qtype] * super_rms).all()
    sub_error = np.sqrt((error.reshape(-1, 8, 32) ** 2).mean(axis=2))
    assert (sub_error <= 3 * RELATIVE_RMS[qtype] * super_rms[:, None]).all()
    np.testing.assert_array_equal(back[2], 0)
    np.testing.assert_array_equal(back[4, 256:], 0)
    np.testing.assert_allclose(back[3, :256], 0.5, rtol=2 * RELATIVE_RMS[qtype])


def test_bytes_agree_with_ggmls_reference_quantizer():
    """llama.cpp's own library, where llama-cpp-python is installed: quantize_row_q*_K_ref on the same rows gives
    the same bytes but for float rounding in the sums (measured: 99.8-99.97% of bytes, 97-99% of whole blocks)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    libraries = sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.*"))
    if not libraries:
        pytest.skip("llama-cpp-python without libggml-base")
    ggml = ctypes.CDLL(str(libraries[0]))
    rng = np.random.default_rng(0)
    weights = (rng.standard_t(3, (64, 1024)) * 0.02).astype(np.float32)  # heavy tails, as trained weights have
    for qtype in RELATIVE_RMS:
        reference = np.zeros((64, 4 * gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        function = getattr(ggml, f"quantize_row_{qtype.name[:2].lower()}_K_ref")
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        function(weights.ctypes.data, reference.ctypes.data, weights.size)
        assert (kquant.quantize(weights, qtype) == reference).mean() > 0.99, qtype.name


def types_and_values(path):
    _, tensors = read(path)
    return {name: stored for name, (stored, _) in tensors.items()}, tensors


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_q4_k_m_gives_more_bits_where_llama_cpp_does(tied, tokenizer, tmp_path):  # noqa: F811
    model = build(**WIDE, n_layers=8, tie_embeddings=tied)
    types, tensors = types_and_values(export_gguf(model, tokenizer, tmp_path, dtype="q4_k_m"))
    # llama.cpp's use_more_bits for 8 layers: the first and last eighth (0, 7) and every third between (3, 6).
    more_bits = {0, 3, 6, 7}
    for i in range(8):
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.ffn_down.weight"] == (
            Q.Q6_K if i in more_bits else Q.Q4_K)
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{kind}.weight"] == Q.Q4_K
        assert types[f"blk.{i}.attn_norm.weight"] == Q.F32
    # The output projection is Q6_K; tied, the embedding it reuses is.
    assert types.get("output.weight", types["token_embd.weight"]) == Q.Q6_K
    assert types["token_embd.weight"] == (Q.Q6_K if tied else Q.Q4_K)
    fields, _ = read(tmp_path / "model-q4_k_m.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    embedding = model.tok_emb.weight.detach().numpy()
    stored = tensors["token_embd.weight"][1]
    assert np.sqrt(((stored - embedding) ** 2).mean() / (embedding**2).mean()) < RELATIVE_RMS[types[
        "token_embd.weight"]]


@pytest.mark.parametrize("dtype, base", [("q5_k_m", Q.Q5_K), ("q6_k", Q.Q6_K)])
def test_other_mixes(dtype, base, tokenizer, tmp_path):  # noqa: F811
    types, _ = types_and_values(export_gguf(build(**WIDE, n_layers=2), tokenizer, tmp_path, dtype=dtype))
    # Of 2 layers only the last gets more bits (1 >= 7 * 2 // 8); for q6_k more bits are its own.
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == Q.Q6_K
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == base
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == base
    assert types["output.weight"] == Q.Q6_K


@pytest.mark.parametrize("dtype, fallbacks", [
    # ffn_hidden 96: ffn_down's rows (96 values) are whole 32-value blocks but not 256-value super-blocks.
    # Layer 1 of 2 gets more bits (Q6_K, whose fallback is Q8_0); layer 0 the mix's type and its fallback.
    ("q4_k_m", {"blk.0.ffn_down.weight": Q.Q5_0, "blk.1.ffn_down.weight": Q.Q8_0}),
    ("q5_k_m", {"blk.0.ffn_down.weight": Q.Q5_1, "blk.1.ffn_down.weight": Q.Q8_0}),
    ("q6_k", {"blk.0.ffn_down.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q8_0}),
])
def test_rows_that_are_not_whole_super_blocks_fall_back_and_are_named(dtype, fallbacks, tokenizer, tmp_path):  # noqa: F811
    messages = []
    model = build(**{**WIDE, "ffn_hidden": 96}, n_layers=2)
    types, _ = types_and_values(export_gguf(model, tokenizer, tmp_path, dtype=dtype, warn=messages.append))
    assert {name: types[name] for name in fallbacks} == fallbacks
    assert types["blk.0.ffn_up.weight"] != Q.Q8_0  # rows of 256: the mix's own type
    for name in fallbacks:
        assert sum(name in m and "rows of 96 values are not a multiple of" in m for m in messages) == 1, messages


def test_rows_that_are_not_whole_32_value_blocks_either_are_stored_as_f16(tokenizer, tmp_path):  # noqa: F811
    messages = []
    model = build(**{**WIDE, "ffn_hidden": 80}, n_layers=2)  # 80: not a multiple of 32 either
    types, _ = types_and_values(export_gguf(model, tokenizer, tmp_path, dtype="q4_k_m", warn=messages.append))
    assert types["blk.0.ffn_down.weight"] == Q.F16  # Q4_K -> Q5_0 does not fit 80 either: F16, as llama.cpp does
    assert any("blk.0.ffn_down.weight" in m and "stored as F16 instead of Q4_K" in m for m in messages)


def test_fermion_export_names_the_fallbacks(tokenizer, tmp_path):  # noqa: F811
    model = build(**{**WIDE, "ffn_hidden": 96}, n_layers=2)
    folder = export_hf(model, tokenizer, tmp_path / "hf", template=ChatTemplate.get("chatml"), dtype="fp32")
    result = cli("export", str(folder), "--format", "gguf", "--dtype", "q4_k_m", "--out", str(tmp_path / "gguf"))
    assert result.returncode == 0, result.stderr
    said = result.stdout.replace("\n", " ")
    for name, stored, asked in [("blk.0", "Q5_0", "Q4_K"), ("blk.1", "Q8_0", "Q6_K")]:
        assert (f"gguf q4_k_m: {name}.ffn_down.weight stored as {stored} instead of {asked}: rows of 96 values are "
                f"not a multiple of {asked}'s 256-value block") in said
    assert (tmp_path / "gguf" / "hf-q4_k_m.gguf").is_file() and (tmp_path / "gguf" / "hf-q4_k_m.Modelfile").is_file()


# ------------------------------------------------------------------------------------------------- llama.cpp


FALLING_BACK = dict(WIDE, ffn_hidden=96, n_layers=8)  # ffn_down's 96-value rows fall back
EIGHT_EXPERTS = dict(WIDE, n_layers=2, moe={"n_experts": 8, "top_k": 2})  # llama.cpp's own rules for 8 experts


@pytest.mark.parametrize("dtype, ftype, shape", [("q4_k_m", 15, FALLING_BACK), ("q5_k_m", 17, FALLING_BACK),
                                                 ("q6_k", 18, FALLING_BACK), ("q4_k_m", 15, EIGHT_EXPERTS)],
                         ids=["q4_k_m", "q5_k_m", "q6_k", "q4_k_m-8-experts"])  # ftype: LLAMA_FTYPE_MOSTLY_*
def test_files_equal_llama_cpps_own_quantization_of_the_f32_export(dtype, ftype, shape, tokenizer,  # noqa: F811
                                                                   tmp_path):
    """llama.cpp's quantizer (llama_model_quantize) on fermion's f32 file: the same type for every tensor (its mix
    and its fallbacks) and the same bytes but for float rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = build(**shape)
    f32 = export_gguf(model, tokenizer, tmp_path, dtype="f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    theirs_path = tmp_path / f"llama-cpp-{dtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), params) == 0
    ours = {t.name: t for t in gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path, dtype=dtype)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert ours.keys() == theirs.keys()
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    for name, tensor in ours.items():
        assert (np.asarray(tensor.data) == np.asarray(theirs[name].data)).mean() > 0.99, name


@pytest.fixture(scope="module")
def trained(tokenizer):  # noqa: F811
    """A 256-wide model trained for 40 steps on Shakespeare, so its next-token choices are decided (a random
    model's top-1 is a coin toss that any rounding flips), with the text it is then scored on."""
    pytest.importorskip("llama_cpp")
    text = CORPUS.read_text(encoding="utf-8")
    train_ids = torch.tensor(tokenizer.encode(text[:200_000]))
    held_out = tokenizer.encode(text[-20_000:])
    model = build(**WIDE, n_layers=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine two threads wait on each other: 7 s a step instead of 0.15 s
    try:
        for _ in range(40):
            starts = torch.randint(0, len(train_ids) - 65, (8,), generator=generator)
            batch = torch.stack([train_ids[s : s + 65] for s in starts.tolist()])
            logits, _ = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), [held_out[i * 64 : (i + 1) * 64] for i in range(3)]  # 3 full-context sequences


@pytest.mark.parametrize("dtype", ["q4_k_m", "q6_k"])
def test_llama_cpp_runs_k_quants_with_fermions_top_1(dtype, trained, tokenizer, tmp_path):  # noqa: F811
    # Measured: q4_k_m 187 of 192 positions, q6_k 189 (q8_0 188: the few misses are near-ties any rounding flips).
    import llama_cpp

    model, sequences = trained
    path = export_gguf(model, tokenizer, tmp_path, dtype=dtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, seed=0)
    agree, choices = 0, set()
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0].numpy()
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        choices |= set(ours.argmax(-1).tolist())
    assert len(choices) >= 5  # a model that says one token everywhere would agree trivially
    assert agree / (3 * 64) >= 0.95, f"{dtype}: top-1 agrees on {agree} of 192"
