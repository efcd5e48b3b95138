"""prapa bench durability: SIGKILL a gateway a few ms after the last send, upstream down; count accepted readings lost.

  prapa bench durability [--rounds N] [--readings N] [--quick] [--json] [--no-peer]

The promise measured: a reading the sender was told is accepted reaches the upstream subscriber, even when
the gateway is killed (-9) right after accepting it while the upstream broker is down. Each round:

Ours (`prapa gateway run`, UDP link, store in its data dir): the upstream Mosquitto is stopped; a load
generator acting as meters sends a hello and sealed readings frames (real keys, ROWS readings a frame,
meters interleaved) and decrypts the gateway's downlink ACKs ({boot, upto}: every seq up to upto is
acknowledged, and a board deletes what was acknowledged). A few ms after its last send (the round's kill
delay, KILL_DELAYS_MS in turn) the gateway gets SIGKILL. Then the broker starts, a QoS 1 subscriber
subscribes to prapa/v1/<site>/#, the gateway restarts on the same data dir, and once its store says every
entry was PUBACKed (and the subscriber has been quiet for a moment) the round counts: acked readings whose
(device, boot, seq) never arrived (lost; the goal is 0), readings delivered more than once (duplicates:
QoS 1 allows them, a consumer deduplicates by (device, boot, seq)), readings delivered but never acked
(fine: the board would have sent them again).

The peer (thingsboard-gateway 3.8.5 from its own venv, as tools/bench/peers.py runs it, in a loopback-only
namespace): it runs with its upstream up and one reading through; then a control round (upstream down, the
load, upstream back, no kill: the path works); then each round the upstream Mosquitto is stopped, the load
generator publishes readings at QoS 1 to the device-side Mosquitto its MQTT connector subscribes to; a reading
counts as accepted when its PUBLISH got a PUBACK (what the sender sees). A few ms after the last PUBACK the
peer gets SIGKILL; then the upstream broker and its subscriber (answering getSessionLimits, as peers.py's
Upstream) start, the peer restarts with the same config and storage folder, and once nothing new arrived for
QUIET_S the round counts the accepted readings never delivered upstream with all their fields. Once per
configuration (PEER_STORAGES; --quick: memory only): "memory" (its default storage, as peers.py sets it up,
clean session to the device-side broker), "sqlite" (its persistent storage, data file in the peer's folder),
and each of them with a persistent device-side session ("memory_session", "sqlite_session": the broker keeps
the peer's subscription and what it had not PUBACKed). With memory storage, readings delivered after the
restart can only be the device-side broker redelivering (the peer's memory is empty): memory_session's
delivered_after_restart says whether it does.

Both loads are spread over --send-span-s (SEND_SPAN_S; frames or publishes at a steady pace), so the gateway
commits and acknowledges while the load goes on and the kill lands on a stream, not after an idle pause; the
offered rate is readings per round / span ("offered_readings_per_s"). Above what the peer sustains (peers.py:
about 500 readings/s is comfortable), readings wait in the device-side broker's queue for it at the kill; a
longer span measures the peer at a load it keeps up with.

The peer half is skipped, with the reason in "peer_skipped", when its venv is missing (`prapa bench peers
--setup`) or `unshare -n` is not allowed here; --no-peer leaves it out. Exit 0 (the figures are the result:
a loss is a figure, not an error); 2 bad arguments.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2

from protocol.errors import UsageError
from tools import args as types
from tools.bench import print_figures

ROWS = 32                               # readings a frame / a run of one meter, as boards send them
KILL_DELAYS_MS = (0, 2, 5, 10, 20)      # from the last send (ours) / last PUBACK (the peer) to SIGKILL, in turn
ROUNDS = 5
READINGS = 3_200                        # per round
DEVICES = 10
QUICK_ROUNDS = 3
QUICK_READINGS = 640
PEER_QUICK_ROUNDS = 2
SEND_SPAN_S = 0.5                       # a round's frames (ours) / publishes (the peer) spread over this: the
                                        # gateway commits and acks while the load goes on, and the last ones
                                        # are in flight at the kill (sent flat out, a 20 ms group commit would
                                        # see all of them after a kill within 20 ms: nothing accepted, nothing
                                        # to lose)
SITE = "durability"
BOARD_ADDR = 1                          # the meters' link address (their hello says it; acks come to it)
BACKLOG_TIMEOUT_S = 90                  # ours: the restarted gateway forwards its backlog within this, or it counts
SETTLE_S = 0.5                          # the subscriber quiet this long once the store says all PUBACKed
QUIET_S = 8.0                           # the peer: nothing new delivered for this long after its restart
QUICK_QUIET_S = 3.0
RECONNECT_TIMEOUT_S = 60                # the control round: the running peer back upstream within this
# The peer's configurations, each a figure family: its default (memory storage, clean session to the device-side
# broker, as peers.py sets it up), its sqlite storage, and each with a persistent device-side session (the broker
# keeps what the peer had not PUBACKed and redelivers it after the restart). With memory storage whatever arrives
# after the restart can only be the broker's redelivery: memory_session measures whether there is any.
PEER_STORAGES = ("memory", "sqlite", "memory_session", "sqlite_session")
ROOT = Path(__file__).resolve().parents[2]


def _options(p):
    p.add_argument("--rounds", type=types.count, default=None,
                   help=f"kills per gateway (default {ROUNDS}; --quick {QUICK_ROUNDS}, the peer {PEER_QUICK_ROUNDS})")
    p.add_argument("--readings", type=types.count, default=None,
                   help=f"readings sent per round (default {READINGS}; --quick {QUICK_READINGS}); whole frames of "
                        f"{ROWS}")
    p.add_argument("--send-span-s", type=types.positive_seconds, default=SEND_SPAN_S,
                   help=f"each round's load spread over this many seconds (default {SEND_SPAN_S}): the offered rate "
                        "is readings / span")
    p.add_argument("--quick", action="store_true", help="fewer rounds and readings; the peer's memory storage only")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)      # the namespace's re-exec
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)
    return p


def add_parser(bsub, parser_class):
    _options(bsub.add_parser("durability", help="SIGKILL our gateway and the ThingsBoard IoT Gateway just after "
                             "accepting readings, upstream down; count accepted readings lost",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def parser():
    """The same options as `prapa bench durability`, for `python -m tools.bench.durability`."""
    return _options(argparse.ArgumentParser(prog="python -m tools.bench.durability", description=__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def _counts(args):
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    readings = args.readings or (QUICK_READINGS if args.quick else READINGS)
    return rounds, max(ROWS, readings // ROWS * ROWS)


def _progress(line):
    print(f"durability: {line}", file=sys.stderr, flush=True)


def _kill_after(delay_s, t_last, proc):
    """SIGKILL proc delay_s after perf_counter t_last (a busy wait: sleep's granularity is the delay's size);
    returns the delay it really had, in ms."""
    while time.perf_counter() - t_last < delay_s:
        pass
    t_kill = time.perf_counter()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return round((t_kill - t_last) * 1000, 2)


# -- ours ----------------------------------------------------------------------------------------------------
class Meters:
    """Meters on one UDP socket: sealed frames out to the gateway; its downlink frames in, verified and
    decrypted with each meter's key; acked[(device, boot)] is the highest upto an ACK said."""

    def __init__(self, keys, gateway_port):
        from protocol import link, secure
        from protocol.secure import MemoryCounters
        self.keys = keys
        self.to = ("127.0.0.1", gateway_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        # Counters go on across rounds and gateway restarts (a board's are in its flash): the gateway's saved
        # replay window would refuse a counter it has seen.
        self.senders = {d: link.Sender(k, d, secure.UPLINK, MemoryCounters(1)) for d, k in keys.items()}
        self.lock = threading.Lock()
        self.acked = {}
        self.receiver = link.Receiver(secure.DOWNLINK, keys.get, self._on_downlink, my_addr=BOARD_ADDR)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _on_downlink(self, device_id, _counter, msg_type, m):
        from protocol import messages as M
        if msg_type == M.ACK:
            with self.lock:
                key = (device_id, m[0])
                self.acked[key] = max(self.acked.get(key, -1), m[1])

    def _read(self):
        while self.running:
            try:
                self.receiver.datagram(self.sock.recv(2048))
            except socket.timeout:
                pass
            except OSError:
                return

    def send(self, device_id, msg_type, message):
        sender = self.senders[device_id]
        payload = bytearray(cbor2.dumps(message, canonical=True))
        n = sender.frame(msg_type, payload, len(payload))
        self.sock.sendto(bytes(sender.frame_buf[:n]), self.to)

    def acked_readings(self, boot):
        """{(device hex, boot, seq)} acknowledged in this boot (readings' seqs start at 1)."""
        with self.lock:
            return {(f"{d:08x}", boot, s) for (d, b), upto in self.acked.items() if b == boot
                    for s in range(1, upto + 1)}

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def round_frames(devices, boot, n):
    """[(device, message)] for one boot: n readings in frames of ROWS, meters interleaved, seqs from 1."""
    from protocol import messages as M
    from protocol.roles import code as role_code
    out, seqs, i, made = [], dict.fromkeys(devices, 1), 0, 0
    ids = list(devices)
    while made < n:
        d = ids[i % len(ids)]
        i += 1
        seq = seqs[d]
        rows = [(seq + k) % 7 for k in range(ROWS)]
        out.append((d, M.READINGS, M.readings(boot, seq, 900 * seq, 900, role_code("meter"), M.units("L", 0, 1000),
                                              rows, 1000 + 3 * seq, 1_795_000_000 + 900 * seq)))
        seqs[d] += ROWS
        made += ROWS
    return out


class Subscriber:
    """A QoS 1 subscriber to prapa/v1/<site>/#, decoding messages as a consumer would (CBOR, else JSON):
    each reading item's (device, boot, seq) as delivered, repeats included."""

    def __init__(self, port, name):
        import paho.mqtt.client as mqtt
        self.lock = threading.Lock()
        self.readings = []
        self.last_at = time.monotonic()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(f"prapa/v1/{SITE}/#", qos=1)
        self.c.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the subscriber got no SUBACK in 10 s")

    def _on_message(self, _c, _u, msg):
        try:
            body = cbor2.loads(msg.payload)
        except Exception:                        # noqa: BLE001: not CBOR: JSON (the json format), else not ours
            try:
                body = json.loads(msg.payload)
            except ValueError:
                return
        if not isinstance(body, dict):
            return
        with self.lock:
            self.last_at = time.monotonic()
            for item in body.get("items", ()):
                if item.get("kind") == "reading":
                    self.readings.append((item.get("device") or body.get("device"), item["boot"], item["seq"]))

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _unforwarded(db_path):
    from gateway.store import Store
    db = Store(db_path, readonly=True, timeout=10)
    try:
        return db.count(forwarded=False)
    finally:
        db.close()


def _wait_backlog(db_path, sub, gw):
    """Until the restarted gateway's store holds nothing un-PUBACKed and the subscriber was quiet SETTLE_S."""
    end = time.monotonic() + BACKLOG_TIMEOUT_S
    while time.monotonic() < end:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"the restarted gateway exited {gw.proc.returncode}: {gw.log[-5:]}")
        if _unforwarded(db_path) == 0:
            with sub.lock:
                quiet = time.monotonic() - sub.last_at
            if quiet >= SETTLE_S:
                return True
        time.sleep(0.1)
    return False


def measure_ours(rounds, readings, devices=DEVICES, delays_ms=KILL_DELAYS_MS, progress=_progress, after_kill=None,
                 send_span_s=SEND_SPAN_S):
    """Our gateway through `rounds` kills: the figures (a dict), totals and per round.

    after_kill(data_dir), when given, runs between the kill and the restart: a test's fault (say, the store
    deleted) to show that a loss is counted."""
    import secrets

    from protocol import messages as M
    from protocol.roles import code as role_code
    from tools.broker import Broker, free_port
    from tools.gateway_process import GatewayProcess, register, write_config
    per_round = []
    with tempfile.TemporaryDirectory(prefix="prapa-bench-durability-") as tmp:
        tmp = Path(tmp)
        broker = Broker(tmp / "broker")
        udp_port = free_port()
        cfg = write_config(tmp, [], broker.port, site=SITE)
        cfg.write_text(f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{udp_port}"\n\n' + cfg.read_text())
        keys = {0x5000 + i: secrets.token_bytes(16) for i in range(devices)}
        register(tmp, keys)
        gw = GatewayProcess(cfg, log_path=tmp / "gateway.log").start()
        meters = sub = None
        try:
            gw.wait_started()
            meters = Meters(keys, udp_port)
            for r in range(rounds):
                boot, delay_ms = r + 1, delays_ms[r % len(delays_ms)]
                broker.stop()                                    # upstream down from here to the restart
                for d in keys:
                    meters.send(d, M.HELLO, M.hello(boot, "0.2.0", "esp32-devkitc", role_code("meter"), bytes(8),
                                                    False, 0, board_t_s=100, addr=BOARD_ADDR))
                frames = round_frames(keys, boot, readings)
                gap_s, t_next = send_span_s / len(frames), time.perf_counter()
                for d, msg_type, message in frames:
                    while time.perf_counter() < t_next:
                        time.sleep(0.0005)
                    meters.send(d, msg_type, message)
                    t_next += gap_s
                t_last = time.perf_counter()
                real_ms = _kill_after(delay_ms / 1000, t_last, gw.proc)
                time.sleep(0.1)                                  # acks already on their way still count
                acked = meters.acked_readings(boot)
                if after_kill:
                    after_kill(tmp / "data")
                broker.restart()
                sub = Subscriber(broker.port, f"bench-durability-{r}")
                gw.start().wait_started()
                drained = _wait_backlog(tmp / "data" / "store.db", sub, gw)
                with sub.lock:
                    got = [k for k in sub.readings if k[1] == boot]
                sub.close()
                sub = None
                delivered = set(got)
                row = {"boot": boot, "kill_delay_ms": delay_ms, "kill_after_last_send_ms": real_ms,
                       "sent": len(frames) * ROWS, "acked": len(acked), "delivered": len(delivered),
                       "lost": len(acked - delivered), "duplicates": len(got) - len(delivered),
                       "delivered_not_acked": len(delivered - acked), "backlog_forwarded": drained}
                per_round.append(row)
                progress(f"ours round {r + 1}/{rounds}: killed {real_ms} ms after the last send; sent "
                         f"{row['sent']}, acked {row['acked']}, delivered {row['delivered']}, lost {row['lost']}, "
                         f"duplicates {row['duplicates']}")
        finally:
            if sub:
                sub.close()
            if meters:
                meters.close()
            gw.stop()
            broker.stop()
    total = lambda k: sum(r[k] for r in per_round)          # noqa: E731
    return {
        "ours_readings_sent": total("sent"),
        "ours_readings_acked": total("acked"),
        "ours_acked_readings_lost": total("lost"),
        "ours_duplicates_delivered": total("duplicates"),
        "ours_delivered_not_acked": total("delivered_not_acked"),
        "ours_acked_per_round": [r["acked"] for r in per_round],
        "ours_delivered_per_round": [r["delivered"] for r in per_round],
        "ours_lost_per_round": [r["lost"] for r in per_round],
        "ours_kill_after_last_send_ms": [r["kill_after_last_send_ms"] for r in per_round],
        "ours_backlog_forwarded_every_round": all(r["backlog_forwarded"] for r in per_round),
    }


# -- the peer ------------------------------------------------------------------------------------------------
def peer_problem():
    """Why the peer half cannot run here (None: it can): its venv missing, or no loopback-only namespace."""
    from tools.bench import peers
    problem = peers.problem()
    return f"{problem.problem}: {problem.fix}" if problem else None


def _storage(kind, folder):
    """The peer's storage section: its default in-memory one (as peers.py writes it), its sqlite or file one."""
    kind = kind.removesuffix("_session")
    if kind == "sqlite":
        return {"type": "sqlite", "data_file_path": f"{folder}/", "messages_ttl_check_in_hours": 1,
                "messages_ttl_in_days": 7, "max_read_records_count": 100}
    if kind == "file":
        return {"type": "file", "data_folder_path": f"{folder}/", "max_file_count": 100, "max_read_records_count": 10,
                "max_records_per_file": 10000}
    return None                                                  # memory: peers.write_peer_config's own


def publish_counting_pubacks(broker, items, topic_of, then=lambda t_last: None, send_span_s=SEND_SPAN_S):
    """Publish items [(device, reading)] at QoS 1, spread over send_span_s; returns ({(device, ts)} PUBACKed,
    perf_counter of the last PUBACK, then(that perf_counter)'s result). Waits for every PUBACK (the device-side
    broker is up), 20 s at most, and calls then() before closing its client (paho's loop takes up to a second
    to stop: the kill must not wait for it)."""
    import paho.mqtt.client as mqtt
    lock, done = threading.Lock(), threading.Event()
    by_mid, accepted, last = {}, set(), [None]

    def on_publish(_c, _u, mid, *_a):
        with lock:
            key = by_mid.pop(mid, None)
            if key is None:                                      # the PUBACK came before publish() returned
                by_mid[mid] = "early"
                return
            accepted.add(key)
            last[0] = time.perf_counter()
            if len(accepted) == len(items):
                done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-durability-load-{os.getpid()}",
                    protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(broker.host, broker.port)
    c.loop_start()
    gap_s, t_next = send_span_s / len(items), time.perf_counter()
    for d, r in items:
        while time.perf_counter() < t_next:
            time.sleep(0.0005)
        t_next += gap_s
        info = c.publish(topic_of(d), json.dumps(r, separators=(",", ":")), qos=1)
        with lock:
            if by_mid.pop(info.mid, None) == "early":
                accepted.add((d, r["ts"]))
                last[0] = time.perf_counter()
                if len(accepted) == len(items):
                    done.set()
            else:
                by_mid[info.mid] = (d, r["ts"])
    done.wait(20)
    with lock:
        accepted, t_last = set(accepted), last[0]
    result = then(t_last or time.perf_counter())
    c.loop_stop()
    c.disconnect()
    return accepted, t_last, result


def measure_peer(storage, rounds, readings, devices=DEVICES, delays_ms=KILL_DELAYS_MS, quiet_s=QUIET_S,
                 progress=_progress, send_span_s=SEND_SPAN_S):
    """The peer through a control round (upstream down, no kill) and `rounds` kills, with the given storage
    (PEER_STORAGES): figures named peer_<storage>_*. Only inside a loopback-only namespace (it phones home)."""
    from tools.bench import peers
    from tools.broker import Broker
    import paho.mqtt.client as mqtt
    venv = peers.venv_dir()
    p = f"peer_{storage}"
    per_round, control = [], None
    with tempfile.TemporaryDirectory(prefix="prapa-bench-durability-peer-") as tmp:
        tmp = Path(tmp)
        up = Broker(tmp / "upstream", extra_conf=peers.BROKER_CONF)
        dev = Broker(tmp / "devices", extra_conf=peers.BROKER_CONF)
        work, config = tmp / "peer", tmp / "peer" / "config"
        work.mkdir()
        connector = peers.mqtt_connector(dev)
        if storage.endswith("_session"):             # the device-side broker keeps the peer's session and queue
            connector["broker"].update(cleanSession=False, cleanStart=False, sessionExpiryInterval=3600)
        peers.write_peer_config(config, venv, up.port, [("mqtt", "meters", "mqtt_meters.json", connector)],
                                max_records=100_000)
        section = _storage(storage, work / "storage")
        if section:
            main = json.loads((config / "tb_gateway.json").read_text())
            main["storage"] = section
            (config / "tb_gateway.json").write_text(json.dumps(main, indent=2))
            (work / "storage").mkdir()
        state = {"upstream": None, "peer": None}

        def start_upstream():
            up.restart()
            state["upstream"] = peers.Upstream(up, peers.FIELDS)

        def one_round(first, delay_ms):
            """Upstream down, the load, SIGKILL (delay_ms None: none), upstream up, the peer (re)started;
            once nothing new arrived for quiet_s, this round's row."""
            state["upstream"].close()
            up.stop()
            items = peers.meter_readings(readings, devices, first=first)
            peer = state["peer"]
            kill = (lambda t_last: _kill_after(delay_ms / 1000, t_last, peer.proc)) if delay_ms is not None else \
                (lambda t_last: None)
            accepted, _t, real_ms = publish_counting_pubacks(dev, items, lambda d: f"meters/{d}/reading", then=kill,
                                                             send_span_s=send_span_s)
            if delay_ms is None:
                time.sleep(1.0)                          # it takes them in while the upstream is down
            else:
                peer.log.close()
            start_upstream()
            if delay_ms is not None:
                state["peer"] = peers.Peer(venv, work, config)          # same config, same storage folder
                peers._wait(state["upstream"].limits_answered.is_set, 120, state["peer"],
                            "waiting for its getSessionLimits request after the restart")
            upstream, keys = state["upstream"], {(d, it["ts"]) for d, it in items}
            if delay_ms is None:
                # Not restarted, the peer reconnects upstream on its own schedule (its retry back-off): the
                # quiet window starts once it is back (it asks for its limits again) or a reading arrived.
                end = time.monotonic() + RECONNECT_TIMEOUT_S
                while time.monotonic() < end and not upstream.limits_answered.is_set():
                    with upstream.lock:
                        if any(k in upstream.seen for k in keys):
                            break
                    time.sleep(0.1)
            last_n, last_change = -1, time.monotonic()
            while True:
                with upstream.lock:
                    n = sum(len(upstream.seen.get(k, ())) for k in keys)
                if n != last_n:
                    last_n, last_change = n, time.monotonic()
                elif time.monotonic() - last_change >= quiet_s:
                    break
                time.sleep(0.1)
            with upstream.lock:
                complete = {k for k in keys if len(upstream.seen.get(k, ())) >= len(peers.FIELDS)}
                partial = {k for k in keys if 0 < len(upstream.seen.get(k, ())) < len(peers.FIELDS)}
                dups = len(keys & upstream.duplicates)
            return {"kill_delay_ms": delay_ms, "kill_after_last_puback_ms": real_ms, "sent": len(items),
                    "accepted": len(accepted), "delivered": len(complete), "lost": len(accepted - complete),
                    "partial": len(partial & accepted), "duplicates": dups}

        try:
            state["upstream"] = peers.Upstream(up, peers.FIELDS)
            state["peer"] = peers.Peer(venv, work, config)
            peers._wait(state["upstream"].limits_answered.is_set, 120, state["peer"],
                        "waiting for its getSessionLimits request")
            one = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-warmup", protocol=mqtt.MQTTv311)
            one.connect(dev.host, dev.port)
            one.loop_start()
            peers._warm_up(state["upstream"], state["peer"], lambda d, r: one.publish(
                f"meters/{d}/reading", json.dumps(r), qos=1).wait_for_publish(5), "mqtt")
            one.loop_stop()
            one.disconnect()
            control = one_round(0xF00000, None)
            progress(f"peer ({storage}) control round, upstream down, no kill: accepted {control['accepted']}, "
                     f"delivered {control['delivered']}, lost {control['lost']}")
            for r in range(rounds):
                row = one_round(0x100000 * (r + 1), delays_ms[r % len(delays_ms)])
                per_round.append(row)
                progress(f"peer ({storage}) round {r + 1}/{rounds}: killed {row['kill_after_last_puback_ms']} ms "
                         f"after the last PUBACK; sent {row['sent']}, accepted {row['accepted']}, delivered "
                         f"{row['delivered']}, lost {row['lost']} ({row['partial']} of them in part), "
                         f"duplicates {row['duplicates']}")
            alive = state["peer"].alive()
        finally:
            if state["peer"]:
                state["peer"].stop()
            if state["upstream"]:
                state["upstream"].close()
            dev.stop()
            up.stop()
    total = lambda k: sum(r[k] for r in per_round)          # noqa: E731
    return {
        f"{p}_storage": _storage_about(storage),
        f"{p}_control_accepted": control["accepted"],
        f"{p}_control_delivered": control["delivered"],
        f"{p}_readings_sent": total("sent"),
        f"{p}_readings_accepted": total("accepted"),
        f"{p}_accepted_readings_lost": total("lost"),
        f"{p}_lost_in_part": total("partial"),
        f"{p}_duplicates_delivered": total("duplicates"),
        f"{p}_delivered_after_restart": total("delivered"),
        f"{p}_lost_per_round": [r["lost"] for r in per_round],
        f"{p}_kill_after_last_puback_ms": [r["kill_after_last_puback_ms"] for r in per_round],
        f"{p}_alive_at_end": alive,
    }


def _storage_about(storage):
    return {"memory": "memory (its default, as peers.py sets it up: type memory, max_records_count 100000); clean "
                      "session to the device-side broker",
            "sqlite": "sqlite (type sqlite, data.db in the peer's folder, kept across the restart); clean "
                      "session to the device-side broker",
            "memory_session": "memory, and a persistent session to the device-side broker (cleanSession and "
                              "cleanStart false, sessionExpiryInterval 3600 s)",
            "sqlite_session": "sqlite, and a persistent session to the device-side broker (cleanSession and "
                              "cleanStart false, sessionExpiryInterval 3600 s)",
            "file": "file (type file, its folder kept across the restart); clean session to the device-side "
                    "broker"}[storage]


def _peer_in_netns(args, rounds, readings):
    """Run the peer half in a loopback-only namespace (a re-exec of this command with --peer-only); its figures."""
    from tools.bench import peers
    argv = [sys.executable, "-m", "tools.bench.durability", "--peer-only", "--json",
            "--rounds", str(rounds), "--readings", str(readings), "--send-span-s", str(args.send_span_s)]
    argv += ["--quick"] if args.quick else []
    env = {**os.environ, peers.NETNS_ENV: "1", "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the peer's run in its namespace exited {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _peer_figures(args, rounds, readings):
    """Inside the namespace: the peer's figures for each storage (memory only with --quick)."""
    from tools.bench import peers
    if not peers._only_loopback():
        raise RuntimeError("this network namespace has interfaces besides lo (or lo is down): refusing to start "
                           "the peer")
    out = {}
    for storage in PEER_STORAGES[:1] if args.quick else PEER_STORAGES:
        if os.environ.get("PRAPA_BENCH_DURABILITY_STORAGES"):            # a debugging aid: which storages
            if storage not in os.environ["PRAPA_BENCH_DURABILITY_STORAGES"].split(","):
                continue
        out.update(measure_peer(storage, rounds, readings, quiet_s=QUICK_QUIET_S if args.quick else QUIET_S,
                                send_span_s=args.send_span_s))
    return out


def measure(args):
    """The figures (a dict) of one run as args say: ours, then the peer's (or why it was skipped)."""
    rounds, readings = _counts(args)
    figures = {"rounds": rounds, "readings_per_round": readings,
               "kill_delays_ms": [KILL_DELAYS_MS[r % len(KILL_DELAYS_MS)] for r in range(rounds)]}
    figures["send_span_s"] = args.send_span_s
    figures["offered_readings_per_s"] = round(readings / args.send_span_s)
    figures.update(measure_ours(rounds, readings, send_span_s=args.send_span_s))
    if args.no_peer:
        return figures
    problem = peer_problem()
    if problem:
        figures["peer_skipped"] = problem
        _progress(f"the peer is skipped: {problem}")
        return figures
    peer_rounds = args.rounds or (PEER_QUICK_ROUNDS if args.quick else ROUNDS)
    figures["peer_rounds"] = peer_rounds
    figures.update(_peer_in_netns(args, peer_rounds, readings))
    return figures


def run(args):
    if args.peer_only:
        from tools.bench import peers
        if not peers._inside():
            raise UsageError("bench durability", "--peer-only runs inside the benchmark's network namespace",
                             "run prapa bench durability (it starts the namespace)")
        rounds, readings = _counts(args)
        print_figures(_peer_figures(args, rounds, readings), True)
        return 0
    print_figures(measure(args), args.json)
    return 0


# What each figure means and, for a comparison, its baseline (the convention of prapa bench all's record).
FIGURES = (
    ("rounds", "SIGKILLs of our gateway, each a few ms after the last send with the upstream broker down"),
    ("send_span_s", "each round's load was spread over this many seconds (frames or publishes at a steady pace)"),
    ("offered_readings_per_s", "readings per round / send span: the offered rate to each gateway"),
    ("readings_per_round", f"readings sent per round, in frames of {ROWS} readings of one meter, {DEVICES} meters "
     "interleaved"),
    ("kill_delays_ms*", "the delay asked for from the last send (ours) or last PUBACK (the peer) to SIGKILL, by round"),
    ("ours_readings_sent", "readings our load generator sent as meters (sealed UDP frames, real keys)"),
    ("ours_readings_acked", "readings the gateway's decrypted ACKs covered (a board deletes them): accepted"),
    ("ours_acked_readings_lost", "acked readings that never reached the QoS 1 subscriber after the restart (goal "
     "0), against the peer's accepted readings lost with its default (memory) storage",
     "peer_memory_accepted_readings_lost"),
    ("ours_acked_readings_lost", "acked readings lost (goal 0), against the peer's with its sqlite storage",
     "peer_sqlite_accepted_readings_lost"),
    ("ours_duplicates_delivered", "readings delivered more than once (QoS 1 allows it; a consumer deduplicates by "
     "device, boot, seq)"),
    ("ours_delivered_not_acked", "readings delivered that no ACK covered (killed before the ack went out: fine, "
     "the board sends them again)"),
    ("ours_acked_per_round*", "readings acked, by round"),
    ("ours_delivered_per_round*", "readings of the round's boot the subscriber got, by round"),
    ("ours_lost_per_round*", "acked readings lost, by round"),
    ("ours_kill_after_last_send_ms*", "the delay the kill really had after the last send, by round"),
    ("ours_backlog_forwarded_every_round", "the restarted gateway's store said every entry PUBACKed in each round "
     f"(within {BACKLOG_TIMEOUT_S} s)"),
    ("peer_skipped", "why the peer half did not run"),
    ("peer_rounds", "SIGKILLs of the peer per storage, each a few ms after the last PUBACK, upstream down"),
    ("peer_*_storage", "the peer's storage for the figures of that prefix (its tb_gateway.json storage section)"),
    ("peer_*_readings_sent", "readings the load generator published at QoS 1 to the device-side broker the peer's "
     "MQTT connector subscribes to (clean session, as peers.py configures it)"),
    ("peer_*_readings_accepted", "readings whose PUBLISH got a PUBACK from the device-side broker (what the sender "
     "sees)"),
    ("peer_*_control_accepted", "a control round first, upstream down and no kill: readings PUBACKed"),
    ("peer_*_control_delivered", "the control round: readings delivered once the upstream was back (the path works; "
     "what the kill rounds lose, the kill lost). Short of control_accepted, that configuration's kill figures do "
     "not say what a kill loses"),
    ("peer_*_lost_in_part", "accepted readings lost that arrived with some of their fields only (counted as lost)"),
    ("peer_*_accepted_readings_lost", "accepted readings never delivered upstream with all their fields after the "
     f"restart (nothing new for {QUIET_S:g} s; {QUICK_QUIET_S:g} s with --quick)"),
    ("peer_*_duplicates_delivered", "readings with a field delivered upstream twice"),
    ("peer_*_delivered_after_restart", "readings of the killed round delivered upstream (all of them after the "
     "restart: the upstream was down before); with memory storage these can only be the device-side broker "
     "redelivering to the restarted peer"),
    ("peer_*_lost_per_round*", "accepted readings lost, by round"),
    ("peer_*_kill_after_last_puback_ms*", "the delay the kill really had after the last PUBACK, by round"),
    ("peer_*_alive_at_end", "the restarted peer was still running at the end"),
)
RATIOS = ()


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"prapa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
