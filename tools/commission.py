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
- So is the rest a role may need at commissioning, and each is acted on only
  where the spec declares it: hard limits (LIMITS_PATH, LIMITS_SCHEMA: required
  then, checked on the host with the spec's check_limits_file and check_limits
  against the config, written with the config and key, over USB only), a
  console method run on the freshly booted role (COMMISSION_PRIME: e.g. the
  doser's prime), a config value calibrated from a measurement
  (COMMISSION_CALIBRATE: value = measured / count) and the live inputs shown
  with their ranges and fixes (COMMISSION_INPUTS, from the role's status()).

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
from tools.role_config import build_config, build_limits, check_within_limits, parse_device_id
from tools import args as types

BOOT_TIMEOUT_S = 20
INPUTS_SETTLE_S = 3             # the app runs this long after a boot before its live inputs are read
ROUND_TRIP_TIMEOUT_S = 30
ROUND_TRIP_COUNTERS = 64        # pings every 3 s and a time sync per hello for 30 s need far fewer


# -- the role's sensor check: declared in its spec (COMMISSION_*), run here for every role ----------
STATUS_QUERY = ("import runtime\nrt = runtime.current\nif rt is None or rt.role is None:\n print('app=stopped')\n"
                "else:\n{prepare} print(' '.join('%s=%s' % kv for kv in sorted(rt.role.status().items())))\n")
# The spec's COMMISSION_PRIME method on the role built from the config just written (the app is
# stopped by the raw REPL right after a reset into it, and its sampling timer here, which a board's
# hardware timer would otherwise keep running: only the method drives the outputs until the reset
# that follows); a refusal (ConfigError) comes back as its text.
PRIME_MOST_S = 25          # the longest prime a board makes (firmware: its watchdog's 30 s less a margin)
METHOD_CALL = ("import runtime\nrt = runtime.current\nif rt is None or rt.role is None:\n print('app=stopped')\n"
               "else:\n if rt.timer is not None:\n  rt.timer.stop()\n try:\n"
               "  print('made=%d' % rt.role.{method}({n}))\n except ValueError as e:\n  print('refused:', e)\n")


# -- the board over USB (mpremote as a library) -----------------------------------------------------

class BoardLink:
    """One console connection at a time; the app is stopped while we talk and restarted by reset().

    Between our commands the board stays in the raw REPL (no Ctrl-B back to the friendly one): the
    next command enters the raw REPL again at once, and a REPL that changes mode flushes input that
    arrives before its new prompt, which a fast follow-up would lose."""

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
    booted_at = 0.0          # time.monotonic() when the app was last seen starting

    def exec(self, code, soft_reset=True, timeout=10):
        """Run code in the raw REPL; timeout: the longest silence in s while it runs."""
        self.stopped = True
        try:
            self.t.enter_raw_repl(soft_reset=soft_reset)
            out, err = self.t.exec_raw(code, timeout=timeout)
        except Exception as e:
            raise BoardError(self.port, f"the board did not run a command ({e})",
                             "check the USB cable; is MicroPython with the prapa app flashed? (prapa flash)") from None
        err = err.decode(errors="replace").strip()
        if err:
            raise BoardError(self.port, f"the board did not run a command ({err.splitlines()[-1]})",
                             "is the prapa app for this role flashed? (prapa flash)")
        return out.decode(errors="replace")

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
        except Exception as e:
            raise BoardError(self.port, f"writing to the board failed ({type(e).__name__})",
                             "check the USB cable and run the command again") from None

    def reset_and_watch(self, timeout_s=BOOT_TIMEOUT_S):
        """Hard-reset the board; return (banner, status line or idle line) from its console (None: not seen)."""
        try:
            self.t.enter_raw_repl(soft_reset=False)
            # The plain raw REPL, not mpremote's raw paste: that waits for an acknowledgement a board
            # that resets at once may never send (its console output is cut by the reset).
            self.t.serial.write(b"import machine\nmachine.reset()\x04")
            self.stopped = False
        except Exception as e:
            raise BoardError(self.port, f"the board did not take the reset ({e})", "press its EN/RST button") from None
        console = ConsoleReader(self.t.serial, follow=False)     # reads only here: mpremote keeps the port
        try:
            i, _ = console.wait_for(lambda line: parse_status_line(line) or parse_idle(line), timeout=timeout_s)
        except BoardError:
            i = None
        banner = console.search(parse_banner, before=i)
        self.booted_at = time.monotonic()
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
                       "with its place if given (--location, --catchment: where the gateway maps and ranks it), "
                       "then checks live: the console shows the device, the sensor reads, and (with "
                       "--uart-port) a ping round trip through the gateway's session layer. The key is never "
                       "printed.\n\nA role with hard limits needs them: --limits FILE and/or --limit KEY=VALUE, "
                       "checked with the config before anything is written, and written to the board over USB "
                       "only. --prime N runs the role's prime on the freshly booted board; --calibrate-strokes N "
                       "--drawdown-ml ML sets the role's calibrated value to ML / N. After the sensor check the "
                       "role's live inputs are shown with their ranges. What each role has comes from its spec.")
    p.add_argument("--port", required=True, help="the board's USB console port (e.g. /dev/ttyUSB0)")
    p.add_argument("--role", required=True, help="the board's role: " + ", ".join(roles.available()))
    p.add_argument("--device-id", required=True, help="unique id, 1..4294967294 (decimal or 0x...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE.json", help="role config as on the board (sections: role, link, ...)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set one config value, e.g. link.addr=3 or ROLE.KEY=VALUE (repeatable; applied over --config)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--registry", metavar="PATH", help="the gateway's registry.db (when run on the gateway)")
    dest.add_argument("--export", metavar="FILE", type=types.file_to_write,
                      help="write a 0600 export file for: prapa gateway devices import")
    p.add_argument("--name", help="a name for the device in the registry (e.g. its street address)")
    from tools.devices import add_place_arguments
    add_place_arguments(p)                  # --location LAT,LON, --catchment NAME: the device's place
    p.add_argument("--limits", metavar="FILE.json",
                   help="the role's hard limits as a JSON object, written to the board over USB only; required for "
                   "a role that has them (" + _declared("LIMITS_SCHEMA", lambda v: " ".join(r[0] for r in v)) + ")")
    p.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                   help="set one hard limit (repeatable; applied over --limits)")
    p.add_argument("--prime", type=int, metavar="N",
                   help="once the board runs its new config, over USB: the role's prime, N strokes ("
                   + _declared("COMMISSION_PRIME", lambda v: f"{v[0]} 1..{v[1]}") + ")")
    p.add_argument("--calibrate-strokes", type=int, metavar="N",
                   help="draw-down calibration: N strokes drawn from a calibration column (with --drawdown-ml; "
                   "on a terminal without it the board makes the N strokes and asks for what they drew)")
    p.add_argument("--drawdown-ml", type=float, metavar="ML",
                   help="what the --calibrate-strokes drew from the column: the role's calibrated value is ML / N ("
                   + _declared("COMMISSION_CALIBRATE", lambda v: f"{v[0]}, {v[1]}") + ")")
    p.add_argument("--uart-port", metavar="U", help="the board's data link: run a ping round trip through it")
    p.add_argument("--sensor-wait", type=float, metavar="S",
                   help="without a terminal or with --yes: seconds the sensor check waits (default 30)")
    p.add_argument("--yes", action="store_true", help="no questions: replace an existing identity, no prompts")
    p.add_argument("--json", action="store_true", help="one JSON object per step, then a summary")
    p.set_defaults(func=cmd_commission)


def _declared(attribute, describe):
    """'role: what it declares' for each role whose spec has attribute: the help names what exists."""
    found = [(name, roles.attr(name, attribute)) for name in roles.available()]
    return "; ".join(f"{name}: {describe(value)}" for name, value in found if value is not None) or "no role has it"


class Plan:
    """What the command will do, every part checked before the board or the registry is touched."""

    def __init__(self, device_id, cfg, sets, limits=None, calibrated=None, ask_calibration=False):
        self.device_id, self.cfg, self.sets, self.limits = device_id, cfg, sets, limits
        self.calibrated = calibrated              # {config key: value} from --drawdown-ml (or asked for)
        self.ask_calibration = ask_calibration    # the board makes the strokes, then the installer is asked


def _check_inputs(args):
    """Every refusal that needs neither the board nor a write; returns a Plan."""
    device_id = parse_device_id(args.device_id)
    if args.role not in roles.available():
        build_config(args.role, device_id)       # the one "no role spec" refusal
    spec = roles.spec(args.role)
    sets, calibrated, ask = list(args.set), None, False
    cal = getattr(spec, "COMMISSION_CALIBRATE", None)
    prime = getattr(spec, "COMMISSION_PRIME", None)
    if args.calibrate_strokes is None:
        if args.drawdown_ml is not None:
            raise UsageError("--drawdown-ml", "given without --calibrate-strokes",
                             "give --calibrate-strokes N, the strokes that drew it")
    elif cal is None:
        raise UsageError("--calibrate-strokes", f"role {args.role} has nothing to calibrate",
                         "leave --calibrate-strokes and --drawdown-ml out")
    else:
        key, unit, how = cal[:3]
        field = f"{args.role}.{key}"
        if any(item.partition("=")[0].strip() == field for item in sets):
            raise UsageError("--calibrate-strokes", f"{field} is also given by --set", "give one of them")
        if args.calibrate_strokes < 1:
            raise UsageError("--calibrate-strokes", f"{args.calibrate_strokes} strokes", "give 1 or more strokes")
        if args.drawdown_ml is None:
            if args.yes or not sys.stdin.isatty():
                raise UsageError("--drawdown-ml", f"missing: the {unit} the {args.calibrate_strokes} strokes drew",
                                 f"{how}, then give --drawdown-ml {unit.upper()} (or, on a terminal without --yes, "
                                 "leave it out: the board makes the strokes and you are asked)")
            if prime is None or args.calibrate_strokes > prime[1]:
                raise UsageError("--calibrate-strokes", f"{args.calibrate_strokes} strokes are more than the board "
                                 f"makes at once ({prime[1] if prime else 0})",
                                 f"give at most {prime[1] if prime else 0}, or make the strokes otherwise and give "
                                 "--drawdown-ml")
            ask = True
        else:
            value = _calibrated(args.drawdown_ml, args.calibrate_strokes)
            if value is None:
                raise UsageError("--drawdown-ml", f"{args.drawdown_ml:g} {unit}", f"give the {unit} drawn, above 0")
            calibrated = {key: value}
            sets.append(f"{field}={value!r}")
    try:
        cfg = build_config(args.role, device_id, args.config, sets)
    except UsageError as e:
        if calibrated is None or field not in e.where:
            raise
        raise UsageError("--drawdown-ml", f"{args.drawdown_ml:g} {unit} over {args.calibrate_strokes} strokes makes "
                         f"{field} {calibrated[key]:g}: {e.problem}", e.fix) from None
    limits = build_limits(args.role, cfg, args.limits, args.limit, sets)
    if args.prime is not None:
        if prime is None:
            raise UsageError("--prime", f"role {args.role} has nothing to prime", "leave --prime out")
        if not 1 <= args.prime <= prime[1]:
            raise UsageError("--prime", f"{args.prime} strokes", f"give 1..{prime[1]}")
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
    return Plan(device_id, cfg, sets, limits, calibrated, ask)


def _calibrated(measured, count):
    """measured / count to 6 significant digits (a draw-down is read to 3 or 4), None for no measurement."""
    if not measured > 0 or count < 1:            # also NaN
        return None
    return float(f"{measured / count:.6g}")


def _confirm(args, question):
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("--yes", question, "pass --yes to go ahead")
    if input(f"{question} Replace it? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("--yes", "the installer declined", "nothing was written")


def cmd_commission(args):
    plan = _check_inputs(args)
    device_id, cfg = plan.device_id, plan.cfg
    key = secrets.token_bytes(16)
    steps = Steps(args.json)
    spec = roles.spec(args.role)
    if not args.json:
        print(f"commissioning device {device_id} ({args.role}) on {args.port}")
    board = BoardLink(args.port)         # a BoardError here: prapa prints it, exit 1
    tmp = tempfile.TemporaryDirectory(prefix="prapa-commission-")
    reg = None
    result = {"limits": plan.limits, "primed": None, "calibrated": plan.calibrated, "inputs": None}
    try:
        ident = steps.run("board answers", lambda: _identity(board, args))
        if ident is None:
            return 1
        if ident["key_bytes"] or ident["device_id"] is not None:
            _confirm(args, f"{args.port} is already commissioned (device {ident['device_id']}).")
        files = [("device.key", key), ("config.json", _config_bytes(cfg))]
        if plan.limits is not None:
            files.append((spec.LIMITS_PATH, json.dumps(plan.limits, sort_keys=True, separators=(",", ":")).encode()))
        names = ", ".join(n for n, _ in files[1:] + files[:1])
        if steps.run("config" + (", limits" if plan.limits is not None else "") + " and key written",
                     lambda: (board.write_atomically(files) or True, f"{names} (renamed into place)", "", 1)) is None:
            return 1
        if plan.calibrated:
            steps.report("calibration", True, _calibration_text(spec, args, plan.calibrated) + " (in config.json)")
        from gateway.registry import Registry
        reg = Registry(args.registry or Path(tmp.name) / "registry.db")
        reg.add(device_id, args.role, key, name=args.name, board=ident["board"].get("name"),
                location=args.location, catchment=args.catchment)
        # The round trip's downlink counters are reserved before the export is written, so the
        # gateway that imports it starts above them: a (key, nonce) pair never repeats.
        counters = iter(reg.next_downlink_counters(device_id, ROUND_TRIP_COUNTERS))
        if args.export:
            reg.export_device(device_id, args.export)
        steps.report("registry", True, f"device {device_id} in {args.registry}" if args.registry else
                     f"{args.export} (mode 0600; on the gateway: prapa gateway devices import {args.export} "
                     "--registry PATH, then delete it)")
        status = steps.run("console shows the device", lambda: _boot_check(board, device_id))
        if args.prime is not None:
            status, result["primed"] = _prime_step(steps, board, spec, device_id, args.prime, status, "prime")
        if plan.ask_calibration:
            status, cfg = _calibrate_step(steps, board, args, plan, status, result)
        after = _sensor_step(steps, board, args, cfg, ident["board"], status)
        result["inputs"] = _inputs_step(steps, board, args, cfg, ident["board"], status, after)
        _round_trip_step(steps, board, args, device_id, key, counters, tmp.name)
    finally:
        board.close()
        if reg is not None:
            reg.close()
        tmp.cleanup()
    total = steps.total_s()
    if args.json:
        print(json.dumps({"device_id": device_id, "role": args.role, "ok": not steps.failed,
                          "total_s": round(total, 2), **result}))
    else:
        print(f"device {device_id} commissioned in {total:.1f} s" + (": every check passed" if not steps.failed
                                                                     else ": a check FAILED (see the fix above)"))
    return 1 if steps.failed else 0


def _config_bytes(cfg):
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def _calibration_text(spec, args, calibrated):
    key, unit = spec.COMMISSION_CALIBRATE[:2]
    return (f"{args.role}.{key} = {calibrated[key]:g} {unit} ({args.drawdown_ml:g} {unit} drawn by "
            f"{args.calibrate_strokes} strokes)")


def _prime_step(steps, board, spec, device_id, n, status, name):
    """The spec's COMMISSION_PRIME method with n on the role the reset just built from the new config,
    then a reset back into the app; returns (the status line after it, what the method made or None)."""
    if status is None:
        steps.report(name, None, "board not running: nothing primed")
        return status, None
    method, _most, s_each = spec.COMMISSION_PRIME
    booted = [status]

    def call():
        try:
            # silent while it works: n strokes at the slowest rate, but never past the 25 s a board's prime
            # may take (its watchdog is not fed meanwhile): a board that hangs fails the step, not us
            out = board.exec(METHOD_CALL.format(method=method, n=int(n)), soft_reset=False,
                             timeout=10 + min(n * s_each, PRIME_MOST_S))
        finally:
            after = _boot_check(board, device_id)     # the app again, whatever the call did
            booted[0] = after[3]
        said = parse_key_values(out)
        refused = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                        if line.startswith("refused:")), None)
        if refused is not None:
            problem, _, fix = refused.partition("; fix: ")
            return False, f"the board refused: {problem}", fix or "see the board's console", None
        if "made" not in said:
            return False, "the app was not running", "check the console: mpremote connect PORT repl", None
        if not after[0]:
            return False, f"{said['made']} made, but then: {after[1]}", after[2], None
        return True, f"{said['made']} of {n} made", "", (after[3], said["made"])
    done = steps.run(name, call)
    return (booted[0], None) if done is None else done


def _ask(question, as_json):
    """One answer from the installer at the terminal (the question on stderr with --json, which keeps
    stdout for JSON); None at end of input."""
    try:
        if as_json:
            print(question, end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            return line.strip() if line else None
        return input(question).strip()
    except EOFError:
        return None


def _calibrate_step(steps, board, args, plan, status, result):
    """The draw-down on the board: it makes the strokes (the spec's COMMISSION_PRIME) from the calibration
    column, the installer says what they drew, the calibrated value goes into config.json (checked as
    every value is) and the board restarts with it. Returns (status, cfg)."""
    spec = roles.spec(args.role)
    key, unit, how = spec.COMMISSION_CALIBRATE[:3]
    n = args.calibrate_strokes
    if status is None:
        steps.report("calibration", None, "board not running: nothing calibrated")
        return status, plan.cfg
    if not args.json:
        print(f"  -> {how}", flush=True)
    if _ask(f"     read the level, then press Enter to make {n} strokes ", args.json) is None:
        steps.report("calibration", None, "no answer: nothing calibrated")
        return status, plan.cfg
    status, made = _prime_step(steps, board, spec, plan.device_id, n, status, "calibration strokes")
    if made is None:
        return status, plan.cfg
    while True:
        answer = _ask(f"     {unit} drawn from the column by {made} strokes (empty: skip): ", args.json)
        if not answer:
            steps.report("calibration", None, f"skipped: {args.role}.{key} stays {plan.cfg[args.role][key]:g} {unit}")
            return status, plan.cfg
        try:
            value = _calibrated(float(answer), made)
        except ValueError:
            value = None
        if value is None:
            print(f"     {answer!r} is not a measurement in {unit}, above 0", file=sys.stderr)
            continue
        try:
            cfg = build_config(args.role, plan.device_id, args.config, plan.sets + [f"{args.role}.{key}={value!r}"])
            if plan.limits is not None:
                check_within_limits(args.role, cfg[args.role], plan.limits, plan.sets)
        except UsageError as e:
            print(f"     {answer} {unit} makes {args.role}.{key} {value:g}: {e.problem}; fix: {e.fix}", file=sys.stderr)
            continue
        break
    args.drawdown_ml = float(answer)
    result["calibrated"] = {key: value}
    if steps.run("calibration", lambda: (board.write_atomically([("config.json", _config_bytes(cfg))]) or True,
                                         _calibration_text(spec, args, {key: value}) + ", config.json rewritten",
                                         "", True)) is None:
        return None, plan.cfg
    return steps.run("console shows the device", lambda: _boot_check(board, plan.device_id)), cfg


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
        return None
    section = cfg[args.role]
    if not args.json:
        print(f"  -> {spec.COMMISSION_ASK % section}", flush=True)
    if not args.yes and sys.stdin.isatty():
        input("     press Enter when it has ")
    else:
        _countdown(spec.COMMISSION_WAIT_S if args.sensor_wait is None else args.sensor_wait, "sensor", args.json)
    method = getattr(spec, "COMMISSION_PREPARE", None)
    prepare = f" rt.role.{method}()\n" if method else ""
    read = [None]

    def query():
        # resume, not soft reset: the app's live state (runtime.current) is what is read
        after = parse_key_values(board.exec(STATUS_QUERY.format(prepare=prepare), soft_reset=False))
        read[0] = None if "app" in after else after
        if "app" in after:
            return False, "the app was not running", "check the console: mpremote connect PORT repl", None
        before_n, after_n = int(status.get(counter, 0)), int(after.get(counter, 0))
        words = {**board_def.get("role_pins", {}), **section, "rise": after_n - before_n}
        if after_n > before_n:
            return True, spec.COMMISSION_SEEN % words, "", after
        return False, f"{counter} stayed {before_n}", spec.COMMISSION_FIX % words, after
    steps.run("sensor reads", query)
    return read[0]


def _inputs_step(steps, board, args, cfg, board_def, status, after):
    """The live inputs the spec declares (COMMISSION_INPUTS), from the role's status() as the sensor
    check read it (else read now, once the app has run a moment), each judged against its range; an
    input outside it fails the step with the spec's fix. Returns {key: {value, ok, low, high}} or None."""
    inputs = getattr(roles.spec(args.role), "COMMISSION_INPUTS", None)
    if not inputs:
        return None
    if status is None:
        steps.report("live inputs", None, "board not running")
        return None
    shown = {}

    def read():
        now = after
        if now is None:
            time.sleep(max(0.0, board.booted_at + INPUTS_SETTLE_S - time.monotonic()))
            now = parse_key_values(board.exec(STATUS_QUERY.format(prepare=""), soft_reset=False))
            if "app" in now:
                return False, "the app was not running", "check the console: mpremote connect PORT repl", None
        words_base = {**board_def.get("role_pins", {}), **cfg[args.role]}
        parts, fixes = [], []
        for key, label, low, high, fix in inputs:
            value = now.get(key)
            ok, rng = _judge(value, low, high)
            parts.append(f"{label} {'?' if value is None else value}{rng}" + ("" if ok else " OUT OF RANGE"))
            shown[key] = {"value": value, "ok": ok, "label": label,
                          "low": list(low) if isinstance(low, (tuple, list)) else low, "high": high}
            if not ok:
                fixes.append(f"{key} {value}: " + (fix % {**words_base, "value": value} if fix else
                                                   f"the board's status has no {key}: is its firmware current?"))
        return not fixes, "; ".join(parts), "; ".join(fixes), True
    steps.run("live inputs", read)
    return shown or None


def _judge(value, low, high):
    """(within the declared range, the range as text): low a tuple lists the values allowed; a number
    low and/or high bound a number; both None accept anything (shown only). A missing value fails."""
    if isinstance(low, (tuple, list)):
        return value in low, " [" + "|".join(map(str, low)) + "]"
    if low is None and high is None:
        return value is not None, ""
    ok = isinstance(value, (int, float)) and (low is None or value >= low) and (high is None or value <= high)
    return ok, f" [{'' if low is None else low}..{'' if high is None else high}]"


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
