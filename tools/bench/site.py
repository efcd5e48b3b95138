"""prapa bench site: what `prapa site` costs, and how many boards this machine runs.

Runs `prapa site --headless` for a while at 1x and at 100x board speed and
measures the seconds from the command to the first reading at the broker, and
per virtual board (its bench process plus its MicroPython VM) the CPU share and
the resident memory, read from /proc. The boards this machine runs at a speed
is the smaller of what its cores and its memory allow at those costs, keeping
half the cores for the gateway, the broker and the host; the run itself checks
that every board delivered and that the broker got everything the gateway
committed. --vm picks the boards' MicroPython VM (default: $PRAPA_VM, else unix32
when built, else unix64); "vm" in the figures says which ran.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.bench import bench_vm, print_figures
from tools.sim import vm as vms
from tools import args as types

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("vm", "the MicroPython VM the boards ran on"),
    ("speed_*x_seconds_to_first_reading_at_broker", "seconds from the command to the first reading at the broker"),
    ("speed_1x_cpu_share_per_board", "CPU share (of one core) a board takes, bench process and VM"),
    ("speed_100x_cpu_share_per_board", "the same at 100x board speed, against 1x", "speed_1x_cpu_share_per_board"),
    ("speed_1x_rss_mb_per_board", "resident memory per board, bench process and VM"),
    ("speed_100x_rss_mb_per_board", "the same at 100x board speed, against 1x", "speed_1x_rss_mb_per_board"),
    ("speed_*x_boards_this_machine_runs", "boards this machine runs at that cost, half its cores and memory kept back"),
    ("speed_*x_every_board_delivered", "every board had a reading at the broker"),
    ("speed_*x_broker_has_all_committed", "the broker got every reading the boards made"),
    ("machine_cores", "this machine's cores"),
    ("machine_memory_gb", "this machine's memory"),
)
RATIOS = ()


def add_parser(bsub, parser_class):
    p = bsub.add_parser("site", help="time to the first reading, per-board CPU and memory, boards per machine",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--boards", type=types.count, default=4, help="boards per run (default 4)")
    p.add_argument("--seconds", type=types.positive_seconds, default=30, help="seconds per run (default 30)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(p)
    p.set_defaults(func=run)


def _procs():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(d)] = {"ppid": int(fields[1]), "cpu": (int(fields[11]) + int(fields[12])) / TICK,
                           "rss": int(fields[21]) * PAGE, "cmd": cmd}
    return out


def _board_processes(procs, root):
    """The bench processes (`board run`) under root, each with its descendants (the VM)."""
    kids = {}
    for pid, p in procs.items():
        kids.setdefault(p["ppid"], []).append(pid)

    def tree(pid):
        yield pid
        for k in kids.get(pid, ()):
            yield from tree(k)
    return [list(tree(pid)) for pid in tree(root) if " board run " in procs[pid]["cmd"]]


def one_run(boards, speed, seconds, vm=None):
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        log = Path(tmp) / "site.log"         # a file, not a pipe nobody reads: a chatty site cannot block on it
        t0 = time.monotonic()
        with open(log, "wb") as err:
            site = subprocess.Popen([sys.executable, "-m", "tools.cli", "site", "--headless", "--boards", str(boards),
                                     "--speed", str(speed), "--duration", str(seconds), "--workdir", f"{tmp}/site",
                                     "--report", str(report), *(["--vm", vm] if vm else [])],
                                    stdout=subprocess.DEVNULL, stderr=err)
        time.sleep(min(10, seconds / 3))
        first = _procs()
        t_first = time.monotonic()
        time.sleep(seconds / 2)
        last = _procs()
        t_last = time.monotonic()
        site.wait(seconds + 120)
        elapsed = time.monotonic() - t0
        if not report.exists():
            said = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"prapa site --speed {speed} exited {site.returncode} without its report: "
                               + " / ".join(said))
        data = json.loads(report.read_text())
    cpu, rss = [], []
    for group in _board_processes(last, site.pid):
        cpu.append(sum(last[p]["cpu"] - first.get(p, last[p])["cpu"] for p in group) / (t_last - t_first))
        rss.append(sum(last[p]["rss"] for p in group))
    return data, cpu, rss, elapsed


def run(args):
    print_figures(measure(args), args.json)
    return 0


def measure(args):
    """The figures of one run (a dict): a site at 1x, then at 100x."""
    vm = bench_vm(args)
    figures = {"vm": vm}
    cores = os.cpu_count()
    mem = os.sysconf("SC_PHYS_PAGES") * PAGE
    for speed in (1, 100):
        data, cpu, rss, _ = one_run(args.boards, speed, args.seconds, vm)
        rows = data["boards"]
        per_cpu = sum(cpu) / len(cpu)
        per_rss = sum(rss) / len(rss)
        fit = int(min(cores / 2 / max(per_cpu, 1e-6), mem / 2 / per_rss))
        figures[f"speed_{speed}x_seconds_to_first_reading_at_broker"] = data["totals"]["seconds_to_first_reading_at_broker"]
        figures[f"speed_{speed}x_cpu_share_per_board"] = round(per_cpu, 3)
        figures[f"speed_{speed}x_rss_mb_per_board"] = round(per_rss / 2**20, 1)
        figures[f"speed_{speed}x_boards_this_machine_runs"] = fit
        figures[f"speed_{speed}x_every_board_delivered"] = all(r["readings_at_broker"] > 0 for r in rows)
        figures[f"speed_{speed}x_broker_has_all_committed"] = all(r["readings_at_broker"] >= r["readings_made"]
                                                                  for r in rows)
    figures["machine_cores"] = cores
    figures["machine_memory_gb"] = round(mem / 2**30, 1)
    return figures
