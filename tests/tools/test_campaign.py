"""prapa campaign: a site under seeded faults, checked by the ledger against the world's truth (issue 16)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.campaign import ledger_checks, parse_faults, schedule
from tools.ledger import LedgerStore
from tools.rigs.secrets_scan import keys_from_registry, scan

METER, DOSER = "00002001", "00002002"


def _reading(db, device, boot, seq, before, register, role="meter", seq_last=None):
    db.execute("INSERT INTO readings (device, boot, seq, seq_last, role, series, wall_t, span_s, time_source, unit, "
               "scale, register_before, value, register, item, replay, received_at, ingest) VALUES "
               "(?, ?, ?, ?, ?, 'interval', ?, 60, 'board', 'L', 0, ?, ?, ?, '{}', 0, 0, 0)",
               (device, boot, seq, seq_last, role, 1.8e9 + seq * 60, before, register - before, register))


def _report(meter_pulses, doser_world):
    return {"boards": [{"device_id": METER, "role": "meter", "world_truth": {"flow_meter": {"pulses": meter_pulses}},
                        "readings_made": 4},
                       {"device_id": DOSER, "role": "doser", "world_truth": {"chlorine_plant": doser_world}}],
            "limits": {DOSER: {"max_spm": 120}}}


def test_a_clean_ledger_passes_and_every_broken_promise_is_named(tmp_path):
    good = LedgerStore(tmp_path / "good.db")
    for seq, (a, b) in enumerate([(0, 5), (5, 9), (9, 9)], start=1):
        _reading(good.db, METER, 1, seq, a, b)
    _reading(good.db, METER, 2, 1, 9, 12)                  # the next boot goes on from 9 ...
    _reading(good.db, DOSER, 1, 1, 0, 40, role="doser", seq_last=3)       # a merged run covers seqs 1..3
    good.db.execute("INSERT INTO alarms (device, boot, seq, role, code, name, active, detail, wall_t, item, replay, "
                    "received_at, ingest) VALUES (?, 1, 4, 'doser', 3, 'tank_low', 1, 0, NULL, '{}', 0, 0, 0)",
                    (DOSER,))
    world = {"strokes": 40, "unsafe_starts": 0, "min_stroke_gap_s": 0.5}
    verdict = ledger_checks(tmp_path / "good.db", _report(14, world), {METER: 1}, {})   # ... 2 lost by its cut
    assert verdict["problems"] == [], verdict
    assert verdict["devices"][METER]["lost"] == 2 and verdict["devices"][METER]["bound"] == 10
    good.close()

    bad = LedgerStore(tmp_path / "bad.db")
    _reading(bad.db, METER, 1, 1, 0, 5)
    _reading(bad.db, METER, 1, 3, 6, 8)                    # seq 2 never arrived, and the chain jumps 5 -> 6
    _reading(bad.db, METER, 2, 1, 4, 4)                    # the register went back across the boots
    _reading(bad.db, DOSER, 1, 1, 0, 10, role="doser")
    bad.db.execute("INSERT INTO conflicts (kind, device, boot, seq, stored, received, received_at) "
                   "VALUES ('reading', ?, 1, 1, '{}', '{}', 0)", (METER,))
    bad.db.execute("INSERT INTO invalid (topic, problems, payload, received_at) VALUES ('t', '[]', x'00', 0)")
    world = {"strokes": 10, "unsafe_starts": 1, "min_stroke_gap_s": 0.3}
    problems = "\n".join(ledger_checks(tmp_path / "bad.db", _report(30, world), {}, {})["problems"])
    for said in ("two different contents", "broke the northbound contract", "entries never delivered",
                 "register chain broken", "lost, the bound is 0 cuts", "driven on first after 1 resets",
                 "faster than max_spm 120", "1 of the 4 readings the gateway committed never reached"):
        assert said in problems, (said, problems)
    bad.close()


def test_the_fault_schedule_is_the_seeds_and_bad_counts_are_refused():
    counts = parse_faults("power_cut=3, broker_kill=1")
    assert counts == {"power_cut": 3, "gateway_kill": 0, "broker_kill": 1, "line_noise": 0, "disk_full": 0}
    plan = schedule(counts, 20.0, seed=7)
    assert plan == schedule(counts, 20.0, seed=7) != schedule(counts, 20.0, seed=8)
    assert sorted(k for _t, k in plan) == ["broker_kill"] + ["power_cut"] * 3
    assert all(0 <= t <= 20.0 for t, _k in plan) and plan == sorted(plan)


def _campaign(tmp_path, *args, timeout=300):
    report = tmp_path / "campaign.json"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "campaign", "--json", "--report", str(report),
                        "--workdir", str(tmp_path / "town"), *args],
                       capture_output=True, text=True, timeout=timeout)
    return r, (json.loads(report.read_text()) if report.exists() else None)


def test_a_short_campaign_over_every_role_loses_nothing_beyond_the_stated_bound(tmp_path):
    """Six boards (a meter, the doser, four drains; every other one across its tick wrap), 16 h of board
    time at 1500x (38 s), with power cuts, gateway and broker SIGKILLs, line noise and a full disk."""
    faults = "power_cut=4,gateway_kill=2,broker_kill=2,line_noise=3,disk_full=1"
    r, report = _campaign(tmp_path, "--boards", "6", "--speed", "1500", "--hours", "16", "--seed", "4",
                          "--faults", faults)
    assert report is not None, r.stderr[-3000:]
    print("\n" + json.dumps({k: report[k] for k in ("faults", "restarts", "replays_asked", "acks_withheld",
                                                      "gateway_rss_peak_mb", "conflicts", "invalid")}))
    assert r.returncode == 0 and report["ok"], report["problems"]
    assert report["faults"] == parse_faults(faults)                 # every fault was carried out
    assert report["restarts"] >= 4                                  # each kill was a real death and restart
    assert report["acks_withheld"] >= 1                             # the full disk was seen by the gateway
    roles = {d["role"] for d in report["devices"].values()}
    assert roles == {"meter", "doser", "drain"}
    assert all(d["readings"] > 20 for d in report["devices"].values()), report["devices"]
    for d in report["devices"].values():
        if d["role"] in ("meter", "doser"):
            assert d["truth"] > 0 and 0 <= d["lost"] <= d["bound"], d
    assert sum(d["cuts"] for d in report["devices"].values()) == 4
    assert report["conflicts"] == 0 and report["invalid"] == 0
    # Secrets: nothing the run left (logs, the gateway's store, the broker's files, the ledger with every
    # payload it took, reports) nor what it printed holds a device key in any encoding, but the registry
    # and the boards' own flash, which must.
    town = tmp_path / "town"
    data = town / "data-kept"                        # the gateway's data, copied off its tmpfs at the end
    keys = keys_from_registry(data / "registry.db")
    assert len(keys) == 6
    hits = scan([town, ("stdout", r.stdout), ("stderr", r.stderr)], keys)
    where = {Path(h.source.split("#")[0]).name for h in hits}
    assert "registry.db" in where and "meter-001.img" in where      # the scan saw the files that must hold them
    assert where <= {"registry.db", "registry.db-wal"} | {f"{n}.img" for n in
                                                         ("meter-001", "doser-001", *(f"drain-00{i}" for i in range(1, 5)))}, \
        [str(h) for h in hits if not h.source.endswith((".img", ".db", ".db-wal"))]


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_fifty_boards_for_a_simulated_week_under_every_fault(tmp_path):
    """The soak (about 20 minutes): 50 boards of every role over a week of board time."""
    r, report = _campaign(tmp_path, "--boards", "50", "--speed", "600", "--hours", "168", "--seed", "16",
                          "--faults", "power_cut=60,gateway_kill=20,broker_kill=10,line_noise=40,disk_full=5",
                          timeout=3600)
    assert report is not None, r.stderr[-3000:]
    assert r.returncode == 0 and report["ok"], report["problems"]
