"""Shared test helpers: tiny models with non-trivial weights, and a small tokenizer trained on real text."""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


def fermion(*args: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    """Run the `fermion` command from the repository root; a traceback on stderr fails the test outright."""
    result = subprocess.run([sys.executable, "-m", "fermion", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr[:2500]
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml pretrained for 20 steps (one checkpoint, step 20): the base the later stages start from."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = fermion("pretrain", str(REPO / "configs" / "tiny.yaml"), "--set", f"run.dir={run_dir}",
                     "--set", "train.steps=20", "--set", "train.checkpoint_every=20", "--set", "train.eval_every=20")
    assert result.returncode == 0, result.stderr
    return run_dir


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
