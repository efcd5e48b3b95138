"""A QoS 1 subscriber for tests; the gateway process itself is tools/gateway_process.py."""

import threading

import cbor2
import paho.mqtt.client as mqtt

from tools.gateway_process import GatewayProcess, register, write_config  # noqa: F401  (tests import them here)


class Subscriber:
    """A QoS 1 subscriber with a persistent session: every item of every message, as it arrives."""

    def __init__(self, port, site="testsite", client_id="test-cloud", tls=None):
        self.items = []
        self.messages = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_message = self._on_message
        if tls:
            self.client.tls_set(**tls)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"prapa/v1/{site}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        if msg.topic.endswith("/suspects"):      # the gateway's retained ranking of a catchment (JSON)
            return
        body = cbor2.loads(msg.payload)
        with self.lock:
            self.messages += 1
            for item in body.get("items", ()):
                self.items.append(dict(item, device=body.get("device"), topic=msg.topic))

    def of_kind(self, kind):
        with self.lock:
            return [i for i in self.items if i.get("kind") == kind]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
