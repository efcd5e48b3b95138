"""A storm over ten drains of one catchment, one of them partly blocked, end to end: real firmware on
the real VM against the world's drains, the real gateway (ranking, rain sharing, forwarder, status
page) and a real Mosquitto. The blocked drain alarms before its simulated overflow (the lead time is
printed), the healthy nine raise no blocked or flood alarm, and the ranking puts the blocked one first,
on MQTT and on the status page."""

import time

from protocol.roles.drain import STATE_RAIN_SHARED
from tools.rigs.catchment import Catchment
from tools.sim.worlds.drain import SITE_CATCHMENT, site_place

SPEED = 200                         # 3 board hours in about a minute
STORM_AT_H = 5 / 60
BLOCKED = 3                         # the drain with the plastic bag in its outlet
GAUGED = 0                          # the catchment's one rain gauge
FLOOD = {"flood_danger", "blocked"}


def drains(n=10):
    out = []
    for i in range(n):
        section = {"dry_s": 300, "wet_s": 30}
        world = [f"storm_drain.storm_at_h={STORM_AT_H:.6f}", "storm_drain.sensor=1",
                 f"storm_drain.area_m2={245 + 3 * i}"]
        if i == GAUGED:
            section["rain_mm_tip"] = 0.2
            world.append("storm_drain.rain_mm_tip=0.2")
        if i == BLOCKED:
            world.append("storm_drain.blockage=0.75")
        out.append((section, world, site_place(i)))
    return out


def test_a_storm_names_the_blocked_drain_first_before_it_overflows_and_no_healthy_one(tmp_path):
    rig = Catchment(tmp_path, drains(), speed=SPEED)
    try:
        blocked = rig.hexid(BLOCKED)
        overflow = rig.wait(lambda: rig.world(BLOCKED)["overflow_at_s"], 120, "the blocked drain to overflow")
        first = rig.wait(lambda: min((a["t_board_s"] for a in rig.cloud.alarms.get(blocked, ()) if a["active"]),
                                     default=None), 30, "the blocked drain's first alarm at the broker")
        # Board time of the alarm vs the world's overflow: both count from the board's power-on (the world
        # starts with the bench, within milliseconds of it).
        lead_s = overflow - first
        assert lead_s > 300, (first, overflow)            # more than five minutes for a crew to get there
        ranked = rig.wait(lambda: rig.cloud.suspects.get(SITE_CATCHMENT), 30, "the catchment's suspects on MQTT")
        assert ranked["suspects"][0]["id"] == blocked, ranked
        page = rig.status()["catchments"][SITE_CATCHMENT]
        assert page["suspects"][0]["id"] == blocked
        # The gauge's rain was shared with the drains that have none: their samples say so.
        for i in (1, 2, BLOCKED):
            states = [r["fields"]["state"] for r in rig.cloud.readings.get(rig.hexid(i), {}).values()]
            assert any(s & STATE_RAIN_SHARED for s in states), (i, states)
        # The storm passes: three board hours in all, the healthy drains recede.
        rig.wait(lambda: rig.world(GAUGED)["t_us"] >= 3.2 * 3600e6, 120, "the storm to pass")
        time.sleep(2)
        for i in range(10):
            if i == BLOCKED:
                continue
            assert not rig.cloud.alarm_names(rig.hexid(i)) & FLOOD, (i, rig.cloud.alarm_names(rig.hexid(i)))
            assert rig.world(i)["overflow_at_s"] is None
        assert rig.cloud.alarm_names(blocked) & FLOOD
        print(f"\nblocked drain: first alarm {first:.0f} s, overflow {overflow:.0f} s: lead {lead_s / 60:.1f} min; "
              f"alarms {sorted(rig.cloud.alarm_names(blocked))}")
    finally:
        rig.close()
