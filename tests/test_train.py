"""Training: exact resume after SIGKILL (one process and FSDP2 under torchrun), SIGTERM, FSDP2 vs one process,
damaged checkpoints, non-finite losses, schedules, logging, and the generate command end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG, REPO, cli
from safetensors.torch import load_file

from fermion.checkpoint import load
from fermion.config import TrainConfig, load_recipe
from fermion.train.schedule import learning_rate

TINY = str(REPO / "configs" / "tiny.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fermion"]
FERMION = [sys.executable, "-m", "fermion"]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run(cmd: list[str], timeout: float = HANG) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr[:2500]
    return result


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and losses(run_dir) and max(losses(run_dir)) >= step:
            return
        assert proc.poll() is None, f"run ended early: {proc.stdout.read()}"
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def pretrain_args(run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", TINY, "--set", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny recipe run start to finish without interruption."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = cli(*pretrain_args(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def final_weights(run_dir: Path, steps: int = 60) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), key


def test_exact_resume_after_sigkill(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*FERMION, *pretrain_args(run_dir)])
    wait_for_step(run_dir, 35, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run_dir))
    assert killed_at < 60
    result = cli(*pretrain_args(run_dir, "--resume", "auto"))
    assert result.returncode == 0, result.stderr
    resumed_from = int(result.stdout.split("(step ")[1].split(",")[0])
    assert 30 <= resumed_from <= killed_at
    expected = losses(reference)
    assert losses(run_dir) == expected  # every step, before and after the resume, to the last bit
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


def test_sigterm_saves_a_checkpoint_exits_zero_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*FERMION, *pretrain_args(run_dir, "--set", "train.checkpoint_every=1000")])
    wait_for_step(run_dir, 15, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, output
    stopped_at = max(losses(run_dir))
    assert stopped_at < 60 and "received SIGTERM" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    result = cli(*pretrain_args(run_dir, "--set", "train.checkpoint_every=1000"))
    assert result.returncode == 0 and f"(step {stopped_at}," in result.stdout
    assert losses(run_dir) == losses(reference)
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


def test_damaged_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000060")
    damaged = run_dir / "checkpoints" / "step_00000050" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = cli(*pretrain_args(run_dir))
    assert result.returncode == 0, result.stderr
    assert f"{damaged} does not match its checksum" in result.stdout.replace("\n", "")
    assert "(step 40," in result.stdout
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


@pytest.fixture(scope="module")
def single_process_20(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert cli(*pretrain_args(run_dir, "--set", "train.steps=20", "--set", "train.micro_batch_size=4")).returncode == 0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one_process_with_the_same_global_batch(single_process_20, tmp_path, mode):
    two_dir = tmp_path / mode
    two = run([*TORCHRUN, *pretrain_args(two_dir, "--set", "train.steps=20", "--set", "train.micro_batch_size=2",
                                         "--set", f"train.distributed={mode}")])
    assert two.returncode == 0, two.stderr
    a, b = losses(single_process_20), losses(two_dir)
    assert a.keys() == b.keys() == set(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    final = two_dir / "checkpoints" / "step_00000020"
    if mode == "fsdp":
        assert len(list((final / "dcp").glob("*.distcp"))) == 2
    else:
        assert (final / "model.safetensors").is_file()


@pytest.mark.slow
def test_exact_resume_after_sigkill_under_torchrun_fsdp(tmp_path):
    fsdp = ["--set", "train.distributed=fsdp", "--set", "train.micro_batch_size=2", "--set", "train.steps=40"]
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run([*TORCHRUN, *pretrain_args(reference_dir, *fsdp)]).returncode == 0
    proc = start([*TORCHRUN, *pretrain_args(run_dir, *fsdp)])
    wait_for_step(run_dir, 25, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(run_dir)) < 40
    result = run([*TORCHRUN, *pretrain_args(run_dir, *fsdp, "--resume", "auto")])
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr
    assert losses(run_dir) == losses(reference_dir)
    # The resharded final weights, gathered by the single-process loader, are identical too.
    ours, theirs = load(run_dir).model, load(reference_dir).model
    assert_bitwise_equal(ours.state_dict(), theirs.state_dict())


def test_nonfinite_losses_skip_updates_then_stop_with_last_good_checkpoint(tmp_path, monkeypatch):
    from fermion.train import objectives
    from fermion.train.pretrain import pretrain
    from fermion.train.trainer import TrainingError

    calls = {"n": 0}
    real_loss = objectives.Pretrain.loss

    def poisoned(self, model, batch):
        loss, metrics = real_loss(self, model, batch)
        calls["n"] += model.training
        return (loss * float("nan") if calls["n"] > 5 else loss), metrics

    monkeypatch.setattr(objectives.Pretrain, "loss", poisoned)
    recipe = load_recipe(TINY, [f"run.dir={tmp_path / 'run'}", "train.max_nonfinite=3"])
    with pytest.raises(TrainingError, match=r"not finite for 3 steps in a row \(up to step 8\)"):
        pretrain(recipe)
    saved = tmp_path / "run" / "checkpoints" / "step_00000008"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == saved.name
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["nonfinite_streak"] == 3
    # No poisoned step changed the weights: they are those after step 5, the last good one.
    monkeypatch.setattr(objectives.Pretrain, "loss", real_loss)
    good = load_recipe(TINY, [f"run.dir={tmp_path / 'good'}", "train.steps=5", "train.warmup_steps=5"])
    pretrain(good)
    assert_bitwise_equal(load_file(saved / "model.safetensors"),
                         load_file(tmp_path / "good" / "checkpoints" / "step_00000005" / "model.safetensors"))


def test_schedules():
    cosine = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(0.1)
    assert learning_rate(cosine, 9) == pytest.approx(1.0)
    assert learning_rate(cosine, 55) == pytest.approx(0.55)
    assert learning_rate(cosine, 100) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(wsd, 50) == 1.0 and learning_rate(wsd, 79) == 1.0
    assert learning_rate(wsd, 89) == pytest.approx(0.5) and learning_rate(wsd, 99) == pytest.approx(0.0)


def test_generate_samples_from_a_run(reference):
    result = cli("generate", str(reference), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                 "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Once upon a time" in result.stdout


def test_shards_from_another_tokenizer_are_refused(reference, tmp_path):
    other = cli("tokenizer", "train", TINY, "--set", f"run.dir={tmp_path / 'other'}",
                "--set", "tokenizer.vocab_size=600", "--set", "model.vocab_size=600")
    assert other.returncode == 0, other.stderr
    result = cli(*pretrain_args(tmp_path / "run", "--set", f"tokenizer.path={tmp_path / 'other' / 'tokenizer.json'}",
                                "--set", f"data.shard_dir={reference / 'data'}", "--set", "model.vocab_size=600"))
    assert result.returncode == 2
    assert "made with tokenizer" in result.stderr and str(reference / "data") in result.stderr


def test_tensorboard_logs_and_wandb_is_optional(tmp_path):
    result = cli(*pretrain_args(tmp_path / "run", "--set", "train.steps=6", "--set", "train.warmup_steps=2",
                                "--set", "train.tensorboard=true", "--set", "train.wandb=true"))
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "wandb is not installed; logging locally only" in result.stdout  # W&B is optional, never required


def test_default_path_is_repeatable_and_trains_like_eager_fp32(tmp_path):
    """The default path (torch.compile of model + loss, precision auto: bf16 on this CPU) gives the same bits on
    every run, and learns like plain fp32 eager training."""
    short = ["--set", "train.steps=8", "--set", "train.warmup_steps=2"]
    default = [*short, "--set", "train.compile=true", "--set", "train.precision=auto"]
    assert cli(*pretrain_args(tmp_path / "eager", *short)).returncode == 0
    for name in ("first", "second"):  # each in its own process, compiling as a user's run does
        result = run([*FERMION, *pretrain_args(tmp_path / name, *default)])
        assert result.returncode == 0, result.stderr
    eager, first, second = (losses(tmp_path / name) for name in ("eager", "first", "second"))
    assert first == second
    assert_bitwise_equal(final_weights(tmp_path / "first", 8), final_weights(tmp_path / "second", 8))
    assert max(abs(eager[s] - first[s]) for s in eager) < 2e-2
    assert first[8] < first[1] - 0.3


def test_fresh_start_refuses_to_overwrite_a_run_and_finished_runs_are_left_alone(reference):
    refused = cli(*pretrain_args(reference, "--resume", "none"))
    assert refused.returncode == 1 and "already has checkpoints" in refused.stderr
    again = cli(*pretrain_args(reference))
    assert again.returncode == 0 and "already trained to step 60 of 60" in again.stdout
    assert len(list((reference / "checkpoints").glob("step_*"))) == 6  # keep_checkpoints: 10, saved every 10


def test_a_stop_signal_mid_step_stops_before_that_step_and_resumes_exactly(reference, tmp_path, monkeypatch):
    """A signal during a step's forward pass (a compiling first step takes minutes) abandons the step at once: the
    run stops at the state before it, checkpointed, and resumes to the uninterrupted run's every loss and weight."""
    from fermion.train import objectives
    from fermion.train.pretrain import pretrain

    real_loss = objectives.Pretrain.loss
    calls = {"n": 0, "at": 1}  # during step 1 (nothing trained yet), then during step 16

    def signalled(self, model, batch):
        calls["n"] += model.training
        if model.training and calls["n"] == calls["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, model, batch)

    monkeypatch.setattr(objectives.Pretrain, "loss", signalled)
    run_dir = tmp_path / "run"
    recipe = load_recipe(TINY, [f"run.dir={run_dir}", "train.checkpoint_every=1000"])
    first = pretrain(recipe)
    assert (first.status, first.step, first.checkpoint) == ("preempted", 0, None)
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*"))
    calls.update(n=0, at=16)
    second = pretrain(recipe)  # starts afresh and is stopped during step 16
    assert (second.status, second.step) == ("preempted", 15)
    assert second.checkpoint.name == "step_00000015" and max(losses(run_dir)) == 15
    monkeypatch.setattr(objectives.Pretrain, "loss", real_loss)
    assert pretrain(recipe).status == "complete"
    assert losses(run_dir) == losses(reference)
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


def test_compile_auto_compiles_where_the_run_repays_it():
    """train.compile: auto compiles on a GPU, and on a bf16 CPU when the run's eager time saved exceeds the compile
    time (bench/compile_payback.py's measurements, kept as FLOPs): the tiny recipe's run does not, nor the demo's
    pretraining (300 steps of 8 x 256 tokens); a run the size of the demo's SFT (280 steps of 8 x 512) does."""
    import torch

    from fermion.device import DistInfo
    from fermion.model.counting import count
    from fermion.train.distributed import compile_decision

    def decide(path: str, device: str = "cpu", precision: str = "bf16", **train) -> tuple[bool, str]:
        recipe = load_recipe(path, [f"train.{k}={v}" for k, v in {"compile": "auto", **train}.items()],
                             check_paths=False)
        tokens = recipe.train.micro_batch_size * recipe.seq_len * recipe.train.grad_accum
        flops = count(recipe.model, recipe.seq_len).train_flops_per_token * tokens * recipe.train.steps
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
        return compile_decision(recipe.train, info, precision, flops)

    demo = str(REPO / "src" / "fermion" / "recipes" / "demo.yaml")
    sft_sized = {"steps": 280, "seq_len": 512}
    assert decide(TINY) == (False, decide(TINY)[1]) and "would not repay" in decide(TINY)[1]
    assert not decide(demo)[0] and "would not repay" in decide(demo)[1]
    assert decide(demo, **sft_sized)[0] and "repays" in decide(demo, **sft_sized)[1]
    assert not decide(demo, steps=20, warmup_steps=2, seq_len=512)[0]  # the same model, too short a run
    assert not decide(demo, precision="fp32", **sft_sized)[0]  # a CPU without bf16 gains too little
    assert decide(TINY, device="cuda") == (True, "compile auto on a GPU")
    assert decide(TINY, compile="true") == (True, "train.compile true")
    assert decide(demo, compile="false") == (False, "train.compile false")
