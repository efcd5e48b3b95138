"""gateway/registry.py: keys stay private, imports are all-or-nothing, downlink counters never repeat."""

import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.registry import DownlinkCounters, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes.fromhex("8f3a61c0d2b74e95a1c6e0f2b3d4c5e6")
KEY2 = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY3 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_registry_files_are_private_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        reg = Registry(tmp_path / "registry.db")
        reg.add(1, "meter", KEY)
    finally:
        os.umask(old)
    for name in ("registry.db", "registry.db-wal", "registry.db-shm"):
        assert mode(tmp_path / name) == 0o600, name
    reg.close()


def test_a_registry_found_world_readable_is_tightened(tmp_path):
    Registry(tmp_path / "registry.db").close()
    os.chmod(tmp_path / "registry.db", 0o644)
    Registry(tmp_path / "registry.db").close()
    assert mode(tmp_path / "registry.db") == 0o600


def test_keys_never_reach_a_repr_an_error_or_a_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    reg = Registry(tmp_path / "registry.db")
    reg.add(1, "meter", KEY, name="Soi 3 meter", board="esp32-devkitc")
    reg.mark_seen(1, 1000.0, firmware="0.3.1")
    with pytest.raises(RegistryError) as dup:
        reg.add(2, "doser", KEY)
    reg.export_device(1, tmp_path / "out.json")
    reg.retire(1)
    Registry(tmp_path / "other.db").import_file(tmp_path / "out.json")
    shown = [repr(reg.get(1)), str(reg.get(1)), repr(reg.list()), str(dup.value), json.dumps(reg.get(1).public())]
    for record in caplog.records:
        shown.append(record.getMessage())
        shown.extend(repr(v) for v in vars(record).values())
    events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "prapa.gateway.registry"]
    assert {"device_added", "device_seen", "devices_exported", "device_retired", "devices_imported"} <= set(events)
    for text in shown:
        assert KEY.hex() not in text.lower() and repr(KEY) not in text and "8f3a61" not in text.lower()
    assert "key=<hidden>" in repr(reg.get(1))
    assert reg.get(1).key == KEY            # the field is there for the session, only hidden from view


@pytest.mark.parametrize("args, field, fix", [
    ((2**32, "meter", KEY), "device_id", "0 to 4294967295"),
    ((True, "meter", KEY), "device_id", "0 to 4294967295"),
    ((1, "pump", KEY), "role", "meter, doser, drain"),
    ((1, "meter", KEY[:15]), "key", "16 bytes"),
    ((1, "meter", KEY.hex()), "key", "as bytes"),
    ((1, "meter", bytes(16)), "key", "os.urandom(16)"),
    ((1, "meter", KEY, "bad\nname"), "name", "printable"),
    ((1, "meter", KEY, None, "ESP32 DevKit"), "board", "prapa board list"),
])
def test_a_bad_record_is_refused_naming_the_field_and_fix(tmp_path, args, field, fix):
    reg = Registry(tmp_path / "registry.db")
    with pytest.raises(RegistryError) as info:
        reg.add(*args)
    assert f": {field}:" in str(info.value) and fix in str(info.value)
    assert reg.list() == []


def test_a_taken_id_or_key_is_refused(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(1, "meter", KEY)
    with pytest.raises(RegistryError, match="device 1: device_id: 1 is already registered"):
        reg.add(1, "drain", KEY2)
    with pytest.raises(RegistryError, match="device 2: key: is already another device's key"):
        reg.add(2, "drain", KEY)


def test_the_commissioning_story(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    assert reg.key_for(7) is None
    reg.add(7, "doser", KEY, name="Plant dosing pump", board="esp32-devkitc", now=50.0)
    assert reg.get(7).state == "commissioned" and reg.key_for(7) == KEY
    reg.mark_seen(7, 100.0, firmware="0.3.1")
    reg.mark_seen(7, 130.0)
    device = reg.get(7)
    assert (device.state, device.firmware, device.last_seen) == ("active", "0.3.1", 130.0)
    reg.close()
    reg = Registry(tmp_path / "registry.db")
    assert reg.get(7).last_seen == 130.0          # the lazy last_seen is flushed on close
    reg.retire(7)
    assert reg.key_for(7) is None and reg.get(7).state == "retired"
    with pytest.raises(RegistryError, match="retired"):
        reg.next_downlink_counters(7, 1)
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.mark_seen(8, 1.0)


def test_export_is_private_and_complete_and_import_restores_the_device(tmp_path):
    reg = Registry(tmp_path / "a.db")
    reg.add(3, "drain", KEY, name="Drain, Thanon Ratchadamnoen")
    reg.next_downlink_counters(3, 100)
    out = tmp_path / "drain3.json"
    out.write_text("old")
    reg.export_device(3, out)
    assert mode(out) == 0o600
    assert json.loads(out.read_text())["devices"][0]["key"] == KEY.hex()
    assert sorted(p.name for p in tmp_path.iterdir() if "drain3" in p.name) == ["drain3.json"]   # no temp left
    other = Registry(tmp_path / "b.db")
    assert other.import_file(out) == [3]
    assert other.key_for(3) == KEY and other.get(3).state == "commissioned"
    assert other.next_downlink_counters(3, 1) == range(100, 101)       # counters used with the key carry over


def export_file(tmp_path, records):
    path = tmp_path / "import.json"
    path.write_text(json.dumps({"format": "prapa-registry-export", "version": 1, "devices": records}))
    return path


def good(device_id, key):
    return {"device_id": device_id, "role": "meter", "key": key.hex(), "name": None, "board": None}


@pytest.mark.parametrize("bad, where", [
    ({"role": "pump"}, "devices[2]: role"),
    ({"key": "zz" * 16}, "devices[2].key"),
    ({"device_id": 10}, "devices[2].device_id"),              # twice in the file
    ({"key": KEY.hex()}, "devices[2].key"),                   # another record's key
    ({"downlink_bound": -1}, "devices[2].downlink_bound"),
])
def test_import_is_all_or_nothing_when_a_record_is_bad(tmp_path, bad, where):
    reg = Registry(tmp_path / "registry.db")
    path = export_file(tmp_path, [good(10, KEY), good(11, KEY2), {**good(12, KEY3), **bad}])
    with pytest.raises(RegistryError) as info:
        reg.import_file(path)
    assert where in str(info.value)
    assert reg.list() == []


def test_import_is_all_or_nothing_when_a_device_is_already_here(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(11, "drain", KEY2)
    with pytest.raises(RegistryError, match=r"devices\[1\]: device_id: 11 is already registered"):
        reg.import_file(export_file(tmp_path, [good(10, KEY), good(11, KEY3)]))
    assert [d.device_id for d in reg.list()] == [11]
    reg.close()
    assert [d.device_id for d in Registry(tmp_path / "registry.db").list()] == [11]


def test_downlink_counter_blocks_survive_reopen(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(5, "doser", KEY)
    assert reg.next_downlink_counters(5, 10) == range(0, 10)
    assert reg.next_downlink_counters(5, 3) == range(10, 13)
    counters = DownlinkCounters(reg, 5, block=4)
    assert [counters.next() for _ in range(6)] == [13, 14, 15, 16, 17, 18]
    reg.close()
    reg = Registry(tmp_path / "registry.db")
    assert reg.next_downlink_counters(5, 1) == range(21, 22)       # 19 and 20 were reserved: skipped, never reused
    with pytest.raises(ValueError):
        reg.next_downlink_counters(5, 0)


def test_downlink_counter_exhaustion_asks_for_a_new_key(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(5, "doser", KEY)
    reg.next_downlink_counters(5, 2**32 - 2)
    assert reg.next_downlink_counters(5, 2) == range(2**32 - 2, 2**32)
    with pytest.raises(RegistryError, match="new key"):
        reg.next_downlink_counters(5, 1)


WRITER = """
import sys
from gateway.registry import Registry
reg = Registry(sys.argv[1])
while True:
    block = reg.next_downlink_counters(5, 7)
    print(block[-1], flush=True)
"""


def test_downlink_counters_never_repeat_after_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "registry.db"
    reg = Registry(path)
    reg.add(5, "doser", KEY)
    reg.close()
    rng = random.Random(6)
    highest_handed_out = -1
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()                      # it is running and reserving
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        lines = out.split()
        if lines:
            highest_handed_out = max(highest_handed_out, int(lines[-1]))
        reg = Registry(path)
        start = reg.next_downlink_counters(5, 1)[0]
        assert start > highest_handed_out
        highest_handed_out = start
        assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        reg.close()
