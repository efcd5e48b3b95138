"""prapa site: a whole simulated site on this machine, the stack's main job.

A real Mosquitto, the gateway service (`prapa gateway run`, as on a Pi), and
virtual boards of every role that exists (meters now) running the firmware on
the real MicroPython VM with the world simulator, commissioned with their own
keys. The gateway's status page (devices, alarms, backlog, live charts) is
printed as a URL and opened in a browser unless --headless; the terminal shows
a compact summary. A real QoS 1 subscriber counts what reaches the broker.

Ctrl-C (or SIGTERM, or --duration) stops everything and leaves nothing running;
--report writes every board's figures as JSON.
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

SITE = "demo"
FIRST_DEVICE_ID = 0x2001


def add_parser(sub):
    p = sub.add_parser("site", help="run a simulated site: broker, gateway, virtual boards, live view",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boards", type=int, default=3, help="number of virtual meters (default 3)")
    p.add_argument("--speed", type=int, default=60,
                   help="board time runs this many times faster (default 60: an hour a minute)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--headless", action="store_true", help="no browser, no live view; JSON events on stdout")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every board on exit")
    p.add_argument("--board", default="esp32-devkitc", help="board definition of the virtual boards")
    p.add_argument("--workdir", metavar="DIR", help="keep the site's files here (default: a new temp folder)")
    p.set_defaults(func=run)


def _log(event, **fields):
    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), flush=True)


class Cloud:
    """The cloud side: a QoS 1 subscriber with a persistent session, counting identities per device."""

    def __init__(self, port):
        import paho.mqtt.client as mqtt
        self.readings, self.alarms, self.first_at = {}, {}, None
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="prapa-site-cloud", clean_session=False)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"prapa/v1/{SITE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        import cbor2
        try:
            body = cbor2.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if self.first_at is None:
                self.first_at = time.monotonic()
            for item in body.get("items", ()):
                device = body.get("device")
                if item.get("kind") == "reading":
                    self.readings.setdefault(device, set()).add((item["boot"], item["seq"]))
                elif item.get("kind") == "alarm":
                    self.alarms.setdefault(device, {})[item["name"]] = item["active"]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def _meter_setup(i):
    """(meter config, world) for board i. Every third has a burst main: 12 L/min without pause,
    a burst alarm after two minutes, so the status page shows an alarm early."""
    if i % 3 == 2:
        return {"interval_min": 1, "burst_lpm": 5, "burst_min": 2}, ["flow_meter.forced_lpm=12"]
    return {"interval_min": 1}, [f"flow_meter.daily_litres={600 + 300 * i}"]


def run(args):
    from tools import boards as board_defs
    from tools import image
    from tools.broker import Broker, free_port
    from protocol.errors import UsageError
    from tools.gateway_process import GatewayProcess, register, write_config
    from tools.sim.board import prepare_flash
    from tools.sim.process import BoardProcess

    if not 1 <= args.boards <= 64:
        raise UsageError("--boards", f"{args.boards} is out of range", "give 1 to 64 boards")
    if not 1 <= args.speed <= 1000:
        raise UsageError("--speed", f"{args.speed} is out of range", "give 1 to 1000")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prapa-site-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    board_def = board_defs.load(args.board)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    broker = gateway = cloud = None
    boards = []
    report = None
    try:
        broker = Broker(workdir / "broker")
        _log("broker_started", host=broker.host, port=broker.port)
        cloud = Cloud(broker.port)
        keys, names = {}, {}
        for i in range(args.boards):
            device_id = FIRST_DEVICE_ID + i
            name = f"meter-{i + 1:03d}"
            key = secrets.token_bytes(16)
            flash = workdir / f"{name}.img"
            prepare_flash(board_def, "meter", flash)
            meter, world = _meter_setup(i)
            image.provision(board_def, flash, {"device_id": device_id, "role": "meter", "meter": meter}, key)
            keys[device_id], names[device_id] = key, name
            vb = BoardProcess(args.board, "meter", flash, speed=args.speed, seed=i, world=world)
            boards.append((name, device_id, vb))
            _log("board_started", device=name, id=f"{device_id:08x}", uart=vb.uart_port, console=vb.console_port)
        http_port = free_port()
        config = write_config(workdir, [vb.uart_port for _n, _d, vb in boards], broker.port, site=SITE,
                              http_port=http_port, extra="\n[store]\nmin_free_mb = 50\n")
        register(workdir, keys, names=names, board=board_def.name)
        gateway = GatewayProcess(config, log_path=workdir / "gateway.log").start()
        gateway.wait_started()
        url = f"http://127.0.0.1:{http_port}/"
        _log("gateway_started", status_page=url, metrics=url + "metrics", pid=gateway.proc.pid)
        if not args.headless:
            print(f"status page: {url}   (Ctrl-C stops everything)", file=sys.stderr)
            import webbrowser
            threading.Timer(1.5, webbrowser.open, args=(url,)).start()
        while not stopping.is_set() and (not args.duration or time.monotonic() - started < args.duration):
            if gateway.proc.poll() is not None:
                raise RuntimeError(f"the gateway stopped (exit {gateway.proc.returncode}); "
                                   f"see {workdir / 'gateway.log'}")
            if not args.headless:
                _live_view(boards, cloud, workdir, time.monotonic() - started, url)
            stopping.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None and cloud is not None:
            _drain(workdir, cloud, timeout_s=5.0)
            report = _report(boards, cloud, workdir, started)
        if gateway is not None:
            gateway.stop()
        for _n, _d, vb in boards:
            vb.close()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.stop()
    if report is not None:
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2))
        _log("site_stopped", **report["totals"])
    return 0


def _stored(workdir):
    """Reading identities the gateway has committed, per device (read-only look at its store)."""
    import sqlite3
    path = workdir / "data" / "store.db"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT device_id, COUNT(*) FROM entries WHERE kind='reading' GROUP BY device_id").fetchall()
    except sqlite3.Error:
        rows = []
    finally:
        db.close()
    return {f"{d:08x}": n for d, n in rows}


def _drain(workdir, cloud, timeout_s):
    """Let what the gateway holds reach the broker before counting."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        made = _stored(workdir)
        with cloud.lock:
            if all(len(cloud.readings.get(d, ())) >= n for d, n in made.items()):
                return
        time.sleep(0.2)


def _report(boards, cloud, workdir, started):
    made = _stored(workdir)
    rows = []
    with cloud.lock:
        for name, device_id, vb in boards:
            hexid = f"{device_id:08x}"
            truth = vb.status()["world"]["flow_meter"] if vb.proc.poll() is None else {}
            rows.append({"id": name, "device_id": hexid, "role": "meter", "readings_made": made.get(hexid, 0),
                         "readings_at_broker": len(cloud.readings.get(hexid, ())),
                         "alarms": sorted(a for a, on in cloud.alarms.get(hexid, {}).items() if on),
                         "pulses_true": truth.get("pulses")})
        first = None if cloud.first_at is None else round(cloud.first_at - started, 2)
    totals = {"boards": len(rows), "readings_made": sum(r["readings_made"] for r in rows),
              "readings_at_broker": sum(r["readings_at_broker"] for r in rows),
              "seconds_to_first_reading_at_broker": first}
    return {"site": SITE, "workdir": str(workdir), "boards": rows, "totals": totals}


def _live_view(boards, cloud, workdir, elapsed, url):
    made = _stored(workdir)
    lines = [f"\x1b[H\x1b[2Jprapa site {SITE}: {len(boards)} boards, {elapsed:6.0f} s   status page {url}   "
             "(Ctrl-C stops everything)", "",
             f"{'board':10} {'device':9} {'at gateway':>10} {'at broker':>10}  alarms"]
    with cloud.lock:
        for name, device_id, _vb in boards:
            hexid = f"{device_id:08x}"
            alarms = ", ".join(a for a, on in cloud.alarms.get(hexid, {}).items() if on) or "-"
            lines.append(f"{name:10} {hexid:9} {made.get(hexid, 0):>10} {len(cloud.readings.get(hexid, ())):>10}"
                         f"  {alarms}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
