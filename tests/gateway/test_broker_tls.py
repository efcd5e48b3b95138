"""deploy/mosquitto-tls.conf with deploy/mosquitto.acl on a real Mosquitto: TLS only, one identity per
gateway (a password on one listener, a client certificate on the other), each gateway confined to its
own site's topics, and the gateway's own forwarder delivering through it.

The broker runs the deployed file itself: only its paths (certificates, password file, ACL, persistence)
and its two ports are replaced, every other line is as shipped. The certificates are made here with
`cryptography` (a throwaway CA, the broker's certificate, gateways' client certificates, and a
certificate of another CA) by tests/gateway/test_forwarder.py's helpers."""

import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.forwarder import Forwarder
from gateway.store import Store
from tests.gateway.test_forwarder import config, entries, make_ca, make_leaf, pending_count, wait_for, write_pem
from tools.broker import Broker, free_port

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "mosquitto-tls.conf"
ACL = ROOT / "deploy" / "mosquitto.acl"
SITE, OTHER = "testsite", "othersite"
USERS = {"prapa-cloud": "cloud-pw", SITE: "gw-pw", OTHER: "o-pw"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca("prapa test CA")
    rogue_key, rogue = make_ca("somebody else's CA")
    s_key, s_cert = make_leaf(ca_key, ca, "broker", server=True)
    out = {"ca": write_pem(d / "ca.crt", cert=ca), "server_cert": write_pem(d / "broker.crt", cert=s_cert),
           "server_key": write_pem(d / "broker.key", s_key)}
    for name, (key, issuer) in {SITE: (ca_key, ca), OTHER: (ca_key, ca), "rogue": (rogue_key, rogue)}.items():
        c_key, c_cert = make_leaf(key, issuer, SITE if name == "rogue" else name, server=False)  # rogue: CN of SITE
        out[name] = (write_pem(d / f"{name}.crt", cert=c_cert), write_pem(d / f"{name}.key", c_key))
    return out


def deployed_conf(text, ports, paths):
    """The deployed config with its two listeners on loopback ports and its files at paths; every other
    line as shipped. Refuses a deploy file that no longer has the lines this test replaces."""
    replaced, out = set(), []
    listeners = iter(ports)
    for line in text.splitlines():
        word = line.split()[0] if line.strip() and not line.lstrip().startswith("#") else None
        if word == "listener":
            line = f"listener {next(listeners)} 127.0.0.1"
        elif word in paths:
            line = f"{word} {paths[word]}"
        if word in paths or word == "listener":
            replaced.add(word)
        out.append(line)
    assert replaced == {*paths, "listener"} and next(listeners, None) is None, (replaced, ports)
    return "\n".join(out) + "\n"


class DeployedBroker(Broker):
    """tools/broker.py's Broker (start, stop, kill, its log) on a config file given whole."""

    def __init__(self, workdir, text, ports):
        self.host, self.port, self.ports = "127.0.0.1", ports[0], ports
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(text)
        self.proc = self.log = None
        self.start()
        for port in ports[1:]:
            socket.create_connection((self.host, port), 5).close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki):
    d = tmp_path_factory.mktemp("tls-broker")
    passwd = d / "prapa.passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password], check=True)
    paths = {"cafile": pki["ca"], "certfile": pki["server_cert"], "keyfile": pki["server_key"],
             "password_file": passwd, "acl_file": ACL, "persistence_location": f"{d}/"}
    text = deployed_conf(CONF.read_text(), [free_port(), free_port()], paths)
    if os.geteuid() == 0:              # as tools/broker.py: root Mosquitto would drop to a user that cannot write d
        text += "user root\n"
    ports = [int(p) for p in re.findall(r"^listener (\d+)", text, re.M)]
    b = DeployedBroker(d, text, ports)
    b.password_port, b.cert_port = ports
    yield b
    b.stop()


class Client:
    """An MQTT 5 client over TLS (or plaintext with tls=False) that records its CONNACK, each PUBACK's
    and SUBACK's reason code and every message it gets."""

    def __init__(self, broker, port, username=None, password=None, cert=None, ca=None, tls=True):
        self.rc, self.error, self.acks, self.subacks, self.got = None, None, {}, [], []
        self.done = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            ctx = ssl.create_default_context(cafile=ca)
            if cert:
                ctx.load_cert_chain(*cert)
            self.client.tls_set_context(ctx)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: (setattr(self, "rc", rc), self.done.set())
        self.client.on_disconnect = lambda *_a: self.done.set()
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.append(rcs)
        self.client.on_message = lambda _c, _u, msg: self.got.append((msg.topic, msg.payload))
        try:
            self.client.connect(broker.host, port)
        except (OSError, ssl.SSLError) as e:       # a TLS handshake refused during connect
            self.error = e
            self.done.set()
            return
        self.client.loop_start()
        self.done.wait(5)

    @property
    def connected(self):
        return self.rc is not None and not self.rc.is_failure

    def publish(self, topic):
        """The PUBACK's reason code: 0 (success), 16 (taken; nobody subscribed) or 135 (not authorized)."""
        mid = self.client.publish(topic, b'{"v":1}', qos=1).mid
        wait_for(lambda: mid in self.acks, what=f"the PUBACK of {topic}", timeout_s=5)
        return self.acks[mid].value

    def subscribe(self, topic):
        n = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, what=f"the SUBACK of {topic}", timeout_s=5)
        return self.subacks[-1][0].value

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def clients():
    made = []
    yield lambda *a, **kw: made.append(Client(*a, **kw)) or made[-1]
    for c in made:
        c.close()


def test_the_deployed_config_has_no_plaintext_listener_and_no_anonymous_user():
    text = CONF.read_text()
    blocks = re.split(r"^listener ", text, flags=re.M)[1:]
    assert len(blocks) == 2 and all(re.search(r"^certfile ", b, re.M) for b in blocks)
    assert re.search(r"^allow_anonymous false$", text, re.M) and re.search(r"^per_listener_settings false$", text, re.M)
    assert "use_identity_as_username true" in blocks[1] and "require_certificate true" in blocks[1]


def test_a_gateway_with_a_password_publishes_only_under_its_own_site_over_tls(broker, pki, clients):
    port, ca = broker.password_port, pki["ca"]
    assert not clients(broker, port, SITE, "gw-pw", tls=False).connected         # plaintext: no CONNACK at all
    assert not clients(broker, port, ca=ca).connected                            # TLS, anonymous
    wrong = clients(broker, port, SITE, "not-its-password", ca=ca)
    assert wrong.rc is not None and wrong.rc.is_failure                          # CONNACK: bad user name or password
    gw, other = clients(broker, port, SITE, "gw-pw", ca=ca), clients(broker, port, OTHER, "o-pw", ca=ca)
    cloud = clients(broker, port, "prapa-cloud", "cloud-pw", ca=ca)
    assert gw.connected and other.connected and cloud.connected
    assert cloud.subscribe("prapa/v1/#") == 1
    assert gw.subscribe(f"prapa/v1/{OTHER}/#") in (1, 135)      # Mosquitto 2.0 grants it and delivers nothing
    assert gw.publish(f"prapa/v1/{SITE}/00000001/reading") in (0, 16)
    assert gw.publish(f"prapa/v1/{OTHER}/00000001/reading") == 135               # another site's topic
    assert gw.publish(f"prapa/v1/{OTHER}/00000001/command") == 135
    assert other.publish(f"prapa/v1/{OTHER}/00000002/reading") in (0, 16)
    wait_for(lambda: any(t == f"prapa/v1/{OTHER}/00000002/reading" for t, _p in cloud.got), what="the cloud's copy")
    time.sleep(0.2)
    assert sorted(t for t, _p in cloud.got if t.endswith("/reading")) == [f"prapa/v1/{OTHER}/00000002/reading",
                                                 f"prapa/v1/{SITE}/00000001/reading"]
    assert [t for t, _p in gw.got if OTHER in t] == []


def test_a_gateway_with_a_client_certificate_is_its_certificate_and_nothing_else(broker, pki, clients):
    port, ca = broker.cert_port, pki["ca"]
    assert not clients(broker, port, SITE, "gw-pw", ca=ca).connected            # a password is not a certificate
    assert not clients(broker, port, cert=pki["rogue"], ca=ca).connected        # CN testsite, but another CA's
    assert not clients(broker, port, SITE, "gw-pw", tls=False).connected
    # The certificate names the user: the user name sent beside it is ignored.
    gw = clients(broker, port, OTHER, "o-pw", cert=pki[SITE], ca=ca)
    assert gw.connected
    assert gw.publish(f"prapa/v1/{SITE}/00000001/reading") in (0, 16)
    assert gw.publish(f"prapa/v1/{OTHER}/00000001/reading") == 135


def test_the_gateways_forwarder_delivers_over_tls_with_a_password_and_with_a_certificate(broker, pki, tmp_path,
                                                                                         clients):
    cloud = clients(broker, broker.password_port, "prapa-cloud", "cloud-pw", ca=pki["ca"])
    assert cloud.subscribe(f"prapa/v1/{SITE}/#") == 1
    made = []
    try:
        for device, how in ((0x11, {"port": broker.password_port, "username": SITE, "password": "gw-pw"}),
                            (0x12, {"port": broker.cert_port, "cert_file": pki[SITE][0], "key_file": pki[SITE][1]})):
            store = Store(tmp_path / f"{device}.db")
            store.commit(entries(device, 1, range(5)))
            fwd = Forwarder(store, config({"host": broker.host, "tls": True, "ca_file": pki["ca"], **how},
                                          site=SITE, client_id=f"prapa-gw-{device}"))
            made.append(fwd)
            fwd.start()
            wait_for(lambda: pending_count(store) == 0, what=f"delivery over TLS to port {how['port']}")
            assert fwd.broker == f"mqtts://{broker.host}:{how['port']}"
            wait_for(lambda: sum(t.startswith(f"prapa/v1/{SITE}/{device:08x}/") for t, _p in cloud.got) >= 1,
                     what="the cloud's copy")
    finally:
        for fwd in made:
            fwd.stop()


def test_a_forwarder_whose_user_is_not_its_site_keeps_what_the_broker_refused(broker, pki, tmp_path, clients):
    cloud = clients(broker, broker.password_port, "prapa-cloud", "cloud-pw", ca=pki["ca"])
    assert cloud.subscribe("prapa/v1/#") == 1
    store = Store(tmp_path / "mismatch.db")
    store.commit(entries(0x13, 1, range(5)))
    fwd = Forwarder(store, config({"host": broker.host, "port": broker.password_port, "tls": True,
                                   "ca_file": pki["ca"], "username": OTHER, "password": "o-pw"},
                                  site=SITE, client_id="prapa-gw-mismatch"))
    fwd.start()
    try:
        # The broker answers each publish with PUBACK 135 (not authorized): the forwarder says so and ends the
        # connection, marking nothing sent; it tries again after its backoff, as with a broker that is down.
        wait_for(lambda: fwd.last_error and "refused a publish" in fwd.last_error, what="the refusal said")
        assert "Not authorized" in fwd.last_error and "ACL" in fwd.last_error
        time.sleep(0.5)
        assert [t for t, _p in cloud.got if "00000013" in t] == []       # the ACL held
        assert pending_count(store) == 5           # ...so nothing counts as delivered: all sent again later
    finally:
        fwd.stop()
