# The storm-drain level sensor, declared once: what the board, the gateway, the
# ranking of suspect drains, the status page, `prapa commission`, `prapa
# monitor` and `prapa site` know of the role. Runs on MicroPython (the board
# checks its config and encodes its readings with it) and on CPython.
#
# A drain board hangs in a gully or manhole under the grate, looking down at
# the water: level = mount_mm - distance to the water, the median of a burst of
# pings (an ultrasonic sensor, trigger/echo or UART), or a 4-20 mA pressure
# transducer on the invert. A tipping-bucket gauge may count the rain; a board
# without one is told its catchment's rain by the gateway (the `rain` command).
# The detection (thresholds, rising rate, a blocked drain from a recession much
# slower than the drain's own learned one or a rise with no rain, sensor faults
# that are faults, never floods) is stated in firmware/roles/drain.py.
#
# A readings row is one sample: [level mm (NO_LEVEL: no valid level), rise
# mm/h (0 when steady or falling), rain mm x10 since the previous sample,
# battery mV, the sensor fault in force (FAULTS, 0: none), the recession's
# time constant now over the learned one x100 (0: not receding), the learned
# time constant in s, the danger level in force mm, state bits (STATE_*)]. A
# batch carries no register: levels are not a count.
import struct

from protocol._compat import const

from protocol import cbor, messages
from protocol.errors import ConfigError

NAME = "drain"

# -- the board's config section: (key, kind, default, low, high, hint) -----------------------
SCHEMA = (
    ("sensor", "choice", "echo", ("echo", "uart", "ma"), None,
     "echo (JSN-SR04T trigger/echo), uart (A02YYUW) or ma (a 4-20 mA pressure transducer on level_adc)"),
    ("mount_mm", "int", 1500, 100, 10000, "height of the sensor's face above the drain's invert, mm"),
    ("grate_mm", "int", 1200, 100, 10000, "height of the grate above the invert (the drain overflows there), mm"),
    ("danger_margin_mm", "int", 200, 0, 5000, "the danger alarm this far below the grate, mm"),
    ("warning_mm", "int", 700, 10, 10000, "level above the invert that raises the warning, mm"),
    ("blind_mm", "int", 250, 0, 1000, "the sensor's blind zone, mm (JSN-SR04T: about 250, A02YYUW: 30)"),
    ("range_mm", "int", 4500, 500, 10000, "the sensor's range (echo, uart), or the level at 20 mA (ma), mm"),
    ("air_c", "int", 30, -20, 60, "air temperature in the drain, C (the speed of sound depends on it)"),
    ("pings", "int", 5, 1, 15, "pings per sample; the level is their median"),
    ("shunt_ohm", "int", 150, 50, 500, "the 4-20 mA loop's shunt resistor, ohm (sensor ma)"),
    ("rain_mm_tip", "num", 0, 0, 10, "rain per tip of the gauge, mm (0: no gauge; the gateway shares the rain)"),
    ("dry_s", "int", 900, 60, 3600, "seconds between samples while dry and steady"),
    ("wet_s", "int", 30, 5, 600, "seconds between samples while raining, rising or above the warning"),
    ("rise_mm_min", "int", 20, 1, 1000, "a rise faster than this, mm/min, raises rising_fast"),
    ("recession_min", "num", 20, 0.5, 1440, "the drain's dry-weather recession time constant, min, "
                                              "until it has learned its own"),
    ("blocked_factor", "num", 3, 1.5, 20, "a recession this many times slower than the learned one is a blocked drain"),
    ("stuck_n", "int", 12, 3, 1000, "samples in a row with the very same distance before the sensor counts as stuck"),
    ("battery_low_mv", "int", 3400, 0, 5000, "battery below this, mV, raises battery_low (0: mains powered)"),
    ("divider", "num", 2, 1, 20, "the battery's voltage divider into battery_adc (2: two equal resistors)"),
    ("sleep", "int", 0, 0, 1, "1: a battery board, deep sleep between samples; 0: mains, always awake"),
)

# -- the board's pins (boards/*.toml [roles.drain]) ------------------------------------------
PINS = ("trig_out", "echo_in", "sonar_rx", "level_adc", "rain_pulse_in", "battery_adc")

# -- alarm codes (1..99 the role's; 100+ the runtime's) -------------------------------------
A_WARNING = const(1)
A_DANGER = const(2)
A_RISING = const(3)
A_BLOCKED = const(4)
A_SENSOR = const(5)
A_BATTERY = const(6)
ALARMS = {A_WARNING: "level_warning", A_DANGER: "flood_danger", A_RISING: "rising_fast", A_BLOCKED: "blocked",
          A_SENSOR: "sensor_fault", A_BATTERY: "battery_low"}
# An alarm's detail: for sensor_fault the fault (FAULTS), for blocked the evidence (BLOCKED_BY),
# for the level alarms the level in mm, for battery_low the battery in mV.
F_ECHO_LOST = const(1)
F_STUCK = const(2)
F_OUT_OF_RANGE = const(3)
F_BLIND_ZONE = const(4)
FAULTS = {F_ECHO_LOST: "echo_lost", F_STUCK: "stuck", F_OUT_OF_RANGE: "out_of_range", F_BLIND_ZONE: "blind_zone"}
B_SLOW_RECESSION = const(1)
B_RISE_NO_RAIN = const(2)
BLOCKED_BY = {B_SLOW_RECESSION: "slow_recession", B_RISE_NO_RAIN: "rise_without_rain"}

# -- commands over the link: the gateway shares its catchment's rain with a board without a gauge --
# rain {"mm_h": rain intensity x10 (0: dry), "for_s": seconds it holds (default 1800)}
COMMANDS = ("rain",)
RAIN_HOLD_S = const(1800)

# -- readings -----------------------------------------------------------------------------------
REGISTER = False
UNIT = "mm"
NO_LEVEL = const(65535)          # level column of a sample with no valid level (a sensor fault)
STATE_RAIN_GAUGE = const(1)      # state bits: the board's own gauge saw rain in the last rain window
STATE_RAIN_SHARED = const(2)     # the gateway says the catchment is raining
STATE_WET = const(4)             # sampling at wet_s
STATE_RECEDING = const(8)        # the level is falling after rain: the recession is being timed
STATE_LEARNED = const(16)        # the recession time constant is the drain's own, not recession_min
STATE_HAS_GAUGE = const(32)      # the board has a rain gauge of its own (rain_mm_tip > 0): no rain to share
# Row columns: (name, unit, scale, missing): value = column x 10**scale, None where it holds `missing`.
FIELDS = (
    ("level_mm", "mm", 0, NO_LEVEL),
    ("rise_mm_h", "mm/h", 0, None),
    ("rain_mm", "mm", -1, None),
    ("battery_mv", "mV", 0, None),
    ("fault", "code", 0, None),
    ("recession_ratio", "1", -2, None),
    ("recession_s", "s", 0, None),
    ("danger_mm", "mm", 0, None),
    ("state", "bits", 0, None),
)
# The flash record keeps the level in its value; the other columns ride in its role bytes, so.
EXTRA_FORMAT = "<HHHBHIHB"
EXTRA_WIDTHS = bytes(struct.calcsize("<" + c) for c in EXTRA_FORMAT[1:])    # column widths: cbor.put_uints_le
EXTRA_BYTES = const(16)
DURABLE_COUNTER = "rain_tips"    # the status counter a boot recovers from flash (power-cut campaigns)

# -- the status page -----------------------------------------------------------------------------
CHART = "level mm, rain mm"
CHART_FIELDS = ("level_mm", "rain_mm")
CHART_CEILING = "danger_mm"      # drawn on the level chart

# -- the ranking of suspect drains per catchment (gateway/ranking.py reads these) ------------------
# A drain's place: registry `location` (lat, lon) and `catchment`, set at commissioning.
# Points per active alarm; a sensor fault lists the drain for a visit, never as flooding.
SUSPECT_POINTS = {A_BLOCKED: 1000, A_DANGER: 500, A_WARNING: 200, A_RISING: 100}
SUSPECT_FILL = ("level_mm", "danger_mm")      # + up to 100 points for the level's share of the danger level
SUSPECT_RATIO = "recession_ratio"             # + 50 points per unit of recession ratio above 1
FAULT_ALARM = A_SENSOR

# -- commissioning: the live sensor check ----------------------------------------------------
# The installer reads the level the board measures against a staff gauge or a tape in the drain.
COMMISSION_INPUTS = (
    ("level_mm", "water level above the invert, mm", 0, 10000,
     "no valid level: check the sensor's cable (trig GPIO %(trig_out)s, echo GPIO %(echo_in)s), that nothing "
     "is within the blind zone (%(blind_mm)d mm) below its face, and mount_mm (%(mount_mm)d)"),
    ("fault", "sensor fault", ("-",), None, "see the level above"),
    ("battery_mv", "battery, mV", None, None, ""),
)


# -- config checks beyond the schema's ranges ---------------------------------------------------
def danger_mm(section):
    return section["grate_mm"] - section["danger_margin_mm"]


def check(section):
    top = section["mount_mm"] - section["blind_mm"]
    if section["sensor"] != "ma" and danger_mm(section) > top:
        raise ConfigError("drain.danger_margin_mm", "the danger level %d mm is in the sensor's blind zone (above %d mm)"
                          % (danger_mm(section), top), "mount the sensor higher (mount_mm) or set a margin of at "
                          "least %d mm" % (section["grate_mm"] - top))
    if section["warning_mm"] >= danger_mm(section):
        raise ConfigError("drain.warning_mm", "%d mm is not below the danger level %d mm" % (
            section["warning_mm"], danger_mm(section)), "set a warning below %d mm" % danger_mm(section))
    if section["wet_s"] > section["dry_s"]:
        raise ConfigError("drain.wet_s", "%d s is slower than dry_s %d s" % (section["wet_s"], section["dry_s"]),
                          "set wet_s at most dry_s")


def speed_of_sound_mm_ms(air_c):
    """Speed of sound in air at air_c, mm/ms (= m/s / 1000 x 1000): 331.3 + 0.606 x T m/s."""
    return 331.3 + 0.606 * air_c


# -- the wire: the board's send path ---------------------------------------------------------
SERIES_INTERVAL = const(0)      # as protocol.messages.SERIES_INTERVAL
ROLE_CODE = const(2)            # this role's place in protocol.roles.ROLES


def encode_readings_into(buf, off, boot_id, seq_first, t0_s, interval_s, values, raw, extra_off, rec_bytes, n,
                         wall_t0=-1, series=SERIES_INTERVAL, seq_step=1):
    """The same bytes as cbor.encode(messages.readings(...)) for n drain rows: values[i] the level of
    record i, raw[extra_off + i * rec_bytes:] its EXTRA_FORMAT columns. Keys ascend (deterministic)."""
    put_head, put_int, put_uints_le = cbor.put_head, cbor.put_int, cbor.put_uints_le
    off = messages.put_readings_head(buf, off, boot_id, seq_first, t0_s, interval_s, ROLE_CODE, wall_t0, series,
                                     seq_step, False)
    off = put_head(buf, off, 0, 5)
    off = put_head(buf, off, 5, 2)              # {0: "mm", 1: 0}
    off = put_head(buf, off, 0, 0)
    off = put_head(buf, off, 3, 2)
    buf[off] = 0x6D                             # "m"
    buf[off + 1] = 0x6D
    off += 2
    off = put_head(buf, off, 0, 1)
    off = put_int(buf, off, 0)
    off = put_head(buf, off, 0, 6)
    off = put_head(buf, off, 4, n)
    for i in range(n):
        off = put_head(buf, off, 4, len(FIELDS))
        off = put_int(buf, off, values[i])
        off = put_uints_le(buf, off, raw, extra_off + i * rec_bytes, EXTRA_WIDTHS)
    return messages.put_readings_tail(buf, off, None, wall_t0, series, seq_step)
