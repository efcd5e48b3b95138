"""The firmware runtime and the meter role on the real VM, against the gateway's session layer.

Every pulse billed once, at the right time, through power cuts (issue 5)."""

import random
import time

import pytest

from hil_tests.support.checks import check_register_chain, interval_readings
from tools.console import parse_status
from tools.rigs.board import DEVICE_ID, Rig
from tools.rigs.power_cut import power_cut_campaign

HEAP_BUDGET = 112640
WRAP_MS = 1 << 30


def final_register(rig):
    readings = interval_readings(rig.gateway.entries())
    return readings[-1]["register"] if readings else None


def test_intervals_align_to_the_wall_clock_and_add_up_across_the_tick_wrap(tmp_path):
    """The board clock starts one second before ticks_ms wraps at 2**30."""
    rig = Rig(tmp_path, "meter", {"interval_min": 1}, speed=20, world=["flow_meter.forced_lpm=30"],
              start_ticks_ms=WRAP_MS - 1000)
    try:
        rig.wait(lambda: len(interval_readings(rig.gateway.entries())) >= 4, 40, "four interval readings")
        readings = interval_readings(rig.gateway.entries())
        check_register_chain(readings)
        assert [r["seq"] for r in readings] == list(range(readings[0]["seq"], readings[0]["seq"] + len(readings)))
        assert all(r["time_source"] == "board" for r in readings)
        # The first interval is cut short to reach a boundary; every one ends on a wall-clock minute.
        assert all(r["wall_t"] % 60 == 0 for r in readings)
        assert all(r["span_s"] == 60 for r in readings[1:])
        assert all(25 <= r["value"] <= 35 for r in readings[1:])       # 30 L/min at 1 L per pulse
        assert readings[-1]["register"] <= rig.truth_count()
    finally:
        rig.close()


@pytest.mark.parametrize("pulses", [30_000, pytest.param(100_000, marks=pytest.mark.soak)])
def test_bouncing_pulses_at_random_rates_are_counted_exactly(tmp_path, pulses):
    rng = random.Random(5)
    rig = Rig(tmp_path, "meter", {"interval_min": 1, "debounce_us": 5000}, speed=100,
              world=["flow_meter.bounce_max_us=5000", "flow_meter.bounce_flips_max=3"])
    try:
        while rig.truth_count() < pulses:
            rig.board.set_world("flow_meter", "forced_lpm", rng.uniform(60, 3000))   # 1 to 50 pulses/s
            time.sleep(rng.uniform(0.2, 1.0))
        rig.board.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(0.3)                # the world generates events 50 ms ahead; let those land first
        truth = rig.truth_count()
        # A loaded machine can leave the link in backoff for a while: wait for the count, not for quiet.
        end = time.monotonic() + 150
        while time.monotonic() < end and final_register(rig) != truth:
            time.sleep(0.5)
        readings = interval_readings(rig.gateway.entries())
        check_register_chain(readings)
        assert final_register(rig) == truth, f"the board counted {final_register(rig)} of {truth} pulses"
        assert sum(r["value"] for r in readings) == truth
        health = rig.gateway.health()
        assert health and health[3] >= 0.4 * HEAP_BUDGET, f"heap free minimum {health and health[3]}"
    finally:
        rig.close()


@pytest.mark.parametrize("cuts", [60, pytest.param(210, marks=pytest.mark.soak)])
def test_power_cuts_at_random_instants_never_lose_more_than_the_checkpoint_bound(tmp_path, cuts):
    """SIGKILL the board (bench power cut) while it counts, checkpoints, logs and sends; it restarts
    on the same flash. Flow stops while it boots, so every pulse not counted is a checkpoint loss."""
    rig = Rig(tmp_path, "meter", {"interval_min": 1}, speed=100, world=["flow_meter.forced_lpm=6"])  # 0.1 pulse/s
    try:
        losses = power_cut_campaign(rig, cuts, random.Random(11), busy=6)
        assert min(losses) >= 0 and max(losses) <= 10, losses
        # Everything logged reaches the gateway once: the register chain holds, no identity twice.
        rig.board.set_world("flow_meter", "forced_lpm", 6)
        time.sleep(1.5)
        rig.board.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(2.0)
        readings = interval_readings(rig.gateway.entries())
        check_register_chain(readings)
        ids = [(r["boot"], r["seq"]) for r in readings]
        # (a boot lives 0.1-0.5 s, a minute of board time 0.6 s: few close an interval before their cut; the
        # flow after the campaign closes some in the last boot)
        assert len(ids) == len(set(ids)) and len(readings) >= 3
        print(f"\n{len(losses)} cuts, pulses lost per cut: mean {sum(losses) / len(losses):.2f}, max {max(losses)}")
    finally:
        rig.close()


def test_a_contact_closed_at_power_on_is_where_the_pin_is_not_a_pulse(tmp_path):
    """A tap shut mid-pulse leaves the reed contact closed; a board that boots then finds its pin low.
    That is a level, not an edge (the ESP32's PCNT counts none): the count never passes the world's.
    Every pulse is checkpointed (checkpoint_pulses 1), so a phantom pulse would show as one too many."""
    rig = Rig(tmp_path, "meter", {"interval_min": 1, "checkpoint_pulses": 1}, speed=100,
              world=["flow_meter.forced_lpm=0", "flow_meter.closed_fraction=0.9", "flow_meter.bounce_flips_max=0"])
    rng = random.Random(3)
    try:
        after = 0
        for _ in range(8):
            after, _status = rig.console.wait_for(parse_status, after=after, timeout=30)
            rig.board.set_world("flow_meter", "forced_lpm", 60)            # a pulse a second of board time
            time.sleep(rng.uniform(0.05, 0.3))
            rig.board.set_world("flow_meter", "forced_lpm", 0)             # most likely closed now (90 %)
            time.sleep(0.3)
            rig.board.power_cut()
            after += 1
        after, _status = rig.console.wait_for(parse_status, after=after, timeout=30)
        time.sleep(0.5)                       # the last boot settles on its pin; then what it holds is read
        truth = rig.board.power_cut()["flow_meter"]["pulses"]          # by one more boot: its recovered total
        _i, status = rig.console.wait_for(parse_status, after=after + 1, timeout=30)
        assert truth > 8
        assert truth - 9 <= status["total_pulses"] <= truth, (status["total_pulses"], truth)
    finally:
        rig.close()


def test_a_commanded_reboot_keeps_every_pulse_counted_before_it(tmp_path):
    """A reboot the firmware asked for (the reboot command; a new config does the same) is not a power cut:
    the meter checkpoints its register before it resets. Checkpoints are otherwise rare here (every 10,000
    pulses or an hour of flow, hourly readings), so a reboot without that would lose every pulse counted."""
    rig = Rig(tmp_path, "meter", {"interval_min": 60, "checkpoint_pulses": 10000, "checkpoint_s": 3600}, speed=10,
              world=["flow_meter.forced_lpm=0", "flow_meter.bounce_flips_max=0"])
    try:
        # Counting once it says hello (its first banner may come before the console reader opens the
        # port, which flushes what is waiting): then the water runs.
        assert rig.gateway.wait_hello(DEVICE_ID, 30) is not None and rig.truth_count() == 0
        after = len(rig.console.lines)
        rig.board.set_world("flow_meter", "forced_lpm", 600)
        rig.wait(lambda: rig.truth_count() >= 100, 60, "100 pulses")
        rig.board.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(0.5)                        # the world's last events (50 ms ahead) land first
        truth = rig.truth_count()
        answer = rig.gateway.command(DEVICE_ID, "reboot", timeout=30)
        assert answer and answer[1], answer
        _i, status = rig.console.wait_for(parse_status, after=after, timeout=60)        # the next boot's
        assert status["total_pulses"] == truth, (status["total_pulses"], truth)
        assert rig.board.status()["resets"]["hard_reset"] == 1         # machine.reset(): a reset the firmware made
    finally:
        rig.close()


@pytest.mark.parametrize("days", [3, pytest.param(7, marks=pytest.mark.soak)])
def test_days_without_the_gateway_wait_in_flash_coarsen_and_arrive_in_order(tmp_path, days):
    """Three days (-m soak: a week) unplugged: 288 quarter hours in a 200-entry log, which merges them."""
    speed = 20_000                                     # a day in 4.3 s
    rig = Rig(tmp_path, "meter", {"interval_min": 15}, speed=speed,
              extra={"link": {"sample_ms": 1000, "health_s": 3600}, "log": {"max_entries": 200}})
    try:
        rig.wait(lambda: rig.gateway.sessions.devices.get(0x1001), 20, "the board's hello")
        # the daily series needs wall time on the board: unplug only once a reading carries it (a loaded
        # machine can hold the time sync back for longer than a fixed pause)
        rig.wait(lambda: any(e.get("time_source") == "board" for e in rig.gateway.entries()), 30,
                 "a reading stamped with the board's own wall time")
        rig.gateway.unplug()
        before = len(rig.gateway.entries())
        time.sleep(days * 86400 / speed)
        assert len(rig.gateway.entries()) == before, "nothing may arrive while the gateway is gone"
        rig.gateway.plug()
        rig.board.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(0.3)
        truth = rig.truth_count()
        rig.wait(lambda: final_register(rig) == truth, 60, f"the backlog to drain up to register {truth}")
        arrived = rig.gateway.entries(order="id")
        interval = interval_readings(arrived)
        assert [(r["boot"], r["seq"]) for r in interval] == sorted((r["boot"], r["seq"]) for r in interval)
        check_register_chain(interval_readings(rig.gateway.entries()))
        merged = [r for r in interval if "seq_last" in r]
        assert merged, "a full log must have merged old intervals"
        for a, b in zip(interval, interval[1:]):       # merged or not, intervals tile board time
            assert b["t_board_s"] - b["span_s"] == a["t_board_s"], (a, b)
        assert max(r["span_s"] for r in merged) > 900 and interval[-1]["t_board_s"] >= days * 86400
        daily = [r for r in arrived if r["series"] == "daily"]
        assert len(daily) >= days and all(r["span_s"] == 86400 for r in daily[1:])
        assert all((r["wall_t"] + 7 * 3600) % 86400 == 0 for r in daily), "daily readings end at local midnight"
        for a, b in zip(daily, daily[1:]):
            assert b["register_before"] == a["register"]
        alarms = rig.gateway.entries("alarm")
        assert any(a["name"] == "log_full" and a["active"] for a in alarms)
        health = rig.gateway.health()
        assert health[3] >= 0.4 * HEAP_BUDGET, f"heap free minimum {health[3]} of {HEAP_BUDGET}"
    finally:
        rig.close()


def test_a_board_with_a_bad_config_stays_idle_and_tells_the_gateway_why(tmp_path):
    rig = Rig(tmp_path, "meter", {"interval_min": 7})
    try:
        i, m = rig.console.wait_for(r"prapa idle: config invalid: (\S+): (.*); fix: (.*)")
        assert m.group(1) == "meter.interval_min" and "divide" in m.group(2)
        alarm = rig.wait(lambda: rig.gateway.entries("alarm"), 20, "the config_invalid alarm")[0]
        assert alarm["name"] == "config_invalid" and alarm["active"]
        assert rig.board.status()["world"]["flow_meter"]["pulses"] >= 0
        assert not rig.gateway.entries("reading"), "no role runs without a valid config"
    finally:
        rig.close()
