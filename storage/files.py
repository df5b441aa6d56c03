"""Writing files so that a crash leaves either the old content or the new, never a mix."""

import os
import tempfile
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
