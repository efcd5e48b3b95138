# The water meter, declared once: what the board, the gateway, the status page,
# `prapa commission`, `prapa monitor` and `prapa site` know of the role. Runs on
# MicroPython (the board validates its config and encodes its readings with it)
# and on CPython (every host tool is generic over this module).
#
# A meter counts pulses of its reed switch or open-collector output; one pulse
# is k_factor_l litres. A readings batch carries the exact register (the dial)
# before its first row and one row per interval: pulses x mult in units of
# 10**scale of `unit` (whole litres when the K-factor is a whole number of
# litres, else millilitres), so the register after row i is the sum so far.
from protocol._compat import const

from protocol import cbor, messages
from protocol.errors import ConfigError

NAME = "meter"

# -- the board's config section: (key, kind, default, low, high, hint) -----------------------
SCHEMA = (
    ("k_factor_l", "num", 1, 0.001, 1000, "litres per pulse from the meter's data plate (e.g. 1, 10, 0.1)"),
    ("register_l", "int", 0, 0, 999999999, "the meter's dial reading in whole litres at commissioning"),
    ("interval_min", "int", 15, 1, 60, "minutes per interval reading, a divisor of 60"),
    ("checkpoint_pulses", "int", 10, 1, 10000, "pulses between checkpoints to flash (default 10)"),
    ("checkpoint_s", "int", 60, 1, 3600, "seconds of flow between checkpoints to flash (default 60)"),
    ("debounce_us", "int", 5500, 0, 9000, "contact-bounce filter in us; above 5000 for reed switches, "
                                           "below 10000 for 50 Hz"),
    ("burst_lpm", "num", 0, 0, 100000, "flow in L/min that counts as a burst (0: off)"),
    ("burst_min", "int", 30, 1, 1440, "minutes above burst_lpm before the burst alarm"),
    ("leak_h", "int", 24, 1, 720, "hours of flow in every interval before the leak alarm"),
    ("no_pulse_h", "int", 0, 0, 8760, "hours without a pulse before the tamper alarm (0: off)"),
)

# -- the board's pins (boards/*.toml [roles.meter]) -----------------------------------------
PINS = ("pulse_in",)            # reed switch / open collector to GND, internal pull-up

# -- alarm codes (1..99 are the role's; 100+ are the runtime's, protocol/messages.py) ---------
A_LEAK = const(1)
A_BURST = const(2)
A_TAMPER = const(3)
ALARMS = {A_LEAK: "leak", A_BURST: "burst", A_TAMPER: "no_pulse_tamper"}

# -- readings: rows are consumption per interval (unit x 10**scale: L or mL); the batch carries
# the register, so the gateway gives each item register_before / value / register (exact integers)
REGISTER = True
# A power cut loses at most this many counts of the register: the config key counting what the board holds
# between checkpoints, plus what can be in flight (the campaigns and the billing's stated bound).
CUT_LOSS = ("checkpoint_pulses", 0)

# -- the status page charts each reading's value under this label ---------------------------
CHART = "L per interval"

# -- commissioning: the live sensor check ----------------------------------------------------
# The installer runs water; the board's `total_pulses` must rise. The role's checkpoint() runs
# first so the test water stays on the register when the board restarts after the query. Texts
# are %-templates over the role's config section, its pins and `rise` (data, not code: the board
# carries this module in its heap).
COMMISSION_COUNTER = "total_pulses"
COMMISSION_PREPARE = "checkpoint"
COMMISSION_WAIT_S = 30
COMMISSION_ASK = "open a tap downstream of the meter and let at least two pulses run (%(k_factor_l)g L per pulse)"
COMMISSION_SEEN = "%(rise)d pulses seen (%(k_factor_l)g L per pulse)"
COMMISSION_FIX = ("check that water runs, the meter's pulse cable on GPIO %(pulse_in)s and ground, and debounce_us "
                  "(%(debounce_us)d); then run: prapa commission ... again")


# -- config checks beyond the schema's ranges ---------------------------------------------------
def check(section):
    if 60 % section["interval_min"]:
        raise ConfigError("meter.interval_min", "%d does not divide an hour" % section["interval_min"],
                          "use 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60")
    k = section["k_factor_l"] * 1000
    if abs(k - round(k)) > 1e-6 * max(1.0, abs(k)):      # allows for a single-precision board
        raise ConfigError("meter.k_factor_l", "%r is finer than a millilitre" % section["k_factor_l"],
                          "give litres per pulse with at most 3 decimals")


def check_change(old, new, waiting):
    """Refuse a new K-factor or register while logged readings wait: they hold pulses, and would be
    reported with the new calibration."""
    for key in ("k_factor_l", "register_l"):
        if old[key] != new[key] and waiting:
            raise ConfigError("meter." + key, "cannot change while %d readings wait for the gateway" % waiting,
                              "push it again once the gateway has them (health: log fill 0)")


# -- the wire: the board's hot path ------------------------------------------------------------
SERIES_INTERVAL = const(0)      # as protocol.messages.SERIES_INTERVAL
ROLE_CODE = const(0)            # this role's place in protocol.roles.ROLES


def encode_readings_into(buf, off, boot_id, seq_first, t0_s, interval_s, k_factor_milli, register,
                         deltas, n, scale=0, mult=1, wall_t0=-1, series=SERIES_INTERVAL, seq_step=1):
    """The same bytes as cbor.encode(messages.readings(...)) with no allocation (unless register or
    wall_t0 exceed a small int). Rows are deltas[i] * mult. Keys are written in ascending order,
    which is the deterministic order."""
    put_head, put_int = cbor.put_head, cbor.put_int
    off = messages.put_readings_head(buf, off, boot_id, seq_first, t0_s, interval_s, ROLE_CODE, wall_t0, series,
                                     seq_step)
    off = put_head(buf, off, 0, 5)
    off = put_head(buf, off, 5, 3)              # {0: "L", 1: scale, 2: k_factor_milli}
    off = put_head(buf, off, 0, 0)
    off = put_head(buf, off, 3, 1)
    buf[off] = 0x4C                             # "L"
    off += 1
    off = put_head(buf, off, 0, 1)
    off = put_int(buf, off, scale)
    off = put_head(buf, off, 0, 2)
    off = put_int(buf, off, k_factor_milli)
    off = put_head(buf, off, 0, 6)
    off = put_head(buf, off, 4, n)
    for i in range(n):
        off = put_int(buf, off, deltas[i] * mult)
    return messages.put_readings_tail(buf, off, register, wall_t0, series, seq_step)
