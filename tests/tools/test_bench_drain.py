"""The drain's board logic on the real VM against the world model (tools/bench/drain.py's replay at the
HAL seam): a month of showers, noise, lost echoes and sensor faults raises no level or blocked alarm and
reports each fault as a fault; seeded storms find the blocked drain before it overflows and rank it
first; the battery arithmetic of the bench."""

from tools.bench import drain as bench


def test_a_dry_month_raises_no_flood_or_blocked_alarm_and_every_fault_is_reported_as_a_fault():
    month = bench.dry_month(30, 3)
    assert month["false_alarms"] == 0, month
    assert month["faults_reported"] == month["fault_windows"] == 3, month     # stuck, blind zone, out of range
    assert 96 <= month["samples_per_day"] < 200, month       # every 15 min, faster only while it rains


def test_seeded_storms_find_the_blocked_drain_before_it_overflows_and_rank_it_first():
    storms = bench.storms(3, 4)
    assert storms["blocked_overflowed"] >= 2, storms
    assert storms["missed_before_overflow"] == 0, storms
    assert storms["lead_min_worst"] >= 5, storms             # minutes a crew has, at the worst
    assert storms["healthy_flood_or_blocked_alarms"] == 0, storms
    assert storms["ranked_first_share"] == 1.0, storms


def test_the_battery_estimate_counts_sleep_wakes_and_the_cells_own_loss():
    rs485_slow, rs485_fast = bench.battery(96, 1.0), bench.battery(960, 1.0)
    assert rs485_slow["rs485_days"] > rs485_fast["rs485_days"] > 0
    assert rs485_slow["wifi_days"] < rs485_slow["rs485_days"]
    floor_mah_day = bench.BATTERY_MAH * bench.SELF_DISCHARGE_PER_MONTH / 30 + bench.DEEP_SLEEP_UA * 24 / 1000
    assert bench.battery(0, 1.0)["mah_per_day_rs485"] == round(floor_mah_day, 2)
