"""What prapa's arguments may be: text in, a checked value out, or the one error type.

Each type raises UsageError(where, problem, fix); the parser (tools/cli.py's Parser) puts the
argument's name in `where`, so a bad argument reads "--device: '-1' is not a device id; fix: ...",
and the CLI exits 2 before the command has run, so nothing is created. A path type only looks (stat,
access): it creates nothing. A bare type=int or type=float in any of prapa's parsers is
read as whole(0) or number(0) (see Parser._get_value): no command takes a negative count, NaN, infinity
or a number past 32 bits; an option that cannot be 0 either says so with a type from here.
"""

import math
import os
import stat
from pathlib import Path

from protocol.errors import UsageError

U32_MAX = 0xFFFFFFFF            # counts and ids travel as u32 on the wire and in the registry
WHERE = "argument"              # replaced by the parser with the option's name


def _int(text, fix):
    try:
        return int(str(text).strip(), 0)
    except ValueError:
        pass
    try:
        value = float(text)                   # "1e3" and "2.0" are whole numbers a person may type
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value != int(value):
        raise UsageError(WHERE, f"{text!r} is not a whole number", fix) from None
    return int(value)


def whole(lo=1, hi=U32_MAX, unit=""):
    """A whole number lo..hi (decimal or 0x...); the range is in the fix."""
    fix = f"give a whole number from {lo} to {hi}{unit}"

    def convert(text):
        value = _int(text, fix)
        if not lo <= value <= hi:
            raise UsageError(WHERE, f"{value} is out of range", fix)
        return value
    convert.__name__ = f"whole {lo}..{hi}"
    return convert


def number(lo=0.0, hi=float(U32_MAX), above=False, unit=""):
    """A finite number from lo (excluded if above) to hi; NaN and infinity are refused."""
    fix = f"give a number {'above' if above else 'from'} {lo:.12g} {'up ' if above else ''}to {hi:.12g}{unit}"

    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise UsageError(WHERE, f"{text!r} is not a number", fix) from None
        if not math.isfinite(value):
            raise UsageError(WHERE, f"{text!r} is not a finite number", fix)
        if value < lo or (above and value == lo) or value > hi:
            raise UsageError(WHERE, f"{value:g} is out of range", fix)
        return value
    convert.__name__ = f"number {lo:.12g}..{hi:.12g}"
    return convert


count = whole(1, U32_MAX)
positive_seconds = number(0.0, 10 * 365 * 86400.0, above=True, unit=" seconds")


def device_id(text):
    """A device id as the board's config accepts it (1..4294967294, decimal or 0x...)."""
    from tools.role_config import parse_device_id
    return parse_device_id(text)


def host_port(text):
    """HOST:PORT (IPv6 as [::1]:PORT; no HOST for every address), checked and kept as text."""
    host, sep, number_text = str(text).rpartition(":")
    if not sep or not number_text.isdigit() or not 1 <= int(number_text) <= 65535:
        raise UsageError(WHERE, f"{text!r} is not HOST:PORT", "e.g. 0.0.0.0:5683 (port 1 to 65535)")
    return str(text)


def _stat(path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(WHERE, f"{path}: a part of the path is a file, not a folder",
                         "give a path through folders") from None
    except OSError as e:
        raise UsageError(WHERE, f"{path}: {e.strerror}", "give a path this user can reach") from None


def existing_file(text):
    """A regular file this user can read (what is in it is the loader's to check)."""
    path = Path(text)
    st = _stat(path)
    if st is None:
        raise UsageError(WHERE, f"{text}: no such file", "give the path of an existing file")
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(WHERE, f"{text} is a folder", "give the path of a file in it")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(WHERE, f"{text} is not a regular file", "give the path of a file")
    if not os.access(path, os.R_OK):
        raise UsageError(WHERE, f"{text}: permission denied", "make it readable by this user, or run as its owner")
    return str(path)


def _writable_folder(folder, text, what):
    """The nearest existing folder of a path to be created, checked: a folder, writable."""
    while True:
        st = _stat(folder)
        if st is not None:
            break
        folder = folder.parent
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(WHERE, f"{text}: {folder} is a file, not a folder", f"give a {what} path through folders")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(WHERE, f"{text}: cannot write in {folder} (permission denied)",
                         f"give a {what} path this user may write, or make {folder} writable")


def out_dir(text):
    """A folder to write into: an existing writable folder, or one that can be created (not yet made)."""
    path = Path(text)
    st = _stat(path)
    if st is None:
        _writable_folder(path.parent, text, "folder")
    elif not stat.S_ISDIR(st.st_mode):
        raise UsageError(WHERE, f"{text} is a file", "give a folder (it is created if missing)")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(WHERE, f"{text}: permission denied", "give a folder this user may write")
    return str(path)


def new_file(text):
    """A file to be created (never overwritten): absent, in a folder this user may write."""
    path = Path(text)
    st = _stat(path)
    if st is not None:
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a file"
        raise UsageError(WHERE, f"{text} exists ({kind})", "give a new file name; it is never overwritten")
    parent = path.parent
    pst = _stat(parent)
    if pst is None:
        raise UsageError(WHERE, f"no folder {parent}", "create it or give another path")
    _writable_folder(parent, text, "file")
    return str(path)


def file_to_write(text):
    """A file to be created or replaced: not a folder, in a folder that exists or can be created."""
    path = Path(text)
    st = _stat(path)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(WHERE, f"{text} is a folder", "give a file path")
    if st is None:
        _writable_folder(path.parent, text, "file")
    elif not os.access(path, os.W_OK):
        raise UsageError(WHERE, f"{text}: permission denied", "give a file this user may write")
    return str(path)


def socket_path(text):
    """A unix socket to be bound here (an old one is replaced): not a folder, short enough for bind()."""
    if len(os.fsencode(text)) > 100:
        raise UsageError(WHERE, f"{text} is {len(os.fsencode(text))} bytes long",
                         "give a unix socket path of at most 100 bytes (e.g. in /tmp)")
    return file_to_write(text)


def unique_id(text):
    """A board's 6-byte unique id as 12 hex digits (kept as text)."""
    try:
        ok = len(bytes.fromhex(text)) == 6
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(WHERE, f"{text!r} is not 6 bytes of hex", "give 12 hex digits")
    return text


def board(text):
    """A board definition, by name (boards/) or .toml path, loaded and checked now (tools/boards.py);
    kept as text for the command to load."""
    from gateway.config import read_text
    from tools import boards
    if Path(text).suffix == ".toml":
        read_text(text, text, "give a board definition .toml file (UTF-8 text), or a name from boards/")
    boards.load(text)
    return text


def world_setting(text):
    """MODEL.PARAM=VALUE for the world simulator (tools/sim/worlds), VALUE a finite number; kept as text."""
    from tools.sim import worlds
    (params,) = worlds.parse_overrides([text]).values()
    (value,) = params.values()
    if not math.isfinite(value):
        raise UsageError(WHERE, f"{text!r}: {value} is not a finite number", "give a number")
    return text
