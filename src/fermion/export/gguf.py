"""Export to GGUF, the single-file format of llama.cpp and Ollama, plus an Ollama Modelfile beside it.

Architecture choice. llama.cpp has no "fermion" architecture, so the model is written as the architecture that
computes the same function: `llama` for dense models and for MoE (the Mixtral layout: softmax router, top-k,
weights renormalised, exactly fermion's routing), `qwen3` / `qwen3moe` when QK-norm is on (only those archs apply
per-head RMSNorm to queries and keys; llama.cpp's qwen3moe graph also renormalises the top-k weights unconditionally,
so no `expert_weights_norm` key is needed or read). Sliding-window attention has no counterpart in these archs and
is refused unless the window covers the whole context.

Rotary layout. fermion rotates dimension i of a head together with i + head_dim/2 ("rotate half", as Hugging Face
does). llama.cpp's `llama` arch uses the original interleaved layout, rotating 2i with 2i+1. Reordering the rows of
the Q and K projections within each head (i -> 2i, i + head_dim/2 -> 2i+1) makes the interleaved rotation act on the
same pairs; q·k is unchanged because queries and keys get the same reordering, and V/output are untouched. This is
the permutation llama.cpp's convert_hf_to_gguf.py applies to Llama checkpoints. `qwen3`/`qwen3moe` use the NEOX
(rotate-half) rotation, so there the weights go in as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR, GGMLQuantizationType, LlamaFileType, TokenType

from fermion import layout
from fermion.atomic import replaced_file
from fermion.chat.templates import STOP_STRINGS
from fermion.config import ModelConfig
from fermion.data.tokenizer import Tokenizer
from fermion.errors import ExportError
from fermion.export import kquant
from fermion.model.hf import check_mapped
from fermion.model.transformer import Transformer

# dtype name -> (type of the 2-D weight matrices, the file type recorded in the header). The K-quant mixes give some
# tensors more bits, as llama.cpp's quantizer does (kquant.tensor_type).
DTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
K_MIXES = ("q4_k_m", "q5_k_m", "q6_k")

# Ollama prompt templates (Go text/template) that render the same text as fermion's built-in Jinja chat templates
# (fermion.chat.templates). With `.Messages` Ollama passes the whole conversation; `.System` joins its system messages.
# `{eos}` is filled in with the tokenizer's eos token.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "alpaca": (
        "{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.{{ end }}\n\n"
        "{{ range .Messages }}\n"
        '{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{eos}\n\n'
        "{{ end }}\n"
        "{{- end }}### Response:\n"
    ),
    "tagged": (
        "{{- range .Messages }}<{{ .Role }}>{{ .Content }}</{{ .Role }}>\n"
        "{{ end }}<assistant>"
    ),
    "tagged-lines": (
        "{{- range .Messages }}<{{ .Role }}>\n{{ .Content }}\n</{{ .Role }}>\n"
        "{{ end }}<assistant>\n"
    ),
}


def export_gguf(model: Transformer, tokenizer: Tokenizer, out_dir: Path, *, dtype: str = "f16",
                chat_template: str | None = None, template_name: str | None = None, name: str = "model",
                warn: Callable[[str], object] = print) -> Path:
    """Write `out_dir/<name>-<dtype>.gguf` and the Ollama Modelfile naming it, `<name>-<dtype>.Modelfile`, beside it
    (other dtypes' files in the folder are left as they are); return the GGUF's path.

    dtype: "f32", "f16", "q8_0" or the K-quant mixes "q4_k_m", "q5_k_m", "q6_k" for the weight matrices; norms,
    the MoE router and other 1-D tensors stay F32 (as llama.cpp keeps them). A weight whose rows do not fit the
    type's blocks is stored in the type llama.cpp falls back to, and `warn` names it with the reason.
    `chat_template` (Jinja, as in tokenizer_config.json) is embedded for llama.cpp; `template_name` picks the
    Modelfile's Go template when it is one of fermion's named templates.
    """
    cfg = model.cfg
    spec = json.loads(tokenizer.inner.to_str())  # the tokenizer.json: pipeline and merges
    check_exportable(cfg, dtype, spec)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); the GGUF needs an embedding row for every token")
    file_type = DTYPES[dtype][1]
    arch = "qwen3" if cfg.qk_norm else "llama"
    if cfg.qk_norm and cfg.moe:
        arch = "qwen3moe"

    out_dir = Path(out_dir)  # made by the first write (atomic.replaced_file), which names it if it cannot be
    path = out_dir / f"{name}-{dtype}.gguf"

    fallbacks: dict[tuple, list[str]] = {}  # (asked, stored, row length) -> tensor names

    def write(temporary: Path) -> None:
        fallbacks.clear()
        writer = gguf.GGUFWriter(temporary, arch)
        try:
            writer.add_name(name)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hyperparameters(writer, cfg)
            _add_tokenizer(writer, tokenizer, spec["model"]["merges"], cfg.vocab_size, chat_template)
            for tensor_name, array in _tensors(model, permute_qk=arch == "llama"):
                asked = _asked_type(tensor_name, array, dtype, cfg)
                data, stored_as = _encode(array, asked)
                if stored_as != asked:
                    fallbacks.setdefault((asked, stored_as, array.shape[-1]), []).append(tensor_name)
                writer.add_tensor(tensor_name, data, raw_dtype=stored_as)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    _write_atomically(path, write)
    for (asked, stored, row), names in fallbacks.items():
        block = gguf.GGML_QUANT_SIZES[asked][0]
        warn(f"gguf {dtype}: {', '.join(names)} stored as {stored.name} instead of {asked.name}: rows of {row} "
             f"values are not a multiple of {asked.name}'s {block}-value block")
    modelfile = _modelfile(path.name, cfg, tokenizer, template_name)
    _write_atomically(layout.modelfile(path), lambda temporary: temporary.write_text(modelfile, encoding="utf-8"))
    return path


def check_exportable(cfg: ModelConfig, dtype: str = "f16", tokenizer: dict | None = None) -> None:
    """Refuse what llama.cpp would load but compute differently, or this writer cannot write, knowing only the
    model's configuration, the dtype and the tokenizer.json (None: a tokenizer fermion trains, byte-level BPE with
    the GPT-2 split, which GGUF takes). `export_gguf` runs it first; `fermion run` runs it before training."""
    if dtype not in DTYPES:
        raise ExportError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    check_mapped(cfg, "llama.cpp's architectures")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.context_length:
        raise ExportError(
            f"model.sliding_window ({cfg.sliding_window}) < model.context_length ({cfg.context_length}): llama.cpp's "
            "llama/qwen3 architectures have no sliding-window attention; export to hf or onnx instead"
        )
    if tokenizer is None:
        return
    pre = tokenizer.get("pre_tokenizer") or {}
    model = tokenizer.get("model") or {}
    gpt2_split = (model.get("type") == "BPE" and tokenizer.get("normalizer") is None
                  and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space", False))
    if not gpt2_split:
        found = [f"a {model.get('type')} model", f"{pre.get('type') or 'no'} pre-tokenizer"]
        if pre.get("type") == "ByteLevel":
            found[-1] += " with a prefix space" if pre.get("add_prefix_space", False) else " without the GPT-2 split"
        if tokenizer.get("normalizer"):
            found.append(f"a {tokenizer['normalizer'].get('type')} normaliser")
        raise ExportError("GGUF export supports byte-level BPE tokenizers with the GPT-2 split (no normaliser, no "
                          f"prefix space), as fermion trains; this tokenizer has {', '.join(found)}")


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    # Stated explicitly: fermion allows head_dim != d_model / n_heads, which llama.cpp would otherwise assume.
    writer.add_key_length(cfg.dim_per_head)
    writer.add_value_length(cfg.dim_per_head)
    writer.add_rope_dimension_count(cfg.dim_per_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.moe:
        writer.add_expert_count(cfg.moe.n_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
        writer.add_expert_feed_forward_length(cfg.ffn_hidden)  # qwen3moe reads it; llama uses feed_forward_length


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, merges: list, n_rows: int,
                   chat_template: str | None) -> None:
    """The vocabulary as llama.cpp's "gpt2" BPE: byte-level token strings, merges, special-token ids."""
    added = tokenizer.inner.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.inner.id_to_token(i)
        if token is None:
            raise ExportError(f"tokenizer.path: the vocabulary has no token with id {i}; ids must be contiguous")
        tokens.append(token)
        if i not in added:
            types.append(TokenType.NORMAL)
        else:  # specials are matched only when parsing special tokens; other added tokens always match literally
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    # Embedding rows past the tokenizer (vocab padded for matmul speed) get placeholders llama.cpp never emits.
    for i in range(tokenizer.vocab_size, n_rows):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex; "gpt2" fails to load
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    # fermion never adds tokens implicitly; chat templates and callers put bos/eos where they belong.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _tensors(model: Transformer, permute_qk: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in numpy (out, in) order) for every weight, fused projections split."""
    cfg = model.cfg
    q_rows, kv_rows = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    yield _name(MODEL_TENSOR.TOKEN_EMBD), _array(model.tok_emb.weight)
    yield _name(MODEL_TENSOR.OUTPUT_NORM), _array(model.norm.weight)
    if model.lm_head is not None:  # tied: no output.weight, llama.cpp then reuses token_embd
        yield _name(MODEL_TENSOR.OUTPUT), _array(model.lm_head.weight)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = np.split(_array(attn.wqkv.weight), [q_rows, q_rows + kv_rows])
        if permute_qk:
            q, k = interleave_rope_rows(q, cfg.n_heads), interleave_rope_rows(k, cfg.kv_heads)
        yield _name(MODEL_TENSOR.ATTN_NORM, i), _array(block.attn_norm.weight)
        yield _name(MODEL_TENSOR.ATTN_Q, i), q
        yield _name(MODEL_TENSOR.ATTN_K, i), k
        yield _name(MODEL_TENSOR.ATTN_V, i), v
        yield _name(MODEL_TENSOR.ATTN_OUT, i), _array(attn.wo.weight)
        if attn.q_norm is not None:
            yield _name(MODEL_TENSOR.ATTN_Q_NORM, i), _array(attn.q_norm.weight)
            yield _name(MODEL_TENSOR.ATTN_K_NORM, i), _array(attn.k_norm.weight)
        yield _name(MODEL_TENSOR.FFN_NORM, i), _array(block.ffn_norm.weight)
        if cfg.moe:
            # fermion stores experts (in, out) for its grouped matmul; GGUF wants (expert, out, in) stacks.
            gate_up = _array(block.ffn.w_gate_up).transpose(0, 2, 1)
            yield _name(MODEL_TENSOR.FFN_GATE_INP, i), _array(block.ffn.router.weight)
            yield _name(MODEL_TENSOR.FFN_GATE_EXP, i), np.ascontiguousarray(gate_up[:, : cfg.ffn_hidden])
            yield _name(MODEL_TENSOR.FFN_UP_EXP, i), np.ascontiguousarray(gate_up[:, cfg.ffn_hidden :])
            yield _name(MODEL_TENSOR.FFN_DOWN_EXP, i), np.ascontiguousarray(_array(block.ffn.w_down).transpose(0, 2, 1))
        else:
            gate, up = np.split(_array(block.ffn.w_gate_up.weight), 2)
            yield _name(MODEL_TENSOR.FFN_GATE, i), gate
            yield _name(MODEL_TENSOR.FFN_UP, i), up
            yield _name(MODEL_TENSOR.FFN_DOWN, i), _array(block.ffn.w_down.weight)


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairs (i, i + hd/2) to interleaved pairs (2i, 2i + 1)."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _name(kind: MODEL_TENSOR, block: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _asked_type(name: str, array: np.ndarray, dtype: str, cfg: ModelConfig) -> GGMLQuantizationType:
    """The type a tensor gets in a `dtype` file, before any fallback for its row length. Norms and 1-D tensors stay
    F32 (llama.cpp's kernels for them expect F32); the MoE router stays F32 as llama.cpp's own quantizer leaves it,
    since small errors there change expert choices."""
    if array.ndim == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return GGMLQuantizationType.F32
    if dtype not in K_MIXES:
        return DTYPES[dtype][0]
    return kquant.tensor_type(name, dtype, cfg.n_layers, cfg.moe.n_experts if cfg.moe else 0, cfg.tie_embeddings)


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The stored bytes and their type: `qtype`, or for rows that do not fit its blocks the type llama.cpp's
    quantizer falls back to (a K-quant to the 32-value type of about its precision, Q8_0 to F16)."""
    row = array.shape[-1]
    stored = kquant.fallback(qtype, row) or qtype
    if stored in kquant.FALLBACK:  # a K-quant that fits: gguf cannot quantize those
        return kquant.quantize(array, stored), stored
    if stored not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and row % gguf.GGML_QUANT_SIZES[stored][0]:
        stored = GGMLQuantizationType.F16
    if stored == GGMLQuantizationType.F32:
        return array, stored
    return gguf.quants.quantize(array, stored), stored


def _modelfile(gguf_name: str, cfg: ModelConfig, tokenizer: Tokenizer, template_name: str | None) -> str:
    """An Ollama Modelfile. For an unknown template TEMPLATE is omitted: Ollama then uses the GGUF's chat template."""
    lines = [f"FROM ./{gguf_name}", ""]
    eos = tokenizer.inner.id_to_token(tokenizer.eos_id)
    if template_name in OLLAMA_TEMPLATES:
        lines += [f'TEMPLATE """{OLLAMA_TEMPLATES[template_name].replace("{eos}", eos)}"""', ""]
    for stop in dict.fromkeys([*STOP_STRINGS.get(template_name, []), eos]):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {cfg.context_length}")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write under a temporary name, then rename: an interrupted export never leaves a truncated file behind."""
    with replaced_file(path) as temporary:
        write(temporary)
