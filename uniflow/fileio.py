"""Atomic file and folder writes: a reader sees the old content or the new one, never a half-written mix.

Every writer in the project goes through here (checkpoints, exports, logs, datasets, sample grids), so the rules
about temporary names, fsync, signals and clean-up live in one place:
- temporaries are hidden siblings named `.<name>.tmp-<pid>-<random>` (folders: also `.<name>.old-<pid>`), so readers
  that skip hidden names never see them, and the next write to the same destination removes those of dead processes;
- a failure, SIGINT or SIGTERM during a write removes the temporaries (SIGINT ends as KeyboardInterrupt, exit 130;
  SIGTERM as SystemExit(143));
- writing into an existing folder replaces only the files the writer produces, one atomic rename per file: what the
  writer did not write is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from uniflow.errors import OutputError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_STALE = re.compile(r"^\.(?P<name>.+?)(?:\.tmp-|\.old-)(?P<pid>\d+)(?:-.*)?$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _raise_terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, so `finally`/`except` clean-up
    runs instead of the process dying with its temporaries on disk. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupted)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the hidden temporaries a killed writer left beside `path` (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`)
    whose process is gone; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        m = _STALE.match(entry.name)
        if not m or m.group("name") != path.name or _pid_alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def is_temporary(name: str) -> bool:
    """True for the hidden temporaries this module creates (readers skip them)."""
    return bool(_STALE.match(name))


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}{TMP_MARK}{os.getpid()}-"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a hidden sibling, fsync, and rename it over `path`."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) to produce the file under a hidden sibling name, then rename it over `path` (for writers
    that want a file name, such as PIL's save or safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file path to write")
    clean_stale(path)
    with signals_as_exceptions():
        fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            _fsync_file(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(not is_temporary(p.name) for p in path.iterdir())


def atomic_write_dir(dest: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) on a hidden sibling folder, then move its content into `dest`.

    A missing or empty `dest` is replaced by the new folder in one rename. An existing `dest` keeps everything the
    writer did not produce: each top-level entry of the new folder is renamed over its namesake (atomic per file), so
    callers decide beforehand whether replacing those names is allowed (see `uniflow.checkpoint.check_destination`).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{dest}: exists and is a file, expected a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    with signals_as_exceptions():
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
        old: Path | None = None
        try:
            write(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700; a shipped checkpoint should be readable by others
            for f in tmp.rglob("*"):
                if f.is_file():
                    os.chmod(f, 0o644)
                    _fsync_file(f)
            if not dest.exists() or _is_empty_dir(dest):
                if dest.exists():
                    old = dest.parent / f".{dest.name}{OLD_MARK}{os.getpid()}"
                    os.replace(dest, old)
                os.replace(tmp, dest)
            else:
                for entry in sorted(tmp.iterdir()):
                    target = dest / entry.name
                    clean_stale(target)
                    if target.is_dir() and not target.is_symlink():
                        old = dest / f".{entry.name}{OLD_MARK}{os.getpid()}"
                        os.replace(target, old)
                        os.replace(entry, target)
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.replace(entry, target)
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest
