"""The gateway against a clustered broker (issue 16): a 3-node RabbitMQ cluster on loopback, its MQTT plugin.

On request only (-m soak), and only where Debian's rabbitmq-server is installed (it is not among ./dev's
default packages: `apt-get install rabbitmq-server`; no service needs to run, the test starts its own
nodes). The cluster's three nodes are the forwarder's broker list; the node it publishes to is
SIGKILLed, the forwarder fails over through the list and later fails back, and a QoS 1 subscriber with a
persistent session on a node that survives ends with every entry (the gateway's replay fills any gap).

RabbitMQ 3.10's MQTT plugin speaks MQTT 3.1.1 only, and answers an MQTT 5 CONNECT by closing the
connection with no CONNACK ("cannot parse a frame"), which protocol = "auto" does not take as a reason
to fall back: a gateway on such a broker is configured with protocol = "3.1.1", as here. The plugin
keeps a persistent session's subscription in a queue, and tracks client ids cluster-wide in a Raft
group. With mqtt.durable_queue_type = quorum each session queue is replicated on the three nodes, so the
gateway's session (its replay-request subscription) and the subscriber's survive the loss of any one
node. With the default, classic, the gateway's session queue (mqtt-subscription-<client id>qos1) lives
on the node it first connected to only: once that node is killed, another node accepts the gateway's
CONNECT but drops the connection at its SUBSCRIBE ("home node ... of durable queue ... is down or
inaccessible"), over and over, and nothing is delivered until the node returns (tried: this test fails
so with classic). A production RabbitMQ behind gateways wants mqtt.durable_queue_type = quorum.
"""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest

from gateway.forwarder import Forwarder
from gateway.store import Store
from tests.gateway.test_forwarder import committing_boards, wait_for
from tools.broker import free_port

SITE = "rabbit-site"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")      # the scripts themselves: /usr/sbin's wrappers su to `rabbitmq`
COOKIE = "PRAPATESTCOOKIE"

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not (RABBIT_BIN / "rabbitmq-server").exists() or shutil.which("erl") is None,
                       reason="rabbitmq-server is not installed: run `apt-get install rabbitmq-server` (Debian 12; "
                              "the test starts its own three nodes, no service needed)"),
]


class RabbitCluster:
    """n RabbitMQ nodes on loopback, clustered, each with the MQTT plugin on its own port.

    Everything is under workdir: per node its mnesia and log folders, rabbitmq.conf and enabled_plugins;
    one HOME with the shared Erlang cookie (nodes and CLI tools read it from there); and its own epmd port
    (ERL_EPMD_PORT), so nothing meets a system RabbitMQ or another test's nodes. Node names are
    prapa-rN-<port>@localhost. kill(i) is a SIGKILL of node i's process group; start(i) brings it back
    with the same data (it rejoins the cluster)."""

    def __init__(self, workdir, n=3, start_timeout_s=90):
        self.workdir = Path(workdir)
        self.home = self.workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
        self.epmd_port = free_port()
        self.start_timeout_s = start_timeout_s
        self.nodes, self.procs, self.logs = [], [None] * n, [None] * n
        for i in range(n):
            amqp, dist, mqtt_port = free_port(), free_port(), free_port()
            d = self.workdir / f"r{i}"
            (d / "mnesia").mkdir(parents=True, exist_ok=True)
            (d / "log").mkdir(parents=True, exist_ok=True)
            (d / "rabbitmq.conf").write_text("\n".join([
                f"listeners.tcp.default = 127.0.0.1:{amqp}",
                f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
                "mqtt.allow_anonymous = true",
                "mqtt.durable_queue_type = quorum",
                "loopback_users = none",
                "log.console = false",
                "log.file.level = info",
                "cluster_partition_handling = pause_minority",
            ]) + "\n")
            self.nodes.append({"name": f"prapa-r{i}-{amqp}@localhost", "dir": d, "amqp": amqp, "dist": dist,
                               "mqtt": mqtt_port, "host": "127.0.0.1"})

    def env(self, i):
        node = self.nodes[i]
        d = node["dir"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port), RABBITMQ_NODENAME=node["name"],
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(node["amqp"]),
                   RABBITMQ_DIST_PORT=str(node["dist"]), RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
                   RABBITMQ_LOG_BASE=str(d / "log"), RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
                   RABBITMQ_PID_FILE=str(d / "rabbit.pid"), RABBITMQ_ALLOW_INPUT="", LANG="C.UTF-8")
        return env

    def ctl(self, i, *args, tool="rabbitmqctl", timeout_s=120):
        cmd = [str(RABBIT_BIN / tool)]
        if tool != "rabbitmq-plugins" or "--offline" not in args:
            cmd += ["-n", self.nodes[i]["name"]]
        out = subprocess.run(cmd + list(args), env=self.env(i), capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd + list(args))} exited {out.returncode}: {out.stdout}{out.stderr}")
        return out.stdout

    def start(self, i):
        log = self.logs[i] = open(self.nodes[i]["dir"] / "server.out", "a")
        self.procs[i] = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(i), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:                  # await_startup fails at once until the node has registered with epmd
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node {self.nodes[i]['name']} exited: see {self.nodes[i]['dir']}/server.out")
            try:
                self.ctl(i, "await_startup", "--timeout", str(self.start_timeout_s),
                         timeout_s=self.start_timeout_s + 30)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def form(self):
        """Start every node, enable MQTT on each (offline, before its first boot), join all to node 0."""
        for i in range(len(self.nodes)):
            self.ctl(i, "--offline", "enable", "rabbitmq_mqtt", tool="rabbitmq-plugins")
        for i in range(len(self.nodes)):
            self.start(i)
        for i in range(1, len(self.nodes)):
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.nodes[0]["name"])
            self.ctl(i, "start_app")
        status = self.ctl(0, "cluster_status")
        for node in self.nodes:
            assert node["name"] in status, status
        return self

    def running(self, i):
        return self.procs[i] is not None and self.procs[i].poll() is None

    def kill(self, i):
        """SIGKILL the node's whole process group (the script, beam.smp and its helpers)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self.logs[i] is not None:
            self.logs[i].close()

    def stop(self):
        for i in range(len(self.nodes)):
            if self.running(i):
                try:
                    self.ctl(i, "stop", timeout_s=60)
                    self.procs[i].wait(30)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
            self.kill(i)
        env = {**os.environ, "HOME": str(self.home)}    # the epmd our nodes started, on our port only
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], env=env, capture_output=True, timeout=10)


class Subscriber:
    """The cloud: MQTT 3.1.1 (what RabbitMQ 3.10 speaks), QoS 1, clean_session=False, recording identities."""

    def __init__(self, host, port, client_id, topic=f"prapa/v1/{SITE}/#"):
        self.ids, self.done, self.lock = set(), [], threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.subscribed.wait(20), "subscriber did not subscribe"

    def _on_message(self, _c, _u, msg):
        if msg.topic.endswith("/gateway/status") or msg.topic.endswith("/replay/request"):
            return
        body = cbor2.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/replay/done"):
                self.done.append(body)
            for item in body.get("items", ()):
                self.ids.add((item["device"], item["boot"], item["seq"]))

    def identities(self):
        with self.lock:
            return set(self.ids)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def cluster(tmp_path):
    c = RabbitCluster(tmp_path / "rabbit")
    t0 = time.monotonic()
    try:
        c.form()
        c.formed_s = round(time.monotonic() - t0, 1)
        yield c
    finally:
        c.stop()


def test_a_rabbitmq_cluster_node_killed_under_the_gateway_fails_over_and_the_subscriber_misses_nothing(
        tmp_path, cluster):
    """About a minute in all on a laptop-class machine: forming the cluster takes about 40 s (three
    nodes booted, two joined), the run about 10 s (about 6,000 entries; failover in under a second, node 0
    back in about 6 s and the forwarder on it again within a second of that), stopping the nodes about 5 s.

    Broker list: the three nodes' MQTT ports. The subscriber sits on node 2 (a survivor). Boards commit
    all along; node 0, the one the gateway publishes to, is SIGKILLed; the forwarder goes to node 1 and goes
    on; node 0 is started again and the forwarder fails back to it (failback_s = 2). Every committed entry
    reaches the subscriber: first as sent, and whatever is missing then by asking the gateway for a replay
    (prapa/v1/<site>/<device>/replay/request) through the cluster."""
    t0 = time.monotonic()
    brokers = [{"host": n["host"], "port": n["mqtt"], "tls": False} for n in cluster.nodes]
    urls = [f"mqtt://{n['host']}:{n['mqtt']}" for n in cluster.nodes]
    sub = Subscriber(cluster.nodes[2]["host"], cluster.nodes[2]["mqtt"], "cloud-rabbit")
    store = Store(tmp_path / "g.db")
    fwd = Forwarder(store, {"site": SITE, "client_id": "prapa-rabbit-gw", "backoff_initial_s": 0.2,
                            "backoff_max_s": 2.0, "connect_timeout_s": 5.0, "poll_s": 0.05, "max_items": 50,
                            "brokers": brokers, "failback_s": 2.0, "protocol": "3.1.1"})
    fwd.start()
    report = {}
    with committing_boards(tmp_path / "g.db", fwd, (30, 31), boot=4, pause_s=0.02) as committed:
        wait_for(lambda: fwd.connected and fwd.broker == urls[0], 30, "the gateway on node 0")
        wait_for(lambda: len(sub.identities()) > 500, 30, "entries at the subscriber on node 2")
        cluster.kill(0)
        killed = time.monotonic()
        wait_for(lambda: fwd.connected and fwd.broker in urls[1:], 60, "failover to another node")
        report["failover_s"] = round(time.monotonic() - killed, 1)
        there = len(sub.identities())
        wait_for(lambda: len(sub.identities()) > there + 500, 60, "delivery going on after the failover")
        restarted = time.monotonic()
        cluster.start(0)
        report["node_restart_s"] = round(time.monotonic() - restarted, 1)
        wait_for(lambda: fwd.connected and fwd.broker == urls[0], 30, "failback to node 0")
        report["failback_after_restart_s"] = round(time.monotonic() - restarted, 1)
        back = len(sub.identities())
        wait_for(lambda: len(sub.identities()) > back + 500, 60, "delivery on node 0 again")
    fwd.kick()
    wait_for(lambda: not store.pending(limit=1), 60, "every entry PUBACKed")
    want = set(committed)
    try:
        wait_for(lambda: sub.identities() >= want, 20, "every identity at the subscriber")
    except AssertionError:
        pass
    missing = want - sub.identities()
    report["missing_before_replay"] = len(missing)
    # Ask the gateway, through the cluster (on node 2), for a replay: of every gap, and in any case of each
    # device's last 100 entries, which shows its session (the replay-request subscription, made on node 0)
    # outlived node 0's kill.
    last = {d: max(s for dd, _b, s in want if dd == d) for d in (30, 31)}
    since = {d: last[d] - 100 for d in last}
    for d, _b, s in missing:
        since[d] = min(since[d], s - 1)
    asker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-rabbit-asker", protocol=mqtt.MQTTv311)
    asker.connect(cluster.nodes[2]["host"], cluster.nodes[2]["mqtt"])
    asker.loop_start()
    for device, seq in since.items():
        asker.publish(f"prapa/v1/{SITE}/{device:08x}/replay/request",
                      cbor2.dumps({"since_boot": 4, "since_seq": seq}), qos=1).wait_for_publish(10)
    wait_for(lambda: len(sub.done) >= len(since), 60, "replay/done for each device")
    asker.loop_stop()
    asker.disconnect()
    assert sorted((int(m["device"], 16), m["count"]) for m in sub.done) == [(d, last[d] - since[d]) for d in (30, 31)]
    wait_for(lambda: sub.identities() >= want, 30, "the gaps filled by replay")
    missing = want - sub.identities()
    report.update(cluster_formed_s=cluster.formed_s, entries=len(want), run_s=round(time.monotonic() - t0, 1), failbacks=fwd.failbacks,
                  reconnects=fwd.reconnects)
    print(f"\nrabbitmq cluster run: {report}")
    fwd.stop()
    sub.close()
    assert not missing, f"{len(missing)} identities never reached the subscriber, e.g. {sorted(missing)[:5]}"
    assert fwd.failbacks >= 1
