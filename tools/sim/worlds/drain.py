"""A storm drain on a street: rain, runoff, the gully's chamber, its outlet, the sonar and the battery.

Rain. The intensity i(t) [mm/h] is a design storm plus light showers, or
`forced_mm_h` when that is >= 0 (then nothing else). The design storm is a
triangular hyetograph: from `storm_at_h` (world time; -1: no storm) for
T = `storm_hours`, rising linearly to `peak_mm_h` at tp = `peak_at` x T and
falling linearly to 0 at T; its depth is peak_mm_h x T / 2 (60 mm by default).
Showers (a dry month) start as a Poisson process of `showers_per_week`, each a
block of `shower_min` minutes and a depth uniform in 0.5-1.5 x `shower_mm`.
The rain is a function of the parameters and time alone, never of a board's
randomness: the showers come from `rain_seed`, so every drain of a catchment
(each a board with its own World) sees the same rain at the same instants. A
parameter changed mid-run applies from then on (a new shower schedule from
`rain_seed` and that instant).

Rain gauge. With `rain_mm_tip` > 0 the tipping bucket tips at every whole
multiple of rain_mm_tip of the rain's depth: the reed pulls rain_pulse_in low
(idle high) for `tip_ms` (tips at least 2 x tip_ms apart). Without a gauge
(rain_mm_tip 0) the pin stays high. tips = rain / rain_mm_tip (rounded down).

Runoff. The street (`area_m2`, runoff coefficient C = `runoff_coeff`) drains
into the gully through a linear reservoir of lag k = `lag_min` (the water
running along the kerb):

    dS/dt = C x area x i(t) - S / k,    inflow Q_in = S / k                [m3, m3/s]

The chamber. Water level h above the invert [m]. The chamber has plan area
A = `sump_m2` up to `neck_mm`, where it narrows into the shaft under the grate
(plan area `neck_m2`) up to the grate at `grate_mm`; storage V(h) is the volume
below h. The outlet pipe's lip is `base_mm` above the invert: below it a pool
stands that only evaporation (`evap_mm_day`) lowers and inflow tops up. The
outlet is a linear reservoir below its capacity, with b = `blockage` (silt,
leaves, a plastic bag: 0-0.95):

    Q_out = min(`pipe_lps` x (1 - b),  (1 - b) x A x (h - base) / tau)      tau = `recession_min`
    dV/dt = Q_in - Q_out - evaporation

so below the neck (and below capacity) a dry-weather recession is exponential,
h - base ~ exp(-t (1 - b) / tau): time constant tau for a healthy drain, tau /
(1 - b) when partly blocked (80 min at b = 0.75), and the outlet carries at most
pipe_lps x (1 - b). The water the chamber cannot hold overflows onto the street:
the level stands above the grate by the head of a weir along the grate's edge
(length L = `grate_weir_m`), Q_over = 1.7 x L x H^1.5 [m3/s, m]: a few mm. The
truth keeps the first overflow's instant and the total time and volume.

Integration: fixed steps of STEP_S world seconds from time 0 (the catchment
store exactly, the chamber by an explicit step; the rain and the tips exactly
from i(t)), so events do not depend on how the bench slices time. Mass balance:
C x area x rain = catchment store + (V - V0) + outflow + overflow + evaporation.

With the defaults (60 mm in 2 h peaking at 24 min, 260 m2 at C 0.85 into an
8 m2 chamber with a 3 m2 shaft above 600 mm, a 4 L/s outlet, tau 20 min), a
healthy drain peaks at about 415 mm (42 % of the danger level 1000 mm, below the
warning 700 mm) about 56 min after the storm's start and is back within 5 mm of
its pool about 70 min after the storm's end; a drain with blockage 0.75 passes
700 mm after about 46 min, 1000 mm after about 54 min and overflows the grate
(1200 mm) after about 60 min, for about 40 min. The shaft makes that possible:
it fills 8 / 3 times as fast per litre as the chamber. With one plan area all
the way up (neck_mm = grate_mm) the same blocked drain would peak at about
1045 mm some 80 min into the storm and never overflow: it would have to store
2.9 times what the healthy drain holds at its peak.

The sensors are updated every `ping_update_s` world seconds (the world cannot
know when the board pings: a value holds until the next update), the first at
world time 0 (what a board powered on then is given), from the level at the last
step. The sensor looks down from `mount_mm` above the invert: distance
d = mount_mm - h - n, with n gaussian of sigma `noise_mm` (one draw per update
for all channels; the transducer reads h + n):

- echo_in (JSN-SR04T): the echo's round trip in microseconds, 2 x d / c with
  c = 331.3 + 0.606 x `air_c` m/s (= mm/ms); 0 for no echo;
- sonar_rx (A02YYUW): d in mm; 0 for no frame;
- level_adc: a 4-20 mA pressure transducer on the invert, 4 mA at 0 and 20 mA at
  `range_mm` (clamped to 3.8-20.5 mA), over a `shunt_ohm` shunt: microvolts =
  mA x shunt x 1000.

Faults, each from `<fault>_at_h` for `<fault>_hours` (-1: never), worst first:
stuck (every channel frozen at its last value, no noise); out of range (`oor`:
echo and sonar read `oor_mm`, beyond the range; 0: no echo at all; the
transducer 22 mA, NAMUR high); blind zone (`blind`: something hangs under the
face, a spider's web, debris: echo and sonar read `blind_obstacle_mm` + noise;
the transducer is not affected); lost echoes (`lost_echo_pct` of the updates
read 0 on echo and sonar). An update sends only the channels whose value
changed (a stuck sensor sends nothing), and only the sensors fitted (`sensor`:
0 all three, the board reads the one its config names; 1, 2, 3 one of them).

Battery. `battery_mah` (0: mains, always full) starts at `battery_start_pct`
(setting it mid-run is a fresh battery at that charge); each wake (on_reset:
the bench calls it at every end of the VM, deep sleep included) takes
`wake_mas` mA-s and the board draws `sleep_ua` in between. The cell's voltage
follows the state of charge on a Li-ion curve, 4150 mV full to 3300 mV empty;
battery_adc reads mV / `divider` (in microvolts), sent when it changes.
"""

import heapq
import math
import random

from tools.sim.worlds import ANALOG, LEVEL

_US = 1_000_000
STEP_S = 2                          # the reservoirs move in steps of this many world seconds
STEP_US = STEP_S * _US
WEIR_C = 1.7                        # broad-crested weir coefficient, m^0.5/s (SI)
NAMUR_HIGH_MA = 22.0
# Li-ion open-circuit voltage against state of charge, linear in between.
SOC_MV = ((0.0, 3300), (0.05, 3550), (0.1, 3650), (0.2, 3700), (0.5, 3800), (0.8, 3950), (0.9, 4050),
          (1.0, 4150))
FAULTS = ("stuck", "oor", "blind")  # windowed faults, worst first (lost echoes are random)


def battery_mv(soc):
    """Open-circuit voltage of the cell at a state of charge 0..1, mV."""
    if soc <= 0:
        return SOC_MV[0][1]
    for (s0, v0), (s1, v1) in zip(SOC_MV, SOC_MV[1:]):
        if soc <= s1:
            return v0 + (v1 - v0) * (soc - s0) / (s1 - s0)
    return SOC_MV[-1][1]


def sound_mm_per_us(air_c):
    """Speed of sound at air_c: 331.3 + 0.606 x T m/s, in mm/us."""
    return (331.3 + 0.606 * air_c) / 1000


class StormDrain:
    NAME = "storm_drain"
    ROLES = ("drain",)
    PARAMS = {
        # rain
        "storm_at_h": (-1.0, "h", "world time the design storm starts (-1: no storm)"),
        "storm_hours": (2.0, "h", "length of the design storm (a triangular hyetograph)"),
        "peak_mm_h": (60.0, "mm/h", "the storm's peak intensity (its depth: peak x hours / 2)"),
        "peak_at": (0.2, "ratio", "when the storm peaks, as a share of its length"),
        "showers_per_week": (0.0, "1/week", "light showers a week, at random (from rain_seed) instants"),
        "shower_mm": (3.0, "mm", "mean depth of a shower (each 0.5-1.5 x this)"),
        "shower_min": (30.0, "min", "length of a shower (constant intensity)"),
        "rain_seed": (1.0, "seed", "the showers' timing: the same for every drain of a catchment"),
        "forced_mm_h": (-1.0, "mm/h", "constant rain instead of storm and showers (-1: off; 0: dry)"),
        "rain_mm_tip": (0.0, "mm/tip", "the rain gauge's tipping bucket (0: no gauge, the pin stays high)"),
        "tip_ms": (100.0, "ms", "each tip pulls rain_pulse_in low this long"),
        # runoff and the drain
        "area_m2": (260.0, "m2", "street area draining into this gully"),
        "runoff_coeff": (0.85, "ratio", "share of the rain that runs off (the rest soaks in)"),
        "lag_min": (5.0, "min", "time constant of the runoff along the kerb into the gully (0: none)"),
        "sump_m2": (8.0, "m2", "plan area of the chamber up to neck_mm (with the outlet pipe's storage)"),
        "neck_mm": (600.0, "mm", "height where the chamber narrows into the shaft under the grate"),
        "neck_m2": (3.0, "m2", "plan area of the shaft from neck_mm up to the grate"),
        "grate_mm": (1200.0, "mm", "height of the grate above the invert: the water overflows there"),
        "grate_weir_m": (2.0, "m", "length of the grate's edge the overflow spills over (its head)"),
        "pipe_lps": (4.0, "L/s", "capacity of the outlet pipe, healthy"),
        "recession_min": (20.0, "min", "dry-weather recession time constant of the healthy drain"),
        "blockage": (0.0, "0-0.95", "share of the outlet blocked: capacity x (1 - b), recession tau / (1 - b)"),
        "base_mm": (20.0, "mm", "the outlet's lip above the invert: a pool stands below it"),
        "start_level_mm": (-1.0, "mm", "water level at world time 0 (-1: the pool, base_mm)"),
        "evap_mm_day": (4.0, "mm/day", "evaporation from the water's surface"),
        # the sensors
        "mount_mm": (1500.0, "mm", "height of the sensor's face above the invert"),
        "air_c": (30.0, "C", "air temperature in the drain (speed of sound 331.3 + 0.606 x T m/s)"),
        "range_mm": (4500.0, "mm", "level at 20 mA of the pressure transducer (4 mA: 0)"),
        "shunt_ohm": (150.0, "ohm", "the transducer loop's shunt into level_adc"),
        "ping_update_s": (5.0, "s", "the sensors' values change this often (fresh noise each time)"),
        "noise_mm": (3.0, "mm", "standard deviation of the gaussian noise on the distance and level"),
        "lost_echo_pct": (0.0, "%", "share of the updates with no echo (echo and sonar read 0)"),
        "stuck_at_h": (-1.0, "h", "world time the sensor sticks at its last value (-1: never)"),
        "stuck_hours": (1.0, "h", "how long it stays stuck"),
        "blind_at_h": (-1.0, "h", "world time something hangs in the blind zone (-1: never)"),
        "blind_hours": (1.0, "h", "how long it hangs there"),
        "blind_obstacle_mm": (100.0, "mm", "distance the sensor reads while it does"),
        "oor_at_h": (-1.0, "h", "world time the sensor reads out of range (-1: never)"),
        "oor_hours": (1.0, "h", "how long it does"),
        "oor_mm": (6000.0, "mm", "distance read out of range (0: no echo at all); the transducer reads 22 mA"),
        # the battery
        "battery_mah": (0.0, "mAh", "battery capacity (0: mains powered, always full)"),
        "battery_start_pct": (100.0, "%", "charge at the start; set mid-run: a fresh battery at this charge"),
        "wake_mas": (150.0, "mA-s", "charge one wake takes (the bench's every VM end: a sleep, a reset)"),
        "sleep_ua": (15.0, "uA", "current drawn all the time (deep sleep, the sensor's standby)"),
        "divider": (2.0, "ratio", "the battery's voltage divider into battery_adc"),
        "sensor": (0.0, "0-3", "the sensors fitted: 0 all three (the board reads the one its config names), "
                               "1 echo, 2 uart, 3 ma (4-20 mA)"),
    }

    def __init__(self, params, pins, rng):
        self.params = p = params
        self.rng = rng
        self.pin_echo = pins.get("echo_in")
        self.pin_sonar = pins.get("sonar_rx")
        self.pin_adc = pins.get("level_adc")
        self.pin_rain = pins.get("rain_pulse_in")
        self.pin_battery = pins.get("battery_adc")
        self.pin_trig = pins.get("trig_out")
        self.t_us = 0                    # the state's (the last step's) world time
        # rain
        self.rain_mm = 0.0
        self.intensity = 0.0             # mm/h at the last step's start
        self._shower_key = None
        self.showers = []                # [(start_us, end_us, mm/h)] not over yet, by start
        self._shower_rng = None
        self._shower_next_us = 0
        self._shower_start_us = math.inf  # the next shower not drawn yet
        self._step_rain = None           # (t0, mm) of the step entered, its tips queued
        self._tip_mm = None              # the bucket the tips were counted with
        self.next_tip_mm = math.inf      # the rain's depth at the next tip
        self.last_tip_us = -10 ** 15
        self.tips = 0
        self.rain_level = 1
        self.pending = []                # heap of (t_us, seq, level): the gauge's edges not sent yet
        self._seq = 0
        # water
        self._anchor = None              # (t_us, m3, evaporated m3, m3/us) while quiet: see _quiet
        self.catch_m3 = 0.0
        start = p["start_level_mm"] if p["start_level_mm"] >= 0 else p["base_mm"]
        self.v_m3 = self._volume(start / 1000)
        self.v0_m3 = self.v_m3
        self.head_mm = 0.0
        self.level_mm = self._level(self.v_m3) * 1000
        self.inflow_m3 = self.runoff_m3 = self.outflow_m3 = self.overflow_m3 = self.evap_m3 = 0.0
        self.peak_mm, self.peak_us = self.level_mm, 0
        self.overflow_at_us = None
        self.overflow_us = 0
        self.first_above = {}
        self.next_mark = (int(self.level_mm) // 100 + 1) * 100
        # sensors
        self.next_ping_us = 0
        self.updates = 0
        self.pings = 0
        self.trig_level = 0
        self.fault = None
        self.lost = 0
        self.echo_us = self.sonar_mm = self.adc_uv = None
        self._measure(0, send=False)     # the update at time 0: the values at power-on
        self.next_ping_us = max(1, int(p["ping_update_s"] * _US))
        # battery
        self.wakes = 0
        self._battery_start = p["battery_start_pct"]
        self.charge_mas = p["battery_mah"] * 36 * p["battery_start_pct"]
        self.charge_t_us = 0
        self.battery_uv = self._battery_uv(0)

    # -- the chamber's geometry ---------------------------------------------------
    def _volume(self, h):
        p = self.params
        neck, grate = p["neck_mm"] / 1000, p["grate_mm"] / 1000
        h = min(h, grate)
        if h <= neck:
            return p["sump_m2"] * max(0.0, h)
        return p["sump_m2"] * neck + p["neck_m2"] * (h - neck)

    def _level(self, v):
        p = self.params
        neck = p["neck_mm"] / 1000
        vn = p["sump_m2"] * neck
        if v <= vn or p["neck_m2"] <= 0:
            return v / p["sump_m2"]
        return neck + (v - vn) / p["neck_m2"]

    # -- rain ------------------------------------------------------------------------
    def _storm_depth(self, t_us):
        """Depth of the design storm fallen by world time t_us, mm."""
        p = self.params
        if p["storm_at_h"] < 0 or p["storm_hours"] <= 0 or p["peak_mm_h"] <= 0:
            return 0.0
        total_s = p["storm_hours"] * 3600
        u = t_us / _US - p["storm_at_h"] * 3600
        if u <= 0:
            return 0.0
        peak = p["peak_mm_h"] / 3600                    # mm/s
        tp = min(max(p["peak_at"], 0.0), 1.0) * total_s
        if u >= total_s:
            return peak * total_s / 2
        if u <= tp:
            return peak * u * u / (2 * tp)
        fall = total_s - tp
        return peak * total_s / 2 - peak * (total_s - u) ** 2 / (2 * fall)

    def _storm_intensity(self, t_us):
        p = self.params
        if p["storm_at_h"] < 0 or p["storm_hours"] <= 0:
            return 0.0
        total_s = p["storm_hours"] * 3600
        u = t_us / _US - p["storm_at_h"] * 3600
        if u < 0 or u >= total_s:
            return 0.0
        tp = min(max(p["peak_at"], 0.0), 1.0) * total_s
        return p["peak_mm_h"] * (u / tp if u < tp else (total_s - u) / (total_s - tp))

    def _shower_schedule(self, t_us):
        """The showers' schedule up to t_us (made again from rain_seed when a shower parameter changed)."""
        p = self.params
        key = (p["rain_seed"], p["showers_per_week"], p["shower_mm"], p["shower_min"])
        if key != self._shower_key:
            first = self._shower_key is None
            self._shower_key = key
            self.showers = []
            # the same schedule for every drain: a function of the seed and the instant of the change
            self._shower_rng = random.Random(f"prapa-rain:{p['rain_seed']!r}:{0 if first else t_us}")
            self._shower_next_us = 0 if first else t_us
            self._draw_shower()
        if p["showers_per_week"] <= 0:
            return
        while self._shower_start_us <= t_us:
            length_us = int(max(p["shower_min"], 0.1) * 60 * _US)
            depth = p["shower_mm"] * self._shower_rng.uniform(0.5, 1.5)
            self.showers.append((self._shower_start_us, self._shower_start_us + length_us,
                                 depth / (length_us / 3600e6)))
            self._draw_shower()

    def _draw_shower(self):
        per_week = self.params["showers_per_week"]
        if per_week <= 0:
            self._shower_start_us = math.inf
            return
        gap_s = self._shower_rng.expovariate(per_week / (7 * 86400))
        self._shower_start_us = self._shower_next_us = self._shower_next_us + int(gap_s * _US)

    def _rain_between(self, t0, t1):
        """Rain depth over [t0, t1] (world us), mm, and the intensity at t0, mm/h."""
        p = self.params
        if p["forced_mm_h"] >= 0:
            return p["forced_mm_h"] * (t1 - t0) / 3600e6, p["forced_mm_h"]
        depth = self._storm_depth(t1) - self._storm_depth(t0)
        intensity = self._storm_intensity(t0)
        self._shower_schedule(t1)
        if self.showers:
            keep = []
            for s, e, mm_h in self.showers:
                if e > t0:
                    keep.append((s, e, mm_h))
                    overlap = min(e, t1) - max(s, t0)
                    if overlap > 0:
                        depth += mm_h * overlap / 3600e6
                    if s <= t0 < e:
                        intensity += mm_h
            self.showers = keep
        return max(0.0, depth), intensity

    def _enter_step(self, t0):
        """The rain of the step from t0: queue the gauge's tips in it (their times from the rain's depth)."""
        mm, self.intensity = self._rain_between(t0, t0 + STEP_US)
        self._step_rain = (t0, mm)
        p = self.params
        per_tip = p["rain_mm_tip"]
        if per_tip <= 0 or self.pin_rain is None:
            self._tip_mm = None
            return
        if per_tip != self._tip_mm:                 # a gauge fitted, or another bucket: from the next whole tip
            self._tip_mm = per_tip
            self.next_tip_mm = (math.floor(self.rain_mm / per_tip + 1e-9) + 1) * per_tip
        end = self.rain_mm + mm
        tip_us = max(1, int(p["tip_ms"] * 1000))
        while mm > 0 and self.next_tip_mm <= end + 1e-9:
            t = t0 + int((self.next_tip_mm - self.rain_mm) / mm * STEP_US)
            t = max(t, self.last_tip_us + 2 * tip_us)
            self.last_tip_us = t
            self._push(t, 0)
            self._push(t + tip_us, 1)
            self.next_tip_mm += per_tip

    def _push(self, t_us, level):
        self._seq += 1
        heapq.heappush(self.pending, (t_us, self._seq, level))

    # -- the water ---------------------------------------------------------------------
    def _step(self):
        """Move the catchment and the chamber over the step entered, to its end."""
        p = self.params
        t0, mm = self._step_rain
        self._step_rain = None
        dt = STEP_S
        self.rain_mm += mm
        runoff = p["runoff_coeff"] * p["area_m2"] * mm / 1000
        self.runoff_m3 += runoff
        lag_s = p["lag_min"] * 60
        if lag_s <= 0:
            inflow, self.catch_m3 = runoff + self.catch_m3, 0.0
        elif runoff > 0 or self.catch_m3 > 0:
            e = math.exp(-dt / lag_s)
            store = self.catch_m3 * e + runoff * lag_s / dt * (1 - e)     # exact for a constant rain in the step
            if store < 1e-12:
                store = 0.0
            inflow = self.catch_m3 + runoff - store
            self.catch_m3 = store
        else:
            inflow = 0.0
        v = self.v_m3
        sump = p["sump_m2"]
        base_m = p["base_mm"] / 1000
        h = self._level(v)
        out = 0.0
        if h > base_m:
            b = min(max(p["blockage"], 0.0), 0.95)
            tau_s = max(p["recession_min"], 1e-3) * 60
            q = min(p["pipe_lps"] / 1000 * (1 - b), (1 - b) * sump * (h - base_m) / tau_s)
            out = min(q * dt, v - self._volume(base_m))
        evap = 0.0
        if p["evap_mm_day"] > 0 and v > 0:
            surface = sump if h <= p["neck_mm"] / 1000 else p["neck_m2"]
            evap = min(v, surface * p["evap_mm_day"] / 1000 * dt / 86400)
        v += inflow - out - evap
        self.inflow_m3 += inflow
        self.outflow_m3 += out
        self.evap_m3 += evap
        t1 = t0 + STEP_US
        full = self._volume(p["grate_mm"] / 1000)
        if v > full:
            over = v - full
            v = full
            self.overflow_m3 += over
            if self.overflow_at_us is None:
                self.overflow_at_us = t1
            self.overflow_us += STEP_US
            weir = WEIR_C * p["grate_weir_m"]
            self.head_mm = (over / dt / weir) ** (2 / 3) * 1000 if weir > 0 else 0.0
        else:
            self.head_mm = 0.0
        self.v_m3 = v
        self.t_us = t1
        level = self._level(v) * 1000 + self.head_mm
        self.level_mm = level
        if level > self.peak_mm:
            self.peak_mm, self.peak_us = level, t1
        while level >= self.next_mark:
            self.first_above[str(self.next_mark)] = t1 / _US
            self.next_mark += 100

    # -- the sensors ---------------------------------------------------------------------
    def _measure(self, t_us, out=None, send=True):
        """One update of the sensors' values at t_us from the level now; appends what changed to out."""
        p = self.params
        fault = None
        if p["stuck_at_h"] >= 0 or p["oor_at_h"] >= 0 or p["blind_at_h"] >= 0:
            for f in FAULTS:
                at = p[f + "_at_h"]
                if at >= 0 and at * 3600e6 <= t_us < (at + p[f + "_hours"]) * 3600e6:
                    fault = f
                    break
        self.fault = fault
        self.updates += 1
        if fault == "stuck" and self.echo_us is not None:
            return
        noise = self.rng.gauss(0.0, p["noise_mm"]) if p["noise_mm"] > 0 else 0.0
        level = self.level_mm + noise
        distance = p["mount_mm"] - level
        ma = 4 + 16 * level / p["range_mm"] if p["range_mm"] > 0 else 4.0
        ma = 3.8 if ma < 3.8 else 20.5 if ma > 20.5 else ma
        if fault == "oor":
            distance = p["oor_mm"]
            ma = NAMUR_HIGH_MA
        elif fault == "blind":
            distance = p["blind_obstacle_mm"] + noise
        elif p["lost_echo_pct"] > 0 and self.rng.random() * 100 < p["lost_echo_pct"]:
            distance = 0.0
            self.lost += 1
        if distance > 0:
            echo = int(round(2 * distance / sound_mm_per_us(p["air_c"])))
            sonar = int(round(distance)) or 1
        else:
            echo = sonar = 0
        uv = int(round(ma * p["shunt_ohm"] * 1000))
        if send:
            sensor = int(p["sensor"])
            if echo != self.echo_us and self.pin_echo is not None and sensor in (0, 1):
                out.append((t_us, self.pin_echo, ANALOG, echo))
            if sonar != self.sonar_mm and self.pin_sonar is not None and sensor in (0, 2):
                out.append((t_us, self.pin_sonar, ANALOG, sonar))
            if uv != self.adc_uv and self.pin_adc is not None and sensor in (0, 3):
                out.append((t_us, self.pin_adc, ANALOG, uv))
        self.echo_us, self.sonar_mm, self.adc_uv = echo, sonar, uv

    def _charge(self, t_us):
        p = self.params
        return self.charge_mas - p["sleep_ua"] / 1000 * max(0, t_us - self.charge_t_us) / _US

    def _battery_mv(self, t_us):
        p = self.params
        if p["battery_mah"] <= 0:
            return SOC_MV[-1][1]
        return battery_mv(self._charge(t_us) / (p["battery_mah"] * 3600))

    def _battery_uv(self, t_us):
        return int(round(self._battery_mv(t_us) / max(self.params["divider"], 1e-9) * 1000))

    def _check_battery(self):
        p = self.params
        if p["battery_start_pct"] != self._battery_start:        # a fresh battery
            self._battery_start = p["battery_start_pct"]
            self.charge_mas = p["battery_mah"] * 36 * p["battery_start_pct"]
            self.charge_t_us = self.t_us

    # -- the world's clock ----------------------------------------------------------------
    def _next_rain_us(self, t_us):
        """The first world time >= t_us when it may rain (math.inf: never), the showers drawn up to t_us."""
        p = self.params
        if p["forced_mm_h"] >= 0:
            return t_us if p["forced_mm_h"] > 0 else math.inf
        first = math.inf
        if p["storm_at_h"] >= 0 and p["storm_hours"] > 0 and p["peak_mm_h"] > 0:
            start = p["storm_at_h"] * 3600e6
            if t_us < start + p["storm_hours"] * 3600e6:
                first = max(t_us, math.floor(start))
        self._shower_schedule(t_us)
        for s, e, _mm_h in self.showers:
            if e > t_us:
                first = min(first, max(s, t_us))
        return min(first, self._shower_start_us)

    def _quiet(self, until_us):
        """Dry weather with the pool at or below the outlet's lip: only evaporation moves the water, so
        the state at any step of it follows from where it began (the anchor), however the bench slices
        time. The last step before the rain or until_us (the state is not moved), or None when not quiet."""
        t0 = self.t_us
        if self._anchor is None:
            if self.catch_m3 > 0 or self.v_m3 > self._volume(self.params["base_mm"] / 1000):
                return None
        rain_us = self._next_rain_us(t0)
        if rain_us < t0 + STEP_US:
            self._anchor = None
            return None
        if self._anchor is None:
            p = self.params
            rate = p["sump_m2"] * p["evap_mm_day"] / 1000 / 86400 / _US         # m3 per world us
            self._anchor = (t0, self.v_m3, self.evap_m3, max(0.0, rate))
        return t0 + max(0, int((min(rain_us, until_us) - t0) // STEP_US)) * STEP_US

    def _quiet_to(self, t_us):
        t_q, v_q, evap_q, rate = self._anchor
        v = max(0.0, v_q - rate * (t_us - t_q))
        self.v_m3, self.evap_m3 = v, evap_q + (v_q - v)
        self.level_mm = v / self.params["sump_m2"] * 1000
        self.intensity = 0.0
        self.t_us = t_us

    def _update(self, t, out, pin_battery):
        self._measure(t, out)
        if pin_battery is not None:
            uv = self._battery_uv(t)
            if uv != self.battery_uv:
                self.battery_uv = uv
                out.append((t, pin_battery, ANALOG, uv))

    def events_until(self, until_us):
        out = []
        self._check_battery()
        ping_us = max(1, int(self.params["ping_update_s"] * _US))
        pin_battery = self.pin_battery
        while True:
            t0 = self.t_us
            if self._step_rain is None:
                t_end = self._quiet(until_us)
                if t_end is not None:
                    while self.next_ping_us < t_end:      # each update sees the level of the step before it
                        t = self.next_ping_us
                        self._quiet_to(t0 + (t - t0) // STEP_US * STEP_US)
                        self._update(t, out, pin_battery)
                        self.next_ping_us = t + ping_us
                    self._quiet_to(t_end)
                    if t_end + STEP_US <= until_us:       # the rain comes in the next step
                        continue
                    while self.next_ping_us <= until_us:
                        self._update(self.next_ping_us, out, pin_battery)
                        self.next_ping_us += ping_us
                    break
                self._enter_step(t0)
            t1 = t0 + STEP_US
            while self.next_ping_us < t1 and self.next_ping_us <= until_us:
                self._update(self.next_ping_us, out, pin_battery)
                self.next_ping_us += ping_us
            if t1 > until_us:
                break
            self._step()
        pending, pin, sort = self.pending, self.pin_rain, bool(out)
        while pending and pending[0][0] <= until_us:
            t, _seq, level = heapq.heappop(pending)
            if level == 0:
                self.tips += 1
            self.rain_level = level
            out.append((t, pin, LEVEL, level))
        if sort and out[-1][1] == pin:          # tips among the sensors' updates
            out.sort(key=lambda e: e[0])
        return out

    def rebase(self):
        """Before a parameter changes: the battery's drain so far at the old rates; dry weather's
        evaporation starts again from now (at the new rates)."""
        self._anchor = None
        self.charge_mas = self._charge(self.t_us)
        self.charge_t_us = self.t_us

    def levels(self):
        return {self.pin_rain: self.rain_level} if self.pin_rain is not None else {}

    def analog_levels(self):
        """The analog inputs now (a sensor not fitted reads 0: no echo, no frame, no loop current)."""
        sensor = int(self.params["sensor"])
        out = {}
        for gpio, value, fitted in ((self.pin_echo, self.echo_us, sensor in (0, 1)),
                                    (self.pin_sonar, self.sonar_mm, sensor in (0, 2)),
                                    (self.pin_adc, self.adc_uv, sensor in (0, 3)),
                                    (self.pin_battery, self.battery_uv, True)):
            if gpio is not None:
                out[gpio] = value if fitted else 0
        return out

    def on_output(self, t_us, gpio, level):
        if gpio == self.pin_trig:
            if level and not self.trig_level:
                self.pings += 1
            self.trig_level = 1 if level else 0

    def on_reset(self, t_us):
        """The VM ended (a deep sleep, a reset, a power cut): one wake's charge is spent."""
        self.wakes += 1
        self.charge_mas -= self.params["wake_mas"]
        self.trig_level = 0

    # -- the truth ---------------------------------------------------------------------------
    def truth(self, t_us=None):
        """What really happened up to the world's own time (t_us in the answer: the last step's end;
        tips and the sensors' updates as sent, up to the last events_until). Times in world seconds."""
        p = self.params
        mv = self._battery_mv(self.t_us)
        storage = self.v_m3 - self.v0_m3
        return {
            "t_us": self.t_us,
            "level_mm": round(self.level_mm, 3),
            "distance_mm": round(p["mount_mm"] - self.level_mm, 3),
            "peak_level_mm": round(self.peak_mm, 3),
            "peak_at_s": self.peak_us / _US,
            "first_above_s": dict(self.first_above),     # {"700": s, ...}: first rise above each 100 mm
            "intensity_mm_h": round(self.intensity, 6),
            "rain_mm": round(self.rain_mm, 6),
            "tips": self.tips,
            "overflowing": self.head_mm > 0,
            "overflow_at_s": None if self.overflow_at_us is None else self.overflow_at_us / _US,
            "overflow_s": self.overflow_us / _US,
            "runoff_m3": round(self.runoff_m3, 9),
            "inflow_m3": round(self.inflow_m3, 9),
            "outflow_m3": round(self.outflow_m3, 9),
            "overflow_m3": round(self.overflow_m3, 9),
            "evaporated_m3": round(self.evap_m3, 9),
            "storage_change_m3": round(storage, 9),
            "catchment_m3": round(self.catch_m3, 9),
            "sensor_fault": self.fault,
            "lost_echoes": self.lost,
            "echo_us": self.echo_us,
            "sonar_mm": self.sonar_mm,
            "pings": self.pings,
            "wakes": self.wakes,
            "battery_mv": round(mv, 1),
            "battery_pct": 100.0 if p["battery_mah"] <= 0 else
            round(100 * self._charge(self.t_us) / (p["battery_mah"] * 3600), 4),
        }


MODELS = (StormDrain,)
ACTIVITY = ("storm_drain", "forced_mm_h", 360.0)     # 0.1 mm/s: a tip every 2 s with a 0.2 mm bucket
TRUTH = ("storm_drain", "tips")                      # what the gauge really tipped (the board's rain_tips)
SITE_BOARDS = 4                                      # a catchment of four drains at `prapa site`

# `prapa site`: a street of drains in one catchment. A storm starts 5 world minutes in (5 s at 60x)
# and lasts two hours; drain 1 is 75 % blocked and overflows about an hour into it.
SITE_STORM_AT_H = 5 / 60
SITE_CATCHMENT = "phra-athit-rd"
SITE_ORIGIN = (13.7612, 100.4951)           # lat, lon of the street's first drain
SITE_SPACING = (0.00030, 0.00012)           # about 35 m along the street per drain
# Each drain's sensor, in turn: (config sensor, world sensor, range_mm: the transducer's 20 mA level)
SITE_SENSORS = (("echo", 1, None), ("echo", 1, None), ("uart", 2, None), ("ma", 3, 2000))


def site_board(n):
    """(drain config, world overrides) for the n-th drain of `prapa site`: the drains of one street,
    a storm soon after the start; drain 0 has the catchment's rain gauge (0.2 mm a tip), the others
    are told the rain by the gateway; drain 1 is partly blocked (0.75), the others healthy, each
    draining a slightly different area (230-290 m2). Sensors in turn: echo, echo, uart, 4-20 mA."""
    sensor, world_sensor, range_mm = SITE_SENSORS[n % len(SITE_SENSORS)]
    section = {"sensor": sensor, "dry_s": 300, "wet_s": 30}
    world = [f"storm_drain.storm_at_h={SITE_STORM_AT_H:.6f}", f"storm_drain.sensor={world_sensor}",
             f"storm_drain.area_m2={260 + 15 * ((3 * n) % 5 - 2)}"]
    if range_mm:
        section["range_mm"] = range_mm
        world.append(f"storm_drain.range_mm={range_mm}")
    if n == 0:
        section["rain_mm_tip"] = 0.2
        world.append("storm_drain.rain_mm_tip=0.2")
    if n == 1:
        world.append("storm_drain.blockage=0.75")
    return section, world


def site_place(n):
    """The n-th drain's place: {"catchment", "lat", "lon"} along one street (registry location)."""
    return {"catchment": SITE_CATCHMENT, "lat": round(SITE_ORIGIN[0] + n * SITE_SPACING[0], 6),
            "lon": round(SITE_ORIGIN[1] + n * SITE_SPACING[1], 6)}
