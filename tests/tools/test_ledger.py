"""prapa ledger: the reference consumer checks every message against the contract, stores each identity
once, and acknowledges a message to the broker only once it is committed."""

import json
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from tests.tools.test_billing import SITE, Gateway, local, month_of
from tools import ledger as L
from tools.broker import Broker


def test_every_message_is_checked_and_counted_by_kind_and_role_and_an_invalid_one_is_kept_aside(tmp_path):
    store = L.LedgerStore(tmp_path / "l.db")
    gw = Gateway()
    rows = gw.readings(0x2001, 1, 0, local(1), [1, 2, 3], 10)
    (topic, cbor_payload), = gw.publish(rows)
    (_t, json_payload), = gw.publish(rows, fmt="json")
    assert store.ingest(topic, cbor_payload) == "stored"
    assert store.ingest(topic, json_payload) == "duplicate"        # the same items, in JSON
    body = L.decode(cbor_payload)
    body["items"][0]["seq"] = -7                                   # not a u32: the contract refuses it
    import cbor2
    assert store.ingest(topic, cbor2.dumps(body)) == "invalid"
    assert store.ingest(topic, b"\xff\x00 not a payload") in ("invalid", "undecodable")
    c = store.counts()
    assert (c["messages"], c["validated"], c["invalid"], c["stored_readings"], c["duplicates"]) == (4, 2, 2, 3, 3)
    assert c["by_kind"]["reading/meter"] == {"valid": 2, "invalid": 1}
    assert c["validator"] == "northbound"
    kept = store.db.execute("SELECT topic, problems FROM invalid").fetchall()
    assert len(kept) == 2 and "seq" in kept[0][1]
    assert store.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 3
    store.close()


def _publish(port, messages):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gw-test")
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _wait(predicate, timeout_s=10.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_persistent_session_keeps_what_arrives_while_the_ledger_is_away_and_nothing_unacked_is_lost(tmp_path):
    broker = Broker(tmp_path / "broker")
    ledger = None
    try:
        gw = Gateway()
        rows, _ = month_of(gw, 0x2001, 10, 0)
        messages = gw.publish(rows)
        ledger = L.Ledger(tmp_path / "l.db", SITE, port=broker.port).start()
        assert ledger.connected.wait(5)
        time.sleep(0.2)                                           # the SUBACK
        _publish(broker.port, messages[:1])
        assert _wait(lambda: ledger.counts()["stored_readings"] == len(L.decode(messages[0][1])["items"]))
        ledger.stop()
        _publish(broker.port, messages[1:])                       # queued by the broker for the session
        # The next ledger fails to commit the first message it gets: not acknowledged, so the broker keeps it.
        ledger = L.Ledger(tmp_path / "l.db", SITE, port=broker.port)
        real, failures = ledger.store.ingest, []

        def failing_once(topic, payload, received_at=None):
            if not failures:
                failures.append(topic)
                raise OSError("disk full")
            return real(topic, payload, received_at)
        ledger.store.ingest = failing_once
        ledger.start()
        assert _wait(lambda: ledger.failed is not None)
        time.sleep(0.5)
        ledger.stop()
        ledger = L.Ledger(tmp_path / "l.db", SITE, port=broker.port).start()   # reconnect: the broker resends
        assert _wait(lambda: ledger.counts()["stored_readings"] == len(rows)), ledger.counts()
        assert ledger.counts()["invalid"] == 0
    finally:
        if ledger is not None and ledger.client is not None:
            ledger.stop()
        broker.stop()


def test_prapa_ledger_run_stores_what_is_published_and_says_its_counts(tmp_path):
    broker = Broker(tmp_path / "broker")
    proc = None
    try:
        db = tmp_path / "l.db"
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "ledger", "run", "--broker",
                                 f"127.0.0.1:{broker.port}", "--site", SITE, "--db", str(db), "--duration", "3"],
                                stdout=subprocess.PIPE, text=True)
        assert json.loads(proc.stdout.readline())["event"] == "ledger_started"
        time.sleep(0.5)
        gw = Gateway()
        _publish(broker.port, gw.publish(gw.readings(0x2001, 1, 0, local(1), [5] * 24, 0)))
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        stopped = json.loads(out.strip().splitlines()[-1])
        assert stopped["event"] == "ledger_stopped" and stopped["stored_readings"] == 24
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()


@pytest.mark.parametrize("argv, where", [
    (["--broker", "nohost", "--site", "s", "--db", "x.db"], "--broker"),
    (["--broker", "127.0.0.1:1883", "--site", "a/b", "--db", "x.db"], "--site"),
])
def test_ledger_run_refuses_bad_arguments_with_exit_2(argv, where, capsys, tmp_path, monkeypatch):
    from tools import cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ledger", "run", *argv]) == 2
    assert where in capsys.readouterr().err


def test_a_ledger_killed_while_messages_arrive_loses_none_it_acknowledged_and_stores_each_once(tmp_path):
    """SIGKILL at a point in the flow of messages, then the same session again: every reading is stored once."""
    import random
    import signal
    import sqlite3
    broker = Broker(tmp_path / "broker")
    procs = []
    db = tmp_path / "l.db"

    def run_ledger():
        p = subprocess.Popen([sys.executable, "-m", "tools.cli", "ledger", "run", "--broker",
                              f"127.0.0.1:{broker.port}", "--site", SITE, "--db", str(db)],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert json.loads(p.stdout.readline())["event"] == "ledger_started"
        return p

    def stored():
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                return c.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        except sqlite3.Error:
            return 0
    try:
        gw = Gateway()
        rows = gw.readings(0x2001, 1, 0, local(1), [3] * 400, 0)
        messages = [m for row in rows for m in gw.publish([row])]          # one reading a message
        first = run_ledger()
        time.sleep(0.5)
        publisher = threading_publish(broker.port, messages)
        kill_at = random.Random(18).randrange(20, 200)
        assert _wait(lambda: stored() >= kill_at, 20)
        first.send_signal(signal.SIGKILL)
        first.wait()
        at_kill = stored()
        publisher.join(30)
        second = run_ledger()
        assert _wait(lambda: stored() == len(rows), 20), stored()
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=10)
        counts = json.loads(out.strip().splitlines()[-1])
        assert counts["stored_readings"] == len(rows) and counts["invalid"] == 0 and counts["conflicts"] == 0
        assert at_kill < len(rows)                     # the kill came while messages were arriving
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.stop()


def threading_publish(port, messages):
    import threading
    t = threading.Thread(target=_publish, args=(port, messages), daemon=True)
    t.start()
    return t


def test_seqs_a_killed_broker_lost_are_asked_for_again_from_the_first_missing_one(tmp_path):
    """A broker's PUBACK is not a disk write: a broker killed between the gateway's PUBACK and its autosave
    loses messages. The ledger sees seqs missing below ones it holds and asks for a replay of the device
    after the last seq it holds before the hole (a replay starts after since_seq); a hole still being
    filled by a resend is asked for only when it is there at two looks in a row."""
    broker = Broker(tmp_path / "broker")
    ledger = L.Ledger(tmp_path / "l.db", SITE, port=broker.port, client_id="heal-ledger").start()
    asked = []
    cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="heal-watch")
    cloud.on_message = lambda _c, _u, msg: asked.append((msg.topic, json.loads(msg.payload)))
    cloud.connect("127.0.0.1", broker.port)
    cloud.subscribe(f"prapa/v1/{SITE}/+/replay/request", qos=1)
    cloud.loop_start()
    try:
        assert ledger.connected.wait(5)
        gw = Gateway()
        rows = gw.readings(0x2001, 3, 1, local(1), [1, 2, 3, 4, 5], 10)      # seqs 1..5 of boot 3
        kept = [r for r in rows if r[3] not in (3, 4)]                       # the broker lost 3 and 4
        _publish(broker.port, gw.publish(kept))
        assert _wait(lambda: ledger.counts()["stored_readings"] == 3)
        assert ledger.store.holes() == {"00002001": [(3, 3, 2)]}
        assert ledger.heal() == 0                                           # first look: maybe a resend fills it
        assert ledger.heal() == 1 and ledger.replays_asked == 1             # still there: asked for
        assert _wait(lambda: asked)
        assert asked == [(f"prapa/v1/{SITE}/00002001/replay/request", {"since_boot": 3, "since_seq": 2})]
        _publish(broker.port, gw.publish([r for r in rows if r[3] in (3, 4)], replay=True))  # the replay
        assert _wait(lambda: not ledger.store.holes())
        assert ledger.heal() == 0
    finally:
        cloud.loop_stop()
        cloud.disconnect()
        ledger.stop()
        broker.stop()
