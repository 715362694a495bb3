"""GGUF export read back with gguf's own reader, and run by llama.cpp: every tensor where llama.cpp looks for it, with
the values fermion trained, the Q/K rows reordered for llama.cpp's rotary layout, the tokenizer and chat template
intact, and the same logits as fermion when llama-cpp-python is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import pre_tokenizers

from fermion.chat.templates import BUILTIN, ChatTemplate
from fermion.config import ModelConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.errors import ExportError
from fermion.export.gguf import export_gguf
from fermion.model.transformer import Transformer, apply_rope, rope_tables

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pretrain" / "tinyshakespeare" / "input.txt"
VOCAB = 320
TINY = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=64,
            rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=False)
MOE = {"n_experts": 4, "top_k": 2}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# (architecture llama.cpp runs it as, model overrides): every layout the exporter distinguishes.
CASES = {
    "dense-tied-mha": ("llama", {"tie_embeddings": True, "n_kv_heads": 4}),
    "dense-untied-gqa-padded-vocab": ("llama", {"vocab_size": 384}),
    "qwen3-qk-norm-wide-heads": ("qwen3", {"qk_norm": True, "head_dim": 32}),
    "mixtral-moe": ("llama", {"moe": MOE}),
    "qwen3-moe": ("qwen3moe", {"qk_norm": True, "moe": MOE, "tie_embeddings": True}),
}

pytestmark = pytest.mark.skipif(not CORPUS.is_file(), reason=f"needs the shared corpus {CORPUS}")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = CORPUS.read_text(encoding="utf-8")
    return Tokenizer.train([text], TokenizerConfig(vocab_size=VOCAB, train_bytes=200_000))


def build(**overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm weights and a non-uniform router, so a wrong mapping shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
            if name.endswith("router.weight"):
                param.mul_(20.0)
    return model.eval()


def read(path: Path) -> tuple[dict, dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]]:
    """(metadata key -> value, tensor name -> (stored type, values as fp32 in numpy (out, in) order))."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
               for t in reader.tensors}
    return fields, tensors


def rotate_half_to_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Written index by index (not as the exporter's reshape): row i of a head goes to 2i, row i + hd/2 to 2i + 1."""
    head_dim = weight.shape[0] // n_heads
    out = np.empty_like(weight)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = weight[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = weight[h * head_dim + head_dim // 2 + i]
    return out


def expected_tensors(model: Transformer, arch: str) -> dict[str, np.ndarray]:
    """fermion's weights under llama.cpp's names and layouts, built independently of the exporter."""
    cfg = model.cfg
    w = {name: p.detach().float().numpy() for name, p in model.named_parameters()}
    q_rows, kv_rows = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"token_embd.weight": w["tok_emb.weight"], "output_norm.weight": w["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = w["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"blk.{i}.", f"blocks.{i}."
        qkv = w[b + "attn.wqkv.weight"]
        q, k, v = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
        if arch == "llama":
            q, k = rotate_half_to_interleaved(q, cfg.n_heads), rotate_half_to_interleaved(k, cfg.kv_heads)
        out |= {p + "attn_q.weight": q, p + "attn_k.weight": k, p + "attn_v.weight": v,
                p + "attn_output.weight": w[b + "attn.wo.weight"], p + "attn_norm.weight": w[b + "attn_norm.weight"],
                p + "ffn_norm.weight": w[b + "ffn_norm.weight"]}
        if cfg.qk_norm:
            out |= {p + "attn_q_norm.weight": w[b + "attn.q_norm.weight"],
                    p + "attn_k_norm.weight": w[b + "attn.k_norm.weight"]}
        f = cfg.ffn_hidden
        if cfg.moe:
            gate_up, down = w[b + "ffn.w_gate_up"], w[b + "ffn.w_down"]  # [E, d, 2f], [E, f, d]
            out |= {p + "ffn_gate_inp.weight": w[b + "ffn.router.weight"],
                    p + "ffn_gate_exps.weight": np.stack([e[:, :f].T for e in gate_up]),
                    p + "ffn_up_exps.weight": np.stack([e[:, f:].T for e in gate_up]),
                    p + "ffn_down_exps.weight": np.stack([e.T for e in down])}
        else:
            gate_up = w[b + "ffn.w_gate_up.weight"]
            out |= {p + "ffn_gate.weight": gate_up[:f], p + "ffn_up.weight": gate_up[f:],
                    p + "ffn_down.weight": w[b + "ffn.w_down.weight"]}
    return out


@pytest.mark.parametrize("case", CASES)
def test_f32_export_holds_every_tensor_exactly(case, tokenizer, tmp_path):
    arch, overrides = CASES[case]
    model = build(**overrides)
    path = export_gguf(model, tokenizer, tmp_path, dtype="f32", name="tiny")
    assert path == tmp_path / "tiny-f32.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f32.Modelfile", "tiny-f32.gguf"]  # no temporaries
    fields, tensors = read(path)
    assert fields["general.architecture"] == arch
    expected = expected_tensors(model, arch)
    assert tensors.keys() == expected.keys()
    for name, values in expected.items():
        stored_as, found = tensors[name]
        assert stored_as == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(found, values, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_hyperparameters(case, tokenizer, tmp_path):
    arch, overrides = CASES[case]
    model = build(**overrides)
    cfg = model.cfg
    fields, _ = read(export_gguf(model, tokenizer, tmp_path, dtype="f16"))
    expected = {
        "general.name": "model", "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
        f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": 64, f"{arch}.embedding_length": 64,
        f"{arch}.block_count": 2, f"{arch}.feed_forward_length": 96,
        f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": cfg.kv_heads,
        f"{arch}.attention.key_length": cfg.dim_per_head, f"{arch}.attention.value_length": cfg.dim_per_head,
        f"{arch}.rope.dimension_count": cfg.dim_per_head, f"{arch}.rope.freq_base": 5000.0,
    }
    if cfg.moe:
        expected |= {f"{arch}.expert_count": 4, f"{arch}.expert_used_count": 2,
                     f"{arch}.expert_feed_forward_length": 96}
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (f"{arch}.expert_count" in fields) == bool(cfg.moe)


def test_tokenizer_and_chat_template_are_intact(tokenizer, tmp_path):
    model = build(vocab_size=384)
    fields, _ = read(export_gguf(model, tokenizer, tmp_path, chat_template=CHAT_TEMPLATE))
    spec = json.loads(tokenizer.inner.to_str())
    n = tokenizer.vocab_size
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[:n] == [tokenizer.inner.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 384)]  # embedding rows past the vocabulary
    specials = set(tokenizer.inner.get_added_tokens_decoder())
    assert specials == set(range(9))
    expected_types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(n)]
    assert fields["tokenizer.ggml.token_type"] == expected_types + [gguf.TokenType.UNUSED] * (384 - n)
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_no_chat_template_key_without_a_template(tokenizer, tmp_path):
    fields, _ = read(export_gguf(build(), tokenizer, tmp_path))
    assert "tokenizer.chat_template" not in fields


@pytest.mark.parametrize("dtype, matrix_type", [("f16", gguf.GGMLQuantizationType.F16),
                                                ("q8_0", gguf.GGMLQuantizationType.Q8_0)], ids=["f16", "q8_0"])
def test_reduced_precision_keeps_norms_and_router_in_f32(dtype, matrix_type, tokenizer, tmp_path):
    model = build(moe=MOE)
    path = export_gguf(model, tokenizer, tmp_path, dtype=dtype)
    assert path.name == f"model-{dtype}.gguf"
    fields, tensors = read(path)
    assert fields["general.file_type"] == {"f16": gguf.LlamaFileType.MOSTLY_F16,
                                           "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    for name, values in expected_tensors(model, "llama").items():
        stored_as, found = tensors[name]
        exact = values.ndim == 1 or "ffn_gate_inp" in name
        assert stored_as == (gguf.GGMLQuantizationType.F32 if exact else matrix_type), name
        assert found.shape == values.shape, name
        if exact:
            np.testing.assert_array_equal(found, values, err_msg=name)
        elif dtype == "f16":
            np.testing.assert_allclose(found, values, rtol=1e-3, atol=1e-7, err_msg=name)
        else:  # Q8_0: 8-bit codes times a per-32-block scale absmax/127: half a step, plus the scale's fp16 rounding
            blocks = values.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(found.reshape(-1, 32) - blocks) <= 0.6 * step).all(), name


def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks(tokenizer, tmp_path):
    model = build(ffn_hidden=40)  # ffn_down rows have 40 values: not a multiple of Q8_0's 32-value block
    _, tensors = read(export_gguf(model, tokenizer, tmp_path, dtype="q8_0"))
    assert tensors["blk.0.ffn_down.weight"][0] == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"][0] == gguf.GGMLQuantizationType.Q8_0


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """The original Llama / llama.cpp NORM rotation: pairs (2i, 2i+1) as complex numbers. x [H, T, hd]."""
    head_dim, positions = x.shape[-1], torch.arange(x.shape[-2], dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    rotation = torch.polar(torch.ones(len(positions), head_dim // 2), torch.outer(positions, inv_freq))
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2)


def test_permuted_qk_give_the_same_attention_scores_under_interleaved_rope(tokenizer, tmp_path):
    model = build()
    cfg = model.cfg
    _, tensors = read(export_gguf(model, tokenizer, tmp_path, dtype="f32"))
    x = torch.randn(10, cfg.d_model, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_tables(cfg.dim_per_head, 10, cfg.rope_theta)

    def heads(weight, n):  # x @ W^T split into heads: [n, T, hd]
        return (x @ torch.as_tensor(weight).T).view(10, n, cfg.dim_per_head).transpose(0, 1)

    q_rows, kv_rows = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    wq, wk, _ = model.blocks[0].attn.wqkv.weight.detach().split([q_rows, kv_rows, kv_rows])
    ours_q, ours_k = apply_rope(heads(wq, 4), cos, sin), apply_rope(heads(wk, 2), cos, sin)
    theirs_q = interleaved_rope(heads(tensors["blk.0.attn_q.weight"][1], 4), cfg.rope_theta)
    theirs_k = interleaved_rope(heads(tensors["blk.0.attn_k.weight"][1], 2), cfg.rope_theta)
    ours = ours_q @ ours_k.repeat_interleave(2, dim=0).transpose(1, 2)
    theirs = theirs_q @ theirs_k.repeat_interleave(2, dim=0).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(heads(tensors["blk.0.attn_q.weight"][1], 4), heads(wq, 4))  # the rows did move


def test_sliding_window_is_refused_unless_it_covers_the_context(tokenizer, tmp_path):
    with pytest.raises(ExportError, match=r"model\.sliding_window"):
        export_gguf(build(sliding_window=16), tokenizer, tmp_path)
    assert not any(tmp_path.iterdir())
    path = export_gguf(build(sliding_window=64), tokenizer, tmp_path)  # a window as long as the context: plain causal
    assert path.is_file()


def test_unsupported_dtype_names_the_valid_ones(tokenizer, tmp_path):
    with pytest.raises(ExportError, match=r"GGUF dtype 'q4_0'.*f32, f16, q8_0"):
        export_gguf(build(), tokenizer, tmp_path, dtype="q4_0")


def test_vocabulary_larger_than_the_embedding_is_refused(tokenizer, tmp_path):
    with pytest.raises(ExportError, match=r"model\.vocab_size"):
        export_gguf(build(vocab_size=300), tokenizer, tmp_path)


@pytest.mark.parametrize("pre_tokenizer", [
    pre_tokenizers.ByteLevel(add_prefix_space=True),
    pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(r"\d{1,3}"), "isolated"),  # Llama 3 style
                             pre_tokenizers.ByteLevel(use_regex=False)]),
])
def test_tokenizer_llama_cpp_would_split_differently_is_refused(pre_tokenizer, tokenizer, tmp_path):
    inner = tokenizers.Tokenizer.from_str(tokenizer.inner.to_str())
    inner.pre_tokenizer = pre_tokenizer
    with pytest.raises(ExportError, match=r"GGUF export supports byte-level BPE .* this tokenizer has a BPE model"):
        export_gguf(build(), Tokenizer(inner), tmp_path)


def test_failed_export_leaves_no_file(tokenizer, tmp_path, monkeypatch):
    def fail(self, **_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(build(), tokenizer, tmp_path)
    assert not any(tmp_path.iterdir())


def test_each_dtype_in_one_folder_keeps_a_modelfile_naming_its_own_file(tokenizer, tmp_path):
    model = build()
    export_gguf(model, tokenizer, tmp_path, dtype="f16", name="tiny")
    first = (tmp_path / "tiny-f16.Modelfile").read_text()
    export_gguf(model, tokenizer, tmp_path, dtype="q8_0", name="tiny")
    assert (tmp_path / "tiny-f16.Modelfile").read_text() == first  # not overwritten by the second dtype
    for dtype in ("f16", "q8_0"):
        assert (tmp_path / f"tiny-{dtype}.Modelfile").read_text().splitlines()[0] == f"FROM ./tiny-{dtype}.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f16.Modelfile", "tiny-f16.gguf",
                                                           "tiny-q8_0.Modelfile", "tiny-q8_0.gguf"]


@pytest.mark.parametrize("template_name, stops", [
    ("chatml", ["<|im_end|>", "<|eos|>"]), ("alpaca", ["<|eos|>"]), ("tagged", ["</assistant>", "<|eos|>"]),
    ("my-own", ["<|eos|>"]), (None, ["<|eos|>"]),
])
def test_modelfile(template_name, stops, tokenizer, tmp_path):
    export_gguf(build(), tokenizer, tmp_path, dtype="q8_0", chat_template=CHAT_TEMPLATE, template_name=template_name,
                name="fermion-tiny")
    text = (tmp_path / "fermion-tiny-q8_0.Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./fermion-tiny-q8_0.gguf"
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [f'PARAMETER stop "{s}"' for s in stops]
    assert "PARAMETER num_ctx 64" in lines
    if template_name in BUILTIN:
        assert len(re.findall(r'^TEMPLATE """.*?"""$', text, flags=re.S | re.M)) == 1
    else:  # Ollama then takes the chat template from the GGUF
        assert "TEMPLATE" not in text


# Renders a Go text/template the way Ollama does for templates that use .Messages: .System joins the system messages,
# .Messages holds every message. Input: the template file and a JSON list of conversations; output: JSON list of texts.
GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	source, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var conversations [][]Message
	if err := json.Unmarshal(raw, &conversations); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Parse(string(source)))
	var texts []string
	for _, messages := range conversations {
		var system []string
		for _, m := range messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var out strings.Builder
		values := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": messages, "Response": ""}
		if err := t.Execute(&out, values); err != nil {
			panic(err)
		}
		texts = append(texts, out.String())
	}
	json.NewEncoder(os.Stdout).Encode(texts)
}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
     {"role": "user", "content": "Two\nlines"}],
]


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("needs a Go toolchain to run Ollama's template engine (text/template)")
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(GO_RENDERER)
    env = {**os.environ, "GOCACHE": str(folder / "cache")}
    subprocess.run(["go", "build", "-o", "render", "render.go"], cwd=folder, env=env, check=True, timeout=300)
    return folder / "render"


@pytest.mark.parametrize("template_name", BUILTIN)
def test_modelfile_template_renders_like_the_chat_template(template_name, go_renderer, tokenizer, tmp_path):
    export_gguf(build(), tokenizer, tmp_path, template_name=template_name)
    go_template = re.search(r'^TEMPLATE """(.*?)"""$', (tmp_path / "model-f16.Modelfile").read_text(), re.S | re.M)
    go_template = go_template.group(1)
    (tmp_path / "template.tmpl").write_text(go_template)
    conversations = [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in CONVERSATIONS]
    (tmp_path / "conversations.json").write_text(json.dumps(conversations))
    rendered = subprocess.run([go_renderer, tmp_path / "template.tmpl", tmp_path / "conversations.json"],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    template = ChatTemplate.get(template_name)
    expected = [template.render(c, tokenizer, add_generation_prompt=True) for c in CONVERSATIONS]
    assert json.loads(rendered) == expected


# ------------------------------------------------------------------------------------------------- llama.cpp


# Every layout in fp32 (measured differences ~5e-7, float summation order), and the reduced-precision files once each
# (measured: f16 ~3e-4, q8_0 ~1e-2 on logits of magnitude ~1).
LLAMA_CPP_RUNS = [(case, "f32", 1e-5) for case in CASES] + [("mixtral-moe", "f16", 2e-3), ("qwen3-moe", "q8_0", 3e-2)]


@pytest.mark.parametrize("case, dtype, atol", LLAMA_CPP_RUNS)
def test_llama_cpp_logits_match_fermion(case, dtype, atol, tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = build(**CASES[case][1])
    path = export_gguf(model, tokenizer, tmp_path, dtype=dtype)
    ids = tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east")[:40]
    # fp32 KV cache: llama.cpp's default f16 cache alone would add ~1e-3 of error.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          type_k=gguf.GGMLQuantizationType.F32, type_v=gguf.GGMLQuantizationType.F32, seed=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=atol, rtol=0)
    # The embedded vocabulary tokenizes like fermion: special tokens, whitespace runs, contractions, digits.
    text = "<|im_start|>user\nWherefore  art thou,\tRomeo?? 1234 don't<|im_end|>\n\n   \n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
