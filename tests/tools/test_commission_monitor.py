"""prapa commission, prapa monitor and prapa gateway devices, against real virtual boards through mpremote.

The story an installer tells: a flashed board gets its id, config and key over
USB; the gateway knows it; the console shows it counting; a ping comes back.
Bad input is refused in one line before anything is written. The key shows up
nowhere but on the board and in the registry."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import tty
from pathlib import Path

import pytest
import serial

from gateway.registry import Registry
from protocol import framing
from tools import boards
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess
from tools.console import ConsoleReader as Console
from tools.rigs.board import DEVICE_ID, KEY, commissioned_flash

ROOT = Path(__file__).resolve().parents[2]
MPREMOTE = str(Path(sys.executable).with_name("mpremote"))
BOARD = "esp32-devkitc"
READ_FILES = ("import os, json\nout = {'files': sorted(os.listdir('/'))}\n"
              "for n in ('config.json', 'device.key'):\n"
              " try:\n  out[n] = open(n, 'rb').read().hex()\n except OSError:\n  pass\n"
              "print(json.dumps(out))")


def prapa(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def fresh_board(tmp_path, name="flash.img", **kw):
    """A board flashed with the meter app and never commissioned (it boots idle)."""
    flash = tmp_path / name
    prepare_flash(boards.load(BOARD), "meter", flash)
    return BoardProcess(BOARD, "meter", flash, **kw)


def board_files(port):
    """The board's root listing and its config/key bytes, read over mpremote as a technician would."""
    r = subprocess.run([MPREMOTE, "connect", port, "exec", READ_FILES], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_key_hidden(key, *texts):
    for text in texts:
        for shown in (key.hex(), key.hex().upper(), repr(key)):
            assert shown not in text


def test_commissioning_a_virtual_meter_registers_it_and_passes_every_live_check(tmp_path):
    registry = tmp_path / "registry.db"
    Registry(registry).close()
    board = fresh_board(tmp_path, speed=10, world=["flow_meter.forced_lpm=30"])
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "meter", "--device-id", "0x2001",
                  "--set", "meter.register_l=1500", "--set", "link.health_s=60", "--registry", str(registry),
                  "--uart-port", board.uart_port, "--sensor-wait", "1", "--yes", "--name", "Soi 3 house 12")
        assert r.returncode == 0, r.stdout + r.stderr
        for step in ("board answers", "config and key written", "console shows the device", "sensor reads",
                     "gateway round trip"):
            assert f"{step} ... ok" in r.stdout
        assert "prapa device=8193 " in r.stdout and "pong" in r.stdout
        assert "commissioned in" in r.stdout
        seen = int(re.search(r"sensor reads \.\.\. ok .*: (\d+) pulses", r.stdout).group(1))
        reg = Registry(registry)
        device = reg.get(0x2001)
        reg.close()
        assert device.role == "meter" and device.board == BOARD and device.name == "Soi 3 house 12"
        assert device.downlink_bound > 0          # the ping's counters came from durable registry blocks
        assert_key_hidden(device.key, r.stdout, r.stderr)

        on_board = board_files(board.console_port)
        assert bytes.fromhex(on_board["device.key"]) == device.key
        config = json.loads(bytes.fromhex(on_board["config.json"]))
        assert config["device_id"] == 0x2001 and config["meter"]["register_l"] == 1500
        assert config["link"]["health_s"] == 60 and config["meter"]["k_factor_l"] == 1   # defaults filled in
        assert not [f for f in on_board["files"] if f.endswith(".new")]

        # The board comes up as the device after a power cut too, with its pulses kept.
        console = Console(board.console_port)
        try:
            board.power_cut()
            _, m = console.wait_for(r"prapa device=(\d+) .*total_pulses=(\d+)", timeout=20)
            assert int(m.group(1)) == 0x2001 and int(m.group(2)) >= seen > 0     # the test water was kept
        finally:
            console.close()

        listing = prapa("gateway", "devices", "list", "--registry", str(registry), "--json")
        assert listing.returncode == 0
        assert json.loads(listing.stdout)["device_id"] == 0x2001
        assert_key_hidden(device.key, listing.stdout)
    finally:
        board.close()


def test_an_export_file_from_the_field_imports_on_the_gateway(tmp_path):
    board = fresh_board(tmp_path, speed=10, world=["flow_meter.forced_lpm=30"])
    export = tmp_path / "device-77.json"
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "meter", "--device-id", "77",
                  "--export", str(export), "--uart-port", board.uart_port, "--sensor-wait", "1", "--yes", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert all(e["ok"] for e in events if "step" in e)
        assert events[-1]["ok"] and events[-1]["total_s"] > 0
        assert oct(export.stat().st_mode & 0o777) == "0o600"
        key = bytes.fromhex(json.loads(export.read_text())["devices"][0]["key"])
        assert_key_hidden(key, r.stdout, r.stderr)
        assert bytes.fromhex(board_files(board.console_port)["device.key"]) == key
    finally:
        board.close()
    gateway_registry = tmp_path / "gw" / "registry.db"
    gateway_registry.parent.mkdir()
    r = prapa("gateway", "devices", "import", str(export), "--registry", str(gateway_registry))
    assert r.returncode == 0, r.stderr
    reg = Registry(gateway_registry)
    assert reg.key_for(77) == key
    # The ping used downlink counters; the gateway continues above them, never reusing a nonce.
    assert reg.get(77).downlink_bound > 0
    reg.close()
    listing = prapa("gateway", "devices", "list", "--registry", str(gateway_registry))
    assert "77" in listing.stdout and "meter" in listing.stdout
    assert_key_hidden(key, listing.stdout, r.stdout)


def test_a_meter_that_sees_no_water_fails_its_check_with_the_fix_and_exits_1(tmp_path):
    board = fresh_board(tmp_path, speed=10)
    export = tmp_path / "device-78.json"
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "meter", "--device-id", "78",
                  "--export", str(export), "--sensor-wait", "0.5", "--yes")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "sensor reads ... FAIL" in r.stdout and "fix: check that water runs" in r.stdout
        assert "console shows the device ... ok" in r.stdout and "gateway round trip ... skipped" in r.stdout
        assert export.exists()           # the board holds the key: the gateway must be able to learn it
    finally:
        board.close()


@pytest.fixture(scope="module")
def idle_board(tmp_path_factory):
    board = fresh_board(tmp_path_factory.mktemp("idle"))
    yield board
    board.close()


BAD_COMMISSION = [
    (["--device-id", "0"], "--device-id"),
    (["--device-id", "meter-7"], "--device-id"),
    (["--device-id", "4294967295"], "--device-id"),
    (["--role", "pump"], "--role"),
    (["--set", "meter.k_factor_l=fast"], "meter.k_factor_l"),
    (["--set", "meter.k_factor_l=0.0001"], "meter.k_factor_l"),
    (["--set", "meter.interval_min=7"], "meter.interval_min"),
    (["--set", "meter.flow=1"], "meter.flow"),
    (["--set", "pump.speed=1"], "pump"),
    (["--set", "k_factor_l"], "--set"),
    (["--port", "/dev/ttyNOPE0"], "--port"),
    (["--uart-port", "/dev/ttyNOPE1"], "--uart-port"),
    (["--registry", "/nonexistent/prapa/registry.db"], "--registry"),
]


@pytest.mark.parametrize("change, field", BAD_COMMISSION, ids=[c[1] + ":" + " ".join(c[0]) for c in BAD_COMMISSION])
def test_bad_commission_input_exits_2_naming_the_field_and_writes_nothing(tmp_path, idle_board, change, field):
    registry = tmp_path / "registry.db"
    Registry(registry).close()
    before = board_files(idle_board.console_port)
    args = {"--port": idle_board.console_port, "--role": "meter", "--device-id": "9", "--registry": str(registry)}
    extra = []
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[change[i]] = change[i + 1]
        else:
            extra += change[i:i + 2]
    r = prapa("commission", *[x for kv in args.items() for x in kv], *extra, "--yes")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and field in r.stderr and "; " in r.stderr, r.stderr
    assert board_files(idle_board.console_port) == before
    assert "device.key" not in before
    if registry.exists():
        reg = Registry(registry)
        assert reg.list() == []
        reg.close()


def test_commission_refuses_an_existing_export_file_and_a_taken_device_id(tmp_path, idle_board):
    export = tmp_path / "taken.json"
    export.write_text("{}")
    r = prapa("commission", "--port", idle_board.console_port, "--role", "meter", "--device-id", "9",
              "--export", str(export), "--yes")
    assert r.returncode == 2 and "--export" in r.stderr and export.read_text() == "{}"
    registry = tmp_path / "registry.db"
    reg = Registry(registry)
    reg.add(9, "meter", KEY)
    reg.close()
    before = board_files(idle_board.console_port)
    r = prapa("commission", "--port", idle_board.console_port, "--role", "meter", "--device-id", "9",
              "--registry", str(registry), "--yes")
    assert r.returncode == 2 and "--device-id" in r.stderr and "already" in r.stderr
    assert board_files(idle_board.console_port) == before


@pytest.mark.parametrize("args, field", [
    (["monitor", "--port", "/dev/ttyNOPE0", "--key-file", "good.key", "--device-id", "1"], "--port"),
    (["monitor", "--udp", "localhost", "--key-file", "good.key", "--device-id", "1"], "--udp"),
    (["monitor", "--udp", "127.0.0.1:5683", "--registry", "/nonexistent/registry.db"], "--registry"),
    (["monitor", "--udp", "127.0.0.1:5683"], "--registry"),
    (["monitor", "--udp", "127.0.0.1:5683", "--key-file", "short.key", "--device-id", "1"], "--key-file"),
    (["monitor", "--udp", "127.0.0.1:5683", "--key-file", "good.key", "--device-id", "-3"], "--device-id"),
    (["gateway", "devices", "import", "missing.json", "--registry", "r.db"], "FILE"),
    (["gateway", "devices", "import", "bad.json", "--registry", "r.db"], "devices[0].key"),
    (["gateway", "devices", "import", "good.json", "--registry", "/nonexistent/r.db"], "--registry"),
    (["gateway", "devices", "list", "--registry", "/nonexistent/r.db"], "--registry"),
])
def test_bad_monitor_and_devices_input_exits_2_in_one_line(tmp_path, args, field):
    (tmp_path / "short.key").write_bytes(b"0123")
    (tmp_path / "good.key").write_bytes(KEY)
    good = {"format": "prapa-registry-export", "version": 1,
            "devices": [{"device_id": 5, "role": "meter", "key": KEY.hex()}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    good["devices"][0]["key"] = "00ff"
    (tmp_path / "bad.json").write_text(json.dumps(good))
    r = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and field in r.stderr and "; " in r.stderr, r.stderr
    assert not (tmp_path / "r.db").exists()


class Relay:
    """The board's UART copied onto a pty the monitor reads, with one frame corrupted (line noise)."""

    def __init__(self, uart_port, corrupt_frame=2):
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.port = os.ttyname(slave)
        self._slave = slave
        self.uart = serial.Serial(uart_port, timeout=0.05)
        self.frames, self.corrupt_frame, self.running = [], corrupt_frame, True
        self.reader = framing.Reader(lambda _a, buf, n: self.frames.append(bytes(buf[:n])), accept_any=True)
        self.delimiters = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            data = bytearray(self.uart.read(256))
            self.reader.feed(bytes(data))
            for i, b in enumerate(data):
                if b == 0:
                    self.delimiters += 1
                elif self.delimiters == self.corrupt_frame and i + 1 < len(data) and data[i + 1] != 0:
                    data[i] ^= 0x40 if b == 0x80 else 0x80     # a flipped bit mid-frame, never a new 0x00
                    self.corrupt_frame = -1
            if data:
                os.write(self.master, bytes(data))

    def close(self):
        self.running = False
        self.thread.join(2)
        self.uart.close()
        os.close(self.master)
        os.close(self._slave)


def test_monitor_decodes_a_commissioned_board_and_counts_a_corrupted_frame(tmp_path):
    registry = tmp_path / "registry.db"
    reg = Registry(registry)
    reg.add(DEVICE_ID, "meter", KEY)
    reg.close()
    flash = commissioned_flash(tmp_path, "meter", {"interval_min": 1})
    board = BoardProcess(BOARD, "meter", flash, speed=60, world=["flow_meter.forced_lpm=30"])
    relay = Relay(board.uart_port)
    try:
        r = prapa("monitor", "--port", relay.port, "--registry", str(registry), "--json", "--count", "5",
                  "--duration", "40", "--direction", "up", timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        frames = [e for e in events if e["event"] == "frame"]
        assert len(frames) == 5 and all(f["device"] == DEVICE_ID and f["direction"] == "up" for f in frames)
        types = {f["type"] for f in frames}
        assert {"hello", "readings"} <= types, types
        hello = next(f for f in frames if f["type"] == "hello")["payload"]
        assert hello["role"] == "meter" and hello["board"] == BOARD and len(hello["config_hash"]) == 16
        readings = next(f for f in frames if f["type"] == "readings")["payload"]
        assert readings["units"]["unit"] == "L" and readings["register"] >= 0 and readings["rows"]
        rejected = [e["reason"] for e in events if e["event"] == "rejected"]
        assert len(rejected) == 1 and rejected[0] in ("crc", "noise"), rejected   # a COBS code byte hit: noise
        assert events[-1]["event"] == "summary" and events[-1]["rejected"] == {rejected[0]: 1}
        assert events[-1]["accepted"] == 5
        assert_key_hidden(KEY, r.stdout, r.stderr)
        good = relay.frames[0]
    finally:
        relay.close()
        board.close()

    # Over UDP one frame per datagram; a tampered ciphertext fails authentication and is counted.
    key_file = tmp_path / "device.key"
    key_file.write_text(KEY.hex())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "monitor", "--udp", f"127.0.0.1:{port}",
                             "--key-file", str(key_file), "--device-id", str(DEVICE_ID), "--count", "1",
                             "--duration", "20", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert "monitoring" in proc.stderr.readline()          # bound: nothing sent from here on is lost
    tampered = bytearray(good)
    tampered[15] ^= 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(bytes(tampered), ("127.0.0.1", port))
        s.sendto(good, ("127.0.0.1", port))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["rejected", "frame", "summary"]
    assert events[0]["reason"] == "auth" and events[0]["device"] == DEVICE_ID
    assert events[1]["type"] in ("hello", "readings") and events[-1]["rejected"] == {"auth": 1}
