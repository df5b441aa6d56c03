"""Writing files so that a crash leaves either the old content or the new, never a mix."""

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plora.storage.crashpoints import crash_point


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, then fsync the folder: without that last
    step a power cut can undo the rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point(f"mid-write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def discard_partial_writes(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the temp files of `names` that a killed write_atomically left in `folder`.

    Only safe while nothing else writes there, e.g. under the folder owner's lock."""
    for name in names:
        for stray in Path(folder).glob(f".{name}.*"):
            stray.unlink(missing_ok=True)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an flock on `lock_file` (made if missing) for the block, waiting for any other holder:
    for work that processes sharing a folder must do once, not side by side. The kernel drops
    the lock with its holder, SIGKILL included."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
