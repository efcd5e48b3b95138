# Message payloads: CBOR maps with small unsigned-int keys (see schema.cddl).
#
# Every reading has a stable identity (device, boot_id, seq) and its board
# time; a readings batch carries seq_first and t0_s, and reading i is
# (seq_first + i, t0_s + i * interval_s). Units and calibration travel once
# per batch. A role whose spec says REGISTER (the meter) sends an exact register
# plus per-interval deltas, so the cumulative total survives any loss of a
# frame's neighbours. Roles are numbered by protocol/roles ROLES.
from protocol._compat import const

from protocol import cbor

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
    pass


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


_REQUIRED = {HELLO: (0, 1, 2, 3, 4, 5, 6), READINGS: (0, 1, 2, 3, 4, 5, 6), ALARM: (0, 1, 2, 3, 4),
             HEALTH: (0, 1, 2, 3, 4, 5, 6, 7, 8), ACK: (0, 1), TIME_SYNC: (0, 1), CONFIG_PUSH: (0, 1),
             COMMAND: (0, 1, 2), COMMAND_RESULT: (0, 1)}


def decode(msg_type, payload):
    """Decode and check a payload's shape; raise MessageError naming what is wrong."""
    if msg_type not in _REQUIRED:
        raise MessageError("unknown message type %d" % msg_type)
    try:
        m = cbor.decode(payload)
    except cbor.CBORError as e:
        raise MessageError("%s: %s" % (NAMES[msg_type], e))
    if not isinstance(m, dict):
        raise MessageError("%s: payload is not a map" % NAMES[msg_type])
    for k in _REQUIRED[msg_type]:
        if k not in m:
            raise MessageError("%s: key %d missing" % (NAMES[msg_type], k))
    return m
