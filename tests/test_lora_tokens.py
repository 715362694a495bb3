"""LoRA's trainable token rows (lora.trainable_tokens): which tokens "auto" picks, that only their rows of the
embedding (and of an untied output layer) train, and that PEFT loads them from the adapter folder with fermion's
logits, tied and untied."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from fermion.chat.templates import ChatTemplate
from fermion.config import LoRAConfig, RecipeError
from fermion.export.hf import export_hf
from fermion.export.peft import export_adapter
from fermion.model import lora

CHATML = ChatTemplate.get("chatml")


def chat_tokens(tokenizer) -> dict[str, int]:
    return {token: tokenizer.token_id(token) for token in ("<|im_start|>", "<|im_end|>")}


def test_auto_picks_the_special_tokens_the_chat_template_writes(shakespeare_tokenizer):
    tokenizer = shakespeare_tokenizer
    auto = LoRAConfig()
    assert lora.trainable_tokens(auto, tokenizer, CHATML, "sft.lora") == chat_tokens(tokenizer)
    assert lora.trainable_tokens(auto, tokenizer, ChatTemplate.get("alpaca"), "sft.lora") == {
        "<|eos|>": tokenizer.eos_id}  # alpaca ends a reply with eos
    assert lora.trainable_tokens(auto, tokenizer, ChatTemplate.get("tagged"), "sft.lora") == {}  # plain text tags
    assert lora.trainable_tokens(LoRAConfig(trainable_tokens=[]), tokenizer, CHATML, "sft.lora") == {}
    listed = LoRAConfig(trainable_tokens=["<|tool|>", "<|im_end|>"])
    assert list(lora.trainable_tokens(listed, tokenizer, CHATML, "dpo.lora")) == ["<|tool|>", "<|im_end|>"]
    # "data": the template's tokens, then every token the training examples hold, in id order, each once.
    examples = [np.array([40, 9, tokenizer.token_id("<|im_end|>")]), np.array([9, 300])]
    data = lora.trainable_tokens(LoRAConfig(trainable_tokens="data"), tokenizer, CHATML, "sft.lora", examples)
    assert list(data.values()) == [*chat_tokens(tokenizer).values(), 9, 40, 300]
    with pytest.raises(RecipeError, match=r"^dpo.lora.trainable_tokens: '<\|tools\|>' is not a token of the "
                                          r"tokenizer's vocabulary; did you mean '<\|tool\|>'\?$"):
        lora.trainable_tokens(LoRAConfig(trainable_tokens=["<|tools|>"]), tokenizer, CHATML, "dpo.lora")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_token_rows_train_while_the_rest_of_the_embedding_stays_frozen(tied):
    base = tiny_model(tie_embeddings=tied)
    tokens = {"a": 3, "b": 7}
    model = lora.add_adapters(copy.deepcopy(base), LoRAConfig(rank=2), {"digest": ""}, tokens=tokens)
    rows = {f"{name}.token_rows" for name in ("tok_emb", "lm_head") if name == "tok_emb" or not tied}
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n} == rows
    assert lora.trainable_parameters(model) == sum(p.numel() for p in lora.adapter_state(model).values())
    ids = torch.tensor([[1, 3, 5, 7, 9, 3]])
    torch.testing.assert_close(model(ids)[0], base(ids)[0], atol=0, rtol=0)  # the rows start at the base's

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids)[0].logsumexp(-1).sum().backward()
    optimizer.step()
    trained = model(ids)[0].detach()
    merged = lora.merge(model)
    torch.testing.assert_close(merged(ids)[0], trained, atol=1e-5, rtol=1e-5)
    for name in ("tok_emb", "lm_head") if not tied else ("tok_emb",):
        changed = (getattr(merged, name).weight - getattr(base, name).weight).abs().sum(dim=1)
        assert changed.nonzero().flatten().tolist() == [3, 7], name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_loads_the_trained_rows_with_fermions_logits(shakespeare_tokenizer, tmp_path, tied):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    tokenizer = shakespeare_tokenizer
    model = tiny_model(vocab_size=tokenizer.vocab_size, tie_embeddings=tied)
    tokens = lora.trainable_tokens(LoRAConfig(), tokenizer, CHATML, "sft.lora")
    lora.add_adapters(model, LoRAConfig(rank=4, alpha=8), {"digest": ""}, tokens=tokens)
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters and rows far from the base's, so a dropped piece shows
        for _, _, layer in lora.adapter_layers(model):
            layer.lora_B.normal_(0, 0.05, generator=noise)
        for layer in lora.row_layers(model).values():
            layer.token_rows.normal_(0, 1.0, generator=noise)
    ids = torch.tensor([[tokens["<|im_start|>"], 40, 41, tokens["<|im_end|>"], 42, tokens["<|im_start|>"]]])
    expected = model(ids)[0].detach()

    export_adapter(copy.deepcopy(model), tokenizer, tmp_path / "adapter", template=CHATML, dtype="fp32")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    indices = list(tokens.values())
    assert config["trainable_token_indices"] == (indices if tied else {"embed_tokens": indices, "lm_head": indices})
    layers = ["model.embed_tokens"] + ([] if tied else ["lm_head"])
    assert {k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if "token_adapter" in k} == {
        f"base_model.model.{layer}.token_adapter.trainable_tokens_delta" for layer in layers}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = export_hf(lora.merge(model), tokenizer, tmp_path / "merged", template=CHATML, dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, expected, atol=1e-4, rtol=0)
        hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        torch.testing.assert_close(hf_merged(ids).logits, expected, atol=1e-4, rtol=0)
