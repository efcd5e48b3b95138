"""prapa site: a simulated site on one machine.

Today: a real Mosquitto, N commissioned virtual meters (the firmware on the
real VM, with the world simulator, 1-minute intervals), the gateway's session
layer on each board's pseudo-terminal (durable commit, then ack), each
committed reading published to the broker, and a real subscriber counting
what arrives. The relay stands where the gateway service goes; when it lands,
the site runs the gateway instead and the report keeps its shape.
"""

import argparse
import json
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt

SITE = "demo"
FIRST_DEVICE_ID = 0x2001


def add_parser(sub):
    p = sub.add_parser("site", help="run a simulated site: broker, virtual boards, live view",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--boards", type=int, default=3, help="number of virtual meters (default 3)")
    p.add_argument("--speed", type=int, default=60, help="board time runs this many times faster (default 60: an hour a minute)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--headless", action="store_true", help="no live view; log JSON events only")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every board on exit")
    p.add_argument("--board", default="esp32-devkitc", help="board definition of the virtual meters")
    p.set_defaults(func=run)


class Relay(threading.Thread):
    """One board's link into the gateway's session layer (commit, then ack), and each
    committed reading published with its identity. Stands where the gateway service goes."""

    def __init__(self, vboard, device_id, name, sessions, lock, client):
        super().__init__(daemon=True)
        self.vboard, self.device_id, self.name, self.sessions = vboard, device_id, name, sessions
        self.lock, self.client = lock, client
        self.made, self.last, self.stop = 0, {}, threading.Event()

    def run(self):
        from gateway.serial_link import SerialLink
        link = SerialLink(self.vboard.uart_port)
        while not self.stop.is_set():
            data = link.read()
            if not data:
                continue
            with self.lock:
                self.sessions.feed(data, link)
                entries = list(self.sessions.pending)
                self.sessions.flush()
            for e in entries:
                if e.device_id != self.device_id or e.kind != "reading":
                    continue
                self.made += 1
                self.last = cbor2.loads(e.payload)
                self.client.publish(f"prapa/v1/{SITE}/{self.name}/reading",
                                    json.dumps(self.last), qos=1)
        link.close()


def run(args):
    from tools.broker import Broker
    from tools.vboard.process import BoardProcess as VirtualBoard
    from tools.errors import UsageError

    if not 1 <= args.boards <= 64:
        raise UsageError("--boards", f"{args.boards} is out of range", "give 1 to 64 boards")
    workdir = Path(tempfile.mkdtemp(prefix="prapa-site-"))
    log = (lambda event, **f: print(json.dumps({"ts": round(time.time(), 3), "event": event, **f}), flush=True))
    broker = Broker(workdir / "broker")
    log("broker_started", host=broker.host, port=broker.port)
    received = {}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="prapa-site-subscriber")

    def on_message(_c, _u, msg):
        device = msg.topic.split("/")[3]
        received.setdefault(device, set()).add(msg.payload)

    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"prapa/v1/{SITE}/+/reading", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="prapa-site-relay")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    from gateway.session import Sessions
    from gateway.store import Store
    from protocol.secure import MemoryCounters
    from tools import boards as board_defs, image
    from tools.vboard.bench import prepare_flash
    keys = {}
    lock = threading.Lock()
    store = Store(workdir / "gateway.db")
    sessions = Sessions(store, keys.get, lambda addr, wire: None, lambda d: MemoryCounters(0))
    board_def = board_defs.load(args.board)
    boards, relays = [], []
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        for i in range(args.boards):
            device = f"meter-{i + 1:03d}"
            device_id = FIRST_DEVICE_ID + i
            keys[device_id] = secrets.token_bytes(16)
            flash = workdir / f"{device}.img"
            prepare_flash(board_def, "meter", flash)
            image.provision(board_def, flash, {"device_id": device_id, "role": "meter",
                                               "meter": {"interval_min": 1}}, keys[device_id])
            vb = VirtualBoard(args.board, "meter", flash, speed=args.speed, seed=i,
                              world=[f"flow_meter.daily_litres={600 + 300 * i}"])
            boards.append((device, vb))
            relay = Relay(vb, device_id, device, sessions, lock, pub)
            relay.start()
            relays.append(relay)
            log("board_started", device=device, uart=vb.uart_port, console=vb.console_port)
        start = time.monotonic()
        while not stopping.is_set() and (not args.duration or time.monotonic() - start < args.duration):
            if not args.headless:
                _live_view(relays, received, time.monotonic() - start)
            stopping.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for r in relays:
            r.stop.set()
        for r in relays:
            r.join(2)
        time.sleep(0.5)                       # let the last QoS 1 deliveries land
        report = _report(boards, relays, received, workdir)
        for _d, vb in boards:
            vb.close()
        pub.loop_stop()
        sub.loop_stop()
        broker.stop()
        store.close()
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
        log("site_stopped", **report["totals"])
    return 0


def _report(boards, relays, received, workdir):
    rows = []
    for (device, vb), relay in zip(boards, relays):
        truth = vb.status()["world"]["flow_meter"] if vb.proc.poll() is None else {}
        rows.append({"id": device, "role": "meter", "readings_made": relay.made,
                     "readings_at_broker": len(received.get(device, ())), "alarms": [],
                     "register_l": relay.last.get("register"), "pulses_true": truth.get("pulses")})
    totals = {"boards": len(rows), "readings_made": sum(r["readings_made"] for r in rows),
              "readings_at_broker": sum(r["readings_at_broker"] for r in rows)}
    return {"site": SITE, "workdir": str(workdir), "boards": rows, "totals": totals}


def _live_view(relays, received, elapsed):
    lines = [f"\x1b[H\x1b[2Jprapa site {SITE}: {len(relays)} boards, {elapsed:6.0f} s   (Ctrl-C stops everything)", "",
             f"{'device':12} {'boot':>4} {'seq':>6} {'litres':>7} {'register':>10} {'at broker':>10}"]
    for r in relays:
        last = r.last
        lines.append(f"{r.name:12} {last.get('boot', '-'):>4} {last.get('seq', '-'):>6} "
                     f"{last.get('value', '-'):>7} {last.get('register', '-'):>10} "
                     f"{len(received.get(r.name, ())):>10}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
