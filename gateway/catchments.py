"""Rain shared per catchment: drains with a gauge tell the gateway it rains, the others are told.

A drain board without a rain gauge cannot tell a rise after rain from a rise with none (a blocked
drain), nor when to sample at its wet pace; its catchment's gauges can. The rule, per catchment
(a device's registry place):

- A gauge is a device whose newest reading carries its spec's STATE_HAS_GAUGE bit in its state
  field. Its rain (RAIN_FIELD) of the readings taken in the last window_s (RAIN_WINDOW_S) gives its
  intensity: mm in the window x 3600 / window_s, in mm/h.
- The catchment rains while any of its gauges saw rain in the window; its intensity is the highest
  of its gauges' (a storm cell over one gauge is rain for the whole catchment). A gauge whose last
  reading came more than window_s ago (gateway time) is dry: it says nothing.
- The told: devices of the catchment whose role declares the COMMAND ("rain") in its spec's
  COMMANDS and whose newest reading lacks the gauge bit (a device not heard yet is not told: its
  gauge is not known).
- Each is sent rain {"mm_h": intensity x 10, "for_s": its spec's RAIN_HOLD_S} when the catchment
  starts raining (or when it joins a raining catchment), again every RAIN_HOLD_S / 2 while it rains
  (the board holds the rain for_s, so a lost refresh is covered), and once {"mm_h": 0, ...} when it
  stops. The caller queues them (gateway/service.py: the store's downlink queue, each replacing that
  device's older open rain command).

Time: the window and the refreshes run on the catchment's clock, the newest wall time of its
devices' readings or the gateway's, whichever is later. On a real site these are the same; a
simulated site whose boards run faster than real time (prapa site, the end-to-end tests) shares its
rain in the boards' time, the time their for_s holds are counted in.

Events are logged as one JSON object each: rain_started, rain_stopped (per catchment) and
rain_shared (the devices told, and why). Pure state in memory: a restarted gateway finds the
rain again from the next gauge readings and tells the boards anew; a board whose hold ran out
meanwhile is dry, which is what it would have been told.
"""

import collections
import logging
import math
from functools import partial

from gateway.forward_format import device_hex
from gateway.logs import log_event
from protocol.roles import catalog as roles

RAIN_WINDOW_S = 600               # the last 10 minutes
RAIN_FIELD = "rain_mm"            # rain since the previous sample, mm
STATE_FIELD = "state"             # the row's state bits
COMMAND = "rain"
MM_H_X10_MAX = 65535              # the intensity travels x 10 in a u16

log = logging.getLogger("prapa.gateway.catchments")
_log = partial(log_event, log)


def is_gauge(role, fields):
    """The device's reading says it has a rain gauge of its own (its spec's STATE_HAS_GAUGE bit)."""
    bit = roles.attr(role, "STATE_HAS_GAUGE") if role else None
    state = (fields or {}).get(STATE_FIELD)
    return bool(bit) and isinstance(state, int) and bool(state & bit)


def told_rain(role):
    """The role's boards take the rain command (it is among their spec's COMMANDS)."""
    return bool(role) and COMMAND in (roles.attr(role, "COMMANDS") or ())


def _number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class RainSharing:
    def __init__(self, window_s=RAIN_WINDOW_S):
        self.window_s = window_s
        self._rain = {}               # gauge device -> deque of (wall_t, rain mm)
        self._arrived = {}            # gauge device -> gateway time its last reading came
        self._told = {}               # device -> (mm_h x 10, catchment time sent): what it was last told
        self._raining = {}            # catchment -> True while it rains
        self.state = {}               # catchment -> {"raining", "rain_mm_h", "gauges"}, as of the last tick

    def observe(self, device_id, role, wall_t, fields, arrived):
        """A reading of a device (its wall time, its fields) that came at `arrived` (gateway time): a
        gauge's rain is kept for the window."""
        if not _number(wall_t) or not is_gauge(role, fields):
            return
        mm = fields.get(RAIN_FIELD)
        self._rain.setdefault(device_id, collections.deque(maxlen=4096)).append(
            (wall_t, mm if _number(mm) and mm > 0 else 0))
        self._arrived[device_id] = arrived

    def intensity_mm_h(self, device_id, clock, now):
        """A gauge's rain over the window ending at `clock` (its catchment's time), mm/h; 0.0 when dry,
        with no reading in the window, or when its last reading came before now - window_s."""
        window = self._rain.get(device_id)
        if not window or self._arrived.get(device_id, now) < now - self.window_s:
            return 0.0
        while window and window[0][0] <= clock - self.window_s:
            window.popleft()
        return sum(mm for t, mm in window if t <= clock) * 3600 / self.window_s

    def tick(self, now, devices):
        """What to send now: [(device_id, args)], args {"mm_h": x 10, "for_s": s}.

        devices: [{"id", "role", "catchment", "fields", "wall_t"}], fields and wall_t the newest reading's (or
        None); a device of no catchment shares nothing. now: the gateway's time."""
        gauges, told = collections.defaultdict(list), collections.defaultdict(list)
        clocks = collections.defaultdict(lambda: now)
        for d in devices:
            catchment = d.get("catchment")
            if not catchment:
                continue
            if _number(d.get("wall_t")):
                clocks[catchment] = max(clocks[catchment], d["wall_t"])
            if is_gauge(d.get("role"), d.get("fields")):
                gauges[catchment].append(d["id"])
            elif d.get("fields") and told_rain(d.get("role")):
                told[catchment].append(d)
        sends, state = [], {}
        for catchment in sorted(set(gauges) | set(told) | set(self._raining)):
            clock = clocks[catchment]
            mm_h = max((self.intensity_mm_h(g, clock, now) for g in gauges.get(catchment, ())), default=0.0)
            raining = mm_h > 0
            was = self._raining.get(catchment, False)
            state[catchment] = {"raining": raining, "rain_mm_h": round(mm_h, 1),
                                "gauges": len(gauges.get(catchment, ()))}
            if raining and not was:
                _log(logging.INFO, "rain_started", catchment=catchment, mm_h=round(mm_h, 1),
                     gauges=[device_hex(g) for g in gauges[catchment]])
            elif was and not raining:
                _log(logging.INFO, "rain_stopped", catchment=catchment)
            if raining:
                self._raining[catchment] = True
            else:
                self._raining.pop(catchment, None)
            x10 = min(MM_H_X10_MAX, max(1, round(mm_h * 10))) if raining else 0
            out = []
            for d in told.get(catchment, ()):
                hold = int(roles.attr(d["role"], "RAIN_HOLD_S") or 1800)
                before = self._told.get(d["id"])
                if raining:
                    due = before is None or before[0] == 0 or clock - before[1] >= hold / 2
                elif before is not None and before[0] > 0:
                    due = True
                else:
                    due = False
                if due:
                    self._told[d["id"]] = (x10, clock)
                    out.append((d["id"], {"mm_h": x10, "for_s": hold}))
            if out:
                why = "stopped" if not raining else "started" if not was else "refresh"
                _log(logging.INFO, "rain_shared", catchment=catchment, mm_h=x10 / 10, why=why,
                     devices=[device_hex(i) for i, _ in out])
            sends += out
        known = {d["id"] for d in devices}
        for table in (self._told, self._rain, self._arrived):
            for device_id in [i for i in table if i not in known]:
                del table[device_id]
        self.state = state
        return sends
