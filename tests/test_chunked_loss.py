"""Chunked cross-entropy: the same losses and gradients as the full-logits path for pretraining (plain and packed,
dense and MoE with its auxiliary loss), SFT with ignored targets and DPO log-probabilities, without ever holding
[tokens, vocab] logits; and under torch.compile."""

import copy

import pytest
import torch
from conftest import TINY, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fermion.device import can_compile, resolve_cross_entropy
from fermion.train.objectives import DPO, IGNORE_INDEX, SFT, Pretrain, sequence_logps

V = TINY["vocab_size"]
TOKEN_BYTES = torch.ones(V, dtype=torch.long)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op creates while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def pretrain_batch(n=3, t=30, ignore=False):
    ids = torch.randint(0, V, (n, t + 1), generator=torch.Generator().manual_seed(7))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    if ignore:  # SFT: only "assistant" spans count, one row with none at all
        targets[:, :10] = IGNORE_INDEX
        targets[1] = IGNORE_INDEX
    return inputs, targets


def run(objective, model, batch):
    model.zero_grad(set_to_none=True)
    loss, metrics = objective.loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def assert_same(a, b, tol=1e-5):
    loss_a, metrics_a, grads_a = a
    loss_b, metrics_b, grads_b = b
    torch.testing.assert_close(loss_b, loss_a, atol=tol, rtol=tol)
    for name in metrics_a:
        torch.testing.assert_close(metrics_b[name], metrics_a[name], atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=tol, rtol=tol, msg=name)


MODELS = [
    pytest.param({}, id="untied"),
    pytest.param({"tie_embeddings": True}, id="tied"),
    pytest.param({"moe": {"n_experts": 4, "top_k": 2}}, id="moe"),
]


@pytest.mark.parametrize("overrides", MODELS)
@pytest.mark.parametrize("objective_class", [Pretrain, SFT])
def test_chunked_matches_full(objective_class, overrides):
    model = tiny_model(**overrides).train()
    batch = pretrain_batch(ignore=objective_class is SFT)
    full = run(objective_class(TOKEN_BYTES), model, batch)
    for chunk in (7, 90, 4096):  # uneven chunks, exactly one row, everything in one chunk
        chunked = objective_class(TOKEN_BYTES, cross_entropy="chunked", chunk_tokens=chunk)
        assert_same(full, run(chunked, model, batch))
        with torch.no_grad():
            torch.testing.assert_close(chunked.eval_sums(model, batch), objective_class(TOKEN_BYTES).eval_sums(
                model, batch), atol=1e-4, rtol=1e-6)
    if "moe" in overrides:
        assert full[1]["aux"] > 0


def test_packed_batches():
    model = tiny_model().train()
    inputs, targets = pretrain_batch(2, 30)
    positions = torch.cat([torch.arange(12), torch.arange(18)]).repeat(2, 1)
    segments = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(18, dtype=torch.long)]).repeat(2, 1)
    batch = (inputs, targets, positions, segments)
    assert_same(run(Pretrain(TOKEN_BYTES), model, batch),
                run(Pretrain(TOKEN_BYTES, cross_entropy="chunked", chunk_tokens=11), model, batch))


def dpo_batch():
    inputs, targets = pretrain_batch(4, 24)
    targets[:, :8] = IGNORE_INDEX
    targets[0, 20:] = IGNORE_INDEX  # a shorter reply, right-padded
    return inputs, targets, torch.tensor([-50.0, -60.0, -55.0, -52.0])


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.5)])
def test_dpo_chunked_matches_full(loss_type, sft_weight):
    model = tiny_model(moe={"n_experts": 4, "top_k": 1}).train()
    batch = dpo_batch()
    logps, aux = sequence_logps(model, batch[0], batch[1])
    chunked_logps, chunked_aux = sequence_logps(model, batch[0], batch[1], "chunked", chunk_tokens=13)
    torch.testing.assert_close(chunked_logps, logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(chunked_aux, aux)
    full = run(DPO(0.1, loss_type, sft_weight=sft_weight), model, batch)
    assert_same(full, run(DPO(0.1, loss_type, sft_weight=sft_weight, cross_entropy="chunked", chunk_tokens=13),
                          model, batch))
    # With a frozen reference model scoring each batch itself.
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference.tok_emb.weight.mul_(0.9)
    full = run(DPO(0.1, loss_type, reference, sft_weight), model, batch)
    chunked = DPO(0.1, loss_type, reference, sft_weight, cross_entropy="chunked", chunk_tokens=13)
    assert_same(full, run(chunked, model, batch))
    with torch.no_grad():
        torch.testing.assert_close(chunked.eval_sums(model, batch), DPO(0.1, loss_type, reference, sft_weight)
                                   .eval_sums(model, batch), atol=1e-4, rtol=1e-5)


def test_no_tensor_holds_tokens_times_vocab():
    vocab = 2048  # so that the logits dwarf every other activation, as in real models
    model = tiny_model(vocab_size=vocab).train()
    batch = tuple(t * 19 % vocab for t in pretrain_batch(4, 40))
    tokens = batch[1].numel()
    sizes = {}
    for mode in ("full", "chunked"):
        objective = Pretrain(TOKEN_BYTES, cross_entropy=mode, chunk_tokens=16)
        with LargestTensor() as tracker:
            loss, _ = objective.loss(model, batch)
            loss.backward()
        sizes[mode] = tracker.largest
    assert sizes["full"] >= tokens * vocab  # the measurement sees the full logits when there are any
    assert sizes["chunked"] < tokens * vocab
    assert sizes["chunked"] <= max(16 * vocab, max(p.numel() for p in model.parameters()))


def test_auto_and_bad_settings():
    assert resolve_cross_entropy("auto", torch.device("cpu")) == "full"
    assert resolve_cross_entropy("auto", torch.device("cuda", 0)) == "chunked"
    assert resolve_cross_entropy("chunked", torch.device("cpu")) == "chunked"
    with pytest.raises(ValueError):
        Pretrain(TOKEN_BYTES, cross_entropy="auto")
    with pytest.raises(ValueError):
        Pretrain(TOKEN_BYTES, cross_entropy="chunked", chunk_tokens=0)


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile on CPU")
def test_compiled_chunked_loss_matches_eager_full():
    model = tiny_model().train()
    batch = pretrain_batch(ignore=True)
    full = run(SFT(TOKEN_BYTES), model, batch)
    chunked = SFT(TOKEN_BYTES, cross_entropy="chunked", chunk_tokens=32)
    torch._dynamo.reset()
    chunked.loss = torch.compile(chunked.loss)  # as the trainer compiles objective.loss
    assert_same(full, run(chunked, model, batch))


@pytest.mark.parametrize("cross_entropy", ["full", "chunked"])
def test_output_layer_only_at_targets_gives_the_loss_and_gradients_of_every_position(cross_entropy, monkeypatch):
    """SFT's loss, gradients and per-token log-probs with the output layer run only where a target is equal those
    with it run everywhere; the logits it computes are for the targets' positions only."""
    from fermion.train.objectives import token_logps

    model, batch = tiny_model().train(), pretrain_batch(ignore=True)
    everywhere = SFT(TOKEN_BYTES, cross_entropy=cross_entropy, chunk_tokens=13)
    everywhere.only_targets = False
    only = SFT(TOKEN_BYTES, cross_entropy=cross_entropy, chunk_tokens=13)
    assert only.only_targets and not Pretrain(TOKEN_BYTES).only_targets
    rows = []
    real_logits = type(model).logits
    monkeypatch.setattr(type(model), "logits", lambda self, hidden: rows.append(hidden.shape[0])
                        or real_logits(self, hidden))
    expected = run(everywhere, model, batch)
    rows.clear()
    assert_same(expected, run(only, model, batch), tol=1e-6)
    counted = int((batch[1] != IGNORE_INDEX).sum())
    assert counted < batch[1].numel()
    # Chunked: each chunk's logits once in forward and again in backward (recomputed under checkpointing).
    assert sum(rows) == (2 * counted if cross_entropy == "chunked" else counted)
    assert max(rows) <= (13 if cross_entropy == "chunked" else counted)
    rows.clear()
    with torch.no_grad():
        logps, _ = token_logps(model, *batch, temperature=0.7, cross_entropy=cross_entropy, chunk_tokens=13)
    assert sum(rows) == counted  # no logits for a position without a target
    logits = model(batch[0])[0].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, batch[1].clamp(min=0)[..., None])[..., 0]
    expected = torch.where(batch[1] == IGNORE_INDEX, 0.0, expected)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
