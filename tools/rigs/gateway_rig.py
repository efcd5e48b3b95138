"""A gateway under a campaign's instruments: the real `prapa gateway run`, with a steppable wall clock and a tap.

    python -m tools.rigs.gateway_rig gateway run --config FOLDER/gateway.toml

runs tools.cli exactly as `prapa gateway run` does, after two things the campaign (tools/campaign.py) reads and
writes in FOLDER/rig/:

  clock_offset  seconds added to time.time() (re-read at most every OFFSET_READ_S): the host's clock stepped, as
                an NTP step or an RTC-less Pi that booted on the wrong day steps it. Installed before any gateway
                module is imported, so every time.time() of the gateway sees it, and with it the simulated wall
                clock of a site (gateway/service.py wall_clock counts from time.time()): a step of S site seconds
                is S / simulate_speed here. A restarted gateway reads it at once: the step survives a restart.
  tap-<pid>.json  written every TAP_EVERY_S by each gateway process (atomically): what the gateway's own figures
                do not show, taken where the gateway takes frames (gateway.receiver.FastReceiver, gateway.session.Sessions)
                without changing what they do:
                  udp_accepted  frames accepted from a UDP link (the site's boards use serial links only: every
                                one is an attack frame that got through)
                  health        per device: health messages, the lowest heap_min and heap_free they reported
                  captured      per device: the last CAPTURE_PER_DEVICE frames accepted (hex, with the host's
                                unstepped time.time() they came at): real frames a replay attack sends again

Nothing a technician runs imports this.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

OFFSET_READ_S = 0.05
TAP_EVERY_S = 0.5
CAPTURE_PER_DEVICE = 8
RIG_DIR = "rig"


def read_offset(path):
    """The seconds in a clock_offset file; 0.0 when it is missing or not a number."""
    try:
        return float(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def write_offset(path, seconds):
    """Set a clock_offset file atomically (a reader never sees half a number)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(float(seconds)))
    os.replace(tmp, path)


class SteppedClock:
    """time.time() plus the offset in a file, which is looked at most every OFFSET_READ_S (host monotonic)."""

    def __init__(self, path, base=time.time, monotonic=time.monotonic):
        self.path, self.base, self.monotonic = path, base, monotonic
        self.offset, self._read_at = read_offset(path), monotonic()

    def __call__(self):
        now = self.monotonic()
        if now - self._read_at >= OFFSET_READ_S:
            self._read_at = now
            self.offset = read_offset(self.path)
        return self.base() + self.offset


class Tap:
    """The figures written to tap-<pid>.json; fed on the gateway's loop thread, written from a thread of its own."""

    def __init__(self, path, clock=time.time):
        self.path, self.clock = Path(path), clock
        self.lock = threading.Lock()
        self.udp_accepted = 0
        self.health = {}            # hex -> {"n", "heap_free_min", "heap_min_min", and of the latest: "boot", "rejected", "t"}
        self.captured = {}          # hex -> [[t, hex frame], ...]

    def frame_accepted(self, frame):
        hexid = frame[2:6].hex()
        with self.lock:
            ring = self.captured.setdefault(hexid, [])
            ring.append([round(self.clock(), 3), frame.hex()])
            del ring[:-CAPTURE_PER_DEVICE]

    def health_seen(self, device_id, m):
        hexid = f"{device_id:08x}"
        with self.lock:
            h = self.health.setdefault(hexid, {"n": 0, "heap_free_min": None, "heap_min_min": None})
            h["n"] += 1
            for key, field in (("heap_free_min", 2), ("heap_min_min", 3)):
                v = m.get(field)
                if isinstance(v, int) and (h[key] is None or v < h[key]):
                    h[key] = v
            h["boot"] = m.get(0)
            counts = m.get(6)
            h["rejected"] = counts.get(2) if isinstance(counts, dict) else None   # frames the board refused, this boot
            h["t"] = round(self.clock(), 3)

    def snapshot(self):
        with self.lock:
            return {"pid": os.getpid(), "t": round(self.clock(), 3), "udp_accepted": self.udp_accepted,
                    "health": {k: dict(v) for k, v in self.health.items()},
                    "captured": {k: list(v) for k, v in self.captured.items()}}

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)

    def run_writer(self, every_s=TAP_EVERY_S):
        def loop():
            while True:
                time.sleep(every_s)
                try:
                    self.write()
                except OSError:
                    pass
        threading.Thread(target=loop, name="prapa-rig-tap", daemon=True).start()


def install_tap(tap):
    """Wrap the Receiver's frame handler and the Sessions' datagram and dispatch: the same work, counted."""
    from gateway import receiver, session
    from protocol import messages as M

    on_frame = receiver.FastReceiver._on_frame

    def _on_frame(self, addr, buf, n):
        before = self.accepted
        on_frame(self, addr, buf, n)
        if self.accepted > before:
            tap.frame_accepted(bytes(buf[:n]))

    datagram = session.Sessions.datagram

    def _datagram(self, frame, link_=None):
        before = self.receiver.accepted
        datagram(self, frame, link_)
        tap.udp_accepted += self.receiver.accepted - before

    dispatch = session.Sessions._dispatch

    def _dispatch(self, device_id, msg_type, m):
        dispatch(self, device_id, msg_type, m)
        if msg_type == M.HEALTH:
            tap.health_seen(device_id, m)

    receiver.FastReceiver._on_frame = _on_frame
    session.Sessions.datagram = _datagram
    session.Sessions._dispatch = _dispatch


def read_taps(folder):
    """{pid: tap} of every gateway process the rig ran with its config in folder (a killed one's last write)."""
    out = {}
    for path in (Path(folder) / RIG_DIR).glob("tap-*.json"):
        try:
            tap = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[tap.get("pid")] = tap
    return out


def config_folder(argv):
    """The folder of --config in a `gateway run` command line (the rig's files go beside it)."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve().parent
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1]).resolve().parent
    return Path.cwd()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rig = config_folder(argv) / RIG_DIR
    rig.mkdir(parents=True, exist_ok=True)
    unstepped = time.time
    time.time = SteppedClock(rig / "clock_offset", base=unstepped)     # before any gateway module is imported
    tap = Tap(rig / f"tap-{os.getpid()}.json", clock=unstepped)
    install_tap(tap)
    tap.run_writer()
    from tools import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
