"""Mixtral-style mixture-of-experts feed-forward.

A linear router scores every expert; the softmax over all experts is taken in fp32, the top-k are kept and their
weights renormalised to sum to one (as Mixtral does). Every token goes to exactly its top-k experts: no capacity
limit, no dropped tokens. Two auxiliary losses keep routing healthy: the Switch-Transformer load-balancing loss
(n_experts * sum_e fraction_routed_e * mean_prob_e, equal to 1 when balanced) and the ST-MoE router z-loss
(mean squared log-sum-exp of the router logits).

The experts run as two grouped matmuls: the (token, slot) assignments are sorted by expert, and `torch._grouped_mm`
multiplies each expert's contiguous run of rows by that expert's weights, the run boundaries given as a device
tensor of offsets. No expert count goes to the host, so there is no synchronisation, no per-expert Python loop and
no graph break under torch.compile. On CUDA sm90+ in bf16 that is one CUTLASS kernel; elsewhere (CPU, older GPUs)
PyTorch runs its own fallback, a loop of matmuls in C++. Where `_grouped_mm` cannot take the operands (fp32 under
torch.compile, whose shape rules accept bf16 only; a width that is not a multiple of 16 bytes; a PyTorch without
it) the experts run one after another in Python, on exactly the same rows: both paths compute the same thing.

Two more ways to run the same forward are options of it (`expert_impl`), not copies: "dense" runs every expert on
every token and lets the routing weights pick the mix, a static graph for tracing (ONNX export); and quantized
inference (`infer/quantize.py`) replaces each weight stack by one quantized layer per expert, which the loop calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fermion.config import ModelConfig

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class MoEFeedForward(nn.Module):
    # "auto": grouped matmul where it applies, else the loop; "grouped" / "loop" force one (tests, benchmarks);
    # "dense": every expert on every token (tracing for export).
    expert_impl = "auto"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        # Expert weights stacked [n_experts, in, out] so a grouped matmul can take them whole. Quantized inference
        # swaps each stack for an nn.ModuleList of one layer per expert ([in] -> [out], like the slices).
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
        if self.expert_impl == "dense":
            return self._dense(x, top_ids, top_weights).view(shape), aux_loss
        # Group the (token, slot) assignments by expert: row i of the grouped input is token token_of[i].
        flat_ids = top_ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of = order // self.top_k
        weights = top_weights.flatten()[order].unsqueeze(-1)  # fp32 [N*k, 1]
        stacked = isinstance(self.w_gate_up, torch.Tensor)  # else one quantized layer per expert: the loop
        dtype = self._compute_dtype(x) if stacked else None
        if stacked and self._use_grouped(dtype):
            offsets = self._counts(flat_ids).cumsum(0).to(torch.int32)
            rows = x[token_of].to(dtype)
            gate, up = torch._grouped_mm(rows, self.w_gate_up.to(dtype), offs=offsets).chunk(2, dim=-1)
            expert_out = torch._grouped_mm(F.silu(gate) * up, self.w_down.to(dtype), offs=offsets)
            out = torch.zeros_like(x).index_add_(0, token_of, (expert_out * weights).to(x.dtype))
            return out.view(shape), aux_loss
        # The same computation one expert at a time (the counts go to the host).
        counts = self._counts(flat_ids).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            gate, up = _expert_matmul(x[rows], self.w_gate_up[expert]).chunk(2, dim=-1)
            expert_out = _expert_matmul(F.silu(gate) * up, self.w_down[expert])
            out.index_add_(0, rows, (expert_out * weights[start : start + count]).to(x.dtype))
            start += count
        return out.view(shape), aux_loss

    def _counts(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Assignments per expert. A scatter-add into n_experts slots, not bincount: bincount's output shape depends
        on the data, which breaks a compiled graph in two (torch.compile without fullgraph)."""
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat_ids.device)
        return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))

    def _dense(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        # Grouping tokens by expert takes counts a graph with symbolic shapes cannot hold. Here every expert runs on
        # every token and the routing weights (zero for experts a token does not use) pick the mix: the same sum,
        # with n_experts / top_k times the feed-forward FLOPs and an [n_experts, tokens, hidden] activation.
        weights = torch.zeros(x.shape[0], self.n_experts, dtype=top_weights.dtype, device=x.device)
        weights = weights.scatter(1, top_ids, top_weights).T.unsqueeze(-1)  # [E, N, 1]
        gate, up = (x @ self.w_gate_up).chunk(2, dim=-1)  # [N, d] @ [E, d, 2h] -> [E, N, 2h]
        expert_out = (F.silu(gate) * up) @ self.w_down  # [E, N, d]
        # `where`, not a plain product: in fp16 an unused expert may overflow to inf, and 0 * inf would be NaN.
        return torch.where(weights > 0, expert_out * weights, 0.0).sum(dim=0).to(x.dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the expert matmuls run in: autocast's when it is on (as `@` would), else the weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.w_gate_up.dtype

    def _use_grouped(self, dtype: torch.dtype) -> bool:
        if self.expert_impl != "auto":
            return self.expert_impl == "grouped"
        if not _HAS_GROUPED_MM or dtype not in (torch.bfloat16, torch.float32):
            return False
        if dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return False  # the compiler's shape rules for _grouped_mm accept bf16 only (PyTorch 2.13)
        # Every row of every operand must start on a 16-byte boundary.
        alignment = 16 // torch.empty((), dtype=dtype).element_size()
        d_model, hidden = self.w_down.shape[2], self.w_down.shape[1]
        return d_model % alignment == 0 and hidden % alignment == 0


def _expert_matmul(x: torch.Tensor, weight: torch.Tensor | nn.Module) -> torch.Tensor:
    """x @ one expert's weight: a slice [in, out] of the float stack, or that expert's own (quantized) layer."""
    return x @ weight if isinstance(weight, torch.Tensor) else weight(x)
