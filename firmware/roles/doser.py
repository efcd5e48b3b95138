# The chlorine doser's board logic: strokes of a solenoid metering pump in
# proportion to the plant's flow, trimmed on the free-chlorine residual, with
# hard limits and interlocks that hold whatever arrives over the link. What the
# role is (config schema, limits schema, alarm codes, wire encoding) is declared
# in its spec, protocol/roles/doser.py; this module only does the work.
#
# Control, once per control period (the runtime's sample_ms, board time):
#   feed-forward  strokes/L = dose [mg/L] / (strength [mg/mL] x stroke [mL])
#   trim          strokes/L x (1 + trim), trim = kp x e + ki x sum(e), bounded to
#                 +/- trim_pct; e = target - mean residual [mg/L] over the last
#                 dead time. The trim is updated once per contact-tank dead time
#                 (dead_time_s): the residual it sees is the answer to the dose
#                 of one dead time ago, so a faster loop would only oscillate.
#                 Anti-windup: the integral does not grow while the output is
#                 at its bound in the error's direction, and is itself bounded.
#   never above   max_dose_mgl of the limits, whatever the trim.
#   strokes       every litre of water adds strokes/L to a credit (units of
#                 1/65536 stroke, carried across periods, intervals, link
#                 outages and GC; a planned reboot saves it); each whole stroke
#                 of credit is owed and made once, one pulse per period at most
#                 and never closer than 60/max_spm s. A backlog beyond 10 s of
#                 the pump's maximum rate is dropped, counted and alarmed as
#                 dose_limited (the pump is too small for the flow x dose).
#
# Interlocks stop the pump within one control period (pump_enable low, no
# strokes, no credit accrues) and raise their alarm:
#   interlock               stops when                          clears
#   no_flow                 no flow for no_flow_s               by itself, when flow returns
#   residual_high           residual above ceiling_mgl          operator: reset_interlock, once below
#   tank_low                the tank's low switch closes        by itself, 60 s after it opens
#   no_stroke_feedback      feedback_misses strokes unanswered  operator: reset_interlock
#   daily_volume            max_l_day reached in 24 h running   by itself, when the 24 h window rolls
#   analyzer_fallback_over  analyser fault for fallback_s       by itself, when the analyser is good
# An analyser fault (below 3.6 mA or above 21 mA, NAMUR NE 43, or a signal
# flat within flat_ua for flat_s) raises analyzer_fault and does not stop the
# pump at once: it doses on flow at the last good trim for fallback_s, then
# stops. The residual ceiling is judged on a good analyser only.
#
# Safety that no message can touch:
# - The hard limits are /doser_limits.json, written over USB at commissioning;
#   without them, or with a config beyond them, the role does not start (the
#   runtime stays idle with the pump off) and a pushed config beyond them is
#   refused with the field and the limit.
# - The daily allowance is per 24 h of the board's running time (no clock can
#   refresh it) and is reserved on flash before strokes use it: after a cut
#   the board resumes from the reservation, so a reboot loop never gets a
#   fresh allowance and the counter never goes backwards.
# - boot.py drives pump_enable and stroke_out low before anything runs.
#
# The timer path (sample) works in small ints only and allocates nothing; the
# stroke register passes 2**30 in principle, so the timer counts a wrapping
# handover and service() (asyncio) keeps the total, as the meter does.
import json
import struct

from micropython import const

import persist
from flashlog import K_DAILY, K_READING, REC, Record
from protocol import messages as M
from protocol.errors import ConfigError
from protocol.framing import crc16
from protocol.roles import doser as spec
from protocol.roles.doser import (A_ANALYZER, A_DAILY_VOLUME, A_DOSE_LIMITED, A_FALLBACK_OVER, A_NO_FEEDBACK,
                                  A_NO_FLOW, A_RESIDUAL_HIGH, A_TANK_LOW, ALARMS, EXTRA_BYTES, EXTRA_FORMAT,
                                  NO_RESIDUAL)
from ticks import PERIOD_MASK, wadd, wdiff

STATE = "doser.state"
# total strokes, register at the open interval's and day's start, credit (1/65536 stroke), owed strokes
# (kept after a planned stop only), trim integral, day allowance reserved (strokes), window running s,
# clean-stop flag, CRC-16
_STATE = "<IIIIIiIIBxH"
_STATE_BYTES = const(36)
_UNIT = const(65536)             # credit per stroke
_CHUNK_ML = const(4096)          # water per credit step: 4096 x strokes/L x 65536 stays below 2**29
_RING = const(8)
_NEVER = const(0x3FFFFFFF)
_DAY_S = const(86400)
_TANK_CLEAR_S = const(60)
_NAMUR_LOW_UA = const(3600)
_NAMUR_HIGH_UA = const(21000)
_UA_SPAN = const(16000)          # 4..20 mA
_Q12 = const(4096)               # trim in 1/4096 of the dose
_BIT = (0, 1, 2, 4, 8, 16, 32, 64, 128)
_ST_DOSING = const(0)
_ST_FALLBACK = const(1)
_ST_STOPPED = const(2)


def load_limits():
    """The hard limits from /doser_limits.json, checked; ConfigError names what is wrong and the fix."""
    raw = persist.read(spec.LIMITS_PATH)
    if raw is None:
        raise ConfigError(spec.LIMITS_PATH, "missing: the pump's hard limits are not on this board",
                          "commission it over USB: prapa commission --role doser --limits FILE")
    try:
        limits = json.loads(raw)
    except ValueError:
        raise ConfigError(spec.LIMITS_PATH, "is not valid JSON", "commission the limits again over USB")
    return spec.check_limits_file(limits)


class Doser:
    def __init__(self, hal, cfg, sink):
        self.hal = hal
        self.sink = sink
        self.cfg = cfg
        self.limits = load_limits()
        spec.check_limits(cfg, self.limits)
        pins = hal.board["role_pins"]
        self.enable = hal.pin_out(pins["pump_enable"], 0)
        self.stroker = hal.stroke_output(pins["stroke_out"], cfg["stroke_ms"])
        lim = self.limits
        # -- flow: mL per pulse, or the transmitter's 20 mA flow in cL/s
        self.pulse_flow = cfg["flow_input"] == "pulse"
        if self.pulse_flow:
            self.flow_in = hal.counter(pins["flow_pulse_in"], active_level=0, filter_us=0)
            self.flow_last = self.flow_in.count()
        else:
            self.flow_in = hal.adc(pins["flow_adc"])
            self.flow_last = 0
        self.k_ml = int(round(cfg["flow_k_l"] * 1000))
        self.pulses_max = max(1, min(1000, (1 << 29) // self.k_ml))   # pulses a period, so d x k_ml stays small
        self.fmax_cls = int(round(cfg["flow_max_lps"] * 100))
        self.no_flow_s = cfg["no_flow_s"]
        self.residual_in = hal.adc(pins["residual_adc"])
        self.tank_in = hal.pin_in(pins["tank_low_in"])
        self.fb_in = hal.counter(pins["stroke_feedback_in"], active_level=0) if cfg["feedback"] else None
        self.fb_last = self.fb_in.count() if self.fb_in else 0
        self.fb_misses = cfg["feedback_misses"]
        self.shunt = cfg["shunt_ohm"]
        self.range_ugl = int(round(cfg["analyzer_max_mgl"] * 1000))
        self.ceiling_ugl = int(round(lim["ceiling_mgl"] * 1000))
        self.target_ugl = int(round(cfg["target_mgl"] * 1000))
        self.flat_s, self.flat_ua, self.fallback_s = cfg["flat_s"], cfg["flat_ua"], cfg["fallback_s"]
        # -- dose: strokes per litre x 65536, its bound from max_dose_mgl; the trim
        self.base_per_l = spec.per_litre(cfg, cfg["dose_mgl"], _UNIT)
        self.max_per_l = min(1 << 17, spec.per_litre(cfg, lim["max_dose_mgl"], _UNIT))
        self.trim_max = cfg["trim_pct"] * _Q12 // 100
        self.kp, self.ki = cfg["kp_pct"], cfg["ki_pct"]
        self.dead_s = cfg["dead_time_s"]
        self.min_gap_ms = 60000 // lim["max_spm"]
        self.backlog_max = max(2, lim["max_spm"] // 6)
        self.day_allow = spec.strokes_for(cfg, lim["max_l_day"])
        # reserved on flash ahead of use: at most 1 % of the day or two minutes at the pump's full rate,
        # which a cut (a reboot loop) costs the day's allowance each time
        self.reserve_chunk = max(10, min(self.day_allow // 100, 2 * lim["max_spm"]))
        self.stroke_cml = int(round(cfg["stroke_ml"] * 100))
        self.interval_s = cfg["interval_min"] * 60
        self.ckpt_strokes = cfg["checkpoint_strokes"]
        self.state_buf = bytearray(_STATE_BYTES)
        self.acc = 0                    # strokes made, wrapping handover to service()
        self.acc_seen = 0
        self._recover()
        self.per_l = self._dose_per_l()
        # -- timer state: small ints only
        self.last_ms = hal.ticks_ms()
        self.last_s = 0
        self.unsaved = 0
        self.ckpt_due = 0
        self.credit_rem = 0             # credit x 1000 below one unit (water x strokes/L / 1000)
        self.last_stroke_ms = wadd(self.last_ms, -self.min_gap_ms)
        self.strokes_fb_due = 0
        self.flow_pulses = 0
        self.no_flow_run = 0            # seconds without flow
        self.flow_seen = 0
        self.ua = 0
        self.residual = 0               # ug/L, last good
        self.analyzer_ok = 1
        self.raw_ok = 1                 # this period's sample is a live 4-20 mA signal
        self.bad_s = 0                  # seconds of bad samples in a row (3 make a fault)
        self.fault_s = 0                # seconds of the current analyser fault
        self.flat_lo = 0
        self.flat_hi = -1
        self.flat_since = 0
        self.pi_sum = 0
        self.pi_n = 0
        self.pi_next = self.dead_s
        self.tank_low = 0
        self.tank_ok_s = 0
        self.shortfall = 0
        self.short_run = 0
        self.running = 1                # 0 after shutdown(): nothing strokes
        self.state = _ST_STOPPED
        self.want = bytearray(9)        # interlocks and warnings wanted by code; service() logs the changes
        self.active = bytearray(9)
        self.stopped = 1
        # open interval and day (ug/L-seconds for the residual mean: sampled once a second)
        self.interval_start = 0
        self.next_close = self.interval_s
        self.day_start = 0
        self.next_midnight = _NEVER
        # columns: 0 strokes, 1 water L, 2 + water mL, 3 residual min, 4 max, 5 sum (4 ug/L-s), 6 samples,
        # 7 spare, 8 s dosing, 9 s on the fallback, 10 s stopped
        self.i = [0] * 11
        self.d = [0] * 11
        self.i_mask = 0
        self.d_mask = 0
        self._open(self.i)
        self._open(self.d)
        self.i[0] = self.total - self.interval_base    # strokes after the last logged reading
        self.d[0] = self.total - self.day_base
        # closed intervals and days: one row of 11 columns + mask a slot
        self.ring = [[0] * 12 for _ in range(_RING)]
        self.ring_end = [0] * _RING
        self.ring_span = [0] * _RING
        self.ring_kind = bytearray(_RING)
        self.head = 0
        self.tail = 0
        self.ring_overruns = 0
        self.rec = Record(EXTRA_BYTES)
        self.refused = 0
        self.primed = 0

    @staticmethod
    def _open(row):
        for k in range(11):
            row[k] = 0
        row[3] = _NEVER                 # residual min

    # -- boot ---------------------------------------------------------------------------
    def _recover(self):
        total = ibase = dbase = credit = owed = integral = reserved = run_s = 0
        raw = persist.read(STATE)
        if raw and len(raw) == _STATE_BYTES:
            f = struct.unpack(_STATE, raw)
            if f[-1] == crc16(raw, 0, _STATE_BYTES - 2):
                total, ibase, dbase, credit, owed, integral, reserved, run_s, clean = f[:9]
                if not clean:
                    owed = 0            # a cut: strokes owed then may have been made since; never twice
        last = self.sink.last_reading
        if last.kind == K_READING:
            ibase = max(ibase, last.reg + last.value)
        last = self.sink.last_daily
        if last.kind == K_DAILY:
            dbase = max(dbase, last.reg + last.value)
        self.total = max(total, ibase)
        self.interval_base = ibase
        self.day_base = dbase if dbase <= self.total else ibase
        self.credit = credit % _UNIT
        self.owed = min(owed, 2)
        self.integral = max(-self.trim_max, min(self.trim_max, integral))
        self.trim = self.integral
        self.day_reserved = min(reserved, self.day_allow)
        self.day_used = self.day_reserved   # reserved strokes may have been made: count them all
        self.day_run_s = run_s
        self.checkpoint()

    def _dose_per_l(self):
        base = self.base_per_l
        p = base + (base * self.trim >> 12)
        return p if p < self.max_per_l else self.max_per_l

    def _fold(self):
        acc = self.acc
        self.total += (acc - self.acc_seen) & PERIOD_MASK
        self.acc_seen = acc

    def checkpoint(self, clean=0):
        self._fold()
        buf = self.state_buf
        struct.pack_into(_STATE, buf, 0, self.total, self.interval_base, self.day_base, self.credit,
                         self.owed if clean else 0, self.integral, self.day_reserved, self.day_run_s, clean, 0)
        c = crc16(buf, 0, _STATE_BYTES - 2)
        struct.pack_into("<H", buf, _STATE_BYTES - 2, c)
        persist.write_atomic(STATE, buf)

    # -- time -----------------------------------------------------------------------------
    def on_clock(self, up_s, local_sod):
        if local_sod < 0:
            return
        self.next_close = up_s + self.interval_s - local_sod % self.interval_s
        self.next_midnight = up_s + _DAY_S - local_sod
        if self.day_start == 0:
            self.day_start = up_s

    # -- the hard timer: no allocation -------------------------------------------------------
    def sample(self, up_s):
        now = self.hal.ticks_ms()
        dt = wdiff(now, self.last_ms)
        self.last_ms = now
        if dt > 1000:
            dt = 1000
        elif dt < 0:
            dt = 0
        ml = self._flow(dt)
        if ml:
            self._water(self.i, ml)
            self._water(self.d, ml)
        self._analyzer()
        self._feedback()
        if self.tank_in.value() == 0:
            self.tank_low = 1
            self.tank_ok_s = 0
            self.want[A_TANK_LOW] = 1
        while self.last_s < up_s:               # once a board second: timers, statistics, the trim
            self.last_s += 1
            self._second()
        w = self.want
        stop = w[A_NO_FLOW] | w[A_RESIDUAL_HIGH] | w[A_TANK_LOW] | w[A_NO_FEEDBACK] | w[A_DAILY_VOLUME] | \
            w[A_FALLBACK_OVER] | (self.running ^ 1)
        if stop != self.stopped:
            self.stopped = stop
            self.enable.value(stop ^ 1)
            if stop:
                self.owed = 0               # water that passes while stopped is not made up later
                self.stroker.off()
        if stop:
            self.state = _ST_STOPPED
            return
        self.state = _ST_FALLBACK if self.analyzer_ok == 0 else _ST_DOSING
        self._credit(ml)
        if self.owed and wdiff(now, self.last_stroke_ms) >= self.min_gap_ms and \
                self.day_used < self.day_reserved and self.stroker.pulse():
            self.last_stroke_ms = now
            self.owed -= 1
            self._stroke()

    def _flow(self, dt):
        """Water mL through the plant since the last period."""
        if self.pulse_flow:
            c = self.flow_in.count()
            d = (c - self.flow_last) & PERIOD_MASK
            self.flow_last = c
            if d > self.pulses_max:
                d = self.pulses_max
            if d:
                self.flow_seen = 1
                self.flow_pulses = wadd(self.flow_pulses, d)
            return d * self.k_ml
        ua = self.flow_in.read_uv() // self.shunt - 4000
        if ua < _UA_SPAN // 100:                    # below 1 % of the range (or a broken loop): no flow
            return 0
        self.flow_seen = 1
        frac = (ua << 10) // _UA_SPAN                # 1/1024 of the range
        q = (self.fmax_cls * frac >> 10) * dt + self.flow_last   # cL/s x ms = 1/100 mL
        self.flow_last = q % 100
        return q // 100

    @staticmethod
    def _water(row, ml):
        """Water through the plant in a series' row: whole litres + mL."""
        ml += row[2]
        row[1] += ml // 1000
        row[2] = ml % 1000

    def _credit(self, ml):
        """Water mL -> stroke credit -> whole strokes owed."""
        per_l = self.per_l
        while ml > 0:
            step = ml if ml < _CHUNK_ML else _CHUNK_ML
            ml -= step
            q = step * per_l + self.credit_rem      # < 2**29 + 1000
            self.credit += q // 1000
            self.credit_rem = q % 1000
        while self.credit >= _UNIT:
            self.credit -= _UNIT
            if self.owed < self.backlog_max:
                self.owed += 1
            else:
                self.shortfall += 1
                self.short_run = 60

    def _stroke(self):
        self.acc = wadd(self.acc, 1)
        self.i[0] += 1
        self.d[0] += 1
        self.day_used += 1
        self.strokes_fb_due += 1
        self.unsaved += 1
        if self.unsaved >= self.ckpt_strokes:
            self.ckpt_due = 1

    def _analyzer(self):
        ua = self.residual_in.read_uv() // self.shunt
        self.ua = ua
        if ua < _NAMUR_LOW_UA or ua > _NAMUR_HIGH_UA:
            self.raw_ok = 0
            self.flat_hi = -1
            return
        if self.flat_hi < 0:
            self.flat_lo = self.flat_hi = ua
            self.flat_since = self.last_s
        else:
            if ua < self.flat_lo:
                self.flat_lo = ua
            if ua > self.flat_hi:
                self.flat_hi = ua
            if self.flat_hi - self.flat_lo > self.flat_ua:
                self.flat_lo = self.flat_hi = ua
                self.flat_since = self.last_s
        if self.last_s - self.flat_since >= self.flat_s:
            self.raw_ok = 0                         # stuck: a live analyser always shows some noise
            return
        self.raw_ok = 1
        r = (ua - 4000) * self.range_ugl // _UA_SPAN
        self.residual = r if r > 0 else 0
        if self.analyzer_ok and self.residual > self.ceiling_ugl:
            self.want[A_RESIDUAL_HIGH] = 1          # latched: reset_interlock clears it

    def _feedback(self):
        if self.fb_in is None:
            return
        c = self.fb_in.count()
        d = (c - self.fb_last) & PERIOD_MASK
        self.fb_last = c
        due = self.strokes_fb_due - d
        self.strokes_fb_due = due if due > 0 else 0
        if self.strokes_fb_due > self.fb_misses:
            self.want[A_NO_FEEDBACK] = 1            # latched

    def _second(self):
        """Once a second of board time: the slow interlocks, statistics, the trim, interval ends."""
        w = self.want
        s = self.last_s
        # flow
        if self.flow_seen:
            self.flow_seen = 0
            self.no_flow_run = 0
            w[A_NO_FLOW] = 0
        else:
            self.no_flow_run += 1
            if self.no_flow_run >= self.no_flow_s:
                w[A_NO_FLOW] = 1
        # tank: stops at once (sample), clears after a minute of an open switch
        if self.tank_low and self.tank_in.value():
            self.tank_ok_s += 1
            if self.tank_ok_s >= _TANK_CLEAR_S:
                self.tank_low = 0
                w[A_TANK_LOW] = 0
        # analyser: a fault is 3 bad seconds in a row; fallback, statistics, the trim's residual
        i, d = self.i, self.d
        if self.raw_ok:
            self.bad_s = 0
            self.analyzer_ok = 1
        else:
            self.bad_s += 1
            if self.bad_s >= 3:
                self.analyzer_ok = 0
        if self.analyzer_ok:
            self.fault_s = 0
            w[A_ANALYZER] = 0
            w[A_FALLBACK_OVER] = 0
            r = self.residual
            self._stat(i, r)
            self._stat(d, r)
            self.pi_sum += r
            self.pi_n += 1
        else:
            self.fault_s += 1
            w[A_ANALYZER] = 1
            if self.fault_s > self.fallback_s:
                w[A_FALLBACK_OVER] = 1
            self.pi_n = 0                            # a dead time with a fault in it does not trim
            self.pi_sum = 0
            self.pi_next = s + self.dead_s
        if s >= self.pi_next:
            self.pi_next = s + self.dead_s
            if self.pi_n:
                self._trim(self.target_ugl - self.pi_sum // self.pi_n)
            self.pi_sum = 0
            self.pi_n = 0
        # time in each state, interlocks seen
        st = self.state
        i[8 + st] += 1
        d[8 + st] += 1
        mask = 0
        for code in spec.STOPS:
            if w[code]:
                mask |= _BIT[code]
        self.i_mask |= mask
        self.d_mask |= mask
        # the daily allowance: 24 h windows of running time
        self.day_run_s += 1
        if self.day_run_s >= _DAY_S:
            self.day_run_s = 0
            self.day_used = 0
            self.day_reserved = 0
            self.ckpt_due = 1
        w[A_DAILY_VOLUME] = 1 if self.day_used >= self.day_allow else 0
        if self.short_run:
            self.short_run -= 1
        w[A_DOSE_LIMITED] = 1 if self.short_run else 0
        if self.unsaved and s % 60 == 0:
            self.ckpt_due = 1
        # interval and day ends
        if s >= self.next_close:
            end = self.next_close
            self._close(K_READING, end, end - self.interval_start, i, self.i_mask)
            self._open(i)
            self.i_mask = 0
            self.interval_start = end
            self.next_close = end + self.interval_s
        if s >= self.next_midnight:
            end = self.next_midnight
            self._close(K_DAILY, end, end - self.day_start, d, self.d_mask)
            self._open(d)
            self.d_mask = 0
            self.day_start = end
            self.next_midnight = end + _DAY_S

    @staticmethod
    def _stat(row, r):
        """A residual sample (ug/L, once a second) into a series' min, max and sum; the sum is kept in
        units of 4 ug/L-s, so that a day of 20 mg/L stays a small int."""
        if r < row[3]:
            row[3] = r
        if r > row[4]:
            row[4] = r
        row[5] += r >> 2
        row[6] += 1

    def _trim(self, e_ugl):
        """One PI step on the residual error e (ug/L): trim in 1/4096 of the dose, bounded, anti-windup."""
        if e_ugl > 20000:
            e_ugl = 20000
        elif e_ugl < -20000:
            e_ugl = -20000
        p = (self.kp * e_ugl // 100) * _Q12 // 1000
        di = (self.ki * e_ugl // 100) * _Q12 // 1000
        lim = self.trim_max
        integral = self.integral + di
        out = p + integral
        if out > lim and di > 0:                     # saturated in the error's direction: reach the bound,
            integral = max(self.integral, lim - p)   # never wind beyond it
        elif out < -lim and di < 0:
            integral = min(self.integral, -lim - p)
        if integral > lim:
            integral = lim
        elif integral < -lim:
            integral = -lim
        self.integral = integral
        out = p + integral
        self.trim = lim if out > lim else (-lim if out < -lim else out)
        self.per_l = self._dose_per_l()

    def _close(self, kind, end, span, row, mask):
        h = self.head
        if (h + 1) % _RING == self.tail:
            self.ring_overruns += 1          # service() starved: overwrite the newest slot's end (rare)
            h = (h - 1) % _RING
        slot = self.ring[h]
        for k in range(11):
            slot[k] = row[k]
        slot[11] = mask
        self.ring_end[h] = end
        self.ring_span[h] = span
        self.ring_kind[h] = kind
        self.head = (h + 1) % _RING

    # -- asyncio: flash work ----------------------------------------------------------------
    def service(self):
        """Log what the timer closed, keep the allowance reserved, checkpoint, raise or clear alarms."""
        sink = self.sink
        while self.tail != self.head:
            t = self.tail
            slot = self.ring[t]
            kind = self.ring_kind[t]
            strokes = slot[0]
            if kind == K_DAILY:
                reg = self.day_base
                self.day_base = reg + strokes
            else:
                reg = self.interval_base
                self.interval_base = reg + strokes
            span = self.ring_span[t] or 1
            n = slot[6]
            if n:
                rmin, rmax, rmean = slot[3], slot[4], (slot[5] << 2) // n
            else:
                rmin = rmax = rmean = NO_RESIDUAL
            flow_cls = (slot[1] * 1000 + slot[2]) // (10 * span)
            r = self.rec
            struct.pack_into(EXTRA_FORMAT, r.extra, 0, strokes * self.stroke_cml, flow_cls, min(rmin, NO_RESIDUAL),
                             min(rmean, NO_RESIDUAL), min(rmax, NO_RESIDUAL), slot[8], slot[9], slot[10], slot[11],
                             min(self.ceiling_ugl, 65535))
            r.kind, r.count, r.t_end, r.span, r.value, r.reg = kind, 1, self.ring_end[t], span, strokes, reg
            sink.append(r)
            self.tail = (t + 1) % _RING
            self.ckpt_due = 1
        if self.day_reserved - self.day_used < self.reserve_chunk // 2 and self.day_reserved < self.day_allow:
            self.day_reserved = min(self.day_allow, self.day_used + self.reserve_chunk)
            self.ckpt_due = 1                        # written before the timer may use it
        if self.ckpt_due:
            self.ckpt_due = 0
            self.unsaved = 0
            self.checkpoint()
        for code in ALARMS:
            if self.want[code] != self.active[code]:
                self.active[code] = self.want[code]
                detail = self.residual if code == A_RESIDUAL_HIGH else (
                    self.ua if code == A_ANALYZER else self.day_used if code == A_DAILY_VOLUME else
                    self.shortfall if code == A_DOSE_LIMITED else 0)
                sink.alarm(code, self.active[code], detail)

    # -- requests -----------------------------------------------------------------------------
    def check_config(self, section):
        """A pushed config within the hard limits, or ConfigError naming the field and the limit."""
        spec.check_limits(section, self.limits)

    def command(self, name, args):
        if name == "reset_interlock":
            w = self.want
            if w[A_RESIDUAL_HIGH] and (not self.analyzer_ok or self.residual > self.ceiling_ugl):
                return False, "residual_high: %d ug/L is not below the ceiling %d ug/L (or the analyser is " \
                    "faulty); fix the overdose first" % (self.residual, self.ceiling_ugl)
            cleared = [ALARMS[c] for c in spec.LATCHED if w[c]]
            self.strokes_fb_due = 0
            for c in spec.LATCHED:
                w[c] = 0
            return True, "cleared: %s" % (", ".join(cleared) or "nothing was latched")
        return False, "unknown command %s" % name

    def prime(self, strokes):
        """A bounded prime from the console (commissioning): up to 50 strokes at the pump's maximum rate,
        counted like any other; refused while the tank is low or the daily allowance is spent."""
        if not 1 <= strokes <= 50:
            raise ConfigError("prime", "%r strokes" % (strokes,), "prime 1..50 strokes")
        if strokes * self.min_gap_ms > 25000:       # the watchdog (30 s) is not fed while the app is stopped
            raise ConfigError("prime", "%d strokes take longer than 25 s at %d strokes a minute" % (
                strokes, self.limits["max_spm"]), "prime at most %d strokes at once, then again" % (
                25000 // self.min_gap_ms))
        if self.tank_in.value() == 0:
            raise ConfigError("prime", "the tank's low switch is closed", "fill the tank first")
        if self.day_used + strokes > self.day_allow:
            raise ConfigError("prime", "the daily allowance is spent", "wait for the next 24 h window")
        self.day_reserved = min(self.day_allow, max(self.day_reserved, self.day_used + strokes))
        self.checkpoint()
        hal = self.hal
        self.enable.value(1)
        made = 0
        for _ in range(strokes):
            while not self.stroker.pulse():
                hal.sleep_ms(1)
            self._stroke()
            made += 1
            hal.sleep_ms(self.min_gap_ms)
        self.enable.value(0)
        self.stopped = 1
        self.primed += made
        self.checkpoint()
        return made

    def shutdown(self):
        """A planned stop (reboot into a new config): pump off, credit and owed strokes saved."""
        self.running = 0
        self.enable.value(0)
        self.stroker.off()
        self.checkpoint(clean=1)

    # -- reports ------------------------------------------------------------------------------
    def encode_batch(self, buf, off, r, values, n, wall_t0, raw=None, rec_bytes=0):
        return spec.encode_readings_into(
            buf, off, r.boot, r.seq, r.t_end, r.span, r.reg, values, raw, REC - 2, rec_bytes, n, wall_t0,
            M.SERIES_DAILY if r.kind == K_DAILY else M.SERIES_INTERVAL, r.count)

    def status(self):
        self._fold()
        return {"total_strokes": self.total, "flow_pulses": self.flow_pulses, "residual_ugl": self.residual,
                "analyzer_ua": self.ua, "trim_pct": self.trim * 100 // _Q12, "state": ("dosing", "fallback",
                "stopped")[self.state], "interlocks": ",".join(ALARMS[c] for c in spec.STOPS if self.want[c]) or "-",
                "day_used": self.day_used, "day_allow": self.day_allow, "owed": self.owed,
                "shortfall": self.shortfall, "overruns": self.ring_overruns}


make = Doser
