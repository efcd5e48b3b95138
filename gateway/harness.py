"""A gateway on one serial link: the service's session layer and store, without the service around them.

For whatever talks to a single board over its data link from the host: the
firmware tests' rig (tools/rigs/board.py), commissioning's round-trip check
(tools/commission.py), the HIL suite. Built from the pieces the service runs
(gateway/session.py's Sessions, gateway/store.py's Store, gateway/serial_link.py's
SerialLink, pumped by gateway/service.py's read_link on a thread); what it
leaves out is the service's: registry, forwarder, metrics, asyncio.

Every read that brings bytes is fed to the sessions, then (acknowledge=True)
committed and acknowledged at once, the service's group commit with a group of
one read. acknowledge=False verifies and drops readings and acknowledges
nothing (the service's disk guard): the board keeps its log for the real
gateway. unplug()/plug() make the gateway vanish and return: bytes either way
meanwhile are lost, as on a dead line. Sessions are touched under `lock` only.
"""

import os
import threading
import time

from gateway.serial_link import SerialLink
from gateway.service import read_link
from gateway.session import Sessions
from gateway.store import Store
from protocol import messages as M
from protocol.secure import MemoryCounters


class _PySerialLink:
    """An open pyserial port (the caller's: never closed here) as a link."""

    framed = True

    def __init__(self, ser):
        self.serial, self.port = ser, ser.port

    def read(self):
        return self.serial.read(max(1, self.serial.in_waiting))

    def write(self, _addr, data):
        self.serial.write(data)

    def close(self):
        pass


class OneLinkGateway:
    def __init__(self, port_or_link, store_path, keys, counters=None, acknowledge=True, baudrate=115200):
        """port_or_link: a port name (opened here), a SerialLink, or an open pyserial port (the caller's).
        keys: {device_id: key}. counters(device_id) -> the downlink counters (an object with next());
        default: from 0 in memory (fine for a throwaway store, never for a board a real gateway serves)."""
        if isinstance(port_or_link, (str, os.PathLike)):
            self.link, self._owns_link = SerialLink(os.fspath(port_or_link), baudrate), True
        elif hasattr(port_or_link, "framed"):
            self.link, self._owns_link = port_or_link, False
        else:
            self.link, self._owns_link = _PySerialLink(port_or_link), False
        self.keys = dict(keys)
        self.store = Store(store_path)
        self.sessions = Sessions(self.store, self.keys.get, self._send,
                                 counters or (lambda device_id: MemoryCounters(0)))
        self.sessions.accepting = acknowledge
        self.sessions.on_command_result = self._command_result
        self.acknowledge = acknowledge
        self.results = []                 # (device_id, command_result message), as they came
        self.lock = threading.RLock()
        self.plugged = True
        self._stopping = threading.Event()
        self._thread = None
        self._command_id = 0

    # -- life cycle ------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=read_link, args=(self.link, self._stopping, self._deliver),
                                        kwargs={"retry_s": 0.01}, daemon=True,
                                        name=f"gateway {getattr(self.link, 'port', 'link')}")
        self._thread.start()
        return self

    def stop(self):
        """Stop pumping; close the link (when opened here) and the store. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._owns_link:
            self.link.close()
        self.store.close()

    close = stop

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the line --------------------------------------------------------------------------------
    def _deliver(self, data):
        with self.lock:
            if not self.plugged:
                return
            self.sessions.feed(data)
            if self.acknowledge:
                self.sessions.flush()

    def _send(self, addr, wire):
        if self.plugged:
            self.link.write(addr, wire)

    def unplug(self):
        with self.lock:
            self.plugged = False

    def plug(self):
        with self.lock:
            self.plugged = True

    # -- what the gateway knows ---------------------------------------------------------------------
    def wait(self, predicate, timeout, step=0.02):
        """predicate()'s first truthy value (called under the lock) within timeout seconds, else None."""
        end = time.monotonic() + timeout
        while True:
            with self.lock:
                value = predicate()
            if value or time.monotonic() >= end:
                return value or None
            time.sleep(step)

    def device(self, device_id):
        """The session's Device after the board's hello (firmware, board, role, boot_id, health), else None."""
        with self.lock:
            d = self.sessions.devices.get(device_id)
            return d if d is not None and d.firmware else None

    def wait_hello(self, device_id, timeout):
        return self.wait(lambda: self.device(device_id), timeout)

    def health(self, device_id):
        with self.lock:
            d = self.sessions.devices.get(device_id)
            return dict(d.health) if d and d.health else None

    def refused(self):
        """{reason: frames} of the frames the link layer refused (bad CRC, unknown device, replay, ...)."""
        with self.lock:
            return {reason: n for reason, n in self.sessions.counts().items() if n}

    def entries(self, kind="reading", order="seq"):
        """Stored entries of a kind as decoded dicts, in (boot, seq) order (order="id": as they arrived)."""
        with self.lock:
            return self.store.entries(kind, order)

    # -- commands --------------------------------------------------------------------------------
    def _command_result(self, device_id, m):
        self.results.append((device_id, m))

    def command(self, device_id, name, args=None, timeout=10.0, resend_s=3.0):
        """Send a command once the board has said hello, again (a new id) every resend_s until one is
        answered; return its command_result as a dict (0: id, 1: done, 2: detail), or None at the timeout."""
        end = time.monotonic() + timeout
        if self.wait_hello(device_id, timeout) is None:
            return None
        sent, sent_at = set(), None
        while True:
            with self.lock:
                for d, m in self.results:
                    if d == device_id and m[0] in sent:
                        return m
                if sent_at is None or time.monotonic() - sent_at >= resend_s:
                    self._command_id += 1
                    sent.add(self._command_id)
                    sent_at = time.monotonic()
                    self.sessions.downlink(device_id, M.COMMAND, M.command(self._command_id, name, args))
            if time.monotonic() >= end:
                return None
            time.sleep(0.02)

    def ping(self, device_id, timeout=10.0, resend_s=3.0):
        """The board's answer to a ping ("pong ..."), or None if it said nothing (or no pong) in time."""
        m = self.command(device_id, "ping", timeout=timeout, resend_s=resend_s)
        detail = str(m.get(2, "")) if m else ""
        return detail if m and m[1] and detail.startswith("pong") else None
