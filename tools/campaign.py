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

  udp_flood     attack frames on the gateway's UDP link (tools/rigs/attacks.py: garbage, replays of frames the
                boards sent, some captured by a gateway since killed or before the board's reboot, forged tags,
                another device's id, an id nobody has, truncated, oversized, reflected), first FLOOD_PER_KIND of
                each kind at full speed, then COUNTED_PER_KIND of each paced; none may be accepted, every one that
                arrived is refused under its reason (the gateway's /metrics), the gateway's RSS stays bounded
  uart_flood    UART_FLOOD_BYTES of garbage on a board's serial line, as fast as the line takes it
  watchdog      a board's VM stopped (SIGSTOP) past its watchdog: the board resets with cause watchdog (its
                sensor idle around it, as for a power cut; its loss bound is a power cut's)
  clock_step    the gateway's wall clock stepped an hour forward (CLOCK_STEP_S of the site's time), back to true
                CLOCK_HOLD_S later (the site runs its gateway through tools/rigs/gateway_rig.py, whose clock takes
                the step); readings stamped meanwhile are off by the step: counted; every other reading must keep
                its boot's time within the stated error (time_checks)
  bad_command   the cloud's command path (MQTT .../command) given a config beyond the schema, a config naming
                another device, one naming another role, and a command the role does not have, for a board of
                each role: each must come back refused on .../command/result (nothing queued for the board)
  link_config   someone on the RS-485 bus with a stolen board's key: a config push and a hard-limits change for
                that other board (its id, its key) and the same under this board's id sealed with the other's
                key, put on a board's serial line from the bus side (its pty, as the gateway writes); the
                board must count each refused (its health reports) and must not reboot into them

Every gateway runs under tools/rigs/gateway_rig.py (its tap gives each board's lowest free heap from its health
reports: a figure per role beside the board's heap budget, which fails below HEAP_FLOOR of it; and the frames
the replays send again). Every reset a board's host made is counted by cause (board_resets): one the campaign
did not make is printed with its time, beside the faults' timeline.

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
from tools.rigs.campaign_checks import (attack_summary, board_resets, command_problems, heap_figures,
                                        link_config_problems, time_checks)

FAULT_KINDS = ("power_cut", "gateway_kill", "broker_kill", "line_noise", "disk_full", "udp_flood", "uart_flood",
               "watchdog", "clock_step", "bad_command", "link_config")
FLOOD_PER_KIND = 400       # attack frames of each kind sent at full speed (udp_flood)
COUNTED_PER_KIND = 25      # ... then of each kind paced, every one counted under its reason
UART_FLOOD_BYTES = 32768   # garbage on one board's serial line (uart_flood) ...
UART_FLOOD_MAX_S = 5.0     # ... for at most this long (a line nobody reads, the gateway dead, takes only its buffer)
WATCHDOG_STOP_S = 2.5      # a VM stopped this long misses its watchdog (tools/sim/board.py: at least 1 s)
CLOCK_STEP_S = 3600.0      # the gateway's wall clock stepped by this much of the site's time ...
CLOCK_HOLD_S = 3.0         # ... and back to true this many real seconds later
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

    def __init__(self, site, plan, duration, quiet_s, seed, udp_port=None):
        super().__init__(name="prapa-campaign", daemon=True)
        self.site, self.plan, self.duration, self.quiet_s = site, plan, duration, quiet_s
        self.udp_port = udp_port
        self.attacks = []               # one record per burst: sent, arrived, refused by reason, problems
        self.uart_floods = []
        self.watchdog_resets = {}       # device hex -> watchdog resets seen
        self.cut_times = {}             # device hex -> [host time.time() of each cut or watchdog reset]
        self.clock_steps = []           # {"step_s", "at", "back_at"}: host time.time(), unstepped
        self.bad_commands = []          # {"device", "kind", "state", "field"}: the gateway's answer to each
        self.link_configs = []          # {"device", "other", "frames", "refused", "rebooted"}: link_config
        self.timeline = []              # {"kind", "at_s", "device"}: each fault as it began (the site's seconds)
        self._target = None
        self._clock_back = None
        self.rng = random.Random(seed + 1)
        self.done = dict.fromkeys(FAULT_KINDS, 0)
        self.cuts = {}                  # device hex -> power cuts made
        self.errors = []
        self.gateway_rss_peak_kb = 0
        self.load_peak = 0.0            # the host's 1-minute load average, highest seen
        self.consoles = {}
        self.stop_event = threading.Event()

    def run(self):
        try:
            self._run()
        except Exception as exc:        # noqa: BLE001 - the report says what the injector could not do
            self._error(exc)

    def _error(self, exc, during=None):
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.errors.append((f"{during}: " if during else "") +
                           f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")

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
            self._target, at_s = None, round(time.monotonic() - t0, 2)
            try:
                getattr(self, "_" + kind)()
            except Exception as exc:     # noqa: BLE001 - a fault that could not be made is a problem, and the
                self._error(exc, f"{kind} at {at_s} s")    # run goes on: its end (every sensor idle) must come
                continue
            self.done[kind] += 1
            self.timeline.append({"kind": kind, "at_s": at_s, "device": self._target})
        while time.monotonic() - t0 < self.duration - self.quiet_s:
            if self._idle_wait(0.1):
                return
        self._clock_true()                              # a step still held ends with the faults
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
        self._sample_load()
        return self.site.stopping.wait(s) or self.stop_event.is_set()

    def _sample_load(self):
        try:
            with open("/proc/loadavg") as f:
                self.load_peak = max(self.load_peak, float(f.read().split()[0]))
        except (OSError, ValueError):
            pass

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
        self._target = f"{device_id:08x}"
        console = self.consoles[device_id]
        after = len(console.lines)
        self._set_activity(vb, 0)
        time.sleep(0.08)                                 # past the world's look-ahead
        vb.power_cut()
        self.cut_times.setdefault(f"{device_id:08x}", []).append(time.time())
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
        _name, device_id, vb = self.rng.choice(self.site.boards)
        self._target = f"{device_id:08x}"
        rng = self.rng
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        half = bytes(rng.randrange(1, 256) for _ in range(40))      # a frame cut off: no 0x00 delimiter
        vb.line_noise(garbage + b"\x00" + half + b"\x00" * rng.randrange(1, 20))


    def _watchdog(self):
        """Stop a board's VM (SIGSTOP) past its watchdog; the board's host resets it with cause watchdog."""
        import signal
        _name, device_id, vb = self.rng.choice(self.site.boards)
        self._target = f"{device_id:08x}"
        key = f"{device_id:08x}"
        console = self.consoles[device_id]
        after = len(console.lines)
        status = vb.status()
        before, pid = status["resets"]["watchdog"], status["vm_pid"]
        self._set_activity(vb, 0)
        time.sleep(0.08)                                 # past the world's look-ahead
        reset = False
        os.kill(pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + WATCHDOG_STOP_S + 5
            while time.monotonic() < end and not reset:
                time.sleep(0.1)
                reset = vb.status()["resets"]["watchdog"] > before
        finally:
            try:
                os.kill(pid, signal.SIGCONT)             # (the reset killed it: nothing to wake)
            except ProcessLookupError:
                pass
        if not reset:
            self.errors.append(f"watchdog: {key}'s VM stopped {WATCHDOG_STOP_S + 5:g} s and the board did not reset")
        else:
            self.cut_times.setdefault(key, []).append(time.time())
            self.watchdog_resets[key] = self.watchdog_resets.get(key, 0) + 1
            self.cuts[key] = self.cuts.get(key, 0) + 1  # what it lost: at most a power cut's
            console.wait_for(parse_status, after=after, timeout=30)
        self._set_activity(vb, self._site_activity(vb, device_id))

    def _uart_flood(self):
        from tools.rigs import attacks
        _name, device_id, vb = self.rng.choice(self.site.boards)
        self._target = f"{device_id:08x}"
        from protocol.errors import BoardError
        pieces = attacks.uart_garbage(self.rng, UART_FLOOD_BYTES)
        t, sent, full = time.monotonic(), 0, 0
        for piece in pieces:               # as fast as the line takes it: a full line (EAGAIN) is waited for
            while time.monotonic() - t < UART_FLOOD_MAX_S:
                try:
                    vb.line_noise(piece)
                    sent += len(piece)
                    break
                except BoardError as exc:
                    if "temporarily unavailable" not in str(exc):
                        raise
                    full += 1
                    time.sleep(0.02)
        self.uart_floods.append({"device": f"{device_id:08x}", "bytes": sent, "line_full": full,
                                 "seconds": round(time.monotonic() - t, 3)})

    def _clock_step(self):
        """The gateway's wall clock stepped by CLOCK_STEP_S (forward, then back on every other step), and back to
        true CLOCK_HOLD_S later (a timer: the schedule goes on meanwhile)."""
        from tools.rigs.gateway_rig import write_offset
        self._clock_true()
        step_s = CLOCK_STEP_S if len(self.clock_steps) % 2 == 0 else -CLOCK_STEP_S
        step = {"step_s": step_s, "at": time.time(), "back_at": None}
        write_offset(self._offset_path(), step_s / self.site.args.speed)
        self.clock_steps.append(step)
        self._clock_back = threading.Timer(CLOCK_HOLD_S, self._clock_true)
        self._clock_back.daemon = True
        self._clock_back.start()

    def _offset_path(self):
        from tools.rigs.gateway_rig import RIG_DIR
        return self.site.workdir / RIG_DIR / "clock_offset"

    def _clock_true(self):
        from tools.rigs.gateway_rig import write_offset
        if self._clock_back is not None:
            self._clock_back.cancel()
        if self.clock_steps and self.clock_steps[-1]["back_at"] is None:
            write_offset(self._offset_path(), 0.0)
            self.clock_steps[-1]["back_at"] = time.time()

    def _bad_command(self):
        """Commands the gateway must refuse, over MQTT as the cloud sends them; each answer must be refused."""
        import cbor2                     # (the site's own subscriber takes every payload on the site's topics as CBOR)
        import paho.mqtt.client as mqtt
        from gateway import forward_format as ff
        from tools import site as S
        n = len(self.bad_commands)
        asked = {}
        by_role = {}
        for _name, device_id, vb in self.site.boards:
            by_role.setdefault(vb.role, device_id)
        other = {role: next(d for d in by_role.values() if d != device_id) if len(by_role) > 1 else device_id + 1
                 for role, device_id in by_role.items()}
        for role, device_id in by_role.items():
            schema = roles.spec(role).SCHEMA
            key, _kind, _default, _low, high, *_ = next(f for f in schema
                                                         if f[1] in ("int", "num") and f[4] is not None)
            wrong_role = next((r for r in by_role if r != role), "meter" if role != "meter" else "doser")
            for tag, body in (("range", {"name": "config", "args": {role: {key: high * 10 + 1}}}),
                              ("other_device", {"name": "config", "args": {"device_id": other[role], role: {}}}),
                              ("other_role", {"name": "config", "args": {"role": wrong_role, wrong_role: {}}}),
                              ("unknown", {"name": "pump_on", "args": {"strokes": 10 ** 6}})):
                cmd_id = f"campaign-{n}-{device_id:08x}-{tag}"
                asked[cmd_id] = (device_id, tag, dict(body, id=cmd_id))
        results, connected = {}, threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"prapa-campaign-cloud-{n}")
        client.on_connect = lambda c, *_a: (c.subscribe(ff.command_topic(S.SITE, "+", result=True), qos=1),
                                            connected.set())

        def on_message(_c, _u, msg):
            try:
                r = ff.decode_request(msg.payload)
            except ValueError:
                return
            if isinstance(r, dict) and r.get("id") in asked:
                results.setdefault(r["id"], r)             # the first answer: refused, or accepted
        client.on_message = on_message
        client.connect_async(self.site.broker.host, self.site.broker.port)
        client.loop_start()
        try:
            end = time.monotonic() + 20
            while time.monotonic() < end and len(results) < len(asked):
                if connected.wait(0.5) and self._gateway_up(5) is not None:
                    for cmd_id, (device_id, _tag, body) in asked.items():
                        if cmd_id not in results:     # a repeat of an id returns its first answer
                            client.publish(ff.command_topic(S.SITE, device_id), cbor2.dumps(body), qos=1)
                if self._idle_wait(2.0):
                    break
        finally:
            client.loop_stop()
            client.disconnect()
        for cmd_id, (device_id, tag, _body) in asked.items():
            r = results.get(cmd_id)
            self.bad_commands.append({"device": f"{device_id:08x}", "kind": tag, "state": r and r.get("state"),
                                      "field": r and r.get("field")})

    def _link_config(self):
        """Frames the board must refuse, from the bus side of its serial line (see the module's doc)."""
        import cbor2
        from protocol import framing, link, secure
        from protocol import messages as M
        from tools.rigs.gateway_rig import read_taps
        if len(self.site.boards) < 2:
            self.errors.append("link_config needs two boards (one's key is the stolen one)")
            return
        (_n, device_id, vb), (_m, other_id, other_vb) = self.rng.sample(self.site.boards, 2)
        self._target = f"{device_id:08x}"
        stolen = self.site.keys[other_id]
        counter = self.rng.randrange(1 << 20, 1 << 24)
        messages = [
            (M.CONFIG_PUSH, M.config_push(900_001, {"device_id": other_id, "role": other_vb.role, other_vb.role: {}})),
            (M.CONFIG_PUSH, M.config_push(900_002, {"device_id": device_id, "role": vb.role, vb.role: {},
                                                     "limits": {"max_rate_ml_h": 10 ** 6}})),
            (M.COMMAND, M.command(900_003, "reboot")),
        ]
        wire = b""
        for header_id in (other_id, device_id):          # the other's own frames; this board's id, the other's key
            sender = link.Sender(stolen, header_id, secure.DOWNLINK, secure.MemoryCounters(counter),
                                 addr=framing.ADDR_BROADCAST)
            for msg_type, m in messages:
                payload = bytearray(cbor2.dumps(m, canonical=True))       # as the gateway encodes a downlink
                n = sender.wire_into(msg_type, payload, len(payload))
                wire += bytes(sender.wire[:n])
        frames = 2 * len(messages)

        def latest():
            best = None
            for tap in read_taps(self.site.workdir).values():
                h = tap.get("health", {}).get(self._target)
                if h and h.get("t") is not None and (best is None or h["t"] > best["t"]):
                    best = h
            return best
        before, end = latest(), time.monotonic() + 30
        while (before is None or before.get("rejected") is None) and time.monotonic() < end:
            if self._idle_wait(0.5):
                return
            before = latest()
        record = {"device": self._target, "other": f"{other_id:08x}", "frames": frames, "refused": None,
                  "rebooted": False}
        self.link_configs.append(record)
        if before is None:
            return
        fd = os.open(vb.uart_port, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, wire)
        finally:
            os.close(fd)
        while time.monotonic() < end:
            if self._idle_wait(0.5):
                return
            now = latest()
            if now["boot"] != before["boot"]:
                record["rebooted"] = True
                return
            record["refused"] = now["rejected"] - before["rejected"]
            if record["refused"] >= frames and now["t"] > before["t"]:
                return

    def _gateway_up(self, timeout=30):
        """The gateway's process once it is up (the supervisor may be restarting it), else None."""
        gw, end = self.site.gateway, time.monotonic() + timeout
        while time.monotonic() < end:
            proc = gw.proc
            if proc.poll() is None and gw.started():
                return proc
            if self._idle_wait(0.1):
                return None
        return None

    def _metrics(self):
        import urllib.request
        from tools.rigs import attacks
        with urllib.request.urlopen(self.site.url + "metrics", timeout=5) as r:
            return attacks.parse_metrics(r.read().decode())

    def _udp_flood(self):
        from tools.rigs import attacks
        from tools.rigs.gateway_rig import read_taps
        proc = self._gateway_up()
        if proc is None:
            self.errors.append("udp_flood: the gateway was not up within 30 s")
            return
        taps = read_taps(self.site.workdir)
        captured, old_gateway, before_reboot = {}, 0, 0
        for pid, tap in taps.items():
            for hexid, frames in tap.get("captured", {}).items():
                for t, frame in frames:
                    if frame in captured:
                        continue
                    captured[frame] = hexid
                    old_gateway += pid != proc.pid
                    before_reboot += any(c > t for c in self.cut_times.get(hexid, ()))
        pool = [(hexid, bytes.fromhex(f)) for f, hexid in captured.items()]
        ids = [d for _n, d, _vb in self.site.boards]
        link = f"udp 127.0.0.1:{self.udp_port}"
        for phase, per_kind, pace in (("flood", FLOOD_PER_KIND, (0, 0.0)), ("counted", COUNTED_PER_KIND, (40, 0.02))):
            before, rss0 = self._metrics(), attacks.rss_kb(proc.pid)
            accepted0 = read_taps(self.site.workdir).get(proc.pid, {}).get("udp_accepted", 0)
            frames = attacks.attack_frames(pool, ids, self.rng, per_kind)
            started = time.monotonic()
            sent = attacks.send(frames, self.udp_port, pace_every=pace[0], pace_s=pace[1])
            send_s = time.monotonic() - started
            peak, last, stable = rss0, None, 0
            while stable < 2 and time.monotonic() - started < 20:       # until the link counts no more
                time.sleep(0.3)
                peak = max(peak, attacks.rss_kb(proc.pid))
                n = self._metrics()["received"].get(link, 0)
                stable = stable + 1 if n == last else 0
                last = n
            time.sleep(1.2)                 # the refusals reach /metrics once a second, the tap twice
            if proc.poll() is not None or self.site.gateway.proc is not proc:
                self.attacks.append({"phase": phase, "sent": sent, "problems": ["the gateway died during the attack"]})
                return
            grown = attacks.delta(before, self._metrics())
            accepted = read_taps(self.site.workdir).get(proc.pid, {}).get("udp_accepted", 0) - accepted0
            peak = max(peak, attacks.rss_kb(proc.pid))
            record = {"phase": phase, "sent": sent, "send_s": round(send_s, 3),
                      "arrived": grown["received"].get(link, 0), "accepted": accepted,
                      "refused": {r: n for r, n in sorted(grown["rejected"].items()) if n},
                      "rss_before_mb": round(rss0 / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
                      "replayed_from_killed_gateways": old_gateway, "replayed_from_before_reboots": before_reboot,
                      "problems": attacks.flood_verdict(sent, grown, link, accepted, rss0, peak,
                                                        exact=phase == "counted")}
            self.attacks.append(record)


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
        out["missing"] = sum(n for _b, _first, n in holes.get(hexid, ()))
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
            too_fast = gap is not None and limits.get("max_spm") and gap < 60 / limits["max_spm"] * 0.999
            out.update(unsafe_starts=world.get("unsafe_starts"), min_stroke_gap_s=gap,
                       limit_violations=(world.get("unsafe_starts") or 0) + (1 if too_fast else 0))
            if world.get("unsafe_starts"):
                out["problems"].append(f"the pump was driven on first after {world['unsafe_starts']} resets")
            if too_fast:
                out["problems"].append(f"strokes {gap} s apart: faster than max_spm {limits['max_spm']}")
        problems += [f"{hexid}: {p}" for p in out["problems"]]
    store.close()
    return {"devices": devices, "conflicts": conflicts, "invalid": invalid, "problems": problems}


def role_figures(devices):
    """The issue's figures per role from ledger_checks' devices: boards, resets survived (power cuts and
    watchdog resets), readings and alarms at the ledger, readings lost within and beyond the stated bound,
    entries never delivered (an acknowledged reading or a raised alarm lost), pump-limit violations."""
    out = {}
    for d in devices.values():
        r = out.setdefault(d["role"], {"boards": 0, "resets_survived": 0, "readings": 0, "alarms": 0,
                                       "lost_within_bound": 0, "lost_beyond_bound": 0, "entries_missing": 0,
                                       "limit_violations": 0})
        lost = max(0, d.get("lost", 0))
        beyond = max(0, lost - d.get("bound", lost))
        r["boards"] += 1
        r["resets_survived"] += d["cuts"]
        r["readings"] += d["readings"]
        r["alarms"] += d["alarms"]
        r["lost_within_bound"] += lost - beyond
        r["lost_beyond_bound"] += beyond
        r["entries_missing"] += d.get("missing", 0)
        r["limit_violations"] += d.get("limit_violations") or 0
    return out


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
    from tools.broker import free_port
    udp_port = free_port()              # (a TCP port free now; its UDP twin is free alike on a test host)
    site_args = argparse.Namespace(boards=args.boards, speed=args.speed, duration=duration, headless=True,
                                   report=None, board=args.board, workdir=str(workdir), keep=True,
                                   restart_limit=1000, vm=args.vm, wrap_ticks=True,
                                   gateway_entry="tools.rigs.gateway_rig",      # its clock steps, its tap
                                   gateway_extra=f'\n[[links]]\ntype = "udp"\nbind = "127.0.0.1:{udp_port}"\n')
    mounted = counts["disk_full"] > 0 and _mount_data(workdir / "data")
    site = S.Site(site_args, workdir)
    injector = Injector(site, schedule(counts, max(0.1, duration - WARMUP_S - args.quiet - 1), args.seed),
                        duration, args.quiet, args.seed, udp_port=udp_port)
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
    from tools.rigs.gateway_rig import read_taps
    taps = read_taps(workdir)
    events = {f"{d:08x}": vb.events for _n, d, vb in site.boards}
    (workdir / "board-events.json").write_text(json.dumps(events))     # each board host's events: resets, sleeps
    resets = board_resets(events, injector.cuts, injector.watchdog_resets, site.started,
                          time.time() - time.monotonic())
    attacks = attack_summary(injector.attacks, taps)
    heap = heap_figures(taps, site_report.get("boards", []), board_def.heap_budget_bytes)
    clock = time_checks(workdir / "ledger.db", injector.clock_steps, args.speed)
    verdict["problems"] += attacks["problems"] + heap["problems"] + [f"clock: {p}" for p in clock["problems"]]
    verdict["problems"] += command_problems(injector.bad_commands) + link_config_problems(injector.link_configs)
    report = {
        "seed": args.seed, "speed": args.speed, "hours": args.hours, "boards": args.boards,
        "seconds": round(time.monotonic() - started, 1), "workdir": str(workdir),
        "faults_planned": counts, "faults": injector.done, "restarts": len(site_report.get("restarts", [])),
        "gateway_rss_peak_mb": round(injector.gateway_rss_peak_kb / 1024, 1),
        "readings_made": site_report.get("totals", {}).get("readings_made"),        # committed by the gateway
        "readings_at_ledger": sum(d["readings"] for d in verdict["devices"].values()),  # stored by the cloud
        "replays_asked": site.ledger.replays_asked if site.ledger is not None else 0,
        "acks_withheld": _log_events(workdir / "gateway.log", "acks_withheld"),   # the disk guard, as logged
        "attacks": {**attacks, "bursts": injector.attacks, "uart_floods": injector.uart_floods},
        "heap": heap["roles"], "watchdog_resets": injector.watchdog_resets, "bad_commands": injector.bad_commands,
        "link_configs": injector.link_configs,
        "roles": role_figures(verdict["devices"]),
        "machine": {"cores": os.cpu_count(), "load_peak": injector.load_peak},  # over its cores: figures in doubt
        "resets": resets, "timeline": injector.timeline,
        "clock": {**clock, "steps": injector.clock_steps},
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
    a = report.get("attacks")
    if a and a["tried"]:
        lines.append(f"  attacks tried {sum(a['tried'].values())} (" + ", ".join(f"{k} {v}" for k, v in
                     sorted(a["tried"].items())) + f"), accepted {a['accepted_ever']}, refused by reason: " +
                     ", ".join(f"{r} {n}" for r, n in sorted(a["refused"].items())))
        for b in a["bursts"]:
            if "arrived" in b:
                lines.append(f"    {b['phase']}: {sum(b['sent'].values())} sent in {b['send_s']} s, {b['arrived']} "
                             f"arrived, {b['accepted']} accepted, gateway RSS {b['rss_before_mb']} -> "
                             f"{b['rss_peak_mb']} MB; replays of frames from killed gateways "
                             f"{b['replayed_from_killed_gateways']}, from before a board's reboot "
                             f"{b['replayed_from_before_reboots']}")
    if a and a["uart_floods"]:
        lines.append("  uart floods: " + ", ".join(f"{u['bytes']} B on {u['device']} in {u['seconds']} s "
                                                    f"(line full {u['line_full']} times)" for u in a["uart_floods"]))
    for role, h in (report.get("heap") or {}).items():
        lines.append(f"  heap {role}: lowest free {h['lowest_free']} of {h['budget']} bytes ({h['share']:.0%}), "
                     f"{h['reports']} health reports")
    if report.get("bad_commands"):
        cmds = report["bad_commands"]
        lines.append(f"  bad commands over MQTT: {len(cmds)} sent, " +
                     f"{sum(1 for c in cmds if c['state'] == 'refused')} refused (" +
                     ", ".join(sorted({f"{c['kind']}: {c['field']}" for c in cmds if c['state'] == 'refused'})) + ")")
    for r in report.get("link_configs") or ():
        lines.append(f"  link config on {r['device']} (key of {r['other']} stolen): {r['frames']} frames on its line, "
                     f"{r['refused']} refused by the board" + (", REBOOTED" if r["rebooted"] else ""))
    odd = {d: r["unplanned"] for d, r in (report.get("resets") or {}).items() if r["unplanned"]}
    if odd:
        lines.append("  resets the campaign did not make: " + "; ".join(
            f"{d} " + ", ".join(f"{u['cause']} at {u['at_s']} s" for u in us) for d, us in odd.items()))
    if report.get("watchdog_resets"):
        lines.append("  watchdog resets: " + ", ".join(f"{d} {n}" for d, n in report["watchdog_resets"].items()))
    c = report.get("clock")
    if c:
        lines.append(f"  clock: {len(c['steps'])} steps; readings {c['readings']}: on time {c['on_time']} (worst "
                     f"{c['max_error_s']} s, stated {c['tolerance_s']:g} s), stamped while stepped {c['stepped']} "
                     f"(off the exact step by up to {c['stepped_error_s']} s, the last {c['resync_lag_host_s']} s "
                     f"of the host's after the step was undone), off otherwise {c['off']}; boots stepped, true, then "
                     f"stepped again {len(c['flip_flop'])}, wall time going back within a boot {c['went_back']}, "
                     f"boots without a certain true origin {len(c['uncertain'])}")
    for role, r in (report.get("roles") or {}).items():
        lines.append(f"  {role}: {r['boards']} boards, {r['resets_survived']} power cuts and watchdog resets survived, "
                     f"{r['readings']} readings and {r['alarms']} alarms at the ledger; lost within the stated bound "
                     f"{r['lost_within_bound']}, beyond it {r['lost_beyond_bound']}; entries never delivered "
                     f"{r['entries_missing']}; pump-limit violations {r['limit_violations']}")
    m = report.get("machine")
    if m:
        lines.append(f"  machine: {m['cores']} cores, 1-minute load average up to {m['load_peak']:g}" +
                     (" (more than its cores: boards ran late; lower --speed or --boards)"
                      if m["load_peak"] > (m["cores"] or 1) * 1.5 else ""))
    for hexid, d in report["devices"].items():
        extra = (f", register {d['register']} of {d['truth']} ({d['lost']} lost, bound {d['bound']})"
                 if "truth" in d else "")
        lines.append(f"  {hexid} {d['role']}: {d['readings']} readings, {d['alarms']} alarms, {d['boots']} boots, "
                     f"{d['cuts']} cuts{extra}" + (f"; PROBLEM: {'; '.join(d['problems'])}" if d["problems"] else ""))
    lines.append("every check held" if report["ok"] else "FAILED: " + "; ".join(report["problems"][:5]))
    return "\n".join(lines)
