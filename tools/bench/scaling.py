"""prapa bench scaling: the whole gateway against the number of meters it serves (10 to 5,000; a town has ~1,400).

For each device count: a fresh data_dir and registry with that many meters, each with its own key; a fresh
Mosquitto; a real `prapa gateway run` with one UDP link on loopback; and, in another process, the boards:
each says hello (answered by a time sync), then sends its readings as boards do (frames of 32 consecutive
readings, sealed with its own key and counters, wall time known), resends a frame whose ack did not come
within the board's 1.5 s, and verifies and decrypts every ack (cryptography's AESCCM: the generator must not
be what is measured, so its own CPU share is a figure). The offered load is the same at every count: at most
--window frames are in flight overall (a device holds at most window/devices of them, so 10 devices keep
the gateway as busy as 5,000; a real board keeps one).

Two runs per count. Flat out: readings/s from the first readings frame sent to the last reading PUBACKed
(the store's own timestamps), the gateway's CPU (user+sys, /proc) per 100,000 readings, ack round trip at
the boards. Steady: --steady-readings paced at --steady-rate readings/s, for commit-to-PUBACK latency
(the store's timestamps) and the ack round trip of an unloaded gateway. Then: every reading sent is in the
store exactly once and PUBACKed; the gateway's refusals by reason (unknown_device once the receiver's
device limit is reached); its memory a second after start and at its peak (VmHWM). A device count gets
at least two frames per device, so the readings of a count may exceed --readings.

Flatness (the goal: within 20 % from 10 to 5,000): each count's readings/s and p99s against the smallest
count's, in the table and as each figure's baseline in the `prapa bench all` record.

Exit codes: 0 the figures were measured; 1 a run failed (the gateway or the boards died); 2 bad arguments.
"""

import argparse
import json
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from protocol.errors import UsageError
from tools import args as types

ROWS = 32                        # readings a frame (a board's MAX_BATCH)
DEFAULT_COUNTS = (10, 100, 1000, 5000)
QUICK_COUNTS = (10, 1000)
DEFAULT_READINGS = 96_000        # flat out, per count (at least 2 frames a device)
QUICK_READINGS = 9_600
WINDOW_FRAMES = 128              # frames in flight overall, whatever the device count
STEADY_RATE = 5000               # readings/s offered for the latency run
STEADY_READINGS = 16_000
QUICK_STEADY_READINGS = 3_200
FIRST_DEVICE = 0x3000


def device_counts(text):
    """--devices: comma-separated counts, each 1..20000, ascending order kept as given."""
    try:
        counts = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or any(not 1 <= n <= 20_000 for n in counts):
        raise UsageError(types.WHERE, f"{text!r} is not a list of device counts",
                         "give counts from 1 to 20000 separated by commas, as 10,100,1000,5000")
    return counts


def add_parser(bsub, parser_class=None):
    p = bsub.add_parser("scaling", help="readings/s, CPU, memory and latency of the gateway against device count "
                        "(UDP, 10 to 5,000 meters)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=device_counts, default=None,
                   help="device counts to run, comma-separated (default 10,100,1000,5000; --quick: 10,1000)")
    p.add_argument("--readings", type=types.count, default=None,
                   help=f"readings flat out per count (default {DEFAULT_READINGS}; --quick: {QUICK_READINGS})")
    p.add_argument("--window", type=types.count, default=WINDOW_FRAMES,
                   help=f"frames in flight overall (default {WINDOW_FRAMES})")
    p.add_argument("--steady-readings", type=types.count, default=None,
                   help=f"readings of the latency run (default {STEADY_READINGS}; --quick: {QUICK_STEADY_READINGS})")
    p.add_argument("--steady-rate", type=types.count, default=STEADY_RATE,
                   help=f"readings/s offered in the latency run (default {STEADY_RATE})")
    p.add_argument("--quick", action="store_true", help="10 and 1,000 devices, small counts: under a minute")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


def run(args):
    figures = measure(args)
    print(json.dumps(figures) if args.json else table(figures))
    return 0


def measure(args):
    """The figures (a dict): the run's settings, one dict per device count ("devices_<n>"), and "flatness"."""
    counts = args.devices or (QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    readings = args.readings or (QUICK_READINGS if args.quick else DEFAULT_READINGS)
    steady = args.steady_readings or (QUICK_STEADY_READINGS if args.quick else STEADY_READINGS)
    figures = {"device_counts": ",".join(map(str, counts)), "window_frames": args.window, "readings_per_frame": ROWS,
               "steady_offered_readings_per_s": args.steady_rate}
    for n in counts:
        print(f"scaling: {n} devices ...", file=sys.stderr, flush=True)
        figures[f"devices_{n}"] = measure_count(n, readings, args.window, steady, args.steady_rate)
    figures["flatness"] = flatness(figures, counts)
    return figures


# -- the gateway's side: one device count -------------------------------------------------------------
def _status_kb(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_s(pid):
    """user + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def refusals(http_port):
    """{reason: frames refused} of the gateway's /metrics, the reasons above 0 only."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^prapa_frames_rejected_total\{reason="(\w+)"\} ([0-9.e+]+)$', text, re.M):
        if float(m.group(2)) > 0:
            out[m.group(1)] = int(float(m.group(2)))
    return out


def _pct_ms(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[int(q * (len(values) - 1))] * 1000, 1)


class BoardsProcess:
    """The load generator: a child process (python -c) speaking one JSON line each way per phase."""

    def __init__(self, keys, gateway_port, window):
        code = "from tools.bench.scaling_boards import boards_main; boards_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask({"keys": {str(d): k.hex() for d, k in keys.items()}, "port": gateway_port, "window": window})

    def ask(self, command):
        """Send a command; return the child's answer (the phase's results)."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited {self.proc.wait()}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_forwarded(db, total, timeout_s=300):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if db.execute("SELECT COUNT(*) FROM entries WHERE kind='reading' AND forwarded_at IS NOT NULL"
                      ).fetchone()[0] >= total:
            return True
        time.sleep(0.1)
    return False


def exactly_once(db, sent):
    """What the store holds against what the boards sent ({device: readings, seqs 1..n}): readings
    missing, readings not sent, devices whose stored seqs are not exactly 1..n, and not PUBACKed."""
    stored = {d: (n, lo, hi) for d, n, lo, hi in db.execute(
        "SELECT device_id, COUNT(*), MIN(seq), MAX(seq) FROM entries WHERE kind='reading' AND boot_id=1"
        " GROUP BY device_id")}
    missing = sum(max(0, n - stored.get(d, (0,))[0]) for d, n in sent.items())
    extra = db.execute("SELECT COUNT(*) FROM entries WHERE kind='reading'").fetchone()[0] - sum(sent.values()) + missing
    wrong = sum(1 for d, n in sent.items() if n and stored.get(d) != (n, 1, n))
    wrong += sum(1 for d in stored if d not in sent or not sent[d])
    unforwarded = db.execute("SELECT COUNT(*) FROM entries WHERE kind='reading' AND forwarded_at IS NULL").fetchone()[0]
    return {"readings_missing": missing, "readings_not_sent_or_twice": extra, "devices_seqs_not_exact": wrong,
            "readings_not_pubacked": unforwarded}


def measure_count(devices, readings, window, steady_readings, steady_rate):
    """The figures of one device count (a dict): see FIGURES."""
    from gateway.store import Store
    from tools.broker import Broker, free_port
    from tools.gateway_process import GatewayProcess, register, write_config
    frames_per_device = max(2, math.ceil(readings / ROWS / devices))
    with tempfile.TemporaryDirectory(prefix="prapa-scaling-") as tmp:
        tmp = Path(tmp)
        broker = Broker(tmp / "broker")
        udp_port, http_port = free_port(), free_port()
        # A UDP socket's port picked free above is taken by the gateway's bind; nothing else binds it between.
        cfg = write_config(tmp, [], broker.port, site="bench", http_port=http_port,
                           extra=f'\n[[links]]\ntype = "udp"\nbind = "127.0.0.1:{udp_port}"\n')
        keys = {FIRST_DEVICE + i: secrets.token_bytes(16) for i in range(devices)}
        register(tmp, keys)
        gw = GatewayProcess(cfg).start()
        boards = db = None
        try:
            gw.wait_started()
            time.sleep(1.0)
            pid = gw.proc.pid
            rss_start_kb = _status_kb(pid, "VmRSS")
            boards = BoardsProcess(keys, udp_port, window)
            hello = boards.ask({"phase": "hello"})
            cpu0 = _cpu_s(pid)
            flat = boards.ask({"phase": "flat", "frames_per_device": frames_per_device})
            db = Store(tmp / "data" / "store.db", readonly=True, timeout=10).db
            flat_n = sum(flat["sent"].values())
            if not _wait_forwarded(db, flat_n):
                raise RuntimeError(f"{devices} devices: the readings were not all PUBACKed within 300 s")
            cpu = _cpu_s(pid) - cpu0
            last_puback = db.execute("SELECT MAX(forwarded_at) FROM entries WHERE kind='reading'").fetchone()[0]
            steady = boards.ask({"phase": "steady", "readings": steady_readings, "rate": steady_rate})
            total = sum(steady["sent"].values())
            _wait_forwarded(db, total, 60)
            latencies = [r[0] for r in db.execute(
                "SELECT forwarded_at - received_at FROM entries WHERE kind='reading' AND received_at >= ?"
                " AND forwarded_at IS NOT NULL", (steady["t_first_send"],))]
            checks = exactly_once(db, {int(d): n for d, n in steady["sent"].items()})
            time.sleep(1.2)                          # the status loop puts the refusals into /metrics each second
            refused = refusals(http_port)
            peak_kb, end_kb = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS")
        finally:
            if boards:
                boards.close()
            if db is not None:
                db.close()
            gw.stop()
            broker.stop()
    elapsed = last_puback - flat["t_first_send"]
    return {
        "devices": devices, "devices_answered": hello["answered"], "hello_s": hello["seconds"],
        "readings": flat_n, "frames": flat["frames"],
        "readings_per_s": round(flat_n / elapsed),
        "gateway_cpu_s_per_100k_readings": round(cpu * 100_000 / flat_n, 2),
        "gateway_cpu_share": round(cpu / elapsed, 2),
        "ack_rtt_ms_p99_flat_out": flat["rtt_ms_p99"],
        "commit_to_puback_ms_p50": _pct_ms(latencies, 0.5), "commit_to_puback_ms_p99": _pct_ms(latencies, 0.99),
        "ack_rtt_ms_p50": steady["rtt_ms_p50"], "ack_rtt_ms_p99": steady["rtt_ms_p99"],
        "steady_readings_per_s": steady["readings_per_s"],
        "gateway_rss_mb_after_start": round(rss_start_kb / 1024, 1),
        "gateway_peak_rss_mb": round(peak_kb / 1024, 1), "gateway_rss_mb_at_end": round(end_kb / 1024, 1),
        "resends": hello["resends"] + flat["resends"] + steady["resends"],
        "acks_refused_by_boards": flat["acks_refused"] + steady["acks_refused"],
        "readings_sent": sum(steady["sent"].values()), **checks,
        "gateway_refusals": sum(refused.values()), "gateway_refusals_by_reason": refused,
        "generator_cpu_share": flat["cpu_share"], "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def flatness(figures, counts):
    """Each count's readings/s and p99s against the smallest count's (1.0: flat; the goal: within 0.8..1.2)."""
    base = figures[f"devices_{counts[0]}"]
    out = {}
    for n in counts[1:]:
        f = figures[f"devices_{n}"]
        for key in ("readings_per_s", "commit_to_puback_ms_p99", "ack_rtt_ms_p99", "gateway_cpu_s_per_100k_readings"):
            if f.get(key) is not None and base.get(key):
                out[f"{key}_{n}_vs_{counts[0]}"] = round(f[key] / base[key], 2)
    return out


def table(figures):
    """The figures as text: one column per device count, then the flatness ratios."""
    counts = [k for k in figures if k.startswith("devices_")]
    rows = [k for k in figures[counts[0]] if k != "devices"]
    width = max(len(r) for r in rows) + 2
    head = [f"{'devices':{width}}" + "".join(f"{figures[c]['devices']:>12}" for c in counts)]
    for r in rows:
        head.append(f"{r:{width}}" + "".join(f"{json.dumps(figures[c][r]) if isinstance(figures[c][r], dict) else figures[c][r]!s:>12}"
                                             for c in counts))
    settings = [f"{k}: {v}" for k, v in figures.items() if not isinstance(v, dict)]
    flat = [f"{k:{width + 12}} {v}" for k, v in figures["flatness"].items()]
    return "\n".join(settings + [""] + head + ["", "against the smallest count (goal 0.8..1.2):"] + flat)


# -- the boards' side: the load generator (its own process) ----------------------------------------------
# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md).
FIGURES = (
    ("device_counts", "the device counts run"),
    ("window_frames", "frames in flight overall at every count (the same offered load)"),
    ("readings_per_frame", "readings a frame (a board's batch)"),
    ("steady_offered_readings_per_s", "the offered load of each count's latency run"),
    ("devices_*.devices", "meters in the registry, each with its own key"),
    ("devices_*.devices_answered", "meters whose hello the gateway answered (the rest it refused)"),
    ("devices_*.hello_s", "seconds for every meter's hello to be answered"),
    ("devices_*.readings", "readings sent flat out (frames of 32, meters round robin)"),
    ("devices_*.frames", "frames sent flat out"),
    ("devices_*.readings_per_s", "readings/s from the first frame sent to the last PUBACK (store timestamps), "
     "against the 10-device run", "devices_10.readings_per_s"),
    ("devices_*.gateway_cpu_s_per_100k_readings", "the gateway's CPU seconds (user+sys) per 100,000 readings, "
     "against the 10-device run", "devices_10.gateway_cpu_s_per_100k_readings"),
    ("devices_*.gateway_cpu_share", "the gateway's CPU seconds per second of the flat-out run"),
    ("devices_*.ack_rtt_ms_p99_flat_out", "frame sent to its ack at the boards, flat out, 99th percentile"),
    ("devices_*.commit_to_puback_ms_p50", "commit to PUBACK at the steady load, median (store timestamps)"),
    ("devices_*.commit_to_puback_ms_p99", "commit to PUBACK at the steady load, 99th percentile, against the "
     "10-device run", "devices_10.commit_to_puback_ms_p99"),
    ("devices_*.ack_rtt_ms_p50", "frame sent to its ack at the boards, steady load, median"),
    ("devices_*.ack_rtt_ms_p99", "frame sent to its ack at the boards, steady load, 99th percentile, against the "
     "10-device run", "devices_10.ack_rtt_ms_p99"),
    ("devices_*.steady_readings_per_s", "readings/s the boards achieved in the latency run (offered: "
     "steady_offered_readings_per_s)"),
    ("devices_*.gateway_rss_mb_after_start", "the gateway's resident memory a second after start"),
    ("devices_*.gateway_peak_rss_mb", "the gateway's peak resident memory (VmHWM)"),
    ("devices_*.gateway_rss_mb_at_end", "the gateway's resident memory after both runs"),
    ("devices_*.resends", "frames the boards sent again for want of an ack (hellos included)"),
    ("devices_*.acks_refused_by_boards", "downlink frames the boards refused (tag, replay): 0"),
    ("devices_*.readings_sent", "readings the boards sent, both runs"),
    ("devices_*.readings_missing", "readings sent and not in the store: 0"),
    ("devices_*.readings_not_sent_or_twice", "readings in the store beyond those sent: 0"),
    ("devices_*.devices_seqs_not_exact", "devices whose stored seqs are not exactly 1..n: 0"),
    ("devices_*.readings_not_pubacked", "readings stored and not PUBACKed at the end: 0"),
    ("devices_*.gateway_refusals", "frames the gateway refused (its /metrics)"),
    ("devices_*.gateway_refusals_by_reason.*", "frames the gateway refused for this reason"),
    ("devices_*.generator_cpu_share", "the load generator's CPU seconds per second flat out (below 1: not the "
     "bottleneck)"),
    ("devices_*.load_avg_1m_at_end", "this machine's 1-minute load average after the count (other work slows it)"),
    ("flatness.*", "a count's figure over the smallest count's (the goal: 0.8 to 1.2 for readings/s and p99)"),
)
RATIOS = ()
