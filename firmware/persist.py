# Small files on the board's flash, written so that a power cut at any instant
# leaves the old content or the new, never a mix: write a sibling, then rename
# (littlefs renames atomically). One helper for every small state the board
# keeps: boot id, frame-counter bound, meter checkpoint, config.
import os

writes = 0      # files committed since boot, for health and the wear figures


def write_atomic(path, data):
    global writes
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)
    writes += 1


def read(path, default=None):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return default


def read_int(path, default=0):
    data = read(path)
    try:
        return int(data) if data else default
    except ValueError:
        return default


def write_int(path, value):
    write_atomic(path, b"%d" % value)


def next_boot_id(path="boot_id"):
    boot_id = read_int(path, 0) + 1
    write_int(path, boot_id)
    return boot_id
