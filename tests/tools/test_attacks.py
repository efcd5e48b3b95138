"""The campaign's attack frames and its gateway rig: each attack is refused for its reason by a real gateway's
Sessions, the verdict fails on every broken promise, the rig's clock steps and its tap counts (issue 16)."""

import random

import cbor2

import pytest

from gateway.session import Sessions
from gateway.store import Store
from protocol import link, secure
from protocol import messages as M
from tools.rigs import attacks
from tools.rigs.gateway_rig import SteppedClock, Tap, install_tap, read_offset, read_taps, write_offset

KEYS = {0x2001: bytes(range(16)), 0x2002: bytes(range(16, 32))}


class _Counters:
    def __init__(self):
        self.n = 0

    def next(self):
        self.n += 1
        return self.n


def _sessions(tmp_path):
    store = Store(tmp_path / "store.db")
    return Sessions(store, KEYS.get, lambda *_: None, lambda d: secure.MemoryCounters()), store


def _health(device_id, sender, heap_min=41_000):
    payload = bytearray(cbor2.dumps(M.health(1, 60, 50_000, heap_min, 0, 0, 1, 1, 0, 10, 3), canonical=True))
    n = sender.frame(M.HEALTH, payload, len(payload))
    return f"{device_id:08x}", bytes(sender.frame_buf[:n])


def _frames(device_id, n):
    """n real health frames a board sends (sealed with its key), as the tap captures them."""
    sender = link.Sender(KEYS[device_id], device_id, secure.UPLINK, _Counters())
    return [_health(device_id, sender) for _ in range(n)]


def test_every_attack_kind_is_refused_for_its_reason_and_none_is_accepted(tmp_path):
    sessions, store = _sessions(tmp_path)
    captured = _frames(0x2001, 3) + _frames(0x2002, 3)
    for _hexid, frame in captured:              # the boards' own frames: accepted once, as they came
        sessions.datagram(frame)
    accepted = sessions.receiver.accepted
    before = dict(sessions.counts())
    frames = attacks.attack_frames(captured, KEYS, random.Random(3), per_kind=20)
    sent = {}
    for kind, frame in frames:
        sent[kind] = sent.get(kind, 0) + 1
        sessions.datagram(frame)
    assert set(sent) == set(attacks.KINDS) and all(n == 20 for n in sent.values())
    assert sessions.receiver.accepted == accepted, "an attack frame was accepted"
    grown = {r: n - before[r] for r, n in sessions.counts().items()}
    assert sum(grown.values()) == len(frames)
    link_name = "udp"
    metrics = {"rejected": grown, "received": {link_name: len(frames)}}
    assert attacks.flood_verdict(sent, metrics, link_name, 0, 1000, 1500) == []
    assert grown["too_long"] >= 20 and grown["unknown_device"] >= 20 and grown["auth"] >= 20
    assert grown["direction"] >= 20 and grown["replay"] + grown["too_old"] >= 20
    # a gateway restarted on the same store (its replay windows committed with its last group) refuses them too
    sessions.flush()
    again = Sessions(store, KEYS.get, lambda *_: None, lambda d: secure.MemoryCounters())
    for _hexid, frame in captured:
        again.datagram(frame)
    assert again.receiver.accepted == 0 and again.counts()["replay"] == len(captured)
    store.close()


def test_the_flood_verdict_names_every_broken_promise():
    sent = {"replay": 10, "forged": 10, "oversized": 5, "garbage": 5}
    fine = {"rejected": {"replay": 10, "auth": 10, "too_long": 5, "version": 5}, "received": {"udp": 30}}
    assert attacks.flood_verdict(sent, fine, "udp", 0, 10_000, 12_000) == []
    bad = {"rejected": {"replay": 2, "auth": 10, "too_long": 5, "version": 5}, "received": {"udp": 30}}
    said = "\n".join(attacks.flood_verdict(sent, bad, "udp", 3, 10_000, 10_000 + 40 * 1024))
    for words in ("3 attack frames were accepted", "30 attack frames arrived but only 22 refusals",
                  "10 replay frames", "RSS grew 40.0 MB"):
        assert words in said, (words, said)
    # frames the kernel dropped loosen each kind's bound by as many; a full-speed flood checks the totals only
    dropped = {"rejected": {"replay": 2, "auth": 8, "too_long": 5, "version": 7}, "received": {"udp": 22}}
    assert attacks.flood_verdict(sent, dropped, "udp", 0, 0, 0) == []
    assert attacks.flood_verdict(sent, bad, "udp", 0, 0, 0, exact=False) == \
        ["30 attack frames arrived but only 22 refusals were counted"]


def test_metrics_text_is_read_by_reason_and_link():
    text = ('# HELP x\nprapa_frames_rejected_total{reason="auth"} 3.0\n'
            'prapa_frames_received_total{link="udp 127.0.0.1:9"} 7.0\n'
            'prapa_frames_rejected_created{reason="auth"} 1.7e9\n')
    m = attacks.parse_metrics(text)
    assert m == {"rejected": {"auth": 3}, "received": {"udp 127.0.0.1:9": 7}}
    assert attacks.delta({"rejected": {"auth": 1}, "received": {}}, m) == \
        {"rejected": {"auth": 2}, "received": {"udp 127.0.0.1:9": 7}}


def test_the_rigs_clock_takes_the_offset_file_and_rereads_it_at_most_every_50_ms(tmp_path):
    path = tmp_path / "rig" / "clock_offset"
    assert read_offset(path) == 0.0
    t = [100.0]
    clock = SteppedClock(path, base=lambda: 1000.0, monotonic=lambda: t[0])
    assert clock() == 1000.0
    write_offset(path, 2.4)
    assert clock() == 1000.0                  # not looked at again yet
    t[0] += 0.06
    assert clock() == pytest.approx(1002.4)
    path.write_text("not a number")
    t[0] += 0.06
    assert clock() == 1000.0


def test_the_tap_counts_udp_acceptance_health_and_captures_frames(tmp_path, monkeypatch):
    from gateway import session
    monkeypatch.setattr(link.Receiver, "_on_frame", link.Receiver._on_frame)
    monkeypatch.setattr(session.Sessions, "datagram", session.Sessions.datagram)
    monkeypatch.setattr(session.Sessions, "_dispatch", session.Sessions._dispatch)
    (tmp_path / "rig").mkdir()
    tap = Tap(tmp_path / "rig" / "tap-1.json")
    install_tap(tap)
    sessions, store = _sessions(tmp_path)
    frames = _frames(0x2001, 2)
    sessions.datagram(frames[0][1])
    sessions.datagram(frames[0][1])           # its replay: refused, not counted
    sender = link.Sender(KEYS[0x2002], 0x2002, secure.UPLINK, _Counters())
    payload = bytearray(cbor2.dumps(M.health(1, 60, 50_000, 41_000, 0, 0, 1, 1, 0, 10, 3), canonical=True))
    n = sender.wire_into(M.HEALTH, payload, len(payload))
    sessions.feed(bytes(sender.wire[:n]))     # a serial frame: not UDP
    tap.write()
    snap = read_taps(tmp_path)[tap.snapshot()["pid"]]
    assert snap["udp_accepted"] == 1
    assert snap["health"]["00002002"]["heap_min_min"] == 41_000 and snap["health"]["00002002"]["n"] == 1
    assert [f for _t, f in snap["captured"]["00002001"]] == [frames[0][1].hex()]
    store.close()
