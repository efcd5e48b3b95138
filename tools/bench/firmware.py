"""prapa bench firmware: the meter runtime's figures on a virtual board.

  jitter   sampling-timer lateness p50/p99/max (board time, real-time speed) with
           50 Hz bouncing pulses, a checkpoint every 10 pulses, the link and GC
           busy, against the same board idle (no flow) in the same run
  heap     the heap's peak use as a share of the board's budget, and the free heap at
           that peak in bytes beside the budget in bytes (minimum free after
           collection, from the board's health reports); on unix32 the VM's heap is
           the budget in bytes, as on the board
  flash    file commits and block erases per day at defaults for a meter using
           2 m3/day, the flash life they imply with littlefs wear levelling,
           against a design that writes once per pulse
  cuts     pulses lost per power cut at default checkpoints, against the bound

The virtual board runs the hard timer from its asyncio loop, so its jitter is
the delay other tasks cause; on an ESP32 the hard timer preempts them and the
figure is an upper bound. --vm picks the MicroPython VM (default: $PRAPA_VM, else
unix32 when built, else unix64); "vm" in the figures says which ran.
"""

import random
import statistics
import tempfile
import time
from pathlib import Path

from tools.bench import bench_vm, print_figures
from tools.sim import vm as vms
from tools import args as types

ERASE_CYCLES = 100_000          # NOR flash endurance per sector (ESP32 modules: 100k)

# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("vm", "the MicroPython VM the board ran on"),
    ("jitter_idle_us_p50_p99_max[0]", "sampling-timer lateness, idle board, median (us)"),
    ("jitter_idle_us_p50_p99_max[1]", "the same, 99th percentile"),
    ("jitter_idle_us_p50_p99_max[2]", "the same, maximum"),
    ("jitter_load_us_p50_p99_max[0]", "sampling-timer lateness with 50 Hz bouncing pulses and the link busy, median, "
     "against idle", "jitter_idle_us_p50_p99_max[0]"),
    ("jitter_load_us_p50_p99_max[1]", "the same, 99th percentile", "jitter_idle_us_p50_p99_max[1]"),
    ("jitter_load_us_p50_p99_max[2]", "the same, maximum", "jitter_idle_us_p50_p99_max[2]"),
    ("heap_peak_share_of_budget", "the heap's peak use as a share of the board's budget"),
    ("heap_budget_bytes", "the board's heap budget"),
    ("heap_free_at_peak_bytes", "free heap at the peak, against the budget", "heap_budget_bytes"),
    ("flash_commits_per_day", "file commits a day at defaults (2 m3/day), against a commit per pulse",
     "flash_commits_per_day_one_per_pulse"),
    ("flash_commits_per_day_one_per_pulse", "commits a day of a design that writes once per pulse"),
    ("flash_block_erases_per_day", "flash block erases a day at defaults"),
    ("flash_life_years_levelled", "flash life at that rate with littlefs wear levelling (100k cycles a block), "
     "against every commit erasing a block", "flash_life_years_if_every_commit_erased_a_block"),
    ("flash_life_years_if_every_commit_erased_a_block", "flash life if every commit cost a block erase"),
    ("pulses_lost_per_cut_mean", "pulses lost per power cut, mean, against the checkpoint bound",
     "pulses_lost_per_cut_bound"),
    ("pulses_lost_per_cut_max", "pulses lost per power cut, worst, against the bound", "pulses_lost_per_cut_bound"),
    ("pulses_lost_per_cut_bound", "the bound: pulses between checkpoints at defaults"),
)
RATIOS = ("jitter_p99_ratio_load_to_idle", "heap_free_at_peak_share", "flash_commit_ratio_to_one_per_pulse")


def add_parser(bsub, parser_class):
    p = bsub.add_parser("firmware", help="sampling jitter, heap peak, flash wear, loss per power cut",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--jitter-s", type=types.positive_seconds, default=25, help="seconds of each jitter run (default 25)")
    p.add_argument("--days", type=types.positive_seconds, default=3, help="simulated days for the flash figures (default 3)")
    p.add_argument("--cuts", type=types.count, default=60, help="power cuts for the loss figure (default 60)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(p)
    p.set_defaults(func=run)


def _health_after(rig, seconds, after_uptime):
    end = time.monotonic() + seconds + 30
    while time.monotonic() < end:
        h = rig.gateway.health()
        if h and h[1] >= after_uptime:
            return h
        time.sleep(0.2)
    raise RuntimeError("no health report from the board")


def jitter_run(tmp, flow_lpm, seconds, vm=None):
    from tools.rigs.board import Rig
    rig = Rig(tmp, "meter", {"interval_min": 1, "debounce_us": 5000}, speed=1,
              extra={"link": {"health_s": 10}}, world=[f"flow_meter.forced_lpm={flow_lpm}"], vm=vm)
    try:
        h = _health_after(rig, seconds, seconds)
        return h[9], h[3], rig.board.board.heap_budget_bytes
    finally:
        rig.close()


def flash_run(tmp, days, vm=None):
    """Defaults (15 min, checkpoint 10 pulses / 60 s), 2000 L/day in household draws, K = 1 L."""
    from tools.rigs.board import Rig
    speed = 10_000
    rig = Rig(tmp, "meter", speed=speed, extra={"link": {"sample_ms": 1000, "health_s": 3600}},
              world=["flow_meter.daily_litres=2000"], vm=vm)
    try:
        first = _health_after(rig, 2, 3600)
        time.sleep(days * 86400 / speed)
        last = _health_after(rig, 5, first[1] + days * 86400)
        pulses = rig.truth_count()
        erases = int(rig.board_exec("import _vboard; print(_vboard.PARAMS['bdev'].erases)"))
        board = rig.board.board
        return first, last, pulses, erases, board
    finally:
        rig.close()


def run(args):
    print_figures(measure(args), args.json)
    return 0


def measure(args):
    """The figures of one run (a dict)."""
    from tools.rigs.board import Rig
    from tools.rigs.power_cut import power_cut_campaign
    vm = bench_vm(args)
    figures = {"vm": vm}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "idle").mkdir()
        (tmp / "load").mkdir()
        idle, _, _ = jitter_run(tmp / "idle", 0, args.jitter_s, vm)
        load, heap_min, budget = jitter_run(tmp / "load", 3000, args.jitter_s, vm)
        figures["jitter_idle_us_p50_p99_max"] = [idle[0], idle[1], idle[2]]
        figures["jitter_load_us_p50_p99_max"] = [load[0], load[1], load[2]]
        figures["jitter_p99_ratio_load_to_idle"] = round(load[1] / max(idle[1], 100), 2)
        figures["heap_peak_share_of_budget"] = round(1 - heap_min / budget, 3)
        figures["heap_budget_bytes"] = budget
        figures["heap_free_at_peak_bytes"] = heap_min
        figures["heap_free_at_peak_share"] = round(heap_min / budget, 3)

        (tmp / "flash").mkdir()
        first, last, pulses, erases, board = flash_run(tmp / "flash", args.days, vm)
        days = (last[1] - first[1]) / 86400
        writes_per_day = (last[8] - first[8]) / days
        figures["flash_commits_per_day"] = round(writes_per_day, 1)
        figures["flash_commits_per_day_one_per_pulse"] = round(pulses / (last[1] / 86400), 1)
        figures["flash_commit_ratio_to_one_per_pulse"] = round(
            writes_per_day / max(figures["flash_commits_per_day_one_per_pulse"], 1), 3)
        erases_per_day = erases / (last[1] / 86400)
        blocks = board.vfs_size_bytes // board.block_size
        figures["flash_block_erases_per_day"] = round(erases_per_day, 1)
        figures["flash_life_years_levelled"] = round(blocks * ERASE_CYCLES / max(erases_per_day, 1e-9) / 365)
        figures["flash_life_years_if_every_commit_erased_a_block"] = round(
            blocks * ERASE_CYCLES / max(writes_per_day, 1e-9) / 365)

        (tmp / "cuts").mkdir()
        rig = Rig(tmp / "cuts", "meter", speed=100, world=["flow_meter.forced_lpm=10"], vm=vm)
        try:
            losses = power_cut_campaign(rig, args.cuts, random.Random(3), busy=10)
        finally:
            rig.close()
        figures["pulses_lost_per_cut_mean"] = round(statistics.mean(losses), 2)
        figures["pulses_lost_per_cut_max"] = max(losses)
        figures["pulses_lost_per_cut_bound"] = 10
    return figures
