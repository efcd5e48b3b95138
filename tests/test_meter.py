"""The firmware runtime and the meter role on the real VM, against the gateway's session layer.

Every pulse billed once, at the right time, through power cuts (issue 5)."""

import random
import time

import pytest

from tests.meter_rig import STATUS_LINE, Rig, check_register_chain, interval_readings


def test_a_meter_reports_aligned_intervals_that_add_up_to_the_world(tmp_path):
    rig = Rig(tmp_path, meter={"interval_min": 1}, speed=20, world=["flow_meter.forced_lpm=30"])
    try:
        rig.wait(lambda: len(interval_readings(rig.gateway.entries())) >= 4, 30, "four interval readings")
        readings = interval_readings(rig.gateway.entries())
        check_register_chain(readings)
        assert all(r["time_source"] == "board" for r in readings)
        # After the first (cut short to reach the boundary) every interval ends on a wall-clock minute.
        assert all(r["wall_t"] % 60 == 0 for r in readings)
        assert all(r["span_s"] == 60 for r in readings[1:])
        assert 25 <= readings[2]["value"] <= 35          # 30 L/min, 1 L per pulse
        truth = rig.truth_pulses()
        assert readings[-1]["register"] <= truth
    finally:
        rig.close()
