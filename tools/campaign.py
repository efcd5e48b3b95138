"""prapa campaign: a simulated town under faults, and a ledger that proves nothing was lost.

Runs `prapa site` (every role: meters, the doser, a catchment of drains; the real
gateway, a real Mosquitto, the reference consumer `prapa ledger` as the cloud)
and, on a schedule drawn from --seed, injects real faults while it runs:

  power_cut     SIGKILL of a board's VM (its sensor idle from 80 ms before the cut
                until the new boot reports: what a board at 1x could not count
                while it boots is not the firmware's loss), every 3rd within
                20 ms of the sensor starting again (the first writes after a boot)
  gateway_kill  SIGKILL of the gateway (sometimes while it starts); the site's
                supervisor starts it again, as systemd would
  broker_kill   SIGKILL of Mosquitto: down until the supervisor restarts it
                (0.5-8 s: hours of board time at --speed)
  line_noise    garbage, half frames and a burst of 0x00 on a board's serial line
  disk_full     the gateway's data folder (a tmpfs of 256 MB: root only) filled to
                30 MB free, below its min_free_mb, for 7 s, then emptied: the gateway
                withholds acknowledgements and the boards keep their logs meanwhile

Every other board starts one second before its 2**30 ms tick wrap. In the last
--quiet seconds every sensor is idle, so the last readings close on the truth.

The ledger then compares the world's ground truth with what the consumer got
through its persistent QoS 1 session (decoded and checked against the northbound
contract as any consumer would), per device:
  - the register at the broker (meter pulses, doser strokes) is the world's total
    less at most the role's stated loss per power cut (the spec's CUT_LOSS);
  - the register chain is unbroken within each boot, and never goes back across one;
  - every logged entry (readings and alarms, one seq series per boot) arrived:
    a missing seq is an acknowledged entry or an alarm lost;
  - no identity (device, boot, seq) arrived with two different contents;
  - the pump never stroked faster than its hard limit, and was driven off first
    after every reset.

exit codes: 0 every check held, 1 a check failed (the report says which), 2 bad
arguments.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from protocol.config import check_section
from protocol.errors import UsageError
from protocol.roles import catalog as roles
from tools import args as types
from tools.console import ConsoleReader, parse_status

FAULT_KINDS = ("power_cut", "gateway_kill", "broker_kill", "line_noise", "disk_full")
DISK_HOLD_S = 7.0          # a full disk lasts past the gateway's look at it (gateway/service.py DISK_CHECK_S)
DISK_SIZE = "256m"         # the gateway's data folder: a tmpfs of this size (a disk_full campaign, as root)
FILL_LEAVES_MB = 30        # what filling it leaves free: below the site's min_free_mb (50)
WARMUP_S = 5.0             # the site's start and first readings before the first fault
DEFAULT_QUIET_S = 4.0


def add_parser(sub):
    p = sub.add_parser("campaign", help="a simulated town under faults, checked against the world's truth",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boards", type=types.whole(1, 64), default=6, help="virtual boards, as prapa site --boards "
                                                                         "(default 6: a meter, the doser, 4 drains)")
    p.add_argument("--speed", type=types.whole(1, 100_000), default=600,
                   help="board time runs this many times faster (default 600)")
    p.add_argument("--hours", type=types.number(0.0, 744.0, above=True, unit=" h (a month)"), default=6.0,
                   help="simulated hours of board time (default 6)")
    p.add_argument("--seed", type=types.whole(0), default=1, help="the fault schedule's seed (default 1)")
    p.add_argument("--faults", default="power_cut=4,gateway_kill=2,broker_kill=1,line_noise=3",
                   metavar="K=N,...",
                   help="how many of each fault (" + ", ".join(FAULT_KINDS) + "; disk_full needs root)")
    p.add_argument("--quiet", type=types.number(0.0, 600.0, unit=" s"), default=DEFAULT_QUIET_S, metavar="S",
                   help=f"real seconds at the end with every sensor idle (default {DEFAULT_QUIET_S:g})")
    p.add_argument("--json", action="store_true", help="print the report as JSON (else a summary)")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    p.add_argument("--workdir", metavar="DIR", help="keep the campaign's files here (default: a temp folder, "
                                                    "removed when every check held)")
    p.add_argument("--board", default="esp32-devkitc", help="board definition of the virtual boards")
    from tools.sim import vm as vms
    vms.add_argument(p)
    p.set_defaults(func=run)


def parse_faults(text):
    """{kind: count} from "power_cut=4,gateway_kill=2"; UsageError naming --faults otherwise."""
    counts = dict.fromkeys(FAULT_KINDS, 0)
    for part in filter(None, (x.strip() for x in text.split(","))):
        kind, _, n = part.partition("=")
        if kind not in counts:
            raise UsageError("--faults", f"{kind!r} is not a fault", "use " + ", ".join(FAULT_KINDS))
        if not n.isdigit() or int(n) > 1000:
            raise UsageError("--faults", f"{part!r}: the count is not a whole number 0..1000", f"write {kind}=3")
        counts[kind] = int(n)
    return counts


def schedule(counts, span_s, seed):
    """[(real seconds after the warm-up, kind)] sorted: each fault at a seeded uniform instant."""
    rng = random.Random(seed)
    plan = [(rng.uniform(0, span_s), kind) for kind, n in counts.items() for _ in range(n)]
    return sorted(plan)


def check_args(args):
    counts = parse_faults(args.faults)
    if counts["disk_full"] and (os.geteuid() != 0 or not shutil.which("mount")):
        raise UsageError("--faults", "disk_full fills a tmpfs mounted for the gateway's data, which needs root",
                         "run as root, or leave disk_full out")
    duration = args.hours * 3600 / args.speed
    if duration < WARMUP_S + args.quiet + 2:
        raise UsageError("--hours", f"{args.hours:g} h at {args.speed}x is {duration:.1f} s of the host's",
                         f"give at least {(WARMUP_S + args.quiet + 2) * args.speed / 3600:.2f} h or a lower --speed")
    return counts, duration


# -- the faults ------------------------------------------------------------------------------------------

class Injector(threading.Thread):
    """Carries out the schedule on a running Site, from its own thread; counts what it did."""

    def __init__(self, site, plan, duration, quiet_s, seed):
        super().__init__(name="prapa-campaign", daemon=True)
        self.site, self.plan, self.duration, self.quiet_s = site, plan, duration, quiet_s
        self.rng = random.Random(seed + 1)
        self.done = dict.fromkeys(FAULT_KINDS, 0)
        self.cuts = {}                  # device hex -> power cuts made
        self.errors = []
        self.gateway_rss_peak_kb = 0
        self.consoles = {}
        self.stop_event = threading.Event()

    def run(self):
        try:
            self._run()
        except Exception as exc:        # noqa: BLE001 - the report says what the injector could not do
            import traceback
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.errors.append(f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")

    def _run(self):
        site = self.site
        while not site.supervised and not site.stopping.is_set():
            time.sleep(0.05)
        t0 = site.started                              # the site's --duration counts from here too
        for _name, device_id, vb in site.boards:
            self.consoles[device_id] = ConsoleReader(vb.console_port)
        for at, kind in self.plan:
            while time.monotonic() - t0 < WARMUP_S + at:
                if self._idle_wait(0.1):
                    return
            if time.monotonic() - t0 > self.duration - self.quiet_s - 0.5:
                break                                    # a slow fault ate the time: the rest is not done
            getattr(self, "_" + kind)()
            self.done[kind] += 1
        while time.monotonic() - t0 < self.duration - self.quiet_s:
            if self._idle_wait(0.1):
                return
        for _name, _device_id, vb in site.boards:    # the end: every sensor idle, the last readings close
            self._set_activity(vb, 0)
        # What a killed broker lost on its way to the ledger: asked for again until nothing is missing
        # (the ledger's own healing does this every 2 s; here without its grace, as the run ends).
        end = t0 + self.duration - 1.0
        while time.monotonic() < end and site.ledger is not None:
            if self._idle_wait(1.0):
                return
            site.ledger.heal(grace=False)               # nothing is sent when nothing is missing

    def _idle_wait(self, s):
        self._sample_rss()
        return self.site.stopping.wait(s) or self.stop_event.is_set()

    def _sample_rss(self):
        gw = self.site.gateway
        try:
            with open(f"/proc/{gw.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.gateway_rss_peak_kb = max(self.gateway_rss_peak_kb, int(line.split()[1]))
        except (OSError, AttributeError, ValueError):
            pass

    def _set_activity(self, vb, value):
        from tools.sim import worlds
        model, knob, _busy = worlds.ROLE_WORLDS[vb.role].ACTIVITY
        vb.set_world(model, knob, value)

    def _site_activity(self, vb, device_id):
        """The activity knob's value at the site for this board (its world overrides, else the default)."""
        from tools.sim import worlds
        model, knob, _busy = worlds.ROLE_WORLDS[vb.role].ACTIVITY
        given = worlds.parse_overrides(self.site.plan_worlds.get(device_id)).get(model, {})
        return given.get(knob, worlds.MODELS[model].PARAMS[knob][0])

    def _power_cut(self):
        name, device_id, vb = self.rng.choice(self.site.boards)
        console = self.consoles[device_id]
        after = len(console.lines)
        self._set_activity(vb, 0)
        time.sleep(0.08)                                 # past the world's look-ahead
        vb.power_cut()
        console.wait_for(parse_status, after=after, timeout=30)     # the new boot counts again
        if self.done["power_cut"] % 3 == 2:
            time.sleep(self.rng.uniform(0, 0.02))
        self._set_activity(vb, self._site_activity(vb, device_id))
        key = f"{device_id:08x}"
        self.cuts[key] = self.cuts.get(key, 0) + 1

    def _gateway_kill(self):
        gw = self.site.gateway
        if self.rng.random() < 0.3:                      # during its start: wait for the supervisor's restart
            for _ in range(200):
                if gw.proc.poll() is None:
                    break
                time.sleep(0.01)
        self._sample_rss()
        gw.proc.kill()

    def _broker_kill(self):
        self.site.broker.proc.kill()

    def _disk_full(self):
        data = self.site.workdir / "data"
        fill = data / "campaign-fill.bin"
        free = shutil.disk_usage(data).free
        size = free - FILL_LEAVES_MB * 2**20
        if size > 0:
            with open(fill, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        try:
            end = time.monotonic() + DISK_HOLD_S
            while time.monotonic() < end:
                if self._idle_wait(0.2):
                    return
        finally:
            fill.unlink(missing_ok=True)

    def _line_noise(self):
        _name, _device_id, vb = self.rng.choice(self.site.boards)
        rng = self.rng
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        half = bytes(rng.randrange(1, 256) for _ in range(40))      # a frame cut off: no 0x00 delimiter
        vb.line_noise(garbage + b"\x00" + half + b"\x00" * rng.randrange(1, 20))


# -- the ledger's checks -----------------------------------------------------------------------------

def ledger_checks(db_path, report, cuts, sections):
    """{"devices": {hex: figures and problems}, "conflicts", "invalid", "problems": [...]}: the campaign's verdict
    from the consumer's SQLite (tools/ledger.py) and the site's report (the world's truth per board)."""
    from tools.ledger import LedgerStore
    store = LedgerStore(db_path, readonly=True)
    db, holes = store.db, store.holes()             # holes: seqs missing below one held, per boot
    problems, devices = [], {}
    conflicts = db.execute("SELECT COUNT(*) FROM conflicts").fetchone()[0]
    invalid = db.execute("SELECT COUNT(*) FROM invalid").fetchone()[0]
    if conflicts:
        problems.append(f"{conflicts} identities arrived with two different contents")
    if invalid:
        problems.append(f"{invalid} messages broke the northbound contract")
    for row in report.get("boards", []):
        hexid, role = row["device_id"], row["role"]
        out = devices[hexid] = {"role": role, "cuts": cuts.get(hexid, 0), "problems": []}
        readings = db.execute("SELECT boot, seq, seq_last, register_before, register, series, time_source FROM readings "
                              "WHERE device = ? ORDER BY boot, seq", (hexid,)).fetchall()
        alarms = db.execute("SELECT boot, seq FROM alarms WHERE device = ? AND seq > 0", (hexid,)).fetchall()
        out.update(readings=len(readings), alarms=len(alarms), boots=len({r[0] for r in readings + alarms}),
                   unknown_time=sum(1 for r in readings if r[6] == "unknown"))
        made = row.get("readings_made")              # what the gateway committed (acknowledged to the board)
        if made is not None and len(readings) < made:
            out["problems"].append(f"{made - len(readings)} of the {made} readings the gateway committed never "
                                   f"reached the ledger")
        if hexid in holes:
            out["problems"].append("entries never delivered: " + "; ".join(
                f"boot {b}: {n} from seq {first}" for b, first, n in holes[hexid]))
        cut_loss = roles.attr(role, "CUT_LOSS", None)
        truth_model_key = _truth_key(role)
        if roles.attr(role, "REGISTER", False):
            chain = [r for r in readings if r[5] == "interval" and r[4] is not None]
            for a, b in zip(chain, chain[1:]):
                if a[0] == b[0] and b[3] != a[4]:
                    out["problems"].append(f"register chain broken in boot {a[0]} at seq {b[1]}: {a[4]} then {b[3]}")
                    break
                if a[0] != b[0] and b[3] < a[4]:
                    out["problems"].append(f"register went back across boots {a[0]}->{b[0]}: {a[4]} then {b[3]}")
                    break
            truth = (row.get("world_truth") or {}).get(truth_model_key[0], {}).get(truth_model_key[1])
            register = chain[-1][4] if chain else 0
            if truth is not None and cut_loss is not None:
                key, extra = cut_loss
                section = check_section(role, sections.get(hexid), roles.spec(role).SCHEMA)   # defaults filled
                per_cut = int(section[key]) + extra
                lost = truth - register
                out.update(truth=truth, register=register, lost=lost, bound=out["cuts"] * per_cut)
                if not 0 <= lost <= out["cuts"] * per_cut:
                    out["problems"].append(f"register {register} vs the world's {truth}: {lost} lost, the bound is "
                                           f"{out['cuts']} cuts x {per_cut}")
        world = (row.get("world_truth") or {}).get("chlorine_plant")
        if world is not None:
            limits = report.get("limits", {}).get(hexid) or {}
            gap = world.get("min_stroke_gap_s")
            out.update(unsafe_starts=world.get("unsafe_starts"), min_stroke_gap_s=gap)
            if world.get("unsafe_starts"):
                out["problems"].append(f"the pump was driven on first after {world['unsafe_starts']} resets")
            if gap is not None and limits.get("max_spm") and gap < 60 / limits["max_spm"] * 0.999:
                out["problems"].append(f"strokes {gap} s apart: faster than max_spm {limits['max_spm']}")
        problems += [f"{hexid}: {p}" for p in out["problems"]]
    store.close()
    return {"devices": devices, "conflicts": conflicts, "invalid": invalid, "problems": problems}


def _truth_key(role):
    from tools.sim import worlds
    return worlds.ROLE_WORLDS[role].TRUTH


# -- the command -------------------------------------------------------------------------------------

def run(args):
    from tools import site as S
    counts, duration = check_args(args)
    board_def, plan, vm = S.check_args(argparse.Namespace(boards=args.boards, speed=min(args.speed, 1000),
                                                          board=args.board, duration=duration, vm=args.vm,
                                                          restart_limit=0, workdir=args.workdir,
                                                          report=args.report))
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="prapa-campaign-")
    workdir = Path(args.workdir or tmp).resolve()
    site_args = argparse.Namespace(boards=args.boards, speed=args.speed, duration=duration, headless=True,
                                   report=None, board=args.board, workdir=str(workdir), keep=True,
                                   restart_limit=1000, vm=args.vm, wrap_ticks=True)
    mounted = counts["disk_full"] > 0 and _mount_data(workdir / "data")
    site = S.Site(site_args, workdir)
    injector = Injector(site, schedule(counts, max(0.1, duration - WARMUP_S - args.quiet - 1), args.seed),
                        duration, args.quiet, args.seed)
    injector.start()
    started = time.monotonic()
    with open(os.devnull, "w") as quiet_out:            # the site's JSON events: in its workdir's report
        saved, sys.stdout = sys.stdout, quiet_out if args.json else sys.stdout
        try:
            code = site.run(board_def, plan, vm)
        finally:
            sys.stdout = saved
            injector.stop_event.set()
            injector.join(10)
            for console in injector.consoles.values():
                console.close()
            if mounted:
                _unmount_data(workdir / "data", keep_to=workdir / "data-kept")
    site_report = json.loads((workdir / "report.json").read_text())
    site_report["limits"] = site.plan_limits
    sections = {f"{d:08x}": section for d, section in site.plan_sections.items()}
    verdict = ledger_checks(workdir / "ledger.db", site_report, injector.cuts, sections)
    if code != 0:
        verdict["problems"].insert(0, f"the site ended {site_report.get('ended')} (failed: {site_report.get('failed')})")
    verdict["problems"] += [f"injector: {e}" for e in injector.errors]
    report = {
        "seed": args.seed, "speed": args.speed, "hours": args.hours, "boards": args.boards,
        "seconds": round(time.monotonic() - started, 1), "workdir": str(workdir),
        "faults_planned": counts, "faults": injector.done, "restarts": len(site_report.get("restarts", [])),
        "gateway_rss_peak_mb": round(injector.gateway_rss_peak_kb / 1024, 1),
        "readings_made": site_report.get("totals", {}).get("readings_made"),        # committed by the gateway
        "readings_at_ledger": sum(d["readings"] for d in verdict["devices"].values()),  # stored by the cloud
        "replays_asked": site.ledger.replays_asked if site.ledger is not None else 0,
        "acks_withheld": _log_events(workdir / "gateway.log", "acks_withheld"),   # the disk guard, as logged
        **verdict, "ok": not verdict["problems"],
    }
    text = json.dumps(report, indent=2)
    (workdir / "campaign.json").write_text(text)
    if args.report:
        Path(args.report).write_text(text)
    if args.json:
        print(json.dumps(report))
    else:
        print(summary(report))
    if report["ok"] and tmp is not None:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    elif not report["ok"]:
        print(f"prapa campaign: its files are in {workdir}", file=sys.stderr)
    return 0 if report["ok"] else 1


def _log_events(path, event):
    """How many times the gateway's log says `event`."""
    try:
        with open(path) as f:
            return sum(1 for line in f if f'"event": "{event}"' in line)
    except OSError:
        return 0


def _mount_data(data):
    """A tmpfs of DISK_SIZE for the gateway's data folder: a disk a campaign can fill. UsageError if refused."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "prapa-campaign", str(data)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError("--faults", f"disk_full: mounting a tmpfs at {data} failed ({r.stderr.strip()})",
                         "run as root where mounts are allowed, or leave disk_full out")
    return True


def _unmount_data(data, keep_to):
    """The gateway's data copied out (its store and registry: what a failed campaign is read from), then
    the tmpfs unmounted."""
    try:
        shutil.copytree(data, keep_to, dirs_exist_ok=True)
    finally:
        subprocess.run(["umount", "--lazy", str(data)], capture_output=True)


def summary(report):
    f = report["faults"]
    lines = [f"campaign seed {report['seed']}: {report['boards']} boards, {report['hours']:g} h at {report['speed']}x "
             f"in {report['seconds']} s; faults: " + ", ".join(f"{k} {v}" for k, v in f.items()),
             f"  gateway/broker restarts {report['restarts']}, gateway peak RSS {report['gateway_rss_peak_mb']} MB, "
             f"readings made {report['readings_made']}, at the ledger {report['readings_at_ledger']}, "
             f"replays asked for holes {report['replays_asked']}, "
             f"acks withheld for a full disk {report['acks_withheld']}, "
             f"conflicts {report['conflicts']}, invalid {report['invalid']}"]
    for hexid, d in report["devices"].items():
        extra = (f", register {d['register']} of {d['truth']} ({d['lost']} lost, bound {d['bound']})"
                 if "truth" in d else "")
        lines.append(f"  {hexid} {d['role']}: {d['readings']} readings, {d['alarms']} alarms, {d['boots']} boots, "
                     f"{d['cuts']} cuts{extra}" + (f"; PROBLEM: {'; '.join(d['problems'])}" if d["problems"] else ""))
    lines.append("every check held" if report["ok"] else "FAILED: " + "; ".join(report["problems"][:5]))
    return "\n".join(lines)
