"""The storm drain the drain board is judged against: rain, runoff, the chamber, its outlet, sensors, battery."""

import math
import time

from tools.sim.worlds import ANALOG, LEVEL, World, parse_overrides
from tools.sim.worlds import drain

PINS = {"trig_out": 18, "echo_in": 19, "sonar_rx": 23, "level_adc": 39, "rain_pulse_in": 33, "battery_adc": 35}
ECHO, SONAR, ADC, RAIN, BATTERY = 19, 23, 39, 33, 35
S = 1_000_000
MIN = 60 * S
QUIET = {"noise_mm": 0.0}


def world(seed=0, **params):
    return World("drain", PINS, {"storm_drain": params}, seed=seed)


def truth(w):
    return w.truth()["storm_drain"]


def of(events, gpio):
    return [(t, v) for t, g, _k, v in events if g == gpio]


def levels_every_minute(w, minutes):
    out = []
    for m in range(1, minutes + 1):
        w.events_until(m * MIN)
        out.append(truth(w)["level_mm"])
    return out


def fitted_tau_min(levels, base_mm, first_min, last_min):
    """The recession's time constant, minutes, from the level above the pool between two minutes."""
    a, b = levels[first_min - 1] - base_mm, levels[last_min - 1] - base_mm
    return (last_min - first_min) / math.log(a / b)


def test_a_healthy_drain_stays_below_the_warning_and_recedes_with_its_time_constant():
    w = world(storm_at_h=0.0, **QUIET)
    levels = levels_every_minute(w, 240)
    t = truth(w)
    assert 300 < t["peak_level_mm"] < 500 < 700                     # 30-50 % of the danger level (1000 mm)
    assert 45 * 60 < t["peak_at_s"] < 70 * 60
    assert t["overflow_at_s"] is None and t["overflow_s"] == 0 and "700" not in t["first_above_s"]
    tau = fitted_tau_min(levels, 20.0, 140, 180)                    # the storm ended at 120 min
    assert abs(tau - 20.0) < 2.0
    assert abs(levels[-1] - 20.0) < 1.0                             # back to its pool
    # partly blocked: the recession slows to tau / (1 - b)
    w = world(storm_at_h=0.0, blockage=0.5, **QUIET)
    levels = levels_every_minute(w, 300)
    assert abs(fitted_tau_min(levels, 20.0, 200, 280) - 40.0) < 4.0


def test_a_blocked_drain_rises_through_warning_and_danger_and_overflows_the_grate():
    w = world(storm_at_h=0.5, blockage=0.75, **QUIET)
    events = w.events_until(int(2.5 * 3600 * S))
    t = truth(w)
    start = 0.5 * 3600
    over = t["overflow_at_s"] - start
    assert 30 * 60 <= over <= 75 * 60                               # within the storm (2 h)
    warning, danger = t["first_above_s"]["700"] - start, t["first_above_s"]["1000"] - start
    assert warning < danger - 5 * 60 < over - 10 * 60               # visibly above both well before
    assert 15 * 60 < t["overflow_s"] < 60 * 60
    assert 1200 < t["peak_level_mm"] < 1230                         # a little above the grate
    assert t["overflow_m3"] > 0
    at_grate = next(v for tt, v in of(events, SONAR) if tt >= t["overflow_at_s"] * S + 10 * S)
    assert 270 < at_grate < 300                                     # the sensor sees the water at the grate
    w.events_until(int(3.0 * 3600 * S))
    assert truth(w)["overflow_s"] == t["overflow_s"] and not truth(w)["overflowing"]   # over with the storm


def test_the_water_balances():
    """Runoff in = catchment store + storage change + outflow + overflow + evaporation."""
    w = world(storm_at_h=1.0, blockage=0.8, showers_per_week=14.0, rain_mm_tip=0.2)
    for hour in range(1, 73):
        w.events_until(hour * 3600 * S)
        if hour in (2, 3, 72):                                      # mid-storm, overflowing, days later
            t = truth(w)
            assert abs(t["runoff_m3"] - 0.85 * 260 * t["rain_mm"] / 1000) < 1e-6
            out = (t["catchment_m3"] + t["storage_change_m3"] + t["outflow_m3"] + t["overflow_m3"]
                   + t["evaporated_m3"])
            assert abs(t["runoff_m3"] - out) < 1e-6 and t["inflow_m3"] <= t["runoff_m3"]
    assert t["overflow_m3"] > 0.5 and t["evaporated_m3"] > 0 and t["rain_mm"] > 60


def test_every_drain_of_a_catchment_sees_the_same_rain():
    a = world(seed=1, storm_at_h=2.0, showers_per_week=7.0, rain_mm_tip=0.2)
    b = World("drain", PINS, {"storm_drain": {"storm_at_h": 2.0, "showers_per_week": 7.0, "rain_mm_tip": 0.2,
                                              "area_m2": 300.0, "blockage": 0.6, "noise_mm": 5.0}}, seed=2)
    ea, eb = [], []
    for hour in range(1, 7 * 24 + 1):
        ea += a.events_until(hour * 3600 * S)
        eb += b.events_until(hour * 3600 * S + 777)
    assert of(ea, RAIN) == of(eb, RAIN) and len(of(ea, RAIN)) > 400
    ta, tb = truth(a), truth(b)
    assert ta["rain_mm"] == tb["rain_mm"] > 60 and ta["tips"] == tb["tips"]
    assert of(ea, ECHO)[:50] != of(eb, ECHO)[:50]                   # their sensors differ
    c = world(storm_at_h=2.0, showers_per_week=7.0, rain_mm_tip=0.2, rain_seed=2.0)
    c.events_until(7 * 86400 * S)
    assert truth(c)["rain_mm"] != ta["rain_mm"]                     # another catchment, other showers


def test_the_gauge_tips_once_per_bucket_and_no_gauge_never_tips():
    w = world(forced_mm_h=36.0, rain_mm_tip=0.2, tip_ms=100.0)     # 0.01 mm/s: a tip every 20 s
    assert w.levels()[RAIN] == 1
    events = of(w.events_until(3600 * S), RAIN)
    t = truth(w)
    assert abs(t["rain_mm"] - 36.0) < 1e-9 and t["tips"] == 180 == int(t["rain_mm"] / 0.2 + 1e-6)
    lows = [tt for tt, v in events if v == 0]
    assert len(lows) == 180 and abs(lows[0] - 20 * S) <= 1
    assert all(abs(b - a - 20 * S) <= 1 for a, b in zip(lows, lows[1:]))
    assert all(v == i % 2 for i, (_t, v) in enumerate(events))
    assert all(hi - lo == 100_000 for (lo, _), (hi, _) in zip(events[::2], events[1::2]))
    assert all(k == LEVEL for _t, g, k, _v in w.events_until(3700 * S) if g == RAIN)
    w = world(storm_at_h=0.0)                                       # no gauge (rain_mm_tip 0)
    assert not of(w.events_until(3 * 3600 * S), RAIN) and truth(w)["tips"] == 0 and w.levels()[RAIN] == 1
    assert truth(w)["rain_mm"] == 60.0


def test_the_echo_is_the_round_trip_at_the_speed_of_sound_and_the_loop_reads_the_level():
    w = world(**QUIET)
    first = w.analog_levels()
    events = w.events_until(10 * S)
    assert all(k == ANALOG for _t, _g, k, _v in events)
    c_mm_us = (331.3 + 0.606 * 30) / 1000                           # 349.5 m/s at 30 C
    assert first[ECHO] == round(2 * 1480 / c_mm_us) == 8470       # the pool: 20 mm, 1480 mm below the face
    assert first[SONAR] == 1480
    assert first[ADC] == round((4 + 16 * 20 / 4500) * 150 * 1000)  # 4.07 mA over 150 ohm
    assert first[BATTERY] == 4150 * 1000 // 2                       # mains: full, over a 2:1 divider
    assert [t for t, _v in of(events, ECHO)] == []                  # nothing changed: nothing sent
    cold = world(air_c=0.0, mount_mm=2000.0, start_level_mm=500.0, **QUIET)
    assert cold.analog_levels()[ECHO] == round(2 * 1500 / 0.3313)
    noisy = world(seed=4)
    events = noisy.events_until(600 * S)
    assert [t for t, _v in of(events, ADC)] == [k * 5 * S for k in range(1, 121)]   # fresh noise every 5 s
    echoes = of(events, ECHO)
    assert len(echoes) > 110                                        # (a value equal to the last is not sent)
    mm = [v * c_mm_us / 2 for _t, v in echoes]
    mean = sum(mm) / len(mm)
    sd = math.sqrt(sum((x - mean) ** 2 for x in mm) / len(mm))
    assert abs(mean - 1480) < 1.0 and 2.4 < sd < 3.6
    only_ma = world(sensor=3.0, seed=4)
    assert {g for _t, g, _k, _v in only_ma.events_until(60 * S)} == {ADC}


def test_faults_appear_at_their_times():
    w = world(stuck_at_h=0.1, stuck_hours=0.1, blind_at_h=0.3, blind_hours=0.1, oor_at_h=0.5, oor_hours=0.1,
              forced_mm_h=0.0)
    events = w.events_until(int(0.7 * 3600 * S))

    def window(gpio, h0, h1):
        return [v for t, v in of(events, gpio) if h0 * 3600 * S <= t < h1 * 3600 * S]
    assert len(window(SONAR, 0.0, 0.1)) > 60 and window(SONAR, 0.1, 0.2) == []        # stuck: nothing moves
    assert len(set(window(SONAR, 0.2, 0.3))) > 10
    blind = window(SONAR, 0.3, 0.4)
    assert len(blind) > 60 and all(85 < v < 115 for v in blind)                         # a web at 100 mm
    assert all(450 < v < 660 for v in window(ECHO, 0.3, 0.4))
    assert set(window(SONAR, 0.5, 0.6)) == {6000} and set(window(ADC, 0.5, 0.6)) == {3_300_000}   # 22 mA
    assert all(1460 < v < 1500 for v in window(SONAR, 0.6, 0.7))
    lost = world(lost_echo_pct=100.0)
    assert of(lost.events_until(60 * S), ECHO) == []                # 0 from the start
    assert lost.analog_levels()[ECHO] == 0 and lost.analog_levels()[SONAR] == 0
    assert lost.analog_levels()[ADC] > 600_000 and truth(lost)["lost_echoes"] == 13
    some = world(lost_echo_pct=10.0, seed=5)
    sonar = [v for _t, v in of(some.events_until(3600 * S), SONAR)]
    assert 40 < sonar.count(0) <= truth(some)["lost_echoes"] < 110   # (a second in a row is not sent again)
    silent = world(oor_at_h=0.0, oor_mm=0.0)                        # out of range as no echo at all
    assert silent.analog_levels()[ECHO] == 0 and of(silent.events_until(60 * S), ECHO) == []


def test_the_battery_drains_per_wake_and_while_asleep():
    w = world(battery_mah=1000.0, battery_start_pct=50.0, wake_mas=3600.0, sleep_ua=0.0)
    assert truth(w)["battery_pct"] == 50.0
    start_uv = w.analog_levels()[BATTERY]
    assert start_uv == round(3800 / 2 * 1000)                        # half charged: 3.80 V
    for k in range(100):                                            # 100 wakes of 1 mAh
        w.on_reset(k * S)
    events = w.events_until(200 * S)
    t = truth(w)
    assert t["wakes"] == 100 and abs(t["battery_pct"] - 40.0) < 1e-9
    mv = 3700 + (3800 - 3700) * (0.4 - 0.2) / (0.5 - 0.2)            # on the curve between 20 and 50 %
    assert abs(t["battery_mv"] - mv) < 0.1
    assert of(events, BATTERY) == [(5 * S, round(mv / 2 * 1000))]  # sent once, at the next update
    assert w.set_param("storm_drain", "sleep_ua", 10_000.0)           # 10 mA: 1 % of 1000 mAh an hour
    w.events_until(200 * S + 60 * MIN)
    assert abs(truth(w)["battery_pct"] - 39.0) < 1e-6
    assert w.set_param("storm_drain", "battery_start_pct", 100.0)     # a fresh battery
    w.events_until(200 * S + 61 * MIN)
    assert truth(w)["battery_mv"] > 4140
    empty = world(battery_mah=1.0, battery_start_pct=1.0, wake_mas=100.0)
    empty.on_reset(0)
    assert truth(empty)["battery_mv"] == 3300
    mains = world(wake_mas=1e6)
    mains.on_reset(0)
    assert truth(mains)["battery_mv"] == 4150 and truth(mains)["wakes"] == 1


def test_parameters_set_mid_run_apply_from_then_on():
    w = world(forced_mm_h=0.0, **QUIET)
    w.events_until(10 * MIN)
    assert w.set_param("storm_drain", "blockage", 0.75)
    assert w.set_param("storm_drain", "forced_mm_h", 30.0)
    w.events_until(40 * MIN)
    t = truth(w)
    assert abs(t["rain_mm"] - 15.0) < 1e-9 and t["level_mm"] > 200
    assert w.set_param("storm_drain", "forced_mm_h", 0.0)
    levels = levels_every_minute(w, 400)
    assert abs(fitted_tau_min(levels, 20.0, 200, 360) - 80.0) < 8.0     # blocked 75 %: tau / 0.25
    assert w.set_param("storm_drain", "trig_out", 1.0) is False


def test_trigger_pulses_count_as_pings():
    w = world()
    for k in range(5):
        w.on_output(k * S, 18, 1)
        w.on_output(k * S + 10, 18, 0)
    w.on_output(6 * S, 18, 0)
    assert truth(w)["pings"] == 5


def test_world_time_is_independent_of_how_it_is_sliced():
    def run(step_us):
        w = world(seed=3, storm_at_h=0.5, showers_per_week=20.0, rain_mm_tip=0.2, lost_echo_pct=2.0,
                  blockage=0.7, battery_mah=500.0, stuck_at_h=3.0)
        out, t = [], 0
        while t < 8 * 3600 * S:
            t += step_us
            out.extend(w.events_until(t))
        return out, truth(w)
    a, ta = run(60 * S)
    b, tb = run(777_777)
    c, tc = run(3600 * S)
    assert a == b == c and ta == tb == tc
    assert [e[0] for e in a] == sorted(e[0] for e in a)
    assert ta["overflow_at_s"] is not None and ta["tips"] > 200


def test_a_dry_month_is_quick_and_the_pool_dries_between_showers():
    w = world(seed=1, showers_per_week=2.0, sensor=1.0)
    began = time.perf_counter()
    n, low = 0, 1e9
    for day in range(1, 31):
        n += len(w.events_until(day * 86400 * S))
        low = min(low, truth(w)["level_mm"])
    took = time.perf_counter() - began
    t = truth(w)
    assert 500_000 < n < 530_000                                    # an echo every 5 s, a month long
    assert took < 10.0, took
    assert 0 < t["rain_mm"] < 60 and t["peak_level_mm"] < 100 and t["overflow_at_s"] is None
    assert low < 15                                                 # the pool evaporates (4 mm a day) ...
    assert t["tips"] == 0
    dry = world(forced_mm_h=0.0, **QUIET)
    dry.events_until(6 * 86400 * S)
    assert truth(dry)["level_mm"] == 0.0                            # ... and dries out in five days


def test_the_module_declares_its_role_hooks_and_its_site():
    from protocol import config
    from protocol.roles import drain as spec
    assert drain.MODELS == (drain.StormDrain,) and drain.StormDrain.ROLES == ("drain",)
    assert drain.ACTIVITY == ("storm_drain", "forced_mm_h", 360.0) and drain.TRUTH == ("storm_drain", "tips")
    assert drain.SITE_BOARDS == 4
    for name, (default, unit, meaning) in drain.StormDrain.PARAMS.items():
        assert isinstance(default, float) and unit and meaning, name
    # the world's defaults are the board's config defaults
    defaults = {row[0]: row[2] for row in spec.SCHEMA}
    params = {k: v[0] for k, v in drain.StormDrain.PARAMS.items()}
    for key in ("mount_mm", "grate_mm", "range_mm", "air_c", "recession_min", "divider", "rain_mm_tip"):
        assert params[key] == defaults[key], key
    assert params["shunt_ohm"] == defaults["shunt_ohm"]
    places = []
    for n in range(6):
        section, overrides = drain.site_board(n)
        cfg = config.check({"device_id": 1, "role": "drain", "drain": section}, "drain")    # the board takes it
        world_params = parse_overrides(overrides)["storm_drain"]
        assert world_params["storm_at_h"] < 0.1
        assert cfg["drain"]["rain_mm_tip"] == world_params.get("rain_mm_tip", 0.0) == (0.2 if n == 0 else 0)
        assert cfg["drain"]["range_mm"] == world_params.get("range_mm", 4500.0)
        assert world_params.get("blockage", 0.0) == (0.75 if n == 1 else 0.0)
        assert 230 <= world_params["area_m2"] <= 290
        place = drain.site_place(n)
        assert set(place) == {"catchment", "lat", "lon"} and place["catchment"] == drain.SITE_CATCHMENT
        assert abs(place["lat"] - 13.75) < 0.05 and abs(place["lon"] - 100.50) < 0.05
        places.append(place)
    gaps = [math.hypot((b["lat"] - a["lat"]) * 111_000, (b["lon"] - a["lon"]) * 108_000)
            for a, b in zip(places, places[1:])]
    assert all(20 < g < 80 for g in gaps)
    # the site's blocked drain overflows about an hour into its storm, the healthy ones stay low
    for n in (0, 1):
        w = World("drain", PINS, parse_overrides(drain.site_board(n)[1]), seed=n)
        w.events_until(int(2.5 * 3600 * S))
        t = truth(w)
        if n == 1:
            assert 40 * 60 < t["overflow_at_s"] - drain.SITE_STORM_AT_H * 3600 < 75 * 60
        else:
            assert t["peak_level_mm"] < 700 and t["overflow_at_s"] is None and t["tips"] == 300
