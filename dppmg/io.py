"""Atomic file output: every file and folder a user sees is either complete or absent."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dppmg.errors import DppmgError

# mkstemp creates files readable by their owner only; outputs get the usual permissions instead.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise DppmgError(disk_full_message(path)) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(path: str | os.PathLike | None) -> str:
    """What the command line says when a write ran out of space (the temporary file is gone; the old one stays)."""
    return (
        f"no space left on device writing {path or 'an output'}: free some space and rerun the same command; "
        "what was written before is intact"
    )


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the usual suspects in metrics dictionaries.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def staging_dir(final: str | os.PathLike) -> Path:
    """A fresh, empty folder beside `final` to build it in (see `commit_dir`).

    Leftovers from an interrupted earlier attempt at the same `final` are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))


def commit_dir(staging: Path, final: str | os.PathLike) -> None:
    """Move a finished staging folder onto `final`, replacing an older `final` only at the last moment."""
    final = Path(final)
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp made it private
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finished_with(
    marker: str | os.PathLike,
    key: str,
    fingerprint: str,
    overwrite: bool,
    overwrite_key: str,
    rename_key: str,
) -> bool:
    """Whether a finished output (its JSON `marker` file) was built from `fingerprint`: then there is nothing to do.

    A finished output from another config is never silently replaced: without `overwrite` it is an error that
    says how to replace it or keep both. Returns False when there is no finished output or it may be replaced.
    """
    marker = Path(marker)
    if not marker.is_file():
        return False
    if read_json(marker).get(key) == fingerprint:
        return True
    if not overwrite:
        raise DppmgError(
            f"{marker.parent} already holds a result built from a different config or input. "
            f"Pass {overwrite_key}=true to replace it, or {rename_key}=<new name> to keep both."
        )
    return False


# Locks this process holds, with their depth: taking one again (a stage that calls another's code) is not a conflict.
_held: dict[Path, int] = {}


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path` for the block, or raise a DppmgError naming `what` and the PID
    that holds it (each holder writes its PID into the file).

    The OS releases a flock when its process ends in any way, SIGKILL included, so a dead process never leaves a
    stale lock behind; the file stays, with the last holder's PID in it.
    """
    path = Path(path).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DppmgError(
                f"{what} is in use by another process (PID {holder}, lock {path}): wait for it to finish or stop "
                "it; two processes at once would interleave their writes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
    finally:
        os.close(fd)  # releases the lock


_checkpoints_written = 0


def pause_after_checkpoint() -> None:
    """Test hook, called after every training checkpoint is written: with DPPMG_TEST_PAUSE_AFTER_CHECKPOINT=N, the
    process sleeps after its N-th checkpoint, so that a test can kill it at a known point (tests/test_resume.py)."""
    global _checkpoints_written
    _checkpoints_written += 1
    n = os.environ.get("DPPMG_TEST_PAUSE_AFTER_CHECKPOINT")
    if n and _checkpoints_written == int(n):
        import time

        time.sleep(3600)
