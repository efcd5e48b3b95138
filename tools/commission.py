"""prapa commission: give a flashed board its identity, key and role config, and prove it works.

Why it is shaped like this:
- Everything that can be refused is refused before the board or the registry
  is touched: the config is validated on the host with the board's own
  checks (protocol/config.py and the role's spec), so the board can never
  boot into an idle state the host could have foreseen.
- The key is made here (secrets), goes to the board through mpremote's raw
  REPL (library calls: never a process argument, never a file on the host)
  and to the registry; it is printed nowhere. Files are written as siblings
  and renamed on the board, so a pulled cable leaves each file old or new.
- The live sensor check is declared in the role's spec (protocol/roles/):
  the status counter that must rise, what to ask of the installer, how to
  judge the rise. Nothing here names a role.

Exit codes: 0 ok, 1 a step or live check failed (the board is commissioned,
the output says what to fix), 2 bad input (nothing written anywhere).
"""

import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from protocol.roles import catalog as roles
from protocol.errors import BoardError, UsageError
from tools.console import ConsoleReader, parse_banner, parse_idle, parse_key_values
from tools.console import parse_status as parse_status_line
from tools.role_config import build_config, parse_device_id

BOOT_TIMEOUT_S = 20
ROUND_TRIP_TIMEOUT_S = 30
ROUND_TRIP_COUNTERS = 64        # pings every 3 s and a time sync per hello for 30 s need far fewer


# -- the role's sensor check: declared in its spec (COMMISSION_*), run here for every role ----------
STATUS_QUERY = ("import runtime\nrt = runtime.current\nif rt is None or rt.role is None:\n print('app=stopped')\n"
                "else:\n{prepare} print(' '.join('%s=%s' % kv for kv in sorted(rt.role.status().items())))\n")


# -- the board over USB (mpremote as a library) -----------------------------------------------------

class BoardLink:
    """One console connection at a time; the app is stopped while we talk and restarted by reset()."""

    def __init__(self, port):
        from mpremote.transport_serial import SerialTransport
        self.port = port
        try:
            # A read timeout, unlike mpremote's default of none: on a pty mpremote reads without
            # checking for data first, so a board that never answers would hang us for good.
            self.t = SerialTransport(port, exclusive=True, timeout=1)
        except Exception as e:       # pyserial and mpremote raise several kinds for busy/vanished ports
            raise BoardError(port, f"cannot open it ({e})",
                             "close other programs using it (mpremote, screen, the gateway) and retry") from None

    stopped = False          # the app was interrupted and waits for reset()

    def exec(self, code, soft_reset=True):
        self.stopped = True
        try:
            self.t.enter_raw_repl(soft_reset=soft_reset)
            out = self.t.exec(code).decode(errors="replace")
            self.t.exit_raw_repl()
            return out
        except Exception as e:
            raise BoardError(self.port, f"the board did not run a command ({e})",
                             "check the USB cable; is MicroPython with the prapa app flashed? (prapa flash)") from None

    def read_identity(self):
        out = self.exec("import os, json\nb = json.load(open('board.json'))\nc = None\nk = 0\n"
                        "try:\n c = json.load(open('config.json')).get('device_id')\nexcept Exception:\n pass\n"
                        "try:\n k = os.stat('device.key')[6]\nexcept OSError:\n pass\n"
                        "print(json.dumps({'board': b, 'device_id': c, 'key_bytes': k}))")
        return json.loads(out.strip().splitlines()[-1])

    def write_atomically(self, files):
        """Write every (name, bytes) as name.new, then rename them all: each file is old or new after a cut."""
        self.stopped = True
        try:
            for name, data in files:
                self.t.enter_raw_repl(soft_reset=False)
                self.t.fs_writefile(name + ".new", data)
            self.t.exec("import os\n" + "".join(f"os.rename({n + '.new'!r}, {n!r})\n" for n, _ in files))
            self.t.exit_raw_repl()
        except Exception as e:
            raise BoardError(self.port, f"writing to the board failed ({type(e).__name__})",
                             "check the USB cable and run the command again") from None

    def reset_and_watch(self, timeout_s=BOOT_TIMEOUT_S):
        """Hard-reset the board; return (banner, status line or idle line) from its console (None: not seen)."""
        try:
            self.t.enter_raw_repl(soft_reset=False)
            self.t.exec_raw_no_follow("import machine\nmachine.reset()")
            self.stopped = False
        except Exception as e:
            raise BoardError(self.port, f"the board did not take the reset ({e})", "press its EN/RST button") from None
        console = ConsoleReader(self.t.serial, follow=False)     # reads only here: mpremote keeps the port
        try:
            i, _ = console.wait_for(lambda line: parse_status_line(line) or parse_idle(line), timeout=timeout_s)
        except BoardError:
            i = None
        banner = console.search(parse_banner, before=i)
        return (console.lines[banner[0]] if banner else None), (None if i is None else console.lines[i])

    def close(self):
        """Leave the board running its app, whatever step stopped it."""
        try:
            if self.stopped:
                self.reset_and_watch(timeout_s=0)
        except BoardError:
            pass
        try:
            self.t.close()
        except Exception:
            pass


# -- the command ------------------------------------------------------------------------------------

class Steps:
    """Prints each step as it ends (ok/FAIL, seconds, the fix), or one JSON object per step."""

    def __init__(self, as_json):
        self.as_json, self.t0, self.failed, self.records = as_json, time.monotonic(), False, []

    def run(self, name, fn):
        t = time.monotonic()
        if not self.as_json:
            print(f"  {name} ...", end="", flush=True)
        try:
            ok, detail, fix, value = fn()
        except BoardError as e:
            ok, detail, fix, value = False, e.problem, e.fix, None
        self.report(name, ok, detail, fix, time.monotonic() - t, started=True)
        return value if ok else None

    def report(self, name, ok, detail, fix="", seconds=0.0, started=False):
        self.failed |= ok is False
        rec = {"step": name, "ok": ok, "s": round(seconds, 2), "detail": detail}
        if fix and ok is False:
            rec["fix"] = fix
        self.records.append(rec)
        if self.as_json:
            print(json.dumps(rec), flush=True)
        else:
            status = {True: "ok", False: "FAIL", None: "skipped"}[ok]
            print("" if started else f"  {name} ...", end="")
            print(f" {status} ({seconds:.1f} s): {detail}" + (f"\n      fix: {fix}" if fix and ok is False else ""),
                  flush=True)

    def total_s(self):
        return time.monotonic() - self.t0


def add_parser(sub):
    p = sub.add_parser("commission", help="give a board its device id, key and config; run live checks",
                       description=__doc__.split("\n\n")[0] + "\n\nValidates the role config on this machine, "
                       "writes /config.json and a fresh /device.key over USB, records the device in the gateway "
                       "registry (--registry) or an export file for `prapa gateway devices import` (--export), "
                       "then checks live: the console shows the device, the sensor reads, and (with "
                       "--uart-port) a ping round trip through the gateway's session layer. The key is never "
                       "printed.")
    p.add_argument("--port", required=True, help="the board's USB console port (e.g. /dev/ttyUSB0)")
    p.add_argument("--role", required=True, help="the board's role: " + ", ".join(roles.available()))
    p.add_argument("--device-id", required=True, help="unique id, 1..4294967294 (decimal or 0x...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE.json", help="role config as on the board (sections: role, link, ...)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set one config value, e.g. link.addr=3 or ROLE.KEY=VALUE (repeatable; applied over --config)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--registry", metavar="PATH", help="the gateway's registry.db (when run on the gateway)")
    dest.add_argument("--export", metavar="FILE", help="write a 0600 export file for: prapa gateway devices import")
    p.add_argument("--name", help="a name for the device in the registry (e.g. its street address)")
    p.add_argument("--uart-port", metavar="U", help="the board's data link: run a ping round trip through it")
    p.add_argument("--sensor-wait", type=float, metavar="S",
                   help="without a terminal or with --yes: seconds the sensor check waits (default 30)")
    p.add_argument("--yes", action="store_true", help="no questions: replace an existing identity, no prompts")
    p.add_argument("--json", action="store_true", help="one JSON object per step, then a summary")
    p.set_defaults(func=cmd_commission)


def _check_inputs(args):
    """Every refusal that needs neither the board nor a write; returns (device_id, cfg)."""
    device_id = parse_device_id(args.device_id)
    cfg = build_config(args.role, device_id, args.config, args.set)
    for flag, port in (("--port", args.port), ("--uart-port", args.uart_port)):
        if port is not None and not os.path.exists(port):
            raise UsageError(flag, f"{port}: no such port", "plug the board in and give its port "
                             "(see: ls /dev/ttyUSB* /dev/ttyACM*, or the virtual board's board_ready event)")
    if args.registry is not None:
        if not Path(args.registry).is_file():
            raise UsageError("--registry", f"no registry at {args.registry}",
                             "give the gateway's registry.db (data_dir in gateway.toml), or use --export FILE")
        from gateway.registry import Registry
        reg = Registry(args.registry)
        try:
            if reg.get(device_id) is not None:
                raise UsageError("--device-id", f"{device_id} is already in {args.registry}",
                                 "pick a free id (see: prapa gateway devices list); a board keeps its id for life")
        finally:
            reg.close()
    else:
        out = Path(args.export)
        if out.exists():
            raise UsageError("--export", f"{out} exists", "give a new file name; an export holds a key and is "
                             "never overwritten")
        if not out.parent.is_dir():
            raise UsageError("--export", f"no folder {out.parent}", "create it or give another path")
    if args.sensor_wait is not None and args.sensor_wait < 0:
        raise UsageError("--sensor-wait", f"{args.sensor_wait} is negative", "give seconds, 0 or more")
    return device_id, cfg


def _confirm(args, question):
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("--yes", question, "pass --yes to go ahead")
    if input(f"{question} Replace it? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("--yes", "the installer declined", "nothing was written")


def cmd_commission(args):
    device_id, cfg = _check_inputs(args)
    key = secrets.token_bytes(16)
    steps = Steps(args.json)
    if not args.json:
        print(f"commissioning device {device_id} ({args.role}) on {args.port}")
    board = BoardLink(args.port)         # a BoardError here: prapa prints it, exit 1
    tmp = tempfile.TemporaryDirectory(prefix="prapa-commission-")
    reg = None
    try:
        ident = steps.run("board answers", lambda: _identity(board, args))
        if ident is None:
            return 1
        if ident["key_bytes"] or ident["device_id"] is not None:
            _confirm(args, f"{args.port} is already commissioned (device {ident['device_id']}).")
        files = [("device.key", key), ("config.json", json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())]
        if steps.run("config and key written", lambda: (board.write_atomically(files) or True,
                                                        "config.json, device.key (renamed into place)", "", 1)) is None:
            return 1
        from gateway.registry import Registry
        reg = Registry(args.registry or Path(tmp.name) / "registry.db")
        reg.add(device_id, args.role, key, name=args.name, board=ident["board"].get("name"))
        # The round trip's downlink counters are reserved before the export is written, so the
        # gateway that imports it starts above them: a (key, nonce) pair never repeats.
        counters = iter(reg.next_downlink_counters(device_id, ROUND_TRIP_COUNTERS))
        if args.export:
            reg.export_device(device_id, args.export)
        steps.report("registry", True, f"device {device_id} in {args.registry}" if args.registry else
                     f"{args.export} (mode 0600; on the gateway: prapa gateway devices import {args.export} "
                     "--registry PATH, then delete it)")
        status = steps.run("console shows the device", lambda: _boot_check(board, device_id))
        _sensor_step(steps, board, args, cfg, ident["board"], status)
        _round_trip_step(steps, board, args, device_id, key, counters, tmp.name)
    finally:
        board.close()
        if reg is not None:
            reg.close()
        tmp.cleanup()
    total = steps.total_s()
    if args.json:
        print(json.dumps({"device_id": device_id, "role": args.role, "ok": not steps.failed,
                          "total_s": round(total, 2)}))
    else:
        print(f"device {device_id} commissioned in {total:.1f} s" + (": every check passed" if not steps.failed
                                                                     else ": a check FAILED (see the fix above)"))
    return 1 if steps.failed else 0


def _identity(board, args):
    ident = board.read_identity()
    built_for = ident["board"].get("role")
    if built_for != args.role:
        raise UsageError("--role", f"{args.role!r} but the board's image was built for {built_for!r}",
                         f"use --role {built_for}, or build and flash the {args.role} image (prapa build/flash)")
    return True, f"{ident['board'].get('name')} ({built_for})", "", ident


def _boot_check(board, device_id):
    banner, line = board.reset_and_watch()
    if line is None:
        return False, "no status line on the console after the reset", "check the cable; watch: mpremote repl", None
    idle = parse_idle(line)
    if idle:
        return False, f"board idle: {idle['field']}: {idle['problem']}", (
            f"{idle['fix']}; then run prapa commission again"), None
    status = parse_status_line(line)
    if status["device_id"] != device_id:
        return False, f"board says device={status['device_id']}", (
            "the files did not take: run prapa commission again"), None
    return True, line, "", status


def _sensor_step(steps, board, args, cfg, board_def, status):
    """The spec names a status counter that must rise while the installer works the sensor, what to
    ask of them, what to say when it rose and the fix when it did not; the role's prepare method
    (e.g. a checkpoint) runs on the board before the count is read."""
    spec = roles.spec(args.role)
    counter = getattr(spec, "COMMISSION_COUNTER", None)
    if counter is None or status is None:
        steps.report("sensor reads", None, "no live check for this role" if counter is None else "board not running")
        return
    section = cfg[args.role]
    if not args.json:
        print(f"  -> {spec.COMMISSION_ASK % section}", flush=True)
    if not args.yes and sys.stdin.isatty():
        input("     press Enter when it has ")
    else:
        _countdown(spec.COMMISSION_WAIT_S if args.sensor_wait is None else args.sensor_wait, "sensor", args.json)
    method = getattr(spec, "COMMISSION_PREPARE", None)
    prepare = f" rt.role.{method}()\n" if method else ""

    def query():
        # resume, not soft reset: the app's live state (runtime.current) is what is read
        after = parse_key_values(board.exec(STATUS_QUERY.format(prepare=prepare), soft_reset=False))
        if "app" in after:
            return False, "the app was not running", "check the console: mpremote connect PORT repl", None
        before_n, after_n = int(status.get(counter, 0)), int(after.get(counter, 0))
        words = {**board_def.get("role_pins", {}), **section, "rise": after_n - before_n}
        if after_n > before_n:
            return True, spec.COMMISSION_SEEN % words, "", after
        return False, f"{counter} stayed {before_n}", spec.COMMISSION_FIX % words, after
    steps.run("sensor reads", query)


def _countdown(seconds, what, quiet):
    if quiet or seconds < 1:
        time.sleep(max(0.0, seconds))
        return
    from rich.console import Console
    from rich.progress import Progress
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"waiting for the {what}", total=seconds)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
            progress.update(task, completed=seconds - max(0.0, left))


class _Reserved:
    """protocol.secure's counters interface over a block the registry has made durable."""

    def __init__(self, counters):
        self.counters = counters

    def next(self):
        return next(self.counters)


def _round_trip_step(steps, board, args, device_id, key, counters, tmpdir):
    """The board restarts with the link watched, says hello, and answers a ping with the new key.

    Nothing is acknowledged: the board keeps every reading for the gateway."""
    if args.uart_port is None:
        board.reset_and_watch()        # leave the app running after the sensor query stopped it
        steps.report("gateway round trip", None, "no --uart-port: check the device on the gateway's status page")
        return
    from gateway.harness import OneLinkGateway

    def trip():
        try:   # acknowledge=False: readings are verified and dropped, the board keeps them for the gateway
            gateway = OneLinkGateway(args.uart_port, Path(tmpdir) / "store.db", {device_id: key},
                                     counters=lambda d: _Reserved(counters), acknowledge=False)
        except OSError as e:
            raise BoardError(args.uart_port, f"cannot open the data link ({e})",
                             "close other programs using it (the gateway service, prapa monitor) and retry") from None
        with gateway:
            board.reset_and_watch()
            end = time.monotonic() + ROUND_TRIP_TIMEOUT_S
            d = gateway.wait_hello(device_id, ROUND_TRIP_TIMEOUT_S)
            pong = d and gateway.ping(device_id, timeout=max(0.0, end - time.monotonic()), resend_s=3)
            if pong:
                return True, f"hello (firmware {d.firmware}), ping -> {pong}", "", True
            seen = "no hello" if d is None else "hello but no answer to ping"
            refused = gateway.refused()
            return False, f"{seen} within {ROUND_TRIP_TIMEOUT_S} s (refused: {refused or 'none'})", (
                "check the link wiring to --uart-port (TX/RX crossed, ground) and that nothing else holds the port"
                if not refused else "frames were refused: the board may hold another key; commission again"), None
    steps.run("gateway round trip", trip)
