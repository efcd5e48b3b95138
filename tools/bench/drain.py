"""prapa bench drain: what a crew is told, how early, how often wrongly, and how long a battery lasts.

  storms     --storms seeded design storms (peak 40-90 mm/h, 1-3 h, peaking early or late) over a
             catchment of --drains drains, one partly blocked (blockage 0.65-0.85), each drain with its
             own area and sensor noise: the blocked drain's detection lead time before its simulated
             overflow (first alarm, and first flood_danger or blocked; median and worst), the healthy
             drains' flood_danger or blocked alarms (goal 0), and how often the ranking
             (gateway/ranking.py) puts the blocked drain first at the instant it overflows
  dry month  the catchment through --days of showers with sensor noise, lost echoes and one fault
             window per drain (stuck, blind zone, out of range in turn): flood_danger, level_warning,
             rising_fast or blocked alarms per drain-month (goal 0), and the faults reported as faults
  power      wakes a day of a battery drain from the dry month's samples, the time a wake takes
             (boot, the ping burst, the link exchange measured on a virtual board that deep-sleeps),
             and from them and the ESP32 datasheet's currents the battery's life, on RS-485 and on Wi-Fi
  heap       the drain board's lowest free heap over a storm on a virtual board, as a share of the
             esp32-devkitc budget

How it runs: the storms and the month are the board's own logic (firmware/roles/drain.py) on the real
MicroPython VM, its sonar and gauge replayed at the HAL seam from the world model (tools/sim/worlds/
drain.py: the same events a virtual board gets), board time stepped as fast as the VM goes; the
gateway's rain sharing is its own code (gateway/catchments.py RainSharing) fed the gauge's tips as a
reading a minute. The transport is not in this loop: tests/tools/
test_drain_catchment.py runs one storm end to end through the gateway and the broker. The power and
heap figures come from virtual boards on the bench (deep sleep and all).
"""

import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tools import args as types
from tools.bench import bench_vm, print_figures
from tools.sim import vm as vms

ROOT = Path(__file__).resolve().parents[2]
STEP_S = 5                     # board seconds per replay step: the world's ping_update_s
DANGER_MM = 1000                # the spec's defaults: grate 1200 mm, margin 200 mm
# ESP32-WROOM-32 typical currents (Espressif ESP32 Series Datasheet, "Power Consumption by Power Modes"
# and "RF Power-Consumption Specifications"): deep sleep with the RTC timer and RTC memory 10 uA; CPU at
# 240 MHz with the radio off 50 mA (30-68 mA); Wi-Fi transmitting 802.11n 180 mA and receiving 100 mA,
# about half a second of each around an association and one datagram exchange.
DEEP_SLEEP_UA = 10
ACTIVE_MA = 50
WIFI_MA_S = 0.5 * 180 + 0.5 * 100     # mA-s per wake on Wi-Fi, beyond the CPU
SENSOR_MA = 8                          # JSN-SR04T while powered for a burst (switched off asleep)
BOOT_S = 0.35                          # deep-sleep wake to main.py on an ESP32 with MicroPython
BATTERY_MAH = 6800                     # two 18650 cells in parallel
USABLE = 0.8
SELF_DISCHARGE_PER_MONTH = 0.02        # a Li-ion cell's own loss, about 2 % a month at 25 C

# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("vm", "the MicroPython VM the board's logic ran on"),
    ("storms.storms", "seeded design storms run"),
    ("storms.drains", "drains in the catchment, one partly blocked"),
    ("storms.blocked_overflowed", "storms in which the blocked drain overflowed"),
    ("storms.missed_before_overflow", "of those, storms with no alarm before the overflow (goal 0)"),
    ("storms.lead_min_median", "minutes from the blocked drain's first alarm to its overflow, median"),
    ("storms.lead_min_worst", "the same, worst storm"),
    ("storms.flood_lead_min_median", "minutes from its first flood_danger or blocked alarm to the overflow, median"),
    ("storms.flood_lead_min_worst", "the same, worst storm"),
    ("storms.healthy_flood_or_blocked_alarms", "flood or blocked alarms of healthy drains the water did not justify "
     "(goal 0)"),
    ("storms.ranked_first_share", "share of overflows at which the ranking put the blocked drain first"),
    ("dry_month.days", "days of showers, noise, lost echoes and a fault window per drain"),
    ("dry_month.drains", "drains in that run"),
    ("dry_month.false_alarms_per_drain_month", "level, flood, rising or blocked alarms per drain-month (goal 0)"),
    ("dry_month.false_alarms", "those alarms, counted"),
    ("dry_month.fault_windows", "sensor fault windows injected (one per drain)"),
    ("dry_month.faults_reported", "sensor_fault alarms raised, against the windows injected", "dry_month.fault_windows"),
    ("dry_month.samples_per_day", "wakes a day a drain made"),
    ("power.wakes_per_day", "wakes a day (from the dry month)"),
    ("power.link_awake_ms_measured", "real ms a deep-sleeping virtual board stays awake per wake (VM start to sleep)"),
    ("power.awake_s_per_wake", "seconds awake per wake: boot, ping burst and that link time"),
    ("power.rs485_days", "battery life on RS-485 (two 18650 cells, datasheet currents, self-discharge)"),
    ("power.wifi_days", "battery life on Wi-Fi, against RS-485", "power.rs485_days"),
    ("power.mah_per_day_rs485", "mAh a day on RS-485"),
    ("power.mah_per_day_wifi", "mAh a day on Wi-Fi"),
    ("heap.heap_min_free_bytes", "the drain board's lowest free heap over a storm, against the budget",
     "heap.heap_budget_bytes"),
    ("heap.heap_budget_bytes", "the esp32-devkitc's heap budget"),
    ("heap.peak_heap_share", "the heap's peak use as a share of the budget"),
    ("seconds", "wall seconds the drain benchmark took"),
)
RATIOS = ()


def add_parser(bsub, parser_class):
    p = bsub.add_parser("drain", help="detection lead time, false alarms, ranking, battery life, heap",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--storms", type=types.count, default=20, help="seeded storms (default 20)")
    p.add_argument("--drains", type=types.count, default=10, help="drains in the catchment (default 10)")
    p.add_argument("--days", type=types.count, default=30, help="days of the dry month (default 30)")
    p.add_argument("--wakes", type=types.count, default=8, help="deep-sleep wakes timed for the power figures (default 8)")
    p.add_argument("--heap-hours", type=types.positive_seconds, default=None,
                   help="storm hours on the virtual board for the heap figure (default 2; 0.5 with --quick)")
    p.add_argument("--quick", action="store_true", help="3 storms over 4 drains, a dry week over 3 drains, "
                   "half an hour of storm for the heap")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(p)
    p.set_defaults(func=run)


# -- the board's logic on the VM, its sonar and gauge replayed at the HAL seam -----------------------
VM_SCRIPT = r"""
import json, os, struct, sys, vfs, _vboard
import roles.drain
from flashlog import Record
from protocol.roles import drain as spec
job = json.loads(sys.stdin.read())
STEP = job["step"]
class Sonar:
    def __init__(self, hal):
        self.hal = hal
    def ping_us(self, timeout_us):
        e = self.hal.echo
        i = self.hal.t // STEP
        v = e[i] if i < len(e) else e[-1]
        return v if 0 < v <= timeout_us else -1
    def read_mm(self):
        return -1
class Const:
    def __init__(self, v):
        self.v = v
    def read_uv(self):
        return self.v
class Gauge:
    def __init__(self, hal):
        self.hal = hal
        self.n = 0
    def count(self):
        tips, t = self.hal.tips, self.hal.t
        while self.n < len(tips) and tips[self.n] <= t:
            self.n += 1
        return self.n
class ReplayHal:
    platform = "replay"
    board = {"name": "esp32-devkitc", "role": "drain", "vfs_size_bytes": 65536, "heap_budget_bytes": 112640,
             "role_pins": {"trig_out": 18, "echo_in": 19, "sonar_rx": 23, "level_adc": 39, "rain_pulse_in": 33,
                           "battery_adc": 35}}
    def __init__(self, echo, tips):
        self.echo, self.tips, self.t = echo, tips, 0
        self.sonar, self.gauge, self.battery = Sonar(self), Gauge(self), Const(1850000)
    def ticks_ms(self):
        return (self.t * 1000) & 0x3FFFFFFF
    def link_ticks_ms(self):
        return self.ticks_ms()
    @staticmethod
    def ticks_diff(a, b):
        return ((a - b + (1 << 29)) & ((1 << 30) - 1)) - (1 << 29)
    @staticmethod
    def ticks_add(a, b):
        return (a + b) & ((1 << 30) - 1)
    def sonar_echo(self, trig, echo):
        return self.sonar
    def sonar_uart(self, rx):
        return self.sonar
    def adc(self, gpio):
        return self.battery
    def counter(self, gpio, active_level=0, filter_us=0):
        return self.gauge
    def sleep_ms(self, ms):
        pass
    def reset_cause(self):
        return "power_on"
    def wake_pin(self):
        return False
class Sink:
    def __init__(self):
        self.last_reading, self.last_daily = Record(), Record()
        self.t, self.alarms, self.active, self.samples, self.fields = 0, [], {}, 0, None
        self.last = None
    def append(self, r):
        self.samples += 1
        self.last = (r.value, bytes(r.extra))
    def alarm(self, code, active, detail):
        self.alarms.append((self.t, spec.ALARMS[code], 1 if active else 0, detail))
        self.active[code] = (1 if active else 0, detail)
def snapshot(sink):
    if sink.last is None:
        return None, {}
    level, extra = sink.last
    cols = (level,) + struct.unpack_from(spec.EXTRA_FORMAT, extra, 0)
    fields = {}
    for (name, unit, scale, missing), c in zip(spec.FIELDS, cols):
        fields[name] = None if (missing is not None and c == missing) else c * 10 ** scale
    return fields, dict((str(k), v) for k, v in sink.active.items())
for n, drain in enumerate(job["drains"]):
    f = open(job["flash"] % n, "w+b")
    f.seek(16 * 4096 - 1)
    f.write(b"\xff")
    bd = _vboard.FileBlockDevice(f, 4096, 16)
    vfs.VfsLfs2.mkfs(bd)
    vfs.mount(vfs.VfsLfs2(bd), "/fl%d" % n)
    os.chdir("/fl%d" % n)
    hal = ReplayHal(drain["echo"], drain["tips"])
    section = {}
    for key, kind, default, low, high, hint in spec.SCHEMA:
        section[key] = drain["section"].get(key, default)
    sink = Sink()
    d = roles.drain.make(hal, section, sink)
    rain = drain.get("rain", [])          # [(t, mm_h x10)] the gateway's rain commands
    ri = 0
    snap_at, snap = drain.get("snap_s", -1), None
    t = 0
    while t < job["end_s"]:
        t += STEP
        hal.t = sink.t = t
        while ri < len(rain) and rain[ri][0] <= t:
            d.command("rain", {"mm_h": rain[ri][1], "for_s": 1800})
            ri += 1
        d.sample(t)
        if d.due:
            d.service()
        if snap is None and 0 <= snap_at <= t:
            snap = snapshot(sink)
    print(json.dumps({"alarms": sink.alarms, "samples": sink.samples, "snap": snap, "end": snapshot(sink)}))
    vfs.umount("/fl%d" % n)
    f.close()
"""


def _replay(job, vm=None):
    """Run the drains of job on the VM: one result dict per drain."""
    with tempfile.TemporaryDirectory(prefix="prapa-bench-drain-") as tmp:
        job = dict(job, flash=os.path.join(tmp, "flash%d.bin"), step=STEP_S)
        env = dict(os.environ, MICROPYPATH=f".frozen:{ROOT / 'firmware'}:{ROOT}:{ROOT / 'tools' / 'sim' / 'rom'}")
        # The replay's heap, not a board's: a month of 10 drains is ~26 MB of JSON on stdin and a 2 MB list
        # of echoes per drain (32-bit), which 64M did not always hold.
        r = subprocess.run([vms.micropython_exe(vm), "-X", "heapsize=128M", "-c", VM_SCRIPT], input=json.dumps(job),
                           capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise AssertionError(f"the drain replay failed on the VM:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


# -- the world's side: the events a board would get, as the replay's arrays -------------------------
def _world(params, seed):
    from tools import boards
    from tools.sim.worlds.drain import StormDrain
    p = {k: v[0] for k, v in StormDrain.PARAMS.items()}
    p.update(params)
    return StormDrain(p, dict(boards.load("esp32-devkitc").role_pins["drain"]), random.Random(seed))


def _events(world, end_s):
    """(echo us every STEP_S from 0, tip instants in s, the world's truth at the end)."""
    from tools import boards
    from tools.sim.worlds import ANALOG, LEVEL
    pins = boards.load("esp32-devkitc").role_pins["drain"]
    first = world.analog_levels().get(pins["echo_in"], 0)
    updates, tips = [(0, first)], []
    for t_us, gpio, kind, value in world.events_until(int(end_s * 1e6)):
        if gpio == pins["echo_in"] and kind == ANALOG:
            updates.append((t_us / 1e6, value))
        elif gpio == pins["rain_pulse_in"] and kind == LEVEL and value == 0:
            tips.append(int(t_us // 1e6) + 1)
    echo, k, value = [], 0, first
    for i in range(int(end_s // STEP_S) + 1):
        while k < len(updates) and updates[k][0] <= i * STEP_S:
            value = updates[k][1]
            k += 1
        echo.append(int(value))
    return echo, tips, world.truth(int(end_s * 1e6))


def _shared_rain(tips, mm_tip, end_s):
    """The gateway's rain commands for the drains without a gauge, [(t, mm_h x10)]: the gauge's tips
    as a reading a minute, through the gateway's own rule (gateway/catchments.py RainSharing)."""
    from gateway.catchments import RainSharing
    from protocol.roles.drain import STATE_HAS_GAUGE
    sharing, out, k = RainSharing(), [], 0
    told = {"id": 2, "role": "drain", "catchment": "bench", "fields": {"state": 0}, "wall_t": None}
    for t in range(60, int(end_s), 60):
        n = k
        while k < len(tips) and tips[k] <= t:
            k += 1
        gauge = {"id": 1, "role": "drain", "catchment": "bench", "wall_t": t,
                 "fields": {"rain_mm": (k - n) * mm_tip, "state": STATE_HAS_GAUGE}}
        sharing.observe(1, "drain", t, gauge["fields"], t)
        out += [(t, args["mm_h"]) for _device, args in sharing.tick(t, [gauge, told])]
    return out


def storm_case(seed, drains):
    """(job, the blocked drain's index, its overflow instant or None, each drain's peak level in mm) for
    one seeded storm: within what the street's drains are built for (a healthy one stays below danger)."""
    rng = random.Random(seed)
    storm = {"storm_at_h": 0.25, "storm_hours": rng.uniform(1, 2.5), "peak_mm_h": rng.uniform(40, 75),
             "peak_at": rng.uniform(0.2, 0.5), "noise_mm": 3, "lost_echo_pct": 1, "sensor": 1}
    blocked = rng.randrange(1, drains)
    end_s = (storm["storm_at_h"] + storm["storm_hours"] + 2) * 3600
    jobs, overflow, gauge_tips, peaks = [], None, [], []
    for i in range(drains):
        params = dict(storm, area_m2=rng.uniform(220, 300))
        if i == 0:
            params["rain_mm_tip"] = 0.2
        if i == blocked:
            params["blockage"] = rng.uniform(0.65, 0.85)
        echo, tips, truth = _events(_world(params, seed * 100 + i), end_s)
        if i == 0:
            gauge_tips = tips
        if i == blocked:
            overflow = truth["overflow_at_s"]
        peaks.append(truth["peak_level_mm"])
        jobs.append({"section": {"rain_mm_tip": 0.2} if i == 0 else {}, "echo": echo, "tips": tips})
    rain = _shared_rain(gauge_tips, 0.2, end_s)
    for i, job in enumerate(jobs):
        if i:
            job["rain"] = rain
        job["snap_s"] = overflow if overflow is not None else -1
    return {"drains": jobs, "end_s": end_s}, blocked, overflow, peaks


def _ranked_first(results, blocked, at_s):
    """Does gateway/ranking.py put the blocked drain first from what the drains said at at_s?"""
    from gateway.ranking import rank
    drains = []
    for i, r in enumerate(results):
        fields, active = r["snap"] or (None, {})
        drains.append({"id": i + 1, "name": f"drain-{i + 1:03d}", "role": "drain", "catchment": "bench",
                       "fields": fields, "alarms": {int(k): tuple(v) for k, v in active.items()},
                       "last_seen": at_s})
    return rank(drains, at_s)["bench"][0]["id"] == f"{blocked + 1:08x}"


def storms(count, drains, vm=None, progress=None):
    leads, danger_leads, false_alarms, ranked, missed, no_overflow = [], [], 0, 0, 0, 0
    for seed in range(1, count + 1):
        job, blocked, overflow, peaks = storm_case(seed, drains)
        results = _replay(job, vm)
        if progress:
            progress(seed / count)
        for i, r in enumerate(results):      # wrong: blocked on a healthy drain, danger the water never reached
            names = {a[1] for a in r["alarms"] if a[2]}
            if i != blocked and ("blocked" in names or ("flood_danger" in names and peaks[i] < DANGER_MM - 50)):
                false_alarms += 1
        if overflow is None:
            no_overflow += 1
            continue
        raised = [a for a in results[blocked]["alarms"] if a[2] and a[1] != "sensor_fault"]
        first = min((a[0] for a in raised), default=None)
        flood = min((a[0] for a in raised if a[1] in ("flood_danger", "blocked")), default=None)
        if first is None or first > overflow:
            missed += 1
            continue
        leads.append((overflow - first) / 60)
        if flood is not None and flood <= overflow:
            danger_leads.append((overflow - flood) / 60)
        ranked += _ranked_first(results, blocked, overflow)
    overflowed = count - no_overflow
    return {"storms": count, "drains": drains, "blocked_overflowed": overflowed, "missed_before_overflow": missed,
            "lead_min_median": round(statistics.median(leads), 1) if leads else None,
            "lead_min_worst": round(min(leads), 1) if leads else None,
            "flood_lead_min_median": round(statistics.median(danger_leads), 1) if danger_leads else None,
            "flood_lead_min_worst": round(min(danger_leads), 1) if danger_leads else None,
            "healthy_flood_or_blocked_alarms": false_alarms,
            "ranked_first_share": round(ranked / overflowed, 3) if overflowed else None}


FAULTS = ("stuck", "blind", "oor")


def dry_month(days, drains, vm=None):
    end_s = days * 86400
    jobs, gauge_tips = [], []
    for i in range(drains):
        fault = FAULTS[i % len(FAULTS)]
        params = {"showers_per_week": 3, "noise_mm": 3, "lost_echo_pct": 2, "sensor": 1, "rain_seed": 7,
                  f"{fault}_at_h": 24 * (1 + (i * 5) % max(1, days - 2)), f"{fault}_hours": 6}
        if i == 0:
            params["rain_mm_tip"] = 0.2
        echo, tips, _truth = _events(_world(params, 500 + i), end_s)
        gauge_tips = tips if i == 0 else gauge_tips
        jobs.append({"section": {"rain_mm_tip": 0.2} if i == 0 else {}, "echo": echo, "tips": tips})
    rain = _shared_rain(gauge_tips, 0.2, end_s)
    for i, job in enumerate(jobs):
        if i:
            job["rain"] = rain
    results = _replay({"drains": jobs, "end_s": end_s}, vm)
    wrong = sum(1 for r in results for a in r["alarms"] if a[2] and a[1] != "sensor_fault")
    faults = sum(1 for r in results for a in r["alarms"] if a[2] and a[1] == "sensor_fault")
    samples = sum(r["samples"] for r in results)
    drain_months = drains * days / 30
    return {"days": days, "drains": drains, "false_alarms_per_drain_month": round(wrong / drain_months, 3),
            "false_alarms": wrong, "fault_windows": drains, "faults_reported": faults,
            "samples_per_day": round(samples / drains / days, 1)}


def wake_ms(vm=None, wakes=8):
    """Real milliseconds a battery drain stays awake per wake on a virtual board, from the VM's start to
    its deep sleep (the VM's own start, the ping burst, the link exchange with the gateway and the
    linger for a downlink): the median of `wakes` wakes, the first (a cold boot) left out."""
    from tools.rigs.board import Rig, wait_for
    with tempfile.TemporaryDirectory(prefix="prapa-bench-drain-") as tmp:
        rig = Rig(Path(tmp), "drain", {"sleep": 1, "dry_s": 60, "wet_s": 30}, speed=20, vm=vm)
        try:
            wait_for(lambda: rig.board.status()["sleeps"] >= wakes + 1, 120, f"{wakes + 1} deep sleeps")
            events = list(rig.board.events)
        finally:
            rig.close()
    awake, started = [], None
    for e in events:
        if e.get("event") == "vm_started":
            started = e["ts"]
        elif e.get("event") == "deep_sleep" and started is not None:
            awake.append((e["ts"] - started) * 1000)
            started = None
    return round(statistics.median(awake[1:]), 1) if len(awake) > 1 else None


def battery(samples_per_day, awake_s):
    """Days a battery lasts: samples_per_day wakes of awake_s each, asleep the rest, and the cells' own
    self-discharge (which, at a drain's duty cycle, costs more than the board)."""
    sleep_mas = DEEP_SLEEP_UA / 1000 * 86400
    per_wake = (ACTIVE_MA + SENSOR_MA * 0.3 / max(awake_s, 0.3)) * awake_s
    rs485 = sleep_mas + samples_per_day * per_wake + BATTERY_MAH * SELF_DISCHARGE_PER_MONTH / 30 * 3600
    wifi = rs485 + samples_per_day * WIFI_MA_S
    usable_mas = BATTERY_MAH * USABLE * 3600
    return {"rs485_days": round(usable_mas / rs485), "wifi_days": round(usable_mas / wifi),
            "mah_per_day_rs485": round(rs485 / 3600, 2), "mah_per_day_wifi": round(wifi / 3600, 2)}


def heap_share(vm=None, hours=2):
    """The drain board's lowest free heap in a storm on a virtual board, as a share of its budget."""
    from tools.rigs.board import DEVICE_ID, Rig, wait_for
    with tempfile.TemporaryDirectory(prefix="prapa-bench-drain-") as tmp:
        rig = Rig(Path(tmp), "drain", {"rain_mm_tip": 0.2, "dry_s": 300, "wet_s": 30},
                  extra={"link": {"health_s": 300}}, speed=120, vm=vm,
                  world=["storm_drain.storm_at_h=0.02", "storm_drain.rain_mm_tip=0.2", "storm_drain.sensor=1"])
        try:
            wait_for(lambda: rig.board.status()["world"]["storm_drain"]["t_us"] >= hours * 3600e6, 180, "a storm")
            health = wait_for(lambda: rig.gateway.health(DEVICE_ID), 30, "a health report")
        finally:
            rig.close()
    from tools import boards
    budget = boards.load("esp32-devkitc").heap_budget_bytes
    heap_min = health.get(3)              # messages.health: key 3 is the heap's low-water mark since boot
    return {"heap_min_free_bytes": heap_min, "heap_budget_bytes": budget,
            "peak_heap_share": round(1 - heap_min / budget, 3)}


def run(args):
    print_figures(measure(args), args.json)
    return 0


def measure(args):
    """The figures of one run (a dict, a section per part); the storms' progress on stdout unless --json."""
    from protocol.errors import UsageError
    count, drains, days = (3, 4, 7) if args.quick else (args.storms, args.drains, args.days)
    if drains < 2:
        raise UsageError("--drains", f"{drains} is too few", "give at least 2: one blocked, one healthy")
    vm = bench_vm(args)
    t0 = time.monotonic()

    def progress(share):
        if not args.json:
            print(f"\r  storms {share:4.0%}", end="", flush=True)

    figures = {"vm": vm, "storms": storms(count, drains, vm, progress)}
    if not args.json:
        print()
    figures["dry_month"] = dry_month(days, min(drains, 3) if args.quick else drains, vm)
    awake_ms = wake_ms(vm, args.wakes)
    pings_s = 5 * 0.06
    awake_s = BOOT_S + pings_s + (awake_ms or 0) / 1000
    figures["power"] = {"wakes_per_day": figures["dry_month"]["samples_per_day"], "link_awake_ms_measured": awake_ms,
                        "awake_s_per_wake": round(awake_s, 2),
                        **battery(figures["dry_month"]["samples_per_day"], awake_s)}
    figures["heap"] = heap_share(vm, args.heap_hours or (0.5 if args.quick else 2))
    figures["seconds"] = round(time.monotonic() - t0, 1)
    return figures
