"""Plain autoregressive sampling from a checkpoint (full forward pass per token; no KV cache yet)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fermion.data.tokenizer import Tokenizer
from fermion.model.transformer import Transformer
from fermion.train import checkpoint


def load_for_inference(path: str | Path, device: str = "cpu", warn=print) -> tuple[Transformer, Tokenizer]:
    """A run directory (its newest good checkpoint) or a checkpoint directory -> (model in eval mode, tokenizer)."""
    ckpt = checkpoint.resolve(path, warn=warn)
    recipe = checkpoint.load_recipe_of(ckpt)
    with torch.device("meta"):
        model = Transformer(recipe.model)
    model.to_empty(device=device)
    model.reset_rope()
    checkpoint.load_weights(ckpt, model)
    return model.eval(), Tokenizer.load(ckpt / "tokenizer.json")


@torch.no_grad()
def sample_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; temperature 0 is greedy."""
    device = model.tok_emb.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.cfg.context_length:])
        logits = logits[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if next_id in stop_ids:
            return
        yield next_id
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100,
                  temperature: float = 0.8, top_k: int | None = 50, seed: int = 0) -> str:
    ids = list(sample_tokens(model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, seed,
                             stop_ids=(tokenizer.eos_id,)))
    return tokenizer.decode(ids)
