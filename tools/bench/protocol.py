"""prapa bench protocol: wire bytes, board CPU and heap, gateway receive rate.

Every figure is printed beside a baseline measured in the same run. The board's
figures come from the MicroPython VM --vm names (default: $PRAPA_VM, else unix32
when built, else unix64) with the esp32-devkitc's heap; "vm" says which ran.
"""

import json
import random
import time

import cbor2
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from gateway.receiver import FastReceiver
from protocol import cbor, framing, link, secure
from protocol import messages as M
from protocol.examples import DEVICE_ID, KEY
from tools.sim import vm as vms
from tools import args as types

INTERVAL_S = 900
T0_WALL = 1795466400


# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("vm", "the MicroPython VM the board's figures ran on"),
    ("readings_per_frame", "15-minute meter readings that fit one 250-byte secure frame"),
    ("secure_frame_bytes", "that frame's bytes: header, CBOR payload and CCM tag"),
    ("uart_wire_bytes", "the same frame on the UART, COBS framing included"),
    ("senml_cbor_bytes_per_reading", "SenML-CBOR (RFC 8428, integer labels, base name/time/unit) per reading"),
    ("senml_cbor_base_value_bytes_per_reading", "SenML-CBOR with a base value too, per reading"),
    ("thingsboard_json_bytes_per_reading", "ThingsBoard gateway telemetry JSON per reading"),
    ("bytes_per_reading_all_in", "our wire bytes per reading all-in, against SenML-CBOR", "senml_cbor_bytes_per_reading"),
    ("bytes_per_reading_all_in", "the same, against SenML-CBOR with a base value",
     "senml_cbor_base_value_bytes_per_reading"),
    ("bytes_per_reading_all_in", "the same, against ThingsBoard's telemetry JSON", "thingsboard_json_bytes_per_reading"),
    ("vm_us_per_report_hot_path", "board CPU per report on the VM, preallocated path, against the general encoder",
     "vm_us_per_report_general_path"),
    ("vm_us_per_report_general_path", "board CPU per report on the VM, general CBOR encoder"),
    ("vm_heap_bytes_per_report_hot_path", "heap bytes a report allocates, hot path, against the general encoder",
     "vm_heap_bytes_per_report_general_path"),
    ("vm_heap_bytes_per_report_general_path", "heap bytes a report allocates, general encoder"),
    ("gateway_frames_per_s", "frames/s the gateway's pure-Python receiver verifies and decodes, against cbor2 + AESCCM",
     "gateway_baseline_cbor2_aesccm_frames_per_s"),
    ("gateway_baseline_cbor2_aesccm_frames_per_s", "the same frames through cbor2 and cryptography's AESCCM"),
    ("gateway_fast_frames_per_s", "frames/s the gateway's fast receiver (gateway/receiver.py: cbor2 + AESCCM, the "
     "reference's checks) verifies and decodes, against bare cbor2 + AESCCM",
     "gateway_baseline_cbor2_aesccm_frames_per_s"),
    ("gateway_fast_frames_per_s", "the same, against the pure-Python receiver", "gateway_frames_per_s"),
    ("gateway_fast_serial_frames_per_s", "the fast receiver fed the same frames as UART bytes (COBS, one write each), "
     "against its datagram rate", "gateway_fast_frames_per_s"),
)
for _role in ("doser", "drain"):
    FIGURES += (
        (f"vm_{_role}_us_per_report", f"board CPU per {_role} report of 4 rows on the VM (its encode_readings_into, "
         "sealed and framed), against the meter's of 10 readings", "vm_us_per_report_hot_path"),
        (f"vm_{_role}_heap_bytes_per_report", f"heap bytes a {_role} report of 4 rows allocates (its columns go "
         "from the flash record onto the wire one by one: cbor.put_uints_le)"),
        (f"{_role}_readings_per_frame", f"15-minute {_role} readings (rows of every column) that fit one 250-byte "
         "secure frame"),
        (f"{_role}_columns", f"columns in a {_role} reading (its spec's FIELDS)"),
        (f"{_role}_bytes_per_reading_all_in", f"our wire bytes per {_role} reading all-in (UART, COBS included), "
         "against SenML-CBOR (a record a column)", f"{_role}_senml_cbor_bytes_per_reading"),
        (f"{_role}_bytes_per_reading_all_in", "the same, against ThingsBoard's telemetry JSON",
         f"{_role}_thingsboard_json_bytes_per_reading"),
        (f"{_role}_senml_cbor_bytes_per_reading", f"SenML-CBOR per {_role} reading: a record (name, unit, value, "
         "time) a column, base name and time once"),
        (f"{_role}_thingsboard_json_bytes_per_reading", f"ThingsBoard gateway telemetry JSON per {_role} reading"),
    )
RATIOS = ("ratio_vs_senml_cbor", "ratio_vs_senml_cbor_base_value", "ratio_vs_thingsboard_json", "vm_hot_vs_general_ratio",
          "gateway_vs_baseline_ratio", "gateway_fast_vs_baseline_ratio", "gateway_fast_vs_reference_ratio")


def household_deltas(n, seed=5):
    rnd = random.Random(seed)
    return [rnd.choice([0, 0, 0, 0, 2, 5, 9, 14, 22, 30, 41]) for _ in range(n)]


def full_frame_readings():
    """As many 15-minute readings as fit one 250-byte secure frame, and the wire bytes."""
    n = 1
    while True:
        payload = cbor.encode(M.readings(1234, 99999, 86400, INTERVAL_S, 0, M.units("L", 0, 1000),
                                         household_deltas(n + 1), 1234567))
        if secure.OVERHEAD + len(payload) > framing.MAX_FRAME:
            break
        n += 1
    payload = cbor.encode(M.readings(1234, 99999, 86400, INTERVAL_S, 0, M.units("L", 0, 1000),
                                     household_deltas(n), 1234567))
    sender = link.Sender(KEY, DEVICE_ID, secure.UPLINK, secure.MemoryCounters(1))
    wire = sender.wire_into(M.READINGS, payload, len(payload))
    return n, secure.OVERHEAD + len(payload), wire


# A typical 15-minute row of each role with columns (the meter's row is one number: household_deltas),
# in its spec's FIELDS order and scale: a doser on a town main at ~10 L/s with the residual in band; a drain
# on a dry day, level low and steady, battery full.
def _doser_row(rnd):
    strokes = rnd.randint(40, 60)
    mean = rnd.randint(320, 480)
    return [strokes, strokes * 50, rnd.randint(800, 1200), mean - rnd.randint(5, 40), mean,
            mean + rnd.randint(5, 40), 900, 0, 0, 0, 4000]


def _drain_row(rnd):
    return [rnd.randint(140, 160), rnd.randint(0, 3), 0, rnd.randint(3650, 3700), 0, rnd.randint(0, 99), 0, 1200,
            rnd.choice((0, 16))]


ROLE_ROWS = {"doser": _doser_row, "drain": _drain_row}


def role_wire(role_name, seed=5):
    """A full frame of the role's readings, beside SenML-CBOR (one record a column a reading: name, unit,
    value, time; base name and time) and ThingsBoard's telemetry JSON for the same readings: per-reading
    bytes (a dict of figures named <role>_...)."""
    from protocol import roles
    spec = roles.spec(role_name)
    code, fields, rnd = roles.ROLES.index(role_name), spec.FIELDS, random.Random(seed)
    register = 1234567 if getattr(spec, "REGISTER", False) else None          # a doser's strokes register
    unit = M.units(getattr(spec, "UNIT", fields[0][1]), 0)

    def payload(rows):
        return cbor.encode(M.readings(1234, 99999, 86400, INTERVAL_S, code, unit, rows, register))
    rows = [ROLE_ROWS[role_name](rnd)]
    while secure.OVERHEAD + len(payload(rows + [ROLE_ROWS[role_name](rnd)])) <= framing.MAX_FRAME:
        rows.append(ROLE_ROWS[role_name](rnd))
    body = payload(rows)
    assert M.decode(M.READINGS, body)[6] == rows        # the rows are ones a board sends (MessageError if not)
    sender = link.Sender(KEY, DEVICE_ID, secure.UPLINK, secure.MemoryCounters(1))
    wire = sender.wire_into(M.READINGS, body, len(body))
    n = len(rows)
    records, tb = [], []
    for i, row in enumerate(rows):
        values = {}
        for (name, unit, scale, missing), raw in zip(fields, row):
            if raw == missing:
                continue
            v = raw if scale == 0 else round(raw * 10 ** scale, -scale)
            values[name] = v
            rec = {0: name, 1: unit, 2: v, 6: i * INTERVAL_S}
            if not records:
                rec.update({-2: "urn:dev:mac:0024befffe804ff1:", -3: T0_WALL})
            records.append(rec)
        tb.append({"ts": (T0_WALL + i * INTERVAL_S) * 1000, "values": values})
    senml, tb_json = len(cbor2.dumps(records)), len(json.dumps(tb, separators=(",", ":")))
    return {f"{role_name}_readings_per_frame": n, f"{role_name}_columns": len(fields),
            f"{role_name}_bytes_per_reading_all_in": round(wire / n, 2),
            f"{role_name}_senml_cbor_bytes_per_reading": round(senml / n, 2),
            f"{role_name}_thingsboard_json_bytes_per_reading": round(tb_json / n, 2)}


def senml_cbor(deltas, with_base_value):
    """RFC 8428 SenML-CBOR with integer labels: bn -2, bt -3, bu -4, bv -5, v 2, t 6."""
    total, records = 1234567, []
    for i, d in enumerate(deltas):
        total += d
        rec = {6: i * INTERVAL_S}
        rec[2] = total - 1234567 if with_base_value else total
        if i == 0:
            rec.update({-2: "urn:dev:mac:0024befffe804ff1:", -3: T0_WALL, -4: "L"})
            if with_base_value:
                rec[-5] = 1234567
        records.append(rec)
    return len(cbor2.dumps(records))


def thingsboard_json(deltas):
    total, rows = 1234567, []
    for i, d in enumerate(deltas):
        total += d
        rows.append({"ts": (T0_WALL + i * INTERVAL_S) * 1000, "values": {"volume_l": total}})
    return len(json.dumps(rows, separators=(",", ":")))


VM_SCRIPT = """
import gc, time
from protocol import cbor, link, secure
from protocol import messages as M
from protocol.examples import KEY, DEVICE_ID
import struct
from protocol.roles import meter as meter_spec, doser as doser_spec, drain as drain_spec
N = %d
deltas = bytearray([0, 3, 0, 12, 41, 7, 0, 0, 25, 2])
buf = bytearray(120)
s = link.Sender(KEY, DEVICE_ID, 0, secure.MemoryCounters(1))
def hot():
    n = meter_spec.encode_readings_into(buf, 0, 7, 120, 900, 900, 1000, 123456, deltas, 10)
    return s.wire_into(2, buf, n)
def general():
    p = cbor.encode(M.readings(7, 120, 900, 900, 0, M.units("L", 0, 1000), list(deltas), 123456))
    return s.wire_into(2, p, len(p))
ROWS = 4                        # a doser's or drain's report: 4 rows of every column (its flash records)
raw_doser = bytearray(doser_spec.EXTRA_BYTES * ROWS)
raw_drain = bytearray(drain_spec.EXTRA_BYTES * ROWS)
for i in range(ROWS):
    struct.pack_into(doser_spec.EXTRA_FORMAT, raw_doser, i * doser_spec.EXTRA_BYTES, 2200 + i, 1000, 420, 450, 480,
                     900, 0, 0, 0, 4000)
    struct.pack_into(drain_spec.EXTRA_FORMAT, raw_drain, i * drain_spec.EXTRA_BYTES, 1, 0, 3680, 0, 40, 0, 1200, 16)
strokes = [48, 50, 47, 52]
levels = [150, 151, 149, 150]
dbuf = bytearray(250)
def doser_hot():
    n = doser_spec.encode_readings_into(dbuf, 0, 7, 120, 900, 900, 123456, strokes, raw_doser, 0,
                                        doser_spec.EXTRA_BYTES, ROWS)
    return s.wire_into(2, dbuf, n)
def drain_hot():
    n = drain_spec.encode_readings_into(dbuf, 0, 7, 120, 900, 900, levels, raw_drain, 0, drain_spec.EXTRA_BYTES,
                                        ROWS)
    return s.wire_into(2, dbuf, n)
for name, fn in (("general", general), ("hot", hot), ("doser_hot", doser_hot), ("drain_hot", drain_hot)):
    fn()
    gc.collect()
    gc.disable()               # heap bytes per report: 5 reports with the GC off (20 of the general
                               # path would not fit in the board's heap on the 32-bit VM)
    a0 = gc.mem_alloc()
    for _ in range(5):
        fn()
    a1 = gc.mem_alloc()
    gc.enable()
    gc.collect()
    t0 = time.ticks_us()       # time per report: N reports, GC on (as on the board)
    for _ in range(N):
        fn()
    dt = time.ticks_diff(time.ticks_us(), t0)
    print(name, dt / N, (a1 - a0) / 5)
"""


def board_cpu(reports, vm=None):
    import os
    import subprocess
    from pathlib import Path

    from tools import boards
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MICROPYPATH=f".frozen:{root}")
    heap = boards.load("esp32-devkitc").heapsize_option(vm)
    out = subprocess.run([vms.micropython_exe(vm), "-X", heap, "-c", VM_SCRIPT % reports],
                         capture_output=True, text=True, env=env, check=True).stdout
    rows = {}
    for line in out.split("\n"):
        if line:
            name, us, alloc = line.split()
            rows[name] = (float(us), float(alloc))
    return rows


def gateway_rate(frames):
    """Frames/s: the reference receiver, bare cbor2 + AESCCM, and the fast receiver on datagrams and on
    the same frames as serial bytes."""
    sender = link.Sender(KEY, DEVICE_ID, secure.UPLINK, secure.MemoryCounters(1))
    payload = cbor.encode(M.readings(7, 120, 900, 900, 0, M.units("L", 0, 1000), household_deltas(10), 123456))
    datagrams, wires = [], []
    for _ in range(frames):
        n = sender.frame(M.READINGS, payload, len(payload))
        datagrams.append(bytes(sender.frame_buf[:n]))
        w = framing.encode_into(sender.wire, framing.ADDR_GATEWAY, sender.frame_buf, n)
        wires.append(bytes(sender.wire[:w]))
    seen = []
    r = link.Receiver(secure.UPLINK, lambda d: KEY, lambda d, c, t, m: seen.append(c))
    t0 = time.perf_counter()
    for d in datagrams:
        r.datagram(d)
    ours = frames / (time.perf_counter() - t0)
    assert len(seen) == frames
    aead = AESCCM(KEY, tag_length=8)
    t0 = time.perf_counter()
    for d in datagrams:
        h = d[:secure.HEADER_LEN]
        nonce = bytearray(13)
        secure.nonce_into(nonce, DEVICE_ID, 0, int.from_bytes(h[6:10], "big"))
        cbor2.loads(aead.decrypt(bytes(nonce), d[secure.HEADER_LEN:], h))
    base = frames / (time.perf_counter() - t0)
    fast = []
    for how, items in (("datagram", datagrams), ("feed", wires)):
        seen = []
        r = FastReceiver(secure.UPLINK, lambda d: KEY, lambda d, c, t, m: seen.append(c))
        put = getattr(r, how)
        t0 = time.perf_counter()
        for d in items:
            put(d)
        fast.append(frames / (time.perf_counter() - t0))
        assert len(seen) == frames
    return ours, base, fast[0], fast[1]


def add_parser(bsub, parser_class):
    p = bsub.add_parser("protocol", help="wire bytes per reading, board CPU and heap per report, gateway rate",
                        description=__doc__)
    p.add_argument("--reports", type=types.count, default=2000, help="reports timed in the VM (default 2000)")
    p.add_argument("--frames", type=types.count, default=20000, help="frames for the gateway rate (default 20000)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(p)
    p.set_defaults(func=run)


def run(args):
    from tools.bench import print_figures
    print_figures(measure(args), args.json)
    return 0


def measure(args):
    """The figures of one run (a dict)."""
    from tools.bench import bench_vm
    vm = bench_vm(args)
    n, frame_len, wire_len = full_frame_readings()
    deltas = household_deltas(n)
    senml, senml_bv, tb = senml_cbor(deltas, False), senml_cbor(deltas, True), thingsboard_json(deltas)
    cpu = board_cpu(args.reports, vm)
    ours_fps, base_fps, fast_fps, fast_serial_fps = gateway_rate(args.frames)
    roles_wire = {}
    for role_name in ROLE_ROWS:
        roles_wire.update(role_wire(role_name))
    return {
        "vm": vm, "readings_per_frame": n, "secure_frame_bytes": frame_len, "uart_wire_bytes": wire_len,
        "bytes_per_reading_all_in": round(wire_len / n, 2),
        "senml_cbor_bytes_per_reading": round(senml / n, 2),
        "senml_cbor_base_value_bytes_per_reading": round(senml_bv / n, 2),
        "thingsboard_json_bytes_per_reading": round(tb / n, 2),
        "ratio_vs_senml_cbor": round(wire_len / senml, 3),
        "ratio_vs_senml_cbor_base_value": round(wire_len / senml_bv, 3),
        "ratio_vs_thingsboard_json": round(wire_len / tb, 3),
        "vm_us_per_report_hot_path": round(cpu["hot"][0], 1),
        "vm_us_per_report_general_path": round(cpu["general"][0], 1),
        "vm_hot_vs_general_ratio": round(cpu["hot"][0] / cpu["general"][0], 3),
        "vm_heap_bytes_per_report_hot_path": round(cpu["hot"][1], 1),
        "vm_heap_bytes_per_report_general_path": round(cpu["general"][1], 1),
        **{f"vm_{role}_us_per_report": round(cpu[f"{role}_hot"][0], 1) for role in ("doser", "drain")},
        **{f"vm_{role}_heap_bytes_per_report": round(cpu[f"{role}_hot"][1], 1) for role in ("doser", "drain")},
        "gateway_frames_per_s": round(ours_fps),
        "gateway_baseline_cbor2_aesccm_frames_per_s": round(base_fps),
        "gateway_vs_baseline_ratio": round(ours_fps / base_fps, 3),
        "gateway_fast_frames_per_s": round(fast_fps),
        "gateway_fast_serial_frames_per_s": round(fast_serial_fps),
        "gateway_fast_vs_baseline_ratio": round(fast_fps / base_fps, 3),
        "gateway_fast_vs_reference_ratio": round(fast_fps / ours_fps, 2),
        **roles_wire,
    }
