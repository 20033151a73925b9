"""Atomic file writes, hashing and file locks: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows: no flock; writers there are not protected against each other
    fcntl = None

from ..errors import OutputNotWritable

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform lets a directory be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(path: Path) -> Path:
    """Fail early, before any expensive work, if `path` cannot be written."""
    path = Path(path).expanduser().resolve()
    parent = path.parent
    if path.is_dir():
        raise OutputNotWritable(f"output path {str(path)!r} is a directory; give a file name such as {str(path / 'image.png')!r}")
    if not parent.is_dir():
        raise OutputNotWritable(f"output folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"output folder {str(parent)!r} is not writable; choose another --out")
    return path


def write_temp_beside(path: Path, data: bytes) -> Path:
    """Write `data` to a fsynced temp file in `path`'s folder; the caller renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def make_temp_dir(beside: Path) -> Path:
    """A hidden folder next to `beside`, to be renamed onto it once complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-", dir=beside.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def relax_permissions(tree: Path) -> None:
    """Give every file under `tree` ordinary permissions (some writers, onnx's external data among them, make 0600)."""
    mode = 0o666 & ~_umask()
    for p in tree.rglob("*"):
        if p.is_file():
            os.chmod(p, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = write_temp_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None):
    """An exclusive flock on the file `path` (created if missing) while inside; the kernel drops it when the
    holder dies, so a killed process never blocks the next one. on_wait: called once when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
