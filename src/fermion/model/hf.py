"""The map between fermion models and Hugging Face transformers folders, both ways: configurations, weight names,
and reading a folder back into a fermion model (writing one is `fermion.export.hf`).

Fermion's computation is the Llama family's, so each recipe maps onto the transformers architecture that computes
exactly what fermion computes, and loads with no custom code:

    dense                          -> llama        (LlamaForCausalLM)
    dense + sliding window         -> mistral      (MistralForCausalLM, same window convention)
    dense + QK-norm (+ window)     -> qwen3        (Qwen3ForCausalLM, every layer windowed when a window is set)
    experts                        -> mixtral      (MixtralForCausalLM, softmax -> top-k -> renormalise)
    experts + QK-norm (+ window)   -> qwen3_moe    (Qwen3MoeForCausalLM with norm_topk_prob, every layer sparse)

Weights are written in the on-disk layout of each architecture's original checkpoints (Mixtral's per-expert
w1/w2/w3, Qwen3-MoE's per-expert gate/up/down projections), which transformers 4.x and 5.x and llama.cpp's
converter all read. Fermion's fused projections are split on the way out and fused again on the way in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fermion.chat.templates import default_template
from fermion.config import ModelConfig, MoEConfig, Recipe, RunConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.errors import ExportError
from fermion.model.transformer import Transformer

# The model options the architecture mappings (hf, gguf) account for. An option added to ModelConfig later is
# refused by them until they learn it, rather than silently exported as if it were off.
MAPPED_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden",
                 "context_length", "rope_theta", "norm_eps", "tie_embeddings", "qk_norm", "sliding_window", "moe",
                 "init_std"}


def check_mapped(cfg, target: str) -> None:
    """Refuse a model option, set away from its default, that the mapping to `target` does not know."""
    for name, field in type(cfg).model_fields.items():
        if name not in MAPPED_FIELDS and getattr(cfg, name) != field.get_default(call_default_factory=True):
            raise ExportError(f"model.{name} = {getattr(cfg, name)!r} has no equivalent in {target}; "
                              "export it with that option off")


CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
WEIGHTS_INDEX = "model.safetensors.index.json"
# The config.json key each fermion size comes from, for messages about a folder.
HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size"}


def architecture(cfg: ModelConfig) -> str:
    """The transformers model_type that reproduces this configuration exactly."""
    check_mapped(cfg, "any transformers architecture")
    windowed = cfg.sliding_window is not None and cfg.sliding_window < cfg.context_length
    if cfg.moe:
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.qk_norm:
        return "qwen3"
    return "mistral" if windowed else "llama"


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "fp32") -> dict:
    arch = architecture(cfg)
    window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < cfg.context_length else None
    config = {
        "architectures": [CLASSES[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta; both are written so either version loads it.
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
    }
    if arch == "llama":
        config["mlp_bias"] = False
    if arch in ("mistral", "mixtral"):
        config["sliding_window"] = window
    if arch in ("qwen3", "qwen3_moe"):
        # max_window_layers=0: Qwen3 windows the layers from this index on, so 0 windows all of them, as fermion does.
        config.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    if arch == "mixtral":
        config.update(num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                      router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False)
    if arch == "qwen3_moe":
        config.update(num_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                      moe_intermediate_size=cfg.ffn_hidden, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False)
    return config


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Fermion weights under the architecture's checkpoint names, fused projections split."""
    cfg = model.cfg
    arch = architecture(cfg)
    q_size, kv_size = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.wqkv.weight.split([q_size, kv_size, kv_size])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.attn.wo.weight,
                    p + "input_layernorm.weight": block.attn_norm.weight,
                    p + "post_attention_layernorm.weight": block.ffn_norm.weight})
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
        if cfg.moe:
            ffn = block.ffn
            moe = p + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
            out[moe + "gate.weight"] = ffn.router.weight
            for e in range(cfg.moe.n_experts):
                gate, up = ffn.w_gate_up[e].t().chunk(2)  # stored [in, out]; checkpoints hold [out, in]
                down = ffn.w_down[e].t()
                if arch == "mixtral":
                    names = ("w1", "w3", "w2")
                    x = moe + f"experts.{e}."
                    out.update({x + f"{names[0]}.weight": gate, x + f"{names[1]}.weight": up,
                                x + f"{names[2]}.weight": down})
                else:
                    x = moe + f"experts.{e}."
                    out.update({x + "gate_proj.weight": gate, x + "up_proj.weight": up, x + "down_proj.weight": down})
        else:
            gate, up = block.ffn.w_gate_up.weight.chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": block.ffn.w_down.weight})
    return {name: tensor.detach() for name, tensor in out.items()}


# ------------------------------------------------------------------------------------------------------- import


@dataclass
class Imported:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # fermion names, fp32
    tokenizer: Tokenizer
    chat_template: str | None  # the folder's Jinja template, if it has one


def is_hf_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and ((path / "model.safetensors").is_file()
                                                 or (path / WEIGHTS_INDEX).is_file())


def import_hf(folder: str | os.PathLike) -> Imported:
    """A local Llama / Mistral / Qwen3 / Mixtral / Qwen3-MoE folder -> fermion config, weights and tokenizer."""
    folder = Path(folder)
    cfg = read_config(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = _read_weights(folder)
    state = _from_hf_state_dict(weights, cfg, hf["model_type"], folder)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")  # with the chat template of its tokenizer_config.json
    return Imported(cfg, state, tokenizer, tokenizer.chat_template)


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """The fermion configuration of a Hugging Face folder's model, from its config.json alone (no weights read)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json; expected a Hugging Face model folder")
    return _config_from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")), folder)


def _config_from_hf(hf: dict, folder: Path) -> ModelConfig:
    arch = hf.get("model_type")
    where = f"{folder / 'config.json'}"
    if arch not in CLASSES:
        raise ExportError(f"{where}: model_type {arch!r} cannot be imported; fermion reads {', '.join(CLASSES)}")

    def need(*names: str):
        """The first of `names` the config holds. transformers versions spell some fields differently: 5.x saves
        the expert count of Mixtral and Qwen3-MoE as num_local_experts (both configs map num_experts onto it),
        4.x saved Qwen3-MoE's as num_experts."""
        for name in names:
            if hf.get(name) is not None:
                return hf[name]
        raise ExportError(f"{where}: {' or '.join(names)} is missing; fermion needs it to build the model")

    checks = {"hidden_act": ("silu", hf.get("hidden_act", "silu")),
              "attention_bias": (False, hf.get("attention_bias", False)),
              "mlp_bias": (False, hf.get("mlp_bias", False))}
    for field, (wanted, value) in checks.items():
        if value != wanted:
            raise ExportError(f"{where}: {field} = {value!r} has no fermion equivalent (fermion needs {wanted!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"{where}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                          "fermion implements plain RoPE")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"{where}: partial_rotary_factor = {rope['partial_rotary_factor']} is not supported; "
                          "fermion rotates every dimension of a head")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    window = _window(hf, arch, where)
    moe = None
    if arch in ("mixtral", "qwen3_moe"):
        if arch == "qwen3_moe" and not hf.get("norm_topk_prob", False):
            raise ExportError(f"{where}: norm_topk_prob = false (top-k weights not renormalised) is not supported")
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ExportError(f"{where}: dense layers mixed with sparse ones (decoder_sparse_step/mlp_only_layers) "
                              "are not supported")
        moe = MoEConfig(n_experts=need("num_local_experts", "num_experts"), top_k=need("num_experts_per_tok"),
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.01 if arch == "mixtral" else 0.001))
    heads, d_model = need("num_attention_heads"), need("hidden_size")
    kv_heads, head_dim = hf.get("num_key_value_heads") or heads, hf.get("head_dim") or d_model // heads
    try:
        return ModelConfig(  # defaults left as None, as a recipe would write them
            vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"), n_heads=heads,
            n_kv_heads=None if kv_heads == heads else kv_heads,
            head_dim=None if head_dim == d_model // heads else head_dim,
            ffn_hidden=need("moe_intermediate_size") if arch == "qwen3_moe" else need("intermediate_size"),
            context_length=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"), sliding_window=window, moe=moe,
            init_std=hf.get("initializer_range", 0.02),
        )
    except ValueError as err:  # pydantic's ValidationError: sizes fermion cannot build (heads not dividing, ...)
        detail = err.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(err, "errors") else str(err)
        # Said in the folder's own keys: fermion's names would send the reader looking for fields it does not have.
        detail = re.sub(r"\b(\w+)\b", lambda m: HF_KEYS.get(m.group(1), m.group(1)), detail)
        raise ExportError(f"{where}: {detail}") from None


def _window(hf: dict, arch: str, where: str) -> int | None:
    """The sliding window fermion applies to every layer, or None. Fermion windows all layers or none."""
    if arch == "llama":
        return None
    window = hf.get("sliding_window")
    if arch == "qwen3_moe" and not hf.get("use_sliding_window", False):
        return None
    if arch == "qwen3":
        # transformers >= 4.54 saves which layers slide as layer_types; older folders derive it from
        # use_sliding_window and max_window_layers (layers from that index on slide), as transformers does.
        layer_types = hf.get("layer_types")
        if layer_types is None:
            windowed = hf.get("use_sliding_window", False) and window is not None
            start = hf.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if windowed and i >= start else "full_attention"
                           for i in range(hf.get("num_hidden_layers", 0))]
        kinds = set(layer_types)
        if kinds - {"sliding_attention", "full_attention"} or len(kinds) > 1:
            raise ExportError(f"{where}: layer_types = {sorted(kinds)} mixes or names attention kinds fermion "
                              "cannot compute; fermion windows all layers or none")
        return window if kinds == {"sliding_attention"} else None
    return window


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{folder}: no model.safetensors or {WEIGHTS_INDEX} (fermion reads safetensors only)")
    weights = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                weights[key] = f.get_tensor(key)
    return weights


def _from_hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, folder: Path) -> dict:
    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ExportError(f"{folder}: weight {name!r} is missing")
        return weights.pop(name).float()

    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        p, f = f"model.layers.{i}.", f"blocks.{i}."
        out[f + "attn.wqkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[f + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[f + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[f + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        if cfg.qk_norm:
            out[f + "attn.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
            out[f + "attn.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
        if cfg.moe:
            fused = p + "mlp.experts.gate_up_proj"
            if fused in weights:  # the fused layout transformers 5 saves: [E, 2f, d] and [E, d, f]
                out[f + "ffn.router.weight"] = take(p + "mlp.gate.weight")
                out[f + "ffn.w_gate_up"] = take(fused).transpose(1, 2).contiguous()
                out[f + "ffn.w_down"] = take(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()
                continue
            moe = p + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
            names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            out[f + "ffn.router.weight"] = take(moe + "gate.weight")
            gate_up, down = [], []
            for e in range(cfg.moe.n_experts):
                x = moe + f"experts.{e}."
                gate_up.append(torch.cat([take(x + f"{names[0]}.weight"), take(x + f"{names[1]}.weight")]).t())
                down.append(take(x + f"{names[2]}.weight").t())
            out[f + "ffn.w_gate_up"] = torch.stack(gate_up).contiguous()
            out[f + "ffn.w_down"] = torch.stack(down).contiguous()
        else:
            out[f + "ffn.w_gate_up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"),
                                                         take(p + "mlp.up_proj.weight")])
            out[f + "ffn.w_down.weight"] = take(p + "mlp.down_proj.weight")
    leftover = [k for k in weights if "rotary_emb" not in k]
    if leftover:
        raise ExportError(f"{folder}: weights fermion has no place for: {', '.join(leftover[:5])}"
                          + (" ..." if len(leftover) > 5 else ""))
    return out


def imported_recipe(folder: Path) -> tuple[Transformer, Tokenizer, Recipe]:
    """An HF folder as fermion sees a checkpoint: the model (fp32), its tokenizer and a recipe describing both."""
    imported = import_hf(folder)
    model = Transformer.build(imported.config, "cpu", imported.state_dict)
    tokenizer = imported.tokenizer
    recipe = Recipe(run=RunConfig(name=folder.resolve().name), model=imported.config,
                    tokenizer=TokenizerConfig(path=str(folder / "tokenizer.json"),
                                              vocab_size=max(300, tokenizer.vocab_size),
                                              chat_template=default_template(tokenizer)))
    return model, tokenizer, recipe
