"""prapa commission for a storm drain in the field, against a real virtual board (the firmware on the VM,
a drain of the world simulator) through mpremote: the config and key written, its place (location and
catchment) in the registry, the live level read back with its range, and the gateway round trip; a
sensor looking at debris in its blind zone fails the live inputs with the fix."""

import re

from gateway.registry import Registry
from tools import boards
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess
from tests.tools.test_commission_monitor import BOARD, assert_key_hidden, prapa

STILL = ["storm_drain.noise_mm=0", "storm_drain.start_level_mm=40", "storm_drain.sensor=1"]


def fresh_drain(tmp_path, world=STILL):
    flash = tmp_path / "flash.img"
    prepare_flash(boards.load(BOARD), "drain", flash)
    return BoardProcess(BOARD, "drain", flash, speed=10, world=list(world))


def test_commissioning_a_drain_writes_its_config_and_place_and_it_reads_the_water(tmp_path):
    registry = tmp_path / "registry.db"
    Registry(registry).close()
    board = fresh_drain(tmp_path)
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "drain", "--device-id", "0x3101",
                  "--set", "drain.grate_mm=1200", "--set", "drain.mount_mm=1500", "--location", "13.7612,100.4951",
                  "--catchment", "phra-athit-rd", "--registry", str(registry), "--uart-port", board.uart_port,
                  "--sensor-wait", "1", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        for step in ("board answers", "console shows the device", "live inputs", "gateway round trip"):
            assert f"{step} ... ok" in r.stdout, r.stdout
        level = re.search(r"water level above the invert, mm (\d+) \[0\.\.10000\]", r.stdout)
        assert level and abs(int(level.group(1)) - 40) <= 10, r.stdout      # the world's standing pool
        reg = Registry(registry)
        device = reg.get(0x3101)
        reg.close()
        assert (device.role, device.lat, device.lon, device.catchment) == ("drain", 13.7612, 100.4951,
                                                                           "phra-athit-rd")
        assert_key_hidden(device.key, r.stdout, r.stderr)
    finally:
        board.close()


def test_debris_in_the_blind_zone_fails_the_live_inputs_naming_the_fix(tmp_path):
    board = fresh_drain(tmp_path, STILL + ["storm_drain.blind_at_h=0", "storm_drain.blind_hours=10"])
    try:
        r = prapa("commission", "--port", board.console_port, "--role", "drain", "--device-id", "0x3102",
                  "--export", str(tmp_path / "drain.json"), "--sensor-wait", "1", "--yes")
        assert r.returncode != 0, r.stdout
        assert "live inputs ... FAIL" in r.stdout or "live inputs ... fail" in r.stdout.lower(), r.stdout
        assert "blind zone" in r.stdout, r.stdout
    finally:
        board.close()
