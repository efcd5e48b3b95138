"""prapa bench all and its report: one record of every benchmark, and docs/benchmarks.md generated from it.

No assertion here is about a timing: the figures are whatever this machine measured. What is checked is
that the record is complete (every benchmark ran, or says why not), honest (every ratio is the figure
over its baseline, both in the record) and that the page is the record's and nothing else.
"""

import datetime
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import suite

REPO = Path(__file__).resolve().parents[2]


def python(*args, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of every benchmark: (the record's path, the record, the process)."""
    path = tmp_path_factory.mktemp("bench-all") / "record.json"
    r = python("-m", "tools.cli", "bench", "all", "--quick", "--json", str(path), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return path, json.loads(path.read_text()), r


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_quick_run_records_every_benchmark_as_run_or_skipped_with_its_reason(quick):
    _path, data, r = quick
    assert [b["name"] for b in data["benchmarks"]] == [b.name for b in suite.BENCHMARKS]
    for b in data["benchmarks"]:
        assert b["status"] in ("ran", "skipped"), b
        assert b["command"]
        if b["status"] == "ran":
            assert b["figures"], b["name"]
        else:
            assert b["reason"] and not b["figures"]
        assert b["name"] in r.stdout                  # the one table names every benchmark
    assert r.stdout.splitlines()[0].split() == ["figure", "value", "baseline", "ratio"]


def test_every_ratio_in_the_record_is_the_figure_over_its_baseline_of_the_same_run(quick):
    _path, data, _r = quick
    compared = 0
    for b in data["benchmarks"]:
        values = {row["figure"]: row["value"] for row in b["figures"]}
        module = importlib.import_module("tools.bench" if b["name"] == "boot" else f"tools.bench.{b['name']}")
        _declared, printed_ratios = suite._declared(module)
        assert not set(values) & set(printed_ratios), "a printed ratio stays out: the row's ratio replaces it"
        for row in b["figures"]:
            if "baseline" not in row:
                assert "ratio" not in row
                continue
            assert row["baseline_value"] == values[row["baseline"]]      # the baseline is a figure of the run
            value, base = row["value"], row["baseline_value"]
            if _number(value) and _number(base) and base != 0:
                assert row["ratio"] == pytest.approx(value / base, rel=1e-3), row
                compared += 1
            else:
                assert row["ratio"] is None, row
    if any(b["status"] == "ran" for b in data["benchmarks"]):
        assert compared > 0


def test_record_names_the_command_commit_machine_python_vm_and_date(quick):
    path, data, _r = quick
    assert data["command"] == f"prapa bench all --quick --json {path}"
    assert data["quick"] is True
    assert data["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    assert isinstance(data["machine"]["cores"], int) and data["machine"]["cores"] > 0
    assert data["machine"]["cpu_model"]
    assert data["python"].split()[0] in ("CPython", "PyPy")
    assert "name" in data["vm"]
    date = datetime.datetime.fromisoformat(data["date"])
    assert date.utcoffset() == datetime.timedelta(0)


def test_report_is_the_records_and_check_fails_when_a_figure_changes(quick, tmp_path):
    path, data, _r = quick
    page = tmp_path / "benchmarks.md"
    r = python("-m", "tools.bench.report", str(path), "--out", str(page))
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert "Generated, never edited by hand" in text and "python -m tools.bench.report" in text
    assert data["commit"] in text and data["date"] in text and "quick run" in text
    for b in data["benchmarks"]:
        assert f"## {b['name']}" in text
    r = python("-m", "tools.cli", "bench", "report", str(path), "--out", str(page), "--check")
    assert r.returncode == 0, r.stderr

    row = next(row for b in data["benchmarks"] for row in b["figures"] if _number(row["value"]))
    row["value"] = row["value"] * 2 + 1
    altered = tmp_path / "altered" / path.name           # same name: the page's header stays the same
    altered.parent.mkdir()
    altered.write_text(json.dumps(data))
    r = python("-m", "tools.bench.report", str(altered), "--out", str(page), "--check")
    assert r.returncode == 1
    assert "differs" in r.stderr
    assert page.read_text() == text                      # --check writes nothing


def test_a_benchmark_whose_vm_is_not_built_is_skipped_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PRAPA_VM", "unix32")
    boot = next(b for b in suite.BENCHMARKS if b.name == "boot")
    entry = suite.run_one(boot, True, None)
    assert entry["status"] == "skipped" and entry["figures"] == []
    assert "tools.sim.vm build" in entry["reason"]


def test_the_peer_runs_in_full_runs_only_and_without_its_venv_is_skipped_with_the_fix(tmp_path, monkeypatch):
    peers = next(b for b in suite.BENCHMARKS if b.name == "peers")
    quick = suite.run_one(peers, True, None)
    assert quick["status"] == "skipped" and "full runs only" in quick["reason"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    full = suite.run_one(peers, False, None)
    assert full["status"] == "skipped" and full["figures"] == []
    assert "prapa bench peers --setup" in full["reason"]


def test_a_benchmark_that_fails_is_recorded_as_failed_and_the_run_goes_on(monkeypatch):
    def broken(bench, options, quick):
        raise RuntimeError("the broker went away")
    monkeypatch.setattr(suite, "_missing", lambda bench, vm, quick: None)
    monkeypatch.setattr(suite, "_measure", broken)
    entry = suite.run_one(suite.BENCHMARKS[0], True, None)
    assert entry["status"] == "failed" and "the broker went away" in entry["reason"]


def test_docs_benchmarks_md_is_what_docs_benchmarks_json_gives():
    record = json.loads((REPO / "docs" / "benchmarks.json").read_text())
    assert [b["name"] for b in record["benchmarks"]] == [b.name for b in suite.BENCHMARKS]
    r = python("-m", "tools.bench.report", "docs/benchmarks.json", "--check")
    assert r.returncode == 0, r.stderr


def test_rows_a_figures_own_rows_replace_its_familys_and_an_unmeasured_baseline_gives_none():
    declared = (("ours_rate", "against mqtt", "mqtt_rate"), ("ours_rate", "against udp", "udp_rate"),
                ("ours_*", "ours, as the gateway bench says"), ("mqtt_rate", "the peer's"))
    rows = suite.rows({"ours_rate": 30, "mqtt_rate": 3, "ours_cpu": 2}, declared)
    assert [(r["figure"], r.get("baseline"), r.get("ratio"), r["meaning"]) for r in rows] == [
        ("ours_rate", "mqtt_rate", 10.0, "against mqtt"),          # udp_rate was not measured: no row for it
        ("mqtt_rate", None, None, "the peer's"),
        ("ours_cpu", None, None, "ours, as the gateway bench says")]
    only_unmeasured = suite.rows({"ours_rate": 30}, declared[1:2])
    assert only_unmeasured == [{"figure": "ours_rate", "value": 30, "meaning": "against udp"}]
