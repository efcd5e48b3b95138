"""prapa bench all: every benchmark of our own stack in one run, one table, one record.

  prapa bench all [--quick] [--json FILE] [--vm unix32|unix64]

Runs boot, protocol, gateway_forward, gateway, scaling, firmware, doser, drain, site, durability and
peers in that order, in this process, each through its own measure function with its own options
(BENCHMARKS below): its defaults, or with --quick the small counts listed there, so the whole run takes
about a minute on a 2-core machine (a quick run's figures show the shape, not the values). The peer
(the ThingsBoard IoT Gateway: `peers`, and the peer half of `durability`) runs in full runs only, where
its venv is built (`prapa bench peers --setup`) and `unshare -n` is allowed; otherwise it is skipped
with the reason. Progress goes to stderr; stdout gets one table: figure, value, baseline, ratio.

--json FILE writes the record (FILE is replaced): the command line, the git commit ("unknown" outside a
repository) and whether the tree had uncommitted changes, the machine (cores, CPU model from
/proc/cpuinfo, memory, the 1-minute load average at the start and the end), the Python and the VM, the
date (UTC, ISO 8601), and per benchmark its command, its status (ran, skipped or failed, with the
reason) and its figures: each with its value, a one-line meaning, and where it has one its baseline (a
figure of the same run), the baseline's value and the ratio value / baseline, recomputed here from the
two (the ratios a benchmark prints itself, its RATIOS, are left out: the row's ratio replaces them).
`python -m tools.bench.report FILE` turns the record into docs/benchmarks.md.

What each figure means and what it is compared to is declared beside the code that measures it: a
module's FIGURES rows (figure, meaning[, baseline]; a `*` in a name matches a family of figures, as
profile_*_tap_in_band_share) and RATIOS. A figure no row declares is recorded with no meaning.

A benchmark that needs something missing (the VM not built, Mosquitto not installed) is skipped with
the reason; one that fails is recorded as failed with its error, and the rest still run.

Exit codes: 0 every benchmark ran or was skipped; 1 one failed (the table and record are still
written); 2 bad arguments.
"""

import contextlib
import datetime
import fnmatch
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import UsageError
from tools import args as types
from tools.sim import vm as vms

REPO = Path(__file__).resolve().parents[2]
QUICK_STEADY_READINGS = 3_200       # gateway: the latency run's readings with --quick (its own default: 25,600)


@dataclass(frozen=True)
class Benchmark:
    name: str
    about: str
    quick: tuple                     # the benchmark's own options for --quick; None: full runs only
    needs: tuple = ()                # "vm", "mosquitto", "peer": checked first; missing, the benchmark is skipped
    full: tuple = ()                 # its options in a full run (beside its defaults)

    def command(self, options):
        if self.name == "gateway_forward":
            return shlex.join(["python", "-m", "tools.bench.gateway_forward", *options])
        return shlex.join(["prapa", "bench", self.name, *options])


BENCHMARKS = (
    Benchmark("boot", "power-on to the app's banner on a virtual board, against a bare VM start; heap after boot",
              ("--boots", "3"), ("vm",)),
    Benchmark("protocol", "wire bytes per reading against SenML and ThingsBoard JSON; board CPU and heap per report; "
              "the gateway's receive rate against cbor2 + AESCCM", ("--reports", "200", "--frames", "2000"), ("vm",)),
    Benchmark("gateway_forward", "the store and forwarder alone: entries/s committed and PUBACKed, against bare paho "
              "and commits alone", ("--entries", "1920", "--steady-seconds", "1"), ("mosquitto",)),
    Benchmark("gateway", "the whole gateway service, frames on a serial line to PUBACKs, against bare paho; "
              "latency; memory", ("--readings", "3200", "--devices", "10"), ("mosquitto",)),
    Benchmark("scaling", "the gateway over UDP at 10 to 5,000 meters, each with its own key: readings/s, CPU, "
              "memory and latency against the 10-device run",
              ("--devices", "10,1000", "--readings", "3200", "--steady-readings", "1600"), ("mosquitto",)),
    Benchmark("firmware", "the meter runtime on a virtual board: timer lateness under load against idle, heap, "
              "flash wear, pulses lost per power cut", ("--jitter-s", "1", "--days", "0.05", "--cuts", "3"), ("vm",)),
    Benchmark("doser", "the chlorine doser through simulated days: strokes and solution against the ideal, far-tap "
              "band share, timer lateness, heap", ("--speed", "50000", "--profiles", "0", "--jitter-s", "1"), ("vm",)),
    Benchmark("drain", "storm drains: alarm lead time before overflow, false alarms, ranking, battery life, heap",
              ("--storms", "2", "--drains", "3", "--days", "2", "--wakes", "1", "--heap-hours", "0.05"), ("vm",)),
    Benchmark("site", "prapa site: seconds to the first reading, CPU and memory per board at 1x and 100x, boards "
              "per machine", ("--boards", "1", "--seconds", "3"), ("vm", "mosquitto")),
    Benchmark("durability", "SIGKILL each gateway a few ms after the last send, upstream down: accepted readings "
              "lost (goal 0) and duplicates, ours beside the ThingsBoard IoT Gateway's",
              ("--rounds", "2", "--readings", "640", "--no-peer"), ("mosquitto",)),
    Benchmark("peers", "our gateway beside the ThingsBoard IoT Gateway 3.8.5, same run, same load: readings/s, CPU "
              "per 100k, peak RSS, latency, duplicates; its UDP connector too", None, ("mosquitto", "peer"),
              ("--udp",)),
)


def add_parser(bsub):
    p = bsub.add_parser("all", help="every benchmark of our stack: one table, and with --json one record",
                        description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts: the whole run in under a minute")
    p.add_argument("--json", metavar="FILE", type=types.file_to_write,
                   help="write the record here (replaced): python -m tools.bench.report FILE makes the doc")
    vms.add_argument(p)
    p.set_defaults(func=run)


# -- one benchmark --------------------------------------------------------------------------------
def _options(bench, quick, vm):
    return [*((bench.quick or ()) if quick else bench.full), *(["--vm", vm] if vm and "vm" in bench.needs else [])]


def _missing(bench, vm, quick=False):
    """Why bench cannot run here (the fix included), or None."""
    if quick and bench.quick is None:
        return f"full runs only (prapa bench all without --quick; alone: prapa bench {bench.name} --quick)"
    if "peer" in bench.needs:
        from tools.bench import peers
        problem = peers.problem()
        if problem:
            return f"{problem.problem}; fix: {problem.fix}"
    if "vm" in bench.needs:
        try:
            vms.micropython_exe(vm)
        except UsageError as e:
            return str(e)
    if "mosquitto" in bench.needs:
        from tools.broker import mosquitto_exe
        try:
            mosquitto_exe()
        except FileNotFoundError as e:
            return str(e)
    return None


def _measure(bench, options, quick):
    """The benchmark's figures dict, from its own measure function and its own parser's reading of options."""
    from tools import bench as boot
    from tools.bench import gateway, gateway_forward
    if bench.name == "gateway_forward":
        return gateway_forward.measure(gateway_forward.parser().parse_args([*options, "--json"])), gateway_forward
    from tools.cli import build_parser
    args = build_parser().parse_args(["bench", bench.name, *options, "--json"])
    if bench.name == "boot":
        return boot.measure_boot(args), boot
    if bench.name == "gateway":
        return gateway.measure(args.readings, args.devices,
                               *([QUICK_STEADY_READINGS] if quick else [])), gateway
    module = importlib.import_module(f"tools.bench.{bench.name}")
    return module.measure(args), module


def _declared(module):
    if module.__name__ == "tools.bench":
        return module.BOOT_FIGURES, module.BOOT_RATIOS
    return getattr(module, "FIGURES", ()), getattr(module, "RATIOS", ())


def flatten(figures, prefix=""):
    """{"a": {"b": 1}, "c": [2, 3]} -> {"a.b": 1, "c[0]": 2, "c[1]": 3}, in the benchmark's order."""
    out = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.update(flatten({f"[{i}]": v for i, v in enumerate(value)}, name))
        else:
            out[name] = value
    return out


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ratio(value, baseline):
    """value / baseline to 4 significant digits; None unless both are numbers and the baseline is not 0."""
    if not (_number(value) and _number(baseline)) or baseline == 0:
        return None
    return float(f"{value / baseline:.4g}")


def rows(figures, declared, ratios=()):
    """The record's figure rows: one per figure, or one per baseline it is compared to."""
    flat = flatten(figures)
    out = []
    for key, value in flat.items():
        if key in ratios:
            continue
        specs = ([d for d in declared if d[0] == key]            # a figure's own rows, else its family's
                 or [d for d in declared if "*" in d[0] and fnmatch.fnmatchcase(key, d[0])])
        measured = [d for d in specs if len(d) < 3 or d[2] in flat]     # a baseline this run did not measure: none
        for spec in measured or [(key, specs[0][1] if specs else None)]:
            row = {"figure": key, "value": value, "meaning": spec[1]}
            if len(spec) > 2:
                base = flat[spec[2]]
                row.update(baseline=spec[2], baseline_value=base, ratio=ratio(value, base))
            out.append(row)
    return out


def run_one(bench, quick, vm):
    """One benchmark's entry in the record: run (figures), skipped (reason) or failed (error)."""
    options = _options(bench, quick, vm)
    entry = {"name": bench.name, "about": bench.about, "command": bench.command(options)}
    if bench.name == "gateway" and quick:
        entry["command"] += f" (latency run: {QUICK_STEADY_READINGS} readings)"
    reason = _missing(bench, vm, quick)
    if reason:
        return dict(entry, status="skipped", reason=reason, seconds=0.0, figures=[])
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):        # stdout is the table's
            figures, module = _measure(bench, options, quick)
    except Exception as e:                                   # noqa: BLE001: one failure must not lose the rest
        problem = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
        return dict(entry, status="failed", reason=problem[:500], seconds=round(time.monotonic() - t0, 1),
                    figures=[])
    return dict(entry, status="ran", seconds=round(time.monotonic() - t0, 1), figures=rows(figures, *_declared(module)))


# -- the run as a whole -----------------------------------------------------------------------------
def _git(*args):
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine():
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"cores": os.cpu_count(), "cpu_model": model or platform.processor() or "unknown",
            "memory_gb": round(memory / 2**30, 1), "system": f"{platform.system()} {platform.release()}",
            "load_avg_1m_at_start": _load()}


def _load():
    """The 1-minute load average: what else this machine was doing (figures taken under load are slower)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _vm(vm):
    try:
        name = vms.resolve(vm)
    except UsageError as e:
        return {"name": None, "about": str(e)}
    return {"name": name, "about": vms.ABOUT[name]}


def command_line(args):
    return shlex.join(["prapa", "bench", "all", *(["--quick"] if args.quick else []),
                       *(["--vm", args.vm] if args.vm else []), *(["--json", args.json] if args.json else [])])


def record(args, progress=lambda line: print(line, file=sys.stderr, flush=True)):
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    out = {
        "command": command_line(args), "quick": args.quick,
        "commit": commit or "unknown", "uncommitted_changes": bool(status) if commit else None,
        "machine": machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "vm": _vm(args.vm),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmarks": [],
    }
    t0 = time.monotonic()
    for i, bench in enumerate(BENCHMARKS, 1):
        progress(f"[{i}/{len(BENCHMARKS)}] {bench.name}: {bench.command(_options(bench, args.quick, args.vm))}")
        entry = run_one(bench, args.quick, args.vm)
        out["benchmarks"].append(entry)
        said = {"ran": f"{len(entry['figures'])} figures", "skipped": f"skipped: {entry.get('reason')}",
                "failed": f"FAILED: {entry.get('reason')}"}[entry["status"]]
        progress(f"[{i}/{len(BENCHMARKS)}] {bench.name}: {said} ({entry['seconds']} s)")
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["machine"]["load_avg_1m_at_end"] = _load()
    return out


def write_json(path, data):
    """Replace path with data as JSON: a sibling written first, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(args):
    from tools.bench import report
    if args.vm:
        vms.resolve(args.vm)                 # an unknown VM is bad input (exit 2); an unbuilt one skips
    data = record(args)
    print(report.text_table(data))
    if args.json:
        write_json(args.json, data)
        print(f"record written to {args.json} ({data['seconds']} s); the doc: python -m tools.bench.report "
              f"{args.json}", file=sys.stderr)
    return 1 if any(b["status"] == "failed" for b in data["benchmarks"]) else 0
