"""Muon for the hidden matrices, AdamW for the rest, as one torch optimizer.

Muon (Jordan et al., 2024; the optimizer of the modded-nanogpt and nanochat speedruns) replaces each hidden weight
matrix's update by the nearest semi-orthogonal matrix to its Nesterov momentum: every singular value of the update
is pushed to about 1, so no direction of the matrix dominates the step. The orthogonalisation is the quintic
Newton-Schulz iteration the published implementations use (five steps of X <- aX + (bA + cA^2)X with A = XX^T and
(a, b, c) = (3.4445, -4.7750, 2.0315), chosen to raise small singular values fast; it converges to singular values
in roughly [0.7, 1.2], not exactly 1, which training does not mind).

The update is scaled by 0.2 * sqrt(max(rows, cols)) (Liu et al., "Muon is Scalable for LLM Training", 2025): an
orthogonal m x n matrix has RMS 1/sqrt(max(m, n)), so the scaled update has the RMS of a typical AdamW update
(about 0.2) whatever the matrix's shape. That makes the learning rate transfer across shapes and lets Muon take
AdamW's learning rate and decoupled weight decay; `train.muon_lr` sets its own when the two should differ.

Which parameters: every matrix inside the transformer blocks (attention and feed-forward projections; a
mixture-of-experts layer's stacked [experts, in, out] weights are orthogonalised expert by expert). The token
embedding, the output head, the norms and the MoE router (a classifier over experts, like the output head) take
AdamW, as in the published recipes: their rows are looked up or compared one by one, not mixed as a whole.

Distributed: under DDP every process holds the whole (already averaged) gradient, so each computes the same
update. Under FSDP2 a parameter is a DTensor sharded by rows; the orthogonalisation needs the whole matrix, so the
momentum-corrected gradient is all-gathered, every process orthogonalises it (the same arithmetic on the same
numbers) and keeps its own rows. That spends world-size times the Newton-Schulz compute (small beside the forward
and backward passes at the sizes this project trains) for one all-gather per matrix, and it keeps the state sharded
and identical in layout to AdamW's, so checkpoints, exact resume and resharding need nothing new.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
RMS_MATCH = 0.2  # the update RMS of AdamW that Muon's scaled update matches


def orthogonalise(update: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The quintic Newton-Schulz iteration on the last two dimensions (a stack of matrices is done matrix by
    matrix): a matrix with the same singular vectors and singular values near 1. In `dtype`; None: bf16 on CUDA (as
    published: the iteration is robust to it), fp32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    dtype = dtype or (torch.bfloat16 if update.is_cuda else torch.float32)
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this process's shard of it for a DTensor (every process holds the same
    `full`, so each slices its own rows without communicating)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """One optimizer over two kinds of parameter group: `{"muon": True}` groups get Muon (momentum, nesterov,
    weight_decay), the others AdamW (betas, eps, weight_decay), each with its own lr. Every group may carry
    `lr_scale`, the ratio of its learning rate to the schedule's (the trainer sets lr = schedule x lr_scale).
    `ns_dtype`: what the orthogonalisation computes in (see `orthogonalise`); the trainer passes bf16 when it trains
    in bf16, which on a CPU with native bf16 halves its cost (at 384 wide, five iterations on one thread: 101 ms
    in fp32, 41 ms in bf16; beside a 2,048-token step of a 10M model it was a third of the step in fp32)."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True, weight_decay: float = 0.0,
                 fused: bool | None = None, ns_dtype: torch.dtype | None = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum {momentum} must be in [0, 1)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "momentum": momentum, "nesterov": nesterov,
                    "weight_decay": weight_decay, "muon": False, "lr_scale": 1.0}
        for group in groups:
            if group.get("muon"):
                bad = [tuple(p.shape) for p in group["params"] if p.ndim not in (2, 3)]
                if bad:
                    raise ValueError(f"Muon takes matrices (or stacks of them); got shapes {bad}")
        self._fused, self._ns_dtype = fused, ns_dtype
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = param.grad
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buffer = state["momentum_buffer"]
            buffer.mul_(mu).add_(grad)
            update = grad.add(buffer, alpha=mu) if group["nesterov"] else buffer
            full = _full(update)
            scale = RMS_MATCH * max(full.size(-2), full.size(-1)) ** 0.5
            direction = _like(orthogonalise(full, dtype=self._ns_dtype) * scale, param)
            if wd:
                param.mul_(1 - lr * wd)
            param.add_(direction, alpha=-lr)

    def _adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:  # the layout torch.optim.AdamW uses, so its state reads the same
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=param.device) if self._fused \
                    else torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=self._fused or None,
              foreach=None if self._fused else True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
