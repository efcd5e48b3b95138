"""Files written whole or not at all: what the tools and the gateway leave on disk after a cut.

A file that holds a device key (the registry's exports, a board's flash image) is written with
mode=PRIVATE: its temp file is created 0600 and exclusive from the first byte, so the key is
never readable by anyone else, not even for the moment before a chmod.
"""

import os
import secrets
from pathlib import Path

PRIVATE = 0o600       # a file that holds a key: the owner alone
SHARED = 0o644        # a build output or anything else meant to be read by others


def write_atomically(path, data, mode=SHARED):
    """Replace path with data: a temp file in the same folder, fsynced, renamed over it, the folder
    fsynced; readers (and a power cut) see the old file or the whole new one.

    The file ends with exactly mode (whatever the umask). The temp file is created with O_EXCL and a
    mode no wider than mode before a byte is written, so data is never more readable than the final
    file. A missing folder is created; for a private file (mode grants nothing to group or others)
    it is created 0700."""
    path = Path(path)
    path.parent.mkdir(mode=0o700 if not mode & 0o077 else 0o777, parents=True, exist_ok=True)
    fd, tmp = _create_exclusive(path, mode)
    try:
        os.fchmod(fd, mode)                 # exact, whatever the umask (it can only narrow the create mode)
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


def _create_exclusive(path, mode):
    """A new sibling .NAME.XXXXXXXX.tmp, opened for writing with mode from the start; (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temp name for {path.name}")
