"""Training objectives: how a batch becomes a loss. The trainer calls `loss` for every micro-batch and
`eval_sums` for validation; later objectives (SFT, DPO) plug into the same two methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class Pretrain:
    """Next-token cross-entropy, plus the MoE auxiliary losses the model returns."""

    def __init__(self, token_bytes: torch.Tensor):
        self.token_bytes = token_bytes  # UTF-8 bytes each token id stands for, for bits per byte

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = batch
        logits, aux_loss = model(inputs)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        # Metrics are returned undetached: under torch.compile (2.13) returning a detached copy of `ce` beside the
        # loss makes the loss lose its graph. Callers detach what they keep.
        return ce + aux_loss, {"ce": ce, "aux": aux_loss}

    @torch.no_grad()
    def eval_sums(self, model, batch) -> torch.Tensor:
        """[summed loss in nats, target tokens, target bytes] for one validation batch."""
        inputs, targets = batch
        logits, _ = model(inputs)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        counted = targets != IGNORE_INDEX
        n_bytes = self.token_bytes.to(targets.device)[targets.clamp(min=0)][counted].sum()
        return torch.stack([nats, counted.sum().float(), n_bytes.float()])


def summarise_eval(sums: torch.Tensor) -> dict[str, float]:
    nats, tokens, n_bytes = sums.tolist()
    return {"val_loss": nats / max(tokens, 1), "val_bpb": nats / (math.log(2) * max(n_bytes, 1))}
