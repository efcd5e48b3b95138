"""prapa ledger / prapa export billing: the reference consumer of what gateways publish, and the bill.

`prapa ledger run` subscribes to prapa/v1/<site>/# (QoS 1, persistent session:
clean_session False, a stable client id), decodes each message (CBOR or JSON),
checks it against the northbound contract (gateway.northbound.problems) and
keeps readings and alarms in an idempotent SQLite store keyed by each item's
(device, boot, seq).

Promise: a message is acknowledged to the broker (paho, manual_ack=True) only
after the transaction holding everything it changed has committed (WAL,
synchronous=FULL), so a ledger killed at any instant has lost nothing it
acknowledged; the broker sends again what it had not (at-least-once), and the
identity rule makes the second copy a counted duplicate, never a second row.

Identity rule: a repeated (device, boot, seq) with the same item is a duplicate
(counted, not stored); with different content it is a conflict (counted,
logged, both kept: the first in readings/alarms, the newcomer in conflicts).
An invalid message is logged and kept aside in `invalid`, never stored as data.

Healing: a broker's PUBACK is not a disk write (Mosquitto keeps a persistent
session's queue in memory between autosaves), so a broker that dies can lose
messages the gateway was told it had. A board numbers every logged entry of a
boot 1, 2, 3...; a seq missing below one the ledger holds is such a loss, and
every --heal-every seconds the ledger asks the gateway to replay the device from
the first missing seq (prapa/v1/<site>/<device>/replay/request), which it can for
as long as it keeps entries ([store] retention_days). A hole seen twice in a row
is asked for: one only a resend is still filling is left alone.

`prapa export billing` turns the store into what an e-Service imports; its
rules are in billing()'s docstring.

exit codes: 0 ok, 1 failure (the broker unreachable, the store unwritable), 2 bad arguments.
"""

import argparse
import csv
import datetime as dt
import io
import json
import logging
import re
import signal
import sqlite3
import threading
import time
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

from gateway.logs import log_event
from protocol.errors import UsageError

log = logging.getLogger("prapa.tools.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,                 -- also the ingest order: a late reading has a higher id
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL, seq_last INTEGER,
    role TEXT, series TEXT, wall_t REAL, span_s INTEGER, time_source TEXT, unit TEXT, scale INTEGER,
    register_before INTEGER, value INTEGER, register INTEGER,
    item TEXT NOT NULL,                     -- the whole item, canonical JSON (sorted keys, bytes as hex)
    replay INTEGER NOT NULL, received_at REAL NOT NULL, ingest INTEGER NOT NULL,
    UNIQUE (device, boot, seq)
);
CREATE INDEX IF NOT EXISTS readings_time ON readings (device, wall_t);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL,
    role TEXT, code INTEGER, name TEXT, active INTEGER, detail INTEGER, wall_t REAL,
    item TEXT NOT NULL, replay INTEGER NOT NULL, received_at REAL NOT NULL, ingest INTEGER NOT NULL,
    UNIQUE (device, boot, seq)
);
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, device TEXT NOT NULL, boot INTEGER NOT NULL,
    seq INTEGER NOT NULL, stored TEXT NOT NULL, received TEXT NOT NULL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS invalid (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, problems TEXT NOT NULL, payload BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""

ITEM_KINDS = {"reading": "readings", "alarm": "alarms"}


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def canonical(item):
    return json.dumps(_jsonable(item), sort_keys=True, separators=(",", ":"))


def decode(payload):
    """A message body from CBOR or JSON (the gateway's [forwarder] format); None for an empty payload (a
    cleared retained topic: the contract says where that is valid); ValueError when it is neither."""
    import cbor2
    data = bytes(payload)
    if not data:
        return None
    loaders = (json.loads, cbor2.loads) if data[:1] in (b"{", b"[") else (cbor2.loads, json.loads)
    for load in loaders:
        try:
            return load(data)
        except Exception:
            continue
    raise ValueError("neither CBOR nor JSON")


def message_kind(topic, body):
    """(kind, role) for the counts: the envelope's kind (or the topic's tail) and the first item's role."""
    parts = topic.split("/")
    kind = body.get("kind") if isinstance(body, dict) and isinstance(body.get("kind"), str) else None
    if kind is None:
        kind = "/".join(parts[4:]) if len(parts) > 4 and parts[3] != "catchment" else \
            (parts[-1] if len(parts) > 3 else topic)
    role = "-"
    if isinstance(body, dict) and isinstance(body.get("items"), list) and body["items"]:
        first = body["items"][0]
        if isinstance(first, dict) and isinstance(first.get("role"), str):
            role = first["role"]
    return kind, role


class LedgerStore:
    """The ledger's SQLite file: every write is one transaction, committed (FULL) when ingest() returns."""

    def __init__(self, path, readonly=False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        self.lock = threading.RLock()          # held across billing() and newest() for one consistent look
        from gateway.northbound import problems
        self.validator, self._problems = "northbound", problems     # the contract (docs/northbound.md)

    def close(self):
        self.db.close()

    def counts(self):
        with self.lock:
            rows = dict(self.db.execute("SELECT name, n FROM counts"))
        by_kind = {}
        for name, n in rows.items():
            if name.startswith(("valid:", "invalid:")):
                verdict, kind_role = name.split(":", 1)
                by_kind.setdefault(kind_role, {"valid": 0, "invalid": 0})[verdict] = n
        return {"messages": rows.get("messages", 0), "validated": rows.get("validated", 0),
                "invalid": rows.get("invalid", 0), "undecodable": rows.get("undecodable", 0),
                "stored_readings": rows.get("stored:reading", 0), "stored_alarms": rows.get("stored:alarm", 0),
                "duplicates": rows.get("duplicates", 0), "conflicts": rows.get("conflicts", 0),
                "replayed_items": rows.get("replayed_items", 0), "by_kind": by_kind, "validator": self.validator}

    def newest(self, device):
        """(boot, t_board_s, wall_t) of the device's newest interval reading with a register, or None: where its
        billed register stands in the board's own time."""
        with self.lock:
            row = self.db.execute("SELECT boot, item, wall_t FROM readings WHERE device = ? AND series = 'interval' "
                                  "AND register IS NOT NULL ORDER BY boot DESC, seq DESC LIMIT 1", (device,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]).get("t_board_s"), row[2])

    def holes(self):
        """{device: [(boot, first missing seq, missing count)]}: seqs of a boot (readings, merged runs and
        alarms together: one series per boot, from 1) below the highest one held that never arrived."""
        # The runs in seq order with the highest seq held before each (merged runs may overlap finer ones):
        # a run that starts past it + 1 follows a hole. SQLite's window functions do it without a Python set
        # of every seq the ledger holds (it looks every --heal-every seconds).
        sql = f"""
            SELECT device, boot, seq, COALESCE(MAX(last) OVER (PARTITION BY device, boot ORDER BY seq
                                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), {FIRST_SEQ - 1})
            FROM (SELECT device, boot, seq, COALESCE(seq_last, seq) AS last FROM readings
                  UNION ALL SELECT device, boot, seq, seq FROM alarms WHERE seq > 0)
            ORDER BY device, boot, seq"""
        with self.lock:
            rows = self.db.execute(sql).fetchall()
        out = {}
        for device, boot, seq, held_to in rows:
            if seq > held_to + 1:
                runs = out.setdefault(device, [])
                if runs and runs[-1][0] == boot:       # one entry per boot: its first hole, and all it misses
                    runs[-1] = (boot, runs[-1][1], runs[-1][2] + seq - held_to - 1)
                else:
                    runs.append((boot, held_to + 1, seq - held_to - 1))
        return out

    def newest_wall_t(self):
        """The wall time of the newest reading held (Unix s), or None."""
        with self.lock:
            return self.db.execute("SELECT MAX(wall_t) FROM readings").fetchone()[0]

    def ingest(self, topic, payload, received_at=None):
        """Check, then store one message in one committed transaction; return what it was:
        "stored" (with new items), "duplicate" (nothing new), "valid" (a valid message that holds no
        items to store: a replay/done, a suspects list, a gateway status), "invalid" or "undecodable"."""
        now = time.time() if received_at is None else received_at
        bumps = {"messages": 1}
        try:
            body = decode(payload)
        except ValueError as e:
            body, problems = None, [str(e)]
            bumps["undecodable"] = 1
        else:
            problems = list(self._problems(topic, body))
        kind, role = message_kind(topic, body)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if problems:
                    bumps["invalid"] = 1
                    bumps[f"invalid:{kind}/{role}"] = 1
                    self.db.execute("INSERT INTO invalid (topic, problems, payload, received_at) VALUES (?,?,?,?)",
                                    (topic, json.dumps(problems), bytes(payload), now))
                    outcome = "undecodable" if body is None else "invalid"
                else:
                    bumps["validated"] = 1
                    bumps[f"valid:{kind}/{role}"] = 1
                    outcome = self._items(body, kind, now, bumps)
                for name, n in bumps.items():
                    self.db.execute("INSERT INTO counts (name, n) VALUES (?, ?) "
                                    "ON CONFLICT (name) DO UPDATE SET n = n + excluded.n", (name, n))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        if problems:
            log_event(log, logging.WARNING, "message_invalid", topic=topic, problems=problems[:5])
        return outcome

    def _ingest_no(self):
        row = self.db.execute("SELECT n FROM counts WHERE name = 'ingest'").fetchone()
        n = (row[0] if row else 0) + 1
        self.db.execute("INSERT INTO counts (name, n) VALUES ('ingest', ?) "
                        "ON CONFLICT (name) DO UPDATE SET n = excluded.n", (n,))
        return n

    def _items(self, body, kind, now, bumps):
        table = ITEM_KINDS.get(kind)
        items = body.get("items") if isinstance(body, dict) else None
        if table is None or not isinstance(items, list):
            return "valid"
        replay = 1 if body.get("replay") else 0
        stored = 0
        for item in items:
            if not isinstance(item, dict) or item.get("kind", kind) != kind:
                continue
            ident = (str(item.get("device", body.get("device"))), int(item["boot"]), int(item["seq"]))
            text = canonical(item)
            old = self.db.execute(f"SELECT item FROM {table} WHERE device=? AND boot=? AND seq=?", ident).fetchone()
            if replay:
                bumps["replayed_items"] = bumps.get("replayed_items", 0) + 1
            if old is not None:
                if old[0] == text:
                    bumps["duplicates"] = bumps.get("duplicates", 0) + 1
                else:
                    bumps["conflicts"] = bumps.get("conflicts", 0) + 1
                    self.db.execute("INSERT INTO conflicts (kind, device, boot, seq, stored, received, received_at) "
                                    "VALUES (?,?,?,?,?,?,?)", (kind, *ident, old[0], text, now))
                    log_event(log, logging.WARNING, "identity_conflict", kind=kind, device=ident[0], boot=ident[1],
                              seq=ident[2], note="the first copy stays; the newcomer is kept in conflicts")
                continue
            ingest = self._ingest_no()
            if kind == "reading":
                self.db.execute(
                    "INSERT INTO readings (device, boot, seq, seq_last, role, series, wall_t, span_s, time_source, "
                    "unit, scale, register_before, value, register, item, replay, received_at, ingest) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*ident, item.get("seq_last"), item.get("role"), item.get("series"), item.get("wall_t"),
                     item.get("span_s"), item.get("time_source"), item.get("unit"), item.get("scale", 0),
                     _int(item.get("register_before")), _int(item.get("value")), _int(item.get("register")),
                     text, replay, now, ingest))
            else:
                self.db.execute(
                    "INSERT INTO alarms (device, boot, seq, role, code, name, active, detail, wall_t, item, replay, "
                    "received_at, ingest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*ident, item.get("role"), item.get("code"), item.get("name"), int(bool(item.get("active"))),
                     _int(item.get("detail")), item.get("wall_t"), text, replay, now, ingest))
            stored += 1
        bumps[f"stored:{kind}"] = stored
        return "stored" if stored else "duplicate"


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class Ledger:
    """The consumer in-process (the site, tests): start() connects and subscribes, stop() disconnects;
    counts() at any time. Each message is committed to `db` before paho acknowledges it."""

    def __init__(self, db, site, host="127.0.0.1", port=1883, client_id=None, heal_every_s=0.0):
        from gateway import forward_format as ff
        ff.check_site(site, "--site")
        self.site, self.host, self.port = site, host, port
        self.client_id = client_id or f"prapa-ledger-{site}"
        self.store = LedgerStore(db)
        self.client = None
        self.failed = None
        self.connected = threading.Event()
        self.heal_every_s = heal_every_s
        self.replays_asked = 0                 # replay requests sent for holes
        self._seen_holes = set()               # (device, boot, first missing) at the last look
        self._stopping = threading.Event()
        self._healer = None

    def start(self):
        import paho.mqtt.client as mqtt
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                        protocol=mqtt.MQTTv311, manual_ack=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 2)
        c.connect(self.host, self.port)
        c.loop_start()
        self.client = c
        if self.heal_every_s > 0:
            self._healer = threading.Thread(target=self._heal_loop, name="prapa-ledger-heal", daemon=True)
            self._healer.start()
        return self

    def _heal_loop(self):
        while not self._stopping.wait(self.heal_every_s):
            try:
                self.heal()
            except Exception as e:             # noqa: BLE001 - the next look tries again
                log_event(log, logging.WARNING, "heal_failed", error=repr(e))

    def heal(self, grace=True):
        """Ask the gateway to replay each device from the first seq missing in a boot; with grace only holes
        that were there at the last look too (one a resend is filling goes). Returns the requests sent."""
        from gateway import forward_format as ff
        holes = {(d, boot, first) for d, runs in self.store.holes().items() for boot, first, _n in runs}
        ask = sorted(holes & self._seen_holes) if grace else sorted(holes)
        self._seen_holes = holes
        asked = set()
        for device, boot, first in ask:
            if device in asked:                # one request per device: it replays every later boot too
                continue
            asked.add(device)
            body = json.dumps({"since_boot": boot, "since_seq": first - 1})     # a replay starts after it
            self.client.publish(ff.topic(self.site, int(device, 16), "replay/request"), body, qos=1)
            self.replays_asked += 1
            log_event(log, logging.WARNING, "replay_asked", device=device, since_boot=boot, since_seq=first)
        return len(asked)

    def _on_connect(self, client, _userdata, _flags, reason, _props=None):
        # Subscribe on every connect: a broker that lost its saved sessions forgot the subscription.
        client.subscribe(f"prapa/v1/{self.site}/#", qos=1)
        self.connected.set()

    def _on_message(self, client, _userdata, msg):
        try:
            self.store.ingest(msg.topic, msg.payload)
        except Exception as e:                 # not committed: not acknowledged, the broker sends it again
            self.failed = repr(e)
            log_event(log, logging.ERROR, "ingest_failed", topic=msg.topic, error=repr(e))
            return
        client.ack(msg.mid, msg.qos)

    def counts(self):
        return self.store.counts()

    def stop(self):
        self._stopping.set()
        if self._healer is not None:
            self._healer.join(5)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.store.close()


# -- billing ------------------------------------------------------------------------------------

PERIOD = re.compile(r"(\d{4})-(\d{2})\Z")
TZ = re.compile(r"([+-])(\d{2}):?(\d{2})\Z")
FIRST_SEQ = 1                    # a board's log numbers the entries of each boot from 1
JOIN_TOLERANCE_S = 2.0           # a join of two readings further apart than this (plus 1 % of the span) is a hole


def parse_tz(text):
    m = TZ.match(text or "")
    if not m or int(m.group(2)) > 14 or int(m.group(3)) >= 60:
        raise UsageError("--tz", f"{text!r} is not a UTC offset", "give +HH:MM, e.g. +07:00 (Thailand)")
    delta = dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return dt.timezone(-delta if m.group(1) == "-" else delta)


def parse_period(text, tz):
    """(start, end) Unix seconds of the calendar month YYYY-MM in tz."""
    m = PERIOD.match(text or "")
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise UsageError("--period", f"{text!r} is not a month", "give YYYY-MM, e.g. 2026-11")
    y, mo = int(m.group(1)), int(m.group(2))
    start = dt.datetime(y, mo, 1, tzinfo=tz)
    end = dt.datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=tz)
    return start.timestamp(), end.timestamp()


def _when(text, tz, where):
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(where, f"{text!r} is not a date", "give YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    return (t if t.tzinfo else t.replace(tzinfo=tz)).timestamp()


def read_accounts(path, tz):
    """[(account, device, from_t or None, to_t or None)] from a CSV with header account,device,from,to; a meter
    replaced mid-period is two lines of one account (the old one's `to` = the new one's `from`)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError("--accounts", f"cannot read {path} ({e.strerror})", "give a CSV file: account,device,from,to")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"account", "device"} <= set(rows[0]):
        raise UsageError("--accounts", f"{path} has no account,device,from,to header",
                         "first line: account,device,from,to")
    out = []
    for i, r in enumerate(rows, 2):
        where = f"--accounts {path} line {i}"
        device = (r.get("device") or "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8}", device):
            raise UsageError(where, f"device {device!r} is not 8 hex digits", "give the device id, e.g. 00002001")
        out.append((r["account"].strip(), device, _when((r.get("from") or "").strip(), tz, where),
                    _when((r.get("to") or "").strip(), tz, where)))
    return out


def _m3(register, scale):
    """A register in units of 10**scale litres as m³, exact."""
    return Decimal(register).scaleb(scale - 3)


def _q(d):
    return d.quantize(Decimal("0.001"), rounding=ROUND_FLOOR)


def _iso(t, tz):
    return None if t is None else dt.datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")


class _Reading:
    __slots__ = ("boot", "seq", "seq_last", "t0", "t1", "before", "after", "scale", "ingest")

    def __init__(self, row):
        boot, seq, seq_last, wall_t, span_s, scale, before, register, ingest = row
        self.boot, self.seq, self.seq_last = boot, seq, seq_last if seq_last is not None else seq
        self.t1 = wall_t
        self.t0 = wall_t - (span_s or 0)
        self.before, self.after, self.scale, self.ingest = before, register, scale or 0, ingest


BILLED_ROLES = ("meter",)       # the roles whose register is a customer's water (a doser's counts strokes)


def billing(store, period, tz, accounts=None, now=None, roles=BILLED_ROLES):
    """The billing export of `period` (YYYY-MM in tz) as a dict; rows per (account, device): every device of
    the billed roles (the meter) with a register, or the accounts file's devices.

    Rules:
    - A reading belongs where its wall time puts it (wall_t, the end of its interval). Readings without
      wall time (time_source "unknown") cannot be placed: counted in `unplaced`, never billed.
    - The register series is the interval series (series "interval"); a meter with none uses its daily
      series. Each reading gives two points: (wall_t - span_s, register_before) and (wall_t, register).
    - The register at a bound (the period's, or an account's from/to) is the point nearest the bound
      (on a tie, the earlier); the row states the time it stands at (start_at, end_at): an e-Service
      that bills to the second can see how far each is from the bound (at most half an interval when
      the meter reported around the bound).
    - Consumption walks the points from start to end in the board's order (boot, seq): within a reading
      it is its value, across a join it is register_before(next) - register(previous). Nothing wraps on
      the wire: the register is the board's unbounded count (it passes the dial's 10**9 L, the config's
      register_l maximum, and keeps counting), so no modulo is ever applied. A register that goes down
      across a join is a reset (a re-commissioned dial): that join counts 0 and is an inexact gap.
    - A gap is a join of two readings where seq or time jump (missing seqs of one boot, a hole in wall
      time, or a boot change). It is exact when register_before(next) >= register(previous): the registers
      on both sides are the board's one cumulative count (chained through its checkpoint across a power
      cut), so the consumption across the gap is known to the litre even though readings are missing.
      The board can lose at most its checkpoint_pulses pulses (x k_factor) per power cut before it
      counted them at all: no consumer can see those, the bound is stated, not flagged.
    - m³ with three decimals are cut to the litre as a dial shows them (2000.750 L is 2.000 m³), and the
      consumption of an unbroken chain is end_m3 - start_m3 as printed.
    - A head gap: the first reading the ledger holds starts after the bound and seqs of its boot before it
      are missing (from FIRST_SEQ): water the meter counted in the period that no reading bills; inexact.
    - Alarms in [from, to): an alarm with unknown time is placed by its boot's readings (time "boot").
    - `revision`: the highest ingest number of the items a row used; it grows whenever a late reading
      (a replay) changes what the ledger holds, so an e-Service keeps the export with the highest one.
    """
    start, end = parse_period(period, tz)
    now = time.time() if now is None else now
    db = store.db
    with store.lock:
        devices = [d for (d,) in db.execute(
            f"SELECT DISTINCT device FROM readings WHERE register IS NOT NULL AND role IN "
            f"({','.join('?' * len(roles))}) ORDER BY device", tuple(roles))]
        plan = accounts if accounts is not None else [(d, d, None, None) for d in devices]
        rows = []
        for account, device, frm, to in plan:
            a = max(start, frm) if frm is not None else start
            b = min(end, to) if to is not None else end
            if b <= a:
                continue
            rows.append(dict(account=account, **_device_row(db, device, a, b, tz)))
        top = db.execute("SELECT MAX(n) FROM counts WHERE name = 'ingest'").fetchone()[0] or 0
    totals = {}
    for r in rows:
        t = totals.setdefault(r["account"], {"account": r["account"], "devices": [], "consumption_m3": Decimal(0),
                                             "exact": True})
        t["devices"].append(r["device"])
        if r["consumption_m3"] is not None:
            t["consumption_m3"] += Decimal(r["consumption_m3"])
        t["exact"] = t["exact"] and r["exact"]
    for t in totals.values():
        t["consumption_m3"] = f"{t['consumption_m3']:.3f}"
    return {"v": 1, "period": period, "tz": _tz_text(tz), "from": _iso(start, tz), "to": _iso(end, tz),
            "exported_at": _iso(now, tz), "revision": top, "rows": rows, "accounts": list(totals.values())}


def _tz_text(tz):
    s = dt.datetime(2000, 1, 1, tzinfo=tz).strftime("%z")
    return f"{s[:3]}:{s[3:]}"


def _device_row(db, device, a, b, tz):
    row = {"device": device, "from": _iso(a, tz), "to": _iso(b, tz), "start_at": None, "start_m3": None,
           "end_at": None, "end_m3": None, "consumption_m3": None, "readings": 0, "unplaced": 0, "gaps": [],
           "exact": False, "alarms": [], "revision": 0}
    q = ("SELECT boot, seq, seq_last, wall_t, span_s, scale, register_before, register, ingest FROM readings "
         "WHERE device = ? AND series = ? AND wall_t IS NOT NULL AND register IS NOT NULL ORDER BY boot, seq")
    series = [_Reading(r) for r in db.execute(q, (device, "interval"))] or \
        [_Reading(r) for r in db.execute(q, (device, "daily"))]
    row["readings"] = db.execute("SELECT COUNT(*) FROM readings WHERE device = ? AND wall_t > ? AND wall_t <= ?",
                                 (device, a, b)).fetchone()[0]
    row["unplaced"] = db.execute("SELECT COUNT(*) FROM readings WHERE device = ? AND wall_t IS NULL",
                                 (device,)).fetchone()[0]
    alarms = _alarms(db, device, a, b)
    row["alarms"] = [{"name": n, "code": c, "active": bool(act), "at": _iso(t, tz), "time": how}
                     for t, n, c, act, _i, how in alarms]
    revision = max((x[4] for x in alarms), default=0)
    points = []                                   # (t, register, reading index)
    for i, r in enumerate(series):
        points += [(r.t0, r.before, i), (r.t1, r.after, i)]
    if not points:
        row["revision"] = revision
        return row
    s = min(range(len(points)), key=lambda k: (abs(points[k][0] - a), points[k][0]))
    e = min(range(len(points)), key=lambda k: (abs(points[k][0] - b), points[k][0]))
    if e < s:
        row["revision"] = revision
        return row
    known = _known_seqs(db, device)
    scale = series[points[s][2]].scale
    total, exact, gaps = Decimal(0), True, []
    first = series[0]
    if s == 0 and first.t0 > a + JOIN_TOLERANCE_S:
        # Nothing before the first reading the ledger holds: when seqs of its boot are missing before it, the
        # meter counted water here that no reading bills (the register before it is not its commissioning).
        missing = sum(1 for q_ in range(FIRST_SEQ, first.seq) if q_ not in known.get(first.boot, ()))
        if missing:
            exact = False
            gaps.append({"kind": "head", "from": _iso(a, tz), "to": _iso(first.t0, tz),
                         "size_s": round(first.t0 - a, 3), "missing_seq": missing, "boots": [None, first.boot],
                         "exact": False, "register_m3": [None, f"{_q(_m3(first.before, scale))}"]})
    for k in range(s, e):
        (t_p, reg_p, i_p), (t_n, reg_n, i_n) = points[k], points[k + 1]
        if i_p == i_n:                                         # within one reading: its value
            total += _m3(reg_n, scale) - _m3(reg_p, scale)
            continue
        prev, nxt = series[i_p], series[i_n]
        delta = reg_n - reg_p
        hole_s = t_n - t_p
        span = max(prev.t1 - prev.t0, 1)
        missing = None if nxt.boot != prev.boot else sum(
            1 for q_ in range(prev.seq_last + 1, nxt.seq) if q_ not in known.get(prev.boot, ()))
        kind = ("reset" if delta < 0 else "boot" if nxt.boot != prev.boot else "seq" if missing
                else "time" if hole_s > JOIN_TOLERANCE_S + 0.01 * span else None)
        if delta >= 0:
            total += _m3(reg_n, scale) - _m3(reg_p, scale)
        if kind is None:
            continue
        gap_exact = delta >= 0
        exact = exact and gap_exact
        gaps.append({"kind": kind, "from": _iso(t_p, tz), "to": _iso(t_n, tz), "size_s": round(hole_s, 3),
                     "missing_seq": missing, "boots": [prev.boot, nxt.boot], "exact": gap_exact,
                     "register_m3": [f"{_q(_m3(reg_p, scale))}", f"{_q(_m3(reg_n, scale))}"]})
    used = series[points[s][2]:points[e][2] + 1]
    start_m3, end_m3 = _q(_m3(points[s][1], scale)), _q(_m3(points[e][1], scale))
    consumption = end_m3 - start_m3 if exact else _q(total)
    row.update(start_at=_iso(points[s][0], tz), start_m3=f"{start_m3}", end_at=_iso(points[e][0], tz),
               end_m3=f"{end_m3}", consumption_m3=f"{consumption:.3f}", gaps=gaps, exact=exact,
               revision=max([revision] + [r.ingest for r in used]))
    return row


def _alarms(db, device, a, b):
    """[(wall_t, name, code, active, ingest, time)] of the device's alarms in [a, b). An alarm the gateway
    could not time (time_source "unknown": raised before it heard the board's clock) is placed by its boot's
    readings (their wall_t - t_board_s is the boot's origin): time "boot"; else time "wall"."""
    origins = {boot: wall - t for boot, wall, t in db.execute(
        "SELECT boot, wall_t, json_extract(item, '$.t_board_s') FROM readings WHERE device = ? AND wall_t IS NOT "
        "NULL AND json_extract(item, '$.t_board_s') IS NOT NULL GROUP BY boot", (device,))}
    out = []
    for wall, t_board_s, boot, name, code, active, ingest in db.execute(
            "SELECT wall_t, json_extract(item, '$.t_board_s'), boot, name, code, active, ingest FROM alarms "
            "WHERE device = ? ORDER BY boot, seq", (device,)):
        how = "wall"
        if wall is None and boot in origins and t_board_s is not None:
            wall, how = origins[boot] + t_board_s, "boot"
        if wall is not None and a <= wall < b:
            out.append((wall, name, code, active, ingest, how))
    return sorted(out, key=lambda x: x[0])


def _known_seqs(db, device):
    """{boot: set of seqs the ledger holds for the device}: readings (every series, merged ranges) and alarms."""
    known = {}
    for boot, seq, last in db.execute("SELECT boot, seq, seq_last FROM readings WHERE device = ?", (device,)):
        known.setdefault(boot, set()).update(range(seq, (last if last is not None else seq) + 1))
    for boot, seq in db.execute("SELECT boot, seq FROM alarms WHERE device = ?", (device,)):
        known.setdefault(boot, set()).add(seq)
    return known


CSV_COLUMNS = ("period", "exported_at", "revision", "account", "device", "from", "to", "start_at", "start_m3",
               "end_at", "end_m3", "consumption_m3", "readings", "unplaced", "exact", "gaps", "alarms")


def to_csv(export):
    """One line per (account, device); gaps as kind/from/to/size_s/missing_seq/exact joined by ';', alarms as
    name=on|off@time joined by ';'."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in export["rows"]:
        gaps = ";".join(f"{g['kind']}/{g['from']}/{g['to']}/{g['size_s']}/{g['missing_seq']}/"
                        f"{'exact' if g['exact'] else 'inexact'}" for g in r["gaps"])
        alarms = ";".join(f"{x['name']}={'on' if x['active'] else 'off'}@{x['at']}" for x in r["alarms"])
        w.writerow([export["period"], export["exported_at"], r["revision"], r["account"], r["device"], r["from"],
                    r["to"], r["start_at"], r["start_m3"], r["end_at"], r["end_m3"], r["consumption_m3"],
                    r["readings"], r["unplaced"], str(r["exact"]).lower(), gaps, alarms])
    return out.getvalue()


# -- the CLI ------------------------------------------------------------------------------------

def add_parser(sub):
    p = sub.add_parser("ledger", help="the reference consumer: validate what gateways publish, keep it in SQLite",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND", parser_class=sub._parser_class)
    lsub.required = True
    r = lsub.add_parser("run", help="subscribe and store until Ctrl-C or SIGTERM",
                        description="Subscribe to prapa/v1/SITE/# (QoS 1, persistent session), validate every "
                                    "message against the northbound contract, store readings and alarms once.")
    r.add_argument("--broker", required=True, metavar="HOST:PORT", help="the broker, e.g. 127.0.0.1:1883")
    r.add_argument("--site", required=True, help="the site name in the topics")
    r.add_argument("--db", required=True, metavar="FILE", help="the ledger's SQLite file (created if missing)")
    r.add_argument("--client-id", help="the persistent session's id (default prapa-ledger-SITE)")
    r.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until a signal)")
    r.add_argument("--heal-every", type=float, default=60.0, metavar="S",
                   help="ask the gateway to replay seqs missing below ones held, every S seconds (default 60; "
                        "0: never)")
    r.set_defaults(func=cmd_ledger_run)

    e = sub.add_parser("export", help="exports for an e-Service: billing",
                       description="Exports from a ledger database.")
    esub = e.add_subparsers(dest="export_command", metavar="SUBCOMMAND", parser_class=sub._parser_class)
    esub.required = True
    b = esub.add_parser("billing", help="per meter or account: registers, consumption, gaps, alarms of a month",
                        description=billing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--db", required=True, metavar="FILE", help="the ledger's SQLite file")
    b.add_argument("--period", required=True, metavar="YYYY-MM", help="the billing month in the town's time")
    b.add_argument("--accounts", metavar="CSV", help="account,device,from,to lines (a meter replaced mid-period: "
                                                     "two lines of one account); default one account per meter")
    b.add_argument("--tz", default="+07:00", help="the town's UTC offset (default +07:00)")
    b.add_argument("--format", choices=("csv", "json"), default="csv", help="default csv")
    b.add_argument("--out", metavar="FILE", help="write here (default stdout)")
    b.set_defaults(func=cmd_export_billing)


def _broker(text):
    host, _, port = (text or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError("--broker", f"{text!r} is not HOST:PORT", "give e.g. 127.0.0.1:1883")
    return host, int(port)


def cmd_ledger_run(args):
    host, port = _broker(args.broker)
    if not Path(args.db).resolve().parent.is_dir():
        raise UsageError("--db", f"no folder for {args.db}", "give a path in an existing folder")
    if not 0 <= args.heal_every <= 86400:
        raise UsageError("--heal-every", f"{args.heal_every:g} is out of range", "give 0 (never) to 86400 s")
    ledger = Ledger(args.db, args.site, host, port, args.client_id, heal_every_s=args.heal_every)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    try:
        ledger.start()
    except OSError as e:
        print(f"prapa: error: --broker: cannot connect to {args.broker} ({e})", flush=True)
        return 1
    print(json.dumps({"event": "ledger_started", "site": args.site, "db": str(args.db),
                      "client_id": ledger.client_id}), flush=True)
    began = time.monotonic()
    while not stop.wait(1.0):
        if args.duration and time.monotonic() - began >= args.duration:
            break
    counts = ledger.counts()
    ledger.stop()
    print(json.dumps({"event": "ledger_stopped", **counts, "replays_asked": ledger.replays_asked}), flush=True)
    return 0


def cmd_export_billing(args):
    tz = parse_tz(args.tz)
    parse_period(args.period, tz)
    if not Path(args.db).is_file():
        raise UsageError("--db", f"{args.db} does not exist", "give the file `prapa ledger run --db` writes")
    accounts = read_accounts(args.accounts, tz) if args.accounts else None
    store = LedgerStore(args.db, readonly=True)
    try:
        export = billing(store, args.period, tz, accounts)
    except sqlite3.DatabaseError as e:
        raise UsageError("--db", f"{args.db} is not a ledger ({e})", "give the file `prapa ledger run --db` writes")
    finally:
        store.close()
    text = json.dumps(export, indent=2) + "\n" if args.format == "json" else to_csv(export)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0
