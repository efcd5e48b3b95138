"""The doser's control path on the real VM with the HAL seam replaced (a clock we step, inputs we set,
a pump output that counts pulses): hours of board time in seconds, under heap_lock, through interval
ends, midnight and the 2**30 ms tick wrap; the interlock table; the hard limits."""

import json

from hil_tests.support import vm
from tests.firmware.test_flashlog import FLASH_FS

LIMITS = {"max_spm": 60, "max_dose_mgl": 3, "max_l_day": 20, "ceiling_mgl": 2}
SECTION = {"interval_min": 15, "dose_mgl": 1.5, "strength_gpl": 120, "stroke_ml": 0.5, "flow_k_l": 10,
           "target_mgl": 0.5, "feedback": 1, "no_flow_s": 30, "fallback_s": 600, "flat_s": 600,
           "dead_time_s": 300}
UA_PER_MGL = 16000 // 5            # analyser 0..5 mg/L over 4..20 mA

SEAM = FLASH_FS + """
import json, micropython
from micropython import const
TOP = const((1 << 30) - 1)
class Counter:
    def __init__(self):
        self.n = 0
    def count(self):
        return self.n
class Adc:
    def __init__(self):
        self.uv = 0
    def read_uv(self):
        return self.uv
class PinIn:
    def __init__(self):
        self.v = 1
    def value(self):
        return self.v
class PinOut:
    def __init__(self, v):
        self.v = v
        self.highs = 0
    def value(self, v=None):
        if v is None:
            return self.v
        if v and not self.v:
            self.highs += 1
        self.v = v
class Stroker:
    def __init__(self):
        self.pulses = 0
    def pulse(self):
        self.pulses += 1
        return True
    def off(self):
        pass
class Uart:
    def readinto(self, b):
        return 0
    def write(self, b):
        return len(b)
class Timer:
    late_us = 0
class SeamHal:
    platform = "test"
    board = {"name": "esp32-devkitc", "role": "doser", "vfs_size_bytes": 65536, "heap_budget_bytes": 112640,
             "role_pins": {"stroke_out": 26, "pump_enable": 25, "flow_pulse_in": 14, "flow_adc": 34,
                           "residual_adc": 36, "tank_low_in": 13, "tank_level_adc": 35, "stroke_feedback_in": 32}}
    def __init__(self):
        self.ms = (1 << 30) - 5000            # five seconds before the tick wrap
        self.flow, self.fb = Counter(), Counter()
        self.res, self.flow_ma = Adc(), Adc()
        self.tank = PinIn()
        self.enable = None
        self.stroker = Stroker()
        self.u = Uart()
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
    def counter(self, gpio, active_level=0, filter_us=0):
        return self.flow if gpio == 14 else self.fb
    def adc(self, gpio):
        return self.res if gpio == 36 else self.flow_ma
    def pin_in(self, gpio, pull_up=True):
        return self.tank
    def pin_out(self, gpio, value=0):
        self.enable = PinOut(value)
        return self.enable
    def stroke_output(self, gpio, width_ms):
        return self.stroker
    def uart(self):
        return self.u
    def reset_cause(self):
        return "power_on"
    def sleep_ms(self, ms):
        pass
    def heap_free_bytes(self):
        import gc
        return gc.mem_free()
    def heap_budget_bytes(self):
        return 112640
def commission(section, limits):
    with open("config.json", "w") as f:
        f.write(json.dumps({"device_id": 7, "role": "doser", "doser": section}))
    with open("device.key", "wb") as f:
        f.write(bytes(16))
    if limits is not None:
        with open("doser_limits.json", "w") as f:
            f.write(json.dumps(limits))
import runtime
hal = SeamHal()
timer = Timer()
RES_UA = [5600]             # the residual the analyser shows, uA (4000 + mg/L x 3200)
NOISE = 1                   # a live analyser's noise: +/-30 uA alternating
def step(i, flow_every=10):
    hal.ms = hal.ms + 100 if hal.ms <= TOP - 100 else hal.ms - TOP + 99
    if flow_every and i % flow_every == 0:
        hal.flow.n += 1
    hal.res.uv = (RES_UA[0] + (30 if NOISE and (i // 10) & 1 else -30 if NOISE else 0)) * 150
    before = hal.stroker.pulses
    rt.tick(timer)
    if hal.stroker.pulses != before and FEEDBACK[0]:
        hal.fb.n += hal.stroker.pulses - before
FEEDBACK = [1]
"""


def _script(body, section=None, limits=LIMITS):
    return SEAM + "commission(%s, %s)\nrt = runtime.Runtime(hal)\nd = rt.role\n" % (
        json.dumps(section or SECTION), "None" if limits is None else json.dumps(limits)) + body


def test_dosing_allocates_nothing_through_intervals_midnight_trims_interlocks_and_the_tick_wrap():
    body = """
rt.on_time_sync(1795470000 * 1000 + 3600 * 1000 * 16)       # wall time known: midnight falls inside the run
for i in range(50):
    step(i)
d.service()
def phase(n, flow_every=10):
    for i in range(n):
        step(i, flow_every)
        if i % 500 == 0:                # the asyncio side runs between timer periods, and may allocate
            micropython.heap_unlock()
            d.service()
            micropython.heap_lock()
micropython.heap_lock()
try:
    phase(36000)                        # 1 h on target: feed-forward only
    RES_UA[0] = 4000 + 300              # residual far below target: the trim rises
    phase(36000)
    RES_UA[0] = 2000                    # a broken analyser loop (NAMUR low): fallback
    phase(3000)
    RES_UA[0] = 5600
    hal.tank.v = 0                      # tank low: stop at once
    phase(100)
    hal.tank.v = 1
    phase(36000 * 6, 0)                 # 6 h without flow: no_flow, then the day ends
    verdict = "NO_ALLOC"
except MemoryError:
    verdict = "ALLOCATED"
micropython.heap_unlock()
d.service()
st = d.status()
print(verdict, st["total_strokes"], hal.stroker.pulses, rt.up_s, d.ring_overruns, bytes(d.active[1:]).hex())
"""
    verdict, total, pulses, up_s, overruns, active = vm.run(_script(body), timeout=300).split()[-6:]
    assert verdict == "NO_ALLOC"
    assert int(total) == int(pulses) > 900          # every pulse made is counted, none more
    assert int(up_s) == (50 + 36000 * 8 + 3100) // 10
    assert active[0:2] == "01"                      # no_flow is raised at the end


def test_feed_forward_strokes_are_exact_and_the_trim_moves_the_dose_within_its_bound():
    """1 pulse/s of 10 L (10 L/s) x 1.5 mg/L / (120 mg/mL x 0.5 mL) = 0.25 strokes/s: 900 an hour
    with the residual on target; with it far below, the trim reaches +50 % (not more)."""
    body = """
for i in range(36000):
    step(i)
    if i % 50 == 0:
        d.service()
first = hal.stroker.pulses
RES_UA[0] = 4300
for i in range(36000 * 3):
    step(i)
    if i % 50 == 0:
        d.service()
print(first, d.status()["trim_pct"], d.per_l * 100 // d.base_per_l)
"""
    first, trim, ratio = vm.run(_script(body), timeout=300).split()[-3:]
    assert abs(int(first) - 900) <= 1
    assert int(trim) == 50 and int(ratio) == 150


def _matrix_script():
    return """
def run(n, flow_every=10):
    for i in range(n):
        step(i, flow_every)
        if i % 5 == 0:
            d.service()
def show(tag):
    print(tag, hal.enable.v, bytes(d.want[1:8]).hex())
run(600)
show("ok")
hal.tank.v = 0
run(1)
show("tank_low")
hal.tank.v = 1
run(300)
show("tank_open_30s")
run(400)
show("tank_open_70s")
RES_UA[0] = 4000 + int(2.5 * 3200)              # 2.5 mg/L: above the 2 mg/L ceiling
run(1)
show("over_ceiling")
RES_UA[0] = 5600
run(100)
show("back_below")
print("cmd", *rt.command("reset_interlock", {}))
run(1)
show("reset")
FEEDBACK[0] = 0                                 # the pump head air-locked: strokes unanswered
run(600)
show("no_feedback")
FEEDBACK[0] = 1
run(100)
show("feedback_back")
rt.command("reset_interlock", {})
run(1)
show("fb_reset")
run(400, 0)
show("no_flow")
run(20)
show("flow_back")
RES_UA[0] = 22000                               # NAMUR high: analyser fault, dose on the fallback
run(100)
show("analyzer_fault")
run(6000)
show("fallback_over")
RES_UA[0] = 5600
run(50)
show("analyzer_good")
"""


def test_each_interlock_stops_the_pump_at_once_and_recovers_as_the_table_says():
    lines = dict(line.split(" ", 1) for line in vm.run(_script(_matrix_script()), timeout=300).strip().split("\n")
                 if line.split(" ", 1)[0] in ("ok", "tank_low", "tank_open_30s", "tank_open_70s", "over_ceiling",
                                              "back_below", "cmd", "reset", "no_feedback", "feedback_back",
                                              "fb_reset", "no_flow", "flow_back", "analyzer_fault",
                                              "fallback_over", "analyzer_good"))
    # want bytes: 1 no_flow, 2 residual_high, 3 tank_low, 4 no_feedback, 5 analyzer, 6 daily_volume, 7 fallback_over
    assert lines["ok"] == "1 00000000000000"
    assert lines["tank_low"] == "0 00000100000000"          # within the one period that saw the switch
    assert lines["tank_open_30s"] == "0 00000100000000"     # clears only after 60 s open
    assert lines["tank_open_70s"] == "1 00000000000000"
    assert lines["over_ceiling"] == "0 00010000000000"      # stops within one period
    assert lines["back_below"] == "0 00010000000000"        # latched
    assert lines["cmd"].startswith("True cleared: residual_high")
    assert lines["reset"] == "1 00000000000000"
    assert lines["no_feedback"] == "0 00000001000000"
    assert lines["feedback_back"] == "0 00000001000000"     # latched until an operator resets it
    assert lines["fb_reset"] == "1 00000000000000"
    assert lines["no_flow"] == "0 01000000000000"
    assert lines["flow_back"] == "1 00000000000000"
    assert lines["analyzer_fault"] == "1 00000000010000"    # fallback: still dosing on flow
    assert lines["fallback_over"] == "0 00000000010001"     # fallback_s (600 s) over: stopped
    assert lines["analyzer_good"] == "1 00000000000000"


def test_a_residual_above_the_ceiling_cannot_be_reset_while_it_lasts():
    body = """
for i in range(600):
    step(i)
    if i % 5 == 0:
        d.service()
RES_UA[0] = 4000 + int(2.5 * 3200)
for i in range(10):
    step(i)
ok, detail = rt.command("reset_interlock", {})
print(ok, hal.enable.v, rt.refused, detail.split(":")[0])
"""
    assert vm.run(_script(body), timeout=120).split()[-4:] == ["False", "0", "1", "residual_high"]


def test_config_pushes_beyond_the_limits_and_limits_over_the_link_are_refused_and_change_nothing():
    body = """
import os
run_cfg = open("config.json").read()
run_limits = open("doser_limits.json").read()
tries = [
    {"device_id": 7, "role": "doser", "doser": {"dose_mgl": 3.5}},
    {"device_id": 7, "role": "doser", "doser": {"target_mgl": 2.0}},
    {"device_id": 7, "role": "doser", "doser": {"dose_mgl": 10}},
    {"device_id": 7, "role": "doser", "doser_limits": {"max_spm": 600}},
    {"device_id": 7, "role": "doser", "doser": {"max_l_day": 1000}},
]
for t in tries:
    ok, detail = rt.apply_config(t)
    print("push", ok, detail.split(" ")[0].rstrip(":"), "limit" in detail or "unknown" in detail)
print("same", open("config.json").read() == run_cfg, open("doser_limits.json").read() == run_limits, rt.refused,
      rt.reboot_at)
ok, detail = rt.apply_config({"device_id": 7, "role": "doser", "doser": {"dose_mgl": 2.5}})
print("within", ok)
"""
    out = vm.run(_script(body), timeout=120).strip().split("\n")
    pushes = [line.split()[1:] for line in out if line.startswith("push")]
    assert pushes == [["False", "doser.dose_mgl", "True"], ["False", "doser.target_mgl", "True"],
                      ["False", "doser.dose_mgl", "True"], ["False", "doser_limits", "True"],
                      ["False", "doser.max_l_day", "True"]]
    same = [line for line in out if line.startswith("same")][0].split()
    assert same[1:] == ["True", "True", "5", "-1"]          # nothing stored, no reboot, each refusal counted
    assert out[-1] == "within True"


def test_without_limits_on_flash_the_board_stays_idle_with_the_pump_off():
    body = ""
    script = SEAM + "commission(%s, None)\nrt = runtime.Runtime(hal)\n" % json.dumps(SECTION) + """
print(rt.role is None, hal.enable is None or hal.enable.v == 0, rt.config_error.split(":")[0])
"""
    assert vm.run(script + body, timeout=120).split()[-3:] == ["True", "True", "doser_limits.json"]


def test_the_daily_allowance_holds_across_a_reboot_loop():
    """20 L a day at 0.5 mL a stroke = 40,000 strokes; with max_l_day 0.1 L: 200 strokes. A board that
    reboots every few minutes must not get a fresh allowance each time."""
    limits = dict(LIMITS, max_l_day=0.1)
    body = """
import gc
total_pulses = 0
for boot in range(12):
    for i in range(3000):                        # 5 board minutes: 75 strokes wanted each boot
        step(i)
        if i % 5 == 0:
            d.service()
    total_pulses = hal.stroker.pulses
    del d
    rt = None
    gc.collect()
    rt = runtime.Runtime(hal)                    # a reboot on the same flash (no clean stop: a cut)
    d = rt.role
for i in range(20):
    step(i)
print(total_pulses, d.day_used, d.day_allow, bytes(d.want[6:7]).hex())
"""
    pulses, used, allow, daily = vm.run(_script(body, limits=limits), timeout=300).split()[-4:]
    assert int(allow) == 200
    assert int(pulses) <= 200 and int(used) >= int(pulses)      # never beyond it, never counted back
    assert daily == "01"


def test_clock_jumps_and_commands_from_the_link_cannot_refresh_the_allowance_or_stroke_the_pump():
    """A gateway (buggy or hostile) steps the board's wall clock a day forward again and again and sends
    prime and unknown commands: the daily allowance runs on the board's own running time, prime is
    console-only, and the pump never passes its daily volume."""
    limits = dict(LIMITS, max_l_day=0.05)                   # 100 strokes
    body = """
wall = 1795470000 * 1000
for jump in range(8):
    rt.on_time_sync(wall + jump * 86400 * 1000)            # a day later each time
    for i in range(3000):
        step(i)
        if i % 5 == 0:
            d.service()
before = hal.stroker.pulses
ok1, _ = rt.command("prime", {"strokes": 50})
ok2, _ = rt.command("set_limits", {"max_l_day": 1000})
print(hal.stroker.pulses, before, d.day_used, d.day_allow, ok1, ok2, rt.refused, bytes(d.want[6:7]).hex())
"""
    pulses, before, used, allow, ok1, ok2, refused, daily = vm.run(_script(body, limits=limits),
                                                                   timeout=300).split()[-8:]
    assert int(allow) == 100 and int(pulses) == int(before) <= 100 <= int(used)
    assert (ok1, ok2, refused) == ("False", "False", "2") and daily == "01"


def test_a_4_20_ma_flow_transmitter_doses_the_same_as_a_pulse_flowmeter():
    """12 mA on a 0-20 L/s transmitter is 10 L/s: the same 900 strokes an hour as 10 L/s of pulses."""
    section = dict(SECTION, flow_input="ma", flow_max_lps=20)
    body = """
hal.flow_ma.uv = 12000 * 150
for i in range(36000):
    step(i, 0)
    if i % 50 == 0:
        d.service()
first = hal.stroker.pulses
hal.flow_ma.uv = 3900 * 150                     # below 1 % of the range: no flow
for i in range(36000):
    step(i, 0)
    if i % 50 == 0:
        d.service()
print(first, hal.stroker.pulses - first, bytes(d.want[1:2]).hex())
"""
    first, after, no_flow = vm.run(_script(body, section=section), timeout=300).split()[-3:]
    assert abs(int(first) - 900) <= 2 and int(after) <= 1 and no_flow == "01"
