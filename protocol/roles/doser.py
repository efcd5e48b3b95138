# The chlorine doser, declared once: what the board, the gateway, the status
# page, `prapa commission`, `prapa monitor` and `prapa site` know of the role.
# Runs on MicroPython (the board checks its config and limits and encodes its
# readings with it) and on CPython (every host tool is generic over this module).
#
# A doser drives a solenoid metering pump through its external contact input:
# one pulse, one stroke of stroke_ml of hypochlorite solution. It doses in
# proportion to the plant's flow and trims the dose on the free-chlorine
# residual its analyser measures after the contact tank. The control law, the
# interlocks and their recovery are stated in firmware/roles/doser.py.
#
# Two files on the board configure it:
# - /config.json's "doser" section (SCHEMA): setpoints and calibration. A config
#   push from the gateway may change it, within the limits only.
# - /doser_limits.json (LIMITS_SCHEMA): the hard limits. Written over USB by
#   `prapa commission` and nothing else: no message on the link names it.
#
# A readings row is [strokes, solution mL x100, mean flow L/s x100, residual
# min, mean, max in ug/L (65535: no valid sample), seconds dosing, seconds on
# the analyser-fault fallback, seconds stopped, interlocks seen (bit code-1),
# the residual ceiling in force in ug/L (its limit travels with the data)];
# the batch carries the stroke register (strokes since commissioning) before its
# first row, so strokes chain exactly like a meter's litres.
import struct

from protocol._compat import const

from protocol import cbor, messages
from protocol.errors import ConfigError

NAME = "doser"

# -- the board's config section: (key, kind, default, low, high, hint) -----------------------
SCHEMA = (
    ("flow_input", "choice", "pulse", ("pulse", "ma"), None,
     "pulse (a pulse flowmeter on flow_pulse_in) or ma (a 4-20 mA flow transmitter on flow_adc)"),
    ("flow_k_l", "num", 10, 0.001, 10000, "litres per flowmeter pulse, from its data plate"),
    ("flow_max_lps", "num", 50, 0.1, 5000, "flow in L/s at 20 mA of the flow transmitter (flow_input ma)"),
    ("no_flow_s", "int", 60, 5, 3600, "seconds without flow before the pump stops (no_flow)"),
    ("dose_mgl", "num", 1.5, 0, 10, "dose setpoint, mg/L of free chlorine added to the water"),
    ("strength_gpl", "num", 120, 1, 200, "the solution's available chlorine, g/L (12.5 % hypochlorite: about 120)"),
    ("stroke_ml", "num", 0.5, 0.01, 50, "solution per stroke, mL (the draw-down calibration sets it)"),
    ("stroke_ms", "int", 50, 10, 500, "stroke pulse length, ms, as the pump's contact input needs"),
    ("target_mgl", "num", 0.5, 0, 5, "free-chlorine residual wanted at the analyser, mg/L"),
    ("analyzer_max_mgl", "num", 5, 0.5, 20, "the analyser's residual at 20 mA, mg/L"),
    ("shunt_ohm", "int", 150, 50, 500, "the 4-20 mA loops' shunt resistor, ohm"),
    ("trim_pct", "int", 50, 0, 100, "bound of the residual trim, +/- % of the flow-proportional dose"),
    ("kp_pct", "int", 40, 0, 1000, "proportional trim, % of the dose per mg/L of residual error"),
    ("ki_pct", "int", 20, 0, 1000, "integral trim, % of the dose per mg/L of error, added once a dead time"),
    ("dead_time_s", "int", 600, 10, 7200, "contact-tank dead time, s: the trim acts once per dead time"),
    ("flat_s", "int", 1800, 60, 86400, "seconds of an analyser signal flat within flat_ua before it is a fault"),
    ("flat_ua", "int", 20, 1, 1000, "noise band of a live analyser signal, uA"),
    ("fallback_s", "int", 3600, 0, 86400, "on an analyser fault: seconds of flow-proportional dosing at the "
                                          "last good trim before the pump stops (0: stop at once)"),
    ("feedback", "int", 0, 0, 1, "1 when a stroke-feedback monitor is fitted on the pump head"),
    ("feedback_misses", "int", 3, 1, 100, "strokes in a row without feedback before the pump stops"),
    ("interval_min", "int", 15, 1, 60, "minutes per interval reading, a divisor of 60"),
    ("checkpoint_strokes", "int", 20, 1, 10000, "strokes between checkpoints of the stroke register to flash"),
)

# -- the hard limits: /doser_limits.json, written over USB at commissioning only ----------------
LIMITS_PATH = "doser_limits.json"
LIMITS_SCHEMA = (
    ("max_spm", "int", None, 1, 600, "the pump's maximum strokes per minute, from its data plate"),
    ("max_dose_mgl", "num", None, 0.1, 10, "the highest dose the plant may ever add, mg/L"),
    ("max_l_day", "num", None, 0.01, 10000, "the most solution the pump may deliver in 24 h of running, L"),
    ("ceiling_mgl", "num", None, 0.1, 4.9, "the residual that stops the pump, mg/L (below the WHO 5 mg/L)"),
)

# -- the board's pins (boards/*.toml [roles.doser]) -----------------------------------------
PINS = ("stroke_out", "pump_enable", "flow_pulse_in", "flow_adc", "residual_adc", "tank_low_in",
        "tank_level_adc", "stroke_feedback_in")
SAFE_LOW = ("stroke_out", "pump_enable")     # boot.py drives these low before anything else runs

# -- alarm codes (1..99 the role's; 100+ the runtime's) and which clear by themselves --------
A_NO_FLOW = const(1)
A_RESIDUAL_HIGH = const(2)
A_TANK_LOW = const(3)
A_NO_FEEDBACK = const(4)
A_ANALYZER = const(5)
A_DAILY_VOLUME = const(6)
A_FALLBACK_OVER = const(7)
A_DOSE_LIMITED = const(8)
ALARMS = {A_NO_FLOW: "no_flow", A_RESIDUAL_HIGH: "residual_high", A_TANK_LOW: "tank_low",
          A_NO_FEEDBACK: "no_stroke_feedback", A_ANALYZER: "analyzer_fault", A_DAILY_VOLUME: "daily_volume",
          A_FALLBACK_OVER: "analyzer_fallback_over", A_DOSE_LIMITED: "dose_limited"}
# The interlocks that stop the pump. LATCHED ones stay until an operator's reset_interlock (command
# or at the board) once their cause is gone; the others clear when their cause does.
STOPS = (A_NO_FLOW, A_RESIDUAL_HIGH, A_TANK_LOW, A_NO_FEEDBACK, A_DAILY_VOLUME, A_FALLBACK_OVER)
LATCHED = (A_RESIDUAL_HIGH, A_NO_FEEDBACK)
COMMANDS = ("reset_interlock",)       # over the link; prime is console-only (commissioning)

# -- readings ---------------------------------------------------------------------------------
REGISTER = True                  # the batch's register is the stroke count before its first row
# A power cut loses at most this many counts of the register: the config key counting what the board holds
# between checkpoints, plus what can be in flight (the campaigns and the billing's stated bound).
CUT_LOSS = ("checkpoint_strokes", 2)
DURABLE_COUNTER = "total_strokes"   # the status counter a boot recovers from flash (power-cut campaigns)
UNIT = "stroke"
NO_RESIDUAL = const(65535)       # residual columns when the interval had no valid analyser sample
# Row columns: (name, unit, scale, missing): value = column x 10**scale, None where the column holds
# `missing`; the first column is what the register counts.
FIELDS = (
    ("strokes", "stroke", 0, None),
    ("solution_ml", "mL", -2, None),
    ("flow_lps", "L/s", -2, None),
    ("residual_min_mgl", "mg/L", -3, NO_RESIDUAL),
    ("residual_mean_mgl", "mg/L", -3, NO_RESIDUAL),
    ("residual_max_mgl", "mg/L", -3, NO_RESIDUAL),
    ("dosing_s", "s", 0, None),
    ("fallback_s", "s", 0, None),
    ("stopped_s", "s", 0, None),
    ("interlocks", "bits", 0, None),
    ("ceiling_mgl", "mg/L", -3, None),
)
# The flash record keeps strokes in its value and the register in reg; the other columns ride in
# the record's role bytes, packed so.
EXTRA_FORMAT = "<IIHHHIIIHH"
EXTRA_WIDTHS = bytes(struct.calcsize("<" + c) for c in EXTRA_FORMAT[1:])    # column widths: cbor.put_uints_le
EXTRA_BYTES = const(30)

# -- the status page charts these columns, with the band and the ceiling drawn on the residual ---
CHART = "residual mg/L (mean), dose mL, flow L/s"
CHART_FIELDS = ("residual_mean_mgl", "solution_ml", "flow_lps")
CHART_BAND = (0.2, 0.5)          # mg/L wanted at the far tap (drawn on the first chart field)
CHART_CEILING = "ceiling_mgl"    # the column whose newest value is drawn as the ceiling

# -- commissioning: the live sensor check ----------------------------------------------------
COMMISSION_COUNTER = "flow_pulses"
COMMISSION_PREPARE = "checkpoint"
COMMISSION_WAIT_S = 30
COMMISSION_ASK = "let the plant's water flow past the flowmeter (%(flow_k_l)g L per pulse)"
COMMISSION_SEEN = "%(rise)d flow pulses seen (%(flow_k_l)g L per pulse)"
COMMISSION_FIX = ("check that water flows, the flowmeter's cable on GPIO %(flow_pulse_in)s and ground; "
                  "then run: prapa commission ... again")
# -- commissioning over USB: the prime, the draw-down calibration, the live inputs -------------------
# (the hard limits are LIMITS_PATH/LIMITS_SCHEMA above: `prapa commission --limits` checks them with
# check_limits_file and check_limits and writes them with the config and the key)
# --prime N: the role's console method, N's upper bound (1..), and the longest a stroke may take in s
# (1 stroke a minute: the lowest max_spm), so the host knows how long the call may stay silent.
COMMISSION_PRIME = ("prime", 50, 60)
# --calibrate-strokes N --drawdown-ml ML: the config key set to ML / N, its unit, what the installer does.
COMMISSION_CALIBRATE = ("stroke_ml", "mL", "draw the strokes from a calibration column (the pump's suction in it) "
                                           "and read the mL they drew")
# The live inputs shown after commissioning: (status key, label, low, high, fix). A number must lie in
# low..high; a tuple low lists the values allowed; None, None: shown only. The fix is formatted with the
# role's pins, its config section and the value.
COMMISSION_INPUTS = (
    ("analyzer_ua", "analyser loop, uA (4000-20000)", 3600, 21000,
     "below 3600 uA (3.6 mA): check the analyser's 4-20 mA loop wiring to GPIO %(residual_adc)s, its supply "
     "and the %(shunt_ohm)d ohm shunt; above 21000 uA the analyser signals a fault: see its display"),
    ("residual_ugl", "free chlorine at the analyser, ug/L", None, None, ""),
    ("interlocks", "interlocks stopping the pump", ("-",), None,
     "tank_low: fill the tank or check the float switch on GPIO %(tank_low_in)s; no_flow: let water flow past "
     "the flowmeter; residual_high or no_stroke_feedback: fix the cause, then send reset_interlock"),
)


# -- config checks beyond the schema's ranges ---------------------------------------------------
def check(section):
    if 60 % section["interval_min"]:
        raise ConfigError("doser.interval_min", "%d does not divide an hour" % section["interval_min"],
                          "use 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60")
    if strokes_per_litre(section, section["dose_mgl"]) * (100 + section["trim_pct"]) > 200:
        raise ConfigError("doser.dose_mgl", "%g mg/L needs more than 2 strokes per litre of water" %
                          section["dose_mgl"], "use a stronger solution (strength_gpl) or a larger stroke_ml")


def strokes_per_litre(section, dose_mgl):
    """Strokes per litre of water for a dose: dose [mg/L] / (strength [mg/mL] x stroke [mL])."""
    return dose_mgl / (section["strength_gpl"] * section["stroke_ml"])


def per_litre(section, dose_mgl, unit):
    """Strokes per litre of water for a dose, in 1/unit stroke, as an int (the board's one float step)."""
    return int(round(strokes_per_litre(section, dose_mgl) * unit))


def strokes_for(section, litres):
    """Whole strokes that deliver `litres` of solution."""
    return int(litres * 1000 / section["stroke_ml"])


def check_limits(section, limits):
    """The config within the hard limits (both already checked against their schemas); ConfigError
    names the field and the limit."""
    if section["dose_mgl"] > limits["max_dose_mgl"]:
        raise ConfigError("doser.dose_mgl", "%g exceeds the limit max_dose_mgl %g" % (
            section["dose_mgl"], limits["max_dose_mgl"]), "set at most %g (limits change over USB only)" %
            limits["max_dose_mgl"])
    if section["target_mgl"] >= limits["ceiling_mgl"]:
        raise ConfigError("doser.target_mgl", "%g is not below the limit ceiling_mgl %g" % (
            section["target_mgl"], limits["ceiling_mgl"]), "set a target below %g" % limits["ceiling_mgl"])
    if section["stroke_ms"] * limits["max_spm"] > 30000:
        raise ConfigError("doser.stroke_ms", "%d ms strokes do not fit %d strokes a minute" % (
            section["stroke_ms"], limits["max_spm"]), "set at most %d ms" % (30000 // limits["max_spm"]))


def check_limits_file(raw):
    """The limits as read from /doser_limits.json (a dict), checked; ConfigError else."""
    from protocol.config import check_section
    return check_section("limits", raw, LIMITS_SCHEMA)


def check_change(old, new, waiting):
    """A new stroke volume while readings wait would report their solution mL with it: refuse."""
    if old["stroke_ml"] != new["stroke_ml"] and waiting:
        raise ConfigError("doser.stroke_ml", "cannot change while %d readings wait for the gateway" % waiting,
                          "push it again once the gateway has them (health: log fill 0)")


# -- the wire: the board's send path ---------------------------------------------------------
SERIES_INTERVAL = const(0)      # as protocol.messages.SERIES_INTERVAL
ROLE_CODE = const(1)            # this role's place in protocol.roles.ROLES


def encode_readings_into(buf, off, boot_id, seq_first, t0_s, interval_s, register, values, raw, extra_off,
                         rec_bytes, n, wall_t0=-1, series=SERIES_INTERVAL, seq_step=1):
    """The same bytes as cbor.encode(messages.readings(...)) for n doser rows: values[i] the strokes
    of record i, raw[extra_off + i * rec_bytes:] its EXTRA_FORMAT columns. Keys ascend (deterministic)."""
    put_head, put_int, put_uints_le = cbor.put_head, cbor.put_int, cbor.put_uints_le
    off = messages.put_readings_head(buf, off, boot_id, seq_first, t0_s, interval_s, ROLE_CODE, wall_t0, series,
                                     seq_step)
    off = put_head(buf, off, 0, 5)
    off = put_head(buf, off, 5, 2)              # {0: "stroke", 1: 0}
    off = put_head(buf, off, 0, 0)
    off = put_head(buf, off, 3, 6)
    for c in b"stroke":
        buf[off] = c
        off += 1
    off = put_head(buf, off, 0, 1)
    off = put_int(buf, off, 0)
    off = put_head(buf, off, 0, 6)
    off = put_head(buf, off, 4, n)
    for i in range(n):
        off = put_head(buf, off, 4, len(FIELDS))
        off = put_int(buf, off, values[i])
        off = put_uints_le(buf, off, raw, extra_off + i * rec_bytes, EXTRA_WIDTHS)
    return messages.put_readings_tail(buf, off, register, wall_t0, series, seq_step)
