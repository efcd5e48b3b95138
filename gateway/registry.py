"""The device registry: which boards this gateway serves, with their keys.

Promise: when add, set_place, retire, import_file or next_downlink_counters returns,
the change is fsynced in SQLite's WAL (journal_mode=WAL, synchronous=FULL),
so a killed process or a power cut never loses it. In particular a block of
downlink counters is on disk before any counter from it is handed out, so a
restart starts above every counter ever used and a (key, nonce) pair never
repeats. last_seen is the exception: it is written at most once a minute per
device (SEEN_WRITE_S), because a per-frame fsync for an informational field
would halve ingest; the latest value is kept in memory for get() and list().

The file holds AES keys, so it is created mode 0600 (SQLite gives its -wal and
-shm files the same mode) and tightened back to 0600 if found looser. Keys
never appear in a repr, a log record or an error message; only export files
carry them, written 0600.

A device may carry a place: a location (lat, lon: WGS84 degrees) and a catchment (a short
name, one MQTT topic level), set at commissioning or later (set_place); the ranking of
suspects groups and maps devices by it (gateway/ranking.py).

The schema is versioned by SQLite's user_version (SCHEMA_VERSION): a registry made by an older
prapa gets the columns it lacks in one durable transaction when it is opened, its devices kept
as they were (no place); one made by a newer prapa is refused rather than guessed at.

registry.db: its SQL lives here, as the store's lives in store.py.
"""

import json
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path
from functools import partial
from typing import NamedTuple

from gateway import files
from gateway.config import parse_json, read_text
from gateway.forward_format import CATCHMENT, CATCHMENT_MAX_BYTES
from gateway.logs import log_event
from protocol.errors import UsageError
from protocol.roles import ROLES

STATES = ("commissioned", "active", "retired")
KEY_BYTES = 16
COUNTER_MAX = 0xFFFFFFFF          # frame counters are u32 in the header
SEEN_WRITE_S = 60
LAST_SEEN_MAX = 2**32            # Unix seconds: past 2106 is not a time a board was seen
EXPORT_FORMAT = "prapa-registry-export"
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
BOARD_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

log = logging.getLogger("prapa.gateway.registry")

_log = partial(log_event, log)   # _log(level, event, exc_info=False, **fields): one JSON object per line


SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id      INTEGER PRIMARY KEY,     -- u32, as in the frame header
    name           TEXT,
    role           TEXT    NOT NULL,
    key            BLOB    NOT NULL,        -- AES-128, 16 bytes
    state          TEXT    NOT NULL,        -- commissioned, active, retired
    board          TEXT,
    firmware       TEXT,
    last_seen      REAL,                    -- Unix seconds
    added_at       REAL    NOT NULL,
    downlink_bound INTEGER NOT NULL DEFAULT 0, -- every downlink counter below this may have been used
    lat            REAL,                    -- WGS84 degrees, with lon; NULL: no location
    lon            REAL,
    catchment      TEXT                     -- the catchment the device serves; NULL: none
);
"""
# user_version of a registry with every column above. 0: made before places (no lat, lon,
# catchment). MIGRATIONS[v] takes a registry from version v to v + 1: columns it lacks are added,
# each with a NULL default, so every device keeps what it had.
SCHEMA_VERSION = 1
MIGRATIONS = (
    (("lat", "REAL"), ("lon", "REAL"), ("catchment", "TEXT")),
)


class RegistryError(UsageError):
    """A device record or export file the registry refuses; names the field and the fix."""


class UnknownDevice(RegistryError):
    def __init__(self, device_id):
        super().__init__(f"device {device_id}", "not in the registry",
                         "commission it first (add) or check the id")


class Device(NamedTuple):
    device_id: int
    name: str | None
    role: str
    key: bytes
    state: str
    board: str | None
    firmware: str | None
    last_seen: float | None
    downlink_bound: int
    lat: float | None = None
    lon: float | None = None
    catchment: str | None = None

    def __repr__(self):
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields if f != "key")
        return f"Device({shown}, key=<hidden>)"

    __str__ = __repr__

    def public(self):
        """The record without its key: what a status page, an API or a log may show."""
        return {f: getattr(self, f) for f in self._fields if f != "key"}


def check_device(device_id, role, key, name=None, board=None, where=None):
    """Validate one record's fields; raise RegistryError naming the field and the fix (never the key)."""
    def fail(field, problem, fix):
        raise RegistryError(f"{where or f'device {device_id!r}'}: {field}", problem, fix)

    if isinstance(device_id, bool) or not isinstance(device_id, int) or not 0 <= device_id <= COUNTER_MAX:
        fail("device_id", f"{device_id!r} is not a 32-bit unsigned id", "use a whole number from 0 to 4294967295")
    if role not in ROLES:
        fail("role", f"{role!r} is not a role", "use one of " + ", ".join(ROLES))
    if not isinstance(key, (bytes, bytearray)):
        fail("key", f"must be bytes, not {type(key).__name__}", f"pass the {KEY_BYTES}-byte AES-128 key as bytes")
    if len(key) != KEY_BYTES:
        fail("key", f"is {len(key)} bytes", f"an AES-128 key is {KEY_BYTES} bytes (32 hex digits)")
    if not any(key):
        fail("key", "is all zeros (a placeholder)", "generate one per device: os.urandom(16)")
    if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
        fail("name", f"{name!r} is not a name", "use 1 to 64 printable characters, or leave it out")
    if board is not None and (not isinstance(board, str) or not BOARD_RE.match(board)):
        fail("board", f"{board!r} is not a board name", "use a name from boards/ (prapa board list), or leave it out")


def _degrees(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_place(location, catchment, where=None):
    """Validate a place: location None or (lat, lon) in WGS84 degrees, catchment None or a short name;
    raise RegistryError naming `where`'s part and the fix. Returns (lat, lon, catchment) as stored."""
    lat = lon = None
    at = (lambda part: f"{where}: {part}" if where else part)
    if location is not None:
        if not isinstance(location, (tuple, list)) or len(location) != 2:
            raise RegistryError(at("location"), f"{location!r} is not a latitude and a longitude",
                                "give both, in degrees: LAT,LON (e.g. 13.7563,100.5018)")
        lat, lon = location
        if not _degrees(lat) or not -90 <= lat <= 90:
            raise RegistryError(at("location"), f"latitude {lat!r} is not -90 to 90 degrees",
                                "give LAT,LON in WGS84 degrees, latitude first (e.g. 13.7563,100.5018)")
        if not _degrees(lon) or not -180 <= lon <= 180:
            raise RegistryError(at("location"), f"longitude {lon!r} is not -180 to 180 degrees",
                                "give LAT,LON in WGS84 degrees, longitude second (e.g. 13.7563,100.5018)")
        lat, lon = float(lat), float(lon)
    if catchment is not None and (not isinstance(catchment, str) or not CATCHMENT.match(catchment)):
        raise RegistryError(at("catchment"), f"{catchment!r} is not a catchment name",
                            f"use 1 to {CATCHMENT_MAX_BYTES} letters, digits, '_', '-' or '.', starting with a "
                            "letter or digit (e.g. khlong-toei-3)")
    return lat, lon, catchment


def parse_location(text, where="location"):
    """LAT,LON as typed (decimal degrees, WGS84) -> (lat, lon), checked; RegistryError naming `where`."""
    parts = str(text).split(",")
    fix = "give both parts, in decimal degrees, latitude first: LAT,LON (e.g. 13.7563,100.5018)"
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise RegistryError(where, f"{text!r} is not LAT,LON", fix)
    try:
        lat, lon = (float(p) for p in parts)
    except ValueError:
        raise RegistryError(where, f"{text!r}: not two numbers", fix) from None
    if not -90 <= lat <= 90:           # also NaN
        raise RegistryError(where, f"latitude {parts[0].strip()} is not -90 to 90 degrees", fix)
    if not -180 <= lon <= 180:
        raise RegistryError(where, f"longitude {parts[1].strip()} is not -180 to 180 degrees", fix)
    return lat, lon


def parse_catchment(text, where="catchment"):
    """A catchment name as typed, checked; RegistryError naming `where`."""
    try:
        return check_place(None, text)[2]
    except RegistryError as e:
        raise RegistryError(where, e.problem, e.fix) from None


class Registry:
    """One SQLite file of devices; safe to share between the service's loop and its HTTP thread."""

    def __init__(self, path):
        """Open (or create) the registry; RegistryError, and no file left behind if this call made it,
        when the path cannot hold one (a folder, no permission, a full disk, a file that is not a
        registry)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = {}                  # device_id -> latest last_seen, ahead of the file by < SEEN_WRITE_S
        existed = self.path.exists()
        self.db = None
        try:
            if not existed:
                self._open_private()                        # 0600 before SQLite writes a byte
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "devices" not in tables:          # another SQLite file (a store?): left untouched
                raise RegistryError(str(self.path), "is an SQLite file but not a prapa registry (no devices table)",
                                    "give the gateway's registry.db (data_dir in gateway.toml)")
            if existed:
                self._open_private()                        # a registry found looser is tightened
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RegistryError(str(self.path), f"SQLite refused WAL mode ({mode})",
                                    "put the registry on a local disk")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._migrate(bool(tables))
            self.db.execute(f"SELECT {_COLUMNS} FROM devices LIMIT 0")
        except (OSError, sqlite3.Error, RegistryError) as e:
            if self.db is not None:
                self.db.close()
            if not existed:
                for suffix in ("", "-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
            if isinstance(e, RegistryError):
                raise
            if isinstance(e, OSError):
                problem = f"cannot be opened ({e.strerror or e})"
            elif isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e) or "no such column" in str(e):
                problem = f"is not a prapa registry ({e})"
            else:
                problem = f"cannot be opened ({e})"
            raise RegistryError(str(self.path), problem, "give the gateway's registry.db (data_dir in gateway.toml), "
                                "on a disk with space, that this user can read and write") from None

    def _migrate(self, existed):
        """Bring the schema to SCHEMA_VERSION: a new registry is stamped; an older one gets the
        columns it lacks, each NULL for its devices, in one durable transaction."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(str(self.path), f"was made by a newer prapa (schema {version}, this one knows "
                                f"{SCHEMA_VERSION})", "run the prapa that made it, or upgrade this one")
        if version == SCHEMA_VERSION:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            have = {row[1] for row in self.db.execute("PRAGMA table_info(devices)")}
            added = []
            for step in MIGRATIONS[version:]:
                for column, kind in step:
                    if column not in have:
                        self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")
                        added.append(column)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        if existed and added:
            _log(logging.INFO, "registry_migrated", path=str(self.path), schema_from=version,
                 schema_to=SCHEMA_VERSION, columns=added)

    def _open_private(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                os.fchmod(fd, 0o600)
                _log(logging.WARNING, "registry_mode_tightened", path=str(self.path), was=f"{mode:04o}")
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
                os.chmod(side, 0o600)

    def close(self):
        with self._lock:
            self._flush_seen()
            self.db.close()

    def _write(self, fn):
        """Run fn(db) in one durable transaction."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return result

    # commissioning

    def add(self, device_id, role, key, name=None, board=None, now=None, location=None, catchment=None):
        """Commission a device: its key (and place: location (lat, lon), catchment) durable when this returns."""
        check_device(device_id, role, key, name, board)
        lat, lon, catchment = check_place(location, catchment, f"device {device_id}")
        now = time.time() if now is None else now

        def insert(db):
            self._check_free(db, device_id, bytes(key), f"device {device_id}")
            db.execute("INSERT INTO devices (device_id, name, role, key, state, board, added_at, lat, lon, catchment)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (device_id, name, role, bytes(key), "commissioned", board, now, lat, lon, catchment))
        self._write(insert)
        _log(logging.INFO, "device_added", device=device_id, role=role, name=name, board=board,
             **({"lat": lat, "lon": lon} if lat is not None else {}), **({"catchment": catchment} if catchment else {}))

    def set_place(self, device_id, location=..., catchment=...):
        """Set a device's location ((lat, lon), or None to clear it) and/or catchment (a name, or None);
        a part not given stays as it is. Durable when this returns."""
        where = f"device {device_id}"
        lat, lon, name = check_place(None if location is ... else location, None if catchment is ... else catchment,
                                     where)
        sets, values = [], []
        if location is not ...:
            sets.append("lat=?, lon=?")
            values += [lat, lon]
        if catchment is not ...:
            sets.append("catchment=?")
            values.append(name)
        if not sets:
            raise RegistryError(f"{where}: place", "nothing to set", "give a location, a catchment, or both")

        def update(db):
            if not db.execute(f"UPDATE devices SET {', '.join(sets)} WHERE device_id=?",
                              (*values, device_id)).rowcount:
                raise UnknownDevice(device_id)
        self._write(update)
        device = self.get(device_id)
        _log(logging.INFO, "device_placed", device=device_id, lat=device.lat, lon=device.lon,
             catchment=device.catchment)
        return device

    def _check_free(self, db, device_id, key, where):
        row = db.execute("SELECT state FROM devices WHERE device_id=?", (device_id,)).fetchone()
        if row:
            raise RegistryError(f"{where}: device_id", f"{device_id} is already registered ({row[0]})",
                                "pick a free id; a board keeps its id for life")
        if db.execute("SELECT 1 FROM devices WHERE key=?", (key,)).fetchone():
            raise RegistryError(f"{where}: key", "is already another device's key",
                                "generate a fresh key per device: os.urandom(16)")

    def retire(self, device_id):
        """Stop serving a device: key_for returns None from now on, its record stays."""
        def update(db):
            if not db.execute("UPDATE devices SET state='retired' WHERE device_id=?", (device_id,)).rowcount:
                raise UnknownDevice(device_id)
        self._write(update)
        _log(logging.INFO, "device_retired", device=device_id)

    # lookups

    def key_for(self, device_id):
        """The AES key of a device this gateway serves; None if unknown or retired."""
        with self._lock:
            row = self.db.execute("SELECT key FROM devices WHERE device_id=? AND state!='retired'",
                                  (device_id,)).fetchone()
        return bytes(row[0]) if row else None

    def get(self, device_id):
        with self._lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return self._device(row) if row else None

    def list(self):
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY device_id").fetchall()
        return [self._device(row) for row in rows]

    def _device(self, row):
        device = Device(row[0], row[1], row[2], bytes(row[3]), *row[4:])
        seen = self._seen.get(device.device_id)
        if seen is not None and (device.last_seen is None or seen > device.last_seen):
            device = device._replace(last_seen=seen)
        return device

    def mark_seen(self, device_id, t, firmware=None):
        """Note a verified frame from a device: commissioned becomes active; last_seen written lazily."""
        with self._lock:
            row = self.db.execute("SELECT state, last_seen, firmware FROM devices WHERE device_id=?",
                                  (device_id,)).fetchone()
            if row is None:
                raise UnknownDevice(device_id)
            state, stored_seen, stored_firmware = row
            self._seen[device_id] = max(t, self._seen.get(device_id, t))
            changed = (state == "commissioned" or (firmware is not None and firmware != stored_firmware)
                       or stored_seen is None or t - stored_seen >= SEEN_WRITE_S)
            if changed and state != "retired":
                self.db.execute(
                    "UPDATE devices SET state='active', last_seen=MAX(COALESCE(last_seen, 0), ?),"
                    " firmware=COALESCE(?, firmware) WHERE device_id=?", (self._seen[device_id], firmware, device_id))
        if state == "commissioned" or (firmware is not None and firmware != stored_firmware):
            _log(logging.INFO, "device_seen", device=device_id, firmware=firmware, was=state)

    def _flush_seen(self):
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("UPDATE devices SET last_seen=MAX(COALESCE(last_seen, 0), ?) WHERE device_id=?",
                            [(t, device_id) for device_id, t in self._seen.items()])
        self.db.execute("COMMIT")

    # downlink counters

    def next_downlink_counters(self, device_id, n):
        """Reserve n gateway->board frame counters; durable before they are returned.

        Returns range(start, start + n); a later call, in this process or
        after a restart, returns counters above all of them.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive whole number, not {n!r}")

        def reserve(db):
            row = db.execute("SELECT downlink_bound, state FROM devices WHERE device_id=?", (device_id,)).fetchone()
            if row is None:
                raise UnknownDevice(device_id)
            start, state = row
            if state == "retired":
                raise RegistryError(f"device {device_id}", "is retired", "commission it again before sending to it")
            if start + n - 1 > COUNTER_MAX:
                raise RegistryError(f"device {device_id}: downlink counter", "exhausted for this key",
                                    "provision the board with a new key and device id")
            db.execute("UPDATE devices SET downlink_bound=? WHERE device_id=?", (start + n, device_id))
            return range(start, start + n)
        return self._write(reserve)

    # export and import

    def export_devices(self, device_ids, path):
        """Write the devices, keys as hex, to a JSON file: mode 0600, complete or absent (temp, fsync, rename)."""
        device_ids, devices = [*device_ids], []
        for device_id in device_ids:
            device = self.get(device_id)
            if device is None:
                raise UnknownDevice(device_id)
            record = device.public()
            record["key"] = device.key.hex()
            devices.append(record)
        text = json.dumps({"format": EXPORT_FORMAT, "version": 1, "devices": devices}, indent=2) + "\n"
        _write_private(Path(path), text.encode())
        _log(logging.INFO, "devices_exported", devices=device_ids, path=str(path))

    def export_device(self, device_id, path):
        self.export_devices([device_id], path)

    def import_file(self, path, now=None):
        """Add every device in an export file, or none: all records are checked before one transaction.

        Imported devices start 'commissioned' here; their downlink bound
        carries over so counters already used with the key are never reused.
        Retire a device on the gateway it leaves before exporting it.
        """
        path = Path(path)
        records = read_export(path)
        now = time.time() if now is None else now

        def insert(db):
            for i, r in enumerate(records):
                self._check_free(db, r["device_id"], r["key"], f"{path}: devices[{i}]")
                db.execute("INSERT INTO devices (device_id, name, role, key, state, board, firmware, last_seen,"
                           " added_at, downlink_bound, lat, lon, catchment) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (r["device_id"], r["name"], r["role"], r["key"], "commissioned", r["board"],
                            r["firmware"], r["last_seen"], now, r["downlink_bound"], r["lat"], r["lon"],
                            r["catchment"]))
        self._write(insert)
        _log(logging.INFO, "devices_imported", path=str(path), devices=[r["device_id"] for r in records])
        return [r["device_id"] for r in records]


class DownlinkCounters:
    """protocol.secure's counters interface (next()) over registry blocks: one fsync per `block` frames."""

    def __init__(self, registry, device_id, block=64):
        self.registry, self.device_id, self.block = registry, device_id, block
        self._range = iter(())

    def next(self):
        counter = next(self._range, None)
        if counter is None:
            self._range = iter(self.registry.next_downlink_counters(self.device_id, self.block))
            counter = next(self._range)
        return counter


_COLUMNS = "device_id, name, role, key, state, board, firmware, last_seen, downlink_bound, lat, lon, catchment"


def read_export(path):
    """The records of an export file, every one checked (RegistryError naming the record and field): what
    import_file adds, and what `prapa gateway devices import` checks before it opens the registry."""
    def fail(where, problem, fix):
        raise RegistryError(f"{path}: {where}", problem, fix)

    text = read_text(path, f"{path}: file", "give the path of an export file (prapa commission --export)",
                     error=RegistryError)
    try:
        data = parse_json(text)
    except ValueError as e:
        fail("file", f"is not JSON ({e})", "use a file written by the registry's export")
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or data.get("version") != 1:
        fail("format", "not a prapa registry export (version 1)", "use a file written by the registry's export")
    if not isinstance(data.get("devices"), list) or not data["devices"]:
        fail("devices", "missing or empty", "export at least one device")
    records, seen_ids, seen_keys = [], set(), set()
    for i, r in enumerate(data["devices"]):
        where = f"devices[{i}]"
        if not isinstance(r, dict):
            fail(where, "not an object", "use a file written by the registry's export")
        key_hex = r.get("key")
        if not isinstance(key_hex, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", key_hex):
            fail(f"{where}.key", "is not 32 hex digits", "export the device again; keys are never typed by hand")
        key = bytes.fromhex(key_hex)
        check_device(r.get("device_id"), r.get("role"), key, r.get("name"), r.get("board"), where=f"{path}: {where}")
        bound = r.get("downlink_bound", 0)
        if isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= COUNTER_MAX + 1:
            fail(f"{where}.downlink_bound", f"{bound!r} is not a counter bound", "export the device again")
        last_seen, firmware = r.get("last_seen"), r.get("firmware")
        if last_seen is not None and (isinstance(last_seen, bool) or not isinstance(last_seen, (int, float))
                                      or not 0 <= last_seen <= LAST_SEEN_MAX):
            fail(f"{where}.last_seen", f"{last_seen!r} is not Unix seconds", "use a number of seconds since 1970, "
                 "or null")
        if firmware is not None and not isinstance(firmware, str):
            fail(f"{where}.firmware", f"{firmware!r} is not a version string", "use a string or null")
        lat, lon = r.get("lat"), r.get("lon")        # older exports have no place: none
        lat, lon, catchment = check_place(None if lat is None and lon is None else (lat, lon), r.get("catchment"),
                                          f"{path}: {where}")
        if r["device_id"] in seen_ids:
            fail(f"{where}.device_id", f"{r['device_id']} appears twice in the file", "keep one record per device")
        if key in seen_keys:
            fail(f"{where}.key", "is the same as another record's", "give every device its own key")
        seen_ids.add(r["device_id"])
        seen_keys.add(key)
        records.append({"device_id": r["device_id"], "name": r.get("name"), "role": r["role"], "key": key,
                        "board": r.get("board"), "firmware": firmware, "last_seen": last_seen,
                        "downlink_bound": bound, "lat": lat, "lon": lon, "catchment": catchment})
    return records


def _write_private(path, data):
    """Replace path with data atomically, mode 0600: readers see the old file or the whole new one."""
    files.write_atomically(path, data, mode=0o600)
