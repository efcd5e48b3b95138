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


def _cpu_s(pid):
    """user + system CPU seconds of a process so far (/proc/<pid>/stat), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_RSS_AFTER = ("import sys\n{imports}\nfor line in open('/proc/self/status'):\n"
              "    if line.startswith('VmRSS:'): print(int(line.split()[1]))\n")


def rss_mb_after_imports(imports):
    """Resident memory (MB) of a fresh interpreter that ran `imports` and nothing else."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER.format(imports=imports)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def run(args):
    print_figures(measure(args.readings, args.devices), args.json)
    return 0


def measure(readings, devices, steady_readings=STEADY_READINGS, steady_rate=STEADY_RATE):
    """The figures of one run (a dict): readings frames of ROWS readings over devices meters, flat out,
    then steady_readings at steady_rate readings/s for the latency."""
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
        devices = {0x3000 + i: secrets.token_bytes(16) for i in range(devices)}
        wire_frames, n = frames(devices, readings + steady_readings)
        wire = b"".join(wire_frames[:readings // ROWS])
        steady = wire_frames[readings // ROWS:]
        n = readings // ROWS * ROWS
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
            cpu0 = _cpu_s(gw.proc.pid)
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
            cpu = _cpu_s(gw.proc.pid) - cpu0
            # Steady load: frames paced at steady_rate readings/s; latency from the store's timestamps.
            t_steady = time.time()
            gap = ROWS / steady_rate
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
    figures["latency_offered_readings_per_s"] = steady_rate
    figures["readings_per_s_received_committed_pubacked"] = round(rate)
    figures["baseline_bare_paho_qos1_msgs_per_s"] = round(baseline)
    figures["ratio_to_bare_paho"] = round(rate / baseline, 2)
    figures["gateway_cpu_s_per_100k_readings"] = round(cpu * 100_000 / done, 2) if done else None
    figures["commit_to_puback_ms_p50"] = round(statistics.median(lat) * 1000, 1) if lat else None
    figures["commit_to_puback_ms_p99"] = round(lat[int(0.99 * (len(lat) - 1))] * 1000, 1) if lat else None
    figures["gateway_peak_rss_mb"] = round(rss_kb / 1024, 1) if rss_kb else None
    figures["gateway_rss_mb_after_start"] = round(idle_kb / 1024, 1) if idle_kb else None
    figures["rss_mb_gateway_imports"] = rss_mb_after_imports("import gateway.service, tools.cli")
    figures["rss_mb_bare_python"] = rss_mb_after_imports("pass")
    return figures


# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("readings", "readings pushed through flat out (frames of 32 readings, meters interleaved)"),
    ("frames_bytes", "bytes of those frames on the serial line"),
    ("latency_offered_readings_per_s", "the offered load of the latency run"),
    ("readings_per_s_received_committed_pubacked", "readings/s from the first byte written to the last PUBACK "
     "(verified, decrypted, committed with synchronous=FULL, acked, forwarded), against bare paho",
     "baseline_bare_paho_qos1_msgs_per_s"),
    ("baseline_bare_paho_qos1_msgs_per_s", "bare paho, one QoS 1 message per reading to the same broker: no store, "
     "no crypto, no acks"),
    ("gateway_cpu_s_per_100k_readings", "the gateway process's CPU seconds (user+sys) per 100,000 readings"),
    ("commit_to_puback_ms_p50", "commit to PUBACK at the steady load, median (the store's own timestamps)"),
    ("commit_to_puback_ms_p99", "commit to PUBACK at the steady load, 99th percentile"),
    ("gateway_peak_rss_mb", "the service's peak resident memory (VmHWM), against its memory after start",
     "gateway_rss_mb_after_start"),
    ("gateway_rss_mb_after_start", "the service's resident memory a second after start, against its imports alone",
     "rss_mb_gateway_imports"),
    ("rss_mb_gateway_imports", "a fresh interpreter that imported the gateway and nothing else (cbor2, sqlite3, "
     "asyncio, paho, cryptography, prometheus_client, ours), against a bare interpreter", "rss_mb_bare_python"),
    ("rss_mb_bare_python", "a fresh interpreter that imported nothing"),
)
RATIOS = ("ratio_to_bare_paho",)
