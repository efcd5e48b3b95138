"""The northbound contract holds: what the gateway's own code publishes fits gateway/northbound.py's
schemas for every role, wrong messages are refused with a line naming the key, the schemas follow the
role specs, and docs/asyncapi.yaml, docs/northbound.cddl and docs/northbound.md are valid and what
tools/contract.py writes from the code today."""

import json
import re

import cbor2
import jsonschema
import pycddl
import pytest
import yaml

from gateway import forward_format as ff
from gateway import northbound as nb
from gateway.session import Sessions
from gateway.store import Store
from protocol import link, secure
from protocol import messages as M
from protocol.roles import catalog as roles
from protocol.roles import code as role_code
from protocol.secure import MemoryCounters
from tools import contract

KEY = bytes(range(16))
SITE = "test-site"
WALL0 = 1_796_000_000
VENDORED = contract.ROOT / "tests" / "gateway" / "asyncapi" / "3.0.0-without-id.json"
CDDL_RULES = {"reading": "reading-message", "alarm": "alarm-message", "replay_done": "replay-done"}


def role_rows(role, n=3):
    """Rows that fit a role's spec, whatever the role: one bare number, or one int per FIELDS column,
    with a column that has a `missing` value holding it in the second row."""
    fields = roles.attr(role, "FIELDS", None)
    if not fields:
        return [7 * (i + 1) for i in range(n)]
    rows = []
    for i in range(n):
        row = [(5 + i) * (k + 1) for k in range(len(fields))]
        if i == 1:
            row = [f[3] if f[3] is not None else c for f, c in zip(fields, row)]
        rows.append(row)
    return rows


def published(tmp_path, fmt="json"):
    """Topic and payload of every message the forwarder would publish for a board of each role (synced
    clock, fixed-up clock, unknown time), an alarm, and a replay of all of it."""
    store = Store(tmp_path / "store.db")
    s = Sessions(store, lambda d: KEY, lambda addr, wire: None, lambda d: MemoryCounters(0),
                 clock=lambda: float(WALL0 + 3600))
    for i, role in enumerate(roles.available()):
        for j, how in enumerate(("board", "gateway", "unknown")):
            device = 0x100 * (i + 1) + j
            board = link.Sender(KEY, device, secure.UPLINK, MemoryCounters(1))

            def up(msg_type, message, board=board):
                payload = bytearray(cbor2.dumps(message, canonical=True))
                n = board.wire_into(msg_type, payload, len(payload))
                s.feed(bytes(board.wire[:n]))
            if how != "unknown":
                up(M.HELLO, M.hello(4, "1.0", "esp32", role_code(role), b"\0" * 8, how == "board", 0, 600))
            unit = roles.attr(role, "UNIT", None) or "L"
            register = 1000 if roles.attr(role, "REGISTER", False) else None
            up(M.READINGS, M.readings(4, 10, 60, 60, role_code(role), M.units(unit, 0), role_rows(role), register,
                                      wall_t0=WALL0 if how == "board" else None))
            up(M.READINGS, M.readings(4, 13, 240, 120, role_code(role), M.units(unit, 0), role_rows(role, 1),
                                      None if register is None else 1000 + 10 ** 6, seq_step=2,
                                      series=M.SERIES_DAILY))
            up(M.ALARM, M.alarm(4, 15, 300, min(roles.attr(role, "ALARMS", {1: ""})), True, 3))
            up(M.ALARM, M.alarm(4, 16, 360, 100, False, 0))
    s.flush()
    rows = store.pending(limit=10_000)
    store.close()
    out = []
    for replay in (False, True):
        for run in ff.group(rows, 500, 64 * 1024, SITE):
            for part, payload in ff.message(SITE, run, fmt, 64 * 1024, replay=replay):
                out.append((ff.topic(SITE, part[0][1], part[0][4]), payload))
    return out


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_every_message_the_gateway_makes_for_every_role_is_valid_in_json_and_cbor(tmp_path, fmt):
    messages = published(tmp_path, fmt)
    seen = set()
    for topic, payload in messages:
        body = nb.decode(payload)
        assert nb.problems(topic, body) == [], (topic, body)
        seen.update((item["kind"], item.get("role"), item["time_source"]) for item in body["items"])
    for role in roles.available():
        for source in ("board", "gateway", "unknown"):
            assert ("reading", role, source) in seen
        for source in ("gateway", "unknown"):        # an alarm carries no wall time of the board's
            assert ("alarm", role, source) in seen


def test_the_cbor_form_of_every_entry_message_fits_the_cddl(tmp_path):
    text = contract.cddl()
    schemas = {name: pycddl.Schema(f"root = {rule}\n" + text) for name, rule in CDDL_RULES.items()}
    for topic, payload in published(tmp_path, "cbor"):
        schemas[nb.which(topic)[0]].validate_cbor(payload)


def reading(**over):
    item = {"device": "0000002a", "boot": 3, "seq": 120, "kind": "reading", "role": "meter", "series": "interval",
            "t_board_s": 900, "span_s": 900, "wall_t": 1796000900, "time_source": "board", "unit": "L", "scale": 0,
            "k_factor_milli": 1000, "register_before": 1000, "value": 42, "register": 1042}
    item.update(over)
    return {key: value for key, value in item.items() if value is not ...}


def envelope(*items, kind="reading", **over):
    return {"v": 1, "site": SITE, "device": "0000002a", "kind": kind, "items": list(items), **over}


TOPIC = f"prapa/v1/{SITE}/0000002a/reading"
DOSER_FIELDS = {name: 1 for name, *_ in roles.attr("doser", "FIELDS")}


def test_a_good_reading_passes_and_unknown_keys_are_allowed_within_the_version():
    assert nb.problems(TOPIC, envelope(reading())) == []
    assert nb.problems(TOPIC, envelope(reading(new_key_of_v1_1="x"), gateway_id="pi-3")) == []


@pytest.mark.parametrize("body, expect", [
    (envelope(reading(seq=...)), "items/0: 'seq' is a required property"),
    (envelope(reading(device=...)), "items/0: 'device' is a required property"),
    (envelope(reading(boot="3")), "items/0/boot: '3' is not of type 'integer'"),
    (envelope(reading(value=4.2)), "items/0/value: 4.2 is not of type 'integer'"),
    (envelope(reading(role="pump")), "items/0/role: 'pump' is not one of"),
    (envelope(reading(fields={"level_mm": 3})), "items/0/fields: not carried by this role's items"),
    (envelope(reading(role="doser", unit="stroke", fields=dict(DOSER_FIELDS, level_mm=3))),
     "items/0/fields: Additional properties are not allowed ('level_mm' was unexpected)"),
    (envelope(reading(role="doser", unit="stroke", fields={k: v for k, v in DOSER_FIELDS.items() if k != "flow_lps"})),
     "items/0/fields: 'flow_lps' is a required property"),
    (envelope(reading(role="doser", unit="stroke", fields=dict(DOSER_FIELDS, strokes=None))),
     "items/0/fields/strokes: None is not of type 'integer'"),
    (envelope(reading(role="drain", unit="mm", register_before=..., register=...,
                      fields={name: 1 for name, *_ in roles.attr("drain", "FIELDS")}, value=1)), None),
    (envelope(reading(role="drain", unit="mm", fields={name: 1 for name, *_ in roles.attr("drain", "FIELDS")})),
     "items/0/register: not carried by this role's items"),
    (envelope(reading(time_source="unknown")), "items/0/wall_t: 1796000900 is not of type 'null'"),
    (envelope(reading(wall_t=None)), "items/0/wall_t: None is not of type 'number'"),
    (envelope(reading(register=...)), "items/0: 'register' is a required property"),
    (envelope(reading(register=1043)), "items/0/register: 1043 is not register_before + value"),
    (envelope(reading(seq_last=119)), "items/0/seq_last: 119 is below seq 120"),
    (envelope(reading(device="0000002b")), "items/0/device: '0000002b' is not the message's '0000002a'"),
    (envelope(reading(), site="other"), "site: 'other' is not the topic's 'test-site'"),
    (envelope(reading(), v=2), "v: 1 was expected"),
    (envelope(), "items: [] should be non-empty"),
    (envelope(reading(), replay=False), "replay: True was expected"),
])
def test_a_wrong_reading_is_refused_with_a_line_naming_the_key(body, expect):
    found = nb.problems(TOPIC, body)
    if expect is None:
        assert found == []
    else:
        assert any(line.startswith(expect) for line in found), found


def test_alarms_replays_and_suspects_are_checked_by_their_topic():
    alarm = {"device": "0000002a", "boot": 3, "seq": 5, "kind": "alarm", "role": "meter", "code": 2, "name": "burst",
             "active": True, "detail": 0, "t_board_s": 10, "wall_t": None, "time_source": "unknown"}
    topic = f"prapa/v1/{SITE}/0000002a/alarm"
    assert nb.problems(topic, envelope(alarm, kind="alarm")) == []
    assert nb.problems(topic, envelope(dict(alarm, code=77, name="code_77"), kind="alarm")) == []
    assert nb.problems(topic, envelope(dict(alarm, role=None, name="log_full", code=100), kind="alarm")) == []
    assert any("items/0/active" in p for p in nb.problems(topic, envelope(dict(alarm, active=1), kind="alarm")))
    assert any("items/0/name" in p for p in nb.problems(topic, envelope(dict(alarm, name="blocked"), kind="alarm")))
    assert nb.problems(topic, envelope(alarm)) != []                     # kind reading on the alarm topic
    req = f"prapa/v1/{SITE}/0000002a/replay/request"
    assert nb.problems(req, {"since_boot": 1, "since_seq": 0}) == [] == nb.problems(req, {"since_time": 1.5})
    assert nb.problems(req, {"since_boot": 1}) != []
    done = f"prapa/v1/{SITE}/0000002a/replay/done"
    assert nb.problems(done, {"v": 1, "site": SITE, "device": "0000002a", "count": 0, "error": "bad"}) == []
    assert any("next" in p for p in nb.problems(done, {"v": 1, "site": SITE, "device": "0000002a", "count": 9,
                                                       "truncated": True, "request": {}}))
    sus = f"prapa/v1/{SITE}/catchment/north/suspects"
    assert nb.problems(sus, None) == []                                  # an empty retained payload clears it
    assert nb.problems(topic, None) == [f"{topic}: empty payload"]
    assert nb.problems(f"prapa/v2/{SITE}/0000002a/reading", envelope(reading()))[0].startswith("topic")
    assert nb.which(f"prapa/v1/{SITE}/0000002a/health") == ("entry", {"site": SITE, "device": "0000002a",
                                                                      "kind": "health"})


def test_a_health_entry_made_by_the_gateway_with_a_negative_seq_fits_the_generic_entry_schema():
    item = {"device": "0000002a", "boot": 3, "seq": -1, "kind": "health", "uptime_s": 5}
    topic = f"prapa/v1/{SITE}/0000002a/health"
    assert nb.problems(topic, envelope(item, kind="health")) == []
    assert nb.problems(topic, envelope(dict(item, raw=b"\x01\xff"), kind="health")) == []     # CBOR bytes
    assert nb.problems(topic, envelope(dict(item, seq="x"), kind="health")) != []


def test_each_roles_fields_in_the_schema_are_its_spec_fields_with_units_and_nulls():
    for role in roles.available():
        fields = roles.attr(role, "FIELDS", None)
        schema = nb.role_fields(role)
        if not fields:
            assert schema is None
            continue
        assert list(schema["properties"]) == schema["required"] == [f[0] for f in fields]
        for name, unit, scale, missing in fields:
            prop = schema["properties"][name]
            assert prop["x-unit"] == unit and prop["x-scale"] == scale and unit in prop["description"]
            assert ("null" in prop["type"]) == (missing is not None)


def test_every_schema_is_valid_json_schema_2020_12_and_draft_07():
    for name, schema in nb.schemas().items():
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.Draft7Validator.check_schema(schema)        # the AsyncAPI document's default format
        assert name in nb.TOPICS


def test_the_documents_are_what_the_code_writes_today():
    stale = [str(path) for path, content in contract.documents().items()
             if not path.exists() or path.read_text() != content]
    assert stale == [], "out of date: run python -m tools.contract"


def test_the_asyncapi_document_is_valid_against_the_official_asyncapi_3_0_0_schema():
    doc = yaml.safe_load((contract.ROOT / "docs" / "asyncapi.yaml").read_text())
    meta = json.loads(VENDORED.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(meta).iter_errors(doc)]
    assert errors == []
    assert doc["asyncapi"] == "3.0.0" and set(doc["channels"]) == set(nb.TOPICS)
    for name, message in doc["components"]["messages"].items():
        for example in message.get("examples", []):
            topic = nb.TOPICS[name].format(site=SITE, device="0000002a", kind="x", catchment="c")
            assert jsonschema.Draft7Validator(message["payload"]).is_valid(example["payload"]), name
            assert nb.which(topic)[0] == name
    broken = dict(doc, channels={"reading": {"address": 5}})
    assert list(jsonschema.Draft7Validator(meta).iter_errors(broken))


def test_every_example_in_the_guide_is_valid_for_its_topic():
    guide = (contract.ROOT / "docs" / "northbound.md").read_text()
    found = re.findall(r"`(prapa/v1/[^`]+)` \((\w+)\):\n\n```json\n(.*?)\n```", guide, re.S)
    assert {name for _topic, name, _body in found} == {"reading", "alarm", "replay_request", "replay_done",
                                                       "catchment_suspects", "gateway_status"}
    for topic, name, body in found:
        assert nb.which(topic)[0] == name
        assert nb.problems(topic, json.loads(body)) == [], topic
    assert any(json.loads(b).get("replay") for _t, n, b in found if n == "reading")
    assert any(i["time_source"] == "unknown" and i["wall_t"] is None
               for _t, n, b in found if n == "reading" for i in json.loads(b)["items"])
