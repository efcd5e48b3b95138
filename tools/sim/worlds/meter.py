"""Water through a household meter, and the reed contact that reports it.

Flow is a leak (constant) plus tap draws that start at random, more often in
the morning and evening, each at `draw_lpm` for an exponential time. The reed
contact closes (pulls the input low) once per `litres_per_pulse` and opens
half a pulse later; every transition bounces a random number of times within
`bounce_max_us`, as a worn reed switch does. A shut main valve
(`shut_from_s`..`shut_to_s`, world time) stops all flow. `forced_lpm` >= 0 replaces the
profile with a constant flow, for tests that need an exact rate.
"""

import collections
import math

# Relative likelihood of a draw starting, per local hour (0-23).
DIURNAL = (0.2, 0.1, 0.1, 0.1, 0.2, 0.6, 1.6, 2.2, 1.8, 1.2, 1.0, 1.0,
           1.2, 1.0, 0.9, 0.9, 1.0, 1.4, 1.9, 2.0, 1.6, 1.1, 0.7, 0.4)
_US = 1_000_000


class FlowMeter:
    NAME = "flow_meter"
    ROLES = ("meter",)
    PARAMS = {
        "litres_per_pulse": (1.0, "L/pulse", "the meter's K-factor: litres per reed closure"),
        "daily_litres": (600.0, "L/day", "mean daily consumption of the household"),
        "draw_lpm": (8.0, "L/min", "flow while a tap draw is open"),
        "mean_draw_min": (2.5, "min", "mean length of a tap draw"),
        "leak_lpm": (0.0, "L/min", "constant leak through the meter (0: none)"),
        "forced_lpm": (-1.0, "L/min", "constant flow instead of the daily profile (-1: off)"),
        "shut_from_s": (-1.0, "s", "the main valve is shut from this world time on (-1: never): no flow at all"),
        "shut_to_s": (-1.0, "s", "and open again from this world time on"),
        "start_hour": (6.0, "h", "local time of day when the world starts"),
        "bounce_max_us": (5000.0, "us", "contact bounce lasts at most this long after a transition"),
        "bounce_flips_max": (3.0, "count", "at most this many extra open/close flips per transition"),
        "closed_fraction": (0.5, "ratio", "share of a pulse's volume during which the contact is closed"),
    }

    def __init__(self, params, pins, rng):
        self.params = params
        self.gpio = pins["pulse_in"]
        self.rng = rng
        self.t_us = 0
        self.litres = 0.0
        self.seg_t_us = 0              # start of the current constant-flow segment
        self.seg_litres = 0.0          # volume at that start: crossings are computed from it,
                                       # so events do not depend on how the bench slices time
        self.level = 1                 # pulled up: contact open
        self.pulses = 0                # true closures, the count a perfect counter gets
        self.closures = collections.deque(maxlen=100_000)   # their times, to answer truth(t_us)
        self.next_litres = params["litres_per_pulse"]
        self.draw_until_us = 0
        self.next_draw_us = self._schedule_draw(0)

    # -- flow -------------------------------------------------------------
    def _hour(self, t_us):
        return (self.params["start_hour"] + t_us / 3600e6) % 24

    def _schedule_draw(self, after_us):
        p = self.params
        draws_per_day = p["daily_litres"] / max(p["draw_lpm"] * p["mean_draw_min"], 1e-9)
        peak_rate_per_us = draws_per_day * max(DIURNAL) / sum(DIURNAL) * 24 / 86400e6
        t = after_us
        for _ in range(100000):   # thinning of a non-homogeneous Poisson process
            t += int(self.rng.expovariate(peak_rate_per_us)) + 1
            if self.rng.random() * max(DIURNAL) <= DIURNAL[int(self._hour(t))]:
                return t
        return t

    def _shut(self):
        """(from_us, to_us) of the main valve's shut window, or None."""
        p = self.params
        if p["shut_from_s"] < 0 or p["shut_to_s"] <= p["shut_from_s"]:
            return None
        return int(p["shut_from_s"] * _US), int(p["shut_to_s"] * _US)

    def flow_lps(self, t_us):
        p = self.params
        shut = self._shut()
        if shut is not None and shut[0] <= t_us < shut[1]:
            return 0.0
        if p["forced_lpm"] >= 0:
            return p["forced_lpm"] / 60
        drawing = t_us < self.draw_until_us
        return (p["leak_lpm"] + (p["draw_lpm"] if drawing else 0)) / 60

    def _next_flow_change(self):
        edges = [e for e in (self._shut() or ()) if e > self.t_us]      # the valve shutting or opening
        if self.params["forced_lpm"] < 0:
            edges.append(max(self.t_us, self.draw_until_us if self.t_us < self.draw_until_us else self.next_draw_us))
        return min(edges, default=math.inf)

    def _flow_change(self, t_us):
        if t_us >= self.next_draw_us and t_us >= self.draw_until_us:
            minutes = self.rng.expovariate(1 / self.params["mean_draw_min"])
            self.draw_until_us = t_us + int(minutes * 60 * _US)
            self.next_draw_us = self._schedule_draw(self.draw_until_us)

    # -- the contact --------------------------------------------------------
    def _transition(self, t_us, level, out):
        """Emit a transition to `level` at t_us with contact bounce after it."""
        p = self.params
        out.append((t_us, self.gpio, 1, level))
        flips = self.rng.randint(0, int(p["bounce_flips_max"]))
        if flips and p["bounce_max_us"] > 0:
            times = sorted(self.rng.sample(range(1, int(p["bounce_max_us"])), 2 * flips))
            for i, dt in enumerate(times):
                out.append((t_us + dt, self.gpio, 1, level if i % 2 else 1 - level))
        self.level = level

    def events_until(self, until_us):
        out = []
        p = self.params
        while True:
            flow = self.flow_lps(self.t_us)
            change = self._next_flow_change()
            cross = math.inf
            if flow > 0:
                cross = self.seg_t_us + max(1, math.ceil((self.next_litres - self.seg_litres) / flow * _US))
                cross = max(cross, self.t_us)
            step_to = min(cross, change, until_us)
            self.t_us = step_to
            self.litres = self.seg_litres + flow * (step_to - self.seg_t_us) / _US
            if step_to == cross:
                self.litres = self.next_litres
                if self.level == 1:
                    self.pulses += 1
                    self.closures.append(self.t_us)
                    self._transition(self.t_us, 0, out)
                    self.next_litres += p["litres_per_pulse"] * p["closed_fraction"]
                else:
                    self._transition(self.t_us, 1, out)
                    self.next_litres += p["litres_per_pulse"] * (1 - p["closed_fraction"])
            elif step_to == change:
                self.seg_t_us, self.seg_litres = self.t_us, self.litres
                self._flow_change(self.t_us)
            if step_to >= until_us:
                return out

    def rebase(self):
        self.seg_t_us, self.seg_litres = self.t_us, self.litres

    def levels(self):
        return {self.gpio: self.level}

    def on_output(self, t_us, gpio, level):
        pass

    def truth(self, t_us=None):
        pulses = self.pulses
        if t_us is not None and t_us < self.t_us:
            for t in reversed(self.closures):
                if t <= t_us:
                    break
                pulses -= 1
        return {"litres": round(self.litres, 6), "pulses": pulses, "t_us": self.t_us if t_us is None else t_us,
                "flow_lpm": round(self.flow_lps(self.t_us) * 60, 6)}


MODELS = (FlowMeter,)
ACTIVITY = ("flow_meter", "forced_lpm", 6.0)    # the knob that makes the sensor busy, and a busy value
TRUTH = ("flow_meter", "pulses")                # what the board's counter should have counted


def site_board(n):
    """(meter config, world overrides) for the n-th meter of `prapa site`. Every third has a burst
    main: 12 L/min without pause, a burst alarm after two minutes, so the status page shows an alarm
    early; the others are households of different sizes."""
    if n % 3 == 2:
        return {"interval_min": 1, "burst_lpm": 5, "burst_min": 2}, ["flow_meter.forced_lpm=12"]
    return {"interval_min": 1}, [f"flow_meter.daily_litres={600 + 300 * n}"]
