"""Files written whole or not at all: what the tools and the gateway leave on disk after a cut."""

import os
import tempfile
from pathlib import Path


def write_atomically(path, data, mode=None):
    """Replace path with data: a temp file in the same folder, fsynced, renamed over it, the folder
    fsynced; readers (and a power cut) see the old file or the whole new one. mode=0o600 for secrets:
    the temp file is created with it, so the data is never readable by others even for a moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
