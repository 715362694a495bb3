"""The model on its own: causality, the sliding window, MoE routing, and exact counting. Its agreement with real
peers (transformers' Llama, Mistral, Qwen3, Mixtral, Qwen3-MoE; llama.cpp; ONNX Runtime) is tested through the
exports, in tests/test_export_*.py."""

import pytest
import torch
from conftest import TINY, tiny_model

from fermion.config import ModelConfig
from fermion.model.counting import count
from fermion.model.moe import MoEFeedForward
from fermion.model.transformer import Transformer

build = tiny_model


def test_causal_and_sliding_window():
    model = build(sliding_window=4)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[0, :12], b[0, :12])  # the future never leaks into the past
    assert not torch.allclose(a[0, 12:16], b[0, 12:16])  # inside the window it matters
    # Two layers of a 4-token window reach back at most 2 * 3 = 6 positions; position 19 is 7 past the change.
    torch.testing.assert_close(a[0, 19], b[0, 19])


def test_moe_routes_every_token_to_its_top_k_experts():
    cfg = ModelConfig(**{**TINY, "moe": {"n_experts": 4, "top_k": 2}})
    torch.manual_seed(3)
    moe = MoEFeedForward(cfg)
    torch.nn.init.normal_(moe.w_gate_up, std=0.1)
    torch.nn.init.normal_(moe.w_down, std=0.1)
    x = torch.randn(30, cfg.d_model)
    out, aux = moe(x)
    # Dense reference: every expert on every token, weighted by the renormalised top-2 softmax (zero elsewhere).
    probs = moe.router(x).softmax(-1)
    top, ids = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, ids, top / top.sum(-1, keepdim=True))
    expected = torch.zeros_like(x)
    for e in range(4):
        gate, up = (x @ moe.w_gate_up[e]).chunk(2, dim=-1)
        expected += weights[:, e : e + 1] * ((torch.nn.functional.silu(gate) * up) @ moe.w_down[e])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert aux.item() > 0


def test_load_balancing_loss_is_one_when_balanced():
    cfg = ModelConfig(**{**TINY, "moe": {"n_experts": 4, "top_k": 1, "aux_loss_coef": 1.0, "z_loss_coef": 0.0}})
    moe = MoEFeedForward(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[torch.arange(4), torch.arange(4)] = 10.0
    x = torch.zeros(8, cfg.d_model)
    x[torch.arange(8), torch.arange(8) % 4] = 1.0  # two tokens per expert, each routed with near certainty
    _, _, aux = moe.route(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-3)


def test_counts_match_allocated_model_and_formula():
    cfg = ModelConfig(**TINY)
    model = Transformer(cfg)
    counts = count(cfg)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    d, f, L, V, kv = cfg.d_model, cfg.ffn_hidden, cfg.n_layers, cfg.vocab_size, cfg.kv_heads * cfg.dim_per_head
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    assert counts.total_params == 2 * V * d + L * per_layer + d
    matmul = L * (per_layer - 2 * d) + V * d  # output head counted, input lookup not
    attention = 2 * L * cfg.n_heads * cfg.dim_per_head * cfg.context_length
    assert counts.train_flops_per_token == 6 * matmul + 6 * attention


def test_moe_active_parameters():
    cfg = ModelConfig(**{**TINY, "moe": {"n_experts": 8, "top_k": 2}})
    counts = count(cfg)
    experts = cfg.n_layers * 8 * 3 * cfg.d_model * cfg.ffn_hidden
    assert counts.active_params == counts.total_params - experts * 6 // 8


def test_tied_embeddings_share_one_table():
    model = build(tie_embeddings=True)
    assert model.lm_head is None and model.output_weight() is model.tok_emb.weight
    assert count(model.cfg).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("window", [None, 40])
def test_masked_attention_by_query_block_equals_one_call_and_skips_what_no_query_sees(window, monkeypatch):
    """On CPU a masked SDPA runs QUERY_BLOCK queries at a time over only the keys they may see: the same outputs
    and gradients as one call with the whole mask, from far fewer query-key pairs on packed rows."""
    import torch.nn.functional as F

    from fermion.model import attention

    g = torch.Generator().manual_seed(0)
    T = 4 * attention.QUERY_BLOCK + 7  # a last, partial block
    lengths = [[150, 60, 40, T - 250], [100, 90, T - 190]]
    segments = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in lengths])
    mask = attention.document_mask(segments, window)
    q = torch.randn(2, 4, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 16, generator=g, requires_grad=True) for _ in range(2))
    pairs = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q_, k_, v_, **kw: pairs.append(
        q_.shape[2] * k_.shape[2]) or real(q_, k_, v_, **kw))
    got = attention.sdpa(q, k, v, mask)
    assert len(pairs) == 5 and sum(pairs) < 0.55 * T * T  # causality alone would leave 62%
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected = real(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
