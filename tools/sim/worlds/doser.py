"""A water plant's chlorine dosing: plant flow, hypochlorite, contact tank, network, analyser.

Plant flow Q(t) [L/s] is `mean_flow_lps` times a daily profile (about 40 % of the
mean at night around 02:00-04:00, about 150 % at the morning and evening peaks),
constant within each 10 s bin (the profile at the bin's middle). `forced_flow_lps`
>= 0 replaces the profile; a plant pump stop (`stop_at_h`, `stop_hours`) makes it 0.
The plant's flow meter closes its open-collector output (input low) once per
`flow_l_per_pulse` litres, for half a pulse's volume, without bounce; the flow
transmitter reads 4 mA at 0 and 20 mA at `flow_range_lps`.

Raw-water chlorine demand D(t) [mg/L] is `demand_mgl` plus a daily swing of
`demand_swing_mgl` (a cosine peaking at 15:00) plus rain: from `rain_at_h` for
`rain_hours` an extra `rain_demand_mgl` that ramps up over an hour, and decays
with time constant `rain_decay_h` after. `demand_profile` picks one of three
profiles for a benchmark: 0 as above, 1 flat (no swing), 2 a 0.5 mg/L swing and
a 3 h rain from the first 14:00 local time.

The hypochlorite tank holds `tank_l` litres, starts with `tank_start_l` of
`strength_gpl` g/L (= mg/mL) available chlorine, which decays with half-life
`strength_half_life_days`. Setting `tank_start_l` mid-run is a refill: the tank
then holds that many litres of fresh solution. The float switch closes (input
low) below `tank_low_l`; the level transmitter reads 4 mA empty, 20 mA full.

The board drives `pump_enable` (1: the pump is powered) and `stroke_out`: a
rising edge while the pump is powered is one stroke, which moves `stroke_ml`
x (1 + `stroke_error_pct`/100) x (1 + u/100) mL, u uniform in
+-`stroke_noise_pct`, out of the tank: nothing once the tank is empty or while
the pump head is air-locked (`feedback_fail` = 1). The flow monitor on the pump
head pulls `stroke_feedback_in` low `feedback_delay_ms` after each stroke that
moved liquid, for `feedback_ms` (pulses of strokes closer than that merge). At a
reset the board's outputs float and the relay's pull-down makes both 0
(on_reset).

Chlorine mass [mg] = stroke volume [mL] x strength [mg/mL] is binned by the
stroke's time into 10 s bins; a bin's inlet dose [mg/L] is its mass over the
water [L] through the plant in it (0 without flow: that chlorine is lost). The
pump's pulses mix along the pipe: the dose is smoothed by a first-order mixing
of `mixing_s` (0: none) over bins with flow. The contact tank is plug flow with
dead time Td = `dead_time_s` (whole bins, at least one) and first-order decay
`k_tank_per_h`:

    outlet(t) = max(0, dose(t - Td) - D(t - Td)) x exp(-k_tank x Td)     [mg/L]

A bin without flow does not move the plug: the outlet holds its value and decays
with k_tank, and the water in the tank stays longer (and decays more). The
network carries the outlet to the far tap in `transit_h` with decay `k_net_per_h`:

    tap(t) = outlet(t - Tt) x exp(-k_net x Tt)                             [mg/L]

Before world time 0 the plant was steady at `initial_outlet_mgl`, so the tap is
in band from the start. The analyser samples the outlet every
`analyzer_period_s`, adds gaussian noise (sigma `analyzer_noise_mgl`), a drift of
`analyzer_drift_mgl_per_day` and `analyzer_offset_mgl`, and sends 4 mA at 0 and
20 mA at `analyzer_range_mgl` (clamped to 3.8-20.5 mA). `analyzer_fault` 1 sends
2.0 mA (a broken loop, NAMUR low), 2 sends 22 mA (NAMUR high), 3 freezes the
signal at its last value, from `analyzer_fault_at_h` for `analyzer_fault_hours`.
Every 4-20 mA loop is read over a 150 ohm shunt: microvolts = mA x 150 x 1000,
sent for all three transmitters on the analyser's sample grid (the first at
world time 0). levels() holds the digital inputs only, as the bench sends them as
levels at power-on; analog_levels() has the analog inputs' current microvolts.

Events the world makes itself do not depend on how the bench slices time. The
ones a stroke makes (its feedback pulse, the float switch) carry their true
time, which can be earlier than the end of the previous events_until call (the
bench looks ahead of the board, and the stroke arrives after): each call's list
is in time order, and the board applies a late record at once with its own time.
"""

import collections
import heapq
import math

from tools.sim.worlds import ANALOG, LEVEL

_US = 1_000_000
BIN_US = 10 * _US                 # the dose, flow, contact tank and network move in 10 s bins
_BIN_H = BIN_US / 3600e6
_SHUNT_UV_PER_MA = 150 * 1000     # 150 ohm shunt: 1 mA -> 150 mV
# Plant flow relative to its mean, per local hour (0-23), linear in between.
DIURNAL = (0.6, 0.45, 0.4, 0.4, 0.45, 0.7, 1.1, 1.5, 1.5, 1.3, 1.1, 1.05,
           1.1, 1.0, 0.95, 0.95, 1.05, 1.3, 1.5, 1.5, 1.3, 1.1, 0.9, 0.75)
_DIURNAL_MEAN = sum(DIURNAL) / len(DIURNAL)
BAND_MGL = (0.2, 0.5)             # the tap's free chlorine must stay in here


def _ma_uv(ma):
    return int(round(ma * _SHUNT_UV_PER_MA))


def _loop_ma(value, full_scale):
    """4-20 mA for 0..full_scale, clamped to the NAMUR measuring range 3.8-20.5 mA."""
    ma = 4 + 16 * value / full_scale if full_scale > 0 else 4.0
    return min(20.5, max(3.8, ma))


class ChlorinePlant:
    NAME = "chlorine_plant"
    ROLES = ("doser",)
    PARAMS = {
        # plant flow
        "mean_flow_lps": (12.0, "L/s", "mean plant flow over a day"),
        "forced_flow_lps": (-1.0, "L/s", "constant plant flow instead of the daily profile (-1: off)"),
        "start_hour": (0.0, "h", "local time of day when the world starts"),
        "stop_at_h": (-1.0, "h", "world time when the plant pumps stop (-1: never)"),
        "stop_hours": (1.0, "h", "how long the plant pumps stay stopped (no flow)"),
        "flow_l_per_pulse": (10.0, "L/pulse", "the plant flow meter's K-factor: litres per closure"),
        "flow_range_lps": (50.0, "L/s", "plant flow at 20 mA on the flow transmitter (4 mA: none)"),
        # chlorine demand of the raw water
        "demand_mgl": (1.0, "mg/L", "mean chlorine demand of the raw water"),
        "demand_swing_mgl": (0.25, "mg/L", "amplitude of the daily demand swing (peak at 15:00)"),
        "demand_profile": (0.0, "0/1/2", "0: as set; 1: flat (no swing); 2: 0.5 mg/L swing and rain 14:00-17:00"),
        "rain_at_h": (-1.0, "h", "world time when rain starts (-1: no rain)"),
        "rain_hours": (2.0, "h", "how long it rains"),
        "rain_demand_mgl": (0.5, "mg/L", "extra demand from rain (reached after an hour of rain)"),
        "rain_decay_h": (2.0, "h", "time constant of the extra demand's decay after the rain"),
        # hypochlorite and the dosing pump
        "strength_gpl": (120.0, "g/L", "available chlorine of fresh hypochlorite (= mg/mL)"),
        "strength_half_life_days": (60.0, "days", "half-life of the hypochlorite's strength (0: no decay)"),
        "tank_l": (200.0, "L", "hypochlorite tank capacity (20 mA on the level transmitter)"),
        "tank_start_l": (200.0, "L", "hypochlorite in the tank at the start; set mid-run: a refill to this"),
        "tank_low_l": (20.0, "L", "the float switch closes (input low) below this"),
        "stroke_ml": (0.5, "mL", "nominal volume of one pump stroke"),
        "stroke_error_pct": (2.0, "%", "fixed error of the real stroke volume against stroke_ml"),
        "stroke_noise_pct": (1.0, "%", "per-stroke volume noise, uniform within +-this"),
        "feedback_fail": (0.0, "0/1", "1: the pump head is air-locked: strokes move nothing, no feedback"),
        "feedback_delay_ms": (20.0, "ms", "the stroke feedback pulse starts this long after a stroke"),
        "feedback_ms": (30.0, "ms", "length of the stroke feedback pulse (input low)"),
        # contact tank and network
        "mixing_s": (60.0, "s", "first-order mixing of the dose ahead of the contact tank (0: plug flow only)"),
        "dead_time_s": (600.0, "s", "contact tank dead time (plug flow, whole 10 s bins, at least one)"),
        "k_tank_per_h": (0.2, "1/h", "first-order chlorine decay in the contact tank"),
        "transit_h": (4.0, "h", "network transit time from the plant to the far tap"),
        "k_net_per_h": (0.08, "1/h", "first-order chlorine decay in the network"),
        "initial_outlet_mgl": (0.55, "mg/L", "outlet residual of the steady state before world time 0"),
        # residual analyser
        "analyzer_range_mgl": (5.0, "mg/L", "free chlorine at 20 mA (4 mA: 0 mg/L)"),
        "analyzer_period_s": (5.0, "s", "the analyser's (and the transmitters') sample period"),
        "analyzer_noise_mgl": (0.01, "mg/L", "standard deviation of the analyser's gaussian noise"),
        "analyzer_drift_mgl_per_day": (0.02, "mg/L/day", "the analyser's drift from world time 0"),
        "analyzer_offset_mgl": (0.0, "mg/L", "offset added to the analyser's reading"),
        "analyzer_fault": (0.0, "0-3", "0: none; 1: 2.0 mA loop fault; 2: 22 mA; 3: signal stuck at its last value"),
        "analyzer_fault_at_h": (0.0, "h", "world time the analyser fault starts (-1: never)"),
        "analyzer_fault_hours": (1e9, "h", "how long the analyser fault lasts"),
    }

    def __init__(self, params, pins, rng):
        self.params = params
        p = params
        self.pin_flow = pins.get("flow_pulse_in")
        self.pin_flow_adc = pins.get("flow_adc")
        self.pin_residual = pins.get("residual_adc")
        self.pin_tank_adc = pins.get("tank_level_adc")
        self.pin_low = pins.get("tank_low_in")
        self.pin_feedback = pins.get("stroke_feedback_in")
        self.pin_enable = pins.get("pump_enable")
        self.pin_stroke = pins.get("stroke_out")
        # Two streams, so the analyser's noise does not depend on when strokes arrive.
        self.rng_analyzer = type(rng)(rng.getrandbits(64))
        self.rng_stroke = type(rng)(rng.getrandbits(64))
        self.t_us = 0
        # plant flow: constant within a bin; crossings computed from the segment start
        self.bin = 0
        self.bin_start_litres = 0.0
        self.seg_t_us, self.seg_litres, self.litres = 0, 0.0, 0.0
        self.q = self._flow(0)
        self._dirty = False
        self.flow_level = 1
        self.pulses = 0
        self.next_litres = p["flow_l_per_pulse"]   # a closure at every whole pulse volume
        # hypochlorite
        self._tank_start = p["tank_start_l"]
        self.tank_ml = p["tank_start_l"] * 1000
        self.refill_t_us = 0
        self.low_state = 0 if self.tank_ml < p["tank_low_l"] * 1000 else 1
        self.low_level = self.low_state
        self.pump_en = 0
        self.first_enable_write = True     # the board's first write of pump_enable since power-on/reset
        self.safe_starts = 0
        self.unsafe_starts = 0
        self.stroke_level = 0
        self.first_enable_write = True
        self.strokes = self.strokes_dry = 0
        self.last_stroke_us, self.min_stroke_gap_us = None, None   # the pump's fastest stroke to stroke
        self.solution_ml = 0.0
        self.mass_lost_mg = 0.0
        self.fb_depth = 0
        self.feedback_pulses = 0
        self.pending = []                # heap of (t_us, seq, gpio, what, value): events a stroke caused
        self._seq = 0
        # contact tank: parcels [bin, litres, demand, t_in_us, mass_mg, residual_mgl: before time 0 only]
        self.future_mass = {}            # mg per bin not closed yet
        self.live = {}                   # bin -> its parcel while in the tank (late strokes still count)
        self.tank = collections.deque()
        r0 = p["initial_outlet_mgl"]
        n = self._tank_bins()
        r_in = r0 * math.exp(p["k_tank_per_h"] * (n * _BIN_H))        # what decays to r0 in the tank
        for k in range(1 - n, 0):
            t_in = k * BIN_US + BIN_US // 2
            self.tank.append([k, 1.0, self._demand(t_in), t_in, 0.0, r_in])
        self.mixed = self.last_dose = r_in + self._demand((1 - n) * BIN_US + BIN_US // 2)
        self.outlet = r0
        self.net = collections.deque([r0] * self._net_bins())
        self.tap_src = r0
        self.tap = self._tap_of(r0)
        # what the bins showed so far
        self.bins_done = self.bins_in_band = 0
        self.outlet_max = r0
        self.tap_min = self.tap_max = self.tap
        self.ideal_ml_per_mgl = 0.0
        # transmitters
        self.next_sample_us = 0
        self.an_uv = _ma_uv(_loop_ma(r0 + p["analyzer_offset_mgl"], p["analyzer_range_mgl"]))
        self.flow_uv = _ma_uv(_loop_ma(self.q, p["flow_range_lps"]))
        self.tank_uv = _ma_uv(_loop_ma(self.tank_ml / 1000, p["tank_l"]))

    # -- the physics as functions of time -------------------------------------------
    def _tank_bins(self):
        return max(1, round(self.params["dead_time_s"] * _US / BIN_US))

    def _net_bins(self):
        return max(1, round(self.params["transit_h"] * 3600e6 / BIN_US))

    def _tap_of(self, outlet):
        p = self.params
        return outlet * math.exp(-p["k_net_per_h"] * p["transit_h"])

    def _local_hour(self, t_us):
        return (self.params["start_hour"] + t_us / 3600e6) % 24

    def _flow(self, k):
        """Plant flow in L/s during bin k."""
        p = self.params
        h = (k + 0.5) * _BIN_H
        if 0 <= p["stop_at_h"] <= h < p["stop_at_h"] + p["stop_hours"]:
            return 0.0
        if p["forced_flow_lps"] >= 0:
            return p["forced_flow_lps"]
        local = self._local_hour((k + 0.5) * BIN_US)
        i = int(local) % 24
        f = local - int(local)
        return p["mean_flow_lps"] * (DIURNAL[i] * (1 - f) + DIURNAL[(i + 1) % 24] * f) / _DIURNAL_MEAN

    def _demand(self, t_us):
        """Chlorine demand of the raw water in mg/L at world time t_us."""
        p = self.params
        profile = int(p["demand_profile"])
        swing, rain_at, rain_h = p["demand_swing_mgl"], p["rain_at_h"], p["rain_hours"]
        if profile == 1:
            swing = 0.0
        elif profile == 2:
            swing, rain_at, rain_h = 0.5, (14 - p["start_hour"]) % 24, 3.0
        d = p["demand_mgl"] + swing * math.cos(2 * math.pi * (self._local_hour(t_us) - 15) / 24)
        if rain_at >= 0:
            tau = t_us / 3600e6 - rain_at
            if tau > 0:
                if tau < rain_h:
                    d += p["rain_demand_mgl"] * min(1.0, tau)
                else:
                    decay = math.exp(-(tau - rain_h) / p["rain_decay_h"]) if p["rain_decay_h"] > 0 else 0.0
                    d += p["rain_demand_mgl"] * min(1.0, rain_h) * decay
        return d

    def _strength(self, t_us):
        """Available chlorine of the tank's solution in mg/mL (= g/L) at t_us."""
        p = self.params
        hl = p["strength_half_life_days"]
        age_days = max(0, t_us - self.refill_t_us) / 86400e6
        return p["strength_gpl"] * (0.5 ** (age_days / hl) if hl > 0 else 1.0)

    def _fault(self, t_us):
        p = self.params
        at = p["analyzer_fault_at_h"]
        if not p["analyzer_fault"] or at < 0:
            return 0
        h = t_us / 3600e6
        return int(p["analyzer_fault"]) if at <= h < at + p["analyzer_fault_hours"] else 0

    # -- changes a parameter makes ---------------------------------------------------
    def _check_refill(self):
        p = self.params
        if p["tank_start_l"] != self._tank_start:
            self._tank_start = p["tank_start_l"]
            self.tank_ml = max(0.0, p["tank_start_l"] * 1000)
            self.refill_t_us = self.t_us
            self._set_low(self.t_us)

    def _set_low(self, t_us):
        state = 0 if self.tank_ml < self.params["tank_low_l"] * 1000 else 1
        if state != self.low_state:
            self.low_state = state
            self._push(t_us, self.pin_low, "low", state)

    def _push(self, t_us, gpio, what, value):
        if gpio is not None:
            self._seq += 1
            heapq.heappush(self.pending, (t_us, self._seq, gpio, what, value))

    # -- the world's clock -------------------------------------------------------
    def _close_bin(self):
        """The end of bin self.bin: its water enters the contact tank, the plug moves, the tap follows."""
        p = self.params
        k = self.bin
        b_end = (k + 1) * BIN_US
        volume = self.litres - self.bin_start_litres
        mid = b_end - BIN_US // 2
        mass = self.future_mass.pop(k, 0.0)
        # what this bin showed (the values that held during it)
        self.bins_done += 1
        if BAND_MGL[0] <= self.tap <= BAND_MGL[1]:
            self.bins_in_band += 1
        self.outlet_max = max(self.outlet_max, self.outlet)
        self.tap_min, self.tap_max = min(self.tap_min, self.tap), max(self.tap_max, self.tap)
        stagnant = math.exp(-p["k_tank_per_h"] * _BIN_H)
        if volume > 0:
            strength = self._strength(mid)
            if strength > 0:
                self.ideal_ml_per_mgl += volume / strength
            parcel = [k, volume, self._demand(mid), mid, mass, None]
            self.tank.append(parcel)
            self.live[k] = parcel
            n = self._tank_bins()
            popped = None
            while len(self.tank) > n - 1:
                popped = self.tank.popleft()
                self.live.pop(popped[0], None)
                if popped[5] is not None:           # water from before time 0: steady state
                    residual = popped[5]
                    self.mixed = self.last_dose = residual + popped[2]
                else:
                    dose = popped[4] / popped[1]
                    mix_s = p["mixing_s"]
                    self.mixed += (dose - self.mixed) * (1 - math.exp(-BIN_US / (mix_s * _US)) if mix_s > 0 else 1)
                    self.last_dose = dose
                    residual = max(0.0, self.mixed - popped[2])
            if popped is not None:
                residence_h = (b_end + BIN_US // 2 - popped[3]) / 3600e6
                self.outlet = residual * math.exp(-p["k_tank_per_h"] * residence_h)
            else:                                       # the tank grew (a longer dead time): nothing leaves
                self.outlet *= stagnant
        else:
            self.mass_lost_mg += mass
            self.outlet *= stagnant
        self.net.append(self.outlet)
        m = self._net_bins()
        while len(self.net) > m:
            self.tap_src = self.net.popleft()
        self.tap = self._tap_of(self.tap_src)
        # the next bin
        self.bin = k + 1
        self.bin_start_litres = self.seg_litres = self.litres
        self.seg_t_us = b_end
        self.q = self._flow(self.bin)

    def _sample(self, out):
        """One sample of the analyser and the transmitters, at self.next_sample_us."""
        p = self.params
        t = self.next_sample_us
        self.next_sample_us = t + max(1, int(p["analyzer_period_s"] * _US))
        noise = self.rng_analyzer.gauss(0.0, 1.0) * p["analyzer_noise_mgl"]
        fault = self._fault(t)
        if fault == 1:
            self.an_uv = _ma_uv(2.0)
        elif fault == 2:
            self.an_uv = _ma_uv(22.0)
        elif fault != 3:
            mgl = self.outlet + noise + p["analyzer_drift_mgl_per_day"] * t / 86400e6 + p["analyzer_offset_mgl"]
            self.an_uv = _ma_uv(_loop_ma(mgl, p["analyzer_range_mgl"]))
        self.flow_uv = _ma_uv(_loop_ma(self.q, p["flow_range_lps"]))
        self.tank_uv = _ma_uv(_loop_ma(self.tank_ml / 1000, p["tank_l"]))
        for gpio, uv in ((self.pin_residual, self.an_uv), (self.pin_flow_adc, self.flow_uv),
                         (self.pin_tank_adc, self.tank_uv)):
            if gpio is not None:
                out.append((t, gpio, ANALOG, uv))

    def events_until(self, until_us):
        out = []
        p = self.params
        self._check_refill()
        if self._dirty:
            self._dirty = False
            self.q = self._flow(self.bin)
        while self.t_us < until_us or self.next_sample_us <= until_us:
            q = self.q
            boundary = (self.bin + 1) * BIN_US
            cross = math.inf
            if q > 0:
                cross = self.seg_t_us + max(1, math.ceil((self.next_litres - self.seg_litres) / q * _US))
                cross = max(cross, self.t_us)
            step = min(boundary, cross, self.next_sample_us, until_us)
            self.t_us = step
            self.litres = self.seg_litres + q * (step - self.seg_t_us) / _US
            if step == boundary:
                self._close_bin()
            elif step == cross:                 # this crossing and the next ones before anything else
                half = p["flow_l_per_pulse"] * 0.5
                limit = min(boundary - 1, self.next_sample_us, until_us)
                seg_t, seg_litres, pin = self.seg_t_us, self.seg_litres, self.pin_flow
                level, target = self.flow_level, self.next_litres
                while True:
                    level = 1 - level
                    if level == 0:
                        self.pulses += 1
                    if pin is not None:
                        out.append((cross, pin, LEVEL, level))
                    self.t_us, self.litres = cross, target
                    target += half
                    cross = max(seg_t + max(1, math.ceil((target - seg_litres) / q * _US)), cross)
                    if cross > limit:
                        break
                self.flow_level, self.next_litres = level, target
            elif step == self.next_sample_us:
                self._sample(out)
            elif step >= until_us:
                break
        caused = False
        while self.pending and self.pending[0][0] <= until_us:
            t, _seq, gpio, what, value = heapq.heappop(self.pending)
            caused = True
            if what == "low":
                if value != self.low_level:
                    self.low_level = value
                    out.append((t, gpio, LEVEL, value))
            elif value == 0:
                self.fb_depth += 1
                if self.fb_depth == 1:
                    self.feedback_pulses += 1
                    out.append((t, gpio, LEVEL, 0))
            else:
                self.fb_depth -= 1
                if self.fb_depth == 0:
                    out.append((t, gpio, LEVEL, 1))
        if caused:
            out.sort(key=lambda e: e[0])
        return out

    def rebase(self):
        self.seg_t_us, self.seg_litres = self.t_us, self.litres
        self._dirty = True

    def levels(self):
        out = {}
        for gpio, level in ((self.pin_flow, self.flow_level), (self.pin_low, self.low_level),
                            (self.pin_feedback, 0 if self.fb_depth else 1)):
            if gpio is not None:
                out[gpio] = level
        return out

    def analog_levels(self):
        """The analog inputs' current microvolts (levels() holds the digital ones only)."""
        out = {}
        for gpio, uv in ((self.pin_residual, self.an_uv), (self.pin_flow_adc, self.flow_uv),
                         (self.pin_tank_adc, self.tank_uv)):
            if gpio is not None:
                out[gpio] = uv
        return out

    # -- the board's outputs ---------------------------------------------------------
    def on_output(self, t_us, gpio, level):
        level = 1 if level else 0
        if gpio == self.pin_enable:
            if self.first_enable_write:         # the first thing a board drives after its reset
                self.first_enable_write = False
                if level:
                    self.unsafe_starts += 1
                else:
                    self.safe_starts += 1
            self.pump_en = level
        elif gpio == self.pin_stroke:
            if level and not self.stroke_level and self.pump_en:
                self._stroke(t_us)
            self.stroke_level = level

    def on_reset(self, t_us):
        """The board resets: its outputs float and the relay's pull-down switches the pump off."""
        self.pump_en = 0
        self.stroke_level = 0
        self.first_enable_write = True

    def _stroke(self, t_us):
        p = self.params
        self._check_refill()
        self.strokes += 1
        if self.last_stroke_us is not None:
            gap = t_us - self.last_stroke_us
            self.min_stroke_gap_us = gap if self.min_stroke_gap_us is None else min(self.min_stroke_gap_us, gap)
        self.last_stroke_us = t_us
        if p["feedback_fail"] or self.tank_ml <= 0:
            self.strokes_dry += 1
            return
        noise = self.rng_stroke.uniform(-1.0, 1.0) * p["stroke_noise_pct"]
        volume = p["stroke_ml"] * (1 + p["stroke_error_pct"] / 100) * (1 + noise / 100)
        volume = max(0.0, min(volume, self.tank_ml))
        self.tank_ml -= volume
        self.solution_ml += volume
        mass = volume * self._strength(t_us)
        k = int(t_us) // BIN_US
        if k >= self.bin:
            self.future_mass[k] = self.future_mass.get(k, 0.0) + mass
        elif k in self.live:
            self.live[k][4] += mass
        else:                                     # its water has left the contact tank already
            self.mass_lost_mg += mass
        delay_us = int(p["feedback_delay_ms"] * 1000)
        self._push(t_us + delay_us, self.pin_feedback, "fb", 0)
        self._push(t_us + delay_us + max(1, int(p["feedback_ms"] * 1000)), self.pin_feedback, "fb", 1)
        self._set_low(t_us)

    # -- the truth -------------------------------------------------------------------
    def truth(self, t_us=None):
        """What really happened, at the world's own time (the t_us in the answer).

        An earlier t_us is answered for the world's own time too: strokes reach the
        world through on_output, which only lags the world, and the world's figures
        between its bins are not kept. Share, minimum and maximum are over the
        finished 10 s bins and the current value."""
        bins = self.bins_done + 1
        in_band = self.bins_in_band + (1 if BAND_MGL[0] <= self.tap <= BAND_MGL[1] else 0)
        p = self.params
        return {
            "t_us": self.t_us,
            "strokes": self.strokes,
            "strokes_dry": self.strokes_dry,
            "solution_ml": round(self.solution_ml, 6),
            "tank_l": round(self.tank_ml / 1000, 6),
            "tank_low": self.low_state == 0,
            "strength_gpl": round(self._strength(self.t_us), 6),
            "flow_litres": round(self.litres, 6),
            "flow_pulses": self.pulses,
            "flow_lps": round(self.q, 6),
            "demand_mgl": round(self._demand(self.t_us), 6),
            "dose_mgl": round(self.last_dose, 6),
            "outlet_mgl": round(self.outlet, 6),
            "tap_mgl": round(self.tap, 6),
            "outlet_max_mgl": round(max(self.outlet_max, self.outlet), 6),
            "tap_min_mgl": round(min(self.tap_min, self.tap), 6),
            "tap_max_mgl": round(max(self.tap_max, self.tap), 6),
            "tap_in_band_share": round(in_band / bins, 6),
            "ideal_solution_ml_per_mgl": round(self.ideal_ml_per_mgl, 6),
            "chlorine_lost_mg": round(self.mass_lost_mg, 6),
            "analyzer_mgl": round((self.an_uv / _SHUNT_UV_PER_MA - 4) / 16 * p["analyzer_range_mgl"], 6),
            "feedback_pulses": self.feedback_pulses,
            "pump_enabled": self.pump_en,
            "safe_starts": self.safe_starts,        # resets after which the board drove the pump off first
            "unsafe_starts": self.unsafe_starts,    # ... drove it on first (a defect)
            # the shortest time between two strokes the pump made (None: fewer than two): below
            # 60 / max_spm the board broke its hard limit
            "min_stroke_gap_s": None if self.min_stroke_gap_us is None else round(self.min_stroke_gap_us / 1e6, 6),
        }


MODELS = (ChlorinePlant,)
ACTIVITY = ("chlorine_plant", "forced_flow_lps", 20.0)   # constant plant flow keeps the doser stroking
TRUTH = ("chlorine_plant", "strokes")                    # the strokes the pump really made


# The hard limits a simulated doser is commissioned with (`prapa site`, the test rigs): a small
# plant's pump (0.5 mL strokes, 120 strokes/min at most), 3 mg/L at most, 40 L of solution a day, a
# residual ceiling of 2 mg/L at the analyser. The world's defaults match the board's config defaults
# (analyser 0-5 mg/L, flow transmitter 0-50 L/s, 10 L per flowmeter pulse, 120 g/L, 0.5 mL strokes).
SITE_LIMITS = {"max_spm": 120, "max_dose_mgl": 3.0, "max_l_day": 40.0, "ceiling_mgl": 2.0}
# The doser config this plant wants: residual 0.5 mg/L at the analyser (the far tap then sits mid-band:
# 0.2-0.5 mg/L at the tap is 0.28-0.69 at the plant), the trim allowed to +/-80 % of the 1.5 mg/L
# feed-forward dose (the raw water's demand runs from 1.0 to 2.0 mg/L in rain, profile 2), once per
# contact-tank dead time.
PLANT_SECTION = {"target_mgl": 0.5, "trim_pct": 80, "dead_time_s": 600}


def site_board(n):
    """(doser config, world overrides) for the n-th doser of `prapa site`: a plant on its daily profile,
    its analyser's residual target at the plant such that the far tap stays in 0.2-0.5 mg/L. Its
    hypochlorite tank is nearly empty (0.1 L above the low switch): within a minute or two of a site
    at 60x the tank_low interlock stops the pump and shows on the status page as an alarm."""
    return dict(PLANT_SECTION, interval_min=1), ["chlorine_plant.tank_start_l=20.1"]
