"""The world simulator: the truth the firmware is judged against."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tools.sim.worlds import World


def replay_levels(events, start=1):
    level, closures = start, 0
    for _t, _gpio, _kind, value in events:
        if value != level:
            level = value
            if level == 0:
                closures += 1
    return level, closures


def test_forced_flow_gives_exact_pulses():
    w = World("meter", {"pulse_in": 27}, {"flow_meter": {"forced_lpm": 60.0, "bounce_flips_max": 0}})
    events = w.events_until(10_000_000)
    truth = w.truth()["flow_meter"]
    assert truth["pulses"] == 10 and abs(truth["litres"] - 10.0) < 1e-6
    assert replay_levels(events)[1] == 10


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lpm=st.floats(1.0, 300.0), flips=st.integers(0, 5))
def test_bounce_always_settles_on_the_true_level_and_time_runs_forward(seed, lpm, flips):
    w = World("meter", {"pulse_in": 27}, {"flow_meter": {"forced_lpm": lpm, "bounce_flips_max": flips}}, seed=seed)
    events = w.events_until(20_000_000)
    times = [e[0] for e in events]
    assert times == sorted(times)
    final_level, _ = replay_levels(events)
    assert final_level == w.models[0].level


def test_daily_profile_uses_about_the_configured_volume():
    w = World("meter", {"pulse_in": 27}, {"flow_meter": {"daily_litres": 600.0}}, seed=3)
    w.events_until(7 * 86400 * 1_000_000)
    litres = w.truth()["flow_meter"]["litres"]
    assert 0.6 * 7 * 600 < litres < 1.4 * 7 * 600


def test_world_time_is_independent_of_how_it_is_sliced():
    def run(step_us):
        w = World("meter", {"pulse_in": 27}, {"flow_meter": {"daily_litres": 2000.0}}, seed=7)
        t, out = 0, []
        while t < 3600_000_000:
            t += step_us
            out.extend(w.events_until(t))
        return out
    assert run(1_000_000) == run(60_000_000)


def test_a_forced_flow_that_ends_hands_back_to_the_daily_profile_without_time_going_back():
    """A test closes the taps (forced_lpm 0) for a while and hands back (-1): draws the profile had
    scheduled in the meantime are not replayed into the past; time and the truth only go forward."""
    w = World("meter", {"pulse_in": 27}, {"flow_meter": {"daily_litres": 3000.0, "bounce_flips_max": 0}}, seed=5)
    out = w.events_until(6 * 3600_000_000)
    w.set_param("flow_meter", "forced_lpm", 0)
    out += w.events_until(12 * 3600_000_000)          # hours: draws were due meanwhile
    closed = w.truth()["flow_meter"]
    w.set_param("flow_meter", "forced_lpm", -1)
    out += w.events_until(24 * 3600_000_000)
    times = [e[0] for e in out]
    assert times == sorted(times)
    truth = w.truth()["flow_meter"]
    assert truth["t_us"] == 24 * 3600_000_000 and truth["pulses"] > closed["pulses"]
    assert replay_levels(out)[1] == truth["pulses"]
    assert abs(truth["litres"] - truth["pulses"]) < 1.0     # 1 L a pulse: the volume and the count agree


def test_a_shut_main_valve_stops_every_pulse_inside_its_window_and_only_there():
    w = World("meter", {"pulse_in": 27}, {"flow_meter": {"daily_litres": 5000.0, "bounce_flips_max": 0,
                                                          "shut_from_s": 3 * 3600.0, "shut_to_s": 9 * 3600.0}}, seed=2)
    w.events_until(12 * 3600_000_000)
    closures = list(w.models[0].closures)
    assert closures and not [t for t in closures if 3 * 3600e6 <= t < 9 * 3600e6]
    assert [t for t in closures if t < 3 * 3600e6] and [t for t in closures if t >= 9 * 3600e6]
