# Message payloads: CBOR maps with small unsigned-int keys (see schema.cddl).
#
# Every reading has a stable identity (device, boot_id, seq) and its board
# time; a readings batch carries seq_first and t0_s, and reading i is
# (seq_first + i, t0_s + i * interval_s). Units and calibration travel once
# per batch. A role whose spec says REGISTER (the meter) sends an exact register
# plus per-interval deltas, so the cumulative total survives any loss of a
# frame's neighbours. Roles are numbered by protocol/roles ROLES.
#
# decode() is the one gate both sides use: a payload that is not a map of its
# message's rule (RULES, below: schema.cddl's types and ranges) raises
# MessageError, so no handler ever sees a text boot id or a seq past 32 bits.
from protocol._compat import const

from protocol import cbor, validate

HELLO = const(1)
READINGS = const(2)
ALARM = const(3)
HEALTH = const(4)
ACK = const(5)
TIME_SYNC = const(6)
CONFIG_PUSH = const(7)
COMMAND = const(8)
COMMAND_RESULT = const(9)
NAMES = {1: "hello", 2: "readings", 3: "alarm", 4: "health", 5: "ack", 6: "time_sync", 7: "config_push",
         8: "command", 9: "command_result"}
# Reset causes by their number on the wire (hello key 6, health key 5): the one table.
RESET_CAUSES = ("power_on", "hard_reset", "watchdog", "soft_reset", "brownout", "deepsleep", "panic")
# Alarm codes 100+ are the runtime's, the same for every role; 1..99 belong to the role's spec
# (protocol/roles/<role>.py ALARMS).
A_LOG_FULL = const(100)
A_CONFIG_INVALID = const(101)
A_FAULT = const(102)
RUNTIME_ALARMS = {A_LOG_FULL: "log_full", A_CONFIG_INVALID: "config_invalid", A_FAULT: "fault"}


class MessageError(ValueError):
    """reason: what a receiver counts it as (protocol/link.py REASONS): "unknown_type", "bad_payload"
    (not CBOR of the profile, not a map, a required key missing) or "invalid_<name>" (a key of the
    wrong type or out of range)."""

    def __init__(self, text, reason="bad_payload"):
        super().__init__(text)
        self.reason = reason


def hello(boot_id, fw_version, board, role, config_hash, clock_synced, reset_cause, board_t_s=None, addr=None):
    m = {0: boot_id, 1: fw_version, 2: board, 3: role, 4: bytes(config_hash), 5: 1 if clock_synced else 0,
         6: reset_cause}
    if board_t_s is not None:
        m[7] = board_t_s
    if addr is not None:
        m[8] = addr
    return m


def units(unit, scale=0, k_factor_milli=None):
    """unit as text ("L", "mL", "mg/L", "mm"); value = raw * 10**scale; meters add their K-factor."""
    u = {0: unit, 1: scale}
    if k_factor_milli is not None:
        u[2] = k_factor_milli
    return u


SERIES_INTERVAL = 0      # readings of consecutive intervals: summed, they are the consumption
SERIES_DAILY = 1         # one reading per local day, for billing; overlaps the interval series


def readings(boot_id, seq_first, t0_s, interval_s, role, unit_map, rows, register=None, wall_t0=None,
             series=SERIES_INTERVAL, seq_step=1):
    """seq_step > 1: each row stands for seq_step seqs (interval readings merged when the board's log filled)."""
    m = {0: boot_id, 1: seq_first, 2: t0_s, 3: interval_s, 4: role, 5: unit_map, 6: rows}
    if register is not None:
        m[7] = register
    if wall_t0 is not None:
        m[8] = wall_t0
    if series != SERIES_INTERVAL:
        m[9] = series
    if seq_step != 1:
        m[10] = seq_step
    return m


def put_readings_head(buf, off, boot_id, seq_first, t0_s, interval_s, role, wall_t0=-1, series=SERIES_INTERVAL,
                      seq_step=1, register=True):
    """A readings map's head and keys 0-4 into buf at off, without allocating; a role's encoder writes
    its units (5) and rows (6), then put_readings_tail. Together: the bytes of cbor.encode(readings(...)),
    keys ascending (the deterministic order). register: False for a role whose batches carry none."""
    put_head, put_int = cbor.put_head, cbor.put_int
    off = put_head(buf, off, 5, 7 + (1 if register else 0) + (wall_t0 >= 0) + (series != SERIES_INTERVAL) + (seq_step != 1))
    off = put_head(buf, off, 0, 0)
    off = put_int(buf, off, boot_id)
    off = put_head(buf, off, 0, 1)
    off = put_int(buf, off, seq_first)
    off = put_head(buf, off, 0, 2)
    off = put_int(buf, off, t0_s)
    off = put_head(buf, off, 0, 3)
    off = put_int(buf, off, interval_s)
    off = put_head(buf, off, 0, 4)
    return put_int(buf, off, role)


def put_readings_tail(buf, off, register, wall_t0=-1, series=SERIES_INTERVAL, seq_step=1):
    """Keys 7-10 of a readings map (the register unless None; wall time, series and seq step when not
    the default), after the role's rows."""
    put_head, put_int = cbor.put_head, cbor.put_int
    if register is not None:
        off = put_head(buf, off, 0, 7)
        off = put_int(buf, off, register)
    if wall_t0 >= 0:
        off = put_head(buf, off, 0, 8)
        off = put_int(buf, off, wall_t0)
    if series != SERIES_INTERVAL:
        off = put_head(buf, off, 0, 9)
        off = put_int(buf, off, series)
    if seq_step != 1:
        off = put_head(buf, off, 0, 10)
        off = put_int(buf, off, seq_step)
    return off


def alarm(boot_id, seq, t_s, code, active, detail=0):
    return {0: boot_id, 1: seq, 2: t_s, 3: code, 4: bool(active), 5: detail}


def health(boot_id, uptime_s, heap_free, heap_min, resets, reset_cause, tx, rx, rejected, log_fill_permille,
           flash_writes, jitter_us=None):
    m = {0: boot_id, 1: uptime_s, 2: heap_free, 3: heap_min, 4: resets, 5: reset_cause,
         6: {0: tx, 1: rx, 2: rejected}, 7: log_fill_permille, 8: flash_writes}
    if jitter_us is not None:
        m[9] = {0: jitter_us[0], 1: jitter_us[1], 2: jitter_us[2]}
    return m


def ack(boot_id, seq):
    return {0: boot_id, 1: seq}


def time_sync(wall_ms, board_t_s):
    return {0: wall_ms, 1: board_t_s}


def config_push(config_id, config):
    return {0: config_id, 1: config}


def command(command_id, name, args=None):
    return {0: command_id, 1: name, 2: args or {}}


def command_result(command_id, ok, detail=""):
    return {0: command_id, 1: bool(ok), 2: detail}


# Each message's rule, as schema.cddl says: (key, name, kind, lo, hi, required), kinds as in
# protocol/validate.py. Literal tuples only (no names), so a board keeps them in flash. Checked
# in this order: readings' rows last, once the keys they depend on are known good.
# Three are tighter than schema.cddl's bare uint, since a board holds them in 32 bits (its flash
# log's wall time, its board seconds): time_sync's wall ms (seconds within a u32), readings' wall
# time (key 8) and health's uptime (SPEC.md 5, "Validation and refusals after the tag").
RULES = {
    HELLO: ((0, "boot_id", "u", 0, 0xFFFFFFFF, 1), (1, "firmware", "t", 1, 32, 1), (2, "board", "t", 1, 32, 1),
            (3, "role", "u", 0, 2, 1), (4, "config_hash", "y", 8, 8, 1), (5, "clock_synced", "u", 0, 1, 1),
            (6, "reset_cause", "u", 0, 6, 1), (7, "board_t_s", "u", 0, 0xFFFFFFFF, 0),
            (8, "addr", "u", 0, 254, 0)),
    READINGS: ((0, "boot_id", "u", 0, 0xFFFFFFFF, 1), (1, "seq", "u", 0, 0xFFFFFFFF, 1),
               (2, "t0_s", "u", 0, 0xFFFFFFFF, 1), (3, "interval_s", "u", 0, 86400, 1), (4, "role", "u", 0, 2, 1),
               (5, "units", "m", ((0, "unit", "t", 1, 8, 1), (1, "scale", "i", -9, 9, 1),
                                  (2, "k_factor_milli", "u", 0, None, 0)), None, 1),
               (7, "register", "u", 0, None, 0), (8, "wall_t0", "u", 0, 0xFFFFFFFF, 0),
               (9, "series", "u", 0, 1, 0), (10, "seq_step", "u", 2, None, 0), (6, "rows", "r", None, None, 1)),
    ALARM: ((0, "boot_id", "u", 0, 0xFFFFFFFF, 1), (1, "seq", "u", 0, 0xFFFFFFFF, 1),
            (2, "t_s", "u", 0, 0xFFFFFFFF, 1), (3, "code", "u", 0, None, 1), (4, "active", "b", None, None, 1),
            (5, "detail", "i", None, None, 0)),
    HEALTH: ((0, "boot_id", "u", 0, 0xFFFFFFFF, 1), (1, "uptime_s", "u", 0, 0xFFFFFFFF, 1),
             (2, "heap_free", "u", 0, None, 1), (3, "heap_min", "u", 0, None, 1), (4, "resets", "u", 0, None, 1),
             (5, "reset_cause", "u", 0, 6, 1),
             (6, "link", "m", ((0, "sent", "u", 0, None, 1), (1, "received", "u", 0, None, 1),
                               (2, "rejected", "u", 0, None, 1)), None, 1),
             (7, "log_fill_permille", "u", 0, 1000, 1), (8, "flash_writes", "u", 0, None, 1),
             (9, "lateness_us", "m", ((0, "p50", "u", 0, None, 1), (1, "p99", "u", 0, None, 1),
                                      (2, "max", "u", 0, None, 1)), None, 0)),
    ACK: ((0, "boot_id", "u", 0, 0xFFFFFFFF, 1), (1, "seq", "u", 0, 0xFFFFFFFF, 1)),
    TIME_SYNC: ((0, "wall_ms", "u", 0, 4294967295999, 1), (1, "board_t_s", "u", 0, 0xFFFFFFFF, 1)),
    CONFIG_PUSH: ((0, "id", "u", 0, None, 1), (1, "config", "s", None, None, 1)),
    COMMAND: ((0, "id", "u", 0, None, 1), (1, "name", "t", 1, 32, 1), (2, "args", "s", None, None, 1)),
    COMMAND_RESULT: ((0, "id", "u", 0, None, 1), (1, "ok", "b", None, None, 1), (2, "detail", "t", 0, 250, 0)),
}


def decode(msg_type, payload):
    """Decode a payload and check it against its message's rule; raise MessageError naming the
    message and the key ("readings: key 1 (seq) is not a u32")."""
    rules = RULES.get(msg_type)
    if rules is None:
        raise MessageError("unknown message type %d" % msg_type, "unknown_type")
    name = NAMES[msg_type]
    try:
        m = cbor.decode(payload)
    except cbor.CBORError as e:
        raise MessageError("%s: %s" % (name, e))
    if type(m) is not dict:
        raise MessageError("%s: payload is not a map" % name)
    why = validate.problem(m, rules)
    if why is not None:
        raise MessageError("%s: %s" % (name, why[1]), "bad_payload" if why[0] else "invalid_" + name)
    return m
