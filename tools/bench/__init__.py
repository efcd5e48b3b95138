"""prapa bench: figures, printed as ratios to a baseline measured in the same run.

  protocol  wire bytes per meter reading vs SenML-CBOR and JSON; board CPU
            and heap per report (VM); gateway receive rate vs cbor2 + AESCCM.
  site      seconds to the first reading at the broker; per-board CPU and memory at
            1x and 100x; how many boards this machine runs
  gateway   readings/s through the gateway service (frames in, PUBACKs out) vs
            bare paho; commit-to-PUBACK latency; the service's peak RSS
  scaling   readings/s, CPU per 100k, RSS and commit-to-PUBACK p99 of the gateway against device count
            (UDP, 10 to 5,000 meters, each its own key), each against the 10-device run
  firmware  sampling jitter under load, heap peak, flash wear and life, pulses
            lost per power cut (the meter runtime on a virtual board)
  doser     stroke count error, solution delivered vs ideal, far-tap share in band for
            three demand profiles, control-timer lateness and heap (a simulated day each)
  drain     detection lead time before overflow over seeded storms, false alarms per
            drain-month, the blocked drain ranked first, battery life, heap (the board's
            logic on the VM against the world model; power and heap on virtual boards)
  durability  SIGKILL our gateway and the ThingsBoard IoT Gateway a few ms after the last send, upstream
            down: readings the sender saw accepted that never reach the subscriber (goal 0), duplicates
  peers     our gateway beside the ThingsBoard IoT Gateway 3.8.5 (a venv of its own, a loopback-only
            namespace), same run, same load: readings/s, CPU per 100k, peak RSS, latency; ratios
  boot   power-on to the app's banner on a virtual board, against a bare start
         of the same MicroPython VM (same heap); heap free after boot in bytes
         and as a share of the board's budget.
  all       every benchmark of our stack above in one run (`prapa bench all [--quick] [--json FILE]`;
            --quick: small counts, the whole run under a minute): one table of figure, value,
            baseline and ratio, and with --json FILE one record of it (each figure with its meaning,
            baseline and ratio; the command, commit, machine, Python, VM and date). See tools/bench/suite.py.
  report    docs/benchmarks.md from that record (`prapa bench report FILE.json [--check]`, also
            `python -m tools.bench.report`): generated, never edited by hand; --check exits 1 when the
            page is not what the record gives.

The benchmarks that run firmware (boot, protocol, firmware, site) take --vm: unix32
(the reference: an ESP32's word size and float width, the board's heap budget in bytes)
or unix64; the default is $PRAPA_VM, else unix32 when built, else unix64. Each prints
the VM it used ("vm").
"""

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from protocol.errors import BoardError
from tools import boards
from tools.console import ConsoleReader, parse_banner
from tools.sim import vm as vms
from tools import args as types


def add_parser(sub):
    p = sub.add_parser("bench", help="measure and print figures", description=__doc__)
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", parser_class=type(p))
    bsub.required = True
    boot = bsub.add_parser("boot", help="virtual board boot time and heap after boot",
                           description="Boot a virtual board N times (power cut and restore) and a bare VM N times.")
    boot.add_argument("--board", default="esp32-devkitc")
    boot.add_argument("--role", default="meter")
    boot.add_argument("--boots", type=types.count, default=20, help="boots to time (default 20)")
    boot.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(boot)
    boot.set_defaults(func=bench_boot)
    from tools.bench import doser, drain, durability, firmware, gateway, peers, protocol, scaling, site
    for subject in (protocol, site, firmware, gateway, scaling, doser, drain, durability, peers):
        subject.add_parser(bsub, type(p))
    from tools.bench import report, suite
    suite.add_parser(bsub)
    report.add_parser(bsub)


def bench_vm(args):
    """The VM a benchmark runs on (--vm, else $PRAPA_VM, else unix32 when built, else unix64), refused
    with the fix (exit 2) before anything starts when it is unknown or not built."""
    vm = vms.resolve(getattr(args, "vm", None))
    vms.micropython_exe(vm)
    return vm


def _bare_vm_ms(board, n, vm=None):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([vms.micropython_exe(vm), "-X", board.heapsize_option(vm), "-c", "print(1)"], check=True,
                       capture_output=True)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench_boot(args):
    print_figures(measure_boot(args), args.json)
    return 0


# What each boot figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# BOOT_RATIOS are the ratios bench boot prints, which the record recomputes from the rows instead.
BOOT_FIGURES = (
    ("board", "the board definition booted"),
    ("role", "the role it booted"),
    ("vm", "the MicroPython VM it ran on"),
    ("boots", "boots timed"),
    ("bare_vm_start_ms_median", "a bare start of the same VM with the same heap (print(1)), median"),
    ("board_boot_ms_median", "power-on to the app's banner, median, against a bare VM start", "bare_vm_start_ms_median"),
    ("board_boot_ms_max", "power-on to the app's banner, slowest"),
    ("heap_budget_bytes", "the board's heap budget"),
    ("heap_free_after_boot_bytes", "heap free after boot, median, against the budget", "heap_budget_bytes"),
)
BOOT_RATIOS = ("boot_vs_bare_vm_ratio", "heap_free_after_boot_share")


def measure_boot(args):
    """The boot figures of one run (a dict)."""
    from tools.sim.process import BoardProcess
    board = boards.load(args.board)
    board.check_role(args.role)
    vm = bench_vm(args)
    bare = _bare_vm_ms(board, args.boots, vm)
    boots, shares, free = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        vb = BoardProcess(args.board, args.role, Path(tmp) / "flash.img", vm=vm)
        try:
            with ConsoleReader(vb.console_port) as console:
                try:
                    console.wait_for(parse_banner, timeout=5)   # the first boot's (unless it came before we listened)
                except BoardError:
                    pass
                for _ in range(args.boots):
                    after = len(console.lines)
                    t0 = time.perf_counter()
                    vb.power_cut()
                    _i, banner = console.wait_for(parse_banner, after=after, timeout=20)
                    boots.append((time.perf_counter() - t0) * 1000)
                    shares.append(banner["heap_free"] / banner["heap_budget"])
                    free.append(banner["heap_free"])
        finally:
            vb.close()
    return {
        "board": board.name, "role": args.role, "vm": vm, "boots": args.boots,
        "bare_vm_start_ms_median": round(statistics.median(bare), 1),
        "board_boot_ms_median": round(statistics.median(boots), 1),
        "board_boot_ms_max": round(max(boots), 1),
        "boot_vs_bare_vm_ratio": round(statistics.median(boots) / statistics.median(bare), 2),
        "heap_budget_bytes": board.heap_budget_bytes,
        "heap_free_after_boot_bytes": round(statistics.median(free)),
        "heap_free_after_boot_share": round(statistics.median(shares), 3),
    }


def print_figures(figures, as_json):
    if as_json:
        print(json.dumps(figures))
    else:
        width = max(len(k) for k in figures) + 2
        for k, v in figures.items():
            print(f"{k:{width}} {v}")
