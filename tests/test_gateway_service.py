"""The gateway service end to end: virtual boards on serial ptys, a real Mosquitto, a QoS 1 subscriber."""

import random
import time

from tests.gateway_rig import GatewayProcess, Subscriber, register, write_config
from tools.broker import Broker
from tools.vboard.rig import KEY, commissioned_flash
from tools.vboard.process import BoardProcess


def test_readings_flow_from_a_board_through_the_gateway_to_a_subscriber(tmp_path):
    broker = Broker(tmp_path / "broker")
    flash = commissioned_flash(tmp_path, meter={"interval_min": 1})
    board = BoardProcess("esp32-devkitc", "meter", flash, speed=60, world=["flow_meter.forced_lpm=20"])
    cfg = write_config(tmp_path, [board.uart_port], broker.port)
    register(tmp_path, {0x1001: KEY})
    sub = Subscriber(broker.port)
    gw = GatewayProcess(cfg).start()
    try:
        gw.wait_started()
        end = time.monotonic() + 30
        while time.monotonic() < end and len(sub.of_kind("reading")) < 3:
            time.sleep(0.2)
        readings = sub.of_kind("reading")
        assert len(readings) >= 3, gw.log[-10:]
        r = readings[-1]
        assert r["device"] == "00001001" and r["topic"] == "prapa/v1/testsite/00001001/reading"
        assert {"boot", "seq", "register", "value", "wall_t", "time_source"} <= set(r)
    finally:
        sub.close()
        assert gw.stop() == 0
        board.close()
        broker.stop()
