"""gateway/forwarder.py against real Mosquitto brokers: PUBACK before forgetting, outages, failover, TLS, replay."""

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import forward_format as ff
from gateway.forwarder import Forwarder
from gateway.store import Entry, Store
from tools.broker import Broker
from protocol.errors import UsageError

SITE = "test-site"


def entries(device, boot, seqs, kind="readings"):
    return [Entry(device, boot, s, kind, 900 * s,
                  cbor2.dumps({"device": device, "boot": boot, "seq": s, "kind": kind, "litres": 3 * s},
                              canonical=True), wall_t=1.8e9 + s, time_source="gateway") for s in seqs]


def config(*brokers, **over):
    table = {"site": SITE, "client_id": "prapa-test-gw", "backoff_initial_s": 0.05, "backoff_max_s": 0.4,
             "connect_timeout_s": 2.0, "poll_s": 0.05, "max_items": 50,
             "brokers": [{"host": b.host, "port": b.port, "tls": False} if isinstance(b, Broker) else b
                         for b in brokers]}
    table.update(over)
    return table


def wait_for(cond, timeout_s=15.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Subscriber:
    """The cloud side: an MQTT 5 QoS 1 subscriber with a persistent session, recording what arrives in order."""

    def __init__(self, host, port, client_id, topic=f"prapa/v1/{SITE}/#", tls=None):
        self.messages, self.lock = [], threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.05, 0.2)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 3600
        self.client.connect(host, port, clean_start=False, properties=session)
        self.client.loop_start()
        assert self.subscribed.wait(5), "subscriber did not subscribe"

    statuses = None

    def _on_message(self, _c, _u, msg):
        with self.lock:
            if msg.topic.endswith("/gateway/status"):       # the gateway's own state, kept apart
                self.statuses = (self.statuses or []) + [(msg.topic, msg.payload, msg.retain)]
                return
            self.messages.append((msg.topic, msg.payload, msg.properties))

    def decoded(self, fmt="cbor"):
        with self.lock:
            msgs = list(self.messages)
        return [(t, cbor2.loads(p) if fmt == "cbor" else json.loads(p)) for t, p, _ in msgs
                if not t.endswith("/replay/request")]

    def identities(self, fmt="cbor"):
        return {(i["device"], i["boot"], i["seq"]) for t, m in self.decoded(fmt) if "items" in m for i in m["items"]}

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def committing_boards(store_path, fwd, devices, boot, pause_s):
    """Boards committing entries to the store all along, a thread each, kicking the forwarder; yields the
    list of (device, boot, seq) committed so far and stops them on leaving."""
    committed, running = [], threading.Event()
    running.set()

    def board(device):
        w, start = Store(store_path), 0
        while running.is_set():
            w.commit(entries(device, boot, range(start, start + 10)))
            committed.extend((device, boot, s) for s in range(start, start + 10))
            start += 10
            fwd.kick()
            time.sleep(pause_s)

    threads = [threading.Thread(target=board, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    try:
        yield committed
    finally:
        running.clear()
        for t in threads:
            t.join()


def pending_count(store):
    return len(store.pending(limit=1_000_000))


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker", extra_conf=["max_queued_messages 0"])
    yield b
    b.stop()


@pytest.fixture
def forwarders():
    made = []
    yield lambda store, cfg: made.append(Forwarder(store, cfg)) or made[-1]
    for f in made:
        f.stop()


def test_entries_reach_a_persistent_qos1_subscriber_with_identity_and_are_marked_only_after_puback(
        tmp_path, broker, forwarders):
    sub = Subscriber(broker.host, broker.port, "cloud-1")
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(broker))
    fwd.start()
    wait_for(lambda: fwd.connected, what="a connection")
    os.kill(broker.proc.pid, signal.SIGSTOP)        # the broker takes the PUBLISHes into its socket, answers nothing
    try:
        store.commit(entries(0x2A, 7, range(120)) + entries(0x2B, 3, range(30)) + entries(0x2A, 7, [120], "alarm"))
        fwd.kick()
        wait_for(lambda: fwd.published > 0, what="a publish to the frozen broker")
        time.sleep(0.3)
        assert fwd.forwarded == 0 and pending_count(store) == 151, "marked forwarded without a PUBACK"
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    wait_for(lambda: pending_count(store) == 0, what="every entry PUBACKed and marked")
    want = {(0x2A, 7, s) for s in range(121)} | {(0x2B, 3, s) for s in range(30)}
    wait_for(lambda: sub.identities() >= want, what="every identity at the subscriber")
    topic, first = sub.decoded()[0]
    assert topic == f"prapa/v1/{SITE}/0000002a/alarm" and first["kind"] == "alarm"   # alarm ahead of the backlog
    assert first["device"] == "0000002a" and first["items"][0]["seq"] == 120 and first["v"] == 1
    assert first["items"][0]["wall_t"] == 1.8e9 + 120 and first["items"][0]["time_source"] == "gateway"
    props = dict(sub.messages[1][2].UserProperty)
    first_boot, first_seq = map(int, props["first"].split(":"))
    assert props["device"] in ("0000002a", "0000002b") and int(props["last"].split(":")[1]) >= first_seq
    assert all(len(m["items"]) <= 50 for _t, m in sub.decoded())
    stats = fwd.stats()
    assert stats["connected"] and stats["protocol"] == "5" and stats["broker"] == f"mqtt://{broker.host}:{broker.port}"
    assert stats["forwarded"] == 151 and len(fwd.puback_latency_s) == stats["acked"] > 0
    wait_for(lambda: fwd.backlog == 0, what="backlog counter")
    sub.close()


def test_a_long_broker_outage_is_drained_afterwards_in_order_per_device_alarms_first(tmp_path, broker, forwarders):
    sub = Subscriber(broker.host, broker.port, "cloud-2")
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(broker))
    fwd.start()
    store.commit(entries(1, 1, range(10)))
    wait_for(lambda: pending_count(store) == 0, what="the first entries")
    broker.stop()
    wait_for(lambda: not fwd.connected, what="the forwarder to see the outage")
    seq = {1: 10, 2: 0, 3: 0}
    alarms = []
    for batch in range(60):                     # 3,000 readings, alarms among them, while the broker is away
        for device in (1, 2, 3):
            store.commit(entries(device, 1, range(seq[device], seq[device] + 50 // 3 + 1)))
            seq[device] += 50 // 3 + 1
        if batch % 15 == 7:
            alarms.append((2, 1, seq[2]))
            store.commit(entries(2, 1, [seq[2]], "alarm"))
            seq[2] += 1
    time.sleep(1.0)                             # several reconnect attempts fail meanwhile
    assert "connect failed" in fwd.last_error and f"{broker.port}" in fwd.last_error
    broker.start()
    total = sum(seq.values())
    wait_for(lambda: len(sub.identities()) == total, timeout_s=20, what="the whole backlog")
    wait_for(lambda: pending_count(store) == 0, what="the last PUBACKs")
    order = [(t, i) for t, m in sub.decoded() for i in m["items"]]
    backlog = [(t, i) for t, i in order if not (i["device"] == 1 and i["seq"] < 10)]
    kinds = [i["kind"] for _t, i in backlog]
    assert kinds[:len(alarms)] == ["alarm"] * len(alarms), "alarms did not go ahead of the backlog"
    assert [(i["device"], i["boot"], i["seq"]) for _t, i in backlog[:len(alarms)]] == alarms
    for device in (1, 2, 3):
        seqs = [i["seq"] for _t, i in order if i["device"] == device and i["kind"] == "readings"]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == sorted(first_seen), f"device {device} out of order"
    sub.close()


def test_failover_to_the_second_broker_when_the_first_is_killed_loses_nothing(tmp_path, forwarders):
    b1 = Broker(tmp_path / "b1", extra_conf=["max_queued_messages 0"])
    b2 = Broker(tmp_path / "b2", extra_conf=["max_queued_messages 0"])
    subs = [Subscriber(b1.host, b1.port, "cloud-3a"), Subscriber(b2.host, b2.port, "cloud-3b")]
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(b1, b2))
    fwd.start()
    committed = []

    def board(device, n):
        for start in range(0, n, 20):
            batch = entries(device, 5, range(start, start + 20))
            store_w = stores[device]
            store_w.commit(batch)
            committed.extend((device, 5, s) for s in range(start, start + 20))
            fwd.kick()
            time.sleep(0.01)

    stores = {d: Store(tmp_path / "g.db") for d in (10, 11)}
    threads = [threading.Thread(target=board, args=(d, 3000)) for d in (10, 11)]
    for t in threads:
        t.start()
    wait_for(lambda: len(subs[0].identities()) > 1000, what="forwarding to the first broker")
    b1.kill()
    for t in threads:
        t.join()
    wait_for(lambda: pending_count(store) == 0, timeout_s=20, what="the rest on the second broker")
    assert fwd.broker == f"mqtt://{b2.host}:{b2.port}" and fwd.reconnects >= 1
    got = subs[0].identities() | subs[1].identities()
    missing = set(committed) - got
    assert len(subs[1].identities()) > 0
    assert not missing, f"{len(missing)} identities lost, e.g. {sorted(missing)[:5]}"
    for s in subs:
        s.close()
    b2.stop()


def make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, name, server):
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def write_pem(path, key=None, cert=None):
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca = make_ca("prapa test CA")
    other_key, other = make_ca("somebody else's CA")
    s_key, s_cert = make_leaf(ca_key, ca, "broker", server=True)
    c_key, c_cert = make_leaf(ca_key, ca, "prapa-test-gw", server=False)
    return {"ca": write_pem(d / "ca.pem", cert=ca), "wrong_ca": write_pem(d / "wrong-ca.pem", cert=other),
            "server_cert": write_pem(d / "server.pem", cert=s_cert), "server_key": write_pem(d / "server.key", s_key),
            "client_cert": write_pem(d / "client.pem", cert=c_cert), "client_key": write_pem(d / "client.key", c_key)}


def test_tls_with_client_certificate_delivers_and_a_wrong_ca_is_refused_with_a_clear_error(
        tmp_path, pki, forwarders, caplog):
    b = Broker(tmp_path / "tls-broker", tls={"cafile": pki["ca"], "certfile": pki["server_cert"],
                                             "keyfile": pki["server_key"], "require_certificate": True})
    client_tls = {"ca_certs": pki["ca"], "certfile": pki["client_cert"], "keyfile": pki["client_key"]}
    sub = Subscriber(b.host, b.port, "cloud-4", tls=client_tls)
    tls = {"host": b.host, "port": b.port, "tls": True, "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    wrong_store = Store(tmp_path / "wrong.db")
    wrong_store.commit(entries(7, 1, range(5)))
    caplog.set_level(logging.INFO, logger="prapa.gateway.forwarder")
    wrong = forwarders(wrong_store, config({**tls, "ca_file": pki["wrong_ca"]}, client_id="gw-wrong"))
    wrong.start()
    wait_for(lambda: wrong.last_error is not None, what="the wrong CA to be refused")
    assert wrong.last_error.startswith(f"broker mqtts://{b.host}:{b.port}: TLS certificate verify failed with CA "
                                       f"{pki['wrong_ca']}") and "fix:" in wrong.last_error
    record = next(r for r in caplog.records if "broker_tls_verify_failed" in r.getMessage())
    line = json.loads(record.getMessage())
    assert line["event"] == "broker_tls_verify_failed" and pki["wrong_ca"] in line["error"]
    assert record.exc_info is None and "BEGIN" not in record.getMessage()
    wrong.stop()

    store = Store(tmp_path / "g.db")
    store.commit(entries(8, 1, range(5)))
    right = forwarders(store, config({**tls, "ca_file": pki["ca"]}))
    right.start()
    wait_for(lambda: pending_count(store) == 0, what="delivery over mutual TLS")
    wait_for(lambda: len(sub.identities()) == 5, what="the subscriber")
    assert right.broker == f"mqtts://{b.host}:{b.port}"
    assert {d for d, _b, _s in sub.identities()} == {8}, "the forwarder with the wrong CA delivered something"
    assert pending_count(wrong_store) == 5
    sub.close()
    b.stop()


class ThreeOneOneOnly(threading.Thread):
    """In front of a real Mosquitto, answers an MQTT 5 CONNECT as a 3.1.1-only broker does (MQTT 3.1.1
    §3.2.2.3: CONNACK return code 1, then close) and passes 3.1.1 connections through."""

    def __init__(self, upstream):
        super().__init__(daemon=True)
        self.upstream, self.refused = upstream, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.sock.getsockname()[1]

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        head = conn.recv(2)
        length, shift, byte = 0, 0, head[1]
        while True:
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            byte = conn.recv(1)[0]
            head += bytes([byte])
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        if body[6] == 5:
            self.refused += 1
            conn.sendall(b"\x20\x02\x00\x01")
            conn.close()
            return
        up = socket.create_connection((self.upstream.host, self.upstream.port))
        up.sendall(head + body)
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def test_mqtt_5_refused_falls_back_to_3_1_1_and_3_1_1_can_be_forced(tmp_path, broker, forwarders, caplog):
    caplog.set_level(logging.INFO, logger="prapa.gateway.forwarder")
    sub = Subscriber(broker.host, broker.port, "cloud-5")
    old = ThreeOneOneOnly(broker)
    old.start()
    store = Store(tmp_path / "g.db")
    store.commit(entries(3, 1, range(20)))
    fwd = forwarders(store, config({"host": old.host, "port": old.port, "tls": False}))
    fwd.start()
    wait_for(lambda: pending_count(store) == 0, what="delivery over 3.1.1")
    assert old.refused >= 1 and fwd.protocol == "3.1.1"
    assert any(json.loads(r.getMessage())["event"] == "broker_protocol_fallback" for r in caplog.records)
    wait_for(lambda: len(sub.identities()) == 20, what="the subscriber")
    fwd.stop()
    old.close()

    forced = forwarders(store, config(broker, protocol="3.1.1", client_id="gw-forced"))
    forced.start()
    store.commit(entries(4, 1, range(5)))
    forced.kick()
    wait_for(lambda: pending_count(store) == 0, what="delivery with 3.1.1 forced")
    assert forced.protocol == "3.1.1"
    sub.close()


def test_a_replay_request_over_mqtt_returns_the_stored_entries(tmp_path, broker, forwarders):
    sub = Subscriber(broker.host, broker.port, "cloud-6")
    store = Store(tmp_path / "g.db")
    store.commit(entries(0x2A, 1, range(40)) + entries(0x2A, 2, range(10)), now=1000.0)
    store.commit(entries(0x2B, 1, range(5)))
    store.db.execute("UPDATE entries SET wall_t=NULL WHERE boot_id=2 AND seq>=5")  # unknown time: arrival time counts
    fwd = forwarders(store, config(broker, format="json"))
    fwd.start()
    wait_for(lambda: pending_count(store) == 0, what="first delivery")
    wait_for(lambda: len(sub.identities("json")) == 55, what="first delivery at the subscriber")
    cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-6-asker")
    cloud.connect(broker.host, broker.port)
    cloud.loop_start()
    cloud.publish(f"prapa/v1/{SITE}/0000002a/replay/request",
                  cbor2.dumps({"since_boot": 1, "since_seq": 34}), qos=1).wait_for_publish(5)
    done = lambda: [m for t, m in sub.decoded("json") if t.endswith("/replay/done")]
    wait_for(lambda: len(done()) == 1, what="replay/done")
    replayed = [i for t, m in sub.decoded("json") if m.get("replay") for i in m["items"]]
    assert [(i["boot"], i["seq"]) for i in replayed] == [(1, s) for s in range(35, 40)] + [(2, s) for s in range(10)]
    assert done()[0]["count"] == 15 and done()[0]["device"] == "0000002a"
    cloud.publish(f"prapa/v1/{SITE}/0000002a/replay/request", json.dumps({"since_time": 1.8e9 + 3}), qos=1)
    wait_for(lambda: len(done()) == 2, what="the second replay/done")
    # boot 1 seq 3..39 and boot 2 seq 3..4 by wall time; boot 2 seq 5..9 by arrival (1000 s) are older
    assert done()[1]["count"] == 37 + 2
    cloud.publish(f"prapa/v1/{SITE}/0000002a/replay/request", b"not a request", qos=1)
    wait_for(lambda: len(done()) == 3, what="the refusal")
    assert done()[2]["count"] == 0 and "error" in done()[2]
    assert fwd.replays == 2 and fwd.forwarded == 55       # replays do not touch forwarding state
    cloud.loop_stop()
    sub.close()


def test_config_refuses_topics_and_payloads_over_managed_broker_limits(tmp_path):
    good = {"site": "cmn-north", "brokers": [{"host": "b.example", "port": 8883}]}
    assert ff.ForwarderConfig.from_dict(good).brokers[0].url == "mqtts://b.example:8883"
    # The longest topic is a catchment's suspects (a 32-byte catchment): the site leaves room for it.
    with pytest.raises(UsageError, match=r"site: makes topics up to 2\d\d bytes .*at most 195 bytes"):
        ff.ForwarderConfig.from_dict({**good, "site": "x" * 196})
    ff.ForwarderConfig.from_dict({**good, "site": "x" * 195})
    t = ff.catchment_topic("x" * 195, "c" * ff.CATCHMENT_MAX_BYTES)
    assert len(t.encode()) == 256 and t.count("/") <= 7 and t.endswith("/suspects")
    for bad in ("a/b", "a+b", "#", "$SYS", "", "two words"):
        with pytest.raises(UsageError, match="cannot be an MQTT topic level"):
            ff.ForwarderConfig.from_dict({**good, "site": bad})
    with pytest.raises(UsageError, match="max_payload_bytes.*131072"):
        ff.ForwarderConfig.from_dict({**good, "max_payload_bytes": 200_000})
    with pytest.raises(UsageError, match="brokers"):
        ff.ForwarderConfig.from_dict({"site": "s"})
    with pytest.raises(UsageError, match=r"brokers\[0\] ca_file: cannot read /nonexistent.pem"):
        ff.ForwarderConfig.from_dict({**good, "ca_file": "/nonexistent.pem"})
    with pytest.raises(UsageError, match="protocol"):
        ff.ForwarderConfig.from_dict({**good, "protocol": "4"})
    t = ff.topic("x" * 205, 0xFFFFFFFF, "k" * ff.KIND_MAX_BYTES)
    assert len(t.encode()) == 256 and t.count("/") <= 7
    with pytest.raises(ValueError):
        ff.topic("x" * 206, 1, "k" * ff.KIND_MAX_BYTES)
    assert not ff.kind_ok("a/b") and not ff.kind_ok("k" * 33) and ff.kind_ok("readings")


def test_messages_stay_under_the_payload_limit_and_a_bad_kind_is_kept_not_sent(tmp_path, broker, forwarders):
    rows = [(i, 1, 1, i, "readings", 0, None, None, cbor2.dumps({"seq": i, "blob": os.urandom(900)}))
            for i in range(400)]
    runs = ff.group(rows, 10_000, 16 * 1024, SITE)
    sizes = [len(p) for run in runs for _r, p in ff.message(SITE, run, "json", 16 * 1024)]
    assert len(runs) > 10 and max(sizes) <= 16 * 1024     # JSON doubles bytes as hex: messages split again
    assert [r[0] for run in runs for r in run] == list(range(400))
    store = Store(tmp_path / "g.db")
    store.commit(entries(9, 1, range(3)) + entries(9, 1, [3], kind="bad/kind"))
    sub = Subscriber(broker.host, broker.port, "cloud-7")
    fwd = forwarders(store, config(broker))
    fwd.start()
    wait_for(lambda: pending_count(store) == 1, what="the good entries")
    assert store.pending()[0][4] == "bad/kind" and fwd.refused == 1
    sub.close()


def _status_states(sub, fmt="cbor"):
    with sub.lock:
        got = list(sub.statuses or ())
    return [(cbor2.loads(p) if fmt == "cbor" else json.loads(p)) for _t, p, _r in got]


def test_the_gateway_status_is_online_retained_offline_on_a_clean_stop_and_its_last_will_on_sigkill(tmp_path, broker):
    """prapa/v1/<site>/gateway/status: "online" at connect (retained: a consumer that comes later sees it),
    "offline"/"stopped" on a clean stop, and the broker's "offline"/"connection_lost" (the last will) when
    the gateway process is killed with no DISCONNECT. Every payload is valid for the contract."""
    from gateway import northbound as nb
    from tools.broker import free_port
    from tools.gateway_process import GatewayProcess, write_config
    path = write_config(tmp_path, [], broker.port, site=SITE)
    path.write_text(f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{free_port()}"\n\n' + path.read_text())
    topic = f"prapa/v1/{SITE}/gateway/status"
    gw = GatewayProcess(path, log_path=tmp_path / "gateway.log").start()
    sub = later = None
    try:
        gw.wait_started()
        sub = Subscriber("127.0.0.1", broker.port, "status-watch", topic=topic)
        wait_for(lambda: _status_states(sub), what="the retained status")
        first = _status_states(sub)[0]
        assert (first["state"], first["reason"], first["site"]) == ("online", "connected", SITE)
        assert sub.statuses[0][2], "a subscriber that comes after the connect gets it as a retained message"
        gw.kill()                                          # SIGKILL: no DISCONNECT, the broker sends the will
        wait_for(lambda: len(_status_states(sub)) >= 2, what="the last will")
        will = _status_states(sub)[1]
        assert (will["state"], will["reason"]) == ("offline", "connection_lost") and "since" not in will
        gw.start().wait_started()
        wait_for(lambda: len(_status_states(sub)) >= 3, what="online again")
        assert _status_states(sub)[2]["state"] == "online"
        gw.stop()                                          # SIGTERM: a clean stop says so itself
        wait_for(lambda: len(_status_states(sub)) >= 4, what="the clean stop's offline")
        stopped = _status_states(sub)[3]
        assert (stopped["state"], stopped["reason"]) == ("offline", "stopped") and stopped["since"] > 1.7e9
        time.sleep(0.3)
        assert len(_status_states(sub)) == 4, "a clean stop sends no will"
        later = Subscriber("127.0.0.1", broker.port, "status-late", topic=topic)
        wait_for(lambda: _status_states(later), what="the retained offline")
        assert _status_states(later)[-1]["reason"] == "stopped"
        for body in _status_states(sub):
            assert nb.problems(topic, body) == [], body
    finally:
        gw.stop()
        for s in (sub, later):
            if s is not None:
                s.close()


def test_failback_to_the_first_broker_when_it_returns_loses_nothing(tmp_path, forwarders, caplog):
    """The first broker is SIGKILLed: delivery goes on to the second; it comes back on the same port and the
    forwarder, probing it every failback_s, is on it again within failback_s + a margin, boards committing
    all along. A persistent QoS 1 subscriber on each broker: together they saw every entry. The first
    broker saves its sessions every second (autosave_interval 1), so its subscriber's subscription
    survives the kill as a managed broker's would, and what the forwarder sends there at once is queued."""
    caplog.set_level(logging.INFO, logger="prapa.gateway.forwarder")
    failback_s = 1.0
    b1 = Broker(tmp_path / "b1", extra_conf=["max_queued_messages 0", "autosave_interval 1"])
    b2 = Broker(tmp_path / "b2", extra_conf=["max_queued_messages 0"])
    subs = [Subscriber(b1.host, b1.port, "cloud-8a"), Subscriber(b2.host, b2.port, "cloud-8b")]
    time.sleep(1.5)                                  # b1 has saved cloud-8a's subscription
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(b1, b2, failback_s=failback_s))
    assert fwd.failback_s == failback_s
    fwd.start()
    with committing_boards(tmp_path / "g.db", fwd, (20, 21), boot=9, pause_s=0.01) as committed:
        url1, url2 = f"mqtt://{b1.host}:{b1.port}", f"mqtt://{b2.host}:{b2.port}"
        wait_for(lambda: len(subs[0].identities()) > 300, what="forwarding to the first broker")
        b1.kill()
        wait_for(lambda: fwd.broker == url2 and fwd.connected, what="failover to the second broker")
        on_b2 = len(subs[1].identities())
        wait_for(lambda: len(subs[1].identities()) > on_b2 + 300, what="delivery going on at the second broker")
        time.sleep(2 * failback_s)                   # probes of the dead broker fail meanwhile: it stays on b2
        assert fwd.broker == url2 and fwd.failbacks == 0
        b1.restart()
        back = time.monotonic()
        wait_for(lambda: fwd.broker == url1 and fwd.connected, timeout_s=failback_s + 4, what="failback to b1")
        took = time.monotonic() - back
        assert took <= failback_s + 4 and fwd.failbacks == 1
        on_b1 = len(subs[0].identities())
        wait_for(lambda: len(subs[0].identities()) > on_b1 + 300, what="delivery on the first broker again")
    fwd.kick()
    wait_for(lambda: pending_count(store) == 0, timeout_s=20, what="the last PUBACKs")
    want = set(committed)
    wait_for(lambda: subs[0].identities() | subs[1].identities() >= want, timeout_s=10, what="every identity")
    missing = want - (subs[0].identities() | subs[1].identities())
    assert not missing, f"{len(missing)} identities lost, e.g. {sorted(missing)[:5]}"
    assert fwd.broker == url1 and fwd.failbacks == 1
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "prapa.gateway.forwarder"]
    fb = [e for e in events if e["event"] == "broker_failback"]
    assert len(fb) == 1 and fb[0]["broker"] == url2 and fb[0]["to"] == url1
    # The move is a clean DISCONNECT: the second broker holds no last will; the first says "online" again.
    assert all(s["reason"] != "connection_lost" for s in _status_states(subs[1]))
    wait_for(lambda: _status_states(subs[0]) and _status_states(subs[0])[-1]["state"] == "online",
             what="online on the first broker")
    for s in subs:
        s.close()
    b1.stop()
    b2.stop()


def test_the_read_cursor_never_skips_an_entry_alarms_past_a_limit_and_ids_reused_after_a_prune(
        tmp_path, broker, forwarders):
    """The forwarder reads only past the entries in flight (gateway/forwarder.py _fill). Two ways an entry
    could fall behind that cursor: a read cut by its LIMIT holding only alarms (readings of lower ids
    unread), and SQLite giving a pruned top id to the next entry. Both must still be forwarded."""
    sub = Subscriber(broker.host, broker.port, "cloud-cursor")
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(broker, max_items=5, max_inflight=2, prune_every_s=3600))
    fwd.start()
    wait_for(lambda: fwd.connected, what="a connection")
    os.kill(broker.proc.pid, signal.SIGSTOP)       # the window fills and stays full while the entries go in
    try:
        store.commit(entries(1, 1, range(1, 41)))                  # ids 1..40
        fwd.kick()
        wait_for(lambda: fwd.published >= 2, what="a full window")
        store.commit(entries(1, 1, range(41, 81)))                 # ids 41..80
        store.commit(entries(1, 1, range(81, 93), "alarm"))        # ids 81..92: a read of 5 or 10 holds only alarms
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    want = {(1, 1, s) for s in range(1, 93)}
    wait_for(lambda: sub.identities() >= want, what="every entry, the alarms' lower neighbours too")
    fwd.stop()
    fwd = forwarders(store, config(broker, retention_s=0.01, prune_every_s=0.2))
    fwd.start()
    wait_for(lambda: store.count() == 0, what="the forwarded entries pruned")
    store.commit(entries(2, 1, range(1, 11)))                      # ids start again from 1: below the cursor
    want |= {(2, 1, s) for s in range(1, 11)}
    wait_for(lambda: sub.identities() >= want, what="the entries with reused ids")
    items = [(i["device"], i["boot"], i["seq"]) for _t, m in sub.decoded() if "items" in m for i in m["items"]]
    assert sorted(set(items)) == sorted(want)
    sub.close()


def test_an_alarm_goes_out_before_the_readings_held_ahead_of_it_and_every_reading_once(tmp_path, broker, forwarders):
    """At thousands of devices a message holds one device's rows, so the forwarder reads rows ahead and keeps
    them until a slot frees (gateway/forwarder.py _fill). An alarm committed behind those rows must still
    go out first, and every reading once."""
    sub = Subscriber(broker.host, broker.port, "cloud-ahead")
    store = Store(tmp_path / "g.db")
    fwd = forwarders(store, config(broker, max_items=5, max_inflight=2))
    fwd.start()
    wait_for(lambda: fwd.connected, what="a connection")
    os.kill(broker.proc.pid, signal.SIGSTOP)       # the window fills and stays full; the rest waits ahead
    try:
        for seq in range(1, 5):
            for device in range(1, 61):                                # 60 devices interleaved, as boards send
                store.commit(entries(device, 1, [seq]))
        fwd.kick()
        wait_for(lambda: fwd.published >= 2, what="a full window")
        store.commit(entries(99, 1, [1], "alarm"))
        fwd.kick()
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    want = {(d, 1, s) for d in range(1, 61) for s in range(1, 5)} | {(99, 1, 1)}
    wait_for(lambda: sub.identities() >= want, what="every entry")
    wait_for(lambda: not store.pending(limit=1), what="every entry marked forwarded")
    messages = [m for _t, m in sub.decoded() if "items" in m]
    kinds = [m["kind"] for m in messages]
    assert kinds.index("alarm") <= 3, kinds[:10]                    # behind the 2 in flight, not the ~50 ahead
    items = [(i["device"], i["boot"], i["seq"]) for m in messages for i in m["items"]]
    assert sorted(items) == sorted(want)                            # each once: none read twice from ahead
    sub.close()
