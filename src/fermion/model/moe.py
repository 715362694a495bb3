"""Mixtral-style mixture-of-experts feed-forward.

A linear router scores every expert; the softmax over all experts is taken in fp32, the top-k are kept and their
weights renormalised to sum to one (as Mixtral does). Every token goes to exactly its top-k experts: no capacity
limit, no dropped tokens. Two auxiliary losses keep routing healthy: the Switch-Transformer load-balancing loss
(n_experts * sum_e fraction_routed_e * mean_prob_e, equal to 1 when balanced) and the ST-MoE router z-loss
(mean squared log-sum-exp of the router logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fermion.config import ModelConfig


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        # Expert weights stacked [n_experts, in, out] so a grouped matmul can take them whole.
        self.w_gate_up = nn.Parameter(torch.empty(self.n_experts, cfg.d_model, 2 * cfg.ffn_hidden))
        self.w_down = nn.Parameter(torch.empty(self.n_experts, cfg.ffn_hidden, cfg.d_model))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (expert ids [N, k], renormalised weights [N, k] fp32, auxiliary loss)."""
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        top_probs, top_ids = probs.topk(self.top_k, dim=-1)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        routed = F.one_hot(top_ids, self.n_experts).sum(dim=1).float()  # [N, E], 1 where the token goes
        balance = self.n_experts * (routed.mean(dim=0) / self.top_k * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return top_ids, top_probs, self.aux_loss_coef * balance + self.z_loss_coef * z_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_ids, top_weights, aux_loss = self.route(x)
        # Group the (token, slot) assignments by expert, run each expert once on its tokens.
        order = top_ids.flatten().argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(top_ids.flatten(), minlength=self.n_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            gate, up = (x[rows] @ self.w_gate_up[expert]).chunk(2, dim=-1)
            expert_out = (F.silu(gate) * up) @ self.w_down[expert]
            weight = top_weights.flatten()[order[start : start + count]].unsqueeze(-1)
            out.index_add_(0, rows, (expert_out * weight).to(x.dtype))
            start += count
        return out.view(shape), aux_loss
