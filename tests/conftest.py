"""Shared test helpers: tiny models with non-trivial weights, and a small tokenizer trained on real text."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fermion.config import ModelConfig, TokenizerConfig
from fermion.data.tokenizer import Tokenizer
from fermion.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The benchmarks evaluation and decontamination read by default (fermion's own default is ~/.cache/fermion/eval);
# subprocesses inherit it.
os.environ.setdefault("FERMION_EVAL_DATA", str(SHARED_DATA / "eval"))
# Inductor's on-disk kernel cache is keyed without ATEN_CPU_CAPABILITY: a run that sets it (to act as another kind of
# CPU, see model/attention.py) keeps its kernels apart, or later ordinary runs would load its kernels.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) /
                                                f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY']}")
SHAKESPEARE = SHARED_DATA / "pretrain" / "tinyshakespeare" / "input.txt"
# Seconds a test waits for a process or a server before calling it hung. Only a guard against hangs, never a speed
# check: the slowest single command in the suite (the shrunk demo) takes about 1.5 minutes on a quiet 2-core AVX512
# machine and took 17 minutes on one loaded six times over (load average 13); a CPU several times slower, with one
# thread, still finishes well inside it. The whole CI run has 90 minutes, so one real hang still leaves time to report.
HANG = 2400
TINY = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, context_length=48,
            rope_theta=5000.0, tie_embeddings=False)


def tiny_model(**overrides) -> Transformer:
    """A seeded tiny model in eval mode. Norm weights are drawn from [0.5, 1.5] rather than left at one, so a
    mistake in mapping or applying a norm shows up in the outputs."""
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(torch.Generator().manual_seed(0))
    norms = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=norms)
    return model.eval()


@pytest.fixture(scope="session")
def shakespeare_tokenizer() -> Tokenizer:
    """A 512-token byte-level BPE tokenizer trained on the first 300 kB of Shakespeare."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    return Tokenizer.train([text], TokenizerConfig(vocab_size=512, train_bytes=300_000))


def pytest_configure(config):
    """On CI a missing data folder is a broken setup, not a reason to skip a hundred tests: stop with one line."""
    if os.environ.get("CI", "").lower() in ("true", "1") and not SHARED_DATA.is_dir():
        pytest.exit(f"CI=true but the shared data folder {SHARED_DATA} is missing: the tests that read it would all "
                    "be skipped", returncode=pytest.ExitCode.USAGE_ERROR)


@dataclass
class Ran:
    """What a `fermion` command printed and returned, under subprocess.CompletedProcess's names."""
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _process_state_restored():
    """Put back what a command changes for the whole process (seeds, torch's threads and determinism switch, the
    environment, the working directory), so an in-process command leaves the tests after it as it found them."""
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    cwd = os.getcwd()
    os.chdir(REPO)  # where the command's process ran
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


@contextlib.contextmanager
def _hang_guard(args: tuple[str, ...], timeout: float):
    def hung(signum, frame):
        raise TimeoutError(f"`fermion {' '.join(args)}` ran longer than {timeout:.0f} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(int(timeout))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str, input: str | None = None, timeout: float = HANG) -> Ran:
    """`fermion ARGS` run in this process through Typer's CliRunner, from the repository root: the stdout, stderr
    and exit code the command gives, without starting Python and importing torch again for each call. An exception
    the command does not turn into an error line is raised here and fails the test, as would a traceback on stderr.
    The console is 200 columns wide, so no message is wrapped."""
    from typer.testing import CliRunner

    from fermion.cli import app

    with _process_state_restored(), _hang_guard(args, timeout):
        result = CliRunner().invoke(app, list(args), input=input, env={"COLUMNS": "200"}, catch_exceptions=False,
                                    prog_name="fermion")
    assert "Traceback" not in result.stderr, result.stderr[:2500]
    return Ran(args, result.exit_code, result.stdout, result.stderr)


def fermion(*args: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    """`python -m fermion ARGS` in its own process, for the tests where the process is the point; a traceback on
    stderr fails the test outright."""
    result = subprocess.run([sys.executable, "-m", "fermion", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr[:2500]
    return result


TINY_STORIES = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_train_sample_2MiB.txt"


def _files_of(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml pretrained for 20 steps (one checkpoint, step 20): the base the later stages start from,
    shared by every test that only reads it. A test that writes into a run copies it first (shutil.copytree): at
    the end of the session the run must be as it was made."""
    if not TINY_STORIES.is_file():
        pytest.skip(f"{TINY_STORIES} is missing")
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = cli("pretrain", str(REPO / "configs" / "tiny.yaml"), "--set", f"run.dir={run_dir}",
                 "--set", "train.steps=20", "--set", "train.checkpoint_every=20", "--set", "train.eval_every=20")
    assert result.returncode == 0, result.stderr
    made = _files_of(run_dir)
    yield run_dir
    now = _files_of(run_dir)
    changed = {name for name in made.keys() | now.keys() if made.get(name) != now.get(name)}
    assert not changed, f"tests wrote into the shared tiny_run (copy it first): {sorted(changed)[:10]}"


def openai_client(url: str, api_key: str = "unused"):
    """The official openai client on a fermion server's base URL, without retries (a refusal is the answer)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


@contextlib.contextmanager
def running_server(engine, config):
    """`fermion serve`'s app on a free loopback port in a background thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from fermion.serve.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
