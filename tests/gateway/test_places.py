"""A device's place in the registry (location, catchment): validated at every door, carried by exports,
set at commissioning or later, and added to registries made before places without losing a device."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.registry import SCHEMA_VERSION, Registry, RegistryError, parse_location

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes.fromhex("8f3a61c0d2b74e95a1c6e0f2b3d4c5e6")
KEY2 = bytes.fromhex("00112233445566778899aabbccddeeff")

# registry.db as prapa made it before places (schema 0, user_version 0).
OLD_SCHEMA = """
CREATE TABLE devices (
    device_id INTEGER PRIMARY KEY, name TEXT, role TEXT NOT NULL, key BLOB NOT NULL, state TEXT NOT NULL,
    board TEXT, firmware TEXT, last_seen REAL, added_at REAL NOT NULL, downlink_bound INTEGER NOT NULL DEFAULT 0
);
"""


def prapa(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tools.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_registry_made_before_places_keeps_every_device_and_gains_the_columns(tmp_path):
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO devices VALUES (7, 'Soi 3', 'drain', ?, 'active', 'esp32-devkitc', '0.3.1', 100.0,"
               " 50.0, 64)", (KEY,))
    db.execute("INSERT INTO devices VALUES (8, NULL, 'meter', ?, 'retired', NULL, NULL, NULL, 51.0, 0)", (KEY2,))
    db.commit()
    db.close()
    reg = Registry(path)
    d = reg.get(7)
    assert (d.name, d.role, d.state, d.board, d.firmware, d.last_seen, d.downlink_bound) == \
        ("Soi 3", "drain", "active", "esp32-devkitc", "0.3.1", 100.0, 64)
    assert d.key == KEY and (d.lat, d.lon, d.catchment) == (None, None, None)
    assert reg.get(8).state == "retired" and reg.key_for(8) is None
    assert reg.next_downlink_counters(7, 1) == range(64, 65)           # counters carry on above the old bound
    reg.set_place(7, location=(13.7563, 100.5018), catchment="khlong-toei-3")
    reg.close()
    reg = Registry(path)                                                # a second open migrates nothing
    assert reg.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    d = reg.get(7)
    assert (d.lat, d.lon, d.catchment) == (13.7563, 100.5018, "khlong-toei-3")
    assert d.public()["catchment"] == "khlong-toei-3" and "key" not in d.public()
    assert reg.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reg.close()


def test_a_registry_made_by_a_newer_prapa_is_refused_untouched(tmp_path):
    path = tmp_path / "registry.db"
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="newer prapa"):
        Registry(path)
    assert path.exists()


def test_a_device_is_commissioned_with_its_place_and_moved_later(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(3, "drain", KEY, name="Soi 3", location=(13.75, 100.5), catchment="north")
    assert (reg.get(3).lat, reg.get(3).lon, reg.get(3).catchment) == (13.75, 100.5, "north")
    reg.set_place(3, catchment="south")                                 # the location stays
    assert (reg.get(3).lat, reg.get(3).catchment) == (13.75, "south")
    reg.set_place(3, location=None)                                     # cleared, the catchment stays
    assert (reg.get(3).lat, reg.get(3).lon, reg.get(3).catchment) == (None, None, "south")
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.set_place(4, catchment="south")
    with pytest.raises(RegistryError, match="nothing to set"):
        reg.set_place(3)


@pytest.mark.parametrize("location, catchment, part, fix", [
    ((91, 100), None, "location", "latitude first"),
    ((-90.5, 0), None, "location", "latitude first"),
    ((13, 180.1), None, "location", "longitude second"),
    ((float("nan"), 1), None, "location", "latitude first"),
    ((13, float("inf")), None, "location", "longitude second"),
    ((True, 1), None, "location", "latitude first"),
    ((13,), None, "location", "LAT,LON"),
    (None, "a/b", "catchment", "1 to 32 letters"),
    (None, "x" * 33, "catchment", "1 to 32 letters"),
    (None, "", "catchment", "1 to 32 letters"),
    (None, "-north", "catchment", "starting with a letter or digit"),
    (None, "a+b", "catchment", "1 to 32 letters"),
    (None, "two words", "catchment", "1 to 32 letters"),
])
def test_a_bad_place_is_refused_naming_the_part_and_the_fix(tmp_path, location, catchment, part, fix):
    reg = Registry(tmp_path / "registry.db")
    with pytest.raises(RegistryError) as info:
        reg.add(5, "drain", KEY, location=location, catchment=catchment)
    assert f"device 5: {part}:" in str(info.value) and fix in str(info.value)
    assert reg.list() == []


@pytest.mark.parametrize("text, says", [
    ("13.75", "is not LAT,LON"), ("13.75,", "is not LAT,LON"), ("13.75,100.5,3", "is not LAT,LON"),
    ("north,east", "not two numbers"), ("95,100", "latitude 95"), ("13,-181", "longitude -181"),
    ("nan,1", "latitude nan"),
])
def test_location_text_is_two_numbers_in_range(text, says):
    with pytest.raises(RegistryError, match=says):
        parse_location(text, where="--location")


def test_export_and_import_carry_the_place_and_older_exports_import_without_one(tmp_path):
    reg = Registry(tmp_path / "a.db")
    reg.add(3, "drain", KEY, location=(13.75, 100.5), catchment="north")
    out = tmp_path / "drain3.json"
    reg.export_device(3, out)
    record = json.loads(out.read_text())["devices"][0]
    assert (record["lat"], record["lon"], record["catchment"]) == (13.75, 100.5, "north")
    other = Registry(tmp_path / "b.db")
    assert other.import_file(out) == [3]
    assert (other.get(3).lat, other.get(3).lon, other.get(3).catchment) == (13.75, 100.5, "north")
    old = tmp_path / "old.json"                                          # written before places existed
    old.write_text(json.dumps({"format": "prapa-registry-export", "version": 1,
                               "devices": [{"device_id": 4, "role": "drain", "key": KEY2.hex()}]}))
    assert other.import_file(old) == [4] and other.get(4).catchment is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "prapa-registry-export", "version": 1, "devices": [
        {"device_id": 5, "role": "drain", "key": bytes(range(1, 17)).hex(), "lat": 13.7, "lon": None}]}))
    with pytest.raises(RegistryError, match=r"bad.json: devices\[0\]: location: longitude None"):
        other.import_file(bad)


def test_prapa_gateway_devices_place_sets_shows_and_clears_a_place(tmp_path):
    path = tmp_path / "registry.db"
    reg = Registry(path)
    reg.add(0x2001, "drain", KEY, name="Soi 3")
    reg.close()
    r = prapa("gateway", "devices", "place", "0x2001", "--registry", path, "--location=-6.2,106.8",
              "--catchment", "ciliwung", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["lat"], shown["lon"], shown["catchment"]) == (-6.2, 106.8, "ciliwung") and "key" not in shown
    listing = prapa("gateway", "devices", "list", "--registry", path)
    assert "-6.200000,106.800000 ciliwung" in listing.stdout and KEY.hex() not in listing.stdout
    r = prapa("gateway", "devices", "place", "0x2001", "--registry", path, "--clear")
    assert r.returncode == 0 and "- -" in r.stdout
    reg = Registry(path)
    assert (reg.get(0x2001).lat, reg.get(0x2001).catchment) == (None, None)
    reg.close()


@pytest.mark.parametrize("args, flag, says", [
    (["--location", "91,100"], "--location", "latitude 91 is not -90 to 90"),
    (["--location", "13.7"], "--location", "both parts"),
    (["--location", "13.7,east"], "--location", "not two numbers"),
    (["--catchment", "north/1"], "--catchment", "1 to 32 letters"),
    (["--catchment", "n" * 33], "--catchment", "1 to 32 letters"),
    (["--clear", "--catchment", "n"], "--clear", "alone"),
    ([], "place", "nothing to set"),
])
def test_a_bad_place_on_the_command_line_exits_2_naming_the_flag_and_changes_nothing(tmp_path, args, flag, says):
    path = tmp_path / "registry.db"
    reg = Registry(path)
    reg.add(9, "drain", KEY, catchment="keep")
    reg.close()
    r = prapa("gateway", "devices", "place", "9", "--registry", path, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and flag in r.stderr and says in r.stderr and "fix:" in r.stderr, r.stderr
    reg = Registry(path)
    assert reg.get(9).catchment == "keep"
    reg.close()


def test_prapa_commission_refuses_a_bad_place_before_it_touches_a_board_or_the_registry(tmp_path):
    registry = tmp_path / "registry.db"
    Registry(registry).close()
    for args, flag in ((["--location", "13.7,200"], "--location"), (["--catchment", "bad name"], "--catchment")):
        r = prapa("commission", "--port", "/dev/ttyNOPE0", "--role", "drain", "--device-id", "9",
                  "--registry", registry, *args)
        assert r.returncode == 2 and flag in r.stderr and "fix:" in r.stderr, r.stderr
    reg = Registry(registry)
    assert reg.list() == []
    reg.close()
    assert "--location LAT,LON" in prapa("commission", "--help").stdout
