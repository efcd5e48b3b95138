"""`prapa site` supervises its broker and gateway as systemd would: a death is an event, a restart with
backoff, a line in the report; a component that keeps dying ends the site (exit 1) with its report; bad
arguments are refused before anything is created."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tools.site import RESTART_WINDOW_S, Supervised


class SiteRun:
    """`prapa site --headless` as a child process, its stdout events collected as they come."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "site", "--headless", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def wait_event(self, name, after=0, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            exited = self.proc.poll() is not None
            time.sleep(0.05)
            found = [e for e in self.events[after:] if e["event"] == name]
            if found:
                return found[0]
            if exited:
                break
        raise AssertionError(f"no {name} within {timeout} s; saw {self.names()}; "
                             f"stderr: {self.proc.stderr.read() if exited else '(still running)'}")

    def names(self):
        return [e["event"] for e in self.events]

    def finish(self, timeout=60):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.1)                     # the reader has the last lines
        return code, self.proc.stderr.read()


def _left_running(workdir):
    return subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True).stdout


def test_a_sigkilled_broker_and_gateway_are_restarted_and_every_reading_still_reaches_the_broker(tmp_path):
    workdir, report = tmp_path / "site", tmp_path / "r.json"
    site = SiteRun("--boards", "2", "--duration", "20", "--workdir", str(workdir), "--report", str(report))
    try:
        gateway = site.wait_event("gateway_started")
        broker = next(e for e in site.events if e["event"] == "broker_started")
        time.sleep(3)                                       # readings flowing
        os.kill(broker["pid"], signal.SIGKILL)
        assert site.wait_event("broker_died")["signal"] == "SIGKILL"
        site.wait_event("broker_restarted")
        time.sleep(3)
        os.kill(gateway["pid"], signal.SIGKILL)
        died = site.wait_event("gateway_died")
        assert (died["pid"], died["signal"], died["exit_code"]) == (gateway["pid"], "SIGKILL", None)
        assert site.wait_event("gateway_restarted")["pid"] != gateway["pid"]
        code, stderr = site.finish()
    finally:
        if site.proc.poll() is None:
            site.proc.kill()
    assert code == 0, stderr
    data = json.loads(report.read_text())
    assert data == json.loads((workdir / "report.json").read_text())
    assert (data["ended"], data["failed"]) == ("duration", None)
    assert [(r["component"], r["cause"]) for r in data["restarts"]] == [("broker", "killed by SIGKILL"),
                                                                      ("gateway", "killed by SIGKILL")]
    for restart in data["restarts"]:                        # readings kept reaching the broker after each
        assert restart["died_at_s"] < restart["at_s"] <= restart["up_at_s"]
        assert data["totals"]["readings_at_broker"] > restart["readings_at_broker"]
    # The boards ran on through the outages: the restarted gateway's store resumed, nothing was lost.
    for row in data["boards"]:
        assert row["readings_made"] >= 3
        assert row["readings_at_broker"] == row["readings_made"]
    stopped = site.events[-1]
    assert (stopped["event"], stopped["ended"], stopped["restarts"]) == ("site_stopped", "duration", 2)
    assert _left_running(workdir) == ""


def test_a_gateway_that_cannot_start_again_fails_the_site_with_exit_1_and_its_report(tmp_path):
    workdir = tmp_path / "site"
    site = SiteRun("--boards", "1", "--duration", "60", "--restart-limit", "2", "--workdir", str(workdir))
    try:
        gateway = site.wait_event("gateway_started")
        with open(workdir / "gateway.toml", "a") as config:         # every restart now exits 2
            config.write("\nbroken = [\n")
        os.kill(gateway["pid"], signal.SIGKILL)
        code, stderr = site.finish()
    finally:
        if site.proc.poll() is None:
            site.proc.kill()
    assert code == 1, stderr
    died = [e for e in site.events if e["event"] == "gateway_died"]
    assert [(e["signal"], e["exit_code"]) for e in died] == [("SIGKILL", None), (None, 2), (None, 2)]
    assert [e["restart_in_s"] for e in died] == [0.5, 1.0, None]         # backoff doubling, then the limit
    assert site.names()[-2:] == ["gateway_failed", "site_stopped"]
    data = json.loads((workdir / "report.json").read_text())
    assert (data["ended"], data["failed"]) == ("failed", "gateway")
    assert [r["cause"] for r in data["restarts"]] == ["killed by SIGKILL", "exit 2"]
    assert len(data["boards"]) == 1
    assert _left_running(workdir) == ""


def test_an_error_inside_the_site_itself_still_stops_everything_and_writes_the_report(tmp_path, monkeypatch,
                                                                                       capsys):
    from tools import cli, site

    def boom(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(site.Site, "_supervise", boom)
    workdir = tmp_path / "site"
    assert cli.main(["site", "--headless", "--boards", "1", "--duration", "30", "--workdir", str(workdir)]) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events][-2:] == ["site_error", "site_stopped"]
    assert events[-2]["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in (workdir / "site-error.txt").read_text()
    assert json.loads((workdir / "report.json").read_text())["ended"] == "failed"
    assert _left_running(workdir) == ""


@pytest.mark.parametrize("args, where", [(["--duration", "-1"], "--duration"), (["--duration", "nan"], "--duration"),
                                         (["--board", "nosuch"], "--board"), (["--boards", "0"], "--boards"),
                                         (["--restart-limit", "-1"], "--restart-limit")])
def test_bad_arguments_are_refused_in_one_line_before_the_workdir_is_created(tmp_path, args, where):
    workdir = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "tools.cli", "site", "--headless", "--workdir", str(workdir), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith(f"prapa: error: {where}: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == "" and not workdir.exists()


def test_restarts_back_off_from_half_a_second_doubling_to_8_s_and_the_limit_counts_within_a_minute():
    c = Supervised("gateway", proc=None, launch=None, ready=None, limit=6, log=None)
    delays = []
    for t in range(7):
        delays.append(c.delay_s(float(t)))
        c.restart_times.append(float(t))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, None]
    assert c.delay_s(6 + RESTART_WINDOW_S) == 0.5              # a minute on, the earlier restarts have aged out
    assert Supervised("broker", None, None, None, limit=0, log=None).delay_s(0.0) is None
