"""The model against real peers: Hugging Face Llama, Mistral, Qwen3 and Mixtral given the same weights must produce
the same logits. Plus causality, the sliding window, MoE routing, and exact counting."""

import pytest
import torch
import transformers

from fermion.config import ModelConfig
from fermion.model.counting import count
from fermion.model.moe import MoEFeedForward
from fermion.model.transformer import Transformer

TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=48,
            rope_theta=5000.0, tie_embeddings=False)


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm mapping would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def hf_state_dict(model: Transformer) -> dict:
    """Our weights under Hugging Face Llama-family names (fused projections split)."""
    cfg = model.cfg
    q_size, kv_size = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.output_weight()}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.wqkv.weight.split([q_size, kv_size, kv_size])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.attn.wo.weight,
                    p + "input_layernorm.weight": block.attn_norm.weight,
                    p + "post_attention_layernorm.weight": block.ffn_norm.weight})
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
        if cfg.moe:
            out[p + "mlp.gate.weight"] = block.ffn.router.weight
            out[p + "mlp.experts.gate_up_proj"] = block.ffn.w_gate_up.transpose(1, 2)
            out[p + "mlp.experts.down_proj"] = block.ffn.w_down.transpose(1, 2)
        else:
            gate, up = block.ffn.w_gate_up.weight.chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                        p + "mlp.down_proj.weight": block.ffn.w_down.weight})
    return {k: v.detach().clone() for k, v in out.items()}


def hf_model(model: Transformer, family: str):
    cfg = model.cfg
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.dim_per_head, max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=False, attn_implementation="eager")
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common)
    elif family == "mistral":
        hf_cfg = transformers.MistralConfig(**common, sliding_window=cfg.sliding_window)
    elif family == "qwen3":
        hf_cfg = transformers.Qwen3Config(**common)
    else:
        hf_cfg = transformers.MixtralConfig(**common, num_local_experts=cfg.moe.n_experts,
                                            num_experts_per_tok=cfg.moe.top_k)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("llama", {"n_kv_heads": 4}), ("mistral", {"sliding_window": 8}), ("qwen3", {"qk_norm": True}),
     ("mixtral", {"moe": {"n_experts": 4, "top_k": 2}})],
)
def test_logits_match_transformers(family, overrides):
    model = build(**overrides)
    hf = hf_model(model, family)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


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
