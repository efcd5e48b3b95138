"""Commands from the cloud over MQTT (gateway/commands.py, gateway/service.py): a real Mosquitto, the
service in this process on a real store and registry, boards as frames on a fake link that answer
commands (tests/gateway/test_catchments.py's Board). The cloud publishes on
prapa/v1/<site>/<device>/command and reads prapa/v1/<site>/<device>/command/result."""

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from gateway import forward_format as ff
from gateway.service import DOWNLINK_MAX_TRIES, HEARD_RESEND_S
from protocol import messages as M
from tests.gateway.test_catchments import T0, Clock, board, close, make_service
from tools.broker import Broker

SITE = "testsite"


class Cloud:
    """The cloud's client: sends commands, keeps every message under prapa/v1/<site>/#."""

    def __init__(self, broker, username=None, password=None):
        self.messages, self.lock, self.ready = [], threading.Lock(), threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *_a: c.subscribe(f"prapa/v1/{SITE}/#", qos=1)
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.ready.wait(5)

    def _on_message(self, _c, _u, msg):
        with self.lock:
            self.messages.append((msg.topic, ff.decode_request(msg.payload) if msg.payload else None))

    def command(self, device_id, body):
        self.client.publish(ff.command_topic(SITE, device_id), json.dumps(body), qos=1).wait_for_publish(5)

    def results(self, device_id, cmd_id=None):
        topic = ff.command_topic(SITE, device_id, result=True)
        with self.lock:
            return [m for t, m in self.messages if t == topic and (cmd_id is None or m["id"] == cmd_id)]

    def states(self, device_id, cmd_id):
        return [r["state"] for r in self.results(device_id, cmd_id)]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(cond, what, timeout_s=10.0, svc=None):
    """Until cond() holds, taking the commands the forwarder hands to the service (its loop's part)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if svc is not None:
            svc.serve_commands()
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def site(tmp_path, broker):
    svc = make_service(tmp_path, broker.port)
    svc.forwarder.start()
    wait_for(lambda: svc.forwarder.connected, "the gateway's connection")
    cloud = Cloud(broker)
    yield svc, cloud
    cloud.close()
    close(svc)


def udp_config(folder, broker_port, broker_lines=""):
    """A gateway.toml with one UDP link (not bound: the service is not run) and broker_lines added."""
    from tools.gateway_process import write_config
    path = write_config(folder, [], broker_port)
    path.write_text('[[links]]\ntype = "udp"\nbind = "127.0.0.1:5999"\n\n' + path.read_text().replace(
        'client_id = "prapa-testsite-gw"', 'client_id = "prapa-testsite-gw"\n' + broker_lines))
    return path


def downlinks(svc, device_id):
    return svc.store.db.execute("SELECT COUNT(*) FROM downlink WHERE device_id=?", (device_id,)).fetchone()[0]


def test_a_ping_over_mqtt_goes_accepted_delivered_confirmed_with_its_id(site):
    svc, cloud = site
    b = board(svc, 0x71, "north")
    cloud.command(0x71, {"id": "ping-1", "name": "ping"})
    wait_for(lambda: "confirmed" in cloud.states(0x71, "ping-1"), "the confirmation", svc=svc)
    assert cloud.states(0x71, "ping-1") == ["accepted", "delivered", "confirmed"]
    assert cloud.results(0x71, "ping-1")[-1] == {"id": "ping-1", "state": "confirmed", "detail": "ping ok"}
    assert b.commands() == [("ping", {})]


def test_a_config_beyond_the_schema_and_an_unknown_command_are_refused_with_field_and_limit_never_queued(site):
    svc, cloud = site
    svc.registry.add(0x72, "doser", bytes([9]) * 16, name="pump house")
    cloud.command(0x72, {"id": "cfg-1", "name": "config", "args": {"doser": {"dose_mgl": 12}}})
    cloud.command(0x72, {"id": "rain-1", "name": "rain", "args": {"mm_h": 30}})     # a drain's, not a doser's
    cloud.command(0x72, {"name": "ping"})                                           # no id
    cloud.command(0x99, {"id": "who", "name": "ping"})                              # not served here
    wait_for(lambda: cloud.results(0x72, "rain-1") and cloud.results(0x72, None)[-1]["id"] is None
             and cloud.results(0x99), "the refusals", svc=svc)
    (cfg,) = cloud.results(0x72, "cfg-1")
    assert (cfg["state"], cfg["field"], cfg["limit"]) == ("refused", "doser.dose_mgl", [0, 10])
    assert "12" in cfg["detail"] and cfg["fix"]
    (rain,) = cloud.results(0x72, "rain-1")
    assert (rain["state"], rain["field"]) == ("refused", "name") and "reset_interlock" in rain["limit"]
    assert cloud.results(0x72, None)[-1]["field"] == "id"
    assert cloud.results(0x99)[0]["field"] == "device"
    assert downlinks(svc, 0x72) == 0 and downlinks(svc, 0x99) == 0
    cloud.command(0x72, {"id": "cfg-1", "name": "config", "args": {"doser": {"dose_mgl": 1}}})  # same id
    wait_for(lambda: len(cloud.results(0x72, "cfg-1")) == 2, "the repeat", svc=svc)
    assert cloud.results(0x72, "cfg-1")[1]["state"] == "refused" and downlinks(svc, 0x72) == 0


def test_the_same_id_twice_queues_one_downlink_and_republishes_the_state(site):
    svc, cloud = site
    b = board(svc, 0x73, "north")
    b.awake = False                                    # asleep: the command waits, accepted
    for _ in range(2):
        cloud.command(0x73, {"id": "twice", "name": "reboot"})
    wait_for(lambda: len(cloud.results(0x73, "twice")) >= 3, "both answers", svc=svc)
    assert downlinks(svc, 0x73) == 1
    assert cloud.states(0x73, "twice") == ["accepted", "delivered", "delivered"]   # sent into its sleep once
    svc.sessions.clock.t = T0 + 600
    b.wake()
    wait_for(lambda: "confirmed" in cloud.states(0x73, "twice"), "the confirmation", svc=svc)
    cloud.command(0x73, {"id": "twice", "name": "reboot"})
    wait_for(lambda: cloud.states(0x73, "twice")[-2:] == ["confirmed", "confirmed"], "the republished state", svc=svc)
    assert b.commands() == [("reboot", {})] and downlinks(svc, 0x73) == 1


def test_a_command_queued_before_a_gateway_restart_is_delivered_and_its_result_published(tmp_path, broker):
    svc = make_service(tmp_path, broker.port)
    svc.forwarder.start()
    cloud = Cloud(broker)
    try:
        wait_for(lambda: svc.forwarder.connected, "the gateway's connection")
        b = board(svc, 0x74, "north")
        b.awake = False
        svc.sessions.devices[0x74].link = None         # out of reach: nothing sent before the restart
        cloud.command(0x74, {"id": "after-restart", "name": "ping"})
        wait_for(lambda: cloud.states(0x74, "after-restart") == ["accepted"], "accepted", svc=svc)
        close(svc)                                     # the gateway stops (the store and its queue stay)
        svc = make_service(tmp_path, broker.port)
        svc.forwarder.start()
        wait_for(lambda: svc.forwarder.connected, "the new connection")
        b.svc = svc
        svc.sessions.clock.t = T0 + 60
        b.wake()                                       # heard by the new gateway: the request goes at once
        wait_for(lambda: "confirmed" in cloud.states(0x74, "after-restart"), "the result", svc=svc)
        assert cloud.states(0x74, "after-restart") == ["accepted", "delivered", "confirmed"]
        assert b.commands() == [("ping", {})]
    finally:
        cloud.close()
        close(svc)


def test_a_request_the_board_never_answers_publishes_timed_out(site):
    svc, cloud = site
    b = board(svc, 0x75, "north")
    b.answer = False
    cloud.command(0x75, {"id": "lost", "name": "ping"})
    wait_for(lambda: cloud.states(0x75, "lost")[-1:] == ["delivered"], "the send", svc=svc)
    for i in range(1, DOWNLINK_MAX_TRIES + 2):
        svc.sessions.clock.t = T0 + i * HEARD_RESEND_S
        b.reading()                                    # heard again, no answer: sent again, then expired
    wait_for(lambda: "timed_out" in cloud.states(0x75, "lost"), "timed_out", svc=svc)
    assert cloud.states(0x75, "lost") == ["accepted", "delivered", "timed_out"]
    assert "no answer" in cloud.results(0x75, "lost")[-1]["detail"]


def test_a_replay_for_a_time_range_republishes_those_entries(site):
    svc, cloud = site
    b = board(svc, 0x76, "north")
    for i in range(6):                                 # readings at T0, T0+10, ... T0+50
        svc.sessions.clock.t = T0 + 10 * i
        b.reading()
    wait_for(lambda: svc.store.count(forwarded=False) == 0, "the readings forwarded")
    cloud.command(0x76, {"id": "replay-1", "name": "replay", "args": {"from": T0 + 15, "to": T0 + 35}})
    wait_for(lambda: "confirmed" in cloud.states(0x76, "replay-1"), "the replay", svc=svc)
    assert cloud.states(0x76, "replay-1") == ["accepted", "confirmed"]
    assert cloud.results(0x76, "replay-1")[-1]["detail"].startswith("2 entries")
    with cloud.lock:
        replayed = [item for t, m in cloud.messages if m and m.get("replay") and t.startswith(f"prapa/v1/{SITE}/00000076/")
                    for item in m["items"]]
    assert sorted(item["wall_t"] for item in replayed) == [T0 + 20, T0 + 30]
    cloud.command(0x76, {"id": "replay-2", "name": "replay", "args": {"from": T0 + 35, "to": T0}})
    wait_for(lambda: cloud.results(0x76, "replay-2"), "the refusal", svc=svc)
    assert cloud.results(0x76, "replay-2")[0]["field"] == "args.to"


# -- deploy/mosquitto.acl on a real Mosquitto: each gateway confined to its site -----------------------
class Client:
    """A bare MQTT 5 client that reports each PUBACK's and SUBACK's reason code."""

    def __init__(self, broker, username, password):
        self.acks, self.subacks, self.got, self.connack = {}, [], [], threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{username}-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: (setattr(self, "rc", rc), self.connack.set())
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.append(rcs)
        self.client.on_message = lambda _c, _u, msg: self.got.append(msg.topic)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connack.wait(5)

    def publish(self, topic):
        """The PUBACK's reason code: 0 (success), 16 (taken; nobody subscribed) or 135 (not authorized)."""
        mid = self.client.publish(topic, b'{"v":1}', qos=1).mid
        wait_for(lambda: mid in self.acks, f"the PUBACK of {topic}")
        return self.acks[mid].value

    def subscribe(self, topic):
        """The SUBACK's reason code: 1 (granted QoS 1) or 135 (not authorized)."""
        n = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, f"the SUBACK of {topic}")
        return self.subacks[-1][0].value

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def acl_broker(tmp_path):
    import subprocess
    from pathlib import Path
    acl = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto.acl"
    passwd = tmp_path / "prapa.passwd"
    for i, (user, password) in enumerate((("prapa-cloud", "cloud-pw"), ("testsite", "gw-pw"), ("othersite", "o-pw"))):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password], check=True)
    b = Broker(tmp_path / "acl-broker", extra_conf=("allow_anonymous false", f"password_file {passwd}",
                                                    f"acl_file {acl}"))
    yield b
    b.stop()


def test_the_example_acl_confines_a_gateway_to_its_site_and_lets_the_cloud_command(tmp_path, acl_broker):
    nobody = Client(acl_broker, None, None)
    nobody.close()
    assert nobody.rc.is_failure                                        # anonymous: CONNACK refused
    wrong = Client(acl_broker, "testsite", "not-its-password")
    wrong.close()
    assert wrong.rc.is_failure
    gw, cloud_raw = Client(acl_broker, "testsite", "gw-pw"), Client(acl_broker, "prapa-cloud", "cloud-pw")
    try:
        assert gw.publish("prapa/v1/othersite/00000001/reading") == 135     # another site: not authorized
        assert gw.publish("prapa/v1/testsite/00000001/reading") in (0, 16)
        other = Client(acl_broker, "othersite", "o-pw")
        try:
            # Mosquitto 2.0 grants any subscription and delivers through it only what the ACL lets the user read.
            for topic in ("prapa/v1/othersite/#", "prapa/v1/#", "#"):
                assert gw.subscribe(topic) in (1, 135)
            assert other.subscribe("prapa/v1/othersite/+/command") == 1
            assert cloud_raw.subscribe("prapa/v1/#") == 1
            assert cloud_raw.publish("prapa/v1/othersite/00000001/command") in (0, 16)   # the cloud commands
            assert other.publish("prapa/v1/othersite/00000001/reading") in (0, 16)
            assert gw.publish("prapa/v1/othersite/00000001/command") == 135     # no commands for another site
            assert cloud_raw.publish("prapa/v1/testsite/00000001/reading") == 135   # the cloud forges no readings
            wait_for(lambda: "prapa/v1/othersite/00000001/command" in other.got, "the command at its own gateway")
            wait_for(lambda: "prapa/v1/othersite/00000001/reading" in cloud_raw.got, "the reading at the cloud")
            time.sleep(0.3)
            assert not [t for t in gw.got if "othersite" in t], gw.got         # nothing of another site reached it
            assert "prapa/v1/testsite/00000001/reading" not in cloud_raw.got   # the forged one never went out
        finally:
            other.close()
    finally:
        gw.close()
        cloud_raw.close()
    # The real gateway as user "testsite" with its password file takes a command from the cloud user.
    from gateway import config
    from gateway.service import Service
    (tmp_path / "broker.password").write_text("gw-pw\n")
    (tmp_path / "broker.password").chmod(0o600)
    cfg_path = udp_config(tmp_path, acl_broker.port, 'username = "testsite"\npassword_file = "broker.password"')
    svc = Service(config.load(cfg_path))
    svc.sessions.clock = Clock()
    svc.forwarder.start()
    cloud = None
    try:
        wait_for(lambda: svc.forwarder.connected, "the gateway's authenticated connection")
        cloud = Cloud(acl_broker, "prapa-cloud", "cloud-pw")
        board(svc, 0x77, "north")
        cloud.command(0x77, {"id": "acl-ping", "name": "ping"})
        wait_for(lambda: "confirmed" in cloud.states(0x77, "acl-ping"), "the confirmation", svc=svc)
    finally:
        if cloud:
            cloud.close()
        close(svc)


def test_the_cli_refuses_and_queues_exactly_as_the_mqtt_path(tmp_path):
    """prapa gateway command|push-config go through the same submit(): same refusals, same queue."""
    import subprocess
    import sys

    from gateway import config
    from gateway.registry import Registry
    from gateway.store import Store
    cfg_path = udp_config(tmp_path, 1883)
    cfg = config.load(cfg_path)
    Store(cfg.store_path).close()
    reg = Registry(cfg.registry_path)
    reg.add(0x72, "doser", bytes([9]) * 16)
    reg.close()

    def prapa(*args):
        return subprocess.run([sys.executable, "-m", "tools.cli", "gateway", *args, "--device", "0x72", "--config",
                               str(cfg_path)], capture_output=True, text=True, timeout=30)

    (tmp_path / "bad.json").write_text(json.dumps({"device_id": 0x72, "doser": {"dose_mgl": 12}}))
    r = prapa("push-config", "--file", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "doser.dose_mgl" in r.stderr and "limit [0, 10]" in r.stderr, r.stderr
    r = prapa("command", "rain")
    assert r.returncode == 2 and "name" in r.stderr and "reset_interlock" in r.stderr, r.stderr
    r = prapa("command", "reset_interlock", "--json")
    assert r.returncode == 0, r.stderr
    store = Store(cfg.store_path)
    try:
        (qid, dev, msg_type, body, _attempts, _sent), = store.downlink_open()
        assert (qid, dev, msg_type, json.loads(body)) == (json.loads(r.stdout)["queued"], 0x72, M.COMMAND,
                                                          {"name": "reset_interlock", "args": {}})
    finally:
        store.close()
