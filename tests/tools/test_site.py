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
