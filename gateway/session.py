"""Per-device sessions: uplink frames in, durable commits, acknowledgements and wall time out.

The promise that matters: a board is told (boot, seq) is acknowledged only
after the Store transaction holding that entry has committed (synchronous=FULL);
until then the board keeps it in its flash log. Frames are collected and
committed in groups (`flush()`), so many frames share one fsync.

Time: a hello carries the board's seconds since boot, so each (device, boot)
gets a wall-clock origin here; readings the board sent without wall time are
fixed up from it and marked `time_source: "gateway"` (`"board"` when the board
had been synced, `"unknown"` for a boot this gateway never heard from).

Merged readings (seq_step > 1, from a board whose log filled) cover a seq range;
if some of that range is already stored as finer readings, only the rest is
stored, as one entry whose value is the register difference, so the stored
series never counts a litre twice.

Rows: a bare number (the meter's), or, for a role whose spec declares FIELDS, a
list of integer columns: the item's value is the first (what the register
counts) and its "fields" every column scaled by name.

Receiving never raises, and only whole valid messages change anything: the link
Receiver hands over only messages that messages.decode checked against their
rule (types and ranges of schema.cddl; a batch with one row that does not fit its
role's FIELDS is refused whole, so nothing of it is stored or acknowledged and
the board keeps it), and each handler works out everything first and changes the
session's state last. A message refused after its tag verified is counted by
reason in the Receiver's counts (invalid_<type>, or handler_error when a handler
raised: a bug here, logged once per device and reason, with no traceback).
"""

import functools
import logging
import time
import traceback

import cbor2

from gateway.logs import log_event
from gateway.receiver import FastReceiver
from gateway.store import Entry
from protocol import link, secure
from protocol.roles import catalog as roles
from protocol import messages as M

log = logging.getLogger("prapa.gateway.session")

SERIES = {M.SERIES_INTERVAL: "interval", M.SERIES_DAILY: "daily"}
TIME_SYNC_MIN_INTERVAL_S = 1.0
# Devices with a key in the registry that one gateway holds a session for (each about 10 kB here); a frame
# of a further device counts as unknown_device. A town has ~1,400 meters; `prapa bench scaling` runs 5,000.
MAX_DEVICES = 16_384


@functools.lru_cache(maxsize=64)
def has_register(role_name):
    """Readings of this role carry an exact register (its spec says REGISTER)."""
    return bool(roles.attr(role_name, "REGISTER", False))


@functools.lru_cache(maxsize=64)
def row_fields(role_name):
    """The columns of this role's readings row, (name, unit, scale, missing) each, from its spec's
    FIELDS; () for a role whose row is one bare number (the meter)."""
    return tuple(tuple(f) for f in roles.attr(role_name, "FIELDS", None) or ())


def scaled(column, scale, missing=None):
    """A row column as its value: column x 10**scale (an int for scale >= 0, else rounded to the
    scale's decimals), None where it holds `missing` (the spec's "no valid sample")."""
    if missing is not None and column == missing:
        return None
    if scale >= 0:
        return column * 10 ** scale
    return round(column * 10 ** scale, -scale)


def row_columns(fields, row):
    """{name: value} for a row of the role's FIELDS (messages.decode has checked that it fits them)."""
    return {name: scaled(c, scale, missing) for (name, _unit, scale, missing), c in zip(fields, row)}


class Device:
    """What the gateway knows of one board between frames (rebuilt from its next hello)."""

    __slots__ = ("device_id", "boot_id", "role", "firmware", "board", "addr", "wall_origin", "sender", "link",
                 "last_seen", "last_time_sync", "health", "alarms", "frames")

    def __init__(self, device_id):
        self.device_id = device_id
        self.boot_id = None
        self.role = None
        self.firmware = self.board = None
        self.addr = 255
        self.wall_origin = {}          # boot_id -> wall time (Unix s) of board second 0
        self.sender = None
        self.link = None               # where the board was last heard; None: the default send
        self.last_seen = 0.0
        self.last_time_sync = 0.0
        self.health = None
        self.alarms = {}               # code -> (active, wall_t, name, detail)
        self.frames = 0


class Sessions:
    def __init__(self, store, key_for, send, downlink_counters, clock=time.time, role_of=None, wall_clock=None):
        """key_for(device_id) -> key or None; send(addr, wire_bytes) writes to the link of a device
        not heard on a known link (feed(data, link) records where each device is);
        downlink_counters(device_id) -> an object with next() (persisted by the caller)."""
        self.store = store
        self.key_for = key_for
        self.send = send
        self.downlink_counters = downlink_counters
        self.clock = clock                  # the host's time: liveness, resends, commit times
        self.wall_clock = wall_clock or clock   # the wall time given to boards (a simulated site's runs faster)
        self.role_of = role_of or (lambda device_id: None)
        self.devices = {}
        self.pending = []              # entries received, not yet committed
        self._latest = {}              # device -> (wall_t, value, register, fields or None), newest interval reading
        self._link = None
        self._logged = set()           # (device, reason) refusals logged already: each is logged once
        self.receiver = FastReceiver(secure.UPLINK, key_for, self._on_message, accept_any_addr=True,
                                     max_devices=MAX_DEVICES, window_for=self._saved_window,
                                     on_refused=self._refused)
        self._windows_touched = set()
        self.committed = 0
        self.acks_sent = 0
        self.on_command_result = lambda device_id, message: None
        self.on_heard = lambda device_id: None    # after each accepted message, once it took effect
        self.accepting = True          # False: verify and drop, acknowledge nothing (the disk guard)
        # Items are encoded with keys in the order written here (cbor2's canonical sort costs a third of
        # the ingest time); any consumer decodes them as maps, so the order carries no meaning.

    # -- input ------------------------------------------------------------------------
    def feed(self, data, link=None):
        """Bytes from a serial line; replies to devices heard here go back on `link` (its write(addr, wire))."""
        self._link = link
        self.receiver.feed(data)

    def datagram(self, frame, link=None):
        self._link = link
        self.receiver.datagram(frame)

    def device(self, device_id):
        d = self.devices.get(device_id)
        if d is None:
            d = self.devices[device_id] = Device(device_id)
            d.role = self.role_of(device_id)
        return d

    def _on_message(self, device_id, _counter, msg_type, m):
        """The Receiver's handler: m follows its message's rule (messages.decode). Returns None
        (accepted) or "handler_error" (a bug here, logged once per device): never raises."""
        try:
            self._dispatch(device_id, msg_type, m)
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            self._refused(device_id, "handler_error", f"{M.NAMES[msg_type]}: {e!r} at "
                                                      f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}")
            return "handler_error"
        try:
            self.on_heard(device_id)
        except Exception as e:         # the message is taken; what the caller does on hearing is its own
            if (device_id, "on_heard") not in self._logged and len(self._logged) < 65536:
                self._logged.add((device_id, "on_heard"))
                log_event(log, logging.ERROR, "on_heard_failed", device=f"{device_id:08x}", error=repr(e))
        return None

    def _refused(self, device_id, reason, problem):
        """A message refused after its tag verified: the first of each reason from a device is logged."""
        if (device_id, reason) in self._logged or len(self._logged) >= 65536:
            return
        self._logged.add((device_id, reason))
        log_event(log, logging.ERROR if reason == "handler_error" else logging.WARNING, "message_refused",
                  device=f"{device_id:08x}", reason=reason, problem=str(problem),
                  note="more of this reason from this device are only counted")

    def _dispatch(self, device_id, msg_type, m):
        now = self.clock()
        d = self.device(device_id)
        d.last_seen = now
        d.frames += 1
        self._windows_touched.add(device_id)
        if self._link is not None:
            d.link = self._link                     # where the board is: replies to this message go there
        if msg_type == M.HELLO:
            self._hello(d, m, now)
        elif msg_type == M.READINGS:
            self._readings(d, m, now)
        elif msg_type == M.ALARM:
            self._alarm(d, m, now)
        elif msg_type == M.HEALTH:
            d.health = dict(m)
            self._note_boot(d, m[0])
            if m[0] not in d.wall_origin:
                d.wall_origin[m[0]] = self.wall_clock() - m[1]
        elif msg_type == M.COMMAND_RESULT:
            self.on_command_result(device_id, m)

    def _note_boot(self, d, boot_id):
        if d.boot_id is None or boot_id > d.boot_id:
            d.boot_id = boot_id

    def _hello(self, d, m, now):
        role = roles.name_of(m[3])
        d.boot_id, d.firmware, d.board, d.role = m[0], m[1], m[2], role
        if 8 in m:
            d.addr = m[8]
        if 7 in m:
            d.wall_origin[m[0]] = self.wall_clock() - m[7]
        self._time_sync(d, now, force=True)

    def _time_sync(self, d, now, force=False):
        if not force and now - d.last_time_sync < TIME_SYNC_MIN_INTERVAL_S:
            return
        d.last_time_sync = now
        self._downlink(d, M.TIME_SYNC, M.time_sync(int(self.wall_clock() * 1000), 0))

    def time_sync(self, device_id):
        self._time_sync(self.device(device_id), self.clock(), force=True)

    def downlink(self, device_id, msg_type, message):
        """Send a message to a board this gateway has heard from (its address comes from its hello)."""
        self._downlink(self.device(device_id), msg_type, message)

    def _downlink(self, d, msg_type, message):
        key = self.key_for(d.device_id)
        if key is None:
            return
        if d.sender is None:
            d.sender = link.Sender(key, d.device_id, secure.DOWNLINK, self.downlink_counters(d.device_id),
                                   addr=d.addr)
        d.sender.addr = d.addr
        payload = bytearray(cbor2.dumps(message, canonical=True))
        if d.link is not None and not getattr(d.link, "framed", True):
            n = d.sender.frame(msg_type, payload, len(payload))           # a datagram carries one bare frame
            d.link.write(d.addr, bytes(d.sender.frame_buf[:n]))
            return
        n = d.sender.wire_into(msg_type, payload, len(payload))
        (d.link.write if d.link is not None else self.send)(d.addr, bytes(d.sender.wire[:n]))

    def _wall(self, d, boot_id, board_t_s, wall_from_board):
        if wall_from_board is not None:
            return wall_from_board, "board"
        origin = d.wall_origin.get(boot_id)
        if origin is None:
            return None, "unknown"
        return round(origin + board_t_s, 3), "gateway"

    def _readings(self, d, m, now):
        if not self.accepting:
            return
        boot, seq0, t0, span, role, units, rows = m[0], m[1], m[2], m[3], m[4], m[5], m[6]
        role_name = roles.name_of(role)
        series, step = m.get(9, M.SERIES_INTERVAL), m.get(10, 1)
        register = m.get(7)
        wall0 = m.get(8)
        chained = register is not None and has_register(role_name)
        fields = row_fields(role_name)
        entries, latest = [], None
        for i, row in enumerate(rows):
            seq, seq_last, t_end = seq0 + i * step, seq0 + (i + 1) * step - 1, t0 + i * span
            value, columns = (row[0], row_columns(fields, row)) if fields else (row, None)
            wall, source = self._wall(d, boot, t_end, None if wall0 is None else wall0 + i * span)
            item = {"device": f"{d.device_id:08x}", "boot": boot, "seq": seq, "kind": "reading", "role": role_name,
                    "series": SERIES.get(series, str(series)), "t_board_s": t_end, "span_s": span, "wall_t": wall,
                    "time_source": source, "unit": units.get(0), "scale": units.get(1, 0)}
            if 2 in units:
                item["k_factor_milli"] = units[2]
            if chained:
                item["register_before"], item["value"] = register, value
                register += value
                item["register"] = register
            else:
                item["value"] = value
            if columns is not None:
                item["fields"] = columns
            if seq_last != seq:
                item["seq_last"] = seq_last
                item = self._trim_merged(d.device_id, boot, item)
                if item is None:
                    continue
            if series == M.SERIES_INTERVAL and wall is not None:
                latest = (wall, item["value"], item.get("register"), item.get("fields"))
            entries.append(Entry(d.device_id, boot, item["seq"], "reading", t_end, cbor2.dumps(item), wall, source,
                                 item.get("seq_last")))
        if wall0 is None and (d.boot_id is None or boot >= d.boot_id):
            self._time_sync(d, now)                 # the board's newest boot has no wall time yet
        # The whole batch is worked out: only now does the session change.
        self._note_boot(d, boot)
        d.role = d.role or role_name
        if latest is not None:
            self._latest[d.device_id] = latest
        self.pending.extend(entries)

    def _trim_merged(self, device_id, boot, item):
        """Drop the part of a merged reading this store already holds as finer readings."""
        covered = self.store.covering(device_id, boot, item["seq"], item["seq_last"])
        upto = item["seq"] - 1
        last_register = None
        for seq, seq_last, payload in covered:
            if seq != upto + 1:
                break
            upto = seq_last
            last_register = cbor2.loads(payload).get("register")
        if upto < item["seq"]:
            return item
        if upto >= item["seq_last"]:
            return None
        item = dict(item, seq=upto + 1)
        if last_register is not None and "register" in item:
            item["register_before"] = last_register
            item["value"] = item["register"] - last_register
            if "fields" in item:        # the register's column follows; the others still cover the whole merge
                name, _unit, scale, missing = row_fields(item["role"])[0]
                item["fields"] = dict(item["fields"], **{name: scaled(item["value"], scale, missing)})
        return item

    def _alarm(self, d, m, now):
        if not self.accepting:
            return
        boot, seq, t_s, code, active = m[0], m[1], m[2], m[3], m[4]
        wall, source = self._wall(d, boot, t_s, None)
        name = roles.alarm_name(d.role, code)
        item = {"device": f"{d.device_id:08x}", "boot": boot, "seq": seq, "kind": "alarm", "role": d.role,
                "code": code, "name": name, "active": active, "detail": m.get(5, 0), "t_board_s": t_s,
                "wall_t": wall, "time_source": source}
        entry = Entry(d.device_id, boot, seq, "alarm", t_s, cbor2.dumps(item), wall, source)
        self._note_boot(d, boot)
        d.alarms[code] = (active, wall, name, item["detail"])
        self.pending.append(entry)

    # -- commit and acknowledge ---------------------------------------------------------
    def _saved_window(self, device_id):
        top, bits = self.store.load_window(device_id, secure.UPLINK)
        w = secure.ReplayWindow(top)
        w.bits = bits
        return w

    def flush(self):
        """Commit what arrived (and the replay windows that accepted it) as one transaction, then
        acknowledge it; return entries committed."""
        if not self.pending and not self._windows_touched:
            return 0
        entries, self.pending = self.pending, []
        windows = []
        for device_id in self._windows_touched:
            op = self.receiver.openers.get(device_id)
            if op is not None:
                windows.append((device_id, secure.UPLINK, op.window.top, op.window.bits))
        self._windows_touched = set()
        acks = self.store.commit(entries, now=self.clock(), windows=windows)
        self.committed += len(entries)
        for (device_id, boot_id), upto in acks.items():
            if upto is None or upto < 0:
                continue
            d = self.devices.get(device_id)
            if d is not None:
                self._downlink(d, M.ACK, M.ack(boot_id, upto))
                self.acks_sent += 1
        return len(entries)

    def take_latest(self):
        """Each device's newest interval reading since the last call (for live views), then forget them."""
        latest, self._latest = self._latest, {}
        return latest

    def counts(self):
        return self.receiver.counts
