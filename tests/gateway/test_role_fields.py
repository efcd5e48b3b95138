"""Readings rows of several columns (a role spec's FIELDS, the doser's): the session stores each
column scaled, chains the register on the first, refuses a row that does not fit without raising;
the meter's bare rows are stored as before; the status page charts a role's CHART_FIELDS."""

import logging
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import cbor2
import pytest

from gateway.session import Sessions
from gateway.store import Store
from protocol import cbor, link, secure
from protocol import messages as M
from protocol.roles import doser
from protocol.secure import MemoryCounters

KEY = bytes(range(16))
DEVICE = 9
DOSER = 1                       # the doser's number on the wire
UNITS = M.units("stroke", 0)
WALL0 = 1_799_000_000
NO = doser.NO_RESIDUAL

# [strokes, solution mL x100, flow L/s x100, residual min, mean, max ug/L, dosing s, fallback s, stopped s,
#  interlocks, ceiling ug/L]
ROWS = [
    [40, 2010, 1234, 480, 512, 560, 60, 0, 0, 0, 2000],
    [0, 0, 0, NO, NO, NO, 0, 0, 60, 1, 2000],             # no flow: stopped, no analyser sample
    [38, 1905, 1187, 470, 495, 530, 60, 0, 0, 0, 1800],
]


def rig(tmp_path):
    store = Store(tmp_path / "s.db")
    s = Sessions(store, lambda d: KEY if d == DEVICE else None, lambda addr, wire: None,
                 lambda d: MemoryCounters(0), clock=lambda: 1_800_000_000.0)
    board = link.Sender(KEY, DEVICE, secure.UPLINK, MemoryCounters(1))

    def up_bytes(payload):
        payload = bytearray(payload)
        n = board.wire_into(M.READINGS, payload, len(payload))
        s.feed(bytes(board.wire[:n]))

    def up(message):
        up_bytes(cbor2.dumps(message, canonical=True))

    return s, store, up, up_bytes


def test_doser_rows_are_stored_with_every_column_scaled_and_strokes_on_the_register(tmp_path):
    s, store, up, _ = rig(tmp_path)
    up(M.readings(2, 10, 60, 60, DOSER, UNITS, ROWS, 1000, wall_t0=WALL0))
    s.flush()
    a, b, c = store.entries()
    assert [(i["seq"], i["register_before"], i["value"], i["register"]) for i in (a, b, c)] == \
        [(10, 1000, 40, 1040), (11, 1040, 0, 1040), (12, 1040, 38, 1078)]
    assert a["role"] == "doser" and a["unit"] == "stroke" and a["scale"] == 0
    assert a["fields"] == {"strokes": 40, "solution_ml": 20.1, "flow_lps": 12.34, "residual_min_mgl": 0.48,
                           "residual_mean_mgl": 0.512, "residual_max_mgl": 0.56, "dosing_s": 60, "fallback_s": 0,
                           "stopped_s": 0, "interlocks": 0, "ceiling_mgl": 2.0}
    assert isinstance(a["fields"]["strokes"], int) and isinstance(a["fields"]["dosing_s"], int)
    assert b["fields"]["residual_min_mgl"] is None and b["fields"]["residual_mean_mgl"] is None
    assert b["fields"]["residual_max_mgl"] is None and b["fields"]["stopped_s"] == 60
    assert c["fields"]["ceiling_mgl"] == 1.8 and c["fields"]["solution_ml"] == 19.05
    assert s.counts()["invalid_readings"] == 0
    latest = s.take_latest()[DEVICE]
    assert latest == (WALL0 + 120, 38, 1078, c["fields"])


def _board_bytes(rows, register, seq_first=10, wall_t0=WALL0):
    """The board's send path: strokes in the records' values, the other columns packed in each
    record's role bytes (EXTRA_FORMAT at extra_off of a rec_bytes record)."""
    rec_bytes, extra_off = 48, 12
    raw = bytearray(rec_bytes * len(rows))
    for i, row in enumerate(rows):
        struct.pack_into(doser.EXTRA_FORMAT, raw, extra_off + i * rec_bytes, *row[1:])
    buf = bytearray(512)
    n = doser.encode_readings_into(buf, 0, 2, seq_first, 60, 60, register, [r[0] for r in rows], raw, extra_off,
                                   rec_bytes, len(rows), wall_t0=wall_t0)
    return bytes(buf[:n])


def test_the_boards_encoder_sends_the_same_bytes_and_the_session_stores_the_same_items(tmp_path):
    wire = _board_bytes(ROWS, 1000)
    assert wire == cbor.encode(M.readings(2, 10, 60, 60, DOSER, UNITS, ROWS, 1000, wall_t0=WALL0))
    s, store, up, up_bytes = rig(tmp_path)
    up_bytes(wire)
    s.flush()
    from_board = store.entries()
    (tmp_path / "b").mkdir()
    s2, store2, up2, _ = rig(tmp_path / "b")
    up2(M.readings(2, 10, 60, 60, DOSER, UNITS, ROWS, 1000, wall_t0=WALL0))
    s2.flush()
    assert from_board == store2.entries() and len(from_board) == 3
    assert from_board[1]["fields"]["residual_mean_mgl"] is None


@pytest.mark.parametrize("bad", [ROWS[0][:-1], ROWS[0] + [0], [40, 20.1] + ROWS[0][2:], [40, "x"] + ROWS[0][2:],
                                 [40, True] + ROWS[0][2:], [None] + ROWS[0][1:], 40, "40"])
def test_a_batch_with_a_row_that_does_not_fit_the_fields_is_refused_whole_and_counted_not_raised(tmp_path, caplog,
                                                                                                  bad):
    s, store, up, _ = rig(tmp_path)
    with caplog.at_level(logging.WARNING, logger="prapa.gateway.session"):
        up(M.readings(2, 10, 60, 60, DOSER, UNITS, [ROWS[0], bad, ROWS[2]], 1000, wall_t0=WALL0))
    s.flush()
    # messages.decode refuses the batch before the session sees it: nothing of it is stored or
    # acknowledged (the board keeps it), and the refusal is counted and logged with the row it names.
    assert store.entries() == [] and store.acked_upto(DEVICE, 2) is None
    assert s.counts()["invalid_readings"] == 1 and s.receiver.accepted == 0
    assert any("message_refused" in r.getMessage() and "row 1" in r.getMessage() for r in caplog.records)
    # The next good batch goes through as usual.
    up(M.readings(2, 13, 240, 60, DOSER, UNITS, [ROWS[2]], 2000, wall_t0=WALL0 + 180))
    s.flush()
    assert [i["seq"] for i in store.entries()] == [13]


def test_a_meter_row_is_stored_as_before(tmp_path):
    s, store, up, _ = rig(tmp_path)
    up(M.readings(3, 1, 900, 900, 0, M.units("L", 0, 1000), [5, 7], 100, wall_t0=WALL0))
    s.flush()
    got = store.db.execute("SELECT payload FROM entries ORDER BY seq").fetchall()
    expected = [{"device": "00000009", "boot": 3, "seq": 1, "kind": "reading", "role": "meter", "series": "interval",
                 "t_board_s": 900, "span_s": 900, "wall_t": WALL0, "time_source": "board", "unit": "L", "scale": 0,
                 "k_factor_milli": 1000, "register_before": 100, "value": 5, "register": 105},
                {"device": "00000009", "boot": 3, "seq": 2, "kind": "reading", "role": "meter", "series": "interval",
                 "t_board_s": 1800, "span_s": 900, "wall_t": WALL0 + 900, "time_source": "board", "unit": "L",
                 "scale": 0, "k_factor_milli": 1000, "register_before": 105, "value": 7, "register": 112}]
    assert [bytes(r[0]) for r in got] == [cbor2.dumps(e) for e in expected]       # byte for byte
    assert s.take_latest()[DEVICE] == (WALL0 + 900, 7, 112, None)


def test_a_merged_doser_row_trimmed_against_finer_ones_keeps_strokes_on_the_register(tmp_path):
    s, store, up, _ = rig(tmp_path)
    up(M.readings(2, 1, 60, 60, DOSER, UNITS, [ROWS[0]], 1000, wall_t0=WALL0))
    s.flush()
    merged = [78, 3915, 1200, 470, 500, 560, 120, 0, 0, 0, 2000]
    up(M.readings(2, 1, 120, 120, DOSER, UNITS, [merged], 1000, wall_t0=WALL0 + 60, seq_step=2))
    s.flush()
    a, b = store.entries()
    assert (b["seq"], b["seq_last"], b["register_before"], b["value"], b["register"]) == (2, 2, 1040, 38, 1078)
    assert b["fields"]["strokes"] == 38


# -- the status page ---------------------------------------------------------------------------------
class Rows(HTMLParser):
    """Elements of the page, each with the device row it is in (None outside #devices rows)."""

    def __init__(self):
        super().__init__()
        self.elements, self.texts, self.row = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-device" in attrs and "alarm" not in (attrs.get("class") or ""):
            self.row = attrs["data-device"]
        self.elements.append((tag, attrs, self.row))

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None

    def handle_data(self, data):
        if self.row is not None:
            self.texts.append((self.row, data))

    def find(self, tag, row, cls=None):
        return [a for t, a, r in self.elements if t == tag and r == row
                and (cls is None or cls in (a.get("class") or "").split())]


@pytest.fixture
def service(tmp_path):
    from gateway import config
    from gateway.service import Service
    from tools.gateway_process import register, write_config
    path = write_config(tmp_path, [], 1)
    path.write_text('[[links]]\ntype = "udp"\nbind = "127.0.0.1:1"\n\n' + path.read_text())
    register(tmp_path, {0x3001: KEY, 0x3002: bytes(range(16, 32))}, roles={0x3001: "doser", 0x3002: "meter"})
    svc = Service(config.load(path))
    yield svc
    svc.registry.close()
    svc.store.close()


def _send(svc, board, messages):
    for m in messages:
        payload = bytearray(cbor2.dumps(m, canonical=True))
        n = board.wire_into(M.READINGS, payload, len(payload))
        svc.sessions.feed(bytes(board.wire[:n]))


def test_a_doser_gets_a_chart_per_chart_field_with_its_band_and_ceiling(service):
    from gateway.status_page import render
    board = link.Sender(KEY, 0x3001, secure.UPLINK, MemoryCounters(1))
    register = 1000
    for i, row in enumerate(ROWS):          # the live charts get each commit's newest interval reading
        _send(service, board, [M.readings(2, 1 + i, 60 * (i + 1), 60, DOSER, UNITS, [row], register,
                                          wall_t0=WALL0 + 60 * i)])
        register += row[0]
        service._commit()
    meter = link.Sender(bytes(range(16, 32)), 0x3002, secure.UPLINK, MemoryCounters(1))
    _send(service, meter, [M.readings(3, 1, 900, 900, 0, M.units("L", 0, 1000), [5, 7], 100, wall_t0=WALL0)])
    service._commit()
    status = service._build_status(WALL0 + 200)
    dev, meter = status["devices"]
    assert dev["role"] == "doser" and dev["chart"] == doser.CHART and dev["register"] == 1078
    assert dev["series"] == [[WALL0, 40], [WALL0 + 60, 0], [WALL0 + 120, 38]]       # as before: the values
    assert [c["field"] for c in dev["charts"]] == list(doser.CHART_FIELDS)
    residual, solution, flow = dev["charts"]
    assert residual["unit"] == "mg/L" and residual["series"] == [[WALL0, 0.512], [WALL0 + 60, None],
                                                                 [WALL0 + 120, 0.495]]
    assert residual["band"] == list(doser.CHART_BAND) and residual["ceiling"] == 1.8      # the newest ceiling
    assert solution["series"][-1] == [WALL0 + 120, 19.05] and solution["band"] is None and flow["ceiling"] is None
    assert meter["charts"] == [] and meter["series"] == [[WALL0 + 900, 7]]

    page = Rows()
    page.feed(render(status))
    charts = page.find("svg", "00003001", "chart")
    assert len(charts) == len(doser.CHART_FIELDS)
    assert len(page.find("rect", "00003001", "band")) == 1 and len(page.find("line", "00003001", "ceiling")) == 1
    assert len(page.find("polyline", "00003001")) == 3
    labels = [t for r, t in page.texts if r == "00003001"]
    assert "residual_mean_mgl (mg/L)" in labels and "solution_ml (mL)" in labels and "flow_lps (L/s)" in labels
    # The band and the ceiling are drawn inside the chart, the ceiling above the band.
    rect = page.find("rect", "00003001", "band")[0]
    ceiling = page.find("line", "00003001", "ceiling")[0]
    assert 0 <= float(ceiling["y1"]) < float(rect["y"]) < float(rect["y"]) + float(rect["height"]) <= 28
    # The meter renders as it always has: one chart of its values, no band, no ceiling.
    assert len(page.find("svg", "00003002", "chart")) == 1
    assert not page.find("rect", "00003002") and not page.find("line", "00003002")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium not installed (apt-get install chromium)")
def test_in_a_real_browser_the_script_draws_the_field_charts(tmp_path):
    from gateway.metrics import HttpServer, Metrics
    calls = []

    def status():
        calls.append(1)
        charts = [{"field": "residual_mean_mgl", "unit": "mg/L", "series": [[1.0, 0.4], [2.0, None], [3.0, 0.45]],
                   "band": [0.2, 0.5], "ceiling": 2.0},
                  {"field": "solution_ml", "unit": "mL", "series": [[1.0, 20.1], [3.0, 19.0]], "band": None,
                   "ceiling": None}]
        dev = {"id": "00003001", "name": "plant", "role": "doser", "last_seen": 2.0, "firmware": "x",
               "state": "active", "readings": 3, "alarms_active": 0, "series": [[1.0, 40], [3.0, 38]],
               "chart": "residual", "charts": charts if len(calls) > 1 else []}
        return {"site": "s", "now": 3.0, "backlog": 0, "devices": [dev], "alarms": [], "brokers": [], "links": []}

    srv = HttpServer("127.0.0.1", 0, Metrics(), status).start()
    try:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{srv.port}/"],
                             capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    assert len(calls) >= 2, "the page polled /api/status.json"
    page = Rows()
    page.feed(out.stdout)
    assert len(page.find("svg", "00003001", "chart")) == 2                  # the poll's charts replaced the one
    assert [len(p["points"].split()) for p in page.find("polyline", "00003001")] == [2, 2]
    assert len(page.find("rect", "00003001", "band")) == 1 and len(page.find("line", "00003001", "ceiling")) == 1
    assert "residual_mean_mgl (mg/L)" in [t for r, t in page.texts if r == "00003001"]
