"""`prapa site --headless`: every board's link traffic reaches a real broker; a site is meters and one
board of each other role (a doser)."""

import json
import subprocess
import sys


def test_headless_site_report_shows_every_board_delivering_through_the_broker(tmp_path):
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "site", "--boards", "2", "--headless",
                        "--duration", "5", "--report", str(report)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert (data["ended"], data["failed"], data["restarts"]) == ("duration", None, [])
    assert len(data["boards"]) == 2
    assert [row["role"] for row in data["boards"]] == ["meter", "doser"]
    for row in data["boards"]:
        assert set(row) >= {"id", "role", "readings_made", "readings_at_broker", "alarms"}
        assert row["readings_made"] >= 3
        assert row["readings_at_broker"] == row["readings_made"]
    # Nothing of this site is left running: no board, VM or broker using its folder.
    leftovers = subprocess.run(["pgrep", "-af", data["workdir"]], capture_output=True, text=True).stdout
    assert data["workdir"] and leftovers == ""


def test_a_site_runs_one_board_of_each_role_but_the_first_and_the_rest_of_the_first():
    from tools.site import site_plan
    assert site_plan(["meter", "doser"], 4) == ["meter", "meter", "meter", "doser"]
    assert site_plan(["meter", "doser"], 2) == ["meter", "doser"]
    assert site_plan(["meter", "doser"], 1) == ["meter"]
    assert site_plan(["meter"], 3) == ["meter"] * 3
    assert site_plan(["meter", "doser", "drain"], 3) == ["meter", "doser", "drain"]
    assert site_plan(["meter", "doser", "drain"], 2) == ["meter", "doser"]
    wanted = {"doser": 1, "drain": 4}           # a catchment of drains beside the plant's doser
    assert site_plan(["meter", "doser", "drain"], 8, wanted) == ["meter"] * 3 + ["doser"] + ["drain"] * 4
    assert site_plan(["meter", "doser", "drain"], 4, wanted) == ["meter", "doser", "drain", "drain"]
    assert site_plan(["meter", "doser", "drain"], 1, wanted) == ["meter"]


def test_a_site_run_validates_every_message_and_bills_each_meter_within_the_stated_bound(tmp_path):
    """The ledger stands in for the cloud: every message of every role is valid against the northbound
    contract, and each meter's end register of this month is its world's true count less the flow after it
    (unbilled_min at the burst main's 12 L/min, the fastest flow at the site), to the pulse: no power cut, so
    no checkpoint loss. Every meter starts at 0 L: a bill that starts above it has its head gap flagged (unless
    the run crossed the town's midnight at a month's end: the bill starts at the month then)."""
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "site", "--boards", "8", "--headless",
                        "--duration", "10", "--report", str(report)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    contract = data["contract"]
    assert contract["invalid"] == 0 and contract["undecodable"] == 0 and contract["validator"] == "northbound"
    assert contract["validated"] == contract["messages"] > 0
    roles = {row["role"] for row in data["boards"]}
    assert {kind.split("/")[1] for kind in contract["by_kind"] if kind.startswith("reading/")} == roles
    assert contract["stored_readings"] == data["totals"]["readings_made"]
    meters = [row["device_id"] for row in data["boards"] if row["role"] == "meter"]
    assert [b["device"] for b in data["billing"]] == meters and len(meters) == 3
    max_lpm = 12.0
    for b in data["billing"]:
        assert b["readings"] >= 3 and all(g["kind"] == "head" and not g["exact"] for g in b["gaps"]), b
        assert b["exact"] == (not b["gaps"]), b
        if b["start_at"] != b["from"]:          # not a site run across a month's end: it bills from 0 L
            assert (b["start_m3"] != "0.000") == bool(b["gaps"]), b
        end_l, world_l = round(float(b["end_m3"]) * 1000), round(b["world_m3"] * 1000)
        assert 0 <= world_l - end_l <= max_lpm * b["unbilled_min"] + 1, b
        assert round(float(b["consumption_m3"]) * 1000) == end_l - round(float(b["start_m3"]) * 1000)
    assert any(b["alarms"] == ["burst"] and float(b["consumption_m3"]) > 0 for b in data["billing"])
    assert "billed m3" in r.stderr and "world m3" in r.stderr
