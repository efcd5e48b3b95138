"""Keys at rest: every file that holds a device key is 0600, made the way the product makes it.

The files: a board's flash image (built, provisioned, or commissioned in place over the console),
a `prapa commission --export` file, the gateway's registry (keys and downlink counters), and
whatever a `prapa site` leaves in its workdir. The tests run with umask 0, so a mode that is only
right because of a friendly umask fails here."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import files
from gateway.registry import Registry
from tools import boards, image
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess

ROOT = Path(__file__).resolve().parents[2]
BOARD = "esp32-devkitc"
KEY = bytes(range(0xA0, 0xB0))


@pytest.fixture
def umask_0():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def files_holding(folder, key):
    """Every regular file under folder whose bytes hold key raw or as hex (an export writes hex)."""
    forms = (bytes(key), key.hex().encode(), key.hex().upper().encode())
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and not p.is_symlink() and any(f in p.read_bytes() for f in forms))


def assert_private(paths):
    assert {str(p): f"{mode(p):04o}" for p in paths} == {str(p): "0600" for p in paths}


def prapa(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# -- the one atomic writer ---------------------------------------------------------------------------
def test_a_private_file_is_0600_and_exclusive_from_its_first_byte(tmp_path, umask_0, monkeypatch):
    created = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        if str(path).endswith(".tmp"):
            created.append((flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(files.os, "open", spy)
    out = tmp_path / "keys" / "device.key"
    files.write_atomically(out, KEY, mode=files.PRIVATE)
    assert out.read_bytes() == KEY and mode(out) == 0o600
    assert mode(out.parent) == 0o700                   # the folder it made for a secret
    ((flags, create_mode),) = created
    assert flags & os.O_CREAT and flags & os.O_EXCL and create_mode == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["device.key"]      # no temp file left


def test_a_private_file_replacing_a_readable_one_ends_0600(tmp_path, umask_0):
    out = tmp_path / "x.img"
    out.write_bytes(b"old")
    os.chmod(out, 0o644)
    files.write_atomically(out, KEY, mode=files.PRIVATE)
    assert mode(out) == 0o600 and out.read_bytes() == KEY


def test_a_shared_file_is_still_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        files.write_atomically(tmp_path / "manifest.json", b"{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "manifest.json") == 0o644


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", lambda *_a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        files.write_atomically(tmp_path / "device.key", KEY, mode=files.PRIVATE)
    assert list(tmp_path.iterdir()) == []


# -- flash images ------------------------------------------------------------------------------------
def test_an_image_built_then_provisioned_with_a_key_is_0600(tmp_path, umask_0):
    board = boards.load(BOARD)
    flash = tmp_path / "images" / "flash.img"
    image.write_atomically(flash, image.build(board, "meter", "virtual"))
    assert mode(flash) == 0o600 and mode(flash.parent) == 0o700     # before the key: it may get one later
    image.provision(board, flash, {"device_id": 0x2001, "role": "meter", "meter": {}}, KEY)
    assert files_holding(tmp_path, KEY) == [flash]
    assert_private([flash])


def test_a_virtual_board_flash_is_created_0600(tmp_path, umask_0):
    flash = tmp_path / "board" / "flash.img"
    assert prepare_flash(boards.load(BOARD), "meter", flash)
    assert mode(flash) == 0o600 and mode(flash.parent) == 0o700


def test_a_virtual_board_run_on_a_readable_image_narrows_it_to_0600(tmp_path, umask_0):
    board = boards.load(BOARD)
    flash = tmp_path / "built.img"
    image.write_atomically(flash, image.build(board, "meter", "virtual"), mode=0o644)   # as `prapa build` publishes
    assert not prepare_flash(board, "meter", flash)
    assert mode(flash) == 0o600            # commissioning will write /device.key into it in place


# -- commissioning -----------------------------------------------------------------------------------
def test_commissioning_a_virtual_board_leaves_its_key_only_in_0600_files(tmp_path, umask_0):
    flash = tmp_path / "flash.img"
    prepare_flash(boards.load(BOARD), "meter", flash)
    board = BoardProcess(BOARD, "meter", flash, speed=10, world=["flow_meter.forced_lpm=30"])
    export = tmp_path / "device-77.json"
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "meter", "--device-id", "77",
                  "--export", str(export), "--uart-port", board.uart_port, "--sensor-wait", "1", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        board.close()
    key = bytes.fromhex(json.loads(export.read_text())["devices"][0]["key"])
    holding = files_holding(tmp_path, key)
    assert export in holding and flash in holding          # the scan saw the key where it belongs
    assert_private(holding)
    gw = tmp_path / "gw"
    gw.mkdir(mode=0o700)                                    # the service's data_dir (StateDirectoryMode=0700)
    r = prapa("gateway", "devices", "import", str(export), "--registry", str(gw / "registry.db"))
    assert r.returncode == 0, r.stderr
    assert_private(files_holding(gw, key))


# -- the gateway's registry --------------------------------------------------------------------------
def test_the_registry_and_its_side_files_are_0600(tmp_path, umask_0):
    reg = Registry(tmp_path / "registry.db")
    reg.add(0x2001, "meter", KEY)
    reg.next_downlink_counters(0x2001, 4)                   # the downlink counters live beside the keys
    while_open = sorted(tmp_path.iterdir())                 # registry.db, -wal and -shm
    assert [p.name for p in while_open] == ["registry.db", "registry.db-shm", "registry.db-wal"]
    assert_private(while_open)
    reg.close()
    assert_private(files_holding(tmp_path, KEY))


# -- a whole site ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A one-board `prapa site` run for a second in a workdir it creates; (workdir, {device_id: key})."""
    workdir = tmp_path_factory.mktemp("site") / "work"
    old = os.umask(0)
    try:
        r = prapa("site", "--boards", "1", "--headless", "--duration", "1", "--workdir", str(workdir))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    uri = (workdir / "data" / "registry.db").as_uri() + "?immutable=1"    # look without touching
    with sqlite3.connect(uri, uri=True) as db:
        keys = dict(db.execute("SELECT device_id, key FROM devices"))
    assert len(keys) == 1
    return workdir, keys


def test_every_file_in_a_site_workdir_that_holds_a_key_is_0600(site):
    workdir, keys = site
    for device_id, key in keys.items():
        holding = files_holding(workdir, key)
        assert workdir / "data" / "registry.db" in holding and any(p.suffix == ".img" for p in holding)
        assert_private(holding)


def test_the_folders_a_site_creates_for_its_keys_are_not_world_readable(site):
    workdir, keys = site
    folders = {p.parent for key in keys.values() for p in files_holding(workdir, key)} | {workdir}
    assert {str(f): f"{mode(f):04o}" for f in folders if mode(f) & 0o007} == {}
