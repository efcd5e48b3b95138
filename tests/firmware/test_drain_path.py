"""The storm drain's board logic on the real VM with the HAL seam replaced (a sonar, a battery ADC and a
rain gauge we set, a catchment that fills and drains): the sampling path under heap_lock through the
2**30 ms tick wrap, storms on a healthy and a partly blocked drain, a rise without rain, a dry month of
sensor faults, the learned recession across a reboot and a deep sleep, and the rain command."""

import ast
import json
import math
import random

from hil_tests.support import vm
from protocol import cbor
from protocol.roles import drain as spec
from tests.firmware.test_flashlog import FLASH_FS

SECTION = {"rain_mm_tip": 0.2, "dry_s": 900, "wet_s": 30}      # mount 1500, base 40: distance ~1460 mm
_RNG = random.Random(7)
NOISE = bytes(max(0, min(255, 128 + round(_RNG.gauss(0, 3)))) for _ in range(997))   # sd 3 mm, per ping

SEAM = FLASH_FS + """
import json, math, micropython
from micropython import const
from flashlog import REC, Record
import roles.drain
from protocol.roles import drain as spec
NOISE = bytes.fromhex("%s")
US_PER_MM = const(20000)            # us of round trip per 3495 mm: sound at 30 C (349.5 m/s)
class Sonar:
    # mode: 0 the water, 1 most echoes lost, 2 stuck (the last reading cached: the same echo every ping),
    # 3 something in the blind zone, 4 beyond the range
    def __init__(self):
        self.level = 40
        self.mode = 0
        self.k = 0
        self.pings = 0
    def ping_us(self, timeout_us):
        self.pings += 1
        self.k = (self.k + 1) %% 997
        m = self.mode
        if m == 1 and self.k %% 5:
            return -1
        if m == 2:                          # the last good reading, cached
            return (1500 - self.level) * US_PER_MM // 3495
        d = 100 if m == 3 else (5000 if m == 4 else 1500 - self.level + NOISE[self.k] - 128)
        us = d * US_PER_MM // 3495
        return us if us <= timeout_us else -1
    def read_mm(self):
        return -1
class Adc:
    def __init__(self, uv):
        self.uv = uv
    def read_uv(self):
        return self.uv
class Counter:
    def __init__(self):
        self.n = 0
    def count(self):
        return self.n
class SeamHal:
    platform = "test"
    board = {"name": "esp32-devkitc", "role": "drain", "vfs_size_bytes": 65536, "heap_budget_bytes": 112640,
             "role_pins": {"trig_out": 18, "echo_in": 19, "sonar_rx": 23, "level_adc": 39, "rain_pulse_in": 33,
                           "battery_adc": 35}}
    def __init__(self):
        self.ms = (1 << 30) - 5000            # five seconds before the tick wrap
        self.sonar = Sonar()
        self.battery = Adc(1850000)           # 3700 mV behind a divider of 2
        self.loop_ma = Adc(0)
        self.gauge = Counter()
        self.cause = "power_on"
        self.woke_by_tip = False
        self.naps = 0
    def ticks_ms(self):
        return self.ms
    def link_ticks_ms(self):
        return self.ms
    @staticmethod
    def ticks_diff(a, b):
        return ((a - b + (1 << 29)) & ((1 << 30) - 1)) - (1 << 29)
    @staticmethod
    def ticks_add(a, b):
        return (a + b) & ((1 << 30) - 1)
    def sonar_echo(self, trig_gpio, echo_gpio):
        return self.sonar
    def sonar_uart(self, rx_gpio):
        return self.sonar
    def adc(self, gpio):
        return self.battery if gpio == 35 else self.loop_ma
    def counter(self, gpio, active_level=0, filter_us=0):
        return self.gauge
    def sleep_ms(self, ms):
        self.naps += 1
    def reset_cause(self):
        return self.cause
    def wake_pin(self):
        return self.woke_by_tip
    def uart(self):
        return None
    def heap_free_bytes(self):
        import gc
        return gc.mem_free()
    def heap_budget_bytes(self):
        return 112640
class Sink:
    # the RecordSink a role sees: records packed into a preallocated ring (allocation-free), alarms listed,
    # and a few running figures of the records
    def __init__(self):
        self.size = REC + spec.EXTRA_BYTES
        self.ring = bytearray(self.size * 64)
        self.n = 0
        self.alarms = []
        self.last_reading = Record()
        self.last_daily = Record()
        self.up = 0
        self.faults = 0         # records with a fault in force
        self.no_level = 0
        self.wet = 0
        self.max_ratio = 0
        self.state_or = 0
        self.spans = 0          # sum of spans: their chain covers the run
    def append(self, r):
        r.boot, r.seq = 1, self.n + 1                 # as the runtime's log_record does
        r.flags, r.wall_boot = 0, 0
        r.pack(self.ring, (self.n & 63) * self.size, self.size)
        self.n += 1
        x = r.extra
        self.spans += r.span
        if r.value == spec.NO_LEVEL:
            self.no_level += 1
        if x[6]:
            self.faults += 1
        ratio = x[7] | x[8] << 8
        if ratio > self.max_ratio:
            self.max_ratio = ratio
        self.state_or |= x[15]
        if x[15] & spec.STATE_WET:
            self.wet += 1
    def alarm(self, code, active, detail):
        self.alarms.append((self.up, spec.ALARMS[code], active, detail))
    def columns(self, back=0):
        import struct
        off = ((self.n - 1 - back) & 63) * self.size
        r = Record().unpack(self.ring, off)
        return (r.t_end, r.span, r.value) + struct.unpack_from(spec.EXTRA_FORMAT, self.ring, off + REC - 2)
SECTION = json.loads('%s')
def make(section=None, sink=None):
    cfg = json.loads(json.dumps(SECTION))
    cfg.update(section or {})
    full = {}
    for key, kind, default, low, high, hint in spec.SCHEMA:
        full[key] = cfg.get(key, default)
    spec.check(full)
    return roles.drain.make(hal, full, sink or Sink())
class Catchment:
    # a linear reservoir: the level above the dry-weather base h fills with the rain x gain and drains
    # with time constant tau_s; creep_mm_h raises it beside that (a blockage downstream backing water up)
    def __init__(self, tau_s, base_mm=40, gain=30):
        self.h = 0.0
        self.base = base_mm
        self.gain = gain
        self.rain_mm_h = 0
        self.creep_mm_h = 0
        self.backup = 0.0
        self.bucket = 0.0
        self.set_tau(tau_s)
    def set_tau(self, tau_s):
        self.tau = tau_s
        self.a = math.exp(-10 / tau_s)
    def step10(self):
        inflow = self.rain_mm_h * self.gain / 3600
        self.h = self.h * self.a + inflow * self.tau * (1 - self.a)
        self.backup += self.creep_mm_h * 10 / 3600
        self.bucket += self.rain_mm_h * 10 / 3600
        while self.bucket >= 0.2:
            self.bucket -= 0.2
            hal.gauge.n += 1
        hal.sonar.level = int(self.base + self.h + self.backup)
hal = SeamHal()
UP = [0]
def run(d, seconds, world=None):
    # board time in 10 s steps: the world, the timer's sample(), and service() when a sample is due
    sink = d.sink
    for _ in range(seconds // 10):
        UP[0] += 10
        sink.up = UP[0]
        if world is not None:
            world.step10()
        d.sample(UP[0])
        if d.due:
            d.service()
def storm(d, world, mm_h, minutes, dry_h):
    world.rain_mm_h = mm_h
    run(d, minutes * 60, world)
    world.rain_mm_h = 0
    run(d, int(dry_h * 3600), world)
def alarms(sink):
    return [a[1:] for a in sink.alarms]
"""


def _script(body, section=None):
    return SEAM % (NOISE.hex(), json.dumps(dict(SECTION, **(section or {})))) + body


def _lines(out, *tags):
    """The printed lines whose first word is a tag: {tag: the rest, parsed as a Python literal}."""
    got = {}
    for line in out.strip().split("\n"):
        tag, _, rest = line.partition(" ")
        if tag in tags:
            got[tag] = ast.literal_eval(rest)            # the VM prints Python literals
    return got


def test_the_sampling_path_allocates_nothing_for_hours_of_storm_faults_and_rain_across_the_tick_wrap():
    """The timer's sample() every 100 ms and the burst, detection and record under heap_lock, through a
    storm (gauge tips, a rise, a recession), each sensor fault and the 2**30 ms tick wrap; the runtime's
    up_s bookkeeping as runtime.tick does it. Only flush() (flash, alarms) runs unlocked."""
    body = """
d = make({"stuck_n": 3})
sink = d.sink
def locked(hours):
    last = hal.ms
    ms = 0
    up = UP[0]
    son = hal.sonar
    for i in range(hours * 36000):
        now = hal.ms + 100 if hal.ms <= (1 << 30) - 101 else hal.ms - ((1 << 30) - 100)
        hal.ms = now
        ms += hal.ticks_diff(now, last)
        last = now
        if ms >= 1000:
            ms -= 1000
            up += 1
            s = up % 14400                         # a storm every 4 h: 40 min of rain, the level follows
            if s < 2400:
                son.level = 40 + s // 8
                if s % 40 == 0:
                    hal.gauge.n += 1
            elif s < 9000:
                son.level = 40 + 300 * 2400 // (2400 + (s - 2400) * 3)
            son.mode = 0
            if 9600 <= s < 13800:
                son.mode = 1 + (up // 14400) % 4   # then a fault for 70 min: lost, stuck, blind, far
        sink.up = up
        d.sample(up)
        if d.due:
            d.take_sample()
            micropython.heap_unlock()
            d.flush()                              # flash and alarms: the asyncio side, which may allocate
            micropython.heap_lock()
    UP[0] = up
micropython.heap_lock()
try:
    locked(16)
    verdict = "NO_ALLOC"
except MemoryError:
    verdict = "ALLOCATED"
micropython.heap_unlock()
print("verdict", repr(verdict))
print("counts", (d.samples, sink.n, sink.wet, sink.faults, UP[0], sink.spans, hal.ms < (1 << 29)))
print("alarms", sorted(set((a[1], a[3]) for a in sink.alarms if a[2])))
print("tips", (d.status()["rain_tips"], hal.gauge.n))
"""
    got = _lines(vm.run(_script(body), timeout=300), "verdict", "counts", "alarms", "tips")
    assert got["verdict"] == "NO_ALLOC"
    samples, appended, wet, faulted, up_s, spans, wrapped = got["counts"]
    assert samples == appended and up_s == 16 * 3600 and wrapped
    assert 0 < wet < samples and faulted > 0
    assert up_s - 900 <= spans <= up_s + 900         # each record's span is the time since the one before
    raised = set(got["alarms"])
    assert {("sensor_fault", spec.F_ECHO_LOST), ("sensor_fault", spec.F_STUCK), ("sensor_fault", spec.F_BLIND_ZONE),
            ("sensor_fault", spec.F_OUT_OF_RANGE)} <= raised
    assert got["tips"][0] == got["tips"][1] > 200


def test_a_healthy_drain_learns_its_recession_and_a_partly_blocked_one_is_found_after_rain():
    """Storms of 30 mm/h for 40 min on a drain whose recession time constant is 15 min (configured 20):
    no alarm, and the learned time constant comes within 10 % of 15 min. The same drain partly blocked
    (4x slower): blocked, by its slow recession, within the hour after the rain."""
    body = """
d = make()
sink = d.sink
w = Catchment(900)
run(d, 6 * 3600, w)
for k in range(5):
    storm(d, w, 30, 40, 8)
    print("learned%d" % k, (d.det.learned_s, d.det.learned_n))
print("healthy", (alarms(sink), sink.max_ratio, d.status()["learned"], sink.state_or, d.det.base16 >> 4))
w.set_tau(3600)
sink.max_ratio = 0
rain_end = UP[0] + 40 * 60
storm(d, w, 30, 40, 10)
print("blocked", (alarms(sink), [a[0] - rain_end for a in sink.alarms], d.det.learned_s, sink.max_ratio))
"""
    got = _lines(vm.run(_script(body), timeout=300), "healthy", "blocked", *("learned%d" % k for k in range(5)))
    learned = [got["learned%d" % k] for k in range(5)]
    assert [n for _s, n in learned] == [1, 2, 3, 4, 5]              # every storm taught the model
    assert abs(learned[-1][0] - 900) <= 90, learned
    healthy_alarms, max_ratio, is_learned, states, base = got["healthy"]
    assert healthy_alarms == [] and is_learned == 1 and 38 <= base <= 42
    need = spec.STATE_RAIN_GAUGE | spec.STATE_WET | spec.STATE_RECEDING | spec.STATE_LEARNED | spec.STATE_HAS_GAUGE
    assert states & need == need
    blocked_alarms, after_rain_s, learned_after, ratio = got["blocked"]
    assert blocked_alarms == [("blocked", 1, spec.B_SLOW_RECESSION)]
    assert 0 < after_rain_s[0] <= 3600
    assert learned_after == learned[-1][0]                          # a flagged recession teaches nothing
    assert ratio >= 300


def test_a_rise_without_rain_is_a_blocked_drain_only_where_the_board_knows_it_is_dry():
    """Water backing up at 100 mm/h for an hour with no rain: blocked (rise_without_rain) on a board with
    a gauge, and on one without a gauge once the gateway has shared the rain (dry); a board that knows
    nothing of the rain raises nothing."""
    body = """
def creep(section, tell=None):
    hal.gauge.n = 0
    d = make(section)
    w = Catchment(900)
    run(d, 2 * 3600, w)
    if tell is not None:
        print("told", d.command("rain", tell)[0])
    run(d, 2 * 3600, w)
    start = UP[0]
    w.creep_mm_h = 100
    run(d, 3600, w)
    return [(a[1], a[2], a[3]) for a in d.sink.alarms], [a[0] - start for a in d.sink.alarms]
import os
print("gauge", creep({}))
os.remove("drain.state")
print("unknown", creep({"rain_mm_tip": 0}))
os.remove("drain.state")
print("shared", creep({"rain_mm_tip": 0}, {"mm_h": 0, "for_s": 60}))
"""
    got = _lines(vm.run(_script(body), timeout=300), "gauge", "unknown", "shared", "told")
    for board in ("gauge", "shared"):
        raised, at = got[board]
        assert raised == [("blocked", 1, spec.B_RISE_NO_RAIN)], board
        assert 1500 <= at[0] <= 3600, board                   # 50 mm over 30 min, confirmed
    assert got["unknown"] == ([], [])
    assert got["told"] is True


def test_a_dry_month_with_noise_and_sensor_faults_raises_only_each_fault_with_its_code_then_clears_it():
    """30 days of a steady level (noise sd 3 mm) with a lost-echo spell, a stuck sensor, debris in the
    blind zone and an echo beyond the range: each is a sensor_fault with its code, cleared once the
    sensor is good again; no flood, rise or blocked alarm; the level column is NO_LEVEL while a fault
    holds; a dry drain is sampled at dry_s."""
    body = """
d = make()
sink = d.sink
run(d, 3 * 86400)
spells = []
for mode in (1, 2, 3, 4):
    hal.sonar.mode = mode
    run(d, 4 * 3600)                  # stuck: 12 samples at 900 s first
    hal.sonar.mode = 0
    run(d, 3600)
    run(d, 5 * 86400)
print("alarms", alarms(sink))
print("figures", (d.samples, sink.wet, sink.no_level, d.det.base16 >> 4, d.status()["fault"]))
"""
    got = _lines(vm.run(_script(body), timeout=300), "alarms", "figures")
    fault = "sensor_fault"
    assert got["alarms"] == [(fault, 1, spec.F_ECHO_LOST), (fault, 0, spec.F_ECHO_LOST),
                             (fault, 1, spec.F_STUCK), (fault, 0, spec.F_STUCK),
                             (fault, 1, spec.F_BLIND_ZONE), (fault, 0, spec.F_BLIND_ZONE),
                             (fault, 1, spec.F_OUT_OF_RANGE), (fault, 0, spec.F_OUT_OF_RANGE)]
    samples, wet, no_level, base, now = got["figures"]
    days = 3 + 4 * (5 + 5 / 24)
    assert days * 86400 / 900 <= samples <= days * 86400 / 900 + 200     # dry_s, and a few wet confirmations
    assert wet <= 60 and no_level > 4 * 3 and 35 <= base <= 45 and now == "-"


def test_level_alarms_need_two_samples_and_clear_below_their_hysteresis():
    """A flash flood: warning, danger and rising_fast with the level as detail, each after two samples in
    a row; one sample above the warning raises nothing; all clear as the water goes down."""
    body = """
d = make({"rain_mm_tip": 0, "dry_s": 60})
sink = d.sink
run(d, 3600)
n = d.samples
hal.sonar.level = 900                 # one sample above the warning, then back
while d.samples == n:
    run(d, 10)
hal.sonar.level = 40
run(d, 3600)
print("spike", alarms(sink))
for lv in range(40, 1101, 10):        # 10 mm every 10 s: 60 mm/min
    hal.sonar.level = lv
    run(d, 10)
run(d, 300)
for lv in range(1100, 39, -5):
    hal.sonar.level = lv
    run(d, 10)
run(d, 7200)
print("flood", alarms(sink))
"""
    got = _lines(vm.run(_script(body), timeout=300), "spike", "flood")
    assert got["spike"] == []
    flood = got["flood"]
    raised = [name for name, on, _ in flood if on]
    cleared = [name for name, on, _ in flood if not on]
    assert sorted(raised) == sorted(cleared) == ["flood_danger", "level_warning", "rising_fast"]
    assert [on for _, on, _ in flood] == [1, 1, 1, 0, 0, 0]
    assert raised.index("level_warning") < raised.index("flood_danger")
    detail = {(name, on): lv for name, on, lv in flood}
    assert 700 <= detail[("level_warning", 1)] <= 790 and 1000 <= detail[("flood_danger", 1)] <= 1090
    assert detail[("flood_danger", 0)] < 950 and detail[("level_warning", 0)] < 650


def test_the_learned_recession_and_tip_total_survive_a_reboot_and_a_deep_sleep_resumes_the_detection():
    """A new Drain on the same flash (a reboot, or a power cut) has the learned time constant, its events
    and the gauge's tip total; after shutdown() and a deep-sleep wake by a tip, the schedule and the
    alarms in force carry on, and the waking tip is counted; a wake into a new boot (the runtime could
    not go on with the one that slept) keeps only what a power cut keeps."""
    body = """
d = make()
w = Catchment(900)
run(d, 6 * 3600, w)
for k in range(3):
    storm(d, w, 30, 40, 8)
before = (d.det.learned_s, d.det.learned_n, d.status()["rain_tips"], d.status()["learned"])
d = make()                                     # a power cut: nothing of the run but the flash
after = (d.det.learned_s, d.det.learned_n, d.status()["rain_tips"], d.status()["learned"])
print("reboot", (before, after))
hal.sonar.level = 800                          # above the warning: the alarm is in force
run(d, 600)
d.shutdown()
active, next_s, samples, tips = d.active[spec.A_WARNING], d.next_s, d.samples, d.status()["rain_tips"]
hal.cause, hal.woke_by_tip = "deepsleep", True
d = make()
print("wake", ((active, next_s, samples, tips + 1), (d.active[spec.A_WARNING], d.next_s, d.samples, 0)))
UP[0] = next_s - 1
run(d, 10)
print("woke", (d.status()["rain_tips"], d.sink.alarms, d.det.want[spec.A_WARNING]))
d.shutdown()
with open("boot_id", "w") as f:
    f.write("7")                               # the runtime could not go on with the boot that slept
d = make()
print("newboot", (d.next_s, d.samples, d.active[spec.A_WARNING], d.wake_tips))
hal.cause, hal.woke_by_tip = "power_on", False
hal.sonar.level = 40
d.shutdown()
d = make()                                     # no deep sleep: drain.sleep is not read
print("cold", (d.next_s, d.samples, d.active[spec.A_WARNING]))
run(d, 900)
print("cleared", [a[1:] for a in d.sink.alarms])
"""
    got = _lines(vm.run(_script(body), timeout=300), "reboot", "wake", "woke", "newboot", "cold", "cleared")
    before, after = got["reboot"]
    assert before == after and before[1] == 3 and before[3] == 1 and before[2] > 0
    kept, restored = got["wake"]
    assert restored[:3] == kept[:3] and kept[0] == 1
    tips, woke_alarms, want = got["woke"]
    assert tips == kept[3] and woke_alarms == [] and want == 1     # no alarm sent again, still wanted
    assert got["newboot"] == (0, 0, 1, 1)          # a new boot: no detection carried over, the tip counted
    assert got["cold"] == (0, 0, 1)
    assert [(name, on) for name, on, _lv in got["cleared"]] == [("level_warning", 0)]


def test_the_rain_command_shares_the_rain_until_for_s_and_refuses_bad_args_through_the_runtime():
    """Over the link (Runtime.command): rain sets STATE_RAIN_SHARED and the wet pace, its rain column adds
    up the intensity over the time it held, it expires after for_s; bad args are refused with the field
    and the fix, and change nothing. The records read back from the flash log encode as readings rows
    of the spec's FIELDS."""
    body = """
import runtime
with open("config.json", "w") as f:
    f.write(json.dumps({"device_id": 9, "role": "drain", "drain": {"rain_mm_tip": 0}}))
with open("device.key", "wb") as f:
    f.write(bytes(16))
rt = runtime.Runtime(hal)
d = rt.role
class T:
    late_us = 0
def tick(seconds):
    for _ in range(seconds * 10):
        hal.ms = (hal.ms + 100) & ((1 << 30) - 1)
        rt.tick(T)
        if d.due:
            d.service()
tick(1000)
print("dry", d.state_bits & spec.STATE_RAIN_SHARED, d.state_bits & spec.STATE_WET)
for bad in ({"mm_h": -5}, {"mm_h": 12.5}, {"mm_h": True}, {"for_s": 60}, {"mm_h": 100, "for_s": 0},
            {"mm_h": 100, "hold": 60}, [100]):
    ok, why = rt.command("rain", bad)
    print("refused", (ok, why.split(":")[0], "send" in why or "use" in why))
print("same", (d.shared_mm_h, d.rain_known, rt.refused))
print("ok", rt.command("rain", {"mm_h": 360, "for_s": 600}))
tick(100)
print("wet", (d.state_bits & spec.STATE_RAIN_SHARED, d.state_bits & spec.STATE_WET, d.next_s - d.last_t))
tick(600)
print("expired", (d.state_bits & spec.STATE_RAIN_SHARED, ))
raw = bytearray(rt.log.rec * 40)
n = rt.log.read_unacked(raw, 40)
rain = 0
first = Record()
for i in range(n):
    r = Record().unpack(raw, i * rt.log.rec)
    if r.kind == 1:
        rain += raw[i * rt.log.rec + REC - 2 + 2] | raw[i * rt.log.rec + REC - 2 + 3] << 8
print("rain", rain)
k = 0
while Record().unpack(raw, k * rt.log.rec).kind != 1:
    k += 1
first.unpack(raw, k * rt.log.rec)
buf = bytearray(400)
vals = [first.value]
end = d.encode_batch(buf, 0, first, vals, 1, -1, memoryview(raw)[k * rt.log.rec:], rt.log.rec)
print("payload", repr(bytes(buf[:end]).hex()))
"""
    out = vm.run(_script(body), timeout=300)
    lines = [line.split(" ", 1) for line in out.strip().split("\n")]
    refused = [ast.literal_eval(rest) for tag, rest in lines if tag == "refused"]
    assert refused == [(False, "rain.mm_h", True), (False, "rain.mm_h", True), (False, "rain.mm_h", True),
                       (False, "rain.mm_h", True), (False, "rain.for_s", True), (False, "rain.hold", True),
                       (False, "rain", True)]
    got = dict((tag, rest) for tag, rest in lines)
    assert got["dry"] == "0 0"
    assert ast.literal_eval(got["same"]) == (0, 0, 7)
    assert ast.literal_eval(got["ok"]) == (True, "rain 36.0 mm/h for 600 s")
    assert ast.literal_eval(got["wet"]) == (spec.STATE_RAIN_SHARED, spec.STATE_WET, 30)
    assert ast.literal_eval(got["expired"]) == (0,)
    assert 58 <= int(got["rain"]) <= 60                          # 36 mm/h for 600 s = 6.0 mm, in 0.1 mm
    msg = cbor.decode(bytes.fromhex(ast.literal_eval(got["payload"])))
    assert msg[4] == spec.ROLE_CODE and msg[5] == {0: "mm", 1: 0} and 7 not in msg     # levels: no register
    rows = msg[6]
    assert len(rows) == 1 and len(rows[0]) == len(spec.FIELDS)
    level, rise, rain_x10, mv, fault, ratio, tau_s, danger, state = rows[0]
    assert 35 <= level <= 45 and mv == 3700 and fault == 0 and danger == 1000 and tau_s == 1200


def test_a_4_20_ma_transducer_gives_the_level_and_a_cut_loop_is_a_fault_not_a_flood():
    """(uA - 4000) x range_mm / 16000; no loop current (a cut cable) is echo_lost, never a level."""
    body = """
d = make({"sensor": "ma", "range_mm": 2000, "rain_mm_tip": 0})
hal.loop_ma.uv = (4000 + 16000 * 500 // 2000) * 150          # 500 mm
run(d, 1800)
print("level", d.status()["level_mm"])
hal.loop_ma.uv = 0                                            # a cut cable: no loop current
run(d, 1800)
print("cut", (alarms(d.sink), d.status()["level_mm"]))
"""
    got = _lines(vm.run(_script(body), timeout=120), "level", "cut")
    assert got["level"] == 500
    assert got["cut"] == ([("sensor_fault", 1, spec.F_ECHO_LOST)], spec.NO_LEVEL)


def test_the_recession_arithmetic_is_a_fair_logarithm():
    """The Q12 ln table that times recessions, against math.log over the heights a drain sees."""
    body = """
from roles.drain_detect import ln_q12
worst = 0
for a in (50, 77, 130, 400, 999, 2500, 9000):
    for b in range(25, a, 7):
        e = abs((ln_q12(a) - ln_q12(b)) / 4096 - math.log(a / b))
        worst = max(worst, e)
print("worst", worst)
"""
    assert _lines(vm.run(_script(body), timeout=120), "worst")["worst"] < 0.004
    assert math.isclose(spec.speed_of_sound_mm_ms(30), 349.48)
