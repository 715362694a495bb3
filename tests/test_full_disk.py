"""Full disks, read-only outputs and torn files: one line naming the path and exit 2, never a traceback; what was
complete before stays complete and usable. The full disks are small tmpfs mounts (root only: CI runs as root; a
machine where mounting fails skips these tests with the mount's own error)."""

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, cli
from safetensors.torch import save_file

from fermion import checkpoint
from fermion.data.shards import ShardSet, load_index

TINY = str(REPO / "configs" / "tiny.yaml")


@contextlib.contextmanager
def tmpfs(directory: Path, size: int):
    """A tmpfs of `size` bytes mounted on `directory` (made if missing), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the full-disk tests need a tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs failed here (these tests need root, as CI has): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=True)  # still open somewhere: detach it now


def remount(directory: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(directory)], check=True, capture_output=True)


def free(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def run_with_small_disk(tiny_run, tmp_path):
    """A copy of tiny_run (one checkpoint, step 20) whose checkpoints/ is a tmpfs with room for that checkpoint and
    a third of another."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    saved = tiny_run / "checkpoints"
    with tmpfs(run / "checkpoints", tree_bytes(saved) * 4 // 3 + 64 * 1024) as disk:
        shutil.copytree(saved, disk, dirs_exist_ok=True)
        yield run


WRITERS = {  # how each library the project writes with reports a full disk, from errno 28 to "unexpected pos"
    "open": lambda path: path.write_bytes(bytes(200_000)),
    "numpy": lambda path: np.save(path, np.zeros(25_000)),
    "torch": lambda path: torch.save({"w": torch.zeros(50_000)}, path),
    "safetensors": lambda path: save_file({"w": torch.zeros(50_000)}, path),
    "nested atomic write": lambda path: _write_through_replaced_file(path),  # named for the whole, not the part
}


def _write_through_replaced_file(path: Path) -> None:
    from fermion.atomic import replaced_file

    with replaced_file(path) as tmp:
        tmp.write_bytes(bytes(200_000))


@pytest.mark.parametrize("writer", WRITERS)
def test_full_disk_under_an_atomic_directory_write_is_one_error_naming_the_directory(tmp_path, writer):
    from fermion.atomic import replaced_dir
    from fermion.errors import StorageError

    with tmpfs(tmp_path / "disk", 64 * 1024) as disk:
        out = disk / "out"
        before = free(disk)
        with pytest.raises(StorageError, match=rf"^no space left on device for {out}: it needs more than the "):
            with replaced_dir(out, "marker", ValueError, "an output") as tmp:
                WRITERS[writer](tmp / "file")
        assert free(disk) == before and not any(disk.iterdir())


def resume_to_step_21(run: Path, *extra: str):
    return cli("pretrain", TINY, "--set", f"run.dir={run}", "--set", "train.steps=21", "--set",
               "train.checkpoint_every=20", "--set", "train.eval_every=20", *extra)


def assert_previous_checkpoint_kept_and_resumable(run: Path) -> None:
    disk = run / "checkpoints"
    assert leftovers(disk) == []
    ckpt = checkpoint.find(run)
    assert ckpt.name == "step_00000020" and checkpoint.verify(ckpt) is None
    remount(disk, "size=16m")  # space freed: the run goes on from the checkpoint it kept
    resumed = resume_to_step_21(run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step_00000020" in resumed.stdout
    assert checkpoint.find(run).name == "step_00000021"


def test_checkpoint_that_cannot_fit_is_refused_in_one_line_before_writing(run_with_small_disk):
    run = run_with_small_disk
    before = free(run / "checkpoints")
    result = resume_to_step_21(run)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "no space left on device" in line and str(run / "checkpoints" / "step_00000021") in line
    assert "needs about" in line and "free" in line
    assert free(run / "checkpoints") == before
    assert_previous_checkpoint_kept_and_resumable(run)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_disk_filling_during_a_checkpoint_write_is_one_line(run_with_small_disk, monkeypatch, asynchronous):
    """With the check before writing out of the way, the writes themselves hit the full disk: torch.save says only
    "unexpected pos". With async_checkpoint it happens on the checkpoint thread while step 22 trains, and is
    reported by the training loop when it collects that save."""
    monkeypatch.setattr(checkpoint, "_check_space", lambda *args: None, raising=False)
    run = run_with_small_disk
    before = free(run / "checkpoints")
    background = ["--set", "train.async_checkpoint=true", "--set", "train.steps=22", "--set",
                  "train.checkpoint_every=21"]
    result = resume_to_step_21(run, *(background if asynchronous else []))
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "no space left on device" in line and "step_00000021" in line and "unexpected pos" not in line
    assert free(run / "checkpoints") == before  # the half-written checkpoint is gone
    monkeypatch.undo()
    assert_previous_checkpoint_kept_and_resumable(run)


def test_disk_filling_while_writing_shards_keeps_the_shards_there_were(tiny_run, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    shutil.copy(tiny_run / "tokenizer.json", tokenizer)
    with tmpfs(tmp_path / "disk", 128 * 1024) as disk:
        run = disk / "run"
        args = ["prepare", TINY, "--set", f"run.dir={run}", "--set", f"tokenizer.path={tokenizer}"]
        first = cli(*args, "--set", "data.sources.0.max_documents=20")
        assert first.returncode == 0, first.stderr
        shards = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
        before = free(disk)
        more = cli(*args)  # 600 documents: several times what is left
        assert more.returncode == 2
        line = one_line_error(more.stderr)
        assert f"no space left on device for {run / 'data'}" in line and "written when it filled" in line
        assert free(disk) == before  # partial files gone, none held open
        assert leftovers(disk) == []
        assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == shards
        assert load_index(run / "data")["splits"]["train"]["documents"] > 0
        assert ShardSet(run / "data", "train").tokens > 0


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_to_a_read_only_folder_is_one_line(tiny_run, tmp_path, fmt):
    """Root writes through permission bits, so the folder is on a read-only mount."""
    with tmpfs(tmp_path / "ro", 64 * 1024) as mounted:
        (mounted / "out").mkdir()
        remount(mounted, "ro")
        for out in (mounted / "out", mounted / "new" / fmt):
            result = cli("export", str(tiny_run), "--format", fmt, "--out", str(out))
            assert result.returncode == 2
            line = one_line_error(result.stderr)
            assert str(out) in line and "read-only" in line
        assert [p.name for p in mounted.rglob("*")] == ["out"] and not any((mounted / "out").iterdir())


def metrics_lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


def test_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 5.4')  # power went mid-write
    torn_at = len(metrics_lines(run))
    result = cli("pretrain", TINY, "--set", f"run.dir={run}", "--set", "train.steps=22", "--set",
                 "train.checkpoint_every=20", "--set", "train.eval_every=20")
    assert result.returncode == 0, result.stderr
    assert f"metrics.jsonl:{torn_at}: dropped its last line" in result.stdout
    records = [json.loads(line) for line in metrics_lines(run)]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 23))
    assert leftovers(run) == []


def test_bad_metrics_line_before_the_last_is_damage_named_by_file_and_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    lines = metrics_lines(run)
    lines[4] = lines[4][: len(lines[4]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("pretrain", TINY, "--set", f"run.dir={run}", "--set", "train.steps=22")
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert f"{run / 'metrics.jsonl'}:5:" in line and "damaged" in line and "Delete that line" in line
    assert metrics_lines(run)[4] == lines[4]  # left for the user to look at


def test_metrics_reader_drops_only_a_torn_last_line(tmp_path):
    from fermion.errors import DamagedFileError
    from fermion.train.logging import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo\n\n')
    warnings = []
    assert read_metrics(path, warnings.append) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert warnings and f"{path}:3:" in warnings[0]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(DamagedFileError, match=rf"{path}:2:"):
        read_metrics(path)
    assert os.path.getsize(path) > 0
