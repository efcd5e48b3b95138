"""Gateway forwarding figures: entries/s committed into the store and PUBACKed by a real local Mosquitto.

The gateway process (store commits and the forwarder thread) is pinned to one
core and Mosquitto to another when the machine has two, so the figure is "per
core" of gateway. Baseline, same run, same broker: the same N readings
published one message each by bare paho at QoS 1 (what a relay without a store
does), and the store's commit rate alone. Entries arrive as boards send them:
frames of 16 consecutive readings of one meter, 100 meters interleaved. Latency from commit to PUBACK comes
from the store itself (forwarded_at - received_at), measured at a steady
offered load, not while a backlog drains.

Run: .venv/bin/python -m tools.bench.gateway_forward [--entries N] [--json]
"""

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

from gateway.forwarder import Forwarder
from gateway.store import Entry, Store
from tools.bench import print_figures
from tools.broker import Broker
from tools import args as types

DEVICES = 100
FRAME = 16           # readings per frame: a board sends its log in frames, the gateway stores each reading
BATCH = 96           # entries per commit: a gateway's group commit of several frames


# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("entries", "readings pushed through each run"),
    ("cores", "where the gateway and Mosquitto ran"),
    ("baseline_bare_paho_qos1_msgs_per_s", "bare paho, one QoS 1 message per reading: a relay with no store"),
    ("baseline_store_commit_only_entries_per_s", "the store's commits alone (synchronous=FULL), no forwarding"),
    ("committed_and_pubacked_entries_per_s", "entries/s committed and PUBACKed by Mosquitto, against bare paho",
     "baseline_bare_paho_qos1_msgs_per_s"),
    ("committed_and_pubacked_entries_per_s", "the same, against the store's commits alone",
     "baseline_store_commit_only_entries_per_s"),
    ("messages_per_entry", "MQTT messages per reading forwarded (readings batched per message)"),
    ("steady_offered_entries_per_s", "the offered load of the latency run"),
    ("commit_to_puback_ms_p50", "commit to PUBACK at the steady load, median, against publish to PUBACK",
     "publish_to_puback_ms_p50"),
    ("commit_to_puback_ms_p99", "commit to PUBACK at the steady load, 99th percentile"),
    ("publish_to_puback_ms_p50", "the broker's own round trip, publish to PUBACK, median"),
    ("peak_rss_mb", "peak resident memory of the process that ran it (under bench all: the suite's so far)"),
)
RATIOS = ("forwarded_vs_bare_paho_ratio", "forwarded_vs_commit_only_ratio")


def readings(n, boot=1, start=0):
    """n entries, FRAME consecutive readings of one meter at a time, round-robin over DEVICES meters;
    each payload a meter reading's CBOR map."""
    out = []
    for k in range(start, start + n):
        frame = k // FRAME
        device, seq = 1 + frame % DEVICES, (frame // DEVICES) * FRAME + k % FRAME
        payload = cbor2.dumps({"device": device, "boot": boot, "seq": seq, "kind": "readings", "t": 900 * seq,
                               "litres": 1000 + 7 * seq, "unit": "L"}, canonical=True)
        out.append(Entry(device, boot, seq, "readings", 900 * seq, payload))
    return out


def pin(pid, cpu):
    if hasattr(os, "sched_setaffinity") and cpu < os.cpu_count():
        os.sched_setaffinity(pid, {cpu})


def bare_paho(broker, payloads):
    """One QoS 1 message per reading, as many in flight as Mosquitto's Receive Maximum allows (20), at most
    10,000 queued in paho (its message ids wrap at 65,535): the no-store baseline, messages/s."""
    done, queued = threading.Event(), threading.Semaphore(10_000)
    acked = [0]

    def on_publish(*_a):
        acked[0] += 1
        queued.release()
        if acked[0] == len(payloads):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(broker.host, broker.port)
    c.loop_start()
    t0 = time.perf_counter()
    for i, p in enumerate(payloads):
        queued.acquire()
        c.publish(f"prapa/v1/bench/{1 + i // FRAME % DEVICES:08x}/readings", p, qos=1)
    if not done.wait(300):
        raise RuntimeError(f"bare paho: only {acked[0]} of {len(payloads)} PUBACKs")
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return len(payloads) / elapsed


def commit_only(path, n):
    st = Store(path)
    batches = [readings(BATCH, boot=2, start=k) for k in range(0, n, BATCH)]
    t0 = time.perf_counter()
    for b in batches:
        st.commit(b)
    rate = n / (time.perf_counter() - t0)
    st.close()
    return rate


def forward_flat_out(path, broker, n):
    """Commit n entries as fast as one thread can while the forwarder drains them: end-to-end entries/s."""
    st = Store(path)
    fwd = Forwarder(st, {"site": "bench", "client_id": "bench-gw", "poll_s": 0.05,
                         "brokers": [{"host": broker.host, "port": broker.port, "tls": False}]})
    fwd.start()
    batches = [readings(BATCH, boot=3, start=k) for k in range(0, n, BATCH)]
    t0 = time.perf_counter()
    for b in batches:
        st.commit(b)
        fwd.kick()
    while fwd.forwarded < n:
        if time.perf_counter() - t0 > 300:
            raise RuntimeError(f"forwarder: only {fwd.forwarded} of {n} forwarded; last error {fwd.last_error}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    stats = fwd.stats()
    fwd.stop()
    st.close()
    return n / elapsed, stats


def forward_steady(path, broker, rate_per_s, seconds):
    """Offer rate_per_s entries in batches every 10 ms; commit-to-PUBACK latencies (s) from the store."""
    st = Store(path)
    fwd = Forwarder(st, {"site": "bench", "client_id": "bench-gw-steady", "poll_s": 0.05,
                         "brokers": [{"host": broker.host, "port": broker.port, "tls": False}]})
    fwd.start()
    per_tick = max(FRAME, rate_per_s // 100 // FRAME * FRAME)
    ticks = int(seconds * 100)
    t_next, start = time.perf_counter(), 0
    for _ in range(ticks):
        st.commit(readings(per_tick, boot=4, start=start))
        fwd.kick()
        start += per_tick
        t_next += 0.01
        time.sleep(max(0.0, t_next - time.perf_counter()))
    while fwd.forwarded < start:
        time.sleep(0.005)
    fwd.stop()
    lat = sorted(st.forward_latencies())
    st.close()
    return lat, per_tick * 100


def parser():
    p = argparse.ArgumentParser(prog="python -m tools.bench.gateway_forward", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=types.count, default=100_000, help="readings per run (default 100000)")
    p.add_argument("--steady-rate", type=types.count, default=5000, help="offered entries/s for the latency run (default 5000)")
    p.add_argument("--steady-seconds", type=types.positive_seconds, default=5.0, help="length of the latency run (default 5)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


def measure(args):
    """The figures of one run (a dict). The calling thread is pinned to cpu 0 while it runs and given back its
    cores after, so whatever runs next in the same process (prapa bench all) is not confined to one core."""
    n = args.entries - args.entries % BATCH
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with tempfile.TemporaryDirectory(prefix="prapa-bench-fwd-") as tmp:
            tmp = Path(tmp)
            broker = Broker(tmp / "broker", extra_conf=["persistence false"])
            try:
                pin(broker.proc.pid, 1)
                pin(0, 0)
                bare = bare_paho(broker, [e.payload for e in readings(n)])
                committed = commit_only(tmp / "commit.db", n)
                forwarded, stats = forward_flat_out(tmp / "flat.db", broker, n)
                lat, offered = forward_steady(tmp / "steady.db", broker, args.steady_rate, args.steady_seconds)
            finally:
                broker.stop()
    finally:
        if cores is not None:
            os.sched_setaffinity(0, cores)
    q = (lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1000, 2))
    return {
        "entries": n,
        "cores": f"gateway on cpu 0, mosquitto on cpu {1 if (os.cpu_count() or 1) > 1 else 0}",
        "baseline_bare_paho_qos1_msgs_per_s": round(bare),
        "baseline_store_commit_only_entries_per_s": round(committed),
        "committed_and_pubacked_entries_per_s": round(forwarded),
        "forwarded_vs_bare_paho_ratio": round(forwarded / bare, 2),
        "forwarded_vs_commit_only_ratio": round(forwarded / committed, 2),
        "messages_per_entry": round(stats["published"] / n, 4),
        "steady_offered_entries_per_s": offered,
        "commit_to_puback_ms_p50": q(0.5),
        "commit_to_puback_ms_p99": q(0.99),
        "publish_to_puback_ms_p50": round((stats["puback_latency_p50_s"] or 0) * 1000, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv=None):
    args = parser().parse_args(argv)
    print_figures(measure(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
