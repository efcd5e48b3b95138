"""prapa bench gateway: the whole gateway service, frames in to PUBACKs out.

A real `prapa gateway run` process reads sealed, COBS-framed readings frames
(as boards send them: 32 consecutive readings of one meter per frame, meters
interleaved) from a serial pty, verifies and decrypts them, commits them with
synchronous=FULL, acknowledges them, and forwards them at QoS 1 to a real local
Mosquitto. Figures: readings/s from the first byte written to the last entry
marked PUBACKed; commit-to-PUBACK latency p50/p99 from the store's own
timestamps; the service's peak resident memory (VmHWM). Baseline, same run,
same broker: the same number of readings published one message each by bare
paho at QoS 1 (a relay with no store, no crypto, no acks).
"""

import os
import pty
import statistics
import tempfile
import time
import tty
from pathlib import Path

import cbor2

from gateway.store import Store
from tools.bench import print_figures
from tools import args as types

ROWS = 32
STEADY_RATE = 5000               # readings/s offered for the latency figure
STEADY_READINGS = 25_600         # five seconds of it


def add_parser(bsub, parser_class):
    p = bsub.add_parser("gateway", help="readings/s through the gateway service to a real broker; latency; RSS",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=types.count, default=200_000, help="readings to push through (default 200000)")
    p.add_argument("--devices", type=types.count, default=50, help="simulated meters (default 50)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


def frames(devices, n_readings):
    """Wire frames (a list) for n_readings in ROWS-row frames, round-robin over devices, each sealed with its key."""
    from protocol import link, secure
    from protocol import messages as M
    from protocol.roles import code as role_code
    from protocol.secure import MemoryCounters
    senders = {d: link.Sender(key, d, secure.UPLINK, MemoryCounters(1)) for d, key in devices.items()}
    seqs = {d: 1 for d in devices}
    out, made = [], 0
    ids = list(devices)
    i = 0
    while made < n_readings:
        d = ids[i % len(ids)]
        i += 1
        rows = [(seqs[d] + k) % 7 for k in range(ROWS)]
        register = 1000 + 3 * seqs[d]
        msg = M.readings(1, seqs[d], 900 * seqs[d], 900, role_code("meter"), M.units("L", 0, 1000), rows, register,
                         1_795_000_000 + 900 * seqs[d])
        payload = bytearray(cbor2.dumps(msg, canonical=True))
        n = senders[d].wire_into(M.READINGS, payload, len(payload))
        out.append(bytes(senders[d].wire[:n]))
        seqs[d] += ROWS
        made += ROWS
    return out, made


def _vmhwm_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run(args):
    import secrets

    from tools.gateway_process import GatewayProcess, register, write_config
    from tools.bench.gateway_forward import bare_paho
    from tools.broker import Broker
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker = Broker(tmp / "broker")
        master, slave = pty.openpty()
        tty.setraw(slave)
        devices = {0x3000 + i: secrets.token_bytes(16) for i in range(args.devices)}
        wire_frames, n = frames(devices, args.readings + STEADY_READINGS)
        wire = b"".join(wire_frames[:args.readings // ROWS])
        steady = wire_frames[args.readings // ROWS:]
        n = args.readings // ROWS * ROWS
        cfg = write_config(tmp, [os.ttyname(slave)], broker.port, site="bench")
        register(tmp, devices)
        gw = GatewayProcess(cfg).start()
        try:
            gw.wait_started()
            time.sleep(1.0)
            idle_kb = _vmhwm_kb(gw.proc.pid)
            db = Store(tmp / "data" / "store.db", readonly=True, timeout=10)
            drain = os.fdopen(os.dup(master), "rb", buffering=0)
            os.set_blocking(master, False)
            t0 = time.perf_counter()
            view = memoryview(wire)
            while view:
                try:
                    k = os.write(master, view[:4096])
                    view = view[k:]
                except BlockingIOError:
                    time.sleep(0.0005)
                try:
                    os.read(master, 65536)                  # acks coming back: keep the line moving
                except (BlockingIOError, OSError):
                    pass
            while True:
                try:
                    os.read(master, 65536)
                except (BlockingIOError, OSError):
                    pass
                done = db.count(forwarded=True)
                if done >= n or time.perf_counter() - t0 > 600:
                    break
                time.sleep(0.05)
            elapsed = time.perf_counter() - t0
            # Steady load: frames paced at STEADY_RATE readings/s; latency from the store's timestamps.
            t_steady = time.time()
            gap = ROWS / STEADY_RATE
            next_at = time.perf_counter()
            for f in steady:
                os.write(master, f)
                next_at += gap
                while time.perf_counter() < next_at:
                    try:
                        os.read(master, 65536)
                    except (BlockingIOError, OSError):
                        pass
                    time.sleep(0.001)
            total = n + len(steady) * ROWS
            end = time.perf_counter() + 30
            while time.perf_counter() < end and db.count(forwarded=True) < total:
                time.sleep(0.05)
            lat = sorted(db.forward_latencies(received_since=t_steady))
            rss_kb = _vmhwm_kb(gw.proc.pid)
            drain.close()
            db.close()
        finally:
            gw.stop()
        baseline = bare_paho(broker, [cbor2.dumps({"device": 1, "seq": i, "value": i % 7}) for i in range(min(n, 50_000))])
        broker.stop()
        os.close(master)
        os.close(slave)
    rate = done / elapsed
    figures["readings"] = done
    figures["frames_bytes"] = len(wire)
    figures["latency_offered_readings_per_s"] = STEADY_RATE
    figures["readings_per_s_received_committed_pubacked"] = round(rate)
    figures["baseline_bare_paho_qos1_msgs_per_s"] = round(baseline)
    figures["ratio_to_bare_paho"] = round(rate / baseline, 2)
    figures["commit_to_puback_ms_p50"] = round(statistics.median(lat) * 1000, 1)
    figures["commit_to_puback_ms_p99"] = round(lat[int(0.99 * (len(lat) - 1))] * 1000, 1)
    figures["gateway_peak_rss_mb"] = round(rss_kb / 1024, 1) if rss_kb else None
    figures["gateway_rss_mb_after_start"] = round(idle_kb / 1024, 1) if idle_kb else None
    print_figures(figures, args.json)
    return 0
