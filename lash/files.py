"""Output files that are never half-written: temporary names, renames, and stale-file clean-up.

Every file LASH writes (checkpoints, metrics, reports, plots) goes through a temporary file in
the target's directory, named ``.{name}.{pid}.{random}.tmp``, that is renamed over the target
once complete, so a failure or a kill never leaves a damaged file under the real name. A kill
(SIGKILL) can still leave the temporary file itself; the next write of the same target removes
those whose process is gone. Files get the permissions of an ordinary ``open()`` (0666 less the
umask), not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a size limit); what was there before is intact."""


@contextlib.contextmanager
def _reported(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` of writing ``path`` into a :class:`WriteError` that names it and says the old file stands."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        raise WriteError(f"could not write {path} ({reason}); the file there before, if any, is intact") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` left by processes that no longer run (a kill mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """An open temporary file beside ``path``; removed again if the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path`` atomically.

    Raises:
        WriteError: the write failed (the disk is full, ...); the previous file is untouched.
    """
    path = Path(path)
    with _reported(path), _temporary(path) as (f, tmp):
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration (main thread only; elsewhere a no-op)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(files: dict[str, bytes], out_dir: str | Path) -> list[Path]:
    """Write a set of files into ``out_dir`` so that readers see the old set or the new one.

    Every file is first written in full to a temporary name; only then are they renamed into
    place, one after the other with Ctrl-C and SIGTERM held back, so an interrupt never leaves
    old and new files mixed (a SIGKILL inside the few renames still can). Returns the paths.
    """
    out_dir = Path(out_dir)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            path = out_dir / name
            with _reported(path), _temporary(path) as (f, tmp):
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            staged.append((tmp, path))
        with _signals_deferred():
            for tmp, path in staged:
                os.replace(tmp, path)
            staged = []
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [out_dir / name for name in files]


def check_writable_dir(name: str, path: str | Path) -> Path:
    """Create ``path`` if needed and check a file can be written in it; ``ValueError`` otherwise."""
    if not str(path).strip():
        raise ValueError(f"{name} is empty: name a directory")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r} is not a writable directory ({error.strerror or error})") from None
    return path


LOCK_NAME = ".lash.lock"


@contextlib.contextmanager
def one_writer(name: str, path: str | Path) -> Iterator[Path]:
    """Hold ``path``'s lock file (``fcntl.flock``) for the duration: one run writes into an
    output directory at a time. The lock goes with the process, so a crash leaves none behind;
    the file keeps the last holder's PID for the message a second run gets.

    Raises:
        ValueError: another live process holds the directory (its PID named), or ``path`` is
            not a writable directory.
    """
    path = check_writable_dir(name, path)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"{name} {str(path)!r} is in use by process {holder}: one run writes into a directory "
                             "at a time; wait for it or choose another directory") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)
