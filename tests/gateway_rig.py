"""A real gateway service (`prapa gateway run` as a child process) for tests: config, registry, kill."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

from gateway.registry import Registry
from tools.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


def write_config(folder, uart_ports, broker_port, site="testsite", extra=""):
    folder = Path(folder)
    links = "".join(f'[[links]]\ntype = "serial"\nport = "{p}"\n\n' for p in uart_ports)
    text = (f'[gateway]\nsite = "{site}"\ndata_dir = "{folder / "data"}"\nlog_level = "info"\n\n{links}'
            f'[[brokers]]\nurl = "mqtt://127.0.0.1:{broker_port}"\nclient_id = "prapa-test-gw"\n\n'
            f'[http]\nlisten = "127.0.0.1:{free_port()}"\n\n[time]\nsync_interval_s = 60\n{extra}')
    path = folder / "gateway.toml"
    path.write_text(text)
    (folder / "data").mkdir(mode=0o700, exist_ok=True)
    return path


def register(folder, devices, role="meter"):
    reg = Registry(Path(folder) / "data" / "registry.db")
    for device_id, key in devices.items():
        reg.add(device_id, role, key)
    reg.close()


class GatewayProcess:
    def __init__(self, config_path):
        self.config_path = config_path
        self.proc = None
        self.log = []

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "gateway", "run", "--config",
                                      str(self.config_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc):
        for line in proc.stderr:
            self.log.append(line.rstrip())

    def wait_started(self, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any('"gateway_started"' in line for line in self.log):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}: {self.log[-5:]}")
            time.sleep(0.02)
        raise AssertionError(f"gateway did not start: {self.log[-5:]}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None


class Subscriber:
    """A QoS 1 subscriber with a persistent session: every item of every message, as it arrives."""

    def __init__(self, port, site="testsite", client_id="test-cloud"):
        self.items = []
        self.messages = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"prapa/v1/{site}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
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
