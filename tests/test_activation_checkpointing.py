"""Activation checkpointing: "selective" and "full" give the same loss and gradients as "none" (dense and MoE,
eager and compiled) and keep less alive between forward and backward, full < selective < none."""

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import HANG, TINY, tiny_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fermion.device import can_compile

MODES = ("none", "selective", "full")


class LiveStorages(TorchDispatchMode):
    """Remembers every tensor storage an op creates while active; `live_bytes` adds up those still alive."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.created.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out

    def live_bytes(self) -> int:
        gc.collect()
        return sum(dict((ref.cdata, n) for ref, n in self.created if not ref.expired()).values())


def lm_loss(model, ids):
    logits, aux = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux


def batch(n=2, t=40):
    return torch.randint(0, TINY["vocab_size"], (n, t + 1), generator=torch.Generator().manual_seed(5))


def model_for(kind: str, aux_loss_coef: float = 0.01):
    extra = {"moe": {"n_experts": 4, "top_k": 2, "aux_loss_coef": aux_loss_coef}} if kind == "moe" else {}
    return tiny_model(**extra).train()


def loss_and_grads(model, mode, ids, loss_fn=lm_loss):
    model.set_activation_checkpointing(mode)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gradients_are_identical_in_every_mode(kind):
    model, ids = model_for(kind), batch()
    ref_loss, ref_grads = loss_and_grads(model, "none", ids)
    for mode in ("selective", "full"):
        loss, grads = loss_and_grads(model, mode, ids)
        torch.testing.assert_close(loss, ref_loss, atol=1e-7, rtol=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-7, rtol=1e-6, msg=f"{mode} {name}")


def test_packed_documents_and_no_grad_forwards():
    model, ids = model_for("dense"), batch()
    positions = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)
    segments = torch.cat([torch.zeros(15, dtype=torch.long), torch.ones(25, dtype=torch.long)]).repeat(2, 1)

    def packed(m, x):
        logits, aux = m(x[:, :-1], positions, segments)
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + aux

    ref_loss, ref_grads = loss_and_grads(model, "none", ids, packed)
    for mode in ("selective", "full"):
        loss, grads = loss_and_grads(model, mode, ids, packed)
        torch.testing.assert_close(loss, ref_loss, atol=1e-7, rtol=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-7, rtol=1e-6)
        with torch.no_grad():  # evaluation and generation never checkpoint
            torch.testing.assert_close(packed(model, ids), ref_loss)
    with pytest.raises(ValueError, match="not one of"):
        model.set_activation_checkpointing("some")


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_memory_kept_for_backward_shrinks_none_selective_full(kind):
    model, ids = model_for(kind), batch(4, 40)
    kept = {}
    for mode in MODES:
        model.set_activation_checkpointing(mode)
        with LiveStorages() as tracker:
            loss = lm_loss(model, ids)
        kept[mode] = tracker.live_bytes()
        loss.backward()
        model.zero_grad(set_to_none=True)
        del loss
    B, T, d, n_layers = 4, 40, TINY["d_model"], TINY["n_layers"]
    residual = B * T * d * 4  # one fp32 [B, T, d_model]
    assert kept["full"] < kept["selective"] < kept["none"]
    # What the blocks keep: full 1 residual-stream tensor per block, selective 2 (the rest is the output layer's
    # and the loss's: logits, log-softmax, the final norm, the embedding output).
    assert kept["selective"] - kept["full"] == n_layers * residual
    assert kept["none"] - kept["selective"] > 2 * n_layers * residual


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile on CPU")
@pytest.mark.parametrize("kind, mode", [("dense", "selective"), ("moe", "full")])  # each compile costs ~30 s
def test_compiled_loss_with_checkpointing_matches_eager(kind, mode):
    model, ids = model_for(kind), batch()
    ref_loss, ref_grads = loss_and_grads(model, "none", ids)
    torch._dynamo.reset()
    loss, grads = loss_and_grads(model, mode, ids, torch.compile(lm_loss))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{mode} {name}")


def _fsdp_worker(kind: str, mode: str, precision: str) -> None:
    """Under torchrun: FSDP2 per-block (bf16 mixed precision when asked) with checkpointing and the chunked loss;
    rank 0 compares the gathered gradients with one process, no checkpointing, full logits."""
    import torch.distributed as dist

    from fermion.device import setup, teardown
    from fermion.train.distributed import wrap
    from fermion.train.objectives import Pretrain

    info = setup("cpu")
    # Without the load-balancing loss: it is not a mean over tokens, so data parallelism changes it (each rank
    # balances its own tokens), FSDP or not.
    model, ref, ref_amp = (model_for(kind, aux_loss_coef=0.0) for _ in range(3))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(
        residual=args[0].dtype, weight=m.attn.wqkv.weight.dtype))
    model.set_activation_checkpointing(mode)
    wrap(model, "fsdp", info, precision)
    ids = batch(4, 40)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    half = slice(2 * info.rank, 2 * info.rank + 2)
    token_bytes = torch.ones(TINY["vocab_size"], dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = Pretrain(token_bytes, "chunked", chunk_tokens=24).loss(model, (inputs[half], targets[half]))
        Pretrain(token_bytes).loss(ref_amp, (inputs, targets))[0].backward()
    loss.backward()
    Pretrain(token_bytes).loss(ref, (inputs, targets))[0].backward()  # fp32, one process
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if info.rank == 0:
        expected = (torch.bfloat16, torch.float32) if precision == "bf16" else (torch.float32, torch.float32)
        assert (seen["weight"], seen["residual"]) == expected, seen
        amp_grads = dict(ref_amp.named_parameters())
        for name, p in ref.named_parameters():
            error = ((grads[name] - p.grad).norm() / p.grad.norm()).item()
            # bf16: no further from fp32 than bf16 autocast in one process is
            amp_error = ((amp_grads[name].grad - p.grad).norm() / p.grad.norm()).item()
            assert error < (2 * amp_error + 1e-2 if precision == "bf16" else 1e-5), (name, error, amp_error)
        print("FSDP-OK")
    dist.barrier()
    teardown(info)


@pytest.mark.slow
@pytest.mark.parametrize("kind,mode,precision", [("dense", "selective", "fp32"), ("moe", "full", "bf16")])
def test_fsdp2_with_checkpointing_mixed_precision_and_chunked_loss(kind, mode, precision):
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(here),
           kind, mode, precision]
    result = subprocess.run(cmd, cwd=here.parents[1], capture_output=True, text=True, timeout=HANG,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "FSDP-OK" in result.stdout, result.stderr[-3000:]


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    _fsdp_worker(*sys.argv[1:4])
