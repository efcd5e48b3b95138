"""The gateway's HTTP server: Prometheus metrics, the status page and its JSON, over a real socket."""

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import HttpServer, Metrics
from gateway.status_page import CSP, SCRIPT

EVIL = '<script>alert("pwned")</script>'


def status():
    return {
        "site": "town-1", "now": 1_750_000_000.0, "backlog": 42,
        "devices": [
            {"id": 4097, "name": EVIL, "role": "meter", "last_seen": 1_749_999_990.0, "firmware": "0.3.1",
             "state": "active", "readings": 1200, "alarms_active": 1,
             "series": [[1_749_999_000.0, 1.5], [1_749_999_300.0, 2.5], [1_749_999_600.0, 0.5],
                        [1_749_999_900.0, float("nan")]], "chart": "L per interval <i>"},
            {"id": 4098, "name": "Plant pump", "role": "doser", "last_seen": None, "firmware": None,
             "state": "commissioned", "readings": 0, "alarms_active": 0, "series": []},
        ],
        "alarms": [{"device": 4097, "code": "leak_suspected", "active": True, "t": 1_749_999_000.0},
                   {"device": 4097, "code": "<b>reverse_flow</b>", "active": False, "t": 1_749_990_000.0}],
        "brokers": [{"url": "mqtts://broker.example:8883", "connected": True}],
        "links": [{"name": "/dev/ttyUSB0", "type": "serial", "frames": 1250}],
    }


@pytest.fixture
def server():
    metrics = Metrics(site="town-1")
    srv = HttpServer("127.0.0.1", 0, metrics, status).start()
    yield srv, metrics
    srv.close()


def get(srv, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=5) as resp:
        return resp.status, resp.headers, resp.read().decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_carry_what_the_service_recorded(server):
    srv, m = server
    m.frames_received.labels(link="/dev/ttyUSB0").inc(5)
    m.rejections.labels(reason="replay").inc(2)
    m.rejections.labels(reason="bad_tag").inc()
    m.readings_committed.inc(120)
    m.backlog.set(42)
    m.commit_latency.observe(0.004)
    m.puback_latency.observe(0.03)
    m.puback_latency.observe(0.2)
    m.device_seen(4097, 1_750_000_000)
    m.broker_connected.labels(broker="mqtts://broker.example:8883").set(1)
    code, headers, text = get(srv, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    s = samples(text)
    assert s[("prapa_frames_received_total", (("link", "/dev/ttyUSB0"),))] == 5
    assert s[("prapa_frames_rejected_total", (("reason", "replay"),))] == 2
    assert s[("prapa_frames_rejected_total", (("reason", "bad_tag"),))] == 1
    assert s[("prapa_readings_committed_total", ())] == 120
    assert s[("prapa_backlog_entries", ())] == 42
    assert s[("prapa_commit_latency_seconds_count", ())] == 1
    assert s[("prapa_commit_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("prapa_puback_latency_seconds_bucket", (("le", "0.05"),))] == 1
    assert s[("prapa_puback_latency_seconds_count", ())] == 2
    assert s[("prapa_device_last_seen_timestamp_seconds", (("device", "4097"),))] == 1_750_000_000
    assert s[("prapa_broker_connected", (("broker", "mqtts://broker.example:8883"),))] == 1
    assert s[("prapa_gateway_info", (("site", "town-1"),))] == 1


def test_two_metrics_objects_do_not_share_counts():
    a, b = Metrics(), Metrics()
    a.readings_committed.inc(3)
    assert samples(b.exposition().decode())[("prapa_readings_committed_total", ())] == 0


def test_status_json_is_the_services_dict_with_nan_as_null(server):
    srv, _ = server
    code, headers, text = get(srv, "/api/status.json")
    data = json.loads(text)
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert data["backlog"] == 42 and data["devices"][0]["name"] == EVIL
    assert data["devices"][0]["series"][-1] == [1_749_999_900.0, None]


class Page(HTMLParser):
    """What a browser would build: elements with their attributes, and script bodies."""

    def __init__(self):
        super().__init__()
        self.elements, self.scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def find(self, tag, cls=None, **attrs):
        return [a for t, a in self.elements if t == tag
                and (cls is None or cls in (a.get("class") or "").split())
                and all(a.get(k) == v for k, v in attrs.items())]


def test_the_page_escapes_a_device_name_like_script(server):
    srv, _ = server
    code, headers, html = get(srv, "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert EVIL not in html and "<b>reverse_flow</b>" not in html
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    page = Page()
    page.feed(html)
    assert page.scripts == [SCRIPT]                     # the one inline script, and nothing injected
    assert headers["Content-Security-Policy"] == CSP


def test_the_page_has_the_hooks_a_browser_test_uses(server):
    srv, _ = server
    _, _, html = get(srv, "/")
    page = Page()
    page.feed(html)
    device_rows = [a["data-device"] for a in page.find("tr") if "data-device" in a and "alarm" not in a["class"]]
    assert device_rows == ["4097", "4098"]
    assert len(page.find("tr", cls="alarm")) == 2 and len(page.find("tr", cls="active")) == 1
    charts = page.find("svg", cls="chart")
    assert len(charts) == 1                             # only roles whose spec declares a chart
    line = page.find("polyline")[0]["points"].split()
    assert len(line) == 3                               # the NaN sample is left out
    assert page.find("b", id="backlog") and page.find("table", id="devices") and page.find("table", id="brokers")
    assert re.search(r'<b id="backlog">42</b>', html)
    assert not [a for _, a in page.elements if "src" in a or "href" in a]      # no external assets: works offline


def test_the_script_polls_status_json_every_two_seconds():
    assert 'fetch("api/status.json"' in SCRIPT and "setTimeout(poll, 2000)" in SCRIPT
    assert "innerHTML" not in SCRIPT                    # values reach the DOM as text only


def test_unknown_paths_are_404_and_a_failing_status_is_500_not_a_dead_server():
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("loop not ready")

    srv = HttpServer("127.0.0.1", 0, Metrics(), broken).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            get(srv, "/nope")
        assert info.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as info:
            get(srv, "/api/status.json")
        assert info.value.code == 500 and calls
        assert get(srv, "/metrics")[0] == 200
    finally:
        srv.close()


def test_a_taken_port_fails_at_start():
    first = HttpServer("127.0.0.1", 0, Metrics(), status).start()
    try:
        with pytest.raises(OSError):
            HttpServer("127.0.0.1", first.port, Metrics(), status).start()
    finally:
        first.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium not installed (apt-get install chromium)")
def test_in_a_real_browser_the_page_polls_and_redraws_with_escaped_text(tmp_path):
    calls = []

    def changing():
        calls.append(1)
        s = status()
        if len(calls) > 1:                              # what the first poll brings
            s["backlog"] = 7
            s["devices"].append({"id": 5000, "name": "added by poll <i>", "role": "meter", "last_seen": None,
                                 "firmware": None, "state": "commissioned", "readings": 0, "alarms_active": 0,
                                 "series": [[1.0, 1.0], [2.0, None], [3.0, 2.0]], "chart": "L per interval"})
        return s

    srv = HttpServer("127.0.0.1", 0, Metrics(), changing).start()
    try:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{srv.port}/"],
                             capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    page = Page()
    page.feed(out.stdout)
    assert len(calls) >= 2, "the page polled /api/status.json"
    assert [a["data-device"] for a in page.find("tr") if "alarm" not in a.get("class", "") and "data-device" in a] \
        == ["4097", "4098", "5000"]
    assert '<b id="backlog">7</b>' in out.stdout and 'id="conn">live<' in out.stdout
    assert "added by poll &lt;i&gt;" in out.stdout and not page.find("i")
    assert len(page.find("svg", cls="chart")) == 2
    assert [len(p["points"].split()) for p in page.find("polyline")] == [3, 2]      # null samples are not drawn
    assert page.scripts == [SCRIPT]
