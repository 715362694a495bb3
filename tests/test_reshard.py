"""Resuming on another number of processes (2 -> 1 and 1 -> 2, FSDP2 DCP shards <-> safetensors) gives the losses of
an uninterrupted run; a changed global batch is refused; asynchronous checkpoints hold what synchronous ones hold
and stay invisible until their files are complete."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import HANG, REPO, cli
from safetensors.torch import load_file

TINY = str(REPO / "configs" / "tiny.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fermion"]
# Six steps, a checkpoint after the third; the global batch is 8 sequences (4 per micro-batch).
SHORT = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=6", "train.eval_batches=1",
         "train.warmup_steps=2", "train.micro_batch_size=4", "train.precision=fp32", "train.compile=false",
         "data.sources.0.max_documents=200", "tokenizer.train_bytes=100000"]
FSDP = ["train.distributed=fsdp", "train.grad_accum=1"]  # 4 x 1 x 2 processes
ONE = ["train.grad_accum=2"]  # 4 x 2 x 1 process


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def pretrain(run_dir: Path, *overrides: str, launcher: list[str] | None = None, data: Path | None = None):
    """`fermion pretrain` with one thread per process, as torchrun gives each rank (OMP_NUM_THREADS=1): under the
    launcher if one is given, else in this process."""
    sets = [*SHORT, f"run.dir={run_dir}", *overrides]
    if data is not None:  # share the first run's tokenizer and shards rather than making them again
        sets += [f"tokenizer.path={data / 'tokenizer.json'}", f"data.shard_dir={data / 'data'}"]
    args = ["pretrain", TINY, *[arg for item in sets for arg in ("--set", item)]]
    if launcher is None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cli(*args)
        finally:
            torch.set_num_threads(threads)
    result = subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True, timeout=HANG,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    return result


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2500:]
    return result


def cut_at_step_3(run_dir: Path, into: Path) -> Path:
    """A copy of a finished run as if it had stopped after its step-3 checkpoint."""
    shutil.copytree(run_dir, into)
    shutil.rmtree(into / "checkpoints" / "step_00000006")
    (into / "checkpoints" / "latest").write_text("step_00000003\n")
    return into


def assert_close(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert set(resumed) == set(reference) == set(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=0), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reshard")


@pytest.fixture(scope="module")
def one(runs) -> Path:
    """One process, synchronous checkpoints; it also makes the tokenizer and shards the other runs read."""
    ok(pretrain(runs / "one", *ONE))
    return runs / "one"


@pytest.fixture(scope="module")
def one_async(runs, one) -> Path:
    ok(pretrain(runs / "one_async", *ONE, "train.async_checkpoint=true", data=one))
    return runs / "one_async"


@pytest.fixture(scope="module")
def two(runs, one) -> Path:
    ok(pretrain(runs / "two", *FSDP, launcher=TORCHRUN, data=one))
    return runs / "two"


@pytest.fixture(scope="module")
def two_async(runs, one) -> Path:
    ok(pretrain(runs / "two_async", *FSDP, "train.async_checkpoint=true", launcher=TORCHRUN, data=one))
    return runs / "two_async"


def dcp_contents(ckpt: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "dcp", out)
    return torch.load(out, weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.cpu().equal(b.cpu()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_two_fsdp_processes_resume_on_one(two, two_async, runs):
    """FSDP2 DCP shards written by 2 processes (asynchronously) resume in 1 process with grad_accum doubled."""
    resumed = cut_at_step_3(two_async, runs / "two_to_one")
    result = ok(pretrain(resumed, *ONE, data=runs / "one"))
    assert "written by 2 process(es) as dcp, resumed on 1" in result.stdout
    assert "(step 3," in result.stdout
    assert_close(losses(resumed), losses(two))
    assert (resumed / "checkpoints" / "step_00000006" / "model.safetensors").is_file()


@pytest.mark.slow
def test_one_process_resumes_on_two_fsdp_processes(one, one_async, runs):
    """A one-process safetensors checkpoint (written asynchronously) resumes as FSDP2 on 2 processes with
    grad_accum halved."""
    resumed = cut_at_step_3(one_async, runs / "one_to_two")
    result = ok(pretrain(resumed, *FSDP, launcher=TORCHRUN, data=one))
    assert "written by 1 process(es) as safetensors, resumed on 2 as dcp" in result.stdout
    assert_close(losses(resumed), losses(one))
    assert len(list((resumed / "checkpoints" / "step_00000006" / "dcp").glob("*.distcp"))) == 2


@pytest.mark.slow
def test_a_different_global_batch_is_refused_with_the_setting_to_change(two, runs):
    resumed = cut_at_step_3(two, runs / "refused")
    result = pretrain(resumed, "train.grad_accum=1", data=runs / "one")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "global batch of 8 sequences per step (4 micro-batch × 1 accumulation × 2 processes)" in message
    assert "this run has 4 (4 × 1 × 1 processes)" in message and "set train.grad_accum=2" in message


def test_async_checkpoints_equal_synchronous_ones_in_one_process(one, one_async):
    assert losses(one_async) == losses(one)
    for step in (3, 6):
        sync_dir = one / "checkpoints" / f"step_{step:08d}"
        async_dir = one_async / "checkpoints" / f"step_{step:08d}"
        assert (sync_dir / "model.safetensors").read_bytes() == (async_dir / "model.safetensors").read_bytes()
        assert_same(torch.load(sync_dir / "optimizer.pt", weights_only=True),
                    torch.load(async_dir / "optimizer.pt", weights_only=True))
    assert (one_async / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((one_async / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_async_dcp_checkpoints_equal_synchronous_ones(two, two_async, tmp_path):
    assert losses(two_async) == losses(two)
    for step in (3, 6):
        name = f"step_{step:08d}"
        assert_same(dcp_contents(two / "checkpoints" / name, tmp_path / f"sync{step}.pt"),
                    dcp_contents(two_async / "checkpoints" / name, tmp_path / f"async{step}.pt"), name)
    assert not list((two_async / "checkpoints").glob(".*.tmp"))


def test_a_pending_async_save_is_invisible_and_holds_the_state_it_started_with(one, tmp_path, monkeypatch):
    """Files are written from a copy taken when the save starts; the directory and `latest` appear only when
    finish() runs after the files are complete; a save abandoned mid-write (a crash) never appears and the
    next save clears it away."""
    from fermion import checkpoint, layout
    from fermion.config import load_recipe
    from fermion.device import DistInfo
    from fermion.model.transformer import Transformer

    recipe = load_recipe(TINY, [f"run.dir={tmp_path / 'run'}"])
    model = Transformer(recipe.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    release = threading.Event()
    real_save_file = checkpoint.save_file

    def slow_save_file(tensors, path):
        assert release.wait(30)
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", slow_save_file)

    def start(step: int):
        return checkpoint.start_save(recipe.run_dir, step, model, optimizer, {"tokens_seen": 0}, info, False,
                                     recipe, one / "tokenizer.json", keep=5, asynchronous=True)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    pending = start(1)
    with torch.no_grad():  # training goes on while the files are written
        for param in model.parameters():
            param.add_(1.0)
    assert not pending.done()
    assert checkpoint.list_checkpoints(recipe.run_dir) == []
    assert not layout.latest_file(recipe.run_dir).exists()
    release.set()
    path = pending.finish()
    assert checkpoint.verify(path) is None
    assert layout.latest_file(recipe.run_dir).read_text().strip() == path.name
    assert_same(load_file(path / "model.safetensors"), before)

    release.clear()
    abandoned = start(2)  # the process dies here: finish() never runs
    assert checkpoint.list_checkpoints(recipe.run_dir) == [path]
    release.set()
    abandoned.job.wait()
    assert checkpoint.list_checkpoints(recipe.run_dir) == [path]
    assert checkpoint.find(recipe.run_dir) == path
    third = start(3).finish()
    assert [p.name for p in checkpoint.list_checkpoints(recipe.run_dir)] == [path.name, third.name]
    assert not list(layout.checkpoints_dir(recipe.run_dir).glob(".*.tmp"))
