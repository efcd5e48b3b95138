"""A simulated month billed end to end and held against the world's truth.

Two meters (the real firmware on the 32-bit VM, households with the daily tap profile) run a whole
February of the town's time at high speed; the real gateway, whose wall clock runs at the boards' speed
from a day before the month ([time] simulate_speed / simulate_from), forwards to a real Mosquitto;
the reference consumer (tools/ledger.py) stores what it receives; `billing()` bills the month. One meter
loses its power twice in the month, the other once. The bill of each meter must be the world's true
consumption between the instants its bill starts and ends at, less only what the board can lose per
power cut before it counted it (checkpoint_pulses), and each cut must be a flagged, exact gap.

Marked soak (about 65 s): `./dev test -m soak tests/tools/test_billing_month.py -s` prints each meter's bill
beside the world's truth.
"""

import datetime as dt
import json
import secrets
import time

import pytest

from tools import boards, image
from tools import ledger as L
from tools.broker import Broker
from tools.gateway_process import GatewayProcess, register, write_config
from tools.rigs.board import BOARD, wait_for
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess

SPEED = 10_000                                  # a day in 8.6 s of the host's: a VM that keeps up
PERIOD, TZ = "2027-02", L.parse_tz("+07:00")
SITE = "month"
CHECKPOINT_PULSES = 10                          # the meter's default: the most a cut can lose (1 L a pulse)
METERS = {                                      # device id: (daily litres, power cuts at these days)
    0x1001: (600.0, (9.3, 19.7)),
    0x1002: (900.0, (14.5,)),
}


def _interval_points(store, device):
    """{wall time: (boot, board seconds)} of both ends of every interval reading the ledger holds."""
    points = {}
    for (item,) in store.db.execute("SELECT item FROM readings WHERE device = ? AND series = 'interval'",
                                    (device,)):
        r = json.loads(item)
        points[round(r["wall_t"], 3)] = (r["boot"], r["t_board_s"])
        points[round(r["wall_t"] - r["span_s"], 3)] = (r["boot"], r["t_board_s"] - r["span_s"])
    return points


def _two_dry_intervals(store, device):
    """The newest two interval readings held counted nothing: the board has reported every pulse it saw."""
    rows = store.db.execute("SELECT value FROM readings WHERE device = ? AND series = 'interval' "
                            "ORDER BY boot DESC, seq DESC LIMIT 2", (device,)).fetchall()
    return len(rows) == 2 and rows[0][0] == rows[1][0] == 0


def _newest_boot(store, device):
    return store.db.execute("SELECT MAX(boot) FROM readings WHERE device = ?", (device,)).fetchone()[0]


def _newest_wall(store, device):
    row = store.db.execute("SELECT MAX(wall_t) FROM readings WHERE device = ? AND series = 'interval'",
                           (device,)).fetchone()
    return row[0] or 0.0


@pytest.mark.soak          # 5 min: the default suite bills a site's run (tests/tools/test_site.py) instead
def test_a_simulated_month_bills_each_meter_to_the_worlds_truth_within_the_checkpoint_bound(tmp_path):
    start, end = L.parse_period(PERIOD, TZ)
    board_def = boards.load(BOARD)
    broker = Broker(tmp_path / "broker")
    ledger = L.Ledger(tmp_path / "ledger.db", SITE, port=broker.port, client_id="month-ledger").start()
    meters, keys, gateway = {}, {}, None
    try:
        for i, (device_id, (daily, _cuts)) in enumerate(METERS.items()):
            key = secrets.token_bytes(16)
            flash = tmp_path / f"meter-{i}.img"
            prepare_flash(board_def, "meter", flash)
            image.provision(board_def, flash, {"device_id": device_id, "role": "meter",
                                               "meter": {"interval_min": 60},
                                               "link": {"sample_ms": 1000, "health_s": 3600}}, key)
            keys[device_id] = key
            meters[device_id] = BoardProcess(BOARD, "meter", flash, speed=SPEED, seed=i,
                                             world=[f"flow_meter.daily_litres={daily}"])
        config = write_config(tmp_path, [vb.uart_port for vb in meters.values()], broker.port, site=SITE,
                              sync_interval_s=86400, simulate_speed=SPEED, simulate_from=start - 86400)
        register(tmp_path, keys, board=board_def.name)
        # each boot's offset from its board clock to its world's clock: the first boot's now, each later
        # one's as its power comes back
        offsets = {d: [_offset(vb)] for d, vb in meters.items()}
        gateway = GatewayProcess(config, log_path=tmp_path / "gateway.log").start()
        gateway.wait_started()
        # The town's main valve is shut for 3 h either side of each bound of the month (world time, from the
        # first reading's clock): at 10,000x the VM samples its counter every few minutes of simulated
        # time (an ESP32 every second), so water right at a bound could fall on either side of it.
        for device_id, vb in meters.items():
            hexid = f"{device_id:08x}"
            wait_for(lambda: _newest_wall(ledger.store, hexid), 60, f"{hexid}'s first reading with wall time")
            _shut_valve(ledger.store, hexid, vb, offsets[device_id][0], start)
        cuts = sorted((start + day * 86400, d) for d, (_daily, days) in METERS.items() for day in days)
        for at, device_id in cuts:
            hexid = f"{device_id:08x}"
            wait_for(lambda: _newest_wall(ledger.store, hexid) >= at, 120, f"{hexid}'s readings up to {at}")
            # The taps close 80 ms (past the world's look-ahead) before the cut and open again once the new
            # boot reports, as in the power-cut campaign (tools/rigs/power_cut.py): at 10,000x the VM's lag
            # and its boot are an hour of water, where an ESP32's are a pulse; the bound is the checkpoint's.
            boot = _newest_boot(ledger.store, hexid)
            meters[device_id].set_world("flow_meter", "forced_lpm", 0)
            time.sleep(0.08)
            wait_for(lambda: _two_dry_intervals(ledger.store, hexid), 60,
                     f"{hexid} to report its last pulses before its cut")     # a loaded host's VM lags
            meters[device_id].power_cut()
            offsets[device_id].append(_offset(meters[device_id]))
            wait_for(lambda: _newest_boot(ledger.store, hexid) == boot + 1, 60, f"{hexid}'s boot after the cut")
            meters[device_id].set_world("flow_meter", "forced_lpm", -1)
        for device_id, vb in meters.items():
            hexid = f"{device_id:08x}"
            wait_for(lambda: _newest_wall(ledger.store, hexid) >= start + 4 * 3600, 60, f"{hexid} past the start")
            _shut_valve(ledger.store, hexid, vb, offsets[device_id][0], end)
        for device_id in meters:
            hexid = f"{device_id:08x}"
            wait_for(lambda: _newest_wall(ledger.store, hexid) >= end + 4 * 3600, 180,
                     f"{hexid}'s readings past the month's end")
        export = L.billing(ledger.store, PERIOD, TZ)
        assert ledger.failed is None and ledger.counts()["invalid"] == 0
        rows = {r["device"]: r for r in export["rows"]}
        assert sorted(rows) == [f"{d:08x}" for d in METERS]
        for device_id, vb in meters.items():
            hexid = f"{device_id:08x}"
            row = rows[hexid]
            cuts_in = len(METERS[device_id][1])
            points = _interval_points(ledger.store, hexid)
            first_boot = min(b for b, _t in points.values())

            def truth_at(iso):                  # the point the bill stands at (its time is cut to the second)
                t = dt.datetime.fromisoformat(iso).timestamp()
                boot, board_s = points[min(points, key=lambda p: abs(p - t))]
                offset_us = offsets[device_id][boot - first_boot]
                return vb.truth(round(board_s * 1e6) + offset_us)["flow_meter"]["pulses"]

            true_l = truth_at(row["end_at"]) - truth_at(row["start_at"])
            billed_l = round(float(row["consumption_m3"]) * 1000)
            gap_text = ", ".join(f"{g['kind']} {g['size_s']:g} s" for g in row["gaps"])
            print(f"\n{hexid}: billed {row['consumption_m3']} m3, world {true_l / 1000:.3f} m3 from {row['start_at']} "
                  f"to {row['end_at']}, {row['readings']} readings, {cuts_in} cuts, gaps: {gap_text}, "
                  f"exact={row['exact']}")
            # the bill stands within half an interval of the month's bounds: a board's clock is set by the
            # gateway's time sync, which at 10,000x is off by its latency times the speed (2 ms: 20 s)
            for at, bound in ((row["start_at"], start), (row["end_at"], end)):
                assert abs(dt.datetime.fromisoformat(at).timestamp() - bound) <= 1800, (at, bound)
            assert row["exact"], row["gaps"]
            assert 0 <= true_l - billed_l <= cuts_in * CHECKPOINT_PULSES, (true_l, billed_l)
            # every cut is a flagged gap across boots, exact from the chained register; the other gaps are
            # holes in wall time where a sync stepped the board's clock, exact too (one boot, every seq)
            gaps = row["gaps"]
            assert [g["boots"] for g in gaps if g["kind"] == "boot"] == \
                [[first_boot + k, first_boot + k + 1] for k in range(cuts_in)]
            assert all(g["exact"] and (g["kind"] == "boot" or (g["kind"] == "time" and not g["missing_seq"]))
                       for g in gaps), gaps
            assert row["readings"] >= 28 * 24 - 2 * cuts_in
    finally:
        if gateway is not None:
            gateway.stop()
        for vb in meters.values():
            vb.close()
        ledger.stop()
        broker.stop()


def _shut_valve(store, device, vb, first_offset_us, bound):
    """Shut the meter's world's main valve from 3 h before `bound` (UTC s) to 3 h after it, placed by the
    wall clock of the device's first reading with wall time (boot 1: its board clock is the world's less
    first_offset_us; a later boot's wall clock is synced onto the same calendar)."""
    (item,) = store.db.execute("SELECT item FROM readings WHERE device = ? AND wall_t IS NOT NULL "
                               "ORDER BY boot, seq LIMIT 1", (device,)).fetchone()
    r = json.loads(item)
    world_s = bound - r["wall_t"] + r["t_board_s"] + first_offset_us / 1e6
    vb.set_world("flow_meter", "shut_to_s", world_s + 3 * 3600)
    vb.set_world("flow_meter", "shut_from_s", world_s - 3 * 3600)


def _offset(vb):
    """World microseconds minus this boot's board microseconds, read at one instant."""
    s = vb.status()
    return s["world"]["flow_meter"]["t_us"] - s["board_us"]
