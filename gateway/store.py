"""The gateway's durable store: readings, acknowledgements, replay windows.

Promise: when `commit()` returns, every entry in it is in the SQLite WAL and
fsynced (journal_mode=WAL, synchronous=FULL), so it survives a killed process
and a power cut; the acknowledgement it returns covers only such entries.

Why FULL and not NORMAL: in WAL mode NORMAL skips the fsync at commit, so the
last transactions can vanish in a power cut after the board was told they were
safe (the weak spot of gateways that acknowledge before their commit is
durable). Group commit (many frames, one transaction) pays the fsync once.

Identity is (device_id, boot_id, seq): a board numbers every entry of its
flash log in one sequence per boot, so a resent entry is recognised and kept
once. A board is acknowledged "up to seq" for a boot: the highest seq such
that everything from the first seq this gateway saw for that boot is stored.

All SQL on store.db (entries, acks, downlink, commands, replay_windows) lives in this module: the
service, the forwarder, the CLI, the simulator, benchmarks and tests go through Store's
methods, and open a live service's store with readonly=True to look at it.
"""

import json
import sqlite3
import time
from pathlib import Path

import cbor2

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id          INTEGER PRIMARY KEY,
    device_id   INTEGER NOT NULL,
    boot_id     INTEGER NOT NULL,
    seq         INTEGER NOT NULL,           -- < 0: not in the board's log (health), never acknowledged
    seq_last    INTEGER,                    -- a merged reading covers seq..seq_last; NULL: just seq
    kind        TEXT    NOT NULL,           -- readings row, alarm, health
    priority    INTEGER NOT NULL,           -- 0 goes first (alarms), then 1
    board_t_s   INTEGER NOT NULL,           -- seconds since that boot, board clock
    wall_t      REAL,                       -- Unix seconds, when known
    time_source TEXT,                       -- 'board' (synced board clock) or 'gateway' (fixed up here)
    payload     BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    forwarded_at REAL,
    UNIQUE (device_id, boot_id, seq)
);
CREATE INDEX IF NOT EXISTS entries_pending ON entries (forwarded_at, priority, id);
CREATE TABLE IF NOT EXISTS acks (
    device_id INTEGER NOT NULL, boot_id INTEGER NOT NULL, acked_upto INTEGER NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);
CREATE TABLE IF NOT EXISTS downlink (
    id          INTEGER PRIMARY KEY,        -- also the command id the board answers with
    device_id   INTEGER NOT NULL,
    msg_type    INTEGER NOT NULL,           -- 7 config_push, 8 command
    body        TEXT    NOT NULL,           -- JSON: the config, or {"name", "args"}
    state       TEXT    NOT NULL,           -- queued, sent, done, refused (by the board), expired,
                                            -- superseded (a newer request of the same name replaced it)
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL    NOT NULL,
    sent_at     REAL,
    result      TEXT
);
CREATE INDEX IF NOT EXISTS downlink_open ON downlink (state, device_id, id);
CREATE TABLE IF NOT EXISTS commands (       -- requests from the cloud by their client-chosen id
    device_id   INTEGER NOT NULL,
    command_id  TEXT    NOT NULL,           -- 1-64 characters, the cloud's
    name        TEXT    NOT NULL,
    downlink_id INTEGER,                    -- the queued request; NULL: refused here, or a replay
    state       TEXT    NOT NULL,           -- accepted, refused, delivered, confirmed, failed, timed_out
    detail      TEXT,
    field       TEXT,
    limit_json  TEXT,                       -- JSON: the limit a refused field broke
    fix         TEXT,
    created_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL,
    PRIMARY KEY (device_id, command_id)
);
CREATE INDEX IF NOT EXISTS commands_downlink ON commands (downlink_id);
CREATE TABLE IF NOT EXISTS replay_windows (
    device_id INTEGER NOT NULL, direction INTEGER NOT NULL, top INTEGER NOT NULL, bits INTEGER NOT NULL,
    PRIMARY KEY (device_id, direction)
);
"""


class Entry:
    __slots__ = ("device_id", "boot_id", "seq", "kind", "board_t_s", "payload", "wall_t", "time_source", "seq_last")

    def __init__(self, device_id, boot_id, seq, kind, board_t_s, payload, wall_t=None, time_source=None,
                 seq_last=None):
        self.device_id, self.boot_id, self.seq, self.kind = device_id, boot_id, seq, kind
        self.board_t_s, self.payload, self.wall_t, self.time_source = board_t_s, payload, wall_t, time_source
        self.seq_last = seq_last


# Orders of Store.entries(): "seq" (device, boot, seq: the boards' own order), "id" (as they arrived here).
ENTRY_ORDERS = {"seq": "device_id, boot_id, seq", "id": "id"}


class Store:
    """store.db on one connection.

    readonly: look at an existing store (a live service's, from another process): no schema, no
    writes; SQLite refuses any. timeout: seconds to wait for another connection's write lock.
    durable=False: this connection's commits skip the fsync (synchronous=NORMAL), for a connection
    that writes only what may be lost in a power cut and redone (the forwarder's forwarded marks
    and prunes); entries are always committed by a durable connection."""

    def __init__(self, path, *, readonly=False, durable=True, timeout=5.0):
        self.path = str(path)
        if readonly:
            self.db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout,
                                      isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA cache_size=-512")
            return
        self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode ({mode}); put the store on a local disk")
        self.db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
        # 512 KiB of page cache per connection (SQLite's default is 2 MiB): the working set is the tail of
        # the entries table, and a Raspberry Pi's memory is better left to the page cache of the OS.
        self.db.execute("PRAGMA cache_size=-512")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    def commit(self, entries, now=None, windows=()):
        """Store entries in one durable transaction; return {(device, boot): acked_upto} for the boots touched.

        windows: (device, direction, top, bits) replay windows saved in the same transaction, so a
        restarted gateway refuses every frame it had accepted before its last commit."""
        now = time.time() if now is None else now
        touched = {}
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            again = {(e.device_id, e.boot_id, e.seq) for e in entries if e.kind == "alarm" and e.seq > 0 and db.execute(
                "SELECT 1 FROM entries WHERE device_id=? AND boot_id=? AND seq=?",
                (e.device_id, e.boot_id, e.seq)).fetchone()}
            db.executemany(
                "INSERT OR IGNORE INTO entries (device_id, boot_id, seq, seq_last, kind, priority, board_t_s,"
                " wall_t, time_source, payload, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(e.device_id, e.boot_id, e.seq, e.seq_last, e.kind, 0 if e.kind == "alarm" else 1, e.board_t_s,
                  e.wall_t, e.time_source, bytes(e.payload), now) for e in entries])
            lowest = {}
            for e in entries:
                if e.seq < 0:
                    continue
                key = (e.device_id, e.boot_id)
                if key not in lowest or e.seq < lowest[key].seq:
                    lowest[key] = e
            for key, e in lowest.items():
                # Where a boot the store has never acknowledged starts: its lowest seq here, unless that is an
                # alarm seen for the first time. A board sends an alarm the moment it is raised, ahead of
                # the older records it still holds; counting from it would acknowledge those unseen records,
                # and the board would delete them. Readings, and an alarm sent again (in its turn: it is
                # then the oldest the board holds), come from the board's cursor.
                ahead = e.kind == "alarm" and e.seq > 1 and (e.device_id, e.boot_id, e.seq) not in again
                touched[key] = None if ahead else e.seq
            for w in windows:
                self.save_window(*w)
            acks = {key: self._advance(key, first_seen) for key, first_seen in touched.items()}
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return acks

    def _advance(self, key, lowest_in_batch):
        """The boot's acknowledged seq after this commit: contiguous from where it started (its row), or
        for a boot new here from lowest_in_batch - 1; None (no acknowledgement yet) for a new boot whose
        start is not known (lowest_in_batch None: only an alarm sent ahead of the board's backlog)."""
        device_id, boot_id = key
        row = self.db.execute("SELECT acked_upto FROM acks WHERE device_id=? AND boot_id=?", key).fetchone()
        if row is None and lowest_in_batch is None:
            return None
        upto = row[0] if row else lowest_in_batch - 1
        for seq, seq_last in self.db.execute(
                "SELECT seq, COALESCE(seq_last, seq) FROM entries WHERE device_id=? AND boot_id=? AND seq>?"
                " ORDER BY seq", (device_id, boot_id, upto)):
            if seq != upto + 1:
                break
            upto = seq_last
        self.db.execute("INSERT INTO acks (device_id, boot_id, acked_upto) VALUES (?,?,?) "
                        "ON CONFLICT (device_id, boot_id) DO UPDATE SET acked_upto=excluded.acked_upto",
                        (device_id, boot_id, upto))
        return upto

    def covering(self, device_id, boot_id, first, last):
        """Stored entries with seq in first..last, in order: (seq, seq_last, payload)."""
        return self.db.execute(
            "SELECT seq, COALESCE(seq_last, seq), payload FROM entries WHERE device_id=? AND boot_id=?"
            " AND seq BETWEEN ? AND ? ORDER BY seq", (device_id, boot_id, first, last)).fetchall()

    def acked_upto(self, device_id, boot_id):
        row = self.db.execute("SELECT acked_upto FROM acks WHERE device_id=? AND boot_id=?",
                              (device_id, boot_id)).fetchone()
        return row[0] if row else None

    def pending(self, limit=500, after_id=0, priority=None):
        """Entries not yet PUBACKed with id > after_id: alarms first, then in arrival order; given a priority
        (0 alarms, 1 the rest), only those, in arrival order (an index range: cheap when there are none)."""
        one = priority is not None
        return self.db.execute(
            "SELECT id, device_id, boot_id, seq, kind, board_t_s, wall_t, time_source, payload FROM entries"
            " WHERE forwarded_at IS NULL" + (" AND priority = ?" if one else "") + " AND id > ?"
            " ORDER BY " + ("id" if one else "priority, id") + " LIMIT ?",
            ((priority,) if one else ()) + (after_id, limit)).fetchall()

    def mark_forwarded(self, ids, now=None):
        """Mark entries PUBACKed, in one transaction: each run of consecutive ids in one UPDATE (id BETWEEN
        its first and last: exactly those ids), so a window read ahead in order costs a statement a run,
        not a row."""
        now = time.time() if now is None else now
        runs = []
        for i in sorted(set(ids)):
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("UPDATE entries SET forwarded_at=? WHERE id BETWEEN ? AND ?",
                            [(now, first, last) for first, last in runs])
        self.db.execute("COMMIT")

    def since(self, device_id, boot_id, seq):
        """Replay: a device's entries after (boot_id, seq), forwarded or not, in order."""
        return self.db.execute(
            "SELECT id, device_id, boot_id, seq, kind, board_t_s, wall_t, time_source, payload FROM entries"
            " WHERE device_id=? AND (boot_id>? OR (boot_id=? AND seq>?)) ORDER BY boot_id, seq",
            (device_id, boot_id, boot_id, seq)).fetchall()

    def since_time(self, device_id, t, limit=None, until=None):
        """Replay by time: a device's entries whose wall time (or, when unknown, arrival here) is at or
        after `t` (and, given `until`, at or before it; Unix seconds), forwarded or not, in (boot_id, seq)
        order; at most `limit` rows."""
        return self.db.execute(
            "SELECT id, device_id, boot_id, seq, kind, board_t_s, wall_t, time_source, payload FROM entries"
            " WHERE device_id=? AND COALESCE(wall_t, received_at) BETWEEN ? AND ? ORDER BY boot_id, seq LIMIT ?",
            (device_id, t, float("inf") if until is None else until, -1 if limit is None else limit)).fetchall()

    # -- reading the store: status, the CLI, the simulator, benchmarks, tests ----------------------
    def count(self, kind=None, forwarded=None):
        """How many entries are stored: of one kind or all; forwarded=True/False: only those PUBACKed/pending."""
        sql, args = "SELECT COUNT(*) FROM entries WHERE 1", []
        if kind is not None:
            sql, args = sql + " AND kind=?", args + [kind]
        if forwarded is not None:
            sql += " AND forwarded_at IS NOT NULL" if forwarded else " AND forwarded_at IS NULL"
        return self.db.execute(sql, args).fetchone()[0]

    def count_by_device(self, kind=None):
        """{device_id: entries stored}, of one kind or all."""
        if kind is None:
            rows = self.db.execute("SELECT device_id, COUNT(*) FROM entries GROUP BY device_id")
        else:
            rows = self.db.execute("SELECT device_id, COUNT(*) FROM entries WHERE kind=? GROUP BY device_id", (kind,))
        return dict(rows.fetchall())

    def entries(self, kind=None, order="seq"):
        """The items of stored entries (their CBOR payloads, decoded), of one kind or all, in `order`:
        "seq" (device, boot, seq) or "id" (as they arrived)."""
        sql = "SELECT payload FROM entries" + (" WHERE kind=?" if kind is not None else "")
        rows = self.db.execute(f"{sql} ORDER BY {ENTRY_ORDERS[order]}", () if kind is None else (kind,))
        return [cbor2.loads(r[0]) for r in rows.fetchall()]

    def forward_latencies(self, received_since=None):
        """Seconds from commit to PUBACK of every forwarded entry (received at or after `received_since`)."""
        return [r[0] for r in self.db.execute(
            "SELECT forwarded_at - received_at FROM entries WHERE forwarded_at IS NOT NULL AND received_at >= ?",
            (float("-inf") if received_since is None else received_since,))]

    def prune(self, retention_s, now=None):
        """Delete forwarded entries older than the retention window; never an unforwarded one."""
        now = time.time() if now is None else now
        cur = self.db.execute("DELETE FROM entries WHERE forwarded_at IS NOT NULL AND forwarded_at < ?",
                              (now - retention_s,))
        return cur.rowcount

    def save_window(self, device_id, direction, top, bits):
        self.db.execute("INSERT INTO replay_windows VALUES (?,?,?,?) ON CONFLICT (device_id, direction) "
                        "DO UPDATE SET top=excluded.top, bits=excluded.bits",
                        (device_id, direction, top, bits - (1 << 64) if bits >= 1 << 63 else bits))

    def load_window(self, device_id, direction):
        row = self.db.execute("SELECT top, bits FROM replay_windows WHERE device_id=? AND direction=?",
                              (device_id, direction)).fetchone()
        if not row:
            return -1, 0
        top, bits = row
        return top, bits + (1 << 64) if bits < 0 else bits   # SQLite integers are signed 64-bit

    def newest_reading(self, device_id):
        """The item of a device's newest stored reading (its last boot's highest seq), or None."""
        row = self.db.execute("SELECT payload FROM entries WHERE device_id=? AND kind='reading'"
                              " ORDER BY boot_id DESC, seq DESC LIMIT 1", (device_id,)).fetchone()
        return cbor2.loads(row[0]) if row else None

    def newest_alarms(self, device_id):
        """{code: item} of a device's newest stored alarm entry per code, in (boot, seq) order: the alarm
        state a restarted gateway starts from."""
        newest = {}
        for (payload,) in self.db.execute("SELECT payload FROM entries WHERE device_id=? AND kind='alarm'"
                                          " ORDER BY boot_id, seq", (device_id,)):
            item = cbor2.loads(payload)
            if isinstance(item, dict) and "code" in item:
                newest[item["code"]] = item
        return newest

    # -- downlink queue: held until the board answers --------------------------------------
    def queue_downlink(self, device_id, msg_type, body, now=None, supersede=None, command=None):
        """Queue a request (body: JSON text); its id. supersede: a command name whose open requests to
        this device the new one replaces (marked 'superseded' in the same transaction), so a board that
        was away gets only the newest, not a backlog of stale ones. command: (command_id, name) of a
        request from the cloud, recorded 'accepted' in the same transaction, so the id and the request
        are durable together."""
        now = time.time() if now is None else now
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if supersede is not None:
                self.db.execute("UPDATE downlink SET state='superseded', result='superseded by a newer request'"
                                " WHERE device_id=? AND msg_type=? AND state IN ('queued','sent')"
                                " AND CASE WHEN json_valid(body) THEN json_extract(body, '$.name') END=?",
                                (device_id, msg_type, supersede))
                self.db.execute("UPDATE commands SET state='failed', detail='superseded by a newer request',"
                                " updated_at=? WHERE state IN ('accepted','delivered') AND downlink_id IN"
                                " (SELECT id FROM downlink WHERE device_id=? AND state='superseded')",
                                (now, device_id))
            cur = self.db.execute("INSERT INTO downlink (device_id, msg_type, body, state, created_at) VALUES"
                                  " (?,?,?,'queued',?)", (device_id, msg_type, body, now))
            if command is not None:
                self._insert_command(device_id, command[0], command[1], "accepted", now, downlink_id=cur.lastrowid)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return cur.lastrowid

    # -- commands from the cloud: one row per (device, command id), so a repeated id does the work once --
    COMMAND_COLUMNS = ("device_id", "command_id", "name", "downlink_id", "state", "detail", "field", "limit",
                       "fix", "created_at", "updated_at")

    def _insert_command(self, device_id, command_id, name, state, now, downlink_id=None, detail=None, field=None,
                        limit=None, fix=None):
        self.db.execute("INSERT INTO commands VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (device_id, command_id, name, downlink_id, state, detail, field,
                         None if limit is None else json.dumps(limit), fix, now, now))

    def record_command(self, device_id, command_id, name, state, now=None, detail=None, field=None, limit=None,
                       fix=None):
        """A command with no queued request (refused here, or served by the gateway itself), durably."""
        now = time.time() if now is None else now
        self._insert_command(device_id, command_id, name, state, now, detail=detail, field=field, limit=limit,
                             fix=fix)

    def command(self, device_id, command_id):
        """The command's row as a dict (COMMAND_COLUMNS; limit decoded), or None for an id never seen."""
        row = self.db.execute("SELECT * FROM commands WHERE device_id=? AND command_id=?",
                              (device_id, command_id)).fetchone()
        if row is None:
            return None
        out = dict(zip(self.COMMAND_COLUMNS, row))
        out["limit"] = None if out["limit"] is None else json.loads(out["limit"])
        return out

    def command_of_downlink(self, downlink_id):
        """(device_id, command_id) of the cloud's command that queued this request, or None."""
        return self.db.execute("SELECT device_id, command_id FROM commands WHERE downlink_id=?",
                               (downlink_id,)).fetchone()

    def set_command_state(self, device_id, command_id, state, detail=None, now=None):
        """Move a command on (delivered, confirmed, failed, timed_out); durable when it returns."""
        now = time.time() if now is None else now
        self.db.execute("UPDATE commands SET state=?, detail=COALESCE(?, detail), updated_at=? WHERE device_id=?"
                        " AND command_id=?", (state, detail, now, device_id, command_id))

    def downlink_open(self, device_id=None):
        """The oldest open request of each device (or of one): (id, device_id, msg_type, body, attempts,
        sent_at), sent_at None for one never sent."""
        where, args = ("AND device_id=? ", (device_id,)) if device_id is not None else ("", ())
        return self.db.execute(
            "SELECT id, device_id, msg_type, body, attempts, sent_at FROM downlink WHERE id IN (SELECT MIN(id)"
            f" FROM downlink WHERE state IN ('queued','sent') {where}GROUP BY device_id) ORDER BY id", args).fetchall()

    def mark_downlink_sent(self, qid, now, attempt=True):
        """The request went out at `now`; attempt=False: a send that does not count as one of its tries."""
        self.db.execute("UPDATE downlink SET state='sent', attempts=attempts+?, sent_at=? WHERE id=?",
                        (1 if attempt else 0, now, qid))

    def finish_downlink(self, qid, state, result):
        self.db.execute("UPDATE downlink SET state=?, result=? WHERE id=? AND state IN ('queued','sent')",
                        (state, result, qid))

    def downlink_status(self, qid):
        return self.db.execute("SELECT state, attempts, result FROM downlink WHERE id=?", (qid,)).fetchone()

    def integrity_ok(self):
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
