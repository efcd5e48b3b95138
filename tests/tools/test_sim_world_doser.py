"""The chlorine plant the doser is judged against: flow, dose, contact tank, network, analyser, pump."""

import math

from tools.sim.worlds import ANALOG, LEVEL, World
from tools.sim.worlds import doser

PINS = {"stroke_out": 26, "pump_enable": 25, "flow_pulse_in": 14, "residual_adc": 36, "tank_low_in": 13,
        "flow_adc": 39, "tank_level_adc": 34, "stroke_feedback_in": 12}
S = 1_000_000
QUIET = {"analyzer_noise_mgl": 0.0, "analyzer_drift_mgl_per_day": 0.0}


def world(seed=0, **params):
    # these tests were written for a 0-2 mg/L analyser and a 0-40 L/s flow transmitter
    params = {"analyzer_range_mgl": 2.0, "flow_range_lps": 40.0, **params}
    return World("doser", PINS, {"chlorine_plant": params}, seed=seed)


def truth(w):
    return w.truth()["chlorine_plant"]


def mgl(uv, full_scale=2.0):
    """Microvolts over the 150 ohm shunt -> the 4-20 mA loop's value."""
    return (uv / 150_000 - 4) / 16 * full_scale


def of(events, gpio):
    return [(t, v) for t, g, _k, v in events if g == gpio]


def closures(events, gpio=14, start=1):
    level, n = start, 0
    for _t, v in of(events, gpio):
        if v != level:
            level = v
            n += level == 0
    return n


def stroke(w, t_us):
    w.on_output(t_us, PINS["stroke_out"], 1)
    w.on_output(t_us + 5_000, PINS["stroke_out"], 0)


def test_forced_flow_gives_exact_pulses_and_the_flow_transmitter_reads_it():
    w = world(forced_flow_lps=20.0, flow_l_per_pulse=10.0)
    events = w.events_until(60 * S + 100_000)
    t = truth(w)
    assert closures(events) == 120 == t["flow_pulses"]
    assert abs(t["flow_litres"] - 20.0 * 60.1) < 1e-6
    assert all(e[2] == LEVEL for e in events if e[1] == 14)
    flow_uv = of(events, 39)
    assert flow_uv and all(abs(mgl(uv, 40.0) - 20.0) < 1e-3 for _t, uv in flow_uv)
    assert [e[0] for e in events] == sorted(e[0] for e in events)


def test_analyser_microvolts_map_to_mg_per_litre_over_4_20_ma():
    w = world(**QUIET)
    events = w.events_until(60 * S)
    readings = of(events, 36)
    assert len(readings) == 13 and all(e[2] == ANALOG for e in events if e[1] == 36)
    assert readings[0] == (0, 1_260_000)                # 0.55 mg/L: 4 + 16 x 0.55 / 2 = 8.4 mA x 150 ohm
    assert all(abs(mgl(uv) - 0.55) < 1e-4 for _t, uv in readings)
    assert w.set_param("chlorine_plant", "analyzer_offset_mgl", 0.5)
    later = of(w.events_until(120 * S), 36)
    assert all(abs(mgl(uv) - 1.05) < 1e-4 for _t, uv in later)
    assert abs(truth(w)["analyzer_mgl"] - 1.05) < 1e-4


def test_proportional_strokes_reach_the_outlet_after_the_dead_time_and_the_tap_after_the_transit():
    dose, flow = 2.0, 20.0
    w = world(forced_flow_lps=flow, demand_profile=1, stroke_error_pct=0.0, transit_h=0.5, **QUIET)
    period_us = int(120.0 * 0.5 / (flow * dose) * S)           # strength x stroke / (flow x dose): 1.5 s
    w.on_output(0, PINS["pump_enable"], 1)
    outlet, tap, analyser, t_us, next_stroke = {}, {}, [], 0, period_us // 2
    while t_us < 3000 * S:
        t_us += 10 * S
        while next_stroke <= t_us:                  # a board a little behind the world, as on the bench
            stroke(w, next_stroke)
            next_stroke += period_us
        analyser += of(w.events_until(t_us), 36)
        outlet[t_us // S], tap[t_us // S] = truth(w)["outlet_mgl"], truth(w)["tap_mgl"]
    expected = (dose - 1.0) * math.exp(-0.2 * 600 / 3600)
    assert all(abs(outlet[s] - 0.55) < 1e-6 for s in range(10, 600, 10))    # the old water still leaves
    assert all(abs(outlet[s] / expected - 1) < 0.03 for s in range(900, 3000, 10))
    assert all(abs(mgl(uv) / expected - 1) < 0.03 for t, uv in analyser if t > 900 * S)
    assert all(abs(tap[s] - 0.55 * math.exp(-0.04)) < 1e-6 for s in range(10, 2400, 10))
    assert all(abs(tap[s] / (expected * math.exp(-0.04)) - 1) < 0.03 for s in range(2700, 3000, 10))
    t = truth(w)
    assert t["strokes"] == 2000 and abs(t["solution_ml"] / 1000 - 1) < 0.002
    ideal = t["ideal_solution_ml_per_mgl"] * dose
    assert abs(ideal / t["solution_ml"] - 1) < 0.01      # this board doses what the plant needs


def test_only_rising_edges_while_enabled_are_strokes_and_a_reset_drops_the_pump():
    w = world()
    stroke(w, 1 * S)                                     # not enabled: no stroke
    w.on_output(2 * S, PINS["pump_enable"], 1)
    stroke(w, 3 * S)
    w.on_output(4 * S, PINS["stroke_out"], 1)
    w.on_output(4 * S + 10, PINS["stroke_out"], 1)       # still high: no new edge
    assert truth(w)["strokes"] == 2 and truth(w)["pump_enabled"] == 1
    w.on_reset(5 * S)
    stroke(w, 6 * S)
    t = truth(w)
    assert t["strokes"] == 2 and t["pump_enabled"] == 0
    w.on_output(7 * S, PINS["pump_enable"], 1)
    stroke(w, 8 * S)
    assert truth(w)["strokes"] == 3


def test_the_tank_drains_the_switch_closes_and_an_empty_tank_delivers_nothing():
    w = world(tank_start_l=0.021, tank_low_l=0.02, stroke_error_pct=0.0, stroke_noise_pct=0.0)
    assert w.levels()[13] == 1
    first_level = of(w.events_until(0), 34)
    w.on_output(0, PINS["pump_enable"], 1)
    for i in range(50):
        stroke(w, (i + 1) * S)
    events = w.events_until(60 * S)
    t = truth(w)
    assert t["strokes"] == 50 and t["strokes_dry"] == 8 and abs(t["solution_ml"] - 21.0) < 1e-9
    assert t["tank_l"] == 0 and t["tank_low"]
    assert of(events, 13) == [(3 * S, 0)]                # 21 - 3 x 0.5 = 19.5 mL < 20 mL
    assert len(of(events, 12)) == 2 * 42                 # feedback only for the strokes that moved liquid
    assert w.levels()[13] == 0
    level = first_level + of(events, 34)
    assert abs(level[0][1] - 600_000 - 16 * 150_000 * 0.021 / 200) < 2 and level[-1][1] == 600_000
    assert w.set_param("chlorine_plant", "tank_start_l", 200.0)     # a refill
    assert of(w.events_until(70 * S), 13) == [(60 * S, 1)]
    stroke(w, 71 * S)
    assert abs(truth(w)["tank_l"] - 199.9995) < 1e-9


def test_each_analyser_fault_sends_its_current():
    for fault, uv in ((1, 300_000), (2, 3_300_000)):
        readings = of(world(analyzer_fault=fault).events_until(30 * S), 36)
        assert {v for _t, v in readings} == {uv}
    w = world(analyzer_fault=3, analyzer_fault_at_h=60 / 3600)
    readings = of(w.events_until(300 * S), 36)
    before = [v for t, v in readings if t < 60 * S]
    after = [v for t, v in readings if t >= 60 * S]
    assert len(set(before)) > 1                              # the noise moves it ...
    assert set(after) == {before[-1]}                        # ... until it freezes at its last value
    w = world(analyzer_fault=1, analyzer_fault_at_h=0.01, analyzer_fault_hours=0.01, **QUIET)
    readings = of(w.events_until(120 * S), 36)
    assert {v for t, v in readings if 36 * S <= t < 72 * S} == {300_000}
    assert {v for t, v in readings if t < 36 * S or t >= 72 * S} == {1_260_000}


def test_feedback_pulses_follow_strokes_and_stop_with_an_air_locked_head():
    w = world()
    w.on_output(0, PINS["pump_enable"], 1)
    for t in (1 * S, 2 * S, 3 * S):
        stroke(w, t)
    w.events_until(2 * S + 500_000)                      # the world is ahead of the stroke at 3 s: its pulse is not
    events = w.events_until(4 * S)
    assert of(events, 12) == [(3 * S + 20_000, 0), (3 * S + 50_000, 1)]
    assert truth(w)["feedback_pulses"] == 3
    assert w.set_param("chlorine_plant", "feedback_fail", 1)
    before = truth(w)["solution_ml"]
    stroke(w, 5 * S)
    assert of(w.events_until(6 * S), 12) == []
    t = truth(w)
    assert t["strokes"] == 4 and t["solution_ml"] == before and t["strokes_dry"] == 1


def test_late_strokes_still_count_for_their_own_bin():
    w = world(forced_flow_lps=10.0, stroke_error_pct=0.0, stroke_noise_pct=0.0, mixing_s=0.0, demand_profile=1,
              dead_time_s=60.0)
    w.events_until(25 * S)                               # bins 0 and 1 closed
    w.on_output(0, PINS["pump_enable"], 1)
    for i in range(10):
        stroke(w, 11 * S + i * 100_000)                  # 5 mL of 120 g/L in the 100 L of bin 1: 6 mg/L
    w.events_until(75 * S)                               # bin 1 leaves the tank at 70 s
    expected = (6.0 - 1.0) * math.exp(-0.2 * 60 / 3600)
    assert abs(truth(w)["outlet_mgl"] - expected) < 1e-3
    w.events_until(85 * S)
    assert truth(w)["outlet_mgl"] == 0 and truth(w)["outlet_max_mgl"] > 4.9


def test_a_plant_stop_stops_the_pulses_and_the_outlet_holds_and_decays():
    w = world(forced_flow_lps=20.0, stop_at_h=0.1, stop_hours=0.1, **QUIET)
    events = w.events_until(int(0.3 * 3600 * S))
    stopped = (360 * S, 720 * S)
    assert not [t for t, _v in of(events, 14) if stopped[0] < t < stopped[1]]
    assert {uv for t, uv in of(events, 39) if stopped[0] <= t < stopped[1]} == {600_000}
    residual = {t: mgl(uv) for t, uv in of(events, 36)}
    hold = residual[710 * S] / residual[360 * S]
    assert abs(hold - math.exp(-0.2 * 0.1)) < 0.002
    assert abs(truth(w)["flow_litres"] - 20.0 * 0.2 * 3600) < 1e-6


def test_world_time_is_independent_of_how_it_is_sliced():
    def run(step_us):
        w = world(seed=7, mean_flow_lps=3.0, demand_profile=2)
        w.on_output(0, PINS["pump_enable"], 1)
        for i in range(300):
            stroke(w, 7 * S + i * 11 * S)
        t, out = 0, []
        while t < 3600 * S:
            t += step_us
            out.extend(w.events_until(t))
        return out, truth(w)
    one, sixty = run(1 * S), run(60 * S)
    assert one == sixty
    times = [e[0] for e in one[0]]
    assert times == sorted(times)


def test_profiles_flow_and_demand():
    w = world(demand_profile=0, **QUIET)
    m = w.models[0]
    night, morning = m._flow(3 * 360), m._flow(8 * 360)          # bins at 03:00 and 08:00
    assert abs(night / 12 - 0.4) < 0.05 and abs(morning / 12 - 1.5) < 0.05
    w.events_until(86400 * S)
    assert abs(truth(w)["flow_litres"] / (12 * 86400) - 1) < 0.001
    h = 3600 * S
    assert abs(m._demand(15 * h) - 1.25) < 1e-9 and abs(m._demand(3 * h) - 0.75) < 1e-9
    m.params["demand_profile"] = 1
    assert m._demand(15 * h) == m._demand(3 * h) == 1.0
    m.params["demand_profile"] = 2
    assert abs(m._demand(3 * h) - 0.5) < 1e-9
    assert abs(m._demand(int(16.5 * h)) - (1.0 + 0.5 * math.cos(math.pi * 1.5 / 12) + 0.5)) < 1e-9
    after = m._demand(19 * h) - 1.0 - 0.5 * math.cos(2 * math.pi * 4 / 24)
    assert abs(after - 0.5 * math.exp(-1)) < 1e-9                 # decaying two hours after the rain


def test_a_day_at_a_fixed_correct_dose_keeps_the_tap_in_band_on_flat_demand():
    w = world(demand_profile=1)
    enable, stroke_pin = PINS["pump_enable"], PINS["stroke_out"]
    w.on_output(0, enable, 1)
    solution_per_pulse = 10.0 * 1.55 / 120.0 / 0.5       # strokes per 10 L pulse for 1.55 mg/L
    owed, level, t = 0.0, 1, 0
    while t < 86400 * S:
        t += 10 * S
        for t_ev, v in of(w.events_until(t), 14):        # a board counting closures, stroking behind the world
            if v != level:
                level = v
                if v == 0:
                    owed += solution_per_pulse
                    if owed >= 1:
                        owed -= 1
                        w.on_output(t_ev, stroke_pin, 1)
                        w.on_output(t_ev + 20_000, stroke_pin, 0)
    tr = truth(w)
    assert tr["tap_in_band_share"] > 0.95
    assert 0.3 < tr["tap_min_mgl"] and tr["tap_max_mgl"] < 0.5
    assert abs(tr["solution_ml"] / (tr["ideal_solution_ml_per_mgl"] * 1.55) - 1.02) < 0.02
    assert tr["chlorine_lost_mg"] == 0


def test_the_module_declares_its_role_hooks():
    assert doser.MODELS == (doser.ChlorinePlant,)
    assert doser.ACTIVITY == ("chlorine_plant", "forced_flow_lps", 20.0)
    assert doser.TRUTH == ("chlorine_plant", "strokes")
    section, overrides = doser.site_board(0)
    from protocol import config
    from protocol.roles import doser as spec
    cfg = config.check({"device_id": 1, "role": "doser", "doser": section}, "doser")   # the board takes it
    spec.check_limits(cfg["doser"], spec.check_limits_file(doser.SITE_LIMITS))        # within the limits
    assert overrides == ["chlorine_plant.tank_start_l=20.1"]       # an interlock for the site's page
    for name, (default, unit, meaning) in doser.ChlorinePlant.PARAMS.items():
        assert isinstance(default, float) and unit and meaning, name
