"""Which drain a crew visits first: the suspect drains of each catchment, ranked.

The one module of the gateway that knows what a drain's alarms mean, and it learns that from the
role's spec (protocol/roles/drain.py, through protocol.roles.catalog): a role takes part when its
spec declares SUSPECT_POINTS. Everything here is a pure function of what the caller hands in, each
device's newest reading fields, its alarm states and its registry place, so it is tested without a
gateway and gives the same list on the status page and on MQTT.

The score of a live device (heard within silent_after_s, no sensor fault):
  the SUSPECT_POINTS of each of its active alarms
  + up to 100 points for its level's share of its danger level (the spec's SUSPECT_FILL fields)
  + 50 points per unit of recession ratio above 1 (the spec's SUSPECT_RATIO field: a drain that
    empties three times slower than it learned to scores 100).
Its state is the name of its active alarm worth most points (blocked, flood_danger, level_warning,
rising_fast), else "ok". A device whose FAULT_ALARM is active is "sensor_fault": a visit to mend a
sensor, never a flood; its level is no evidence, so it scores 0 and ranks below every live suspect.
A device not heard for silent_after_s (or never) is "silent", scored on what it last said, below
the sensor faults. The list runs: live suspects by score, sensor faults, silent devices by their
last score, then the ok ones by score (the fullest first); ties by name.
"""

import math

from gateway.forward_format import UNASSIGNED, device_hex
from protocol.roles import catalog as roles

SILENT_AFTER_S = 2 * 3600         # two dry-weather samples missed at the slowest dry_s (3600 s)
FILL_POINTS = 100                 # a level at its danger level
RATIO_POINTS = 50                 # per unit of recession ratio above 1
SILENT, OK = "silent", "ok"
# Tiers, in the order a crew works through them.
_SUSPECT, _FAULT, _SILENT, _OK = range(4)
# An alarm's detail named by a table of the spec, where the spec says what its detail is.
DETAIL_TABLES = (("FAULT_ALARM", "FAULTS"), ("A_BLOCKED", "BLOCKED_BY"))
# What the map draws for each state (its fill colour), and what the legend says it means to a crew.
COLOURS = {"blocked": "#c62828", "flood_danger": "#e53935", "level_warning": "#ffb300", "rising_fast": "#fb8c00",
           "sensor_fault": "#9e9e9e", SILENT: "#ffffff", OK: "#2e7d32"}
MEANINGS = {"blocked": "blocked", "flood_danger": "flood danger", "level_warning": "level warning",
            "rising_fast": "rising fast", "sensor_fault": "sensor fault (a visit, not a flood)",
            SILENT: "silent (not heard lately)", OK: "ok"}
OTHER_COLOUR = "#1769aa"


def participates(role):
    """The role's devices are ranked: its spec declares SUSPECT_POINTS."""
    return bool(role) and roles.attr(role, "SUSPECT_POINTS") is not None


def _number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _detail(role, code, detail):
    """The name of an alarm's detail where the spec has a table for it, else None."""
    for alarm_attr, table_attr in DETAIL_TABLES:
        if roles.attr(role, alarm_attr) == code:
            return (roles.attr(role, table_attr) or {}).get(detail)
    return None


def _ago(seconds):
    seconds = max(0, int(seconds))
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h" if seconds < 172800 else f"{round(seconds / 86400)} d"


def assess(drain, now, silent_after_s=SILENT_AFTER_S):
    """One device's entry (without its rank): {"id", "name", "lat", "lon", "catchment", "score", "state",
    "level_mm", "danger_mm", "reasons", "last_seen"}, and its tier (first key of the order).

    drain: {"id": int, "name", "role", "lat", "lon", "catchment", "fields": the newest reading's fields or
    None, "alarms": {code: (active, detail)}, "last_seen": Unix s or None}."""
    role = drain.get("role")
    points = roles.attr(role, "SUSPECT_POINTS") or {}
    fill_fields = roles.attr(role, "SUSPECT_FILL") or (None, None)
    ratio_field = roles.attr(role, "SUSPECT_RATIO")
    fault_code = roles.attr(role, "FAULT_ALARM")
    fields = drain.get("fields") or {}
    active = {code: detail for code, (on, detail) in (drain.get("alarms") or {}).items() if on}
    level, danger = fields.get(fill_fields[0]), fields.get(fill_fields[1])
    level = level if _number(level) else None
    danger = danger if _number(danger) else None
    score, reasons, top = 0.0, [], None
    for code in sorted((c for c in active if c in points), key=lambda c: -points[c]):
        name = roles.alarm_name(role, code)
        why = _detail(role, code, active[code])
        reasons.append(f"{name}: {why}" if why else name)
        score += points[code]
        top = top or name
    if level is not None and danger:
        share = max(0.0, min(1.0, level / danger))
        score += FILL_POINTS * share
        reasons.append(f"level {level:g} of {danger:g} mm ({round(100 * share)} %)")
    ratio = fields.get(ratio_field) if ratio_field else None
    if _number(ratio) and ratio > 1:
        score += RATIO_POINTS * (ratio - 1)
        reasons.append(f"recession {ratio:g}x slower than learned")
    if not fields:
        reasons.append("no reading yet")
    last_seen = drain.get("last_seen")
    if not _number(last_seen) or now - last_seen > silent_after_s:
        state, tier = SILENT, _SILENT
        reasons = [r if r == "no reading yet" else f"last said: {r}" for r in reasons]
        reasons.insert(0, "never heard" if not _number(last_seen) else f"not heard for {_ago(now - last_seen)}")
    elif fault_code is not None and fault_code in active:
        state, tier, score = roles.alarm_name(role, fault_code), _FAULT, 0.0
        why = _detail(role, fault_code, active[fault_code])
        reasons = [f"{state}: {why}" if why else state, "a visit to the sensor, not a flood"]
    elif top:
        state, tier = top, _SUSPECT
    else:
        state, tier = OK, _OK
    entry = {"id": device_hex(drain["id"]), "name": drain.get("name") or device_hex(drain["id"]),
             "lat": drain.get("lat"), "lon": drain.get("lon"), "catchment": drain.get("catchment") or UNASSIGNED,
             "score": round(score, 1), "state": state, "level_mm": level, "danger_mm": danger, "reasons": reasons,
             "last_seen": last_seen if _number(last_seen) else None}
    return tier, entry


def rank(drains, now, silent_after_s=SILENT_AFTER_S):
    """{catchment: [entry, ...]} in the order a crew visits them, entries numbered by "rank" from 1;
    devices of no catchment under forward_format.UNASSIGNED. Only roles that participate() are ranked."""
    by_catchment = {}
    for drain in drains:
        if not participates(drain.get("role")):
            continue
        tier, entry = assess(drain, now, silent_after_s)
        by_catchment.setdefault(entry["catchment"], []).append((tier, entry))
    out = {}
    for catchment in sorted(by_catchment):
        ordered = sorted(by_catchment[catchment], key=lambda te: (te[0], -te[1]["score"], te[1]["name"], te[1]["id"]))
        out[catchment] = [{"rank": i + 1, **entry} for i, (_tier, entry) in enumerate(ordered)]
    return out


def legend(role_names):
    """What the map's colours mean, for the roles present: [{"state", "colour", "meaning"}], in the
    order of the tiers (the participating roles' alarms by points, sensor fault, silent, ok)."""
    states = []
    for role in role_names:
        if not participates(role):
            continue
        points = roles.attr(role, "SUSPECT_POINTS") or {}
        names = [roles.alarm_name(role, c) for c in sorted(points, key=lambda c: -points[c])]
        fault = roles.attr(role, "FAULT_ALARM")
        names += [roles.alarm_name(role, fault)] if fault is not None else []
        states += [n for n in names if n not in states]
    if not states:
        return []
    states += [SILENT, OK]
    return [{"state": s, "colour": COLOURS.get(s, OTHER_COLOUR), "meaning": MEANINGS.get(s, s.replace("_", " "))}
            for s in states]


def changed(before, after):
    """How a catchment's list changed: "order" (a device moved, came, went or changed state: publish now),
    "values" (levels, scores or reasons only), or None. last_seen alone is no change."""
    def order(entries):
        return [(e["id"], e["state"]) for e in entries]

    def values(entries):
        return [{k: v for k, v in e.items() if k != "last_seen"} for e in entries]
    if before is None or order(before) != order(after):
        return "order"
    return "values" if values(before) != values(after) else None
