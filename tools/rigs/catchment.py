"""A catchment of drain boards beside the real gateway, a real Mosquitto and a QoS 1 subscriber, for tests
and benchmarks of what a crew is told in a storm.

Every board is the real firmware on the real VM (`prapa board run` children) with its own world
(tools/sim/worlds/drain.py: the same rain for all, each its own area, blockage and sensor), its own key
and its place in the registry; the gateway is `prapa gateway run` (its sessions, store, ranking, rain
sharing, forwarder and status page) with one serial link per board; the subscriber records every
reading, every alarm with the instant it reached the broker, and the newest ranked list per catchment.
"""

import json
import secrets
import threading
import urllib.request

from tools import boards, image
from tools.broker import Broker, free_port
from tools.gateway_process import GatewayProcess, register, write_config
from tools.rigs.board import BOARD, wait_for
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess

SITE = "rig"
FIRST_DEVICE_ID = 0x3001


class Subscriber:
    """prapa/v1/<site>/#, QoS 1: reading identities and alarms per device (with the host instant each
    alarm first arrived), and the newest suspects list per catchment (retained JSON)."""

    def __init__(self, port, site=SITE):
        import paho.mqtt.client as mqtt
        self.lock = threading.Lock()
        self.readings, self.alarms, self.suspects = {}, {}, {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="catchment-rig", clean_session=False)
        self.client.on_connect = lambda client, *_: client.subscribe(f"prapa/v1/{site}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        import cbor2
        with self.lock:
            if msg.topic.endswith("/suspects"):
                body = json.loads(msg.payload)
                self.suspects[body["catchment"]] = body
                return
            try:
                body = cbor2.loads(msg.payload)
            except ValueError:
                return
            device = body.get("device")
            for item in body.get("items", ()):
                if item.get("kind") == "reading":
                    self.readings.setdefault(device, {})[(item["boot"], item["seq"])] = item
                elif item.get("kind") == "alarm":
                    self.alarms.setdefault(device, []).append(item)

    def alarm_names(self, device):
        """Every alarm the device raised (and maybe cleared since)."""
        with self.lock:
            return {a["name"] for a in self.alarms.get(device, ()) if a["active"]}

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Catchment:
    """Drain boards, each given as (config section, world overrides, place {"catchment", "lat", "lon"}),
    at one clock speed; the gateway, broker and subscriber started once every board runs."""

    def __init__(self, tmp_path, drains, speed=60, seed=1, vm=None):
        self.speed = speed
        board_def = boards.load(BOARD)
        self.broker = Broker(tmp_path / "broker")
        self.cloud = Subscriber(self.broker.port)
        self.boards, names, keys, places = [], {}, {}, {}
        try:
            for i, (section, world, place) in enumerate(drains):
                device_id = FIRST_DEVICE_ID + i
                name = f"drain-{i + 1:03d}"
                key = secrets.token_bytes(16)
                flash = tmp_path / f"{name}.img"
                prepare_flash(board_def, "drain", flash)
                image.provision(board_def, flash, {"device_id": device_id, "role": "drain", "drain": section}, key)
                keys[device_id], names[device_id], places[device_id] = key, name, place
                self.boards.append((device_id, BoardProcess(BOARD, "drain", flash, speed=speed, seed=seed * 100 + i,
                                                            world=world, vm=vm)))
            self.http_port = free_port()
            config = write_config(tmp_path, [vb.uart_port for _d, vb in self.boards], self.broker.port, site=SITE,
                                  http_port=self.http_port)
            register(tmp_path, keys, role="drain", names=names, board=BOARD, places=places)
            self.gateway = GatewayProcess(config, log_path=tmp_path / "gateway.log").start()
            self.gateway.wait_started()
        except BaseException:
            self.close()
            raise

    def hexid(self, index):
        return f"{FIRST_DEVICE_ID + index:08x}"

    def world(self, index):
        """The index-th drain's world truth (tools/sim/worlds/drain.py truth())."""
        return self.boards[index][1].status()["world"]["storm_drain"]

    def status(self):
        """The gateway's status JSON (what its page draws)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/status.json", timeout=5) as r:
            return json.loads(r.read())

    def wait(self, predicate, timeout, what):
        return wait_for(predicate, timeout, what)

    def close(self):
        for closer in (getattr(self, "gateway", None) and self.gateway.stop,
                       *(vb.close for _d, vb in getattr(self, "boards", ())),
                       getattr(self, "cloud", None) and self.cloud.close,
                       getattr(self, "broker", None) and self.broker.stop):
            if closer:
                try:
                    closer()
                except Exception:      # noqa: BLE001 - close everything that can be closed
                    pass

