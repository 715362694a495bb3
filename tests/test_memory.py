"""The training-memory prediction (`fermion model info`) against memory measured on CPU.

What is compared: the peak of the bytes held by PyTorch's CPU allocator during one steady-state training step (the
second: AdamW's moments already exist), minus what was held when the step began (fp32 weights and AdamW's
moments, the batch), against the prediction of the same quantity: `peak - weights - optimizer`. That is the part
of the peak a recipe's batch size, precision, checkpointing and cross-entropy choices move (gradients, saved
activations, logits and backward's temporaries); the weights and moments are exact counts either way, so comparing
totals would only make the check easier.

How it is measured: the step runs under torch.profiler with profile_memory=True, which reports every CPU
allocation and free made through c10's allocator (size and time); the running sum of those events gives the
exact allocator timeline, and its maximum is the peak. Unlike RSS this is deterministic and sees memory freed
back to malloc's pools, so a small model (a few MiB of activations) suffices and the test stays fast.

The step is the trainer's own `Trainer.train_step` (forward under autocast, loss, backward, gradient clipping,
fused AdamW, zero_grad), eager (torch.compile off, as the estimate assumes).
"""

import json
import time

import pytest
import torch

from fermion.config import recipe_from_dict
from fermion.device import DistInfo
from fermion.model.counting import allocation_peak, plan_memory, training_memory
from fermion.model.transformer import Transformer
from fermion.train import objectives
from fermion.train.objectives import Pretrain
from fermion.train.trainer import Trainer

TOLERANCE = 0.25
CHUNK = 128  # tokens per cross-entropy chunk here, so that the 512-token batch takes several

MODEL = dict(vocab_size=2048, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=352,
             context_length=128, tie_embeddings=False)
BATCH, SEQ = 4, 128


class FixedBatches:
    """The same batch every step (allocated once, before measuring)."""

    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.batch = (torch.randint(0, vocab, (BATCH, SEQ), generator=g),
                      torch.randint(0, vocab, (BATCH, SEQ), generator=g))

    def next_batch(self):
        return self.batch

    def state_dict(self) -> dict:  # the trainer notes the position at every step's start
        return {}


def measured_step_peak(trainer: Trainer) -> int:
    """Bytes allocated at the peak of one train_step beyond those held when it started."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    return allocation_peak(prof)


def build_trainer(tmp_path, precision: str, checkpointing: str, cross_entropy: str, model_overrides: dict):
    # The trainer applies train.activation_checkpointing and train.cross_entropy to the model and objective.
    train = dict(steps=10, warmup_steps=1, micro_batch_size=BATCH, seq_len=SEQ, precision=precision, compile=False,
                 tensorboard=False, progress=False, device="cpu", activation_checkpointing=checkpointing,
                 cross_entropy=cross_entropy)
    recipe = recipe_from_dict({"run": {"dir": str(tmp_path / "run")}, "model": {**MODEL, **model_overrides},
                               "data": {"sources": [{"name": "unused", "paths": ["unused.txt"]}]},
                               "train": train}, check_paths=False)
    torch.manual_seed(0)
    model = Transformer(recipe.model)
    model.init_weights(torch.Generator().manual_seed(0))
    objective = Pretrain(torch.ones(recipe.model.vocab_size), chunk_tokens=CHUNK)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(recipe, model, objective, FixedBatches(recipe.model.vocab_size), [], info,
                      tokenizer_path=tmp_path / "tokenizer.json")
    return recipe, trainer


CASES = [
    # precision, checkpointing, cross-entropy, model overrides
    ("fp32", "none", "full", {}),
    ("bf16", "none", "full", {}),
    ("bf16", "selective", "full", {}),
    ("fp32", "full", "full", {}),
    ("bf16", "full", "full", {}),
    ("bf16", "none", "chunked", {}),
    ("fp32", "full", "chunked", {"tie_embeddings": True}),
    ("bf16", "none", "full", {"moe": {"n_experts": 4, "top_k": 2}, "vocab_size": 512}),
]


@pytest.fixture(autouse=True)
def _keep_determinism_setting():
    """The trainer sets torch's deterministic-algorithms switch globally; put it back afterwards."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("precision, checkpointing, cross_entropy, overrides", CASES,
                         ids=["-".join([p, c, e] + list(o)) for p, c, e, o in CASES])
def test_predicted_peak_matches_measured_cpu_peak(tmp_path, precision, checkpointing, cross_entropy, overrides):
    torch.set_num_threads(1)
    recipe, trainer = build_trainer(tmp_path, precision, checkpointing, cross_entropy, overrides)
    trainer.train_step()  # the first step creates AdamW's moments; the second is the steady state
    started = time.perf_counter()
    measured = measured_step_peak(trainer)
    seconds = time.perf_counter() - started

    estimate = training_memory(recipe.model, BATCH, SEQ, precision, checkpointing=checkpointing,
                               cross_entropy=cross_entropy, chunk_tokens=CHUNK)
    predicted = estimate.peak - estimate.weights - estimate.optimizer
    params = sum(p.numel() for p in trainer.raw_model.parameters())
    assert estimate.weights == 4 * params and estimate.optimizer == 8 * params
    ratio = predicted / measured
    print(f"{precision} {checkpointing} {cross_entropy} {overrides}: measured {measured / 2**20:.2f} MiB, "
          f"predicted {predicted / 2**20:.2f} MiB ({estimate.phase}), ratio {ratio:.3f}, step {seconds:.1f}s")
    assert abs(ratio - 1) <= TOLERANCE, (measured, predicted, estimate)


def test_checkpointing_and_chunking_lower_the_prediction():
    recipe = recipe_from_dict({"model": MODEL}, check_paths=False)
    peaks = {mode: training_memory(recipe.model, 16, SEQ, "bf16", checkpointing=mode).peak
             for mode in ("none", "selective", "full")}
    assert peaks["full"] < peaks["none"] and peaks["selective"] < peaks["none"]
    chunked = training_memory(recipe.model, 16, SEQ, "bf16", cross_entropy="chunked", chunk_tokens=CHUNK)
    assert chunked.logits < training_memory(recipe.model, 16, SEQ, "bf16").logits


def test_chunk_size_matches_the_objective():
    from fermion.model.counting import CE_CHUNK_TOKENS

    assert objectives.CHUNK_TOKENS == CE_CHUNK_TOKENS


def test_fsdp_shards_model_state_and_ddp_adds_buckets():
    recipe = recipe_from_dict({"model": MODEL}, check_paths=False)
    one = training_memory(recipe.model, BATCH, SEQ, "bf16")
    fsdp = training_memory(recipe.model, BATCH, SEQ, "bf16", world_size=4, distributed="fsdp")
    ddp = training_memory(recipe.model, BATCH, SEQ, "bf16", world_size=4, distributed="ddp")
    assert fsdp.weights == one.weights // 4 and fsdp.optimizer == one.optimizer // 4
    assert fsdp.peak < one.peak < ddp.peak
    assert ddp.distributed == one.weights  # one fp32 copy of the gradients in DDP's buckets


def test_plan_for_a_7b_recipe_on_gpus():
    from fermion.config import load_recipe

    recipe = load_recipe("configs/published/neutrino-7b.yaml", check_paths=False)
    single = plan_memory(recipe, device="h100")
    assert single.precision == "bf16" and single.cross_entropy == "chunked"
    assert single.fits is False  # 16 bytes per parameter of model state alone is over 100 GiB
    sharded = plan_memory(recipe, device="h100", world_size=8, checkpointing="full",
                          train=recipe.train.model_copy(update={"distributed": "fsdp"}))
    assert sharded.fits is True and sharded.estimate.peak < single.estimate.peak / 3


def test_model_info_prints_the_plan_and_json():
    from typer.testing import CliRunner

    from fermion.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["model", "info", "configs/tiny.yaml", "--device", "h100", "--world-size", "2",
                                 "--checkpointing", "full", "--micro-batch", "8", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    setup, memory = info["train_setup"], info["train_memory"]
    assert setup["device"] == "h100" and setup["world_size"] == 2 and setup["checkpointing"] == "full"
    assert setup["micro_batch"] == 8 and setup["fits"] is True
    assert info["train_memory_bytes"] == memory["peak"] == max(memory["phases"].values())
    result = runner.invoke(app, ["model", "info", "configs/tiny.yaml", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "info", "configs/tiny.yaml", "--checkpointing", "most"])
    assert result.exit_code == 2 and "--checkpointing must be one of" in result.output
