"""The gateway's local status page: devices, backlog, alarms, brokers, links.

Made for a technician's laptop in a pump house with no internet: one HTML
document, no external assets. The server renders the first view, so the page
is useful without JavaScript; a small inline script then polls
/api/status.json every 2 s and redraws the tables and sparklines from it
with DOM text nodes only. Every value is escaped (device names are typed by
installers), and CSP allows no script but this one (by hash), so markup that
slipped through could not run anyway.

Input is the plain dict the service builds (Unix seconds throughout):
  {"site", "now", "backlog", "utc_offset_minutes" (optional, default 420),
   "devices": [{"id", "name", "role", "last_seen", "firmware", "state",
                "readings", "alarms_active", "series": [[t, value], ...],
                "chart": what the series shows (the role spec's CHART) or None: no chart,
                "charts" (optional): [{"field", "unit", "series": [[t, value], ...], "band": [lo, hi] or None,
                            "ceiling": value or None}]: a role whose spec declares CHART_FIELDS gets one small
                            chart per field instead of the series' chart, with the band shaded and the
                            ceiling drawn as a red line}],
   "alarms": [{"device", "code", "active", "t"}],
   "brokers": [{...}], "links": [{...}],   (brokers and links: any flat keys)
   "catchments" (optional): {name: {"suspects": [{"rank", "id", "name", "lat", "lon", "state", "score",
                "level_mm", "danger_mm", "reasons": [...], "last_seen"}, ...] in the order a crew visits
                them (gateway/ranking.py), "raining": bool, "rain_mm_h": number}},
   "suspect_legend" (optional): [{"state", "colour", "meaning"}]: the colour of each state on the maps}
Each catchment shows its ranked list (the crew goes to #1 first) beside a map drawn here, without
tiles or libraries (the Pi is offline): each device with a location at its lat/lon, scaled to the
box at one scale for both axes, a circle in its state's colour numbered by its rank, and the legend;
a device without a location is listed, not drawn. The page knows no state by name: the colours
and their meanings come with the status (the ranking owns them).
Stable hooks for tests: #devices tr[data-device], .alarm, svg.chart, #backlog, #catchments
.catchment[data-catchment], ol.suspects li[data-device][data-state], svg.catchment-map
circle[data-device][data-state], ul.legend li[data-state].
"""

import re

import base64
import datetime
import hashlib
import math
from html import escape

CHART_W, CHART_H = 120, 28
MAP_W, MAP_H, MAP_PAD, DOT_R = 360, 260, 18, 9
COLOUR = re.compile(r"#[0-9a-fA-F]{3,8}\Z")
DEFAULT_COLOUR = "#1769aa"
DEVICE_COLUMNS = (("id", "Device"), ("name", "Name"), ("role", "Role"), ("state", "State"),
                  ("last_seen", "Last seen"), ("firmware", "Firmware"), ("readings", "Readings"),
                  ("alarms_active", "Alarms"), ("series", "Trend"))

SCRIPT = r"""
(function () {
  const W = __W__, H = __H__, SVG = "http://www.w3.org/2000/svg";
  const MW = __MW__, MH = __MH__, MP = __MP__, DR = __DR__, DEFAULT = "__DEFAULT__", COLOUR = /^#[0-9a-fA-F]{3,8}$/;
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function shown(v) { return v === null || v === undefined ? "\u2013" : v === true ? "yes" : v === false ? "no" : String(v); }
  function age(t, now) {
    if (t === null || t === undefined) return "never";
    const s = Math.max(0, Math.round(now - t));
    return s < 120 ? s + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago"
         : s < 172800 ? Math.round(s / 3600) + " h ago" : Math.round(s / 86400) + " d ago";
  }
  function local(t, off) {
    if (t === null || t === undefined) return "";
    const d = new Date((t + off * 60) * 1000), sign = off < 0 ? "-" : "+", a = Math.abs(off);
    return d.toISOString().slice(0, 19).replace("T", " ") + " " + sign +
      String(Math.floor(a / 60)).padStart(2, "0") + ":" + String(a % 60).padStart(2, "0");
  }
  function timeCell(cls, t, now, off) { const c = el("td", cls, age(t, now)); c.title = local(t, off); return c; }
  function chart(series, band, ceiling) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    const pts = (series || []).filter(p => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]));
    band = Array.isArray(band) && band.length === 2 && band.every(Number.isFinite) ? band : null;
    ceiling = Number.isFinite(ceiling) ? ceiling : null;
    const vs = pts.map(p => p[1]).concat(band || [], ceiling === null ? [] : [ceiling]);
    if (vs.length) {
      const lo = Math.min(...vs), hi = Math.max(...vs);
      const y = v => (hi > lo ? H - 2 - (v - lo) / (hi - lo) * (H - 4) : H / 2).toFixed(1);
      if (band) {
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("class", "band");
        r.setAttribute("x", 0); r.setAttribute("width", W);
        r.setAttribute("y", y(Math.max(...band)));
        r.setAttribute("height", (y(Math.min(...band)) - y(Math.max(...band))).toFixed(1));
        svg.appendChild(r);
      }
      if (ceiling !== null) {
        const l = document.createElementNS(SVG, "line");
        l.setAttribute("class", "ceiling");
        l.setAttribute("x1", 0); l.setAttribute("x2", W);
        l.setAttribute("y1", y(ceiling)); l.setAttribute("y2", y(ceiling));
        svg.appendChild(l);
      }
    }
    if (pts.length) {
      const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
      const lo = Math.min(...vs), hi = Math.max(...vs);
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", pts.map(p =>
        (t1 > t0 ? (p[0] - t0) / (t1 - t0) * (W - 4) + 2 : W - 2).toFixed(1) + "," +
        (hi > lo ? H - 2 - (p[1] - lo) / (hi - lo) * (H - 4) : H / 2).toFixed(1)).join(" "));
      svg.appendChild(line);
    }
    return svg;
  }
  function newest(series) {
    const last = (series || []).length ? series[series.length - 1][1] : null;
    return Number.isFinite(last) ? String(Math.round(last * 100) / 100) : shown(null);
  }
  function fill(id, rows) { const body = document.querySelector("#" + id + " tbody"); body.replaceChildren(...rows); }
  function generic(id, items) {
    const table = document.getElementById(id), cols = [];
    items.forEach(it => Object.keys(it).forEach(k => { if (!cols.includes(k)) cols.push(k); }));
    const head = el("tr"); cols.forEach(k => head.appendChild(el("th", null, k)));
    table.querySelector("thead").replaceChildren(head);
    fill(id, items.map(it => {
      const tr = el("tr", "connected" in it ? (it.connected ? "up" : "down") : null);
      cols.forEach(k => tr.appendChild(el("td", k, shown(it[k])))); return tr;
    }));
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(k => e.setAttribute(k, attrs[k]));
    return e;
  }
  function mapPoints(suspects) {
    const placed = suspects.filter(e => Number.isFinite(e.lat) && Number.isFinite(e.lon) &&
      Math.abs(e.lat) <= 90 && Math.abs(e.lon) <= 180);
    if (!placed.length) return [];
    const k = Math.cos(placed.reduce((a, e) => a + e.lat, 0) / placed.length * Math.PI / 180);
    const xs = placed.map(e => e.lon * k), ys = placed.map(e => -e.lat);
    const w = Math.max(...xs) - Math.min(...xs), h = Math.max(...ys) - Math.min(...ys);
    let scale = Math.min(w > 0 ? (MW - 2 * MP) / w : Infinity, h > 0 ? (MH - 2 * MP) / h : Infinity);
    if (scale === Infinity) scale = 0;
    const cx = (Math.max(...xs) + Math.min(...xs)) / 2, cy = (Math.max(...ys) + Math.min(...ys)) / 2;
    return placed.map((e, i) => [MW / 2 + (xs[i] - cx) * scale, MH / 2 + (ys[i] - cy) * scale, e])
      .sort((a, b) => (Number.isFinite(b[2].rank) ? b[2].rank : 0) - (Number.isFinite(a[2].rank) ? a[2].rank : 0));
  }
  function catchmentMap(suspects, colours) {
    const svg = svgEl("svg", {"class": "catchment-map", viewBox: "0 0 " + MW + " " + MH, width: MW, height: MH,
                              role: "img"});
    mapPoints(suspects).forEach(([x, y, e]) => {
      const g = svgEl("g"), title = svgEl("title"), label = svgEl("text", {x: x.toFixed(1), y: (y + 3.5).toFixed(1)});
      title.textContent = shown(e.rank) + ". " + shown(e.name) + ": " + shown(e.state);
      label.textContent = shown(e.rank);
      g.appendChild(title);
      g.appendChild(svgEl("circle", {cx: x.toFixed(1), cy: y.toFixed(1), r: DR, fill: colours[e.state] || DEFAULT,
                                     "data-device": shown(e.id), "data-state": shown(e.state)}));
      g.appendChild(label);
      svg.appendChild(g);
    });
    return svg;
  }
  function drawCatchments(s) {
    const catchments = s.catchments && typeof s.catchments === "object" ? s.catchments : {};
    const legend = Array.isArray(s.suspect_legend) ? s.suspect_legend : [], colours = {};
    legend.forEach(i => {
      if (i && typeof i.state === "string" && typeof i.colour === "string" && COLOUR.test(i.colour)) {
        colours[i.state] = i.colour;
      }
    });
    const boxes = Object.keys(catchments).filter(n => catchments[n] && typeof catchments[n] === "object").map(name => {
      const c = catchments[name], box = el("div", "catchment"), head = el("h3", null, name + " ");
      const suspects = (Array.isArray(c.suspects) ? c.suspects : []).filter(e => e && typeof e === "object");
      const raining = c.raining === true;
      box.dataset.catchment = name;
      head.appendChild(el("span", "rain" + (raining ? " raining" : ""),
        raining ? (Number.isFinite(c.rain_mm_h) ? "raining " + c.rain_mm_h + " mm/h" : "raining") : "dry"));
      box.appendChild(head);
      const body = el("div", "catchment-body"), list = el("ol", "suspects");
      suspects.forEach(e => {
        const li = el("li", Number.isFinite(e.lat) && Number.isFinite(e.lon) ? "placed" : "unplaced");
        li.dataset.device = shown(e.id); li.dataset.state = shown(e.state); li.dataset.rank = shown(e.rank);
        li.appendChild(el("span", "name", shown(e.name)));
        li.appendChild(el("span", "state", shown(e.state)));
        li.appendChild(el("span", "score", "score " + shown(e.score)));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("span", "level", Number.isFinite(e.level_mm) ? e.level_mm + " mm" +
          (Number.isFinite(e.danger_mm) ? " of " + e.danger_mm : "") : shown(null)));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("span", "reasons", (Array.isArray(e.reasons) ? e.reasons : []).map(String).join("; ")));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("span", "seen", "heard " + age(e.last_seen, s.now)));
        list.appendChild(li);
      });
      const fig = el("figure"), keys = el("ul", "legend");
      fig.appendChild(catchmentMap(suspects, colours));
      legend.forEach(i => {
        if (!i || !(i.state in colours)) return;
        const li = el("li"), dot = svgEl("svg", {width: 14, height: 14, viewBox: "0 0 14 14"});
        li.dataset.state = i.state;
        dot.appendChild(svgEl("circle", {cx: 7, cy: 7, r: 5.5, fill: colours[i.state]}));
        li.appendChild(dot);
        li.appendChild(document.createTextNode(shown(i.meaning || i.state)));
        keys.appendChild(li);
      });
      fig.appendChild(keys);
      body.appendChild(list); body.appendChild(fig); box.appendChild(body);
      return box;
    });
    document.getElementById("catchments").replaceChildren(...boxes);
    document.getElementById("catchments-section").hidden = !boxes.length;
  }
  function draw(s) {
    const off = s.utc_offset_minutes === undefined ? 420 : s.utc_offset_minutes;
    document.getElementById("site").textContent = s.site;
    document.getElementById("backlog").textContent = shown(s.backlog);
    const now = document.getElementById("now");
    now.textContent = local(s.now, off); now.dataset.t = s.now;
    fill("devices", (s.devices || []).map(d => {
      const tr = el("tr", "role-" + d.role + " state-" + d.state);
      tr.dataset.device = d.id;
      ["id", "name", "role", "state"].forEach(k => tr.appendChild(el("td", k, shown(d[k]))));
      tr.appendChild(timeCell("last-seen", d.last_seen, s.now, off));
      ["firmware", "readings"].forEach(k => tr.appendChild(el("td", k, shown(d[k]))));
      tr.appendChild(el("td", "alarms-active" + (d.alarms_active ? " alarming" : ""), shown(d.alarms_active)));
      const trend = el("td", "trend");
      const charts = (Array.isArray(d.charts) ? d.charts : []).filter(c => c && typeof c === "object");
      if (charts.length) {
        if (d.chart) trend.title = d.chart;
        charts.forEach(c => {
          const box = el("div", "field-chart");
          box.dataset.field = shown(c.field);
          box.title = shown(c.field) + (c.unit ? " (" + c.unit + ")" : "");
          box.appendChild(el("span", "field-name", box.title));
          box.appendChild(chart(c.series, c.band, c.ceiling));
          box.appendChild(el("span", "trend-now", newest(c.series)));
          trend.appendChild(box);
        });
      } else if (d.chart) {
        trend.title = d.chart;
        trend.appendChild(chart(d.series));
        trend.appendChild(el("span", "trend-now", newest(d.series)));
      }
      tr.appendChild(trend); return tr;
    }));
    fill("alarms", (s.alarms || []).map(a => {
      const tr = el("tr", "alarm " + (a.active ? "active" : "cleared"));
      tr.dataset.device = a.device;
      tr.appendChild(el("td", "device", shown(a.device)));
      tr.appendChild(el("td", "code", shown(a.code)));
      tr.appendChild(el("td", "state", a.active ? "active" : "cleared"));
      tr.appendChild(timeCell("t", a.t, s.now, off)); return tr;
    }));
    generic("brokers", s.brokers || []);
    generic("links", s.links || []);
    drawCatchments(s);
  }
  function poll() {
    fetch("api/status.json", {cache: "no-store"})
      .then(r => { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(s => { draw(s); document.getElementById("conn").textContent = "live"; document.body.classList.remove("stale"); })
      .catch(() => { document.getElementById("conn").textContent = "no answer from the gateway"; document.body.classList.add("stale"); })
      .finally(() => setTimeout(poll, 2000));
  }
  setTimeout(poll, 2000);
})();
""".replace("__W__", str(CHART_W)).replace("__H__", str(CHART_H))
SCRIPT = (SCRIPT.replace("__MW__", str(MAP_W)).replace("__MH__", str(MAP_H)).replace("__MP__", str(MAP_PAD))
          .replace("__DR__", str(DOT_R)).replace("__DEFAULT__", DEFAULT_COLOUR))

CSP = ("default-src 'none'; script-src 'sha256-%s'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"
       % base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode())

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#1b2b34}
h1{font-size:1.3rem;margin:0}h2{font-size:1.05rem;margin:1.2rem 0 .3rem}
table{border-collapse:collapse;min-width:40%}th,td{padding:.2rem .6rem;border-bottom:1px solid #dde;text-align:left}
th{background:#eef3f6}.stale header p{color:#a33}
tr.alarm.active td{background:#fde2e1}td.alarming{color:#b00;font-weight:bold}
tr.down td{color:#a33}tr.up td{color:#175}
svg.chart{vertical-align:middle}svg.chart polyline{fill:none;stroke:#1769aa;stroke-width:1.5}
svg.chart rect.band{fill:#d6efd9}svg.chart line.ceiling{stroke:#c00;stroke-width:1;stroke-dasharray:3 2}
.catchment{margin:.6rem 0 1.2rem}.catchment h3{font-size:1rem;margin:.2rem 0}.rain{font-weight:normal;color:#456}
.rain.raining{color:#1769aa;font-weight:bold}
.catchment-body{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
ol.suspects{margin:0;padding-left:1.6rem;min-width:22rem;max-width:40rem}ol.suspects li{margin:.15rem 0}
ol.suspects .state{font-weight:bold;margin:0 .3rem}ol.suspects .reasons{color:#456;font-size:.9em}
ol.suspects li.unplaced .name::after{content:" (no location)";color:#888;font-weight:normal}
svg.catchment-map{border:1px solid #cdd;background:#f7fafb}svg.catchment-map circle{stroke:#263238;stroke-width:1.5}
svg.catchment-map text{font:bold 10px system-ui,sans-serif;text-anchor:middle;fill:#111;paint-order:stroke;
stroke:#fff;stroke-width:2.5px}
ul.legend{list-style:none;padding:0;margin:.3rem 0;display:flex;flex-wrap:wrap;gap:.2rem .9rem;font-size:.85em;
max-width:360px}
ul.legend svg{vertical-align:middle;margin-right:.25rem}ul.legend circle{stroke:#263238;stroke-width:1.5}
.field-chart{display:flex;align-items:center;gap:.3rem}.field-name{min-width:11rem;font-size:.85em;color:#456}
.trend-now{margin-left:.4rem;font-variant-numeric:tabular-nums}.trend,.last-seen,.t{white-space:nowrap}
"""


def _e(value):
    if value is None:
        return "\u2013"
    if value is True or value is False:
        return "yes" if value else "no"
    return escape(str(value), quote=True)


def _number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _local(t, offset_min):
    if not _number(t):
        return ""
    tz = datetime.timezone(datetime.timedelta(minutes=offset_min))
    when = datetime.datetime.fromtimestamp(t, tz)
    sign, a = ("-" if offset_min < 0 else "+"), abs(offset_min)
    return when.strftime("%Y-%m-%d %H:%M:%S") + f" {sign}{a // 60:02d}:{a % 60:02d}"


def _age(t, now):
    if not _number(t) or not _number(now):
        return "never"
    s = max(0, round(now - t))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{round(s / 60)} min ago"
    return f"{round(s / 3600)} h ago" if s < 172800 else f"{round(s / 86400)} d ago"


def chart_svg(series, band=None, ceiling=None):
    """A sparkline of [[t, value], ...] scaled to its own range: the shape of the readings, not their scale.

    band (lo, hi): shaded behind the line; ceiling: a red line. Both are kept inside the range drawn."""
    points = [p for p in series or () if isinstance(p, (list, tuple)) and len(p) == 2
              and _number(p[0]) and _number(p[1])]
    band = tuple(band) if isinstance(band, (list, tuple)) and len(band) == 2 and all(map(_number, band)) else None
    ceiling = ceiling if _number(ceiling) else None
    values = [v for _, v in points] + list(band or ()) + ([ceiling] if ceiling is not None else [])
    marks = line = ""
    if values:
        lo, hi = min(values), max(values)

        def y(v):
            return CHART_H - 2 - (v - lo) / (hi - lo) * (CHART_H - 4) if hi > lo else CHART_H / 2
        if band:
            top, bottom = y(max(band)), y(min(band))
            marks += f'<rect class="band" x="0" y="{top:.1f}" width="{CHART_W}" height="{bottom - top:.1f}"/>'
        if ceiling is not None:
            marks += f'<line class="ceiling" x1="0" x2="{CHART_W}" y1="{y(ceiling):.1f}" y2="{y(ceiling):.1f}"/>'
        if points:
            t0, t1 = points[0][0], points[-1][0]
            xy = []
            for t, v in points:
                x = (t - t0) / (t1 - t0) * (CHART_W - 4) + 2 if t1 > t0 else CHART_W - 2
                xy.append(f"{x:.1f},{y(v):.1f}")
            line = f'<polyline points="{" ".join(xy)}"/>'
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {CHART_H}" '
            f'width="{CHART_W}" height="{CHART_H}">{marks}{line}</svg>')


def _newest(series):
    last = series[-1][1] if series and isinstance(series[-1], (list, tuple)) and len(series[-1]) == 2 else None
    return f"{round(last, 2):g}" if _number(last) else _e(None)


def _field_chart(c):
    """One of a device's field charts: its name and unit, the chart, its newest value."""
    label = _e(c.get("field")) + (f" ({_e(c.get('unit'))})" if c.get("unit") else "")
    series = c.get("series") if isinstance(c.get("series"), list) else []
    return (f'<div class="field-chart" data-field="{_e(c.get("field"))}" title="{label}">'
            f'<span class="field-name">{label}</span>{chart_svg(series, c.get("band"), c.get("ceiling"))}'
            f'<span class="trend-now">{_newest(series)}</span></div>')


def _device_row(d, now, offset):
    cells = [f'<td class="{k}">{_e(d.get(k))}</td>' for k in ("id", "name", "role", "state")]
    cells.append(f'<td class="last-seen" title="{_local(d.get("last_seen"), offset)}">{_age(d.get("last_seen"), now)}</td>')
    cells += [f'<td class="{k}">{_e(d.get(k))}</td>' for k in ("firmware", "readings")]
    alarming = " alarming" if d.get("alarms_active") else ""
    cells.append(f'<td class="alarms-active{alarming}">{_e(d.get("alarms_active"))}</td>')
    trend, title = "", ""
    charts = [c for c in d.get("charts") or () if isinstance(c, dict)] if isinstance(d.get("charts"), list) else []
    if d.get("chart"):
        title = f' title="{_e(d.get("chart"))}"'
    if charts:
        trend = "".join(_field_chart(c) for c in charts)
    elif d.get("chart"):
        series = d.get("series") or []
        trend = chart_svg(series) + f'<span class="trend-now">{_newest(series)}</span>'
    cells.append(f'<td class="trend"{title}>{trend}</td>')
    cls = f'role-{_e(d.get("role"))} state-{_e(d.get("state"))}'
    return f'<tr class="{cls}" data-device="{_e(d.get("id"))}">{"".join(cells)}</tr>'


def _alarm_row(a, now, offset):
    state = "active" if a.get("active") else "cleared"
    return (f'<tr class="alarm {state}" data-device="{_e(a.get("device"))}"><td class="device">{_e(a.get("device"))}</td>'
            f'<td class="code">{_e(a.get("code"))}</td><td class="state">{state}</td>'
            f'<td class="t" title="{_local(a.get("t"), offset)}">{_age(a.get("t"), now)}</td></tr>')


def _colours(legend):
    """{state: colour} from the status's suspect_legend; a colour that is not #hex is not used."""
    return {i["state"]: i["colour"] for i in legend or () if isinstance(i, dict) and isinstance(i.get("state"), str)
            and isinstance(i.get("colour"), str) and COLOUR.match(i["colour"])}


def map_points(suspects):
    """(x, y, entry) in the map's box for each entry with a finite lat/lon: one scale for both axes (a
    degree of longitude shrunk by cos(latitude)), the points centred, the lowest rank drawn last (on top)."""
    placed = [e for e in suspects if _number(e.get("lat")) and _number(e.get("lon"))
              and -90 <= e["lat"] <= 90 and -180 <= e["lon"] <= 180]
    if not placed:
        return []
    k = math.cos(math.radians(sum(e["lat"] for e in placed) / len(placed)))
    xs, ys = [e["lon"] * k for e in placed], [-e["lat"] for e in placed]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    scale = min((MAP_W - 2 * MAP_PAD) / w if w > 0 else math.inf, (MAP_H - 2 * MAP_PAD) / h if h > 0 else math.inf)
    scale = 0.0 if scale == math.inf else scale           # one place: in the middle
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    points = [(MAP_W / 2 + (x - cx) * scale, MAP_H / 2 + (y - cy) * scale, e) for x, y, e in zip(xs, ys, placed)]
    return sorted(points, key=lambda p: -(p[2].get("rank") if _number(p[2].get("rank")) else 0))


def map_svg(suspects, colours):
    dots = []
    for x, y, e in map_points(suspects):
        colour = colours.get(e.get("state"), DEFAULT_COLOUR)
        dots.append(f'<g><title>{_e(e.get("rank"))}. {_e(e.get("name"))}: {_e(e.get("state"))}</title>'
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{DOT_R}" fill="{colour}" data-device="{_e(e.get("id"))}" '
                    f'data-state="{_e(e.get("state"))}"/>'
                    f'<text x="{x:.1f}" y="{y + 3.5:.1f}">{_e(e.get("rank"))}</text></g>')
    return (f'<svg class="catchment-map" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {MAP_W} {MAP_H}" '
            f'width="{MAP_W}" height="{MAP_H}" role="img">{"".join(dots)}</svg>')


def _legend_html(legend, colours):
    items = "".join(
        f'<li data-state="{_e(i["state"])}"><svg width="14" height="14" viewBox="0 0 14 14"><circle cx="7" cy="7" '
        f'r="5.5" fill="{colours[i["state"]]}"/></svg>{_e(i.get("meaning") or i["state"])}</li>'
        for i in legend or () if isinstance(i, dict) and i.get("state") in colours)
    return f'<ul class="legend">{items}</ul>'


def _suspect_item(e, now):
    placed = _number(e.get("lat")) and _number(e.get("lon"))
    level = None
    if _number(e.get("level_mm")):
        level = f'{e["level_mm"]:g} mm' + (f' of {e["danger_mm"]:g}' if _number(e.get("danger_mm")) else "")
    reasons = e.get("reasons") if isinstance(e.get("reasons"), list) else []
    return (f'<li class="{"placed" if placed else "unplaced"}" data-device="{_e(e.get("id"))}" '
            f'data-state="{_e(e.get("state"))}" data-rank="{_e(e.get("rank"))}">'
            f'<span class="name">{_e(e.get("name"))}</span>'
            f'<span class="state">{_e(e.get("state"))}</span><span class="score">score {_e(e.get("score"))}</span> '
            f'<span class="level">{_e(level)}</span> <span class="reasons">{_e("; ".join(map(str, reasons)))}</span> '
            f'<span class="seen">heard {_age(e.get("last_seen"), now)}</span></li>')


def _catchment(name, c, now, colours, legend):
    suspects = [e for e in c.get("suspects") if isinstance(e, dict)] if isinstance(c.get("suspects"), list) else []
    raining = c.get("raining") is True
    rain = (f'raining {c.get("rain_mm_h"):g} mm/h' if raining and _number(c.get("rain_mm_h")) else
            "raining" if raining else "dry")
    items = "".join(_suspect_item(e, now) for e in suspects)
    return (f'<div class="catchment" data-catchment="{_e(name)}"><h3>{_e(name)} '
            f'<span class="rain{" raining" if raining else ""}">{_e(rain)}</span></h3><div class="catchment-body">'
            f'<ol class="suspects">{items}</ol><figure>{map_svg(suspects, colours)}'
            f'{_legend_html(legend, colours)}</figure></div></div>')


def _catchments(status, now):
    catchments = status.get("catchments") if isinstance(status.get("catchments"), dict) else {}
    legend = status.get("suspect_legend") if isinstance(status.get("suspect_legend"), list) else []
    colours = _colours(legend)
    return "".join(_catchment(name, c, now, colours, legend) for name, c in catchments.items() if isinstance(c, dict))


def _generic_table(table_id, items):
    """Brokers and links carry whatever the forwarder and links report: one column per key."""
    items = [i for i in items or () if isinstance(i, dict)]
    columns = list(dict.fromkeys(k for item in items for k in item))
    head = "".join(f"<th>{_e(k)}</th>" for k in columns)
    rows = []
    for item in items:
        cls = (' class="up"' if item["connected"] else ' class="down"') if "connected" in item else ""
        rows.append(f"<tr{cls}>" + "".join(f'<td class="{_e(k)}">{_e(item.get(k))}</td>' for k in columns) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render(status):
    """The whole page for one status dict; safe for any strings in it."""
    now = status.get("now")
    offset = status.get("utc_offset_minutes", 420)
    offset = offset if _number(offset) and isinstance(offset, int) else 420
    site = _e(status.get("site"))
    devices = "".join(_device_row(d, now, offset) for d in status.get("devices") or () if isinstance(d, dict))
    alarms = "".join(_alarm_row(a, now, offset) for a in status.get("alarms") or () if isinstance(a, dict))
    device_head = "".join(f"<th>{label}</th>" for _, label in DEVICE_COLUMNS)
    catchments = _catchments(status, now)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>prapa gateway \u00b7 {site}</title><style>{STYLE}</style></head>
<body>
<header><h1>prapa gateway <span id="site">{site}</span></h1>
<p>As of <time id="now" data-t="{_e(now)}">{_local(now, offset)}</time> \u00b7 backlog
<b id="backlog">{_e(status.get("backlog"))}</b> entries waiting for the broker \u00b7 <span id="conn">live</span></p></header>
<section id="catchments-section"{"" if catchments else " hidden"}>
<h2>Catchments: suspects, the first to visit first</h2>
<div id="catchments">{catchments}</div></section>
<section><h2>Alarms</h2>
<table id="alarms"><thead><tr><th>Device</th><th>Code</th><th>State</th><th>Since</th></tr></thead><tbody>{alarms}</tbody></table></section>
<section><h2>Devices</h2>
<table id="devices"><thead><tr>{device_head}</tr></thead><tbody>{devices}</tbody></table></section>
<section><h2>Brokers</h2>{_generic_table("brokers", status.get("brokers"))}</section>
<section><h2>Links</h2>{_generic_table("links", status.get("links"))}</section>
<script>{SCRIPT}</script>
</body></html>
"""
