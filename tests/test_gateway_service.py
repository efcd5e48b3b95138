"""The gateway service end to end: virtual boards on serial ptys, a real Mosquitto, a QoS 1 subscriber."""

import random
import time

from tests.gateway_rig import GatewayProcess, Subscriber, register, write_config
from tools.broker import Broker
from tools.vboard.rig import KEY, check_register_chain, commissioned_flash
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


def test_sigkill_the_gateway_200_times_and_every_acknowledged_reading_reaches_the_cloud(tmp_path):
    """Kill -9 the gateway at random instants (starting, ingesting, committing, forwarding) and
    restart it. Boards delete only what was acknowledged; so if the subscriber's series of each
    board is unbroken up to the true total, nothing acknowledged was lost anywhere."""
    rng = random.Random(7)
    broker = Broker(tmp_path / "broker")
    devices = {0x1001: KEY, 0x1002: bytes(range(16, 32))}
    boards = {}
    for device_id, key in devices.items():
        flash = commissioned_flash(tmp_path, meter={"interval_min": 1}, name=f"{device_id:x}.img",
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
        for k in range(200):
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
