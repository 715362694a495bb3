"""The MoE experts as grouped matmuls (torch._grouped_mm) agree with the per-expert loop they replaced: outputs and
gradients, top-1 and top-2, unbalanced routing, experts that receive no token, fp32 and bf16 autocast, and under
torch.compile without a graph break."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from fermion.config import ModelConfig
from fermion.device import can_compile
from fermion.model.moe import MoEFeedForward


def loop_forward(moe: MoEFeedForward, x: torch.Tensor):
    """The implementation before grouped matmuls, verbatim: one Python iteration per expert."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    top_ids, top_weights, aux_loss = moe.route(x)
    order = top_ids.flatten().argsort(stable=True)
    token_of = order // moe.top_k
    counts = torch.bincount(top_ids.flatten(), minlength=moe.n_experts).tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        gate, up = (x[rows] @ moe.w_gate_up[expert]).chunk(2, dim=-1)
        expert_out = (F.silu(gate) * up) @ moe.w_down[expert]
        weight = top_weights.flatten()[order[start : start + count]].unsqueeze(-1)
        out.index_add_(0, rows, (expert_out * weight).to(x.dtype))
        start += count
    return out.view(shape), aux_loss


def make_moe(top_k: int, n_experts: int = 4, skew: float = 0.0, dead_expert: int | None = None) -> MoEFeedForward:
    cfg = ModelConfig(**{**TINY, "moe": {"n_experts": n_experts, "top_k": top_k}})
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(moe.w_gate_up, std=0.1)
        torch.nn.init.normal_(moe.w_down, std=0.1)
        moe.router.weight[0] += skew  # expert 0 takes most tokens when skewed
        if dead_expert is not None:  # with feature 0 of every input set to 1 (see inputs), never in a top-k
            moe.router.weight[dead_expert, 0] = -100.0
    return moe


def outputs_and_grads(moe, x, forward, amp=False):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out, aux = forward(x)
    (out.float().sin().sum() + aux).backward()
    return [out.detach(), aux.detach(), x.grad] + [p.grad for p in moe.parameters()]


def assert_close_bf16(got, expected):
    """bf16 results agree to bf16 precision: elementwise within a few ulps, and the whole tensor to 1%."""
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
    assert (got.float() - expected.float()).norm() <= 1e-2 * expected.float().norm() + 1e-6


CASES = [
    pytest.param(dict(top_k=1), id="top1"),
    pytest.param(dict(top_k=2), id="top2"),
    pytest.param(dict(top_k=2, skew=3.0), id="top2-unbalanced"),
    pytest.param(dict(top_k=1, n_experts=6, dead_expert=3), id="top1-expert-without-tokens"),
    pytest.param(dict(top_k=2, n_experts=6, dead_expert=5), id="top2-expert-without-tokens"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_grouped_matches_the_loop(case, amp):
    moe = make_moe(**case)
    x = torch.randn(2, 37, TINY["d_model"], generator=torch.Generator().manual_seed(1))
    x[..., 0] = 1.0
    if case.get("dead_expert") is not None:
        with torch.no_grad():
            ids, _, _ = moe.route(x.reshape(-1, x.shape[-1]))
        assert not (ids == case["dead_expert"]).any()
    assert moe._use_grouped(torch.bfloat16 if amp else torch.float32)
    expected = outputs_and_grads(moe, x, lambda t: loop_forward(moe, t), amp)
    got = outputs_and_grads(moe, x, moe, amp)
    for a, b in zip(expected, got, strict=True):
        if amp:  # bf16 matmuls, same rows and operands; PyTorch's fallback may block the sums differently
            assert_close_bf16(b, a)
        else:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_the_loop_fallback_is_the_same_computation():
    moe = make_moe(top_k=2, skew=2.0)
    x = torch.randn(50, TINY["d_model"], generator=torch.Generator().manual_seed(2))
    expected = outputs_and_grads(moe, x, lambda t: loop_forward(moe, t))
    moe.expert_impl = "loop"
    for a, b in zip(expected, outputs_and_grads(moe, x, moe), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_widths_not_on_16_bytes_fall_back_to_the_loop():
    cfg = ModelConfig(**{**TINY, "ffn_hidden": 36, "moe": {"n_experts": 3, "top_k": 2}})
    moe = MoEFeedForward(cfg)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    assert not moe._use_grouped(torch.bfloat16) and moe._use_grouped(torch.float32)
    x = torch.randn(9, TINY["d_model"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(x)
        ref, _ = loop_forward(moe, x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_any_token_count_including_one_and_none():
    moe = make_moe(top_k=2)
    with torch.no_grad():
        for n in (0, 1, 3):
            x = torch.randn(n, TINY["d_model"])
            out, _ = moe(x)
            ref, _ = loop_forward(moe, x)
            assert out.shape == (n, TINY["d_model"])
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile on CPU")
def test_compiles_without_a_graph_break_in_bf16():
    moe = make_moe(top_k=2, skew=1.0)
    x = torch.randn(40, TINY["d_model"], generator=torch.Generator().manual_seed(3))
    expected = outputs_and_grads(moe, x, moe, amp=True)
    compiled = torch.compile(moe, fullgraph=True)  # fullgraph: a host sync or data-dependent loop would fail
    got = outputs_and_grads(moe, x, compiled, amp=True)
    for a, b in zip(expected, got, strict=True):
        assert_close_bf16(b, a)


def test_the_grouped_path_traces_as_one_graph():
    """As the trainer compiles it (no fullgraph): counting tokens per expert must not split the graph."""
    moe = make_moe(top_k=2, skew=1.0)
    x = torch.randn(40, TINY["d_model"], generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(moe)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
