"""HumanEval (Chen et al., 2021): pass@1 of generated Python functions, judged by running each problem's tests.

The model completes a function from its signature and docstring; the completion is cut at the standard stop
sequences, and `prompt + completion + test + check(entry_point)` is run. Running model-written code is the risk
here, so each program runs in its own process, behind three layers:

1. the process: the same interpreter in isolated mode (`-I`: no PYTHON* variables, no user site, no script
   directory on sys.path), a fresh temporary working directory (also HOME and TMPDIR) removed afterwards, an
   environment holding nothing of ours, stdin closed, its own session so that a timeout kills the whole group;
2. resource limits set by the child on itself before the program starts (address space, CPU seconds, file size,
   open files, no core dumps), so a memory bomb gets a MemoryError instead of the machine's memory;
3. an audit hook (which Python offers no way to remove) that raises PermissionError when the program writes,
   deletes, renames, links or changes files outside its working directory, opens a socket, starts or signals a
   process, changes its limits, or loads ctypes. Programs get the standard library; packages that load ctypes
   (numpy among them) cannot be imported.

A pass is proven, not inferred from the exit status (a program can end with status 0 before its tests ran:
`os._exit(0)`): the parent draws a random token for each run and hands it to the child on stdin, which the child
then closes; the child writes it back on a pipe of its own only once the program, its tests included, has run to
the end. Anything else (no token, another one, a nonzero status) is a fail, whatever the program printed.

This stops what model-written code plausibly does by accident or naively (`os.remove`, `shutil.rmtree`,
`subprocess.run`, network calls, exiting early, endless loops, huge allocations). It is not a boundary against code
written to escape it (such code could find the token in its own process): for that, run evaluations inside a
container or VM. It needs a POSIX system; elsewhere `execute` refuses to run anything, and limits the system lacks
are named in a warning.
"""

from __future__ import annotations

import glob
import inspect
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fermion.config import SourceConfig
from fermion.data.sources import DataError, iter_records
from fermion.eval.results import TaskOptions, TaskResult, mean_metric
from fermion.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from fermion.infer.lm import EvalModel

# Where a completion stops being the function's body (the set the HumanEval paper and lm-evaluation-harness use).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
DEFAULT_MAX_NEW_TOKENS = 384
MEMORY_LIMIT = 2 << 30  # bytes of address space
FILE_SIZE_LIMIT = 16 << 20  # bytes any one file (the captured output included) may grow to
OPEN_FILES_LIMIT = 64
OUTPUT_CHARS = 4000  # of the program's output kept as the detail: its end, where a traceback says what failed
PROGRAM_FILE = "program.py"


@dataclass
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclass
class Execution:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str  # the end of the program's output, or why it was stopped


def load(path: str | Path, limit: int | None = None) -> list[Problem]:
    """The problems of a HumanEval jsonl file (gzip-compressed when it ends in .gz), at most `limit` of them; when
    the file is missing, the Hugging Face dataset openai/openai_humaneval."""
    if Path(path).is_file():
        source = SourceConfig(name="humaneval", paths=[glob.escape(str(path))], max_documents=limit)
    else:
        source = SourceConfig(name="humaneval", dataset="openai/openai_humaneval", split="test", max_documents=limit)
    names = [f.name for f in fields(Problem)]
    problems = []
    for where, record in iter_records(source):
        for name in names:
            if not isinstance(record.get(name), str):
                raise DataError(f"{where}: field {name!r} is missing or not a string "
                                f"(a HumanEval record has {', '.join(names)})")
        problems.append(Problem(**{name: record[name] for name in names}))
    return problems


def cut_at_stop(completion: str) -> str:
    """The completion up to the first stop sequence: a model may run past the function it was asked for."""
    found = [i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
    return completion[:min(found, default=len(completion))]


def program_for(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def check(problem: Problem, completion: str, timeout: float = 10.0) -> Execution:
    return execute(program_for(problem, completion), timeout)


def check_all(problems: Sequence[Problem], completions: Sequence[str], timeout: float = 10.0,
              workers: int = 2) -> list[Execution]:
    """check() each (problem, completion), `workers` processes at a time; results in the problems' order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait: each check is its own process
        return list(pool.map(lambda problem, completion: check(problem, completion, timeout), problems,
                             completions))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed as a
    product of ratios so no huge binomial coefficient is ever formed."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples includes a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def run(lm: EvalModel, options: TaskOptions) -> TaskResult:
    """Greedy completions of every problem's prompt, scored by running its tests. Chat models get the raw prompt
    too: HumanEval is code completion, and that is how it is reported for them."""
    problems = load(options.data_dir / "humaneval" / "HumanEval.jsonl.gz", options.limit)
    params = SamplingParams(max_new_tokens=options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
                            stop=list(STOP_SEQUENCES))
    completions = [cut_at_stop(c.text) for c in lm.generate([p.prompt for p in problems], params)]
    executions = check_all(problems, completions)
    samples = [{"task_id": p.task_id, "completion": c, "status": e.status, "detail": e.detail}
               for p, c, e in zip(problems, completions, executions, strict=True)]
    return TaskResult("humaneval", [mean_metric("pass@1", [float(e.passed) for e in executions])],
                      n=len(problems), shots=0, samples=samples)


# ------------------------------------------------------------------------------------------------ the sandbox


def execute(program: str, timeout: float = 10.0) -> Execution:
    """Run a Python program in the sandbox described above; it passes when it runs to its end within `timeout`
    seconds of wall-clock time, proven by the token it reports back, and exits normally."""
    if os.name != "posix":
        raise RuntimeError("HumanEval runs model-written code only inside a sandbox that needs a POSIX system "
                           f"(process groups, resource limits); this one is {os.name!r}")
    token = secrets.token_hex(16).encode("ascii")
    # The output goes to a file, not a pipe: a flood of it cannot fill our memory.
    with tempfile.TemporaryDirectory(prefix="fermion-humaneval-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as output, _ResultPipe() as result:
        root = os.path.realpath(workdir)
        Path(root, PROGRAM_FILE).write_text(program, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _child_source(root, _limits(timeout), result.write_end)], cwd=root,
            env={"HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "PATH": os.defpath},
            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(result.write_end,))
        result.close_write_end()  # the child's copy is the only one left: reading meets its end once it exits
        _hand_over(process, token)
        timed_out = not _finished(process, timeout)
        return _verdict(process.returncode, result.read() == token, timed_out, _tail(output), timeout)


class _ResultPipe:
    """The pipe the child reports its token on; both ends closed on leaving, whatever happened."""

    def __enter__(self) -> _ResultPipe:
        self.read_end, self.write_end = os.pipe()
        return self

    def close_write_end(self) -> None:
        if self.write_end is not None:
            os.close(self.write_end)
            self.write_end = None

    def read(self) -> bytes:
        """What the child wrote, once it has exited; never waits (a process it left behind could hold the pipe)."""
        os.set_blocking(self.read_end, False)
        try:
            return os.read(self.read_end, 1024)
        except BlockingIOError:
            return b""

    def __exit__(self, *exc) -> None:
        self.close_write_end()
        os.close(self.read_end)


def _hand_over(process: subprocess.Popen, token: bytes) -> None:
    """The token on the child's stdin, closed after it (a child that died at once no longer reads: it fails)."""
    try:
        process.stdin.write(token)
        process.stdin.close()
    except BrokenPipeError:
        pass


def _finished(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process; past the timeout kill its whole group (the process id is the group's id, and still
    ours because the process has not been reaped yet) and return False."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


def _tail(output: IO[bytes]) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - 4 * OUTPUT_CHARS))  # a UTF-8 character is at most 4 bytes
    text = output.read().decode("utf-8", errors="replace")[-OUTPUT_CHARS:]
    if size >= FILE_SIZE_LIMIT:  # nothing more could be written, not even the traceback saying why it failed
        text += f"\n[output reached the {FILE_SIZE_LIMIT >> 20} MiB limit]"
    return text


def _verdict(returncode: int, proven: bool, timed_out: bool, output: str, timeout: float) -> Execution:
    if timed_out or returncode == -signal.SIGXCPU:  # the wall clock or the CPU-time limit ran out
        return Execution(False, "timeout", f"no result within the {timeout:g} s limit\n{output}".rstrip())
    if proven and returncode == 0:
        return Execution(True, "passed", output)
    if returncode < 0:
        output += f"\nkilled by {signal.Signals(-returncode).name}"
    elif returncode == 0:
        output += "\nthe program ended (status 0) before its tests ran to the end"
    return Execution(False, "failed", output)


def _limits(timeout: float) -> dict[str, tuple[int, int]]:
    """The resource limits (soft, hard) the child sets on itself; any this system lacks are named in a warning."""
    import resource  # POSIX only: imported once execute() has checked that this is POSIX

    cpu_seconds = math.ceil(timeout) + 1  # past the wall-clock timeout, so that one normally fires first
    wanted = {"RLIMIT_AS": (MEMORY_LIMIT, MEMORY_LIMIT), "RLIMIT_CPU": (cpu_seconds, cpu_seconds + 1),
              "RLIMIT_FSIZE": (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
              "RLIMIT_NOFILE": (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT), "RLIMIT_CORE": (0, 0)}
    missing = [name for name in wanted if not hasattr(resource, name)]
    if missing:
        warnings.warn(f"HumanEval sandbox: this system has no {', '.join(missing)}; programs run without "
                      "those limits", stacklevel=3)
    return {name: value for name, value in wanted.items() if name not in missing}


def _child_source(root: str, limits: dict[str, tuple[int, int]], result_fd: int) -> str:
    """The code the child interpreter runs: `_sandboxed_main`'s source and a call to it with this run's values
    (never the token: the command line can be read in /proc)."""
    return (f"{inspect.getsource(_sandboxed_main)}\n"
            f"_sandboxed_main({root!r}, {limits!r}, {PROGRAM_FILE!r}, {result_fd!r})\n")


def _sandboxed_main(root: str, limits: dict, program_file: str, result_fd: int) -> None:
    """Runs only in the child interpreter, which receives this function's source (so it imports what it needs
    itself): take the token from stdin, set the limits, install the guard, run the program, and report the token
    on `result_fd` once it ran to the end. Never call it in this process: the guard cannot be removed once
    installed."""
    import os
    import resource
    import sys

    token = sys.stdin.buffer.read()  # all the parent sends; then stdin reads as /dev/null did
    empty = os.open(os.devnull, os.O_RDONLY)
    os.dup2(empty, 0)
    os.close(empty)
    report, close = os.write, os.close  # taken now: the program may replace what the os module holds
    for name, (soft, hard) in limits.items():  # lowering a hard limit cannot be undone without privileges
        resource.setrlimit(getattr(resource, name), (soft, hard))
    with open(program_file, encoding="utf-8") as f:
        source = f.read()

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # Audit events that change the file system: for each, the positions of (a path, its dir_fd or None) in the
    # event's arguments. A path may be a file descriptor (fchmod, ftruncate): /proc says what it points to.
    path_events = {"os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.chmod": [(0, 2)],
                   "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)],
                   "os.setxattr": [(0, None)], "os.removexattr": [(0, None)], "shutil.rmtree": [(0, 1)],
                   "os.rename": [(0, 2), (1, 3)], "os.link": [(0, 2), (1, 3)],
                   "os.symlink": [(1, 2)],  # where the link goes is checked whenever it is written through
                   "sqlite3.connect": [(0, None)]}  # SQLite opens its files itself, not through open()
    denied_events = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                     "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
                     "resource.setrlimit", "resource.prlimit"}
    # ctypes can call any C function, past every check here; _posixsubprocess starts processes without raising
    # an audit event (and subprocess cannot be imported without it).
    denied_imports = {"_ctypes", "_posixsubprocess"}

    def resolved(event: str, path, dir_fd=None) -> str:
        try:
            if isinstance(path, int):
                return os.path.realpath(os.readlink(f"/proc/self/fd/{path}"))
            path = os.fsdecode(path)
            if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            return os.path.realpath(path)
        except OSError:
            raise PermissionError(f"sandbox: {event}: cannot tell where {path!r} points") from None

    def inside(target: str) -> bool:
        return target == root or target.startswith(root + os.sep)

    def check_open(path, flags: int) -> None:
        if isinstance(path, int):  # wraps a descriptor already open, checked when it was opened
            return
        target = resolved("open", path)
        if flags & write_flags and not (inside(target) and (os.path.isfile(target) or not os.path.exists(target))):
            raise PermissionError(f"sandbox: writing {path!r} is not allowed (only regular files in the "
                                  "working directory)")
        if not inside(target) and os.path.isdir(target):  # a directory's descriptor would let dir_fd= reach out
            raise PermissionError(f"sandbox: opening the directory {path!r} is not allowed")

    def guard(event: str, args: tuple) -> None:
        if event == "open":
            check_open(args[0], args[2])
        elif event in path_events:
            for path_at, dir_fd_at in path_events[event]:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
                if not inside(resolved(event, args[path_at], dir_fd)):
                    raise PermissionError(f"sandbox: {event} on {args[path_at]!r} is not allowed (outside the "
                                          "working directory)")
        elif event in denied_events or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import" and args[0] in denied_imports:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")

    sys.addaudithook(guard)
    try:
        exec(compile(source, program_file, "exec"), {"__name__": "__main__"})
    except SystemExit as stop:  # exit(0) inside a function under test must not count as passing its tests
        raise SystemExit(f"the program exited ({stop.code!r}) before its tests finished") from None
    report(result_fd, token)  # reached only when the program, its tests included, ran to the end
    close(result_fd)
