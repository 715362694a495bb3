"""Write a LoRA-trained fermion model as a PEFT adapter folder: adapter_config.json and adapter_model.safetensors
under PEFT's names, beside the Hugging Face export of its base (in `base/`), which the adapter config names.

    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("<folder>/base"), "<folder>")

Fermion fuses q/k/v and gate/up into one projection each, and gives the fused projection one adapter: B [out, r]
and A [r, in]. PEFT adapts the Hugging Face projections one by one. Split by rows, B @ A is the stacked updates of
q, k and v (or gate and up), so each gets A itself and its rows of B: the same update exactly, with the same rank
and alpha (tests/test_lora.py compares PEFT's logits with fermion's).

Trained token rows (lora.trainable_tokens) go in as PEFT's `trainable_token_indices`, each layer's rows whole under
`<layer>.token_adapter.trainable_tokens_delta` (PEFT's name; it holds the rows, not a difference). Tied embeddings
take a plain list of ids, which PEFT applies to the input embedding and ties to the output layer; an untied output
layer has its own rows, so the indices are given per layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fermion.atomic import replaced_dir
from fermion.chat.templates import ChatTemplate
from fermion.data.tokenizer import Tokenizer
from fermion.errors import ExportError
from fermion.export.hf import export_hf
from fermion.model import lora
from fermion.model.hf import architecture
from fermion.model.transformer import Transformer

BASE = "base"  # the base model's HF export, inside the adapter folder
HF_ROW_LAYERS = {"tok_emb": "embed_tokens", "lm_head": "lm_head"}
HF_ROW_PATHS = {"tok_emb": "model.embed_tokens", "lm_head": "lm_head"}


def hf_adapters(model: Transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path in the HF model (model.layers.0.self_attn.q_proj, ...) -> (A, B) of its adapter."""
    cfg = model.cfg
    q_size, kv_size = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    mlp = "block_sparse_moe" if architecture(cfg) == "mixtral" else "mlp"
    out = {}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        parts = {"attn.wqkv": [("self_attn.q_proj", q_size), ("self_attn.k_proj", kv_size),
                               ("self_attn.v_proj", kv_size)],
                 "attn.wo": [("self_attn.o_proj", None)],
                 "ffn.w_gate_up": [(f"{mlp}.gate_proj", cfg.ffn_hidden), (f"{mlp}.up_proj", cfg.ffn_hidden)],
                 "ffn.w_down": [(f"{mlp}.down_proj", None)]}
        for path, names in parts.items():
            layer = block.get_submodule(path)
            if not isinstance(layer, lora.LoRALinear):
                continue
            rows = [size or layer.lora_B.shape[0] for _, size in names]
            for (name, _), b in zip(names, layer.lora_B.split(rows), strict=True):
                out[prefix + name] = (layer.lora_A, b)
    return out


def hf_token_rows(model: Transformer) -> tuple[list[int] | dict[str, list[int]] | None, dict[str, torch.Tensor]]:
    """PEFT's trainable_token_indices for the model's trained rows (None when it has none) and their tensors."""
    layers = lora.row_layers(model)
    ids = list(model.adapters["trainable_tokens"].values())
    tensors = {f"base_model.model.{HF_ROW_PATHS[name]}.token_adapter.trainable_tokens_delta":
               layer.token_rows.detach().float().contiguous().clone() for name, layer in layers.items()}
    if not layers:
        return None, tensors
    return (ids if "lm_head" not in layers else {HF_ROW_LAYERS[name]: ids for name in layers}), tensors


def adapter_config(settings: dict, targets: list[str], base: Path, token_indices) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()),
            "r": settings["rank"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "trainable_token_indices": token_indices}


def export_adapter(model: Transformer, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, template: ChatTemplate,
                   dtype: str = "bf16") -> Path:
    """The adapter folder for a model loaded with its adapters apart (checkpoint.load(merge_adapters=False)); the
    base goes to `<out>/base` in `dtype`, the adapters stay fp32 (PEFT keeps them so). The model is left unwrapped
    (its base alone). Written under a temporary name and renamed into place."""
    if not lora.adapted(model):
        raise ExportError("this checkpoint has no LoRA adapters (it was not trained with sft.lora or dpo.lora); "
                          "export it without --adapter")
    settings = model.adapters["lora"]
    adapters = hf_adapters(model)
    tensors = {f"base_model.model.{path}.lora_{side}.weight": t.detach().float().contiguous().clone()
               for path, (a, b) in adapters.items() for side, t in (("A", a), ("B", b))}
    targets = sorted({path.rsplit(".", 1)[1] for path in adapters})
    token_indices, rows = hf_token_rows(model)
    tensors.update(rows)
    lora.unwrap(model)
    out = Path(out_dir)
    with replaced_dir(out, "adapter_config.json", ExportError, "an earlier adapter export") as tmp:
        export_hf(model, tokenizer, tmp / BASE, template=template, dtype=dtype)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = adapter_config(settings, targets, out / BASE, token_indices)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
