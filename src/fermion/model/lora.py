"""LoRA: low-rank adapters on the chosen projections of the one model, every weight of the model itself frozen.

A targeted projection W [out, in] computes W x + (alpha / rank) * B A dropout(x), with A [rank, in] drawn as
nn.Linear draws its weights (Kaiming uniform) and B [out, rank] zero, so training starts exactly at the base model
(Hu et al. 2021, and PEFT's defaults). Targets are the model's own projection names (`TARGETS`). A fused projection
gets one adapter: split by rows, its B with A shared is exactly PEFT's per-projection adapters (wqkv -> q_proj,
k_proj, v_proj; w_gate_up -> gate_proj, up_proj), which export/peft.py writes.

Beside the adapters, the rows of chosen tokens in the embedding train (`TrainableRows`, PEFT's TrainableTokens):
a chat template's markers are tokens a base pretrained on plain text never saw, and no low-rank update of the
blocks can give them embeddings. A tied output layer reads the same rows; an untied one gets its own rows of the
same tokens, since SFT teaches the model to *write* <|im_end|> as much as to read it.

`add_adapters` wraps the layers in place and freezes the rest; `merge` folds every adapter into its layer
(W + scale B A, the trained rows written over the base's) for inference and export, `unwrap` drops them (the base
alone). A checkpoint of an adapted model holds only `adapter_state` and a reference to its base (checkpoint.py);
`model.adapters` records both and the trained tokens.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fermion import layout
from fermion.chat.templates import ChatTemplate
from fermion.config import LoRAConfig, ModelConfig, RecipeError
from fermion.data.tokenizer import Tokenizer
from fermion.errors import CheckpointError
from fermion.model.transformer import Transformer

TARGETS = ("wqkv", "wo", "w_gate_up", "w_down")  # the blocks' projections, as transformer.py names them
ROW_LAYERS = ("tok_emb", "lm_head")  # the model's [vocab, d_model] layers, whose rows of chosen tokens may train
ADAPTER_TENSORS = ("lora_A", "lora_B", "token_rows")  # what adapter_state keeps
HF_NAMES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo", "gate_proj": "w_gate_up",
            "up_proj": "w_gate_up", "down_proj": "w_down"}


def valid_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """An MoE model's experts are stacked tensors, not projections: adapters go on its attention."""
    return TARGETS[:2] if cfg.moe else TARGETS


def check_targets(cfg: ModelConfig, lora: LoRAConfig, field: str) -> tuple[str, ...]:
    """The projections `lora` adapts in a model of `cfg` (all valid ones when it names none); a name that is not one
    is a RecipeError naming `field` and the valid names."""
    valid = valid_targets(cfg)
    for name in lora.targets or valid:
        if name in valid:
            continue
        if name in HF_NAMES:
            hint = f" ({name} is Hugging Face's name; here it is part of {HF_NAMES[name]})"
        elif name in TARGETS:
            hint = " (the experts of an MoE model are stacked tensors, not projections)"
        else:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{field}.targets: {name!r} is not a projection of this model; valid: "
                          f"{', '.join(valid)}{hint}")
    return tuple(dict.fromkeys(lora.targets or valid))


def trainable_tokens(lora: LoRAConfig, tokenizer: Tokenizer, template: ChatTemplate, field: str,
                     data: Iterable[np.ndarray] = ()) -> dict[str, int]:
    """The tokens whose rows train (`lora.trainable_tokens` resolved) and their ids, "data" taking those of `data`
    (the training examples' token ids) after the template's; one the vocabulary lacks is a RecipeError naming
    `field` and the tokenizer's special tokens."""
    if lora.trainable_tokens in ("auto", "data"):
        names = template.special_tokens(tokenizer)
        if lora.trainable_tokens == "data":
            used = np.unique(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in data] or [np.zeros(0)]))
            names += [tokenizer.inner.id_to_token(int(token_id)) for token_id in used]
    else:
        names = lora.trainable_tokens
    ids = {name: tokenizer.inner.token_to_id(name) for name in dict.fromkeys(names)}
    for name, token_id in ids.items():
        if token_id is None:
            specials = [t.content for t in tokenizer.inner.get_added_tokens_decoder().values() if t.special]
            close = difflib.get_close_matches(name, specials, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (its special tokens: {', '.join(specials)})"
            raise RecipeError(f"{field}.trainable_tokens: {name!r} is not a token of the tokenizer's vocabulary"
                              f"{hint}")
    return ids


class TrainableRows(nn.Module):
    """A frozen embedding or output layer `base` (weight [vocab, d_model]) whose rows for `token_ids` train: their
    values are the parameter `token_rows`, started at the base's and written over them wherever the weight is read
    (stored whole, not as a difference, as PEFT's trainable_tokens_delta is)."""

    def __init__(self, base: nn.Embedding | nn.Linear, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, device=base.weight.device), persistent=False)
        self.token_rows = nn.Parameter(base.weight.detach()[self.token_ids].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight with the trained rows in place (a new tensor: a tied output layer reads it too)."""
        return self.base.weight.index_copy(0, self.token_ids, self.token_rows.to(self.base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight) if isinstance(self.base, nn.Embedding) else F.linear(x, self.weight)


class LoRALinear(nn.Module):
    """A frozen bias-free projection `base` (an nn.Linear, or a quantized stand-in with in_features and
    out_features) plus its trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        weight = base.weight
        self.base, self.scale = base, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the base weight, scale * B @ A [out, in], computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def add_adapters(model: Transformer, lora: LoRAConfig, base: dict, field: str = "lora",
                 tokens: dict[str, int] | None = None) -> Transformer:
    """Wrap the targeted projections of every block in place, make the rows of `tokens` (trainable_tokens: name ->
    id) trainable in the embedding and in an untied output layer, freeze every other weight, and record the
    adapters' settings, `base` (what they are trained on: checkpoint.base_reference) and the tokens as
    `model.adapters`."""
    targets = check_targets(model.cfg, lora, field)
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in (block.attn, block.ffn):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), lora.rank, lora.alpha, lora.dropout))
    tokens = dict(tokens or {})
    if tokens:
        for name in ROW_LAYERS:
            if getattr(model, name) is not None:
                setattr(model, name, TrainableRows(getattr(model, name), list(tokens.values())))
    model.adapters = {"lora": lora.model_dump(mode="json"), "base": base, "trainable_tokens": tokens}
    return model


def adapted(model: nn.Module) -> bool:
    return getattr(model, "adapters", None) is not None


def adapter_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    """(parent, attribute, layer) for every adapted projection, in module order."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, LoRALinear)]


def row_layers(model: nn.Module) -> dict[str, TrainableRows]:
    """The model's layers with trained token rows, by attribute (tok_emb, and lm_head when untied)."""
    return {name: getattr(model, name) for name in ROW_LAYERS if isinstance(getattr(model, name, None), TrainableRows)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their names in the model (blocks.0.attn.wqkv.lora_A, ..., tok_emb.token_rows):
    what a checkpoint of an adapted model holds."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if name.rsplit(".", 1)[-1] in ADAPTER_TENSORS}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str,
                       tokens: dict[str, int] | None = None) -> None:
    """Copy a checkpoint's adapter tensors into an adapted model, which must have exactly those adapters and, when
    the checkpoint's trainable `tokens` are given (resuming), train the rows of the same tokens."""
    if tokens is not None and tokens != model.adapters["trainable_tokens"]:
        raise CheckpointError(f"{where}'s adapters trained the rows of {_few(tokens)}, this stage trains those of "
                              f"{_few(model.adapters['trainable_tokens'])}: the recipe's lora.trainable_tokens "
                              "changed; restore it or use another run.dir")
    ours = adapter_state(model)
    if set(ours) != set(state):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise CheckpointError(f"{where} holds other adapters than this model has (missing: {missing[:2] or 'none'}; "
                              f"not in the model: {extra[:2] or 'none'}): its lora targets or trainable_tokens "
                              "differ from the recipe's")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(state[name])


def _few(tokens: dict) -> str:
    """Trainable tokens for a message: "data" can mean thousands, so the count and the first few."""
    return f"{len(tokens)} tokens ({', '.join(list(tokens)[:3])}{', ...' if len(tokens) > 3 else ''})"


def merge(model: Transformer) -> Transformer:
    """Fold every adapter into its projection (W + scale B A, in the weight's dtype) and the trained rows into their
    layer: a plain model again, all of whose weights train, with no `adapters` record."""
    for parent, name, layer in adapter_layers(model):
        weight = layer.base.weight
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(weight.float() + layer.delta())
        setattr(parent, name, merged)
    for name, layer in row_layers(model).items():
        with torch.no_grad():
            layer.base.weight.copy_(layer.weight)
        setattr(model, name, layer.base)
    model.adapters = None
    return model.requires_grad_(True)


def unwrap(model: Transformer) -> Transformer:
    """Drop every adapter, leaving the base model (exported beside a PEFT adapter folder)."""
    for parent, name, layer in adapter_layers(model):
        setattr(parent, name, layer.base)
    for name, layer in row_layers(model).items():
        setattr(model, name, layer.base)
    model.adapters = None
    return model.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes: the identity of the weights adapters were trained
    on (checkpoint.base_reference), and of DPO's starting weights (its reference cache)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_record(ckpt: Path) -> dict | None:
    """adapter.json of a checkpoint trained with LoRA ({"lora": settings, "base": base reference}), else None."""
    path = layout.adapter_file(ckpt)
    return json.loads(path.read_text()) if path.is_file() else None
