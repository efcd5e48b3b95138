# The water meter's board logic: every pulse of the meter's reed switch or
# open-collector output becomes part of an exact register, interval readings
# aligned to the wall clock, a daily reading at local midnight, and alarms.
# What the role is (config schema, alarm codes, wire encoding) is declared in
# its spec, protocol/roles/meter.py; this module only does the work.
#
# It sees the HAL, its config section and a record sink (append a record,
# raise an alarm, the newest records logged), never the runtime: board time
# comes in as the up_s of sample() and on_clock().
#
# Why it looks like this:
# - Counting is the HAL's (PCNT or pin IRQs through the shared debounce), so no
#   pulse depends on the scheduler. sample() runs from the hard timer, reads
#   the count, closes intervals and days into small preallocated rings and
#   raises flags; it allocates nothing (tests run it under heap_lock).
# - Everything that writes flash runs in the asyncio task service(): log
#   appends, checkpoints, alarms. A cut loses at most the pulses since the last
#   checkpoint (every checkpoint_pulses or checkpoint_s of flow, and after every
#   reading appended); a reboot the firmware asked for checkpoints first (shutdown()).
# - Records hold pulses; units and the commissioning register are applied
#   when a batch is encoded, so the cumulative total is exact integer arithmetic.
# - After a cut, the open interval of the boot that died is carried into the
#   first interval of the new boot (its register before = the last one
#   logged), so interval deltas still add up to the register.
# - The total and the register bases pass 2**30, where small ints end on a
#   32-bit board, and a big int allocates. So the timer only counts small
#   things (pulses of the open interval and day, a wrapping handover count);
#   service() adds them up and chains each series' register.
import struct

from micropython import const

import persist
from flashlog import K_DAILY, K_READING, Record
from protocol import messages as M
from protocol.framing import crc16
from protocol.roles import meter as spec
from protocol.roles.meter import A_BURST, A_LEAK, A_TAMPER, ALARMS
from ticks import PERIOD_MASK, wadd    # HAL counts and the timer's handover count wrap at 2**30

CHECKPOINT = "meter.ckpt"
_CKPT = "<IIIH"          # total pulses, register at the start of the open interval, at the start of the day, CRC-16
_RING = const(8)
_NEVER = const(0x3FFFFFFF)


class Meter:
    def __init__(self, hal, cfg, sink):
        self.sink = sink
        self.ckpt_buf = bytearray(14)
        self.k_milli = int(round(cfg["k_factor_l"] * 1000))
        if self.k_milli % 1000 == 0:
            self.scale, self.mult, self.register_base = 0, self.k_milli // 1000, cfg["register_l"]
        else:
            self.scale, self.mult, self.register_base = -3, self.k_milli, cfg["register_l"] * 1000
        self.interval_s = cfg["interval_min"] * 60
        self.ckpt_pulses = cfg["checkpoint_pulses"]
        self.ckpt_s = cfg["checkpoint_s"]
        self.burst_ppm = 0
        if cfg["burst_lpm"]:
            self.burst_ppm = max(1, int(cfg["burst_lpm"] * 1000 // self.k_milli))
        self.burst_min = cfg["burst_min"]
        self.leak_s = cfg["leak_h"] * 3600
        self.no_pulse_s = cfg["no_pulse_h"] * 3600
        self.counter = hal.counter(hal.board["role_pins"]["pulse_in"], active_level=0,
                                   filter_us=cfg["debounce_us"])
        # Hard-timer state: small ints only. The total and the register bases grow past 2**30 (a
        # small int's end on a 32-bit board), so only service() does arithmetic on them; the timer
        # counts what it saw in acc (wrapping), the open interval in i_pulses, the open day in d_pulses.
        self.acc = 0
        self.acc_seen = 0
        self._recover(sink)                 # may checkpoint, which folds acc in: set above
        self.last_count = self.counter.count()
        self.i_pulses = self.total - self.interval_base
        self.d_pulses = self.total - self.day_base
        self.unsaved = self.total - self.saved_total   # pulses not in the checkpoint yet
        self.unsaved_since = 0
        self.ckpt_due = 0
        self.interval_start = 0
        self.next_close = self.interval_s
        self.day_start = 0
        self.next_midnight = _NEVER
        self.next_minute = 60
        self.minute_pulses = 0
        self.burst_run = 0
        self.flow_run_s = 0
        self.last_pulse_s = 0
        self.want = bytearray(4)        # alarm wanted by code (1..3); service() logs the changes
        self.active = bytearray(4)
        self.ring_end = [0] * _RING     # closed intervals and days: end, span, pulses, kind
        self.ring_span = [0] * _RING
        self.ring_pulses = [0] * _RING
        self.ring_kind = bytearray(_RING)
        self.head = 0
        self.tail = 0
        self.ring_overruns = 0
        self.rec = Record()

    # -- boot -------------------------------------------------------------------------
    def _recover(self, sink):
        """The checkpoint, or the newest reading logged when a cut came between the two writes.

        Whatever the log adds is checkpointed at once: the log's records are
        deleted once acknowledged, and must not be the only place the total lives."""
        total, ibase, dbase = 0, 0, 0
        raw = persist.read(CHECKPOINT)
        if raw and len(raw) == 14:
            t, i, d, c = struct.unpack(_CKPT, raw)
            if c == crc16(raw, 0, 12):
                total, ibase, dbase = t, i, d
        saved = (total, ibase, dbase)
        if sink.last_reading.kind == K_READING:
            ibase = max(ibase, sink.last_reading.reg + sink.last_reading.value)
        if sink.last_daily.kind == K_DAILY:
            dbase = max(dbase, sink.last_daily.reg + sink.last_daily.value)
        self.total = max(total, ibase)
        self.interval_base = ibase
        self.day_base = dbase if dbase <= self.total else ibase
        if (self.total, self.interval_base, self.day_base) != saved:
            self.checkpoint()
        self.saved_total = self.total

    def _fold(self):
        """Add what the timer counted since the last fold to the total (big-int arithmetic: never
        in the timer)."""
        acc = self.acc
        self.total += (acc - self.acc_seen) & PERIOD_MASK
        self.acc_seen = acc

    def checkpoint(self):
        self._fold()
        buf = self.ckpt_buf
        struct.pack_into(_CKPT, buf, 0, self.total, self.interval_base, self.day_base, 0)
        c = crc16(buf, 0, 12)
        buf[12], buf[13] = c & 255, c >> 8
        persist.write_atomic(CHECKPOINT, buf)
        self.saved_total = self.total

    # -- time ---------------------------------------------------------------------------
    def on_clock(self, up_s, local_sod):
        """Realign the open interval's end (and midnight) when wall time becomes known.

        local_sod: seconds since local midnight now, or -1 while the clock is unsynced.
        """
        if local_sod < 0:
            return
        self.next_close = up_s + self.interval_s - local_sod % self.interval_s
        self.next_midnight = up_s + 86400 - local_sod
        if self.day_start == 0 and self.next_midnight != _NEVER:
            self.day_start = up_s

    # -- the hard timer: no allocation ---------------------------------------------------
    def sample(self, up_s):
        c = self.counter.count()
        d = (c - self.last_count) & PERIOD_MASK    # counts only grow; they wrap at 2**30, like ticks
        if d:
            self.last_count = c
            self.acc = wadd(self.acc, d)
            self.i_pulses += d
            self.d_pulses += d
            self.minute_pulses += d
            if self.unsaved == 0:
                self.unsaved_since = up_s
            self.unsaved += d
            self.last_pulse_s = up_s
            if self.want[A_TAMPER]:
                self.want[A_TAMPER] = 0
        if self.unsaved and (self.unsaved >= self.ckpt_pulses or up_s - self.unsaved_since >= self.ckpt_s):
            self.ckpt_due = 1
        if up_s >= self.next_minute:
            self.next_minute += 60
            if self.burst_ppm and self.minute_pulses >= self.burst_ppm:
                self.burst_run += 1
                if self.burst_run >= self.burst_min:
                    self.want[A_BURST] = 1
            else:
                self.burst_run = 0
                self.want[A_BURST] = 0
            self.minute_pulses = 0
        if self.no_pulse_s and up_s - self.last_pulse_s >= self.no_pulse_s:
            self.want[A_TAMPER] = 1
        if up_s >= self.next_close:
            end = self.next_close
            pulses = self.i_pulses
            self.i_pulses = 0
            self._close(K_READING, end, end - self.interval_start, pulses)
            if pulses:
                self.flow_run_s += end - self.interval_start
            else:
                self.flow_run_s = 0
            self.want[A_LEAK] = 1 if self.flow_run_s >= self.leak_s else 0
            self.interval_start = end
            self.next_close = end + self.interval_s
        if up_s >= self.next_midnight:
            end = self.next_midnight
            self._close(K_DAILY, end, end - self.day_start, self.d_pulses)
            self.d_pulses = 0
            self.day_start = end
            self.next_midnight = end + 86400

    def _close(self, kind, end, span, pulses):
        h = self.head
        if (h + 1) % _RING == self.tail:
            self.ring_overruns += 1       # service() starved: widen the newest slot of this kind, lose nothing
            for back in range(1, _RING):
                k = (h - back) % _RING
                if self.ring_kind[k] == kind:
                    self.ring_end[k] = end
                    self.ring_span[k] += span
                    self.ring_pulses[k] += pulses
                    return
            h = (h - 1) % _RING           # a full ring of the other kind: cannot happen with 8 slots
        self.ring_end[h] = end
        self.ring_span[h] = span
        self.ring_pulses[h] = pulses
        self.ring_kind[h] = kind
        self.head = (h + 1) % _RING

    # -- asyncio: flash work ------------------------------------------------------------
    def service(self):
        """Log what the timer closed, checkpoint when due, raise or clear alarms. Never called from an IRQ."""
        sink = self.sink
        while self.tail != self.head:
            t = self.tail
            r = self.rec
            kind, pulses = self.ring_kind[t], self.ring_pulses[t]
            if kind == K_DAILY:            # each series chains its register: before + pulses = next before
                reg = self.day_base
                self.day_base = reg + pulses
            else:
                reg = self.interval_base
                self.interval_base = reg + pulses
            r.kind, r.count, r.t_end, r.span, r.value, r.reg = kind, 1, self.ring_end[t], self.ring_span[t], pulses, reg
            sink.append(r)
            self.tail = (t + 1) % _RING
            self.ckpt_due = 1
        self._fold()
        if self.ckpt_due:
            self.ckpt_due = 0
            self.unsaved = 0
            self.checkpoint()
        for code in ALARMS:
            if self.want[code] != self.active[code]:
                self.active[code] = self.want[code]
                sink.alarm(code, self.active[code], self.total)

    # -- reports ----------------------------------------------------------------------------
    def encode_batch(self, buf, off, r, values, n, wall_t0, raw=None, rec_bytes=0):
        """Encode one batch of logged records as a readings payload: r is its first record, values[0..n-1]
        the records' values (same kind, span and seq step); raw (the records as logged) is for roles
        with columns of their own."""
        return spec.encode_readings_into(
            buf, off, r.boot, r.seq, r.t_end, r.span, self.k_milli, self.register_units(r.reg), values, n,
            self.scale, self.mult, wall_t0, M.SERIES_DAILY if r.kind == K_DAILY else M.SERIES_INTERVAL, r.count)

    def register_units(self, reg_pulses):
        return self.register_base + reg_pulses * self.mult

    def shutdown(self):
        """A planned stop (the reboot command, a new config): the register checkpointed first, so a reboot
        the firmware asked for loses no counted pulse (a power cut loses at most checkpoint_pulses)."""
        self.checkpoint()

    def status(self):
        self._fold()
        return {"total_pulses": self.total, "register": self.register_units(self.total),
                "scale": self.scale, "overruns": self.ring_overruns}

make = Meter
