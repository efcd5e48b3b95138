"""A real Mosquitto on a free loopback port, for as long as a fixture needs it.

A test can stop or SIGKILL it and start it again on the same port (a broker
outage as the gateway sees one), give it a TLS listener, or extra config
lines. Run as root, Mosquitto would drop to the `mosquitto` user and then fail
to save its persistence file in a root-owned work directory; `user root` keeps
persistent sessions real across a restart.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def mosquitto_exe():
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto is not installed: run ./dev setup (it installs the Debian package)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """tls: optional dict with cafile, certfile, keyfile and require_certificate (mutual TLS)."""

    def __init__(self, workdir, port=None, tls=None, extra_conf=()):
        self.host, self.port = "127.0.0.1", port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true",
                 "persistence true", f"persistence_location {self.workdir}/"]
        if os.geteuid() == 0:
            lines.append("user root")
        if tls:
            lines += [f"cafile {tls['cafile']}", f"certfile {tls['certfile']}", f"keyfile {tls['keyfile']}",
                      f"require_certificate {'true' if tls.get('require_certificate') else 'false'}"]
        self.conf.write_text("\n".join([*lines, *extra_conf]) + "\n")
        self.proc = self.log = None
        self.start()

    def start(self):
        """Start (again) on the same port, with the same config and persistence file."""
        self.log = open(self.workdir / "mosquitto.log", "a")
        self.proc = subprocess.Popen([mosquitto_exe(), "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()}")
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not listen within 10 s")

    def restart(self):
        """After it died (or was stopped): start again on the same port and persistence file."""
        if self.proc.poll() is None:
            self.kill()
        if not self.log.closed:
            self.log.close()
        self.start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def kill(self):
        """SIGKILL: no goodbye to clients, nothing saved since the last snapshot."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()
