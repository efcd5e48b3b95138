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
