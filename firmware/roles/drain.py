# The storm-drain level sensor's board logic: a level from a burst of pings,
# sensor faults that are faults (never floods), the rain, a record per sample
# and the alarms. What the role is (config schema, alarm and fault codes, the
# rain command, wire encoding) is declared in its spec, protocol/roles/drain.py;
# what the valid levels say (flood alarms, a blocked drain, the learned
# recession) is firmware/roles/drain_detect.py.
#
# Sampling: sample() (the hard timer) only decides that a sample is due: every
# dry_s while dry and steady; every wet_s while it rains (the board's gauge
# tipped in the last 10 min, or the gateway's shared rain holds), the level
# rises, a recession is being timed, the level is at or above the warning, or
# an alarm or a fault waits for its confirming sample, so an alarm comes within
# a wet_s or two of what caused it. A tip between samples brings the next one
# forward. service() (asyncio) takes the sample: `pings` pings 60 ms apart
# (100 ms for the A02YYUW's frames: the loop blocks ~300 ms, the timer never),
# their median -> level = mount_mm - distance (echo: distance = echo us x
# c(air_c) / 2000 through a Q16 factor fixed at start; 4-20 mA: level =
# (uA - 4000) x range_mm / 16000), the detection, one flash record, and then
# the alarms that changed and the durable state (flush()).
#
# A sample is bad (no level) when fewer than half the pings echo (echo_lost);
# the distance is beyond range_mm or the level more than 100 mm below the
# invert (out_of_range; 4-20 mA: above 21 mA); the distance is inside blind_mm
# (blind_zone); or the burst's raw readings (the sum of its echo times, frames
# or loop currents) were the very same for stuck_n samples in a row (stuck: a
# live sensor always jitters, a cached value or a jammed transducer does not).
# Three bad samples in a row raise sensor_fault (detail: the newest fault;
# a different fault is sent again), three good ones clear it. While a fault
# is in force the level column is NO_LEVEL and the level alarms, the recession
# and the learning are frozen: nothing raised, nothing cleared, nothing learned.
# battery_low: below battery_low_mv on two samples in a row, clears 100 mV up.
#
# Rain: the gauge's tips (the HAL's counter, wrapping at 2**30) are handed from
# the timer as the meter hands its pulses; a board without a gauge is told
# its catchment's rain by the gateway (the rain command, holding for_s), and
# its rain column is that intensity over the span. A board that has no gauge
# and was never sent the rain cannot know it is dry: no rise-without-rain.
#
# Integers only, and the sampling path (sample(), take_sample(): the burst,
# the detection, the record) allocates nothing; a test runs it under
# heap_lock. flush() writes flash and raises alarms, which allocate.
#
# Durable (drain.state, CRC-16, written when it changes): the learned tau and
# its events, the dry-weather base, the gauge's tip total (at most every 5 s
# while it tips: a cut loses at most those tips), whether the gateway ever sent
# the rain, and the alarms in force, so a new boot clears what it no longer
# sees. The detection in progress (schedule, rings, the recession being timed)
# goes to drain.sleep in shutdown() and is read back only after a deep-sleep
# wake that goes on with the boot that slept (firmware/sleep_cycle.py: the same
# boot id, up_s continued); the tip that woke the board (its counter slept too)
# is counted after any deep-sleep wake.
import os
import struct

from micropython import const

import persist
from flashlog import K_READING, REC, Record
from protocol import messages as M
from protocol.framing import crc16
from protocol.roles import drain as spec
from protocol.roles.drain import (A_BATTERY, A_BLOCKED, A_RISING, A_SENSOR, ALARMS, EXTRA_BYTES, EXTRA_FORMAT,
                                  F_BLIND_ZONE, F_ECHO_LOST, F_OUT_OF_RANGE, F_STUCK, FAULTS, NO_LEVEL, RAIN_HOLD_S,
                                  STATE_HAS_GAUGE, STATE_LEARNED, STATE_RAIN_GAUGE, STATE_RAIN_SHARED,
                                  STATE_RECEDING, STATE_WET)
from roles.drain_detect import Detector
from ticks import PERIOD_MASK, wadd

STATE = "drain.state"
SLEEP = "drain.sleep"
# tip total, learned tau s, base mm, learned events, flags (1 rain known, 2 base set), alarms in force
# (a bit per code), the fault in force, the blocked evidence, CRC-16
_STATE = "<IIhHBBBBH"
_STATE_BYTES = const(18)
_ECHO = const(0)
_UART = const(1)
_MA = const(2)
_GAUGE_FILTER_US = const(5000)    # a reed switch's contact bounce
_NAMUR_LOW_UA = const(3600)       # below: no loop current (a cut cable)
_NAMUR_HIGH_UA = const(21000)
_BELOW_MM = const(100)            # a level this far below the invert is no level
_FAULT_N = const(3)               # bad samples in a row raise a fault, good ones clear it
_RAIN_WINDOW_S = const(600)       # a tip in the last 10 min: the gauge says it rains
_SAVE_GAP_S = const(5)
_SLEEP_MIN_S = const(5)
_BATTERY_HYST_MV = const(100)
_RAIN_MAX = const(5000)           # x10 mm/h: 500 mm/h
_LONG_AGO = const(-1000000)
# the board's side of the detection in progress, kept across a deep sleep with the detector's
_KEEP = ("next_s", "last_t", "bad_run", "good_run", "stuck_run", "stuck_sig", "last_tip_s", "last_rain_s",
         "shared_mm_h", "shared_acc_t", "shared_until", "rain_um", "tips_prev", "samples", "level", "battery_mv")


def _whole(v, low, high):
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


class Drain:
    def __init__(self, hal, cfg, sink):
        self.hal = hal
        self.sink = sink
        pins = hal.board["role_pins"]
        self.kind = ("echo", "uart", "ma").index(cfg["sensor"])
        if self.kind == _ECHO:
            self.sonar = hal.sonar_echo(pins["trig_out"], pins["echo_in"])
        elif self.kind == _UART:
            self.sonar = hal.sonar_uart(pins["sonar_rx"])
        else:
            self.sonar = hal.adc(pins["level_adc"])
        self.gap_ms = 100 if self.kind == _UART else 60
        self.battery = hal.adc(pins["battery_adc"])
        self.tip_um = int(round(cfg["rain_mm_tip"] * 1000))
        self.gauge_gpio = pins["rain_pulse_in"] if self.tip_um else -1
        self.gauge = hal.counter(self.gauge_gpio, active_level=0, filter_us=_GAUGE_FILTER_US) if self.tip_um else None
        self.gauge_last = self.gauge.count() if self.gauge else 0
        self.mount_mm, self.range_mm, self.blind_mm = cfg["mount_mm"], cfg["range_mm"], cfg["blind_mm"]
        self.danger_mm = spec.danger_mm(cfg)
        self.pings, self.shunt, self.stuck_n = cfg["pings"], cfg["shunt_ohm"], cfg["stuck_n"]
        self.dry_s, self.wet_s = cfg["dry_s"], cfg["wet_s"]
        self.battery_low_mv = cfg["battery_low_mv"]
        self.divider_x100 = int(round(cfg["divider"] * 100))
        self.sleepy = cfg["sleep"]
        # echo: distance mm = echo us x k >> 16, k = c [mm/ms] x 65536 / 2000 (half the round trip); the HAL
        # waits for an echo up to 9/8 of the range, so us x k stays below 2**30
        self.k_q16 = (int(round(spec.speed_of_sound_mm_ms(cfg["air_c"]) * 65536)) + 1000) // 2000
        self.timeout_us = (self.range_mm + self.range_mm // 8) * 65536 // self.k_q16
        self.det = Detector(cfg, self.danger_mm)
        self.raw = [0] * 16                 # one burst's readings, sorted as they come
        self.active = bytearray(7)          # alarms by code as last sent
        self.sent = [0] * 7                 # ... and their detail
        self.rec = r = Record(EXTRA_BYTES)
        r.flags = r.count = r.boot = r.seq = r.t_end = r.span = r.value = r.reg = r.wall_boot = 0   # an
        # instance's fields are a dict on MicroPython: made whole here, the sampling path only updates them
        self.state_buf = bytearray(_STATE_BYTES)
        # the timer's side; tips_acc: the tips it saw, a wrapping handover to service()
        self.now_s = self.due = self.due_s = self.tips_acc = self.tips_seen = self.wake_tips = 0
        # the sample's side (_KEEP); rain_um: rain below the column's 0.1 mm, carried
        self.next_s = self.bad_run = self.good_run = self.stuck_run = self.rain_um = self.samples = 0
        self.last_t = self.stuck_sig = -1
        self.last_tip_s = self.last_rain_s = _LONG_AGO
        self.shared_mm_h = self.shared_acc_t = self.shared_until = 0
        self.level = self.battery_mv = self.fault = self.state_bits = 0
        self.level_col = NO_LEVEL
        self.boot_id = persist.read_int("boot_id")     # the runtime's; a wake that goes on with a boot keeps it
        # durable
        self.tips_total = 0
        self.rain_known = 0
        self._recover()
        self.tips_prev = self.tips_total    # the total at the previous sample (its rain column)
        self.saved_tips, self.saved_s = self.tips_total, 0
        if hal.reset_cause() == "deepsleep":
            self._wake()

    # -- boot and flash ---------------------------------------------------------------------
    def _recover(self):
        raw = persist.read(STATE)
        if not raw or len(raw) != _STATE_BYTES or \
                struct.unpack_from("<H", raw, _STATE_BYTES - 2)[0] != crc16(raw, 0, _STATE_BYTES - 2):
            return
        tips, learned, base, n, flags, bits, fault, blocked_by, _c = struct.unpack(_STATE, raw)
        det = self.det
        self.tips_total, det.learned_s, det.learned_n = tips, max(30, learned), n
        det.base16, det.saved_base, det.base_set, self.rain_known = base << 4, base, flags >> 1 & 1, flags & 1
        for code in range(1, 7):
            det.want[code] = self.active[code] = bits >> code & 1
        if self.active[A_SENSOR]:
            self.fault = det.detail[A_SENSOR] = self.sent[A_SENSOR] = fault
        det.detail[A_BLOCKED] = self.sent[A_BLOCKED] = blocked_by

    def _kept(self):
        """(object, attribute) of every int kept across a deep sleep, then (list, None) of every ring; the
        boot id first: the state is the boot's that slept only if the runtime goes on with that boot."""
        det = self.det
        return [(self, "boot_id")] + [(self, n) for n in _KEEP] + [(det, n) for n in Detector.KEEP] + \
            [(getattr(det, n), None) for n in Detector.KEEP_LISTS] + [(det.run, None)]

    def _wake(self):
        """After a deep sleep: the detection in progress as shutdown() left it, if the runtime goes on with
        the boot that slept (its up_s then continues), and the tip that woke us."""
        raw = persist.read(SLEEP)
        try:
            os.remove(SLEEP)                 # read once: a later boot of another cause starts afresh
        except OSError:
            pass
        kept = self._kept()
        n = sum(1 if name else len(obj) for obj, name in kept)
        if raw and len(raw) == 4 * n + 2 and struct.unpack_from("<H", raw, 4 * n)[0] == crc16(raw, 0, 4 * n) \
                and struct.unpack_from("<i", raw, 0)[0] == self.boot_id:
            v = struct.unpack("<%di" % n, raw)
            k = 0
            for obj, name in kept:
                if name:
                    setattr(obj, name, v[k])
                    k += 1
                else:
                    for i in range(len(obj)):
                        obj[i] = v[k]
                        k += 1
        if self.gauge is not None and self.hal.wake_pin():
            self.wake_tips = 1               # the tip that woke the board: its counter was asleep

    def _save_sleep(self):
        v = []
        for obj, name in self._kept():
            if name:
                v.append(getattr(obj, name))
            else:
                v.extend(obj)
        buf = bytearray(4 * len(v) + 2)
        struct.pack_into("<%di" % len(v), buf, 0, *v)
        struct.pack_into("<H", buf, 4 * len(v), crc16(buf, 0, 4 * len(v)))
        persist.write_atomic(SLEEP, buf)

    def _save(self):
        self._fold()
        det = self.det
        bits = 0
        for code in range(1, 7):
            bits |= self.active[code] << code
        buf = self.state_buf
        struct.pack_into(_STATE, buf, 0, self.tips_total, det.learned_s, (det.base16 + 8) >> 4, det.learned_n,
                         self.rain_known | det.base_set << 1, bits, self.fault if self.active[A_SENSOR] else 0,
                         self.sent[A_BLOCKED], 0)
        struct.pack_into("<H", buf, _STATE_BYTES - 2, crc16(buf, 0, _STATE_BYTES - 2))
        persist.write_atomic(STATE, buf)
        self.saved_tips, self.saved_s, det.saved_base = self.tips_total, self.now_s, det.base16 >> 4
        det.dirty = 0

    def _fold(self):
        acc = self.tips_acc
        self.tips_total += (acc - self.tips_seen) & PERIOD_MASK
        self.tips_seen = acc

    # -- time -----------------------------------------------------------------------------------
    def on_clock(self, up_s, local_sod):
        """Samples follow the weather, not the wall clock: nothing to align."""

    # -- the hard timer: no allocation ---------------------------------------------------------------
    def sample(self, up_s):
        self.now_s = up_s
        if self.wake_tips:
            self.tips_acc = wadd(self.tips_acc, self.wake_tips)
            self.wake_tips = 0
            self.last_tip_s = up_s
        g = self.gauge
        if g is not None:
            c = g.count()
            if c != self.gauge_last:
                self.tips_acc = wadd(self.tips_acc, (c - self.gauge_last) & PERIOD_MASK)
                self.gauge_last = c
                self.last_tip_s = up_s
                self._hurry()
        if self.next_s - up_s > self.dry_s:  # board time went back (a wake that did not restore up_s)
            self.next_s = up_s
        if not self.due and up_s >= self.next_s:
            self.due_s = up_s
            self.due = 1

    def _hurry(self):
        """Rain: the next sample at the wet pace."""
        soon = self.last_t + self.wet_s
        if soon < self.next_s:
            self.next_s = soon

    # -- asyncio: the sample, then flash ----------------------------------------------------------------
    def service(self):
        if self.due:
            self.take_sample()
        self.flush()

    def take_sample(self):
        """The burst, the detection and the record. Allocates nothing (the sink's append may)."""
        t = self.due_s
        det = self.det
        span = t - self.last_t if 0 <= self.last_t < t else self.dry_s
        self._fold()
        rain_um = self.rain_um + (self.tips_total - self.tips_prev) * self.tip_um
        self.tips_prev = self.tips_total
        if self.gauge is None:
            rain_um += self._shared_um(t)
        self.rain_um = rain_um % 100
        code = self._burst()
        mv = (self.battery.read_uv() // 1000) * self.divider_x100 // 100
        self.battery_mv = mv
        if self.battery_low_mv:
            det.judge(A_BATTERY, mv < self.battery_low_mv, mv >= self.battery_low_mv + _BATTERY_HYST_MV, mv)
        else:
            det.want[A_BATTERY] = 0          # mains powered now: a battery_low of before is over
        self._faults(code)
        valid = code == 0 and self.fault == 0
        gauge_rain = self.gauge is not None and t - self.last_tip_s < _RAIN_WINDOW_S
        shared_rain = self.shared_mm_h > 0 and t < self.shared_until
        raining = gauge_rain or shared_rain
        if raining:
            self.last_rain_s = t
        lv = self.level
        rising = 0
        if valid:
            rising = det.level(t, lv, raining, t - self.last_rain_s if self.gauge or self.rain_known else -1)
            self.level_col = lv if lv > 0 else 0
        else:
            det.gap()
            self.level_col = NO_LEVEL
        run = det.run
        pending = run[1] | run[2] | run[3] | run[4] | run[5] | run[6] | \
            (self.bad_run if self.fault == 0 else self.good_run)
        wet = raining or pending or (valid and (rising or det.timing() or det.want[A_RISING] or
                                                lv >= det.warning_mm))
        receding = det.rec_t0 >= 0
        self.state_bits = state = (STATE_RAIN_GAUGE if gauge_rain else 0) | (STATE_RAIN_SHARED if shared_rain else 0) \
            | (STATE_WET if wet else 0) | (STATE_RECEDING if receding else 0) | \
            (STATE_LEARNED if det.learned() else 0) | (STATE_HAS_GAUGE if self.gauge else 0)
        r = self.rec
        struct.pack_into(EXTRA_FORMAT, r.extra, 0, det.rise_mm_h if valid else 0, min(rain_um // 100, 65535),
                         min(mv, 65535), self.fault, det.rec_ratio if receding else 0, det.learned_s, self.danger_mm,
                         state)
        r.kind = K_READING                  # one field a line: a tuple of more than three allocates
        r.count = 1
        r.t_end = t
        r.span = span
        r.value = self.level_col
        r.reg = 0
        self.sink.append(r)
        self.samples += 1
        self.last_t = t
        if t - self.last_tip_s < _RAIN_WINDOW_S:   # a tip during the burst: the wet pace after all
            wet = 1
        self.next_s = t + (self.wet_s if wet else self.dry_s)
        self.due = 0

    def _shared_um(self, t):
        """Rain the gateway shared since the last collection, um: its intensity x the time it held."""
        a = self.shared_acc_t
        b = t if t < self.shared_until else self.shared_until
        self.shared_acc_t = t
        if b <= a or not self.shared_mm_h:
            return 0
        return self.shared_mm_h * (b - a if b - a < 86400 else 86400) // 36   # x10 mm/h = 1/36 um/s

    def _burst(self):
        """Ping `pings` times; self.level from their median; return the sample's fault (0: good)."""
        raw, sonar, kind = self.raw, self.sonar, self.kind
        hal = self.hal
        got = 0
        sig = 0
        for i in range(self.pings):
            if i:
                hal.sleep_ms(self.gap_ms)
            if kind == _ECHO:
                v = sonar.ping_us(self.timeout_us)
                if v > self.timeout_us:
                    v = self.timeout_us
            elif kind == _UART:
                v = sonar.read_mm()
                if v > 65535:
                    v = 65535
            else:
                v = sonar.read_uv() // self.shunt
                v = -1 if v < _NAMUR_LOW_UA else (v if v < 65535 else 65535)
            if v >= 0:
                j = got
                while j and raw[j - 1] > v:
                    raw[j] = raw[j - 1]
                    j -= 1
                raw[j] = v
                got += 1
                sig += v
        if got == 0 or got * 2 < self.pings:
            return self._unstick(F_ECHO_LOST)
        m = raw[got >> 1] if got & 1 else (raw[(got >> 1) - 1] + raw[got >> 1]) >> 1
        if kind == _MA:
            lv = (m - 4000) * self.range_mm // 16000
            dist = self.mount_mm - lv
        else:
            dist = m * self.k_q16 >> 16 if kind == _ECHO else m
            lv = self.mount_mm - dist
        self.level = lv
        if (kind == _MA and m > _NAMUR_HIGH_UA) or lv < -_BELOW_MM or (kind != _MA and dist > self.range_mm):
            return self._unstick(F_OUT_OF_RANGE)
        if kind != _MA and dist < self.blind_mm:
            return self._unstick(F_BLIND_ZONE)
        if sig == self.stuck_sig:
            if self.stuck_run < 30000:
                self.stuck_run += 1
        else:
            self.stuck_sig = sig
            self.stuck_run = 1
        return F_STUCK if self.stuck_run >= self.stuck_n else 0

    def _unstick(self, code):
        self.stuck_sig = -1
        self.stuck_run = 0
        return code

    def _faults(self, code):
        """Three bad samples in a row raise sensor_fault (detail: the newest fault); three good clear it."""
        want = self.det.want
        if code:
            self.good_run = 0
            if self.bad_run < 255:
                self.bad_run += 1
            if self.bad_run >= _FAULT_N:
                self.fault = code
                want[A_SENSOR] = 1
                self.det.detail[A_SENSOR] = code
        else:
            self.bad_run = 0
            if self.fault:
                self.good_run += 1
                if self.good_run >= _FAULT_N:
                    self.fault = self.good_run = want[A_SENSOR] = 0

    def flush(self):
        """Send the alarms that changed (a sensor fault again when it changes), write the durable state when
        it changed."""
        self._fold()
        det = self.det
        dirty = det.dirty or (self.tips_total != self.saved_tips and self.now_s - self.saved_s >= _SAVE_GAP_S)
        for code in range(1, 7):
            w, d = det.want[code], det.detail[code]
            if w != self.active[code] or (code == A_SENSOR and w and d != self.sent[code]):
                self.active[code], self.sent[code] = w, d
                self.sink.alarm(code, w, d)
                dirty = 1
        if dirty:
            self._save()

    # -- requests ---------------------------------------------------------------------------------
    def command(self, name, args):
        if name != "rain":
            return False, "unknown command %s: use rain" % name
        if not isinstance(args, dict):
            return False, "rain: %r is not an object; send {\"mm_h\": 125, \"for_s\": 1800}" % (args,)
        for k in args:
            if k not in ("mm_h", "for_s"):
                return False, "rain.%s: unknown key; use mm_h (rain x10 mm/h) and for_s (s)" % k
        mm_h, for_s = args.get("mm_h"), args.get("for_s", RAIN_HOLD_S)
        if not _whole(mm_h, 0, _RAIN_MAX):
            return False, "rain.mm_h: %r is not an integer 0..%d; send the rain x10 mm/h (125: 12.5 mm/h, 0: " \
                "dry)" % (mm_h, _RAIN_MAX)
        if not _whole(for_s, 1, 86400):
            return False, "rain.for_s: %r is not an integer 1..86400; send how long it holds, s (default %d)" % (
                for_s, RAIN_HOLD_S)
        now = self.now_s
        if self.gauge is None:
            self.rain_um += self._shared_um(now)     # what the old intensity brought, at its rate
        self.shared_mm_h, self.shared_acc_t, self.shared_until = mm_h, now, now + for_s
        if not self.rain_known:
            self.rain_known = 1
            self.det.dirty = 1
        if mm_h:
            self._hurry()
        return True, "rain %d.%d mm/h for %d s" % (mm_h // 10, mm_h % 10, for_s)

    def sleep_ms(self, up_s):
        """How long the board may deep-sleep now, ms (0: stay awake): config sleep=1 and nothing waiting."""
        if not self.sleepy or self.due:
            return 0
        for code in range(1, 7):
            if self.det.want[code] != self.active[code]:
                return 0
        s = self.next_s - up_s
        if s > self.dry_s:
            s = self.dry_s
        return s * 1000 if s >= _SLEEP_MIN_S else 0

    def wake_gpio(self):
        """The gauge's pin (a tip drives it low) wakes a sleeping board; -1: no gauge."""
        return self.gauge_gpio

    def shutdown(self):
        """Before a reboot or a deep sleep: the alarms and durable state, and the detection in progress."""
        self.flush()
        self._save()
        self._save_sleep()

    # -- reports ------------------------------------------------------------------------------
    def encode_batch(self, buf, off, r, values, n, wall_t0, raw=None, rec_bytes=0):
        return spec.encode_readings_into(buf, off, r.boot, r.seq, r.t_end, r.span, values, raw, REC - 2, rec_bytes,
                                         n, wall_t0, M.SERIES_INTERVAL, r.count)

    def status(self):
        self._fold()
        det = self.det
        return {"level_mm": self.level_col, "fault": FAULTS.get(self.fault, "-"), "battery_mv": self.battery_mv,
                "rain_tips": self.tips_total, "recession_s": det.learned_s, "learned": 1 if det.learned() else 0,
                "samples": self.samples, "state": self.state_bits, "base_mm": det.base16 >> 4,
                "alarms": ",".join(ALARMS[c] for c in range(1, 7) if self.active[c]) or "-"}


make = Drain
