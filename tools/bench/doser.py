"""prapa bench doser: the chlorine doser on a virtual board against the world's plant, a simulated day a run.

  exactness  a calibrated pump (no stroke error), the trim off: strokes the board counted against
             strokes the pump made (goal: ratio 1, error 0) and against the feed-forward schedule
             (the day's litres x dose / (strength x stroke)); solution delivered against the ideal
             (litres x dose / strength; goal within 1 %)
  profiles   the far tap's share of the day within 0.2-0.5 mg/L for demand profiles 0, 1, 2 (the
             world's demand_profile: daily swing; flat; strong swing with an afternoon of rain),
             the outlet's maximum against the residual ceiling
  board      the control timer's lateness p50/p99/max in real time (speed 1, from the board's
             health reports) with a stroke a second checkpointed to flash and readings and health
             going over the link, against an idle board in the same run; and the heap's low-water
             mark as a share of the board's budget (goal: at least 40 % free)

Each run is one simulated day at --speed (default 2000x: about 45 s). --vm picks the VM.
"""

import tempfile
import time
from pathlib import Path

from tools.bench import bench_vm, print_figures
from tools.sim import vm as vms
from tools import args as types

FAST = {"link": {"sample_ms": 1000, "health_s": 600}}
DAY_US = 86400e6

# What each figure means and, for a ratio, its baseline (read by prapa bench all and docs/benchmarks.md);
# RATIOS are the ratios this module prints, which the record recomputes from the rows instead.
FIGURES = (
    ("vm", "the MicroPython VM the board ran on"),
    ("speed", "board clock speed of the simulated days"),
    ("strokes_made", "pump strokes the world's pump made in the exactness day"),
    ("strokes_counted", "strokes the board counted and reported, against those made", "strokes_made"),
    ("stroke_count_error", "strokes counted minus strokes made (goal 0)"),
    ("strokes_vs_schedule_ratio", "strokes made over the feed-forward schedule (litres x dose / strength x stroke)"),
    ("solution_delivered_ml", "solution the pump delivered in the day, against the ideal (goal within 1 %)",
     "solution_ideal_ml"),
    ("solution_ideal_ml", "the ideal: the day's litres x dose / strength"),
    ("heap_min_free_bytes", "the heap's low-water mark over the day, against the board's budget (goal >= 40 %)",
     "heap_budget_bytes"),
    ("heap_budget_bytes", "the esp32-devkitc's heap budget"),
    ("timer_late_idle_p50_us", "control-timer lateness, idle board, median (real time)"),
    ("timer_late_idle_p99_us", "the same, 99th percentile"),
    ("timer_late_idle_max_us", "the same, maximum"),
    ("timer_late_loaded_p50_us", "control-timer lateness with a stroke a second checkpointed, median, against idle",
     "timer_late_idle_p50_us"),
    ("timer_late_loaded_p99_us", "the same, 99th percentile", "timer_late_idle_p99_us"),
    ("timer_late_loaded_max_us", "the same, maximum", "timer_late_idle_max_us"),
    ("profile_*_tap_in_band_share", "share of the day the far tap is within 0.2-0.5 mg/L (that demand profile)"),
    ("profile_*_outlet_max_mgl", "the outlet's maximum residual that day"),
    ("profile_*_outlet_max_vs_ceiling", "the outlet's maximum over the site's residual ceiling"),
)
RATIOS = ("solution_delivered_vs_ideal_ratio", "heap_min_free_share", "timer_late_p99_loaded_vs_idle_ratio")


def add_parser(bsub, parser_class):
    p = bsub.add_parser("doser", help="stroke exactness, volume vs ideal, far-tap band share, jitter, heap",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--speed", type=types.count, default=2000, help="board clock speed (default 2000: a day in ~45 s)")
    p.add_argument("--profiles", default="0,1,2", help="demand profiles to run (default 0,1,2)")
    p.add_argument("--jitter-s", type=types.count, default=90, help="real seconds of each timer-lateness run (default 90)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    vms.add_argument(p)
    p.set_defaults(func=run)


def _day(section, world, speed, vm, progress):
    """Run a doser for a simulated day; return (the world's truth, the readings, the newest health)."""
    from tools.rigs.board import DEVICE_ID, Rig
    with tempfile.TemporaryDirectory(prefix="prapa-bench-doser-") as tmp:
        rig = Rig(Path(tmp), "doser", section, extra=FAST, speed=speed, world=world, vm=vm)
        try:
            t0 = time.monotonic()
            while True:
                w = rig.board.status()["world"]["chlorine_plant"]
                if w["t_us"] >= DAY_US:
                    break
                if time.monotonic() - t0 > 20 * DAY_US / 1e6 / speed + 60:
                    raise AssertionError("the simulated day did not finish: is the machine overloaded?")
                progress(w["t_us"] / DAY_US)
                time.sleep(1)
            rig.board.set_world("chlorine_plant", "forced_flow_lps", 0)      # stop the water: strokes settle
            time.sleep(1.0)
            w = rig.board.status()["world"]["chlorine_plant"]
            end = time.monotonic() + 30
            readings = []
            while time.monotonic() < end:        # wait for the readings to reach the gateway
                readings = [r for r in rig.gateway.entries() if r.get("series") == "interval"]
                if readings and readings[-1]["register"] >= w["strokes"]:
                    break
                time.sleep(0.5)
            health = rig.gateway.health(DEVICE_ID)
        finally:
            rig.close()
    return w, readings, health


def _jitter(vm, seconds, progress):
    """The control timer's lateness in real time (speed 1, 100 ms periods) under link and flash load: a
    stroke a second checkpointed each time, a reading a minute, health every 10 s; against an idle
    board (no flow, nothing to write) in the same run."""
    from tools.rigs.board import DEVICE_ID, Rig
    out = {}
    for label, flow, ckpt in (("idle", 0, 20), ("loaded", 40, 1)):
        with tempfile.TemporaryDirectory(prefix="prapa-bench-doser-") as tmp:
            rig = Rig(Path(tmp), "doser", {"interval_min": 1, "checkpoint_strokes": ckpt},
                      extra={"link": {"sample_ms": 100, "health_s": 10}}, speed=1,
                      world=[f"chlorine_plant.forced_flow_lps={flow}"], vm=vm)
            try:
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds:
                    progress((time.monotonic() - t0) / seconds)
                    time.sleep(1)
                health = rig.gateway.health(DEVICE_ID) or {}
            finally:
                rig.close()
        jitter = health.get(9) or {}
        out[f"timer_late_{label}_p50_us"] = jitter.get(0)
        out[f"timer_late_{label}_p99_us"] = jitter.get(1)
        out[f"timer_late_{label}_max_us"] = jitter.get(2)
    idle, loaded = out.get("timer_late_idle_p99_us"), out.get("timer_late_loaded_p99_us")
    out["timer_late_p99_loaded_vs_idle_ratio"] = round(loaded / idle, 2) if idle and loaded is not None else None
    return out


def run(args):
    print_figures(measure(args), args.json)
    return 0


def measure(args):
    """The figures of one run (a dict); the days' progress on stdout unless --json."""
    from protocol.roles import doser as spec
    from tools.sim.worlds.doser import PLANT_SECTION, SITE_LIMITS
    vm = bench_vm(args)
    figures = {"vm": vm, "speed": args.speed}

    def progress(label):
        def show(share):
            if not args.json:
                print(f"\r  {label}: {share:5.1%} of the day", end="", flush=True)
        return show

    section = {"interval_min": 15, "trim_pct": 0}
    w, readings, health = _day(section, ["chlorine_plant.stroke_error_pct=0", "chlorine_plant.stroke_noise_pct=0",
                                         "chlorine_plant.strength_half_life_days=100000"], args.speed, vm,
                               progress("exactness"))
    cfg = {row[0]: row[2] for row in spec.SCHEMA}      # the board's config: defaults and the section
    cfg.update(section)
    counted = readings[-1]["register"] if readings else 0
    ideal_strokes = w["flow_litres"] * spec.strokes_per_litre(cfg, cfg["dose_mgl"])
    ideal_ml = w["ideal_solution_ml_per_mgl"] * cfg["dose_mgl"]
    figures.update({
        "strokes_made": w["strokes"], "strokes_counted": counted,
        "stroke_count_error": counted - w["strokes"],
        "strokes_vs_schedule_ratio": round(w["strokes"] / ideal_strokes, 4) if ideal_strokes else None,
        "solution_delivered_ml": round(w["solution_ml"], 1), "solution_ideal_ml": round(ideal_ml, 1),
        "solution_delivered_vs_ideal_ratio": round(w["solution_ml"] / ideal_ml, 4) if ideal_ml else None,
    })
    if health:
        from tools import boards
        budget = boards.load("esp32-devkitc").heap_budget_bytes
        figures.update({"heap_min_free_bytes": health.get(3), "heap_budget_bytes": budget,
                        "heap_min_free_share": round(health.get(3, 0) / budget, 3)})
    figures.update(_jitter(vm, args.jitter_s, progress("jitter")))
    for profile in [int(p) for p in args.profiles.split(",") if p.strip()]:
        w, _readings, _h = _day(dict(PLANT_SECTION, interval_min=15),
                                [f"chlorine_plant.demand_profile={profile}"], args.speed, vm,
                                progress(f"profile {profile}"))
        figures[f"profile_{profile}_tap_in_band_share"] = round(w["tap_in_band_share"], 4)
        figures[f"profile_{profile}_outlet_max_mgl"] = round(w["outlet_max_mgl"], 3)
        figures[f"profile_{profile}_outlet_max_vs_ceiling"] = round(w["outlet_max_mgl"] / SITE_LIMITS["ceiling_mgl"],
                                                                    3)
    if not args.json:
        print()
    return figures
