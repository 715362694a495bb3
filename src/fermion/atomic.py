"""Writing a directory so that readers see the old one or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_dir(out: Path, marker: str, error: type[Exception], what: str,
                 keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; when the block succeeds it becomes `out`.

    An existing `out` is replaced only when it holds `marker` (an earlier output of the same kind) or is empty, so
    a mistyped path never deletes someone's files; otherwise `error` names the path. Files of `out` matching a
    `keep` pattern (another command's additions, such as the model card in an export) do not count against that,
    and are carried into the new directory unless the block wrote its own. On failure the temporary directory
    goes and `out` is left as it was.
    """
    out = Path(out)
    kept = [f for pattern in keep for f in out.glob(pattern) if f.is_file()] if out.is_dir() else []
    others = [f for f in out.iterdir() if f not in kept] if out.is_dir() else []
    if out.exists() and others and not (out / marker).is_file():
        raise error(f"{out} exists and is not {what}; choose a new or empty directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in kept:
            if not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed to `path` (whole or not at all)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
