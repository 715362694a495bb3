"""FlexAttention (`Transformer.set_attention("flex")`) against SDPA with a dense mask.

Packed documents and sliding windows shorter than the sequence run through FlexAttention with a BlockMask; the
outputs must match the SDPA path's. FlexAttention has no backward on CPU, so on CPU the comparison is of forwards
(the compiled CPU kernels); gradients are compared where CUDA is present.
"""

import pytest
import torch
from conftest import tiny_model

from fermion.config import recipe_from_dict
from fermion.device import DistInfo, resolve_attention
from fermion.model import attention, transformer
from fermion.model.attention import flex_block_mask
from fermion.train.objectives import Pretrain
from fermion.train.trainer import Trainer

B, T = 2, 40  # one shape for every case, so each mask pattern compiles once
DOCS = [(15, 25), (7, 20, 13)]  # per row: document lengths, filling the row


def packed_batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (B, T), generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    segments = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in DOCS])
    return ids.to(device), positions.to(device), segments.to(device)


def outputs(model, mode, ids, positions=None, segments=None):
    model.set_attention(mode)
    try:
        return model(ids, positions, segments)[0]
    finally:
        model.set_attention("sdpa")


CASES = {
    "packed": (dict(), True),
    "window": (dict(sliding_window=12), False),
    "packed+window": (dict(sliding_window=12), True),
    "packed+window>=T": (dict(sliding_window=T), True),
}  # tiny_model has 4 query heads and 2 K/V heads: every case runs grouped-query attention


@pytest.fixture(params=["native", "avx2"])
def cpu_kernels(request):
    """The CPU FlexAttention kernel generated for this CPU's vectors, and for 256-bit (AVX2) ones: what every x86
    CPU without AVX512 runs, where PyTorch 2.13's kernel is wrong for head sizes 8 and 16 (see model/attention.py)."""
    if request.param == "native":
        yield
        return
    if not torch.cpu._is_avx2_supported():
        pytest.skip("this CPU has no AVX2")
    torch._dynamo.reset()  # compiled FlexAttention kernels are cached per process: build them again
    with torch._inductor.config.patch({"cpp.simdlen": 256}):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("head_dim", [8, 16, 32])
def test_flex_kernel_matches_sdpa_where_the_keys_end_in_a_block_of_eight(cpu_kernels, head_dim):
    # The minimal reproduction of PyTorch 2.13's AVX2 kernel fault: 24 keys (a 16-wide block and a tail of 8).
    # What the faulty branch reads past the tail is made large, so that using it cannot go unnoticed.
    g = torch.Generator().manual_seed(0)
    T = 24
    q = torch.randn(1, 2, T, head_dim, generator=g)
    k, v = (torch.cat([torch.randn(1, 2, T, head_dim, generator=g), torch.full((1, 2, 16, head_dim), 1e4)], 2)[:, :, :T]
            for _ in range(2))
    with torch.no_grad():
        got = attention.flex(q, k, v, flex_block_mask(T))
    torch.testing.assert_close(got, attention.sdpa(q, k, v, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_flex_forward_matches_sdpa_with_a_dense_mask(cpu_kernels, case):
    overrides, packed = CASES[case]
    model = tiny_model(**overrides)
    assert model.cfg.kv_heads < model.cfg.n_heads
    ids, positions, segments = packed_batch()
    if not packed:
        positions = segments = None
    with torch.no_grad():
        expected = outputs(model, "sdpa", ids, positions, segments)
        got = outputs(model, "flex", ids, positions, segments)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flex_path_is_taken_only_where_a_mask_is_needed(monkeypatch):
    calls = []
    real = transformer.flex
    monkeypatch.setattr(transformer, "flex", lambda *a: calls.append(a[3]) or real(*a))
    ids, positions, segments = packed_batch()
    with torch.no_grad():
        outputs(tiny_model(sliding_window=T), "flex", ids)  # causal only: SDPA's causal kernel
        assert not calls
        outputs(tiny_model(sliding_window=12), "flex", ids)  # window shorter than T: one mask for the batch
        assert len(calls) == 2 and calls[0].shape[0] == 1
        outputs(tiny_model(), "flex", ids, positions, segments)  # one mask per row
        assert len(calls) == 4 and calls[2].shape[0] == B


def test_block_mask_allows_what_the_dense_mask_allows():
    _, _, segments = packed_batch()
    for window in (None, 12):
        block_mask = flex_block_mask(T, segments, window)
        dense = attention.document_mask(segments, window)
        b, q, kv = torch.meshgrid(torch.arange(B), torch.arange(T), torch.arange(T), indexing="ij")
        allowed = block_mask.mask_mod(b, torch.zeros_like(b), q, kv)
        assert torch.equal(allowed, dense[:, 0])
    sliding = flex_block_mask(T, window=12)
    q, kv = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    zero = torch.zeros_like(q)
    assert torch.equal(sliding.mask_mod(zero, zero, q, kv), attention.sliding_window_mask(T, 12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
@pytest.mark.parametrize("case", CASES)
def test_flex_gradients_match_sdpa_on_cuda(case):
    overrides, packed = CASES[case]
    model = tiny_model(**overrides).cuda().train()
    ids, positions, segments = packed_batch("cuda")
    if not packed:
        positions = segments = None
    grads = {}
    for mode in ("sdpa", "flex"):
        model.zero_grad()
        out = outputs(model, mode, ids, positions, segments)
        out.square().mean().backward()
        grads[mode] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, grad in grads["sdpa"][1].items():
        torch.testing.assert_close(grads["flex"][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_flex_has_no_backward_on_cpu():
    model = tiny_model().train()
    model.set_attention("flex")
    ids, positions, segments = packed_batch()
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        model(ids, positions, segments)


def test_resolve_attention():
    assert resolve_attention("auto", torch.device("cuda")) == "flex"
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("flex", torch.device("cuda")) == "flex"
    assert resolve_attention("sdpa", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_attention("flex", torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        tiny_model().set_attention("flash")


def build_trainer(tmp_path, attention: str, model=None):
    recipe = recipe_from_dict({"run": {"dir": str(tmp_path / "run")},
                               "model": dict(vocab_size=97, d_model=64, n_layers=1, n_heads=4, ffn_hidden=96,
                                             context_length=32),
                               "data": {"sources": [{"name": "unused", "paths": ["unused.txt"]}]},
                               "train": dict(steps=2, warmup_steps=0, compile=False, tensorboard=False,
                                             progress=False, device="cpu", attention=attention)}, check_paths=False)
    model = model or transformer.Transformer(recipe.model)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(recipe, model, Pretrain(torch.ones(97)), [], [], info, tokenizer_path=tmp_path / "tok.json")


def test_trainer_applies_train_attention(tmp_path, monkeypatch):
    for setting in ("auto", "sdpa"):
        assert build_trainer(tmp_path, setting).raw_model.attention == "sdpa"
    with pytest.raises(ValueError, match="needs a GPU"):
        build_trainer(tmp_path, "flex")
    # As on a GPU, where auto and flex resolve to flex.
    monkeypatch.setattr("fermion.train.distributed.resolve_attention", lambda setting, device: "flex")
    assert build_trainer(tmp_path, "auto").raw_model.attention == "flex"


@pytest.mark.parametrize("d_model", [64, 128])  # head sizes 16 (zero-padded to 24 on a CPU) and 32 (not padded)
def test_flex_inside_a_compiled_block(cpu_kernels, d_model):
    # Under FSDP2 each block is compiled on its own and receives the BlockMask; flex_attention is then traced into
    # the block's graph (with q/k/v made contiguous: PyTorch 2.13's CPU kernel got GQA wrong on transposed views,
    # 0.9 off at head size 32 without the copies).
    model = tiny_model(n_layers=1, sliding_window=12, d_model=d_model)
    ids, positions, segments = packed_batch()
    with torch.no_grad():
        expected = outputs(model, "sdpa", ids, positions, segments)
        model.blocks[0].compile()
        got = outputs(model, "flex", ids, positions, segments)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
