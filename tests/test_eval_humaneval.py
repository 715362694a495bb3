"""HumanEval: every canonical solution passes in the sandbox; wrong, endless and harmful completions fail, and what
they try to do to files, the network or other processes does not happen; pass@k and the loader behave."""

import math
import socket
import time
from fractions import Fraction

import pytest
from conftest import SHARED_DATA, tiny_model

from fermion.data.sources import DataError
from fermion.eval import humaneval
from fermion.eval.humaneval import Execution, Problem
from fermion.eval.results import TaskOptions
from fermion.infer.lm import EvalModel

DATA = SHARED_DATA / "eval" / "humaneval" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    return humaneval.load(DATA)


def attempt(problem: Problem, *lines: str, timeout: float = 60.0) -> Execution:
    """The canonical solution with `lines` run first in the function's body: a completion that answers correctly
    after doing something else, so that only the something else can make it fail."""
    body = "".join(f"    {line}\n" for line in lines)
    return humaneval.check(problem, body + problem.canonical_solution, timeout)


def test_every_canonical_solution_passes(problems):
    assert len(problems) == 164
    executions = humaneval.check_all(problems, [p.canonical_solution for p in problems], workers=2)
    failures = {p.task_id: e.detail[-300:] for p, e in zip(problems, executions, strict=True) if not e.passed}
    assert failures == {}
    assert {e.status for e in executions} == {"passed"}


def test_a_wrong_solution_fails_with_the_failed_assertion_in_the_detail(problems):
    execution = humaneval.check(problems[0], "    return False\n")
    assert (execution.passed, execution.status) == (False, "failed")
    assert "AssertionError" in execution.detail


def test_an_endless_loop_is_stopped_at_the_timeout(problems):
    start = time.monotonic()
    execution = humaneval.check(problems[0], "    while True:\n        pass\n", timeout=2.0)
    assert (execution.passed, execution.status) == (False, "timeout")
    assert 2.0 <= time.monotonic() - start < 5.0


def test_exiting_early_does_not_count_as_passing(problems):
    execution = humaneval.check(problems[0], "    exit(0)\n")
    assert execution.status == "failed"
    assert "exited" in execution.detail


# Every descriptor a program might take for the channel its result goes back on.
EVERY_DESCRIPTOR = ("for fd in range(1, 1024):\n        try:\n            os.write(fd, {what})\n"
                    "        except OSError:\n            pass")


@pytest.mark.parametrize("lines", [
    ["import os", "os._exit(0)"],
    ["import sys", "sys.exit(0)"],
    ["import os, signal", "os.kill(os.getpid(), signal.SIGTERM)"],
    ["import os, signal", "os.killpg(os.getpgid(0), signal.SIGKILL)"],
    ["import os", "try:", "    pass", "finally:", "    raise SystemExit(0)"],
    ["import os", "print('passed', flush=True)", "os._exit(0)"],
    ["import os, sys", EVERY_DESCRIPTOR.format(what="b'passed\\n' + sys.stdin.buffer.read()"), "os._exit(0)"],
    ["import os", EVERY_DESCRIPTOR.format(what="bytes(32)"), "os._exit(0)"],
], ids=["os._exit", "sys.exit", "os.kill", "os.killpg", "SystemExit-in-finally", "prints-passed",
        "writes-stdin-everywhere", "writes-a-token-everywhere"])
def test_ending_before_the_tests_ran_to_the_end_is_never_a_pass(problems, lines):
    """A pass is proven by the child once the tests ran, not inferred from exit status 0 (os._exit(0) passed)."""
    execution = attempt(problems[0], *lines)
    assert (execution.passed, execution.status) == (False, "failed"), execution.detail
    assert humaneval.check(problems[0], problems[0].canonical_solution).passed  # the right answer still passes


@pytest.mark.parametrize("lines", [
    ["import os", "os.remove({file!r})"],
    ["import shutil", "shutil.rmtree({folder!r})"],
    ["open({file!r}, 'w').write('gone')"],
], ids=["os.remove", "shutil.rmtree", "open-for-writing"])
def test_a_completion_cannot_delete_or_overwrite_a_file_outside_its_directory(problems, tmp_path, lines):
    folder = tmp_path / "precious"
    folder.mkdir()
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("keep me")
    execution = attempt(problems[0], *(line.format(file=str(sentinel), folder=str(folder)) for line in lines))
    assert execution.status == "failed"
    assert "PermissionError: sandbox" in execution.detail
    assert sentinel.read_text() == "keep me"


def test_a_completion_cannot_open_a_network_connection(problems):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        execution = attempt(problems[0], "import socket", f"socket.create_connection(('127.0.0.1', {port}))")
        assert execution.status == "failed"
        assert "PermissionError: sandbox" in execution.detail
        with pytest.raises(BlockingIOError):  # nothing ever connected
            server.accept()


@pytest.mark.parametrize("lines", [
    ["import os", "os.system('touch {marker}')"],
    ["import subprocess", "subprocess.run(['touch', {marker!r}])"],
    ["import ctypes", "ctypes.CDLL(None).system(b'touch {marker}')"],
], ids=["os.system", "subprocess.run", "ctypes"])
def test_a_completion_cannot_start_a_process(problems, tmp_path, lines):
    marker = tmp_path / "created-by-a-child-process"
    execution = attempt(problems[0], *(line.format(marker=str(marker)) for line in lines))
    assert execution.status == "failed"
    assert "PermissionError: sandbox" in execution.detail
    assert not marker.exists()


def test_a_memory_bomb_fails_without_hurting_this_process(problems):
    start = time.monotonic()
    execution = attempt(problems[0], "hoard = bytearray(10 * 1024**3)")
    assert execution.status == "failed"
    assert "MemoryError" in execution.detail
    assert time.monotonic() - start < 5.0
    assert humaneval.check(problems[0], problems[0].canonical_solution).passed


def test_a_program_can_use_its_own_working_directory(problems):
    execution = attempt(problems[0], "import os, shutil, tempfile", "os.makedirs('scratch/deeper')",
                        "open('scratch/deeper/notes.txt', 'w').write('ok')", "tempfile.mkstemp()",
                        "shutil.rmtree('scratch')")
    assert execution.status == "passed", execution.detail


def test_the_detail_keeps_the_end_of_a_long_output():
    execution = humaneval.execute("print('x' * 100_000)\nraise ValueError('the real reason')\n")
    assert execution.status == "failed"
    assert len(execution.detail) <= humaneval.OUTPUT_CHARS
    assert execution.detail.rstrip().endswith("ValueError: the real reason")


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),  # pass@1 is the fraction that passed
    (10, 3, 2, 1 - 21 / 45),  # 1 - C(7, 2) / C(10, 2)
    (5, 4, 2, 1.0),  # any 2 of the 5 include a passing one
    (200, 1, 100, 0.5),  # the one passing sample is in half of all 100-subsets
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stays_exact_where_the_binomials_are_huge():
    exact = 1 - Fraction(math.comb(900, 500), math.comb(1000, 500))  # numbers of about 300 digits
    assert humaneval.pass_at_k(1000, 100, 500) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="c <= n"):
        humaneval.pass_at_k(5, 6, 1)


def test_a_completion_is_cut_at_the_first_stop_sequence():
    body = "    if x:\n        # a comment inside the body stays\n        return 1\n    return 0\n"
    assert humaneval.cut_at_stop(body) == body
    assert humaneval.cut_at_stop(body + "\n\ndef helper():\n    pass\n") == body + "\n"
    assert humaneval.cut_at_stop(body + "\nprint(f(1))\n# test\n") == body


def test_load_names_the_file_line_and_missing_field(tmp_path):
    good = '{"task_id": "t/0", "prompt": "def f():\\n", "canonical_solution": "    return 1\\n", ' \
           '"test": "def check(c):\\n    assert c() == 1\\n", "entry_point": "f"}'
    path = tmp_path / "problems.jsonl"
    path.write_text(good + "\n" + good.replace(', "entry_point": "f"', "") + "\n")
    assert [p.task_id for p in humaneval.load(path, limit=1)] == ["t/0"]
    with pytest.raises(DataError, match=rf"{path}:2: field 'entry_point' is missing"):
        humaneval.load(path)


def test_run_scores_a_model_and_records_every_problem(shakespeare_tokenizer):
    if not DATA.is_file():
        pytest.skip(f"{DATA} is missing")
    lm = EvalModel(tiny_model(vocab_size=512), shakespeare_tokenizer)
    result = humaneval.run(lm, TaskOptions(data_dir=SHARED_DATA / "eval", limit=2, max_new_tokens=8))
    assert (result.task, result.n, result.shots) == ("humaneval", 2, 0)
    assert result.metric("pass@1").value == 0.0  # random weights write no working code
    assert [s["task_id"] for s in result.samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(s["status"] == "failed" and s["detail"] for s in result.samples)
    assert all(set(s) == {"task_id", "completion", "status", "detail"} for s in result.samples)
