"""The gateway service end to end: virtual boards on serial ptys, a real Mosquitto, a QoS 1 subscriber."""

import random
import time

import pytest

from hil_tests.support.cloud import GatewayProcess, Subscriber, register, write_config
from tools.broker import Broker
from hil_tests.support.checks import check_register_chain
from tools.rigs.board import KEY, commissioned_flash, wait_for
from tools.sim.process import BoardProcess


def _three_readings_through_a_gateway(tmp_path, udp=False):
    """One virtual meter on a serial pty (or on UDP), the gateway, a broker: the first three readings
    the subscriber gets, sorted by seq, and the gateway's exit code."""
    from tools.broker import free_port
    broker = Broker(tmp_path / "broker")
    udp_port = free_port()
    link = {"link": {"kind": "udp", "gateway": f"127.0.0.1:{udp_port}"}} if udp else None
    flash = commissioned_flash(tmp_path, "meter", {"interval_min": 1}, extra=link)
    board = BoardProcess("esp32-devkitc", "meter", flash, speed=60, world=["flow_meter.forced_lpm=20"])
    cfg = write_config(tmp_path, [] if udp else [board.uart_port], broker.port)
    if udp:
        cfg.write_text(f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{udp_port}"\n\n' + cfg.read_text())
    register(tmp_path, {0x1001: KEY})
    sub = Subscriber(broker.port)
    gw = GatewayProcess(cfg).start()
    try:
        gw.wait_started()
        end = time.monotonic() + 30
        while time.monotonic() < end and len(sub.of_kind("reading")) < 3:
            time.sleep(0.2)
        readings = sorted(sub.of_kind("reading"), key=lambda r: r["seq"])
        assert len(readings) >= 3, gw.log[-10:]
    finally:
        sub.close()
        code = gw.stop()
        board.close()
        broker.stop()
    return readings, code


def test_readings_flow_from_a_board_through_the_gateway_to_a_subscriber(tmp_path):
    readings, code = _three_readings_through_a_gateway(tmp_path)
    r = readings[-1]
    assert r["device"] == "00001001" and r["topic"] == "prapa/v1/testsite/00001001/reading"
    assert {"boot", "seq", "register", "value", "wall_t", "time_source"} <= set(r)
    assert code == 0, "the gateway stops cleanly on SIGTERM"


def _dedup(items):
    """One item per identity; a duplicate must be the same reading."""
    seen = {}
    for i in items:
        ident = (i["boot"], i["seq"])
        if ident in seen:
            for k in ("value", "register", "register_before", "series"):
                assert seen[ident].get(k) == i.get(k), (seen[ident], i)
        else:
            seen[ident] = i
    return [seen[k] for k in sorted(seen)]


@pytest.mark.parametrize("kills", [60, pytest.param(200, marks=pytest.mark.soak)])
def test_sigkill_the_gateway_again_and_again_and_every_acknowledged_reading_reaches_the_cloud(tmp_path, kills):
    """Kill -9 the gateway at random instants (starting, ingesting, committing, forwarding) and
    restart it. Boards delete only what was acknowledged; so if the subscriber's series of each
    board is unbroken up to the true total, nothing acknowledged was lost anywhere."""
    rng = random.Random(7)
    broker = Broker(tmp_path / "broker")
    devices = {0x1001: KEY, 0x1002: bytes(range(16, 32))}
    boards = {}
    for device_id, key in devices.items():
        flash = commissioned_flash(tmp_path, "meter", {"interval_min": 1}, name=f"{device_id:x}.img",
                                   device_id=device_id, key=key)
        boards[device_id] = BoardProcess("esp32-devkitc", "meter", flash, speed=100, seed=device_id,
                                         world=["flow_meter.forced_lpm=0"])
    cfg = write_config(tmp_path, [b.uart_port for b in boards.values()], broker.port)
    register(tmp_path, devices)
    sub = Subscriber(broker.port)
    gw = GatewayProcess(cfg)
    try:
        time.sleep(1.0)                                # the boards are up: from here every pulse is counted
        for b in boards.values():
            b.set_world("flow_meter", "forced_lpm", 30)
        for k in range(kills):
            gw.start()
            if k % 3 == 0:
                gw.wait_started()                      # then die while ingesting and forwarding
            time.sleep(rng.uniform(0.02, 0.5))
            gw.kill()
        gw.start().wait_started()
        for b in boards.values():
            b.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(0.5)
        truth = {d: b.status()["world"]["flow_meter"]["pulses"] for d, b in boards.items()}

        def complete():
            out = {}
            for device_id in devices:
                mine = [i for i in sub.of_kind("reading") if i["device"] == f"{device_id:08x}"
                        and i["series"] == "interval"]
                out[device_id] = _dedup(mine)
                if not out[device_id] or out[device_id][-1]["register"] != truth[device_id]:
                    return None
            return out

        end = time.monotonic() + 90
        series = None
        while time.monotonic() < end and series is None:
            series = complete()
            time.sleep(0.5)
        assert series, f"the cloud never got every reading: truth {truth}; gateway log {gw.log[-5:]}"
        for device_id, readings in series.items():
            assert readings[0]["register_before"] == 0
            check_register_chain(readings)
        print(f"\n200 SIGKILLs; readings at the subscriber: {sum(len(s) for s in series.values())}, "
              f"messages {sub.messages}")
    finally:
        sub.close()
        gw.stop()
        for b in boards.values():
            b.close()
        broker.stop()


def _metrics(cfg_path):
    import re
    import urllib.request
    port = re.search(r'listen = "127.0.0.1:(\d+)"', cfg_path.read_text()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out, port


class _Site:
    """One commissioned virtual meter, a broker, the gateway service on the meter's link plus a spare
    pty (for whatever a test wants to throw at the gateway), and a subscriber."""

    def __init__(self, tmp_path, extra="", meter=None):
        import os
        import pty
        import tty
        self.broker = Broker(tmp_path / "broker")
        flash = commissioned_flash(tmp_path, "meter", meter or {"interval_min": 1})
        self.board = BoardProcess("esp32-devkitc", "meter", flash, speed=60, world=["flow_meter.forced_lpm=20"])
        self.spare_master, spare_slave = pty.openpty()
        tty.setraw(spare_slave)
        self.spare_slave = spare_slave
        self.cfg = write_config(tmp_path, [self.board.uart_port, os.ttyname(spare_slave)], self.broker.port,
                                extra=extra)
        register(tmp_path, {0x1001: KEY})
        self.sub = Subscriber(self.broker.port)
        self.gw = GatewayProcess(self.cfg).start()
        self.gw.wait_started()
        self.store_path = tmp_path / "data" / "store.db"

    def wait(self, predicate, timeout, what):
        return wait_for(predicate, timeout, what, f"; gateway log {self.gw.log[-5:]}")

    def close(self):
        import os
        self.sub.close()
        self.gw.stop()
        self.board.close()
        self.broker.stop()
        os.close(self.spare_master)
        os.close(self.spare_slave)


def test_garbage_forged_and_unknown_frames_are_counted_and_dropped_and_the_gateway_goes_on(tmp_path):
    import os
    from protocol import link, secure
    from protocol import messages as M
    from protocol.secure import MemoryCounters
    site = _Site(tmp_path)
    try:
        site.wait(lambda: site.sub.of_kind("reading"), 30, "a first reading")
        stranger = link.Sender(bytes(16), 0x7777, secure.UPLINK, MemoryCounters(1))       # not in the registry
        forger = link.Sender(bytes(16), 0x1001, secure.UPLINK, MemoryCounters(10**6))     # right id, wrong key
        payload = bytearray(b"\xa2\x00\x01\x01\x02")
        junk = bytes(range(1, 256)) * 8 + b"\x00"
        for _ in range(5):
            os.write(site.spare_master, junk)
            n = stranger.wire_into(M.ALARM, payload, len(payload))
            os.write(site.spare_master, bytes(stranger.wire[:n]))
            n = forger.wire_into(M.ALARM, payload, len(payload))
            os.write(site.spare_master, bytes(forger.wire[:n]))
        metrics, _ = site.wait(lambda: (lambda m: m if m[0].get(
            'prapa_frames_rejected_total{reason="auth"}', 0) >= 5 else None)(_metrics(site.cfg)), 20, "refusals")
        assert metrics['prapa_frames_rejected_total{reason="unknown_device"}'] >= 5
        assert sum(metrics[f'prapa_frames_rejected_total{{reason="{r}"}}'] for r in ("too_long", "noise", "crc")) >= 5
        before = len(site.sub.of_kind("reading"))
        site.wait(lambda: len(site.sub.of_kind("reading")) > before, 30, "readings after the garbage")
        assert site.gw.proc.poll() is None
    finally:
        site.close()


def test_a_nearly_full_disk_stops_acknowledgements_and_the_board_keeps_its_log(tmp_path):
    site = _Site(tmp_path, extra="\n[store]\nmin_free_mb = 1000000\n")      # a terabyte: never free here
    try:
        metrics, _ = site.wait(lambda: (lambda m: m if m[0].get("prapa_acks_withheld") == 1 else None)(
            _metrics(site.cfg)), 20, "the disk guard")
        time.sleep(4)                                  # four board minutes of readings arrive and are refused
        from gateway.store import Store
        store = Store(site.store_path, readonly=True)
        assert store.count() == 0
        store.close()
        assert not site.sub.of_kind("reading")
        site.gw.stop()
        site.cfg.write_text(site.cfg.read_text().replace("min_free_mb = 1000000", "min_free_mb = 10"))
        site.gw = GatewayProcess(site.cfg).start()
        readings = site.wait(lambda: (lambda r: r if len(r) >= 4 else None)(
            [r for r in site.sub.of_kind("reading") if r["series"] == "interval"]), 40, "the kept readings")
        assert readings[0]["seq"] == 1, "the board kept everything from its first reading"
    finally:
        site.close()


def test_commands_and_config_pushes_wait_for_the_board_and_a_refusal_is_reported(tmp_path):
    import json
    import subprocess
    import sys

    from gateway.store import Store
    from protocol import messages as M
    site = _Site(tmp_path)
    try:
        site.wait(lambda: site.sub.of_kind("reading"), 30, "a first reading")

        def prapa(*args):
            r = subprocess.run([sys.executable, "-m", "tools.cli", "gateway", *args, "--config", str(site.cfg),
                                "--json"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)["queued"]

        def state(qid):
            store = Store(site.store_path, readonly=True)
            try:
                answer, _attempts, result = store.downlink_status(qid)
                return answer, result
            finally:
                store.close()

        ping = prapa("command", "--device", "0x1001", "ping")
        assert site.wait(lambda: state(ping)[0] == "done", 20, "the ping's answer")
        assert state(ping)[1].startswith("pong")
        bad = {"device_id": 0x1001, "role": "meter", "meter": {"interval_min": 7}}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        r = subprocess.run([sys.executable, "-m", "tools.cli", "gateway", "push-config", "--device", "0x1001", "--file",
                            str(tmp_path / "bad.json"), "--config", str(site.cfg)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2 and "meter.interval_min" in r.stderr, r.stderr   # the board's own check, here
        store = Store(site.store_path)           # a push from elsewhere: the board refuses it the same way
        try:
            refused = store.queue_downlink(0x1001, M.CONFIG_PUSH, json.dumps(bad))
        finally:
            store.close()
        assert site.wait(lambda: state(refused)[0] == "refused", 20, "the refusal")
        assert "meter.interval_min" in state(refused)[1] and "fix:" in state(refused)[1]
        good = tmp_path / "good.json"
        good.write_text(json.dumps({"device_id": 0x1001, "role": "meter", "meter": {"interval_min": 2}}))
        pushed = prapa("push-config", "--device", "0x1001", "--file", str(good))
        assert site.wait(lambda: state(pushed)[0] == "done", 20, "the config push")
        # The board reboots into the new config: a new boot whose readings span two minutes.
        site.wait(lambda: [r for r in site.sub.of_kind("reading") if r["boot"] == 2 and r["span_s"] == 120],
                  40, "two-minute readings from boot 2")
    finally:
        site.close()


def test_a_board_on_udp_reaches_a_broker_over_mutual_tls_and_gets_its_acks_back(tmp_path):
    """The gateway's UDP link and its TLS settings from gateway.toml (CA, client certificate)."""
    import socket

    import cbor2

    from protocol import link, secure
    from protocol import messages as M
    from protocol.secure import MemoryCounters
    from tests.gateway.test_forwarder import make_ca, make_leaf, write_pem
    from tools.broker import free_port
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca = make_ca("prapa test CA")
    s_key, s_cert = make_leaf(ca_key, ca, "broker", server=True)
    c_key, c_cert = make_leaf(ca_key, ca, "gateway", server=False)
    files = {"ca": write_pem(pki / "ca.pem", cert=ca), "cert": write_pem(pki / "gw.pem", cert=c_cert),
             "key": write_pem(pki / "gw.key", c_key), "s_cert": write_pem(pki / "s.pem", cert=s_cert),
             "s_key": write_pem(pki / "s.key", s_key)}
    import os
    os.chmod(files["key"], 0o600)                      # the gateway refuses a private key others can read
    broker = Broker(tmp_path / "broker", tls={"cafile": files["ca"], "certfile": files["s_cert"],
                                               "keyfile": files["s_key"], "require_certificate": True})
    udp_port = free_port()
    cfg = write_config(tmp_path, [], broker.port)
    text = cfg.read_text().replace(f'url = "mqtt://127.0.0.1:{broker.port}"',
                                   f'url = "mqtts://localhost:{broker.port}"\nca_file = "{files["ca"]}"\n'
                                   f'cert_file = "{files["cert"]}"\nkey_file = "{files["key"]}"')
    cfg.write_text(f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{udp_port}"\n\n' + text)
    register(tmp_path, {0x1001: KEY})
    sub = Subscriber(broker.port, tls={"ca_certs": files["ca"], "certfile": files["cert"], "keyfile": files["key"]})
    gw = GatewayProcess(cfg).start()
    board = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    board.settimeout(0.2)
    try:
        gw.wait_started()
        sender = link.Sender(KEY, 0x1001, secure.UPLINK, MemoryCounters(1))
        downlink = []
        receiver = link.Receiver(secure.DOWNLINK, lambda d: KEY if d == 0x1001 else None,
                                 lambda d, c, t, m: downlink.append((t, m)), my_addr=1)

        def send(msg_type, message):
            payload = bytearray(cbor2.dumps(message, canonical=True))
            n = sender.frame(msg_type, payload, len(payload))
            board.sendto(bytes(sender.frame_buf[:n]), ("127.0.0.1", udp_port))

        send(M.HELLO, M.hello(1, "0.2.0", "esp32-devkitc", 0, bytes(8), False, 0, board_t_s=100, addr=1))
        send(M.READINGS, M.readings(1, 1, 900, 900, 0, M.units("L", 0, 1000), [3, 4, 5], 10))
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(t == M.ACK for t, _m in downlink):
            try:
                receiver.datagram(board.recv(512))
            except socket.timeout:
                pass
        assert (M.ACK, {0: 1, 1: 3}) in downlink, downlink
        assert any(t == M.TIME_SYNC for t, _m in downlink)
        end = time.monotonic() + 20
        while time.monotonic() < end and len(sub.of_kind("reading")) < 3:
            time.sleep(0.1)
        got = sorted((r["seq"], r["register"], r["time_source"]) for r in sub.of_kind("reading"))
        assert got == [(1, 13, "gateway"), (2, 17, "gateway"), (3, 22, "gateway")]
    finally:
        board.close()
        sub.close()
        gw.stop()
        broker.stop()


def test_a_virtual_meter_on_udp_delivers_through_the_gateways_udp_link(tmp_path):
    """The firmware's UDP transport (Wi-Fi on an ESP32; host UDP on the virtual board)."""
    readings, _code = _three_readings_through_a_gateway(tmp_path, udp=True)
    assert readings[0]["seq"] == 1
    assert readings[-1]["time_source"] == "board", "time sync came back over UDP"
    assert all(r["time_source"] in ("board", "gateway") for r in readings)
    check_register_chain(readings[:3])
