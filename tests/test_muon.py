"""Muon (train/muon.py): its update is orthogonal (singular values near 1) and scaled to AdamW's RMS whatever the
shape; the parameters it does not take get exactly torch's AdamW; it trains the same in one process, under DDP x2
and FSDP2 x2 (gloo) for 10 steps; and a run resumed from its checkpoint equals the run that was not stopped."""

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import REPO, cli, tiny_model

from fermion.config import TrainConfig
from fermion.train.muon import Muon, orthogonalise
from fermion.train.trainer import build_optimizer, muon_takes

MOE = {"moe": {"n_experts": 4, "top_k": 2}}


@pytest.mark.parametrize("shape", [(64, 32), (32, 256), (4, 16, 48)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # fp32 on CPU, and bf16 as a bf16 run computes it
def test_the_update_is_orthogonal_and_has_adamw_rms_at_every_shape(shape, dtype):
    update = orthogonalise(torch.randn(shape, generator=torch.Generator().manual_seed(0)), dtype=dtype)
    singular = torch.linalg.svdvals(update)
    # The quintic iteration's published behaviour: singular values in about [0.7, 1.2], none left small.
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    # Same singular vectors as the input: the product with the input's transpose is symmetric positive.
    scaled = update * 0.2 * max(shape[-2:]) ** 0.5
    assert 0.15 < scaled.pow(2).mean().sqrt() < 0.22


def test_muon_takes_the_blocks_matrices_and_experts_adamw_the_rest():
    model = tiny_model(**MOE)
    taken = {name for name, p in model.named_parameters() if muon_takes(name, p)}
    assert taken and all(name.startswith("blocks.") for name in taken)
    assert not any("router" in n or "norm" in n or "tok_emb" in n or "lm_head" in n for n in taken)
    assert any(model.get_parameter(n).ndim == 3 for n in taken)  # the stacked expert weights
    assert {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")
            and "router" not in n} <= taken


def _loss(model, tokens):
    logits, aux = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux


def test_adamw_side_equals_torch_adamw_and_matrices_move_by_the_scaled_orthogonal_step():
    cfg = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=2e-2, weight_decay=0.1, warmup_steps=0, steps=10)
    ours, theirs = tiny_model(**MOE).train(), tiny_model(**MOE).train()
    optimizer = build_optimizer(ours, SimpleNamespace(train=cfg), torch.device("cpu"))
    assert isinstance(optimizer, Muon)
    adamw_names = [n for n, p in theirs.named_parameters() if not muon_takes(n, p)]
    reference = torch.optim.AdamW(
        [{"params": [theirs.get_parameter(n) for n in adamw_names if theirs.get_parameter(n).ndim >= 2
                     and "tok_emb" not in n], "weight_decay": 0.1},
         {"params": [theirs.get_parameter(n) for n in adamw_names if theirs.get_parameter(n).ndim < 2
                     or "tok_emb" in n], "weight_decay": 0.0}], lr=1e-2, betas=cfg.betas, eps=cfg.eps)
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for step in range(3):
        ours.zero_grad()
        _loss(ours, tokens).backward()
        grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
        for name in adamw_names:  # the same gradients (the matrices differ after a step: only Muon moves them)
            theirs.get_parameter(name).grad = grads[name].clone()
        optimizer.step()
        reference.step()
        for name in adamw_names:
            torch.testing.assert_close(ours.get_parameter(name), theirs.get_parameter(name), rtol=0, atol=1e-6)
        if step == 0:  # momentum is the gradient itself at the first step; nesterov adds it once more
            for name, param in ours.named_parameters():
                if muon_takes(name, param):
                    g = grads[name] * 1.95
                    want = before[name] * (1 - 2e-2 * 0.1) - 2e-2 * orthogonalise(g) * 0.2 * max(g.shape[-2:]) ** 0.5
                    torch.testing.assert_close(param.detach(), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ one process, DDP, FSDP2


def _train(rank: int, world: int, mode: str, init: str, out: str) -> None:
    """10 Muon steps on a tiny MoE model, the global batch of 8 split over `world` processes; rank 0 writes the
    final weights. Under FSDP2 the run stops after step 5, saves model and optimizer as the trainer's checkpoints
    do (DCP), and goes on in a fresh model and optimizer loaded from them."""
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from fermion.checkpoint import _load_dcp
    from fermion.device import DistInfo
    from fermion.train.distributed import wrap

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    cfg = TrainConfig(optimizer="muon", lr=3e-3, weight_decay=0.1, warmup_steps=0, steps=10)

    def build():
        # Without the load-balancing loss, a function of each process's own batch (not a mean over tokens).
        model = tiny_model(moe={**MOE["moe"], "aux_loss_coef": 0.0}).train()
        wrapped = wrap(model, mode, info) if world > 1 else model
        return model, wrapped, build_optimizer(wrapped, SimpleNamespace(train=cfg), torch.device("cpu"))

    model, wrapped, optimizer = build()
    data = torch.randint(0, 97, (10, 8, 17), generator=torch.Generator().manual_seed(5))
    share = 8 // world
    for step in range(10):
        if step == 5 and mode == "fsdp":
            saved = Path(out).with_suffix(".ckpt")
            model_state, optim_state = get_state_dict(wrapped, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(saved / "dcp"))
            model, wrapped, optimizer = build()
            _load_dcp(saved, wrapped, optimizer)
        _loss(wrapped, data[step, rank * share:(rank + 1) * share]).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(state, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def _weights(world: int, mode: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{mode}-{world}.pt"
    init = tempfile.mktemp(dir=tmp_path)
    if world == 1:
        _train(0, 1, mode, init, str(out))
    else:
        mp.spawn(_train, args=(world, mode, init, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def test_one_process_ddp_and_fsdp2_with_a_resume_train_the_same_within_1e_5(tmp_path):
    threads = torch.get_num_threads()
    try:
        one = _weights(1, "ddp", tmp_path)
    finally:
        torch.set_num_threads(threads)
    for mode in ("ddp", "fsdp"):
        other = _weights(2, mode, tmp_path)
        assert other.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(other[name], one[name], rtol=0, atol=1e-5, msg=f"{mode}: {name}")


# ---------------------------------------------------------------------------------------------- exact resume

TINY = str(REPO / "configs" / "tiny.yaml")
SHORT = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=6", "train.eval_batches=1",
         "train.warmup_steps=2", "train.micro_batch_size=4", "train.precision=fp32", "train.compile=false",
         "train.optimizer=muon", "train.muon_lr=0.01", "data.sources.0.max_documents=200",
         "tokenizer.train_bytes=100000", "train.progress=false"]


def _pretrain(run_dir: Path, *extra: str):
    args = ["pretrain", TINY, *[a for item in [*SHORT, f"run.dir={run_dir}", *extra] for a in ("--set", item)]]
    result = cli(*args)
    assert result.returncode == 0, result.stdout[-3000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_muon_run_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    _pretrain(whole)
    cut = tmp_path / "cut"  # as if killed after the step-3 checkpoint
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    (cut / "checkpoints" / "latest").write_text("step_00000003\n")
    _pretrain(cut)
    assert _losses(cut) == _losses(whole)
    final = sorted((whole / "checkpoints").glob("step_*"))[-1].name
    from safetensors.torch import load_file

    a = load_file(whole / "checkpoints" / final / "model.safetensors")
    b = load_file(cut / "checkpoints" / final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(whole / "checkpoints" / final / "optimizer.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in state["state"].values())  # Muon's state is in the checkpoint


def test_model_info_predicts_muons_optimizer_state():
    from fermion.model.counting import training_memory

    for overrides in ({}, MOE):
        model = tiny_model(**overrides).train()
        cfg = TrainConfig(optimizer="muon", warmup_steps=0, steps=10)
        optimizer = build_optimizer(model, SimpleNamespace(train=cfg), torch.device("cpu"))
        _loss(model, torch.randint(0, 97, (2, 9))).backward()
        optimizer.step()
        held = sum(t.numel() * t.element_size() for state in optimizer.state.values() for name, t in state.items()
                   if name != "step")
        assert training_memory(model.cfg, 2, 8, "fp32", optimizer="muon").optimizer == held
        assert training_memory(model.cfg, 2, 8, "fp32").optimizer == 8 * sum(p.numel() for p in model.parameters())


def test_a_bf16_run_orthogonalises_in_bf16_and_an_fp32_run_in_fp32():
    cfg = TrainConfig(optimizer="muon", steps=10)
    model = tiny_model()
    bf16 = build_optimizer(model, SimpleNamespace(train=cfg), torch.device("cpu"), "bf16")
    fp32 = build_optimizer(model, SimpleNamespace(train=cfg), torch.device("cpu"), "fp32")
    assert (bf16._ns_dtype, fp32._ns_dtype) == (torch.bfloat16, None)  # None: fp32 on a CPU, bf16 on CUDA
