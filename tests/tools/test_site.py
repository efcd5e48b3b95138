"""`prapa site --headless`: every board's link traffic reaches a real broker."""

import json
import subprocess
import sys


def test_headless_site_report_shows_every_board_delivering_through_the_broker(tmp_path):
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "site", "--boards", "2", "--headless",
                        "--duration", "5", "--report", str(report)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert len(data["boards"]) == 2
    for row in data["boards"]:
        assert set(row) >= {"id", "role", "readings_made", "readings_at_broker", "alarms"}
        assert row["readings_made"] >= 3
        assert row["readings_at_broker"] == row["readings_made"]
    # Nothing of this site is left running: no board, VM or broker using its folder.
    leftovers = subprocess.run(["pgrep", "-af", data["workdir"]], capture_output=True, text=True).stdout
    assert data["workdir"] and leftovers == ""
