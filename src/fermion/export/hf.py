"""Write a fermion model as a Hugging Face transformers folder that loads with no custom code: weights in the
architecture's own layout (`fermion.model.hf` holds the map, and reads such folders back), config, generation
config, tokenizer with its chat template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fermion.atomic import replaced_dir
from fermion.chat.templates import ChatTemplate
from fermion.config import ModelConfig
from fermion.data.tokenizer import CONFIG_NAME, Tokenizer
from fermion.errors import ExportError
from fermion.layout import CARD_FILES
from fermion.model.hf import WEIGHTS_INDEX, architecture, hf_config, to_hf_state_dict
from fermion.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_exportable(cfg: ModelConfig, dtype: str = "bf16", tokenizer: dict | None = None) -> None:
    """What the Hugging Face export refuses, known before there is a model: a dtype it does not write, or a model
    no transformers architecture computes (`architecture` names the option). Any tokenizer.json loads as
    PreTrainedTokenizerFast. `export_hf` runs it first; `fermion run` runs it before training."""
    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    architecture(cfg)


def tokenizer_config(tokenizer: Tokenizer, template: ChatTemplate, context_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": context_length, "chat_template": template.source,
    }


def generation_config(tokenizer: Tokenizer, template: ChatTemplate) -> dict:
    # Stop at the end of a turn as well as at eos, when the turn marker is a single token.
    stops = [tokenizer.eos_id]
    for text in template.stop_strings:
        ids = tokenizer.encode(text)
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(ids[0])
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
            "pad_token_id": tokenizer.pad_id, "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def export_hf(model: Transformer, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, template: ChatTemplate,
              dtype: str = "bf16", max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write the folder under a temporary name, then rename it into place (an old export there is replaced)."""
    check_exportable(model.cfg, dtype)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise ExportError(f"model.vocab_size ({model.cfg.vocab_size}) is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    template.require_tokens(tokenizer, "export (choose with --template)")  # never write one that renders as pieces
    out = Path(out_dir)
    # The model card (`fermion card`) lives in this folder too and survives a re-export.
    with replaced_dir(out, "config.json", ExportError, "an earlier export", keep=CARD_FILES) as tmp:
        weights = {name: t.to(DTYPES[dtype]).contiguous().clone() for name, t in to_hf_state_dict(model).items()}
        _save_sharded(weights, tmp, max_shard_bytes)
        _write_json(tmp / "config.json", hf_config(model.cfg, tokenizer, dtype))
        _write_json(tmp / "generation_config.json", generation_config(tokenizer, template))
        tokenizer.inner.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / CONFIG_NAME, tokenizer_config(tokenizer, template, model.cfg.context_length))
        _write_json(tmp / "special_tokens_map.json", {"bos_token": tokenizer.bos_token,
                                                      "eos_token": tokenizer.eos_token,
                                                      "pad_token": tokenizer.pad_token})
    return out


def _save_sharded(weights: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        _save_readable(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_readable(shard, folder / filename)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _save_readable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates files owner-only; an export is meant to be shared like its JSON


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
