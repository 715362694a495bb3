"""Writing a directory so that readers see the old one or the new one, never half of either; and the file system
refusing a write (full, read-only, not ours) said in one line that names the path, never as a traceback."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fermion.errors import StorageError

# A failed write with less than this left free is taken for a full disk: torch.save and np.save report a short write
# without its errno ("unexpected pos 576 vs 534", "100000 requested and 8176 written").
FULL_BELOW = 1 << 20
REFUSALS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "its file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def free_space(path: Path) -> int:
    """Bytes free for writing on the file system that holds `path`, or would hold it (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(size: int) -> str:
    """A byte count as people read it: 1536 -> '1.5 KiB'."""
    power = min(int(math.log(max(size, 1), 1024)), len(UNITS) - 1)
    return f"{size:,} B" if power == 0 else f"{size / 1024**power:,.1f} {UNITS[power]}"


def no_space(path: Path, free: int, needed: int | None = None, written: int = 0) -> StorageError:
    """The one line for a disk too full to write `path`: the space it needs (or the lower bound a failed write
    gives) and the space that was free."""
    need = f"about {size_text(needed)}" if needed else f"more than the {size_text(written)} written when it filled"
    return StorageError(f"no space left on device for {path}: it needs {need}, {size_text(free)} free; free some "
                        "space or write elsewhere, then run again (what was there before is unchanged)", path)


def require_space(path: Path, needed: int) -> None:
    """Refuse before writing anything when `needed` bytes will not fit where `path` goes."""
    free = free_space(path)
    if needed > free:
        raise no_space(path, free, needed)


@contextlib.contextmanager
def storage_errors(path: Path, needed: int | None = None, temporary: Path | None = None) -> Iterator[None]:
    """Turn the file system's refusal of a write in the block into one StorageError naming `path` (what is being
    written; `temporary`, where it is being written, is not worth naming). Other errors pass unchanged.

    torch.save wraps a full disk in a RuntimeError ("unexpected pos"), safetensors in its own error and np.save in
    an OSError without an errno, so besides the errno anywhere in the exception's chain, a plain OSError or
    RuntimeError with under FULL_BELOW bytes left counts as a full disk. `needed` (when known) is what the message
    says the write needs; otherwise it says how much had been written under `temporary` when the disk filled. The
    free space it names counts what `temporary` already held, as it was free before the write began."""
    free = free_space(path) + _tree_size(temporary)
    try:
        yield
    except Exception as err:
        if isinstance(err, StorageError) and not _within(err.path, temporary):
            raise
        cause = err.__cause__ if isinstance(err, StorageError) else err  # a file of ours: said for the whole
        reason, filename = _refusal(cause, path)
        if reason is None:
            raise
        if reason == "full":
            raise no_space(path, free, needed, _tree_size(temporary)) from cause
        named = filename is not None and not _within(filename, temporary) and Path(filename) != Path(path)
        where = f" ({filename})" if named else ""
        raise StorageError(f"cannot write {path}: {reason}{where}; choose a location you can write to",
                           path) from cause


def _within(path, temporary: Path | None) -> bool:
    return path is not None and temporary is not None and Path(path).is_relative_to(temporary)


def _refusal(err: BaseException | None, path: Path) -> tuple[str | None, str | None]:
    """Why the file system refused (a REFUSALS reason) and the file it named, or (None, None): not a refusal."""
    cause = err
    while cause is not None and not type(cause).__module__.startswith("fermion"):  # fermion's own say what they mean
        if isinstance(cause, OSError) and cause.errno in REFUSALS:
            return REFUSALS[cause.errno], cause.filename
        if "No space left on device" in str(cause):  # safetensors: "I/O error: No space left on device (os error 28)"
            return "full", None
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    if type(err) in (OSError, RuntimeError) and free_space(path) < FULL_BELOW:
        return "full", None
    return None, None


def _tree_size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def discard(path: Path) -> None:
    """Delete a temporary file or directory of a failed write, emptying its files first: a failed writer's handle,
    kept open by the exception that reports it (torch.save's is), would otherwise hold the space until that
    exception is gone, and a full disk would stay full. Only for what no reader can have opened yet."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
    for file in files:
        if not file.is_symlink():
            with contextlib.suppress(OSError):
                os.truncate(file, 0)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # a read-only file system refuses even to unlink what is not there
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_dir(out: Path, marker: str, error: type[Exception], what: str,
                 keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; when the block succeeds it becomes `out`.

    An existing `out` is replaced only when it holds `marker` (an earlier output of the same kind) or is empty, so
    a mistyped path never deletes someone's files; otherwise `error` names the path. Files of `out` matching a
    `keep` pattern (another command's additions, such as the model card in an export) do not count against that,
    and are carried into the new directory unless the block wrote its own. On failure the temporary directory
    goes and `out` is left as it was; a refused write becomes a StorageError (storage_errors).
    """
    out = Path(out)
    kept = [f for pattern in keep for f in out.glob(pattern) if f.is_file()] if out.is_dir() else []
    others = [f for f in out.iterdir() if f not in kept] if out.is_dir() else []
    if out.exists() and others and not (out / marker).is_file():
        raise error(f"{out} exists and is not {what}; choose a new or empty directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with storage_errors(out, temporary=tmp):
            discard(tmp)
            tmp.mkdir(parents=True)
            yield tmp
            for f in kept:
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)  # not discard(): a reader may still have its files open
    finally:
        discard(tmp)


@contextlib.contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder made if missing); when the block succeeds it is renamed to
    `path` (whole or not at all). A refused write becomes a StorageError (storage_errors)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with storage_errors(path, temporary=tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        discard(tmp)
