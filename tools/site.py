"""prapa site: a whole simulated site on this machine, the stack's main job.

A real Mosquitto, the gateway service (`prapa gateway run`, as on a Pi), and
virtual boards (one of each role that exists, the rest of the first role: see site_plan) running the firmware on
the real MicroPython VM with the world simulator, commissioned with their own
keys. The gateway's status page (devices, alarms, backlog, live charts) is
printed as a URL and opened in a browser unless --headless; the terminal shows
a compact summary. A real QoS 1 subscriber counts what reaches the broker, and the
reference consumer (`prapa ledger`, tools/ledger.py) stands in for the cloud beside
it: it checks every message against the northbound contract and keeps the readings,
and when the site stops it prints the billing export of this month for each meter
beside the world's true consumption (report: "billing" and "contract").

The site supervises the broker and the gateway as systemd's Restart=on-failure
would: one that dies (any exit, or a signal) is reported (broker_died,
gateway_died, with its exit code or signal) and started again on the same
ports, data_dir and registry after a delay doubling from 0.5 s to 8 s; one that
dies more than --restart-limit times within a minute has failed for good and
stops the site. The boards run on through a restart: their flash logs hold the
readings until the gateway is back.

Ctrl-C (or SIGTERM, or --duration) stops everything and leaves nothing running.
However the site ends, it writes its report (every board's figures, every
restart with its time and cause, and how it ended: duration, signal or failed)
to report.json in its folder and to --report, and says site_stopped.

exit codes: 0 the site ran until --duration or a signal, 1 a component failed
for good or the site itself failed, 2 bad arguments (refused before anything
is created or started).
"""

import argparse
import json
import math
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

SITE = "demo"
FIRST_DEVICE_ID = 0x2001
RESTART_FIRST_S, RESTART_MAX_S = 0.5, 8.0   # RestartSec, doubling per restart within the window
RESTART_WINDOW_S = 60.0                     # StartLimitIntervalSec
START_TIMEOUT_S = 30.0                      # TimeoutStartSec: a restarted child not up by then is killed


def add_parser(sub):
    p = sub.add_parser("site", help="run a simulated site: broker, gateway, virtual boards, live view",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boards", type=int, default=8,
                   help="number of virtual boards: the boards each other role's world asks for (one doser, a "
                        "catchment of four drains), the rest of the first role, the meter (default 8)")
    p.add_argument("--speed", type=int, default=60,
                   help="board time runs this many times faster (default 60: an hour a minute)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--headless", action="store_true", help="no browser, no live view; JSON events on stdout")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report (see above) here")
    p.add_argument("--board", default="esp32-devkitc", help="board definition of the virtual boards")
    p.add_argument("--workdir", metavar="DIR", help="keep the site's files here (default: a new temp folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp folder when the site stops (default: removed, unless the site failed)")
    p.add_argument("--restart-limit", type=int, default=5, metavar="N",
                   help="restarts of the broker or the gateway allowed within a minute before it has failed "
                        "for good (default 5; 0: never restart)")
    from tools.sim import vm as vms
    vms.add_argument(p)
    p.set_defaults(func=run)


def _log(event, **fields):
    from gateway.logs import json_line
    print(json_line(event, stamp=True, **fields), flush=True)


class Cloud:
    """The cloud side: a QoS 1 subscriber with a persistent session, counting identities per device.

    It subscribes on every connect: a broker killed before it saved its sessions forgets the subscription."""

    def __init__(self, port):
        import paho.mqtt.client as mqtt
        self.readings, self.alarms, self.first_at, self.suspects = {}, {}, None, {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="prapa-site-cloud", clean_session=False)
        self.client.on_connect = lambda client, *_: client.subscribe(f"prapa/v1/{SITE}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)      # back soon after a broker restart
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg):
        import cbor2
        if msg.topic.endswith("/suspects"):          # the gateway's retained ranking of a catchment: JSON
            try:
                body = json.loads(msg.payload) if msg.payload else {}
            except ValueError:
                return
            with self.lock:
                if body.get("catchment"):
                    self.suspects[body["catchment"]] = body.get("suspects", [])
            return
        try:
            body = cbor2.loads(msg.payload)
        except (cbor2.CBORError, ValueError):      # not CBOR: skipped, the subscriber goes on
            return
        if not isinstance(body, dict):
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

    def readings_count(self):
        with self.lock:
            return sum(len(ids) for ids in self.readings.values())

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def site_roles(board_def):
    """The roles a site runs: every role with a spec, a world model, and room on this board."""
    from protocol.roles import catalog as roles
    from tools.sim import worlds
    return [r for r in roles.available() if worlds.site_board_for(r) and r in board_def.roles_fit]


def site_plan(kinds, boards, wanted=None):
    """The role of each of `boards` boards: every role but the first (in the registry's order) gets the
    boards its world asks for (wanted {role: n}, its SITE_BOARDS; default one) while there is room, the
    first role gets the rest, and at least one; the first role's boards come first.

    A site is mostly the first role (the meter: a town's households) with the other kinds beside it (a
    doser for the whole plant, a catchment of drains along a street), not the roles in turn."""
    others = [role for role in kinds[1:] for _ in range((wanted or {}).get(role, 1))][:max(0, boards - 1)]
    return [kinds[0]] * (boards - len(others)) + others


def site_wanted(kinds):
    """{role: boards its world wants at a site} (its module's SITE_BOARDS, default 1)."""
    from tools.sim import worlds
    return {role: getattr(worlds.ROLE_WORLDS[role], "SITE_BOARDS", 1) for role in kinds}


def check_args(args):
    """Every argument, before anything is created or started: (board definition, plan, VM) or UsageError."""
    from protocol.errors import UsageError
    from tools import boards as board_defs
    from tools.broker import mosquitto_exe
    from tools.sim import vm as vms
    if not 1 <= args.boards <= 64:
        raise UsageError("--boards", f"{args.boards} is out of range", "give 1 to 64 boards")
    if not 1 <= args.speed <= 1000:
        raise UsageError("--speed", f"{args.speed} is out of range", "give 1 to 1000")
    if not 0 <= args.duration < math.inf:          # NaN fails too
        problem = "negative" if args.duration < 0 else "not a finite number"
        raise UsageError("--duration", f"{args.duration:g} is {problem}",
                         "give 0 (run until Ctrl-C) or a positive number of seconds")
    if not 0 <= args.restart_limit <= 100:
        raise UsageError("--restart-limit", f"{args.restart_limit} is out of range", "give 0 to 100 restarts")
    if args.workdir and Path(args.workdir).exists() and not Path(args.workdir).is_dir():
        raise UsageError("--workdir", f"{args.workdir} is a file", "give a folder, new or existing")
    if args.report and (Path(args.report).is_dir() or not Path(args.report).resolve().parent.is_dir()):
        raise UsageError("--report", f"cannot write a file at {args.report}",
                         "give a file path in an existing folder")
    vm = vms.resolve(getattr(args, "vm", None))
    vms.micropython_exe(vm)                  # an unknown or unbuilt VM is refused before anything starts
    board_def = board_defs.load(args.board)
    kinds = site_roles(board_def)
    if not kinds:
        raise UsageError("--board", f"no role with a world model fits {board_def.name}", "pick another board")
    try:
        mosquitto_exe()
    except FileNotFoundError:
        raise UsageError("mosquitto", "not installed", "run ./dev setup (it installs the Debian package)") from None
    return board_def, site_plan(kinds, args.boards, site_wanted(kinds)), vm


def run(args):
    """The site in --workdir, or in a new temp folder removed when the site stops: kept with --keep,
    or when the site failed (its logs and report say why), and then printed."""
    board_def, plan, vm = check_args(args)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="prapa-site-")
    workdir = Path(args.workdir or tmp).resolve()
    keep = bool(args.workdir or args.keep)
    code = 1
    try:
        code = Site(args, workdir).run(board_def, plan, vm)
        return code
    finally:
        if not keep and code == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        elif workdir.exists():
            print(f"prapa site: its files are in {workdir}", file=sys.stderr)


class Supervised:
    """One child the site keeps running, as systemd's Restart=on-failure with StartLimitBurst=limit in
    StartLimitIntervalSec=60 would: after a death the next start waits 0.5 s, doubling per restart within
    the window up to 8 s; the death after `limit` restarts within the window is failure for good.

    proc() is the child's current Popen, launch() starts a new one (it may raise: the next poll sees the
    death), ready() says a launched child has come up; log is where it writes why it died."""

    def __init__(self, name, proc, launch, ready, limit, log):
        self.name, self.proc, self.launch, self.ready, self.limit, self.log = name, proc, launch, ready, limit, log
        self.restart_times = []
        self.due = self.cause = self.note = self.pending = None     # pending: the restart not yet up
        self.died_at = 0.0
        self.launched_at = 0.0

    def delay_s(self, now):
        """Seconds before the next restart, or None: failed for good."""
        recent = sum(1 for t in self.restart_times if now - t < RESTART_WINDOW_S)
        return None if recent >= self.limit else min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** recent)


def _exit_fields(code):
    if code < 0:
        name = signal.Signals(-code).name
        return {"exit_code": None, "signal": name}, f"killed by {name}"
    return {"exit_code": code, "signal": None}, f"exit {code}"


class Site:
    """The site's children and its record: started by run(), always stopped and reported by it."""

    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.broker = self.gateway = self.cloud = self.url = self.ledger = None
        self.plan_sections = {}                     # device -> its role's config section (the K-factor)
        self.plan_worlds, self.plan_limits = {}, {}  # device -> its world overrides; hex id -> a pump's hard limits
        self.boards, self.restarts, self.supervised = [], [], []
        self.ended, self.failed = "failed", None    # until the site says otherwise; the component failed for good
        self.stopped_by = None
        self.stopping = threading.Event()
        self.started = time.monotonic()

    def _on_signal(self, signum, _frame):
        self.stopped_by = signal.Signals(signum).name
        self.stopping.set()

    def run(self, board_def, plan, vm):
        from protocol.errors import UsageError
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)    # it will hold device keys
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        code = 1
        try:
            started = self._start(board_def, plan, vm)
            code = self._supervise() if started is None else started
        except UsageError:                      # a board that did not start (BoardError): the CLI says so
            raise
        except Exception as exc:                # a bug in the site: a report and one line, the traceback kept
            where = self.workdir / "site-error.txt"
            where.write_text(traceback.format_exc())
            _log("site_error", error=f"{type(exc).__name__}: {exc}", traceback=str(where))
        finally:
            report = self._stop()
            for s, handler in old.items():
                signal.signal(s, handler)
            text = json.dumps(report, indent=2)
            (self.workdir / "report.json").write_text(text)
            if self.args.report:
                Path(self.args.report).write_text(text)
            _log("site_stopped", ended=self.ended, failed=self.failed, restarts=len(self.restarts), **report["totals"])
        return code

    def _start(self, board_def, plan, vm):
        """Broker, cloud, boards, gateway; None when all are up, else the exit code (a signal came first: 0,
        the gateway did not start: 1)."""
        from tools import image
        from tools.broker import Broker, free_port
        from tools.gateway_process import GatewayProcess, register, write_config
        from tools.sim.board import TICKS_PERIOD_MS, prepare_flash
        from tools.sim import worlds
        from tools.sim.process import BoardProcess

        args, workdir = self.args, self.workdir
        # autosave every second: a broker killed keeps the cloud's subscription and queue but the last second
        self.broker = Broker(workdir / "broker", extra_conf=("autosave_interval 1",))
        _log("broker_started", host=self.broker.host, port=self.broker.port, pid=self.broker.proc.pid)
        self.cloud = Cloud(self.broker.port)
        from tools.ledger import Ledger
        self.ledger = Ledger(workdir / "ledger.db", SITE, port=self.broker.port, client_id="prapa-site-ledger",
                             heal_every_s=2.0).start()     # a broker killed by the site's user: replays fill it
        keys, names, device_roles, places = {}, {}, {}, {}
        for i, role in enumerate(plan):
            if self.stopping.is_set():
                self.ended = "signal"
                return 0
            n = plan[:i].count(role)                 # the n-th board of its role
            device_id = FIRST_DEVICE_ID + i
            name = f"{role}-{n + 1:03d}"
            key = secrets.token_bytes(16)
            flash = workdir / f"{name}.img"
            prepare_flash(board_def, role, flash)
            section, world = worlds.site_board_for(role)(n)
            self.plan_sections[device_id] = section
            self.plan_worlds[device_id] = list(world)
            limits = getattr(worlds.ROLE_WORLDS[role], "SITE_LIMITS", None)           # a pump's hard limits
            if limits:
                self.plan_limits[f"{device_id:08x}"] = dict(limits)
            image.provision(board_def, flash, {"device_id": device_id, "role": role, role: section}, key, limits)
            keys[device_id], names[device_id], device_roles[device_id] = key, name, role
            site_place = getattr(worlds.ROLE_WORLDS[role], "site_place", None)     # where it is (a drain's catchment)
            if site_place is not None:
                places[device_id] = site_place(n)
            # a campaign (tools/campaign.py) starts every other board one second before its 2**30 ms tick wrap
            wrap = getattr(args, "wrap_ticks", False) and i % 2 == 1
            vb = BoardProcess(args.board, role, flash, speed=args.speed, seed=i, world=world, vm=vm,
                              start_ticks_ms=TICKS_PERIOD_MS - 1000 if wrap else 0)
            self.boards.append((name, device_id, vb))
            _log("board_started", device=name, id=f"{device_id:08x}", uart=vb.uart_port, console=vb.console_port,
                 vm=vb.vm)
        http_port = free_port()
        config = write_config(workdir, [vb.uart_port for _n, _d, vb in self.boards], self.broker.port, site=SITE,
                              http_port=http_port,
                              extra="\n[store]\nmin_free_mb = 50\n" + getattr(args, "gateway_extra", ""),
                              sync_interval_s=3600, simulate_speed=args.speed)   # one calendar for boards and gateway
        register(workdir, keys, names=names, board=board_def.name, roles=device_roles, places=places)
        self.keys = keys                  # in memory only (a campaign's bus attacker holds a stolen board's key)
        self.gateway = GatewayProcess(config, log_path=workdir / "gateway.log",      # a campaign's rig may wrap it
                                      entry=getattr(args, "gateway_entry", "tools.cli")).start()
        try:
            self.gateway.wait_started()
        except AssertionError as exc:               # it exited, or stayed silent: its log says why
            self.failed = "gateway"
            _log("gateway_failed", problem=str(exc), log=str(workdir / "gateway.log"))
            return 1
        self.url = f"http://127.0.0.1:{http_port}/"
        _log("gateway_started", status_page=self.url, metrics=self.url + "metrics", pid=self.gateway.proc.pid)
        if not args.headless:
            print(f"status page: {self.url}   (Ctrl-C stops everything)", file=sys.stderr)
            import webbrowser
            threading.Timer(1.5, webbrowser.open, args=(self.url,)).start()
        broker, gateway, limit = self.broker, self.gateway, args.restart_limit
        self.supervised = [Supervised("broker", lambda: broker.proc, broker.restart, lambda: True, limit,
                                      broker.workdir / "mosquitto.log"),
                           Supervised("gateway", lambda: gateway.proc, gateway.start, gateway.started, limit,
                                      gateway.log_path)]
        return None

    def _supervise(self):
        """Until --duration or a signal (exit 0) or a component failed for good (exit 1)."""
        args, next_view = self.args, 0.0
        while True:
            now = time.monotonic()
            if self.stopping.is_set():
                self.ended = "signal"
                return 0
            if args.duration and now - self.started >= args.duration:
                self.ended = "duration"
                return 0
            for component in self.supervised:
                if not self._watch(component, now):
                    self.ended = "failed"
                    return 1
            if not args.headless and now >= next_view:
                _live_view(self.boards, self.cloud, self.workdir, now - self.started, self.url, self.restarts)
                next_view = now + 1.0
            self.stopping.wait(0.1)

    def _watch(self, c, now):
        """One look at a supervised component: note it came up, or died, or start it again when due.
        False: it has failed for good."""
        if self.stopping.is_set():          # Ctrl-C reaches the children too: their deaths are the stop
            return True
        proc = c.proc()
        if c.due is not None:
            if now >= c.due:
                c.due, c.launched_at = None, now
                c.restart_times.append(now)
                c.pending = {"component": c.name, "cause": c.cause, "died_at_s": round(c.died_at - self.started, 2),
                             "at_s": round(now - self.started, 2), "ts": round(time.time(), 3)}
                self.restarts.append(c.pending)
                try:
                    c.launch()
                except Exception as exc:            # it did not come up: the next look sees it dead
                    c.note = f"did not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            return True
        code = proc.poll()
        if code is None:
            if c.pending is not None and c.ready():
                c.pending.update(up_at_s=round(now - self.started, 2), readings_at_broker=self.cloud.readings_count())
                _log(f"{c.name}_restarted", pid=proc.pid, restarts=len(c.restart_times))
                c.pending = None
            elif c.pending is not None and now - c.launched_at > START_TIMEOUT_S:
                c.note = f"did not start within {START_TIMEOUT_S:.0f} s"
                proc.kill()
            return True
        fields, cause = _exit_fields(code)
        c.cause, c.note, c.pending, c.died_at = c.note or cause, None, None, now
        delay = c.delay_s(now)
        _log(f"{c.name}_died", pid=proc.pid, **fields, cause=c.cause, restart_in_s=delay, log=str(c.log))
        if delay is None:
            self.failed = c.name
            _log(f"{c.name}_failed", restarts=len(c.restart_times), limit=c.limit, window_s=RESTART_WINDOW_S,
                 problem=f"died again after {c.limit} restarts within {RESTART_WINDOW_S:.0f} s")
            return False
        c.due = now + delay
        return True

    def _stop(self):
        """Count, then stop everything (each step whatever the others did); the report."""
        report = None
        try:
            up = self.supervised and all(c.due is None and c.proc().poll() is None for c in self.supervised)
            if up and self.ended != "failed":
                _drain(self.workdir, self.cloud, timeout_s=5.0)
                _drain_ledger(self.workdir, self.ledger, timeout_s=5.0)
            bill = _ledger_export(self.ledger)       # before the world's truth: the world is never behind it
            report = _report(self.boards, self.cloud, self.workdir, self.started)
            report.update(_billing(report["boards"], bill, self.plan_sections, say=self.ended != "failed"))
        except Exception as exc:
            report = {"site": SITE, "workdir": str(self.workdir), "boards": [], "totals": {},
                      "report_error": f"{type(exc).__name__}: {exc}"}
        steps = [self.gateway.stop] if self.gateway is not None else []
        steps += [vb.close for _n, _d, vb in self.boards]
        steps += [self.cloud.close] if self.cloud is not None else []
        steps += [self.ledger.stop] if self.ledger is not None else []
        steps += [self.broker.stop] if self.broker is not None else []
        for step in steps:
            try:
                step()
            except Exception as exc:
                _log("site_stop_error", step=getattr(step, "__qualname__", str(step)), error=str(exc))
        return {"ended": self.ended, "failed": self.failed, "signal": self.stopped_by,
                "seconds": round(time.monotonic() - self.started, 2), **report, "restarts": self.restarts}


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


def _drain_ledger(workdir, ledger, timeout_s):
    """Let the ledger commit every reading the gateway holds before billing."""
    end = time.monotonic() + timeout_s
    while ledger is not None and time.monotonic() < end:
        if ledger.counts()["stored_readings"] >= sum(_stored(workdir).values()):
            return
        time.sleep(0.2)


BILLING_TZ = "+07:00"


def _ledger_export(ledger):
    """The ledger's billing export of this month (the town's time: the month of the newest reading, as board
    time runs ahead of the wall clock at --speed), each device's newest register and the contract counts, in
    one look (its ingest waits meanwhile); None without a ledger."""
    if ledger is None:
        return None
    import datetime as dt
    from tools import ledger as L
    try:
        tz = L.parse_tz(BILLING_TZ)
        with ledger.store.lock:
            newest_t = ledger.store.newest_wall_t()
            period = (dt.datetime.now(tz) if newest_t is None else dt.datetime.fromtimestamp(newest_t, tz)) \
                .strftime("%Y-%m")
            export = L.billing(ledger.store, period, tz)
            newest = {r["device"]: ledger.store.newest(r["device"]) for r in export["rows"]}
            counts = ledger.counts()
    except Exception as exc:                       # the report stays whole: the error is one of its fields
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"period": period, "export": export, "newest": newest, "counts": counts}


def _billing(rows, bill, sections, say=True):
    """{"billing": [...], "contract": {...}}: the ledger's export of this month (the town's time) for each
    board whose role keeps a register, beside what its world really ran (pulses x the board's K-factor:
    what a perfect counter counted); and what the ledger checked against the northbound contract. say: print
    the table (stderr) and the billing and contract events.

    The stated bound: billed <= world, and world - billed is the flow in the board minutes after its newest
    register (unbilled_min: the interval still open and what the board had not yet sent when the truth was
    read), plus at most checkpoint_pulses x k_factor_l per power cut (pulses a board never counted)."""
    if bill is None:
        return {}
    if "error" in bill:
        return {"billing_error": bill["error"]}
    from protocol.roles import catalog as roles
    from tools import ledger as L
    from tools.sim import worlds
    period = bill["period"]
    by_device = {r["device"]: r for r in bill["export"]["rows"]}
    billing = []
    for row in rows:
        role = row["role"]
        if role not in L.BILLED_ROLES:
            continue
        model, counter = getattr(worlds.ROLE_WORLDS[role], "TRUTH", (None, None))
        section = sections.get(int(row["device_id"], 16), {})
        k_l = section.get("k_factor_l", next((d for key, _k, d, *_ in roles.attr(role, "SCHEMA", ())
                                               if key == "k_factor_l"), 1))
        truth = (row.get("world_truth") or {}).get(model) or {}
        world_m3 = None if truth.get(counter) is None else round(truth[counter] * k_l / 1000, 3)
        b = by_device.get(row["device_id"], {})
        newest = bill["newest"].get(row["device_id"])
        unbilled_min = None if newest is None or truth.get("t_us") is None or newest[1] is None else \
            round((truth["t_us"] / 1e6 - newest[1]) / 60, 3)
        billing.append({"device": row["device_id"], "id": row["id"], "period": period, "tz": BILLING_TZ,
                        "from": b.get("from"),
                        "start_at": b.get("start_at"), "start_m3": b.get("start_m3"), "end_at": b.get("end_at"),
                        "end_m3": b.get("end_m3"), "consumption_m3": b.get("consumption_m3"),
                        "world_m3": world_m3, "readings": b.get("readings", 0), "gaps": b.get("gaps", []),
                        "exact": b.get("exact", False), "alarms": [a["name"] for a in b.get("alarms", ())
                                                                   if a["active"]],
                        "revision": b.get("revision", 0), "unbilled_min": unbilled_min})
    counts = bill["counts"]
    contract = {k: counts[k] for k in ("messages", "validated", "invalid", "undecodable", "by_kind",
                                       "stored_readings", "stored_alarms", "duplicates", "conflicts", "validator")}
    lines = [f"billing {period} ({BILLING_TZ}), from the ledger beside the world's truth:",
             f"{'board':10} {'device':9} {'start m3':>12} {'end m3':>12} {'billed m3':>10} {'world m3':>10}  gaps"]
    for r in billing:
        world = "-" if r["world_m3"] is None else f"{r['world_m3']:.3f}"
        gaps = f"{len(r['gaps'])} ({'all exact' if r['exact'] else 'NOT all exact'})"
        lines.append(f"{r['id']:10} {r['device']:9} {r['start_m3'] or '-':>12} {r['end_m3'] or '-':>12} "
                     f"{r['consumption_m3'] or '-':>10} {world:>10}  {gaps}")
    lines.append(f"contract: {contract['validated']} messages valid, {contract['invalid']} invalid "
                 f"(validator: {contract['validator']})")
    if not say:                                    # a failed site's last words are its failure: the report has these
        return {"billing": billing, "contract": contract}
    print("\n".join(lines), file=sys.stderr, flush=True)
    for r in billing:
        _log("billing", **{k: r[k] for k in ("device", "period", "start_m3", "end_m3", "consumption_m3",
                                             "world_m3", "exact")}, gaps=len(r["gaps"]))
    _log("contract", validated=contract["validated"], invalid=contract["invalid"], by_kind=contract["by_kind"])
    return {"billing": billing, "contract": contract}


def _world_truth(vb):
    """What the board's world really did, or {} if the board is gone or does not answer."""
    from protocol.errors import BoardError
    try:
        return vb.status()["world"] if vb.proc.poll() is None else {}
    except (OSError, ValueError, BoardError):
        return {}


def _report(boards, cloud, workdir, started):
    made = _stored(workdir)
    at_broker, alarms, first_at = {}, {}, None
    if cloud is not None:
        with cloud.lock:
            at_broker = {d: len(ids) for d, ids in cloud.readings.items()}
            alarms = {d: sorted(a for a, on in named.items() if on) for d, named in cloud.alarms.items()}
            first_at = cloud.first_at
    rows = []
    for name, device_id, vb in boards:
        hexid = f"{device_id:08x}"
        rows.append({"id": name, "device_id": hexid, "role": vb.role, "readings_made": made.get(hexid, 0),
                     "readings_at_broker": at_broker.get(hexid, 0), "alarms": alarms.get(hexid, []),
                     "world_truth": _world_truth(vb)})
    totals = {"boards": len(rows), "readings_made": sum(r["readings_made"] for r in rows),
              "readings_at_broker": sum(r["readings_at_broker"] for r in rows),
              "seconds_to_first_reading_at_broker": None if first_at is None else round(first_at - started, 2)}
    suspects = {}
    if cloud is not None:
        with cloud.lock:
            suspects = {c: [{k: e.get(k) for k in ("rank", "name", "id", "state", "score")} for e in entries]
                        for c, entries in cloud.suspects.items()}
    return {"site": SITE, "workdir": str(workdir), "boards": rows, "totals": totals, "catchments": suspects}


def _live_view(boards, cloud, workdir, elapsed, url, restarts):
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
        for catchment, entries in sorted(cloud.suspects.items()):
            top = ", ".join(f"{e.get('rank')}. {e.get('name')} ({e.get('state')})" for e in entries[:3]) or "-"
            lines += ["", f"catchment {catchment}, crews go first to: {top}"]
    if restarts:
        last = restarts[-1]
        lines += ["", f"restarts: {len(restarts)}, the last of the {last['component']} at {last['at_s']:.0f} s "
                      f"({last['cause']})"]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
