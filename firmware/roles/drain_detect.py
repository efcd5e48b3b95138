# What a storm drain's valid levels say: the flood alarms, a blocked drain and
# the drain's own recession, learned. The board side (pings, sensor faults,
# rain, the schedule, records, flash) is firmware/roles/drain.py; it feeds
# this module one valid level per sample and reads back the alarms wanted.
#
# Level alarms need two valid samples in a row to raise and two to clear, with
# hysteresis (50 mm below the threshold, a quarter of it for low thresholds):
# level_warning at warning_mm, flood_danger at grate_mm - danger_margin_mm,
# rising_fast when the rise over the last samples (up to 5 min back) reaches
# rise_mm_min mm/min (it clears below half of it). Detail: the level in mm.
#
# A blocked drain, from two pieces of evidence:
# (a) slow recession. After rain (within 6 h of it; any time on a board that
#     knows nothing of the rain), with no rain now and the level h = level -
#     base at least 80 mm above the dry-weather base and not rising, the fall
#     is timed from that anchor: tau = (t - t0) / ln(h0 / h), steadier as the
#     fall goes on (a sample's noise weighs less against a larger ln); a level
#     that stays up gives ln ~ 0, tau ~ infinite; a level at or above the
#     anchor says nothing (a creeping rise is no recession). tau > blocked_factor x the
#     learned tau on 3 samples in a row spanning 10 min raises blocked
#     (B_SLOW_RECESSION) and flags the event. The event ends when h falls
#     below 40 mm, when rain returns, or after ~2 days; a rise of 20 mm above
#     the anchor is fresh inflow, timed again from there. Starting at 80 and
#     ending at 40 keeps a level that settles near a threshold (noise, a base
#     that moved) from being timed as a recession that stalled.
# (b) a rise without rain: 50 mm over the last 30 min while the board knows it
#     has been dry for an hour (B_RISE_NO_RAIN), on two samples in a row.
# An event that ends (below 40 mm, or rain) unflagged after >= 4 samples over
# >= 10 min clears blocked: the drain drains at its own pace again. When
# blocked was not in force and the level fell to 60 % of the anchor or less,
# the event teaches its tau, sum(t - t0) / sum(ln(h0 / h)) over its samples
# (exact for an exponential fall, every sample's noise averaged, none picked
# by a threshold), to the learned tau: an EWMA of gain 1/2 for the first
# three events and 1/4 after, its step bounded to half the learned value,
# starting from recession_min. A flagged event never teaches. The model is
# the drain's own (STATE_LEARNED) after three events.
#
# The dry-weather base (in 1/16 mm) starts at the first valid level and moves
# only after an hour without rain, rise or recession, and not while blocked or
# the warning is wanted: the mean level, an EWMA of gain 1/16 (unbiased: the
# heights a recession is timed on are measured from it), 1/4 when the level is
# 20 mm below it (a board commissioned in wet weather finds the floor soon).
#
# Integers only and no allocation (the sampling path runs under heap_lock in
# the tests): ln comes from a 17-entry Q12 table of ln(1 + k/16) with linear
# interpolation (error below 0.002, a fraction of a percent of a recession's
# ln), and every product is bounded below 2**30, a 32-bit board's small ints.
from micropython import const

from protocol.roles.drain import A_BLOCKED, A_DANGER, A_RISING, A_WARNING, B_RISE_NO_RAIN, B_SLOW_RECESSION

CONFIRM = const(2)                # samples in a row that flip an alarm
STEP_MM = const(20)               # a change beyond the noise of a median level
QUIET_S = const(3600)             # dry this long before a rise or the base counts as dry weather
LEARNED_EVENTS = const(3)
_RISE_BACK_S = const(300)         # the rise rate spans the kept samples of up to the last 5 min
_H_START_MM = const(80)           # a recession is timed from this far above the base
_H_END_MM = const(40)             # ... down to this
_SLOW_N = const(3)
_SLOW_S = const(600)
_TEACH_N = const(4)
_TEACH_S = const(600)
_TEACH_LN = const(2048)           # ln(h0 / h) >= 0.5 (Q12): the level fell to 60 % or less
_REC_MAX_S = const(200000)        # dt x 4096 stays a small int
_AFTER_RAIN_S = const(21600)      # a recession starts within 6 h of the rain
_TAU_CAP = const(10000000)        # s: "never drains"; x 100 stays a small int
_SUM_DT_MAX = const((1 << 18) - 1)    # an event's sum of dt stops here: x 4096 stays a small int
_RISE_NO_RAIN_MM = const(50)
_RISE_WINDOW_S = const(1800)
_WIN = const(8)                   # 5-min buckets of the lowest level: 40 min
_WIN_STEP_S = const(300)
_HIST = const(4)                  # the last valid samples, for the rise rate
_Q12 = const(4096)
_LN2 = const(2839)
_LN = (0, 248, 482, 704, 914, 1114, 1304, 1486, 1661, 1828, 1989, 2143, 2292, 2436, 2575, 2709, 2839)
_LONG_AGO = const(-1000000)


def ln_q12(x):
    """ln(x) x 4096 + a constant that cancels in a difference, for 1 <= x < 2**20; allocation-free."""
    e = 0
    while x >= 2048:
        x >>= 1
        e += 1
    while x < 1024:
        x <<= 1
        e -= 1
    f = x - 1024
    k = f >> 6
    return e * _LN2 + _LN[k] + ((_LN[k + 1] - _LN[k]) * (f & 63) >> 6)


class Detector:
    # the detection in progress, kept across a deep sleep (ints, then the rings written whole)
    KEEP = ("last_busy_s", "rec_t0", "rec_h0", "rec_n", "rec_last_t", "rec_last_h", "rec_flag", "rec_ratio",
            "sum_dt", "sum_ln", "slow_run", "slow_since", "b_run", "base16", "rise_mm_h", "hist_n", "hist_head",
            "win_n", "win_head")
    KEEP_LISTS = ("hist_t", "hist_lv", "win_t", "win_lv")

    def __init__(self, cfg, danger_mm):
        self.warning_mm, self.danger_mm = cfg["warning_mm"], danger_mm
        self.warning_off = self.warning_mm - min(50, self.warning_mm // 4)
        self.danger_off = danger_mm - min(50, danger_mm // 4)
        self.rise_mm_min = cfg["rise_mm_min"]
        self.factor_x100 = int(round(cfg["blocked_factor"] * 100))
        self.want = bytearray(7)            # alarms by code (the spec's 1..6) as the detection wants them
        self.run = bytearray(7)             # samples in a row that would flip them
        self.detail = [0] * 7
        self.hist_t, self.hist_lv = [0] * _HIST, [0] * _HIST
        self.win_t, self.win_lv = [0] * _WIN, [0] * _WIN
        self.hist_n = self.hist_head = self.win_n = self.win_head = 0
        self.rise_mm_h = self.rise_ref = self.rate_mm_min = 0
        self.last_busy_s = _LONG_AGO
        self.rec_t0 = -1                    # the recession being timed: anchor time (-1: none), height mm x16
        self.rec_h0 = self.rec_n = self.rec_last_t = self.rec_last_h = self.rec_flag = self.rec_ratio = 0
        self.slow_run = self.slow_since = self.b_run = self.sum_dt = self.sum_ln = 0
        # durable (the role writes them): learned tau s and its events, the dry-weather base x16
        self.learned_s = max(30, int(round(cfg["recession_min"] * 60)))
        self.learned_n = 0
        self.base16 = 0
        self.base_set = 0
        self.dirty = 0                      # a durable value changed
        self.saved_base = 0

    def learned(self):
        return self.learned_n >= LEARNED_EVENTS

    def timing(self):
        """A recession is being timed and not (yet) found slow: sample it at the wet pace."""
        return self.rec_t0 >= 0 and not self.rec_flag

    def judge(self, code, on, off, detail):
        """Flip alarm `code` after CONFIRM samples in a row that say so."""
        w = self.want[code]
        if (on and not w) or (off and w):
            self.run[code] += 1
            if self.run[code] >= CONFIRM:
                self.want[code] = w ^ 1
                self.run[code] = 0
                self.detail[code] = detail
        else:
            self.run[code] = 0

    def gap(self):
        """A sample without a valid level: the samples either side of it are not in a row."""
        run = self.run
        run[A_WARNING] = run[A_DANGER] = run[A_RISING] = 0
        self.rise_mm_h = 0

    def level(self, t, lv, raining, dry_for):
        """One valid level lv (mm) at board time t: alarms, recession, base. raining: the board's
        gauge or the gateway says so; dry_for: seconds the board knows it has been dry (-1: it cannot
        know). Returns True while the level rises."""
        self._rate(t, lv)
        rising = self.rise_ref >= STEP_MM
        self.judge(A_WARNING, lv >= self.warning_mm, lv < self.warning_off, lv)
        self.judge(A_DANGER, lv >= self.danger_mm, lv < self.danger_off, lv)
        r = self.rate_mm_min
        self.judge(A_RISING, r >= self.rise_mm_min, r * 2 < self.rise_mm_min, lv)
        self._recession(t, (lv << 4) - self.base16, raining, rising, dry_for)
        self._rise_no_rain(t, lv, dry_for)
        if raining or rising or self.rec_t0 >= 0:
            self.last_busy_s = t
        self._track_base(t, lv)
        self._push(t, lv)
        return rising

    def _rate(self, t, lv):
        """Rise since the oldest kept sample of the last 5 min (else the newest kept): mm, mm/min, mm/h."""
        n = self.hist_n
        if n == 0:
            self.rise_ref = self.rate_mm_min = self.rise_mm_h = 0
            return
        k = (self.hist_head - 1) % _HIST
        ref = k
        for _ in range(n - 1):
            k = (k - 1) % _HIST
            if t - self.hist_t[k] > _RISE_BACK_S:
                break
            ref = k
        dt = t - self.hist_t[ref]
        if dt < 1:
            dt = 1
        d = lv - self.hist_lv[ref]
        self.rise_ref = d
        self.rate_mm_min = d * 60 // dt
        r = d * 3600 // dt
        self.rise_mm_h = 0 if r < 0 else (r if r < 65535 else 65535)

    def _push(self, t, lv):
        h = self.hist_head
        self.hist_t[h] = t
        self.hist_lv[h] = lv
        self.hist_head = (h + 1) % _HIST
        if self.hist_n < _HIST:
            self.hist_n += 1
        w = (self.win_head - 1) % _WIN
        if self.win_n and t - self.win_t[w] < _WIN_STEP_S:
            if lv < self.win_lv[w]:
                self.win_lv[w] = lv
            return
        w = self.win_head
        self.win_t[w] = t
        self.win_lv[w] = lv
        self.win_head = (w + 1) % _WIN
        if self.win_n < _WIN:
            self.win_n += 1

    def _track_base(self, t, lv):
        if not self.base_set:
            self.base16 = lv << 4
            self.base_set = 1
            self.dirty = 1
            return
        if t - self.last_busy_s < QUIET_S or self.want[A_BLOCKED] or self.want[A_WARNING]:
            return
        d = (lv << 4) - self.base16
        self.base16 += d >> 2 if d < -(STEP_MM << 4) else (d + 8) >> 4
        b = self.base16 >> 4
        if b - self.saved_base > 4 or self.saved_base - b > 4:
            self.dirty = 1

    def _recession(self, t, h, raining, rising, dry_for):
        """(a): time the fall from an anchor; flag one slower than blocked_factor x the learned tau.
        h: the level above the base in 1/16 mm (the base's own resolution)."""
        if self.rec_t0 >= 0:
            if h < _H_END_MM << 4 or raining:
                self._end_recession(1)
            elif t - self.rec_t0 > _REC_MAX_S or h > self.rec_h0 + (STEP_MM << 4):
                self._end_recession(0)               # fresh inflow: time it again from here
            else:
                dt = t - self.rec_t0
                ln = ln_q12(self.rec_h0) - ln_q12(h)
                if self.sum_dt + dt <= _SUM_DT_MAX:  # every sample of the event, for its tau (below)
                    self.sum_dt += dt
                    self.sum_ln += ln
                if ln > 0:                           # at or above the anchor: no evidence of slowness
                    self._judge_fall(t, dt * _Q12 // ln)
                self.rec_n += 1
                self.rec_last_t = t
                self.rec_last_h = h
                return
        if not raining and not rising and h >= _H_START_MM << 4 and dry_for <= _AFTER_RAIN_S:
            self.rec_t0 = self.rec_last_t = t
            self.rec_h0 = self.rec_last_h = h
            self.rec_n = 1
            self.rec_flag = self.slow_run = self.rec_ratio = self.sum_dt = self.sum_ln = 0

    def _judge_fall(self, t, tau):
        """This recession's tau now (s), over the learned one: slow or not."""
        if tau > _TAU_CAP:
            tau = _TAU_CAP
        r = tau * 100 // self.learned_s
        self.rec_ratio = r if r < 65535 else 65535
        if tau * 100 > self.factor_x100 * self.learned_s:
            if self.slow_run == 0:
                self.slow_since = t
            if self.slow_run < 255:
                self.slow_run += 1
            if self.slow_run >= _SLOW_N and t - self.slow_since >= _SLOW_S:
                self.rec_flag = 1
                if not self.want[A_BLOCKED]:
                    self.want[A_BLOCKED] = 1
                    self.detail[A_BLOCKED] = B_SLOW_RECESSION
        else:
            self.slow_run = 0

    def _end_recession(self, natural):
        """An event over: an unflagged one clears blocked or, when blocked was not in force, teaches its tau,
        sum(dt) / sum(ln(h0 / h)) over all its samples: exact for an exponential fall, the noise of each
        sample averaged, and no weight on the last one (which a threshold selects, and so biases)."""
        if natural and not self.rec_flag and self.rec_n >= _TEACH_N and self.rec_last_t - self.rec_t0 >= _TEACH_S:
            if self.want[A_BLOCKED]:
                self.want[A_BLOCKED] = 0             # the drain drains at its own pace again
            elif ln_q12(self.rec_h0) - ln_q12(self.rec_last_h) >= _TEACH_LN and self.sum_ln > 0:
                self._teach(self.sum_dt * _Q12 // self.sum_ln)
        self.rec_t0 = -1
        self.rec_ratio = self.slow_run = self.rec_flag = 0

    def _teach(self, tau):
        old = self.learned_s
        step = (tau - old) // (2 if self.learned_n < LEARNED_EVENTS else 4)
        bound = old >> 1
        step = bound if step > bound else (-bound if step < -bound else step)
        new = old + step
        self.learned_s = 30 if new < 30 else (86400 if new > 86400 else new)
        if self.learned_n < 65535:
            self.learned_n += 1
        self.dirty = 1

    def _rise_no_rain(self, t, lv, dry_for):
        """(b): 50 mm over the last 30 min while the board knows it has been dry for an hour."""
        if dry_for < QUIET_S:
            self.b_run = 0
            return
        lo = lv
        oldest = 0
        k = self.win_head
        for _ in range(self.win_n):
            k = (k - 1) % _WIN
            age = t - self.win_t[k]
            if age > _RISE_WINDOW_S + _WIN_STEP_S:
                break
            oldest = age
            if self.win_lv[k] < lo:
                lo = self.win_lv[k]
        if oldest >= _RISE_WINDOW_S - _WIN_STEP_S and lv - lo >= _RISE_NO_RAIN_MM:
            self.b_run += 1
            if self.b_run >= CONFIRM and not self.want[A_BLOCKED]:
                self.want[A_BLOCKED] = 1
                self.detail[A_BLOCKED] = B_RISE_NO_RAIN
        else:
            self.b_run = 0
