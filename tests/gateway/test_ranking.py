"""gateway/ranking.py: the suspect drains of a catchment in the order a crew visits them, from crafted
readings, alarms and places; and the status page that shows the list and its map."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from gateway import ranking, status_page
from gateway.metrics import HttpServer, Metrics
from gateway.forward_format import UNASSIGNED
from protocol.roles import drain

NOW = 1_750_000_000.0
A = drain


def fields(level=300, danger=1000, ratio=0.0, state=0, fault=0):
    return {"level_mm": level, "rise_mm_h": 0, "rain_mm": 0.0, "battery_mv": 3900, "fault": fault,
            "recession_ratio": ratio, "recession_s": 1200, "danger_mm": danger, "state": state}


def dev(device_id, name, alarms=(), catchment="khlong-1", seen_ago=60.0, lat=13.75, lon=100.5, role="drain",
        **f):
    return {"id": device_id, "name": name, "role": role, "lat": lat, "lon": lon, "catchment": catchment,
            "fields": fields(**f), "alarms": {code: (True, detail) for code, detail in alarms},
            "last_seen": None if seen_ago is None else NOW - seen_ago}


def order(ranked, catchment="khlong-1"):
    return [(e["name"], e["state"]) for e in ranked[catchment]]


def test_suspects_rank_by_their_alarms_points_then_fill_then_ratio():
    ranked = ranking.rank([
        dev(1, "rising", alarms=[(A.A_RISING, 0)], level=200),
        dev(2, "warning", alarms=[(A.A_WARNING, 750)], level=750),
        dev(3, "blocked", alarms=[(A.A_BLOCKED, A.B_SLOW_RECESSION)], level=400, ratio=4.0),
        dev(4, "danger", alarms=[(A.A_DANGER, 990), (A.A_WARNING, 990)], level=990),
        dev(5, "quiet", level=100),
        dev(6, "fuller", level=600),
    ], NOW)
    assert order(ranked) == [("blocked", "blocked"), ("danger", "flood_danger"), ("warning", "level_warning"),
                             ("rising", "rising_fast"), ("fuller", "ok"), ("quiet", "ok")]
    first = ranked["khlong-1"][0]
    assert first["rank"] == 1 and first["id"] == "00000003" and first["catchment"] == "khlong-1"
    assert first["score"] == 1000 + 40 + 150          # blocked + 400/1000 of 100 + 50 x (4 - 1)
    assert first["reasons"][0] == "blocked: slow_recession" and "recession 4x slower than learned" in first["reasons"]
    assert ranked["khlong-1"][1]["score"] == 500 + 200 + 99
    assert (first["level_mm"], first["danger_mm"], first["lat"], first["lon"]) == (400, 1000, 13.75, 100.5)
    assert [e["rank"] for e in ranked["khlong-1"]] == [1, 2, 3, 4, 5, 6]


def test_a_faulty_sensor_never_outranks_a_blocked_drain_and_never_shows_as_flooding():
    # The worst a broken sensor can say: a level past the danger level, flood_danger and rising_fast still
    # active, a huge recession ratio. It is a visit to a sensor, listed after every genuine suspect.
    faulty = dev(7, "faulty", alarms=[(A.A_SENSOR, A.F_ECHO_LOST), (A.A_DANGER, 1300), (A.A_RISING, 0),
                                      (A.A_WARNING, 1300)], level=1300, ratio=600.0, fault=A.F_ECHO_LOST)
    ranked = ranking.rank([faulty, dev(8, "blocked", alarms=[(A.A_BLOCKED, A.B_RISE_NO_RAIN)], level=50),
                           dev(9, "rising", alarms=[(A.A_RISING, 0)], level=10)], NOW)
    assert order(ranked) == [("blocked", "blocked"), ("rising", "rising_fast"), ("faulty", "sensor_fault")]
    entry = ranked["khlong-1"][2]
    assert entry["score"] == 0 and entry["reasons"] == ["sensor_fault: echo_lost", "a visit to the sensor, not a flood"]


def test_a_drain_not_heard_for_hours_is_silent_and_listed_after_sensor_faults_by_what_it_last_said():
    never = dev(4, "never heard", seen_ago=None)
    never["fields"] = None
    ranked = ranking.rank([
        dev(1, "ok", level=100),
        dev(2, "gone quiet in danger", alarms=[(A.A_DANGER, 1000)], level=1000, seen_ago=3 * 3600),
        dev(3, "gone quiet dry", level=0, seen_ago=5 * 3600),
        never,
        dev(5, "faulty", alarms=[(A.A_SENSOR, A.F_STUCK)]),
        dev(6, "warning", alarms=[(A.A_WARNING, 700)], level=700),
    ], NOW)
    assert order(ranked) == [("warning", "level_warning"), ("faulty", "sensor_fault"),
                             ("gone quiet in danger", "silent"), ("gone quiet dry", "silent"),
                             ("never heard", "silent"), ("ok", "ok")]
    quiet = ranked["khlong-1"][2]
    assert quiet["reasons"][:2] == ["not heard for 3 h", "last said: flood_danger"]
    assert ranked["khlong-1"][4]["reasons"] == ["never heard", "no reading yet"]
    assert ranked["khlong-1"][4]["last_seen"] is None
    # Within the threshold a drain is live: the threshold is the caller's to set.
    assert order(ranking.rank([dev(2, "x", alarms=[(A.A_DANGER, 1)], seen_ago=3 * 3600)], NOW,
                              silent_after_s=4 * 3600)) == [("x", "flood_danger")]


def test_catchments_are_ranked_apart_and_only_roles_declaring_suspect_points_take_part():
    ranked = ranking.rank([
        dev(1, "a", alarms=[(A.A_BLOCKED, 1)], catchment="north"),
        dev(2, "b", catchment="south"),
        dev(3, "c", catchment=None, lat=None, lon=None),
        dev(4, "a meter", catchment="north", role="meter"),
        dev(5, "a doser", catchment="north", role="doser"),
    ], NOW)
    assert sorted(ranked) == sorted(["north", "south", UNASSIGNED])
    assert order(ranked, "north") == [("a", "blocked")] and order(ranked, UNASSIGNED) == [("c", "ok")]
    assert ranked[UNASSIGNED][0]["lat"] is None
    assert ranking.participates("drain") and not ranking.participates("meter") and not ranking.participates(None)


def test_an_alarm_cleared_or_a_missing_reading_counts_nothing():
    d = dev(1, "cleared", level=None)
    d["alarms"] = {A.A_BLOCKED: (False, 1), A.A_DANGER: (False, 0)}
    d["fields"]["level_mm"] = None                        # NO_LEVEL arrives as None
    (entry,) = ranking.rank([d], NOW)["khlong-1"]
    assert (entry["state"], entry["score"], entry["level_mm"]) == ("ok", 0, None)
    d["fields"] = None
    (entry,) = ranking.rank([d], NOW)["khlong-1"]
    assert entry["reasons"] == ["no reading yet"] and entry["state"] == "ok"


def test_the_legend_gives_every_state_a_colour_in_the_order_of_the_list():
    legend = ranking.legend(["meter", "drain"])
    assert [i["state"] for i in legend] == ["blocked", "flood_danger", "level_warning", "rising_fast",
                                            "sensor_fault", "silent", "ok"]
    colours = {i["state"]: i["colour"] for i in legend}
    assert colours["ok"] == "#2e7d32" and colours["silent"] == "#ffffff" and colours["sensor_fault"] == "#9e9e9e"
    assert colours["blocked"].startswith("#c") and colours["level_warning"] == "#ffb300"
    assert ranking.legend(["meter"]) == []


def test_a_change_of_order_or_state_is_told_apart_from_new_values():
    before = ranking.rank([dev(1, "a", level=100), dev(2, "b", level=50)], NOW)["khlong-1"]
    later = ranking.rank([dev(1, "a", level=100, seen_ago=1), dev(2, "b", level=50, seen_ago=1)], NOW)["khlong-1"]
    assert ranking.changed(before, later) is None                           # only last_seen moved
    fuller = ranking.rank([dev(1, "a", level=120), dev(2, "b", level=50)], NOW)["khlong-1"]
    assert ranking.changed(before, fuller) == "values"
    swapped = ranking.rank([dev(1, "a", level=100), dev(2, "b", level=500)], NOW)["khlong-1"]
    assert ranking.changed(before, swapped) == "order" and ranking.changed(None, before) == "order"


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def find(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def status(suspects, **over):
    return {"site": "s", "now": NOW, "devices": [], "alarms": [], "brokers": [], "links": [],
            "catchments": {"khlong-1": {"suspects": suspects, "raining": True, "rain_mm_h": 12.5, "gauges": 1}},
            "suspect_legend": ranking.legend(["drain"]), **over}


def test_the_page_lists_each_catchment_in_rank_order_and_maps_the_placed_drains_in_their_colours():
    ranked = ranking.rank([
        dev(1, "Soi 3 <b>", alarms=[(A.A_BLOCKED, 1)], lat=13.7500, lon=100.5000),
        dev(2, "Temple", lat=13.7600, lon=100.5000, seen_ago=9 * 3600),
        dev(3, "Market", alarms=[(A.A_SENSOR, 1)], lat=13.7500, lon=100.5100),
        dev(4, "No place yet", alarms=[(A.A_WARNING, 800)], lat=None, lon=None),
    ], NOW)["khlong-1"]
    html = status_page.render(status(ranked))
    page = Page()
    page.feed(html)
    assert page.find("div", **{"data-catchment": "khlong-1"}) and "raining 12.5 mm/h" in html
    items = [(a["data-device"], a["data-state"]) for a in page.find("li") if "data-rank" in a]
    assert items == [("00000001", "blocked"), ("00000004", "level_warning"), ("00000003", "sensor_fault"),
                     ("00000002", "silent")]
    assert page.find("li", **{"data-device": "00000004", "class": "unplaced"})
    assert "Soi 3 &lt;b&gt;" in html and "Soi 3 <b>" not in html
    dots = {a["data-device"]: a for a in page.find("circle") if "data-device" in a}
    assert sorted(dots) == ["00000001", "00000002", "00000003"]            # the unplaced one is not drawn
    assert dots["00000001"]["fill"] == "#c62828" and dots["00000003"]["fill"] == "#9e9e9e"
    assert dots["00000002"]["fill"] == "#ffffff"
    x = {k: float(a["cx"]) for k, a in dots.items()}
    y = {k: float(a["cy"]) for k, a in dots.items()}
    assert y["00000002"] < y["00000001"] == y["00000003"]                  # north is up
    assert x["00000003"] > x["00000001"] == x["00000002"]                  # east is right
    assert all(status_page.DOT_R <= v <= status_page.MAP_W - status_page.DOT_R for v in x.values())
    # One scale for both axes: 0.01 deg of latitude is longer on the map than 0.01 deg of longitude.
    assert y["00000001"] - y["00000002"] > x["00000003"] - x["00000001"]
    legend = [a["data-state"] for a in page.find("li") if "data-state" in a and "data-device" not in a]
    assert legend == ["blocked", "flood_danger", "level_warning", "rising_fast", "sensor_fault", "silent", "ok"]
    assert not [a for _, a in page.elements if "src" in a or "href" in a]   # no tiles, no scripts from anywhere


@pytest.mark.parametrize("where", [[(13.75, 100.5)], [(13.75, 100.5), (13.75, 100.5)]])
def test_one_place_is_drawn_in_the_middle_of_the_map(where):
    suspects = [{"rank": i + 1, "id": f"{i:08x}", "name": str(i), "state": "ok", "lat": lat, "lon": lon}
                for i, (lat, lon) in enumerate(where)]
    points = status_page.map_points(suspects)
    assert {(round(x), round(y)) for x, y, _ in points} == {(status_page.MAP_W // 2, status_page.MAP_H // 2)}
    assert points[-1][2]["rank"] == 1                                       # the first on top


def test_a_page_without_catchments_hides_the_section_and_a_bad_colour_is_not_used():
    page = status_page.render(status([]) | {"catchments": {}})
    assert '<section id="catchments-section" hidden>' in page
    bad = status([{"rank": 1, "id": "1", "name": "x", "state": "blocked", "lat": 1.0, "lon": 1.0}],
                 suspect_legend=[{"state": "blocked", "colour": 'red" onload="x'}])
    html = status_page.render(bad)
    assert "onload" not in html and f'fill="{status_page.DEFAULT_COLOUR}"' in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium not installed (apt-get install chromium)")
def test_in_a_real_browser_the_script_redraws_the_catchments_list_and_map_from_a_poll(tmp_path):
    """The first view has no catchments; the poll brings one: the script draws its list in rank order,
    its map with the colours of the legend, and names with markup as text."""
    ranked = ranking.rank([
        dev(1, "Soi 3 <i>", alarms=[(A.A_BLOCKED, 1)], lat=13.7500, lon=100.5000),
        dev(2, "Market", alarms=[(A.A_SENSOR, 1)], lat=13.7500, lon=100.5100),
        dev(3, "No place", lat=None, lon=None),
    ], NOW)["khlong-1"]
    calls = []

    def changing():
        calls.append(1)
        return status(ranked) if len(calls) > 1 else status([]) | {"catchments": {}}

    srv = HttpServer("127.0.0.1", 0, Metrics(), changing).start()
    try:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{srv.port}/"],
                             capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    assert len(calls) >= 2, "the page polled /api/status.json"
    page = Page()
    page.feed(out.stdout)
    assert page.find("section", id="catchments-section") and not page.find("section", hidden="")
    assert [(a["data-device"], a["data-state"]) for a in page.find("li") if "data-rank" in a] == \
        [("00000001", "blocked"), ("00000002", "sensor_fault"), ("00000003", "ok")]
    dots = {a["data-device"]: a["fill"] for a in page.find("circle") if "data-device" in a}
    assert dots == {"00000001": "#c62828", "00000002": "#9e9e9e"}
    assert "Soi 3 &lt;i&gt;" in out.stdout and not page.find("i") and "raining 12.5 mm/h" in out.stdout
    assert len([a for a in page.find("li") if "data-state" in a and "data-rank" not in a]) == 7   # the legend
