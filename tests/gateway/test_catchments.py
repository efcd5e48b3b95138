"""Rain shared per catchment (gateway/catchments.py) and the downlink a board gets the moment it is heard
(gateway/service.py): the service in this process on a real store and registry, boards as frames on a
fake serial link that sleep and wake."""

import json
import logging
import sqlite3
import threading
import time

import cbor2
import paho.mqtt.client as mqtt
import pytest

from gateway import config
from gateway.catchments import RainSharing
from gateway.service import DOWNLINK_MAX_TRIES, HEARD_RESEND_S, Service
from protocol import link, secure
from protocol import messages as M
from protocol.roles import drain
from protocol.secure import MemoryCounters
from tools.broker import Broker
from tools.gateway_process import write_config

T0 = 1_800_000_000.0
HAS_GAUGE = drain.STATE_HAS_GAUGE
HOLD = drain.RAIN_HOLD_S


class Clock:
    t = T0

    def __call__(self):
        return self.t


class Board:
    """A board on the gateway's serial link: it hears downlinks only while awake and answers commands."""

    def __init__(self, svc, device_id, key, addr):
        self.svc, self.device_id, self.addr = svc, device_id, addr
        self.sender = link.Sender(key, device_id, secure.UPLINK, MemoryCounters(1))
        self.receiver = link.Receiver(secure.DOWNLINK, lambda d: key if d == device_id else None, self._got,
                                      my_addr=addr, accept_any_addr=True)
        self.awake, self.heard, self.seq, self.answer = True, [], 0, True
        self.framed = True
        self._sending, self._outbox = False, []

    def write(self, _addr, wire):                 # the gateway's side of the link writes here
        if self.awake:
            self.receiver.feed(wire)

    def _got(self, _device, _counter, msg_type, m):
        self.heard.append((msg_type, m))
        if msg_type == M.COMMAND and self.answer:
            self.send(M.COMMAND_RESULT, M.command_result(m[0], True, f"{m[1]} ok"))

    def commands(self):
        return [(m[1], m[2]) for t, m in self.heard if t == M.COMMAND]

    def send(self, msg_type, message):
        """A frame to the gateway; one the board sends while the gateway is still taking its last (an
        answer to a command) follows it on the line."""
        payload = bytearray(cbor2.dumps(message, canonical=True))
        n = self.sender.wire_into(msg_type, payload, len(payload))
        self._outbox.append(bytes(self.sender.wire[:n]))
        if self._sending:
            return
        self._sending = True
        try:
            while self._outbox:
                self.svc.sessions.feed(self._outbox.pop(0), self)
        finally:
            self._sending = False

    def hello(self):
        self.send(M.HELLO, M.hello(1, "0.4.0", "esp32-devkitc", drain.ROLE_CODE, bytes(8), True, 5, board_t_s=10,
                                   addr=self.addr))

    def reading(self, rain_mm=0.0, state=0, level=300):
        """One sample as a drain sends it: [level, rise, rain x10, battery, fault, ratio x100, recession s,
        danger, state]."""
        self.seq += 1
        row = [level, 0, round(rain_mm * 10), 3900, 0, 0, 1200, 1000, state]
        self.send(M.READINGS, M.readings(1, self.seq, 10 * self.seq, 30, drain.ROLE_CODE, M.units("mm", 0), [row],
                                         wall_t0=int(self.svc.sessions.clock())))
        self.svc._commit()                        # the group commit: acks, the live series, the rain seen

    def wake(self, **reading):
        """Wake, send a sample, listen a moment (everything the gateway sends at once), sleep again."""
        self.awake = True
        self.reading(**reading)
        self.awake = False


def make_service(tmp_path, broker_port=1883):
    path = write_config(tmp_path, [], broker_port)
    path.write_text('[[links]]\ntype = "udp"\nbind = "127.0.0.1:5999"\n\n' + path.read_text())
    service = Service(config.load(path))
    service.sessions.clock = Clock()
    return service


def close(service):
    service.forwarder.stop()
    for closing in (service.registry.close, service.store.close):
        try:
            closing()
        except sqlite3.ProgrammingError:          # closed by the test already
            pass


@pytest.fixture
def svc(tmp_path):
    service = make_service(tmp_path)
    yield service
    close(service)


def board(svc, device_id, catchment, role="drain", addr=None):
    key = bytes([device_id % 251 + 1]) * 16
    svc.registry.add(device_id, role, key, name=f"dev {device_id}", location=(13.75, 100.5), catchment=catchment)
    b = Board(svc, device_id, key, addr or device_id % 200 + 1)
    b.hello()
    return b


def tick(svc, t):
    svc.sessions.clock.t = t
    svc.status_tick(t)


def open_rain(svc, device_id):
    return [json.loads(body)["args"] for _qid, dev, _t, body, *_ in svc.store.downlink_open(device_id)
            if dev == device_id and json.loads(body)["name"] == "rain"]


def test_rain_from_a_gauge_goes_to_the_drains_without_one_in_its_catchment_only(svc, caplog):
    caplog.set_level(logging.INFO)
    gauge = board(svc, 11, "north")
    plain = board(svc, 12, "north")
    south = board(svc, 13, "south")
    unplaced = board(svc, 14, None)
    meter = board(svc, 15, "north", role="meter")
    for b in (plain, south, unplaced):
        b.reading()
        b.awake = False
    gauge.reading(rain_mm=0.5, state=HAS_GAUGE)      # 0.5 mm in the 10-minute window: 3 mm/h
    tick(svc, T0 + 1)
    assert open_rain(svc, 12) == [{"mm_h": 30, "for_s": HOLD}]
    assert not any(open_rain(svc, d) for d in (11, 13, 14, 15))
    assert svc.status()["catchments"]["north"]["raining"] is True
    assert svc.status()["catchments"]["north"]["rain_mm_h"] == 3.0
    assert svc.status()["catchments"]["south"]["raining"] is False
    assert not plain.commands() and not meter.commands()
    plain.wake()                                       # asleep when it was queued; told the moment it wakes
    assert plain.commands() == [("rain", {"mm_h": 30, "for_s": HOLD})]
    assert not open_rain(svc, 12)                      # answered: done
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "prapa.gateway.catchments"]
    assert {"event": "rain_started", "catchment": "north", "mm_h": 3.0, "gauges": ["0000000b"]} in events
    assert {"event": "rain_shared", "catchment": "north", "mm_h": 3.0, "why": "started",
            "devices": ["0000000c"]} in events


def test_the_rain_is_refreshed_every_half_hold_and_stopped_once_and_a_stale_one_is_replaced(svc, caplog):
    caplog.set_level(logging.INFO)
    gauge = board(svc, 21, "east")
    plain = board(svc, 22, "east")
    plain.reading()
    plain.awake = plain.answer = False                 # a board that never gets its downlinks in time
    t = T0
    gauge.reading(rain_mm=1.0, state=HAS_GAUGE)
    tick(svc, t + 1)
    assert open_rain(svc, 22) == [{"mm_h": 60, "for_s": HOLD}]
    for step in range(1, 4):                           # it keeps raining: a reading every 5 minutes
        t = T0 + step * 300
        svc.sessions.clock.t = t
        gauge.reading(rain_mm=2.0, state=HAS_GAUGE)
        tick(svc, t)
    assert open_rain(svc, 22) == [{"mm_h": 60, "for_s": HOLD}]    # nothing new before half the hold
    t = T0 + HOLD / 2 + 1
    svc.sessions.clock.t = t
    gauge.reading(rain_mm=2.0, state=HAS_GAUGE)
    tick(svc, t)
    assert open_rain(svc, 22) == [{"mm_h": 360, "for_s": HOLD}]   # 6 mm in the window; replaces the stale one
    states = svc.store.db.execute("SELECT state FROM downlink WHERE device_id=22 ORDER BY id").fetchall()
    assert [s for (s,) in states] == ["superseded", "queued"]
    t += 700                                           # the gauge is dry for longer than the window
    svc.sessions.clock.t = t
    gauge.reading(rain_mm=0.0, state=HAS_GAUGE)
    tick(svc, t)
    assert open_rain(svc, 22) == [{"mm_h": 0, "for_s": HOLD}]
    tick(svc, t + HOLD)
    assert open_rain(svc, 22) == [{"mm_h": 0, "for_s": HOLD}]     # the stop goes once
    events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "prapa.gateway.catchments"]
    assert events.count("rain_started") == 1 and events.count("rain_stopped") == 1
    assert events.count("rain_shared") == 3
    assert svc.status()["catchments"]["east"]["raining"] is False


def test_rain_sharing_rule_on_its_own():
    rs = RainSharing(window_s=600)
    gauge = {"id": 1, "role": "drain", "catchment": "c", "fields": {"state": HAS_GAUGE, "rain_mm": 0.2}}
    plain = {"id": 2, "role": "drain", "catchment": "c", "fields": {"state": 0, "rain_mm": 0.0}}
    unheard = {"id": 3, "role": "drain", "catchment": "c", "fields": None}
    meter = {"id": 4, "role": "meter", "catchment": "c", "fields": {"state": 0}}
    devices = [gauge, plain, unheard, meter]
    assert rs.tick(T0, devices) == []                  # no rain seen yet
    rs.observe(1, "drain", T0, gauge["fields"], T0)
    rs.observe(1, "drain", T0, {"state": 0, "rain_mm": 5.0}, T0)  # a reading without the gauge bit: not rain
    assert rs.tick(T0 + 1, devices) == [(2, {"mm_h": 12, "for_s": HOLD})]
    assert rs.tick(T0 + 2, devices) == []
    late = {"id": 5, "role": "drain", "catchment": "c", "fields": {"state": 0}}
    assert rs.tick(T0 + 3, devices + [late]) == [(5, {"mm_h": 12, "for_s": HOLD})]   # joins while it rains
    assert rs.tick(T0 + 601, devices + [late]) == [(2, {"mm_h": 0, "for_s": HOLD}), (5, {"mm_h": 0, "for_s": HOLD})]
    assert rs.tick(T0 + 602, devices + [late]) == []
    assert rs.state["c"] == {"raining": False, "rain_mm_h": 0.0, "gauges": 1}


def test_a_queued_command_goes_out_the_moment_a_sleeping_board_is_heard_and_is_never_burnt_on_its_sleep(svc):
    plain = board(svc, 31, "west")
    plain.awake = False
    qid = svc.store.queue_downlink(31, M.COMMAND, json.dumps({"name": "ping", "args": {}}), now=T0)
    svc._send_downlinks(T0 + 30)                       # the 1 s loop: sent once into the board's sleep, no try
    assert svc.store.downlink_status(qid)[:2] == ("sent", 0)
    for t in range(31, 600, 10):                       # asleep for ten minutes: no resend, no expiry
        svc._send_downlinks(T0 + t)
    assert svc.store.downlink_status(qid)[:2] == ("sent", 0)
    svc.sessions.clock.t = T0 + 600
    plain.wake()                                       # its frame, then a few hundred ms of listening
    assert plain.commands() == [("ping", {})]
    assert svc.store.downlink_status(qid) == ("done", 1, "ping ok")


def test_a_board_that_never_answers_expires_its_request_after_the_tries_it_was_heard_for(svc):
    plain = board(svc, 41, "west")
    plain.answer = False
    qid = svc.store.queue_downlink(41, M.COMMAND, json.dumps({"name": "ping", "args": {}}), now=T0)
    svc._send_downlinks(T0)                            # knows of it now (a request queued by the CLI)
    for i in range(1, DOWNLINK_MAX_TRIES + 2):
        svc.sessions.clock.t = T0 + i * HEARD_RESEND_S
        plain.reading()                                # heard again, no answer: sent again at once
    state, attempts, result = svc.store.downlink_status(qid)
    assert (state, attempts) == ("expired", DOWNLINK_MAX_TRIES) and "no answer" in result
    assert len(plain.commands()) == DOWNLINK_MAX_TRIES
    svc.sessions.clock.t += HEARD_RESEND_S / 4        # frames within one wake do not count as a new chance
    qid = svc.store.queue_downlink(41, M.COMMAND, json.dumps({"name": "ping", "args": {}}))
    svc._send_downlinks(svc.sessions.clock.t)
    plain.reading()
    assert svc.store.downlink_status(qid)[:2] == ("sent", 1)


def test_a_restarted_gateway_ranks_from_the_stored_readings_and_alarms(tmp_path, svc):
    b = board(svc, 51, "north")
    b.reading(level=950)
    b.send(M.ALARM, M.alarm(1, 99, 40, drain.A_BLOCKED, True, drain.B_SLOW_RECESSION))
    svc._commit()
    tick(svc, T0 + 5)
    (before,) = svc.status()["catchments"]["north"]["suspects"]
    assert before["state"] == "blocked" and before["level_mm"] == 950
    close(svc)
    again = Service(svc.cfg)                           # the same data_dir: a restart
    try:
        again.status_tick(T0 + 10)
        (after,) = again.status()["catchments"]["north"]["suspects"]
        assert (after["state"], after["level_mm"], after["reasons"][0]) == ("blocked", 950, "blocked: slow_recession")
        assert again.status()["alarms"][0]["code"] == "blocked"
    finally:
        close(again)


class Cloud:
    """A subscriber to every catchment's suspects, connecting when the test says."""

    def __init__(self, broker):
        self.messages, self.lock, self.ready = [], threading.Lock(), threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_a: c.subscribe("prapa/v1/testsite/catchment/+/suspects", qos=1)
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.ready.wait(5)

    def _on_message(self, _c, _u, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.retain, msg.payload))

    def wait(self, n, timeout_s=10.0):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.messages)} messages, not {n}")

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


def test_each_catchments_ranking_is_published_retained_when_it_changes(tmp_path, broker):
    svc = make_service(tmp_path, broker.port)
    cloud = None
    try:
        svc.forwarder.start()
        blocked, plain = board(svc, 61, "north"), board(svc, 62, "north")
        plain.reading(level=100)
        blocked.reading(level=400)
        blocked.send(M.ALARM, M.alarm(1, 50, 40, drain.A_BLOCKED, True, drain.B_RISE_NO_RAIN))
        svc._commit()
        tick(svc, T0 + 1)
        end = time.monotonic() + 10                    # the gateway's status and the suspects sent, all PUBACKed
        while ((svc.forwarder.retained_published < 2 or svc.forwarder.acked < svc.forwarder.published)
               and time.monotonic() < end):
            time.sleep(0.02)
        cloud = Cloud(broker)                          # subscribes after the publication: gets the retained one
        topic, retained, payload = cloud.wait(1)[0]
        msg = json.loads(payload)
        assert topic == "prapa/v1/testsite/catchment/north/suspects" and retained
        assert (msg["v"], msg["site"], msg["catchment"], msg["raining"]) == (1, "testsite", "north", False)
        assert [(e["id"], e["rank"], e["state"]) for e in msg["suspects"]] == [("0000003d", 1, "blocked"),
                                                                              ("0000003e", 2, "ok")]
        assert msg["suspects"][0]["lat"] == 13.75 and msg["suspects"][0]["reasons"][0] == "blocked: rise_without_rain"
        tick(svc, T0 + 2)                              # nothing changed: nothing published
        plain.reading(level=150)                       # a level moved: published at most every 30 s
        tick(svc, T0 + 3)
        blocked.send(M.ALARM, M.alarm(1, 51, 80, drain.A_BLOCKED, False, 0))   # cleared: a state changed, now
        svc._commit()
        tick(svc, T0 + 4)
        msgs = cloud.wait(2)
        assert len(msgs) == 2 and not msgs[1][1]       # a live one, not the retained copy
        assert [(e["id"], e["state"], e["level_mm"]) for e in json.loads(msgs[1][2])["suspects"]] == \
            [("0000003d", "ok", 400), ("0000003e", "ok", 150)]
        plain.reading(level=160)
        tick(svc, T0 + 35)
        assert json.loads(cloud.wait(3)[2][2])["suspects"][1]["level_mm"] == 160
        svc.registry.set_place(61, catchment="south")   # north loses a drain, south is new
        svc.registry.set_place(62, catchment="south")
        tick(svc, T0 + 36)
        by_topic = {}
        for topic, _retained, payload in cloud.wait(5):
            by_topic[topic] = payload
        assert by_topic["prapa/v1/testsite/catchment/north/suspects"] == b""      # cleared: no drains left
        assert len(json.loads(by_topic["prapa/v1/testsite/catchment/south/suspects"])["suspects"]) == 2
        # A broker killed before it saved anything has lost its retained messages: the gateway publishes
        # every list again on its next connection.
        cloud.close()
        cloud = None
        sent = svc.forwarder.retained_published
        broker.restart()
        end = time.monotonic() + 20
        while svc.forwarder.retained_published == sent and time.monotonic() < end:
            time.sleep(0.05)
        cloud = Cloud(broker)
        topic, retained, payload = cloud.wait(1)[0]
        assert topic.endswith("/catchment/south/suspects") and retained and len(json.loads(payload)["suspects"]) == 2
    finally:
        if cloud:
            cloud.close()
        close(svc)


def test_a_site_whose_boards_run_fast_shares_its_rain_in_board_time_and_a_silent_gauge_is_dry():
    """prapa site runs boards 200x faster than real time: their readings' wall times run ahead of the
    gateway's clock, and the boards count their hold in their own seconds. The window and the refreshes
    follow the catchment's newest reading, so a board is told again before its hold runs out."""
    speed, rs, sent = 200, RainSharing(window_s=600), []
    gauge_state = {"state": HAS_GAUGE, "rain_mm": 0.2}
    for i in range(1, 141):                           # a reading every 30 board seconds
        real, board_t = T0 + i * 30 / speed, T0 + i * 30
        fields = dict(gauge_state, rain_mm=0.2 if i <= 100 else 0.0)
        rs.observe(1, "drain", board_t, fields, real)
        devices = [{"id": 1, "role": "drain", "catchment": "c", "fields": fields, "wall_t": board_t},
                   {"id": 2, "role": "drain", "catchment": "c", "fields": {"state": 0}, "wall_t": board_t}]
        sent += [(i, args["mm_h"]) for _d, args in rs.tick(real, devices)]
    # 0.2 mm a reading = 24 mm/h once the window is full; told at the start, every 900 board seconds, and
    # once more when 600 board seconds of the window passed dry.
    assert [i for i, _ in sent] == [1, 31, 61, 91, 120] and sent[1][1] == 240 and sent[-1][1] == 0
    rs = RainSharing(window_s=600)
    rs.observe(1, "drain", T0, gauge_state, T0)
    devices = [{"id": 1, "role": "drain", "catchment": "c", "fields": gauge_state, "wall_t": T0 + 10},
               {"id": 2, "role": "drain", "catchment": "c", "fields": {"state": 0}, "wall_t": T0 + 10}]
    assert rs.tick(T0 + 1, devices) == [(2, {"mm_h": 12, "for_s": HOLD})]
    assert rs.tick(T0 + 601, devices) == [(2, {"mm_h": 0, "for_s": HOLD})]    # not heard for the window: dry


def test_a_bug_in_the_ranking_keeps_the_last_lists_and_the_rest_of_the_status_loop_running(svc, monkeypatch,
                                                                                          caplog):
    b = board(svc, 71, "north")
    b.reading(level=500)
    tick(svc, T0 + 1)
    published = dict(svc._published)
    assert svc.status()["catchments"]["north"]["suspects"][0]["level_mm"] == 500

    def broken(*_a, **_k):
        raise KeyError("level_mm")
    monkeypatch.setattr("gateway.ranking.rank", broken)
    caplog.set_level(logging.ERROR)
    b.reading(level=600)
    tick(svc, T0 + 100)
    tick(svc, T0 + 101)
    assert svc.status()["catchments"]["north"]["suspects"][0]["level_mm"] == 500       # the last good list
    assert svc.status()["devices"][0]["readings"] == 2 and svc._published == published  # nothing cleared
    assert svc.registry.get(71).state == "active"                                       # last_seen went on
    failures = [r for r in caplog.records if '"ranking_failed"' in r.getMessage()]
    assert len(failures) == 1                                                           # said once


def test_the_status_page_is_built_only_while_somebody_reads_it_and_the_catchments_go_on(svc, monkeypatch):
    """Its device list costs ~90 ms a tick at 5,000 devices, on the loop that acknowledges: with no reader
    for STATUS_READ_HOLD_S the tick skips it, and still ranks and publishes the catchments; a reader from
    the HTTP server's thread, while the loop runs, waits for the next tick's fresh snapshot."""
    import asyncio
    import threading
    from gateway import service as service_module
    b = board(svc, 21, "north")
    b.reading()
    tick(svc, T0 + 1)
    built = svc._snapshot_at
    assert built is not None and svc.status()["devices"][0]["readings"] == 1     # the first minute: built
    svc._status_read_at -= service_module.STATUS_READ_HOLD_S + 1                 # a minute without a reader
    b.reading()
    tick(svc, T0 + 2)
    assert svc._snapshot_at == built                                             # not built ...
    assert svc._catchments["north"]["suspects"][0]["id"] == f"{21:08x}"          # ... but ranked
    # A reader on another thread while the loop runs: it waits for the next tick, then sees both readings.
    got = {}

    async def loop_side():
        svc._loop, svc._loop_thread = asyncio.get_running_loop(), threading.current_thread()
        reader = threading.Thread(target=lambda: got.update(status=svc.status()))
        reader.start()
        await asyncio.sleep(0.2)
        assert reader.is_alive()                     # waiting for a fresh snapshot
        tick(svc, T0 + 3)
        await asyncio.to_thread(reader.join, 5)

    monkeypatch.setattr(service_module, "STATUS_FRESH_WAIT_S", 5.0)
    svc._snapshot_at -= 10                           # the last one is old
    asyncio.run(loop_side())
    assert got["status"]["devices"][0]["readings"] == 2
