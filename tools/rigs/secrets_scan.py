"""Look for device keys where they must not be: logs, reports, MQTT payloads, status pages, stores.

    scan(paths_or_texts, keys) -> [Hit]

paths_or_texts: each item is a path (str or Path: a file, or a folder scanned recursively without
following symlinks), a bytes-like object (a source named "<bytes #i>"), or a (name, data) pair
(data: bytes, or str taken as UTF-8) for what never was a file: a process's stdout, the payloads an
MQTT subscriber saw, a page fetched over HTTP. keys: 16-byte keys, as a list (each named by its
index) or a dict {name: key} (e.g. {device_id: key}).

Every key is looked for in these forms (the `encoding` of a hit):
  raw                the 16 bytes (a BLOB in SQLite, CBOR bytes, a flash image)
  hex, HEX, hex-mixed  32 hex digits in any case (the case is named from what was found)
  base64, base64-nopad, base64url, base64url-nopad   the key alone, standard and URL-safe alphabets
  base64-inside, base64url-inside   the key inside a longer base64 text, at any of the 3 byte alignments
                     (the 16 to 20 characters that depend on the key's bits alone)
  py-repr            Python's repr of the bytes without b'' (what a log of repr(key) would show)
  int-list           the bytes as decimal numbers, ", " apart (json.dumps(list(key)) or list's repr)

Files are read as bytes in chunks (any size, any content). An SQLite database (its header) is also
read row by row from a private copy (with its -wal, so committed pages not yet checkpointed count):
a text or blob cell is scanned as a source "<file>#<table>.<column>[rowid]", which finds a value that
SQLite split over overflow pages; the raw file scan finds what is in free pages and the journal.

A Hit names the source, the encoding, the offset (in bytes, in the file or the cell) and the key's
name, never the key: its repr and str carry no key material, and nothing here prints or logs a key.
Not looked into: compressed files (.gz, .zip), other encodings (UTF-16, percent-encoding).
"""

import base64
import os
import shutil
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple

KEY_BYTES = 16
CHUNK = 4 << 20
SQLITE_MAGIC = b"SQLite format 3\x00"


class Hit(NamedTuple):
    source: str      # a file path, "<file>#<table>.<column>[rowid]", or the name given with a byte string
    encoding: str    # raw, hex, HEX, hex-mixed, base64, ... (see the module's docstring)
    offset: int      # where the match starts, in bytes
    key: str         # the key's name (its index, or its name in the keys dict), never the key

    def __str__(self):
        return f"{self.source}: key {self.key} as {self.encoding} at offset {self.offset}"


def forms(key):
    """[(encoding, bytes to find, case_insensitive)] for one key; the same bytes are listed once."""
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes, not {len(key)}")
    out = [("raw", key, False), ("hex", key.hex().encode(), True)]
    for name, enc in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        padded = enc(key)
        out += [(name, padded, False), (name + "-nopad", padded.rstrip(b"="), False)]
        for lead in range(3):
            # the key after `lead` bytes of a longer text: the 4-char groups made of key bits alone
            start = (3 - lead) % 3
            whole = (KEY_BYTES - start) // 3 * 3
            out.append((name + "-inside", enc(key[start:start + whole]), False))
    out.append(("py-repr", repr(key)[2:-1].encode(), False))
    out.append(("int-list", ", ".join(str(b) for b in key).encode(), False))
    seen, unique = set(), []
    for name, needle, fold in out:
        if needle not in seen:
            seen.add(needle)
            unique.append((name, needle, fold))
    return unique


def _named_keys(keys):
    items = keys.items() if isinstance(keys, dict) else enumerate(keys)
    named = [(str(name), bytes(key)) for name, key in items]
    if not named:
        raise ValueError("no keys to look for")
    return named


class _Needles:
    def __init__(self, keys):
        self.list = [(name, enc, needle, fold) for name, key in _named_keys(keys) for enc, needle, fold in forms(key)]
        self.longest = max(len(n) for _k, _e, n, _f in self.list)

    def find(self, data, base, out):
        """Every needle in data; (key, start, end, encoding) into out, offsets + base."""
        folded = None
        for name, enc, needle, fold in self.list:
            hay = data
            if fold:
                folded = data.lower() if folded is None else folded
                hay = folded
            i = hay.find(needle)
            while i >= 0:
                if enc == "hex":
                    text = bytes(data[i:i + len(needle)])
                    enc_found = "hex" if text == text.lower() else "HEX" if text == text.upper() else "hex-mixed"
                else:
                    enc_found = enc
                out.add((name, base + i, base + i + len(needle), enc_found))
                i = hay.find(needle, i + 1)


def _settle(source, found):
    """Hits from spans: a span inside another of the same key (base64 without its padding inside the
    padded one, a key's inner base64 inside the whole) is the same leak, named once, by the longer."""
    spans = sorted(found, key=lambda s: (s[0], s[1], -s[2]))
    hits, kept = [], {}
    for name, start, end, enc in spans:
        if any(s <= start and end <= e for s, e in kept.get(name, ())):
            continue
        kept.setdefault(name, []).append((start, end))
        hits.append(Hit(source, enc, start, name))
    return hits


def scan_bytes(data, keys, source="<bytes>", _needles=None):
    needles = _needles or _Needles(keys)
    found = set()
    needles.find(bytes(data), 0, found)
    return _settle(source, found)


def scan_file(path, keys, _needles=None):
    """A file's bytes, in chunks that overlap by the longest form less one byte; an SQLite file's cells too."""
    needles = _needles or _Needles(keys)
    path = Path(path)
    found, base, tail = set(), 0, b""
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
        f.seek(0)
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            data = tail + chunk
            needles.find(data, base - len(tail), found)
            keep = min(len(data), needles.longest - 1)
            tail, base = data[len(data) - keep:], base + len(chunk)
    hits = _settle(str(path), found)
    if head == SQLITE_MAGIC:
        hits += _scan_sqlite(path, needles)
    return hits


def _scan_sqlite(path, needles):
    """Every text and blob cell of every table, read from a private copy of the database and its -wal
    (opening the original, even read-only, may write its -shm or checkpoint a live database)."""
    hits = []
    with tempfile.TemporaryDirectory(prefix="prapa-scan-") as tmp:      # 0700: the copy holds what it holds
        copy = _private_copy(path, tmp)
        try:
            db = sqlite3.connect(copy)
        except sqlite3.Error:
            return hits
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                quoted = '"' + table.replace('"', '""') + '"'
                try:
                    columns = [r[1] for r in db.execute(f"PRAGMA table_info({quoted})")]
                    rows = db.execute(f"SELECT rowid, * FROM {quoted}")
                except sqlite3.Error:        # a WITHOUT ROWID table, a virtual table
                    try:
                        rows = ((None, *r) for r in db.execute(f"SELECT * FROM {quoted}"))
                    except sqlite3.Error:
                        continue
                for row in rows:
                    for column, value in zip(columns, row[1:]):
                        if isinstance(value, str):
                            value = value.encode("utf-8", "surrogatepass")
                        if isinstance(value, (bytes, bytearray, memoryview)) and len(value) >= KEY_BYTES:
                            found = set()
                            needles.find(bytes(value), 0, found)
                            hits += _settle(f"{path}#{table}.{column}[{row[0]}]", found)
        except sqlite3.Error:
            pass                             # not readable as a database: the raw scan stands
        finally:
            db.close()
    return hits


def _private_copy(path, folder):
    """path and its -wal copied into folder (a fresh 0700 temp folder), each file 0600; the copy's path."""
    copy = Path(folder) / "db"
    for suffix in ("", "-wal"):
        src = Path(str(path) + suffix)
        if src.is_file():
            fd = os.open(str(copy) + suffix, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out)
    return copy


def _files(folder):
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):      # no symlinks, sockets, FIFOs or devices
                    yield p
            except OSError:
                continue


def scan(paths_or_texts, keys):
    """Every place any key appears, in every form above: [Hit], in the order the sources were given."""
    needles = _Needles(keys)
    hits = []
    for i, item in enumerate(paths_or_texts):
        if isinstance(item, tuple):
            name, data = item
            hits += scan_bytes(data.encode() if isinstance(data, str) else data, None, str(name), needles)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            hits += scan_bytes(item, None, f"<bytes #{i}>", needles)
        else:
            path = Path(item)
            if path.is_dir() and not path.is_symlink():
                for p in _files(path):
                    hits += scan_file(p, None, needles)
            elif path.is_file():
                hits += scan_file(path, None, needles)
            else:
                raise FileNotFoundError(f"{path}: no such file or folder to scan")
    return hits


def keys_from_registry(path):
    """{device id as 8 hex digits: key} from a gateway's registry.db, read from a private copy (the
    original is never opened: a live gateway's WAL and -shm stay as they are)."""
    with tempfile.TemporaryDirectory(prefix="prapa-scan-") as tmp:
        db = sqlite3.connect(_private_copy(path, tmp))
        try:
            rows = db.execute("SELECT device_id, key FROM devices")
            return {f"{device_id:08x}": bytes(key) for device_id, key in rows}
        finally:
            db.close()


def main(argv=None):
    """python -m tools.rigs.secrets_scan --registry registry.db PATH...: one line per hit; exit 1 on a hit."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m tools.rigs.secrets_scan", description=main.__doc__)
    p.add_argument("--registry", required=True, help="the registry.db whose keys to look for")
    p.add_argument("paths", nargs="+", help="files and folders to scan")
    p.add_argument("--allow", action="append", default=[], metavar="PATH",
                   help="a file expected to hold keys (the registry itself, a flash image): hits there are not counted")
    args = p.parse_args(argv)
    keys = keys_from_registry(args.registry)
    allowed = {str(Path(a)) for a in args.allow}
    hits = [h for h in scan(args.paths, keys) if h.source.split("#")[0] not in allowed]
    for h in hits:
        print(h)
    print(f"{len(hits)} hit(s) for {len(keys)} key(s)")
    return 1 if hits else 0


if __name__ == "__main__":
    raise SystemExit(main())
