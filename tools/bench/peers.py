"""prapa bench peers: our gateway beside a real peer, the ThingsBoard IoT Gateway 3.8.5, same run, same load.

The peer is `thingsboard-gateway==3.8.5` from PyPI in a venv of its own (it pulls in
many packages; they stay out of the project's venv): `prapa bench peers --setup`
builds it under $XDG_CACHE_HOME/prapa/peers/ (~/.cache when unset). Without it
this command exits 2 naming --setup.

The peer posts to its vendor's update server when it starts (and hourly) and has
no setting to stop it, so the whole benchmark (the peer, its two Mosquittos, the
load, and our own gateway's run) runs inside a loopback-only network namespace
(`unshare -n`, then `ip link set lo up`); where that is not allowed the command
exits 2 saying so. Upstream, the benchmark's subscriber stands in for a
ThingsBoard server with no limits: it answers the peer's `getSessionLimits` RPC
(the peer publishes nothing upstream before that) and counts the readings in
`v1/gateway/telemetry`.

MQTT connector: a load generator publishes N meter readings at QoS 1 (one JSON
object each with the meter's fields, as `prapa/v1/.../reading` items carry them:
boot, seq, t_board_s, span_s, unit, scale, k_factor_milli, value,
register_before, register, and ts) to a second, device-side Mosquitto (no queue
limit, so a reading lost is the peer's), in runs of 32 consecutive readings of
one meter, meters interleaved (as boards send frames); the peer's MQTT connector
(JSON converter) takes them and forwards them upstream. Figures: readings/s from
the first send to the last reading delivered upstream (a reading counts when all
its fields arrived), CPU seconds (user+sys of the peer's process,
/proc/<pid>/stat) per 100,000 readings, peak RSS (VmHWM), duplicates (a field of
a reading delivered twice) and readings lost, with no fault injected; then, at a
steady offered load (--steady-rate, default 500 readings/s, which the peer
sustains), send-to-upstream-delivery latency p50/p99. The peer's cost grows with
the fields per reading (its converter and packer work per datapoint).

UDP socket connector (--udp): the same meter readings, one datagram a frame of
up to 32 readings of one meter, decoded by a custom converter of ours that this
command writes into the peer's extensions folder. The connector sleeps 0.2 s
after each datagram, so its figure is what it is; a small N.

Ours, same invocation and offered load: `prapa bench gateway`'s measurement
(tools/bench/gateway.py) with the same N readings and meters, and its latency
run at the same steady rate (its latency is commit to PUBACK, from its store:
not the same span as the peer's, so no ratio). Ratios are ours over the peer's.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from protocol.errors import UsageError
from tools import args as types
from tools.bench import print_figures

PEER = "thingsboard-gateway"
PEER_VERSION = "3.8.5"
NETNS_ENV = "PRAPA_BENCH_PEERS_NETNS"       # set by the re-exec inside the namespace
ROWS = 32                                    # consecutive readings of one meter, as in a board's frame
FIELDS = ("boot", "seq", "t_board_s", "span_s", "unit", "scale", "k_factor_milli", "value", "register_before",
          "register")
STALL_S = 30                                 # no reading delivered for this long: the run ends, counting the lost
QUICK_READINGS = 3_200
QUICK_UDP_READINGS = 64                      # two datagrams of ROWS readings
STEADY_RATE = 500                            # readings/s offered to both for the latency figures
STEADY_READINGS = 5_000                      # ten seconds of it
QUICK_STEADY = 1_000                         # two seconds of it
UDP_READINGS = 640                           # twenty datagrams
# Mosquitto drops QoS 1 messages past 1,000 queued for a slow subscriber by default: the peer would lose
# readings to the device-side broker, not to itself. No limit, so what is lost is the peer's.
BROKER_CONF = ["persistence false", "max_queued_messages 0"]
ROOT = Path(__file__).resolve().parents[2]


def add_parser(bsub, parser_class):
    p = bsub.add_parser("peers", help="our gateway vs the ThingsBoard IoT Gateway 3.8.5, same run and load",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true",
                   help=f"build the peer's own venv ({PEER}=={PEER_VERSION} from PyPI) and exit")
    p.add_argument("--quick", action="store_true",
                   help=f"small counts ({QUICK_READINGS} readings, {QUICK_UDP_READINGS} over UDP; a short steady run)")
    p.add_argument("--readings", type=types.count, default=None, help="readings through each gateway (default 100000)")
    p.add_argument("--devices", type=types.count, default=50, help="simulated meters (default 50)")
    p.add_argument("--steady-rate", type=types.count, default=STEADY_RATE,
                   help=f"readings/s offered to both for the latency run (default {STEADY_RATE}: the peer keeps up)")
    p.add_argument("--udp", action="store_true", help="the peer's UDP socket connector too (slow: 0.2 s a datagram)")
    p.add_argument("--no-ours", action="store_true", help="the peer only (no ratios)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


# -- the peer's venv ---------------------------------------------------------------------------------------
def venv_dir():
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "prapa" / "peers" / f"tb-gateway-{PEER_VERSION}"


def _stamp(venv):
    return venv / ".prapa-ready"


def venv_ready(venv=None):
    venv = venv or venv_dir()
    return _stamp(venv).is_file() and (venv / "bin" / "thingsboard-gateway").exists()


def setup():
    """Build the venv in a sibling folder, then move it into place: whole or not at all. Idempotent."""
    venv = venv_dir()
    if venv_ready(venv):
        print(f"peers: {PEER}=={PEER_VERSION} is ready in {venv}", flush=True)
        return 0
    partial = venv.with_name(venv.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    print(f"peers: creating a venv in {partial} ({base})", flush=True)
    subprocess.run([base, "-m", "venv", str(partial)], check=True)
    print(f"peers: installing {PEER}=={PEER_VERSION} and its dependencies from PyPI (a minute or two)", flush=True)
    r = subprocess.run([str(partial / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        "--progress-bar", "off", f"{PEER}=={PEER_VERSION}"])
    if r.returncode != 0:
        print(f"peers: pip failed (exit {r.returncode}); {partial} left for a look", file=sys.stderr)
        return 1
    check = subprocess.run([str(partial / "bin" / "python"), "-c",
                            "import thingsboard_gateway.tb_gateway, paho.mqtt.client, tb_gateway_mqtt"])
    if check.returncode != 0:
        print("peers: the installed peer does not import", file=sys.stderr)
        return 1
    _stamp(partial).write_text(f"{PEER}=={PEER_VERSION}\n")
    # A venv's scripts name its folder: build under the final name's sibling, then fix the paths on the move.
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            try:
                text = script.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if str(partial) in text:
                script.write_text(text.replace(str(partial), str(venv)))
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(str(partial), str(venv)))
    print(f"peers: ready: {venv}", flush=True)
    return 0


def _site_packages(venv):
    return next((venv / "lib").glob("python3*/site-packages"))


# -- the network namespace ---------------------------------------------------------------------------------
def _inside():
    return os.environ.get(NETNS_ENV) == "1"


def _only_loopback():
    """True when this process's network namespace has no interface but lo, and lo is up."""
    import fcntl
    import struct
    if sorted(name for _i, name in socket.if_nameindex()) != ["lo"]:    # netlink: this namespace's (not sysfs)
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
    return bool(flags & 0x1)                                                                         # IFF_UP


def _netns_problem():
    """Why the benchmark cannot run in a loopback-only namespace here (None: it can)."""
    for tool in ("unshare", "ip"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists() and not Path(f"/sbin/{tool}").exists():
            return f"{tool} is not installed (util-linux, iproute2)"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare -n is not allowed here ({(r.stderr or r.stdout).strip() or 'exit ' + str(r.returncode)})"
    return None


def _reexec_in_netns(args, capture=False):
    """Run this command again inside `unshare -n` (lo only); its exit code, or with capture its CompletedProcess
    (stdout captured, stderr passed through)."""
    argv = [sys.executable, "-m", "tools.cli", "bench", "peers", "--devices", str(args.devices),
            "--steady-rate", str(args.steady_rate)]
    argv += ["--readings", str(args.readings)] if args.readings else []
    argv += [flag for flag, on in (("--quick", args.quick), ("--udp", args.udp), ("--no-ours", args.no_ours),
                                   ("--json", args.json)) if on]
    env = {**os.environ, NETNS_ENV: "1",
           "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    if capture:
        return subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


# -- the upstream: a ThingsBoard server with no limits, and the counting -----------------------------------
class Upstream:
    """Subscribes where a ThingsBoard server listens to a gateway; answers getSessionLimits as a server with no
    limits; counts each reading once all its fields arrived, and every field that came again."""

    def __init__(self, broker, fields):
        import paho.mqtt.client as mqtt
        self.fields = len(fields)
        self.lock = threading.Lock()
        self.seen = {}                          # (device, ts) -> field names delivered
        self.delivered = 0
        self.duplicates = set()                 # (device, ts) with a field delivered twice
        self.messages = 0
        self.last_at = None
        self.arrived = {}                       # (device, ts) -> perf_counter when complete
        self.by_prefix = {}                     # device[:4] -> readings complete (a run's meters share a prefix)
        self.limits_answered = threading.Event()
        self.rpc_requests = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-tb-server", protocol=mqtt.MQTTv311)
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_connect(self, client, *_a):
        client.subscribe([("v1/gateway/telemetry", 1), ("v1/devices/me/rpc/request/+", 1)])

    def _on_message(self, client, _userdata, msg):
        if msg.topic.startswith("v1/devices/me/rpc/request/"):
            request_id = msg.topic.rsplit("/", 1)[1]
            try:
                body = json.loads(msg.payload)
            except ValueError:
                body = {}
            self.rpc_requests.append(body.get("method"))
            if body.get("method") == "getSessionLimits":
                # What a ThingsBoard server answers when its tenant profile sets no rate limits: empty limit
                # strings, the transport's payload size and in-flight window.
                no_limits = {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}
                client.publish(f"v1/devices/me/rpc/response/{request_id}",
                               json.dumps({"maxPayloadSize": 65536, "maxInflightMessages": 100,
                                           "rateLimits": no_limits, "gatewayRateLimits": dict(no_limits)}), qos=1)
                self.limits_answered.set()
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        now = time.perf_counter()
        with self.lock:
            self.messages += 1
            for device, entries in body.items():
                for entry in entries if isinstance(entries, list) else [entries]:
                    values = entry.get("values", entry) if isinstance(entry, dict) else {}
                    key = (device, entry.get("ts") if isinstance(entry, dict) else None)
                    got = self.seen.setdefault(key, set())
                    complete = len(got) >= self.fields
                    for name in values:
                        if name in got:
                            self.duplicates.add(key)
                        got.add(name)
                    if not complete and len(got) >= self.fields:
                        self.delivered += 1
                        self.arrived[key] = now
                        self.by_prefix[device[:4]] = self.by_prefix.get(device[:4], 0) + 1
                        self.last_at = now

    def count(self, prefix=""):
        """Readings complete, of meters whose names start with prefix (its first 4 characters count)."""
        with self.lock:
            return self.by_prefix.get(prefix[:4], 0) if prefix else self.delivered

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


# -- the load ----------------------------------------------------------------------------------------------
def meter_readings(n, devices, first=0x3000):
    """n (device name, reading dict) pairs: ROWS consecutive readings of one meter at a time, meters
    interleaved; each with the meter's fields and a ts unique per meter (its wall time, ms). Meters are named
    by their id from first, 8 hex digits."""
    out, seqs, i = [], {}, 0
    names = [f"{first + k:08x}" for k in range(devices)]
    while len(out) < n:
        d = names[i % len(names)]
        i += 1
        seq = seqs.get(d, 1)
        for k in range(min(ROWS, n - len(out))):
            s = seq + k
            value = s % 7
            register = 1000 + 3 * s
            out.append((d, {"ts": (1_795_000_000 + 900 * s) * 1000, "boot": 1, "seq": s, "t_board_s": 900 * s,
                            "span_s": 900, "unit": "L", "scale": 0, "k_factor_milli": 1000, "value": value,
                            "register_before": register - value, "register": register}))
        seqs[d] = seq + ROWS
    return out


def publish_all(broker, items, topic_of):
    """Publish items [(device, reading)] at QoS 1 to broker, 20 in flight (Mosquitto's receive maximum), at most
    10,000 queued; returns (perf_counter of the first send, of the last PUBACK)."""
    import paho.mqtt.client as mqtt
    done, queued = threading.Event(), threading.Semaphore(10_000)
    acked = [0]

    def on_publish(*_a):
        acked[0] += 1
        queued.release()
        if acked[0] == len(items):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-load-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(broker.host, broker.port)
    c.loop_start()
    payloads = [(topic_of(d), json.dumps(r, separators=(",", ":"))) for d, r in items]
    t0 = time.perf_counter()
    for topic, payload in payloads:
        queued.acquire()
        c.publish(topic, payload, qos=1)
    if not done.wait(600):
        raise RuntimeError(f"load: only {acked[0]} of {len(items)} PUBACKs from the device-side broker")
    t_acked = time.perf_counter()
    c.loop_stop()
    c.disconnect()
    return t0, t_acked


def publish_paced(broker, items, rate, topic_of):
    """Publish items at QoS 1 at rate readings/s (in 10 ms ticks); returns [((device, ts), perf_counter sent)]."""
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-steady-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(20)
    c.connect(broker.host, broker.port)
    c.loop_start()
    payloads = [(d, r["ts"], topic_of(d), json.dumps(r, separators=(",", ":"))) for d, r in items]
    sent, due, i = [], 0.0, 0
    t_next = time.perf_counter()
    while i < len(payloads):
        due += rate / 100
        while i < len(payloads) and due >= 1:
            d, ts, topic, payload = payloads[i]
            sent.append(((d, ts), time.perf_counter()))
            c.publish(topic, payload, qos=1)
            i += 1
            due -= 1
        t_next += 0.01
        time.sleep(max(0.0, t_next - time.perf_counter()))
    c.loop_stop()
    c.disconnect()
    return sent


# -- the peer process --------------------------------------------------------------------------------------
def _timeseries(fields):
    return [{"type": "string" if f == "unit" else "integer", "key": f, "value": "${" + f + "}"} for f in fields]


def write_peer_config(folder, venv, upstream_port, connectors, max_records):
    """The peer's config folder: tb_gateway.json (upstream at 127.0.0.1, access token, in-memory storage big enough
    for the run, remote configuration and shell off), the shipped logs.json, and each connector's file."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = _site_packages(venv) / "thingsboard_gateway" / "config"
    main = json.loads((shipped / "tb_gateway.json").read_text())
    tb = main["thingsboard"]
    tb.update({"host": "127.0.0.1", "port": upstream_port, "remoteShell": False, "remoteConfiguration": False,
               "security": {"type": "accessToken", "accessToken": "prapa-bench"}, "qos": 1})
    main["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": max_records}
    main["grpc"]["enabled"] = False
    main["connectors"] = [{"type": t, "name": name, "configuration": file} for t, name, file, _cfg in connectors]
    (folder / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    shutil.copy(shipped / "logs.json", folder / "logs.json")
    for _t, _name, file, cfg in connectors:
        (folder / file).write_text(json.dumps(cfg, indent=2))


def mqtt_connector(device_broker):
    return {
        "broker": {"host": device_broker.host, "port": device_broker.port, "clientId": "tb-gateway-bench",
                   "version": 5, "maxMessageNumberPerWorker": 10, "maxNumberOfWorkers": 100,
                   "cleanSession": True, "cleanStart": True, "sessionExpiryInterval": 0,
                   "security": {"type": "anonymous"}},
        "mapping": [{
            "topicFilter": "meters/+/reading",
            "subscriptionQos": 1,
            "converter": {
                "type": "json",
                "deviceInfo": {"deviceNameExpressionSource": "topic",
                               "deviceNameExpression": "(?<=meters/)(.*?)(?=/reading)",
                               "deviceProfileExpressionSource": "constant", "deviceProfileExpression": "meter"},
                "sendDataOnlyOnChange": False,
                "timeout": 60000,
                "attributes": [],
                "timeseries": _timeseries(FIELDS),
            },
        }],
        "requestsMapping": {},
    }


# The socket connector's custom converter, ours, installed where the peer looks for extensions: a datagram is
# one frame, {"device": name, "readings": [{"ts": ms, field: value, ...}, ...]}, as a board sends ROWS readings.
UDP_CONVERTER_CLASS = "PrapaBenchFrameConverter"
UDP_CONVERTER_SOURCE = '''"""prapa bench peers: one datagram, one frame of a meter's readings (written by tools/bench/peers.py)."""
import json

from thingsboard_gateway.connectors.socket.socket_uplink_converter import SocketUplinkConverter
from thingsboard_gateway.gateway.entities.converted_data import ConvertedData
from thingsboard_gateway.gateway.entities.telemetry_entry import TelemetryEntry


class PrapaBenchFrameConverter(SocketUplinkConverter):
    def __init__(self, config, logger):
        self._log = logger
        self._config = config

    def convert(self, config, data):
        frame = json.loads(data)
        out = ConvertedData(device_name=frame["device"], device_type=self._config.get("deviceType", "default"))
        for reading in frame["readings"]:
            ts = reading.pop("ts")
            out.add_to_telemetry(TelemetryEntry(reading, ts))
        return out
'''


def install_udp_converter(venv):
    target = _site_packages(venv) / "thingsboard_gateway" / "extensions" / "socket" / "prapa_bench_converter.py"
    if not target.exists() or target.read_text() != UDP_CONVERTER_SOURCE:
        target.write_text(UDP_CONVERTER_SOURCE)


def udp_connector(port):
    return {
        # The shipped config and its adapter say bufferSize, the connector reads buffer_size (else 1,024 bytes).
        "socket": {"address": "127.0.0.1", "type": "UDP", "port": port, "bufferSize": 65535, "buffer_size": 65535},
        "devices": [{"address": "127.0.0.1:*", "deviceName": "udp-meters", "deviceType": "meter",
                     "converter": UDP_CONVERTER_CLASS, "encoding": "utf-8", "telemetry": [], "attributes": [],
                     "attributeRequests": [], "attributeUpdates": [], "serverSideRpc": []}],
    }


def udp_frames(items):
    """Datagrams: each run of consecutive readings of one meter (ROWS at most) as one JSON frame."""
    out, run = [], []
    for d, r in items:
        if run and (run[0][0] != d or len(run) == ROWS):
            out.append(json.dumps({"device": run[0][0], "readings": [x for _d, x in run]}, separators=(",", ":")))
            run = []
        run.append((d, r))
    if run:
        out.append(json.dumps({"device": run[0][0], "readings": [x for _d, x in run]}, separators=(",", ":")))
    return [f.encode() for f in out]


class Peer:
    def __init__(self, venv, workdir, config_dir):
        self.workdir = workdir
        self.log = open(workdir / "peer.log", "ab")
        env = {**os.environ, "TB_GW_CONFIG_DIR": str(config_dir), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), str(venv / "bin" / "thingsboard-gateway")],
                                     cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self):
        return self.proc.poll() is None

    def tail(self, n=15):
        try:
            return "\n".join((self.workdir / "peer.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _wait(predicate, timeout, peer, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if not peer.alive():
            raise RuntimeError(f"the peer exited ({peer.proc.returncode}) while {what}:\n{peer.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out ({timeout} s) {what}; the peer's log ends:\n{peer.tail()}")


def _wait_delivered(upstream, n, prefix=""):
    """Until n readings (of devices named prefix...) arrived upstream, or none arrived for STALL_S."""
    last, last_change = -1, time.monotonic()
    while True:
        got = upstream.count(prefix)
        if got >= n:
            return got
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > STALL_S:
            return got
        time.sleep(0.05)


def _warm_up(upstream, peer, send, label):
    """Send one reading of a meter of its own until it arrives upstream: the peer's path is live."""
    warm = f"warmup{label}"
    k = 0

    def arrived():
        return upstream.count(warm) > 0

    end = time.monotonic() + 120
    while not arrived():
        if time.monotonic() > end:
            raise RuntimeError(f"no warm-up reading came through the peer's {label} connector in 120 s:\n{peer.tail()}")
        if not peer.alive():
            raise RuntimeError(f"the peer exited ({peer.proc.returncode}):\n{peer.tail()}")
        k += 1
        r = meter_readings(1, 1)[0][1]
        r["seq"], r["ts"] = k, r["ts"] + k * 1000
        send(warm, r)
        t_next = time.monotonic() + 1.0
        while time.monotonic() < t_next and not arrived():
            time.sleep(0.02)


def measure_peer_mqtt(venv, n, devices, steady_n=0, steady_rate=500):
    from tools.bench.gateway import _cpu_s, _vmhwm_kb
    from tools.broker import Broker
    import paho.mqtt.client as mqtt
    with tempfile.TemporaryDirectory(prefix="prapa-bench-peers-") as tmp:
        tmp = Path(tmp)
        up = Broker(tmp / "upstream", extra_conf=BROKER_CONF)
        dev = Broker(tmp / "devices", extra_conf=BROKER_CONF)
        upstream = peer = None
        try:
            upstream = Upstream(up, FIELDS)
            (tmp / "peer").mkdir()
            write_peer_config(tmp / "peer" / "config", venv, up.port,
                              [("mqtt", "meters", "mqtt_meters.json", mqtt_connector(dev))],
                              max_records=max(100_000, 2 * n))
            t_start = time.perf_counter()
            peer = Peer(venv, tmp / "peer", tmp / "peer" / "config")
            _wait(upstream.limits_answered.is_set, 120, peer, "waiting for its getSessionLimits request")
            one = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-warmup", protocol=mqtt.MQTTv311)
            one.connect(dev.host, dev.port)
            one.loop_start()
            _warm_up(upstream, peer,
                     lambda d, r: one.publish(f"meters/{d}/reading", json.dumps(r), qos=1).wait_for_publish(5),
                     "mqtt")
            start_s = time.perf_counter() - t_start
            one.loop_stop()
            one.disconnect()
            time.sleep(1.0)
            idle_kb = _vmhwm_kb(peer.proc.pid)
            items = meter_readings(n, devices)
            cpu0 = _cpu_s(peer.proc.pid)
            t0, t_acked = publish_all(dev, items, lambda d: f"meters/{d}/reading")
            got = _wait_delivered(upstream, n, prefix="0000")
            cpu = _cpu_s(peer.proc.pid) - cpu0
            rss_kb = _vmhwm_kb(peer.proc.pid)
            t_last = upstream.last_at
            dups = sum(1 for d, _ts in upstream.duplicates if d.startswith("0000"))
            lat = []
            if steady_n and got == n:
                # Steady load: other meters (ids from 0x13000), paced; latency from each send to its delivery.
                sent = publish_paced(dev, meter_readings(steady_n, devices, first=0x13000), steady_rate,
                                     lambda d: f"meters/{d}/reading")
                _wait_delivered(upstream, steady_n, prefix="0001")
                with upstream.lock:
                    lat = sorted(upstream.arrived[k] - t for k, t in sent if k in upstream.arrived)
                dups += sum(1 for d, _ts in upstream.duplicates if d.startswith("0001"))
            alive = peer.alive()
        finally:
            if peer:
                peer.stop()
            if upstream:
                upstream.close()
            dev.stop()
            up.stop()
    return {
        "peer_mqtt_readings": n,
        "peer_mqtt_delivered": got,
        "peer_mqtt_readings_per_s": round(got / (t_last - t0)) if got else 0,
        "peer_mqtt_load_pubacked_per_s": round(n / (t_acked - t0)),
        "peer_mqtt_cpu_s_per_100k_readings": round(cpu * 100_000 / got, 2) if got else None,
        "peer_mqtt_peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "peer_mqtt_rss_mb_after_start": round(idle_kb / 1024, 1) if idle_kb else None,
        "peer_mqtt_duplicates": dups,
        "peer_mqtt_lost": n - got,
        "peer_mqtt_steady_offered_readings_per_s": steady_rate if steady_n else None,
        "peer_mqtt_steady_delivered": len(lat),
        "peer_mqtt_send_to_upstream_ms_p50": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "peer_mqtt_send_to_upstream_ms_p99": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 1) if lat else None,
        "peer_start_to_first_reading_s": round(start_s, 1),
        "peer_alive_at_end": alive,
    }


def measure_peer_udp(venv, n, devices):
    """The same meter readings to the socket connector over UDP, one datagram a frame (ROWS readings of one
    meter), decoded by our custom converter. The connector sleeps 0.2 s after each datagram."""
    from tools.bench.gateway import _cpu_s, _vmhwm_kb
    from tools.broker import Broker, free_port
    install_udp_converter(venv)
    with tempfile.TemporaryDirectory(prefix="prapa-bench-peers-udp-") as tmp:
        tmp = Path(tmp)
        up = Broker(tmp / "upstream", extra_conf=BROKER_CONF)
        upstream = peer = None
        port = free_port()
        try:
            upstream = Upstream(up, FIELDS)
            (tmp / "peer").mkdir()
            write_peer_config(tmp / "peer" / "config", venv, up.port,
                              [("socket", "udp-meters", "socket_meters.json", udp_connector(port))],
                              max_records=100_000)
            peer = Peer(venv, tmp / "peer", tmp / "peer" / "config")
            _wait(upstream.limits_answered.is_set, 120, peer, "waiting for its getSessionLimits request")
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
            _warm_up(upstream, peer, lambda d, r: sock.sendto(udp_frames([(d, r)])[0], ("127.0.0.1", port)), "udp")
            time.sleep(1.0)
            items = meter_readings(n, devices)
            datagrams = udp_frames(items)
            cpu0 = _cpu_s(peer.proc.pid)
            t0 = time.perf_counter()
            for datagram in datagrams:
                sock.sendto(datagram, ("127.0.0.1", port))
            got = _wait_delivered(upstream, n, prefix="0000")
            cpu = _cpu_s(peer.proc.pid) - cpu0
            rss_kb = _vmhwm_kb(peer.proc.pid)
            t_last = upstream.last_at
            dups = sum(1 for d, _ts in upstream.duplicates if d.startswith("0000"))
            sock.close()
        finally:
            if peer:
                peer.stop()
            if upstream:
                upstream.close()
            up.stop()
    return {
        "peer_udp_readings": n,
        "peer_udp_datagrams": len(datagrams),
        "peer_udp_delivered": got,
        "peer_udp_readings_per_s": round(got / (t_last - t0), 1) if got else 0,
        "peer_udp_cpu_s_per_100k_readings": round(cpu * 100_000 / got, 1) if got else None,
        "peer_udp_peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "peer_udp_duplicates": dups,
        "peer_udp_lost": n - got,
    }


# -- the command -------------------------------------------------------------------------------------------
def problem():
    """Why the peer cannot run here, as a UsageError (the fix included), or None."""
    venv = venv_dir()
    if not venv_ready(venv):
        return UsageError("bench peers", f"the peer's venv ({PEER}=={PEER_VERSION}) is not at {venv}",
                          "run prapa bench peers --setup (it builds it there, outside the project's venv)")
    if not _inside():
        netns = _netns_problem()
        if netns:
            return UsageError("bench peers", f"cannot isolate the peer in a loopback-only network namespace: {netns}",
                              "run as root where unshare -n is allowed (the peer posts to its vendor's update "
                              "server when it starts and cannot be told not to)")
    return None


def run(args):
    if args.setup:
        return setup()
    why_not = problem()
    if why_not:
        raise why_not
    if not _inside():
        return _reexec_in_netns(args)
    if not _only_loopback():
        print("prapa: error: bench peers: this network namespace has interfaces besides lo (or lo is down); "
              "refusing to start the peer", file=sys.stderr)
        return 1
    print_figures(figures_in_netns(args), args.json)
    return 0


def measure(args):
    """The figures (a dict) of one run as args say, for prapa bench all: the run happens in the namespace (a
    child process re-executing this command with --json); its progress goes to stderr."""
    why_not = problem()
    if why_not:
        raise why_not
    if _inside():
        return figures_in_netns(args)
    args.json = True
    r = _reexec_in_netns(args, capture=True)
    if r.returncode != 0:
        raise RuntimeError(f"prapa bench peers exited {r.returncode} in its namespace")
    return json.loads(r.stdout)


def figures_in_netns(args):
    """The run itself, inside the namespace: ours, then the peer's, then the ratios."""
    venv = venv_dir()
    n = args.readings or (QUICK_READINGS if args.quick else 100_000)
    n = max(ROWS, n // ROWS * ROWS)
    steady_n = QUICK_STEADY if args.quick else STEADY_READINGS
    figures = {"readings": n, "devices": args.devices, "peer": f"{PEER}=={PEER_VERSION}",
               "isolation": "unshare -n, lo only"}
    ours = None
    if not args.no_ours:
        from tools.bench import gateway
        ours = gateway.measure(n, args.devices, steady_readings=steady_n, steady_rate=args.steady_rate)
        figures.update({f"ours_{k}": v for k, v in ours.items() if k not in ("readings",)})
    peer = measure_peer_mqtt(venv, n, args.devices, steady_n, args.steady_rate)
    figures.update(peer)
    if ours:
        rate, prate = ours["readings_per_s_received_committed_pubacked"], peer["peer_mqtt_readings_per_s"]
        cpu, pcpu = ours.get("gateway_cpu_s_per_100k_readings"), peer["peer_mqtt_cpu_s_per_100k_readings"]
        rss, prss = ours.get("gateway_peak_rss_mb"), peer["peer_mqtt_peak_rss_mb"]
        figures["ratio_readings_per_s_ours_to_peer_mqtt"] = round(rate / prate, 2) if prate else None
        figures["ratio_cpu_per_100k_ours_to_peer_mqtt"] = round(cpu / pcpu, 3) if cpu and pcpu else None
        figures["ratio_peak_rss_ours_to_peer_mqtt"] = round(rss / prss, 2) if rss and prss else None
    if args.udp:
        figures.update(measure_peer_udp(venv, QUICK_UDP_READINGS if args.quick else UDP_READINGS, args.devices))
        if ours and figures.get("peer_udp_readings_per_s"):
            figures["ratio_readings_per_s_ours_to_peer_udp"] = round(
                ours["readings_per_s_received_committed_pubacked"] / figures["peer_udp_readings_per_s"])
    return figures


# What each figure means and, for a ratio, its baseline (the convention of prapa bench all's record; the peer
# is not part of that run). RATIOS are the ratios printed here, which a record recomputes from the rows.
FIGURES = (
    ("readings", "readings offered to each gateway flat out (runs of 32 readings of one meter, meters interleaved)"),
    ("devices", "simulated meters"),
    ("peer", "the peer, from PyPI, in a venv of its own"),
    ("isolation", "the network the run had: a namespace with loopback only"),
    ("ours_readings_per_s_received_committed_pubacked", "ours: readings/s from the first byte written to the last "
     "PUBACK (verified, decrypted, committed with synchronous=FULL, acked, forwarded), against the peer's MQTT "
     "connector on the same readings", "peer_mqtt_readings_per_s"),
    ("ours_readings_per_s_received_committed_pubacked", "ours, against the peer's UDP socket connector (it sleeps "
     "0.2 s after each datagram)", "peer_udp_readings_per_s"),
    ("ours_gateway_cpu_s_per_100k_readings", "ours: the gateway process's CPU seconds (user+sys) per 100,000 "
     "readings, against the peer's", "peer_mqtt_cpu_s_per_100k_readings"),
    ("ours_gateway_peak_rss_mb", "ours: peak resident memory (VmHWM), against the peer's", "peer_mqtt_peak_rss_mb"),
    ("ours_*", "ours: as prapa bench gateway reports it (tools/bench/gateway.py)"),
    ("peer_mqtt_readings", "readings the load generator published to the device-side broker (QoS 1, JSON)"),
    ("peer_mqtt_delivered", "readings delivered upstream with all their fields"),
    ("peer_mqtt_readings_per_s", "the peer's MQTT connector: readings/s from the first send to the last delivery "
     "upstream"),
    ("peer_mqtt_load_pubacked_per_s", "the load generator's rate into the device-side broker (PUBACKed)"),
    ("peer_mqtt_cpu_s_per_100k_readings", "the peer process's CPU seconds (user+sys) per 100,000 readings"),
    ("peer_mqtt_peak_rss_mb", "the peer's peak resident memory (VmHWM), against its memory after start",
     "peer_mqtt_rss_mb_after_start"),
    ("peer_mqtt_rss_mb_after_start", "the peer's resident memory once its first reading came through"),
    ("peer_mqtt_duplicates", "readings with a field delivered twice, no fault injected"),
    ("peer_mqtt_lost", "readings never delivered (none for 30 s after the last)"),
    ("peer_mqtt_steady_offered_readings_per_s", "the offered load of the latency run (ours had the same)"),
    ("peer_mqtt_steady_delivered", "readings of the latency run delivered"),
    ("peer_mqtt_send_to_upstream_ms_p50", "send to the device-side broker to delivery upstream, median"),
    ("peer_mqtt_send_to_upstream_ms_p99", "send to the device-side broker to delivery upstream, 99th percentile"),
    ("peer_start_to_first_reading_s", "the peer's start to its first reading delivered upstream"),
    ("peer_alive_at_end", "the peer was still running at the end"),
    ("peer_udp_*", "the peer's UDP socket connector: one datagram a frame of readings, our custom converter"),
)
RATIOS = ("ratio_readings_per_s_ours_to_peer_mqtt", "ratio_cpu_per_100k_ours_to_peer_mqtt",
          "ratio_peak_rss_ours_to_peer_mqtt", "ratio_readings_per_s_ours_to_peer_udp")
