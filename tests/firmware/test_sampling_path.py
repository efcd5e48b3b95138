"""The sampling path (runtime tick + meter sample) allocates nothing: run under heap_lock in the real VM.

The HAL is the one seam replaced here (a clock we step and a counter we drive),
so hours of board time pass in a moment, through interval ends, midnight and the
2**30 ms tick wrap."""

from hil_tests.support import vm
from tests.firmware.test_flashlog import FLASH_FS

SCRIPT = FLASH_FS + """
import json, micropython
class Counter:
    n = 0
    def count(self):
        return self.n
class Uart:
    def readinto(self, b):
        return 0
    def write(self, b):
        return len(b)
class Timer:
    late_us = 0
class SeamHal:
    platform = "test"
    board = {"name": "esp32-devkitc", "role": "meter", "role_pins": {"pulse_in": 27}, "vfs_size_bytes": 65536,
             "heap_budget_bytes": 112640}
    def __init__(self):
        self.ms = (1 << 30) - 5000            # five seconds before the tick wrap
        self.c = Counter()
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
        return self.c
    def uart(self):
        return self.u
    def reset_cause(self):
        return "power_on"
    def heap_free_bytes(self):
        import gc
        return gc.mem_free()
    def heap_budget_bytes(self):
        return 112640
with open("config.json", "w") as f:
    f.write(json.dumps({"device_id": 7, "role": "meter", "meter": {"interval_min": 5, "burst_lpm": 20,
                        "burst_min": 2, "leak_h": 1, "no_pulse_h": 1}}))
with open("device.key", "wb") as f:
    f.write(bytes(16))
import runtime
hal = SeamHal()
rt = runtime.Runtime(hal)
rt.on_time_sync(1795470000 * 1000 + 3600 * 1000 * 16)     # wall time known: midnight falls inside the run
meter = rt.role
timer = Timer()
seen = bytearray(4)
def run(steps):
    for i in range(steps):
        hal.ms = (hal.ms + 100) & ((1 << 30) - 1)
        if i < 108000 and i % 3 == 0:                   # 3 h of 200 L/min, then 6 h without a pulse
            hal.c.n += 1
        timer.late_us = i % 7 * 100 if i % 5000 else 60000    # now and then later than the last bin
        rt.tick(timer)
        for k in range(1, 4):
            seen[k] |= meter.want[k]
run(50)
micropython.heap_lock()
try:
    run(9 * 36000)                                      # nine board hours, 100 ms ticks
    verdict = "NO_ALLOC"
except MemoryError:
    verdict = "ALLOCATED"
micropython.heap_unlock()
closed = (meter.head - meter.tail) % 8
print(verdict, rt.up_s, meter.status()["total_pulses"], hal.c.n, meter.ring_overruns, closed, bytes(seen[1:]).hex(),
      bytes(meter.want[1:]).hex())
"""


def test_sampling_allocates_nothing_through_intervals_midnight_alarms_and_the_tick_wrap():
    out = vm.run(SCRIPT, timeout=300)
    verdict, up_s, total, truth, overruns, closed, seen, at_end = out.split()
    assert verdict == "NO_ALLOC"
    assert int(up_s) == (9 * 36000 + 50) // 10
    assert int(total) == int(truth) > 0
    assert int(overruns) > 0 and int(closed) == 7    # nothing serviced the ring: it widened, lost nothing
    assert seen == "010101"          # leak (flow in every interval for leak_h), burst, no-pulse tamper all rose
    assert at_end == "000001"        # after 6 dry hours only the no-pulse alarm is still wanted


def test_a_rebooted_board_refuses_a_replayed_time_sync_or_command():
    """Downlink frames that change the board leave their counter on flash as the next boot's floor."""
    from protocol import link, secure
    from protocol import messages as M
    from protocol.secure import MemoryCounters
    import cbor2
    gw = link.Sender(bytes(16), 7, secure.DOWNLINK, MemoryCounters(500), addr=1)
    frames = []
    for msg_type, message in ((M.TIME_SYNC, M.time_sync(1_795_000_000_000, 0)), (M.COMMAND, M.command(1, "ping"))):
        payload = bytearray(cbor2.dumps(message, canonical=True))
        n = gw.wire_into(msg_type, payload, len(payload))
        frames.append(bytes(gw.wire[:n]))
    script = SCRIPT.split("meter = rt.role")[0] + (
        "u = rt.uplink\n"
        "u.receiver.feed(%r)\n"
        "u.receiver.feed(%r)\n"
        "print(rt.wall_boot > 0, u.received)\n"
        "del rt, u\n"
        "import gc\n"
        "gc.collect()\n"
        "rt2 = runtime.Runtime(hal)\n"                      # a reboot on the same flash
        "rt2.uplink.receiver.feed(%r)\n"
        "rt2.uplink.receiver.feed(%r)\n"
        "c = rt2.uplink.receiver.counts\n"
        "print(rt2.wall_boot, rt2.uplink.received, c['replay'] + c['too_old'])\n" % (frames[0], frames[1],
                                                                                     frames[0], frames[1]))
    script = script.replace("rt.on_time_sync(1795470000 * 1000 + 3600 * 1000 * 16)", "")
    first, second = vm.run(script, timeout=120).strip().split("\n")[-2:]
    assert first == "True 2"
    assert second == "-1 0 2"


def test_a_new_k_factor_is_refused_while_readings_wait_but_other_changes_are_taken():
    script = SCRIPT.split("micropython.heap_lock()")[0] + (
        "run(9000)\n"                                     # 15 board minutes: readings closed
        "meter.service()\n"
        "print(rt.log.entries() > 0)\n"
        "ok, detail = rt.apply_config({'device_id': 7, 'role': 'meter', 'meter': {'k_factor_l': 10}})\n"
        "print(ok, detail.split(':')[0])\n"
        "ok, detail = rt.apply_config({'device_id': 7, 'role': 'meter', 'meter': {'interval_min': 5,"
        " 'leak_h': 2}})\n"
        "print(ok)\n")
    lines = vm.run(script, timeout=120).strip().split("\n")[-3:]
    assert lines == ["True", "False meter.k_factor_l", "True"]


def test_totals_and_counts_past_2_30_and_2_31_stay_exact_and_allocate_nothing():
    """On a 32-bit board small ints end at 2**30: a meter's total passes it (and 2**31) and the HAL's
    pulse count wraps there. Sampling must not allocate (a big int would) and nothing may be lost."""
    script = SCRIPT.split("import runtime\n")[0] + """
import struct
from micropython import const
from protocol.framing import crc16
START = (1 << 31) - 500                      # the total: 2**30 and 2**31 are both behind or ahead of it
ck = bytearray(14)
struct.pack_into("<IIIH", ck, 0, START, START, START, 0)
c = crc16(ck, 0, 12)
ck[12], ck[13] = c & 255, c >> 8
with open("meter.ckpt", "wb") as f:
    f.write(ck)
import runtime
hal = SeamHal()
hal.c.n = (1 << 30) - 300                    # the HAL's count wraps 300 pulses in
rt = runtime.Runtime(hal)
meter = rt.role
timer = Timer()
TOP = const((1 << 30) - 1)
def run(steps, pulses_every):                # wraps as the HAL does in C: never a big int on the way
    for i in range(steps):
        hal.ms = hal.ms + 100 if hal.ms <= TOP - 100 else hal.ms - TOP + 99
        if pulses_every and i % pulses_every == 0:
            hal.c.n = hal.c.n + 1 if hal.c.n < TOP else 0
        rt.tick(timer)
run(20, 0)
micropython.heap_lock()
try:
    run(3000, 2)                             # 5 board minutes (one interval), 1500 pulses
    verdict = "NO_ALLOC"
except MemoryError:
    verdict = "ALLOCATED"
micropython.heap_unlock()
meter.service()
st = meter.status()
from flashlog import Record, K_READING, REC
raw = bytearray(REC * 8)
recs = [Record().unpack(raw, i * REC) for i in range(rt.log.read_unacked(raw, 8))]
r = [x for x in recs if x.kind == K_READING][0]
print(verdict, st["total_pulses"] - START, st["total_pulses"] > (1 << 31), r.reg - START, r.value)
"""
    verdict, gained, past_2_31, reg_offset, value = vm.run(script, timeout=120).split()[-5:]
    assert verdict == "NO_ALLOC"
    assert int(gained) == 1500 and past_2_31 == "True"
    assert int(reg_offset) == 0 and int(value) == 1490     # the interval closed at board second 300: 1490 pulses



def test_a_doser_and_a_drain_report_of_every_column_allocates_nothing():
    """A report's rows come off flash as raw record bytes; their columns go onto the wire one by one
    (cbor.put_uints_le), not unpacked into a tuple per row (192 bytes a 4-row report did), and sealed
    into the sender's buffers. Values past 2**30 (a 32-bit board's big ints) are the one exception."""
    script = """
import micropython, struct
from protocol import link, secure
from protocol.examples import KEY, DEVICE_ID
from protocol.roles import doser, drain
ROWS = 4
rows = {doser: (2200, 1000, 420, 450, 480, 900, 0, 65535, 0, 4000), drain: (1, 0, 3680, 255, 40, 70000, 1200, 16)}
raw = {}
for spec, cols in rows.items():
    raw[spec] = bytearray(spec.EXTRA_BYTES * ROWS)
    for i in range(ROWS):
        struct.pack_into(spec.EXTRA_FORMAT, raw[spec], i * spec.EXTRA_BYTES, *cols)
values = [48, 50, 47, 52]
buf = bytearray(250)
s = link.Sender(KEY, DEVICE_ID, 0, secure.MemoryCounters(1))
def report():
    n = doser.encode_readings_into(buf, 0, 7, 120, 900, 900, 123456, values, raw[doser], 0, doser.EXTRA_BYTES, ROWS)
    s.wire_into(2, buf, n)
    m = drain.encode_readings_into(buf, 0, 7, 120, 900, 900, values, raw[drain], 0, drain.EXTRA_BYTES, ROWS)
    s.wire_into(2, buf, m)
report()
micropython.heap_lock()
try:
    for _ in range(10):
        report()
    verdict = "NO_ALLOC"
except MemoryError:
    verdict = "ALLOCATED"
micropython.heap_unlock()
print(verdict)
"""
    assert vm.run(script, timeout=60).split()[-1] == "NO_ALLOC"
