"""prapa site: a whole simulated site on this machine, the stack's main job.

A real Mosquitto, the gateway service (`prapa gateway run`, as on a Pi), and
virtual boards (one of each role that exists, the rest of the first role: see site_plan) running the firmware on
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
import shutil
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
    p.add_argument("--boards", type=int, default=3,
                   help="number of virtual boards: one of each role but the first, the rest of the first (default 3)")
    p.add_argument("--speed", type=int, default=60,
                   help="board time runs this many times faster (default 60: an hour a minute)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--headless", action="store_true", help="no browser, no live view; JSON events on stdout")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every board on exit")
    p.add_argument("--board", default="esp32-devkitc", help="board definition of the virtual boards")
    p.add_argument("--workdir", metavar="DIR", help="keep the site's files here (default: a new temp folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp folder when the site stops (default: removed, unless the site failed)")
    from tools.sim import vm as vms
    vms.add_argument(p)
    p.set_defaults(func=run)


def _log(event, **fields):
    from gateway.logs import json_line
    print(json_line(event, stamp=True, **fields), flush=True)


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


def site_roles(board_def):
    """The roles a site runs: every role with a spec, a world model, and room on this board."""
    from protocol.roles import catalog as roles
    from tools.sim import worlds
    return [r for r in roles.available() if worlds.site_board_for(r) and r in board_def.roles_fit]


def site_plan(kinds, boards):
    """The role of each of `boards` boards: every role but the first (in the registry's order) gets one
    board, the first role gets the rest, and at least one; the first role's boards come first.

    A site is mostly the first role (the meter: a town's households) with one of each other kind of
    board beside it (a doser for the whole plant), not the roles in turn."""
    others = list(kinds[1:])[:max(0, boards - 1)]
    return [kinds[0]] * (boards - len(others)) + others


def run(args):
    """The site in --workdir, or in a new temp folder removed when the site stops: kept with --keep,
    or when the site failed (its logs say why), and then printed."""
    from protocol.errors import UsageError
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="prapa-site-")
    workdir = Path(args.workdir or tmp).resolve()
    keep = bool(args.workdir or args.keep)
    try:
        return _run(args, workdir)
    except Exception as exc:
        keep = keep or not isinstance(exc, UsageError)
        raise
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif workdir.exists():
            print(f"prapa site: its files are in {workdir}", file=sys.stderr)


def _run(args, workdir):
    from tools import boards as board_defs
    from tools import image
    from tools.broker import Broker, free_port
    from protocol.errors import UsageError
    from tools.gateway_process import GatewayProcess, register, write_config
    from tools.sim.board import prepare_flash
    from tools.sim import vm as vms
    from tools.sim import worlds
    from tools.sim.process import BoardProcess

    vm = vms.resolve(getattr(args, "vm", None))
    vms.micropython_exe(vm)                  # an unknown or unbuilt VM is refused before anything starts
    if not 1 <= args.boards <= 64:
        raise UsageError("--boards", f"{args.boards} is out of range", "give 1 to 64 boards")
    if not 1 <= args.speed <= 1000:
        raise UsageError("--speed", f"{args.speed} is out of range", "give 1 to 1000")
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
        keys, names, device_roles = {}, {}, {}
        kinds = site_roles(board_def)
        if not kinds:
            raise UsageError("--board", f"no role with a world model fits {board_def.name}", "pick another board")
        plan = site_plan(kinds, args.boards)
        for i, role in enumerate(plan):
            n = plan[:i].count(role)                 # the n-th board of its role
            device_id = FIRST_DEVICE_ID + i
            name = f"{role}-{n + 1:03d}"
            key = secrets.token_bytes(16)
            flash = workdir / f"{name}.img"
            prepare_flash(board_def, role, flash)
            section, world = worlds.site_board_for(role)(n)
            image.provision(board_def, flash, {"device_id": device_id, "role": role, role: section}, key,
                            getattr(worlds.ROLE_WORLDS[role], "SITE_LIMITS", None))   # a pump's hard limits
            keys[device_id], names[device_id], device_roles[device_id] = key, name, role
            vb = BoardProcess(args.board, role, flash, speed=args.speed, seed=i, world=world, vm=vm)
            boards.append((name, device_id, vb))
            _log("board_started", device=name, id=f"{device_id:08x}", uart=vb.uart_port, console=vb.console_port,
                 vm=vb.vm)
        http_port = free_port()
        config = write_config(workdir, [vb.uart_port for _n, _d, vb in boards], broker.port, site=SITE,
                              http_port=http_port, extra="\n[store]\nmin_free_mb = 50\n")
        register(workdir, keys, names=names, board=board_def.name, roles=device_roles)
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

    from gateway.store import Store
    path = workdir / "data" / "store.db"
    if not path.exists():
        return {}
    store = Store(path, readonly=True, timeout=5)
    try:
        counts = store.count_by_device(kind="reading")
    except sqlite3.Error:
        counts = {}
    finally:
        store.close()
    return {f"{d:08x}": n for d, n in counts.items()}


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
            truth = vb.status()["world"] if vb.proc.poll() is None else {}
            rows.append({"id": name, "device_id": hexid, "role": vb.role, "readings_made": made.get(hexid, 0),
                         "readings_at_broker": len(cloud.readings.get(hexid, ())),
                         "alarms": sorted(a for a, on in cloud.alarms.get(hexid, {}).items() if on),
                         "world_truth": truth})
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
