"""The northbound contract: what the gateway publishes on MQTT, as JSON Schemas, and a check of a message.

docs/northbound.md says it for people and docs/asyncapi.yaml for tools (both written by
tools/contract.py from this module, so neither drifts from it). A reading item's "fields" are
generated from each role's spec (protocol/roles/<role>.py FIELDS, ALARMS, REGISTER, UNIT): a role
added to the registry is in the contract with nothing written here.

The schemas are the JSON form (a CBOR payload decodes to the same map, byte strings aside: JSON
carries them as hex, and json_form() turns a decoded CBOR map into the JSON form). They use only
keywords that mean the same in JSON Schema draft-07 and 2020-12 (no $ref, no $defs), so the AsyncAPI
document can carry them as its default schema format. Envelopes and items are open: within v1 the
gateway only adds keys, and a consumer ignores the keys it does not know. A role's "fields" are
closed: they are exactly its spec's columns.

problems(topic, body) -> [] for a valid message, else one line per problem. jsonschema is imported
there, lazily: the gateway on a Pi never validates its own output, so it does not need it installed.
"""

import functools
import json
import re

from protocol import messages as M
from protocol.roles import catalog as roles

VERSION = 1
PREFIX = f"prapa/v{VERSION}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = f"https://prapa.example/northbound/v{VERSION}/"
TIME_SOURCES = ("board", "gateway", "unknown")
SERIES = ("interval", "daily")
DEVICE_PATTERN = "^[0-9a-f]{8}$"
KIND_PATTERN = "^[a-z][a-z0-9_-]*$"          # forward_format.KIND
U32 = {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF}

# The kinds of entry the gateway forwards today with a schema of their own; any other kind (a later
# "health", say) is published with the generic entry schema.
ENTRY_KINDS = ("reading", "alarm")


def _u32(description):
    return dict(U32, description=description)


def _common_item_properties(kind):
    """What every item of an entry carries: its identity (device, boot, seq) and its time."""
    return {
        "device": {"type": "string", "pattern": DEVICE_PATTERN, "description": "the board's id, 8 hex digits"},
        "boot": _u32("the board's boot id; with device and seq, the entry's identity"),
        "seq": _u32("the entry's number in the board's log, one sequence per boot"),
        "kind": {"const": kind, "description": "the entry's kind, the last level of its topic"},
        "t_board_s": _u32("board clock: seconds since this boot, at the end of what the entry covers"),
        "wall_t": {"type": ["number", "null"],
                   "description": "Unix seconds (UTC) of t_board_s; null when time_source is unknown"},
        "time_source": {"enum": list(TIME_SOURCES),
                        "description": "board: the board's clock had been synced by the gateway; gateway: "
                                       "fixed up from the boot's hello; unknown: no wall time (wall_t null)"},
    }


# wall_t is a number exactly when time_source says where it came from.
_TIME_RULE = {"if": {"properties": {"time_source": {"const": "unknown"}}, "required": ["time_source"]},
              "then": {"properties": {"wall_t": {"type": "null"}}},
              "else": {"properties": {"wall_t": {"type": "number"}}}}


def _field_schema(name, unit, scale, missing):
    """One column of a role's readings row, as the gateway publishes it (column x 10**scale)."""
    kind = "integer" if scale >= 0 else "number"
    text = f"{unit}; the board's column x 10^{scale}" if scale else f"{unit}"
    if missing is not None:
        text += f"; null: no valid sample (the board sent {missing})"
    return {"type": [kind, "null"] if missing is not None else kind, "description": text,
            "x-unit": unit, "x-scale": scale}


def role_fields(role):
    """The JSON Schema of a role's reading "fields", from its spec's FIELDS; None for a role whose
    row is one bare number (no "fields")."""
    fields = roles.attr(role, "FIELDS", None)
    if not fields:
        return None
    return {"type": "object", "description": f"the {role}'s row, every column scaled (protocol/roles/{role}.py)",
            "properties": {f[0]: _field_schema(*f) for f in fields},
            "required": [f[0] for f in fields], "additionalProperties": False}


def _role_rule(role, then):
    return {"if": {"properties": {"role": {"const": role}}, "required": ["role"]}, "then": then}


def reading_item():
    """One reading: a readings row of a board's batch, with the batch's units, time and register."""
    props = _common_item_properties("reading")
    props.update({
        "role": {"enum": roles.available(), "description": "the board's role (protocol/roles/<role>.py)"},
        "series": {"enum": list(SERIES), "description": "interval: consecutive intervals, summed they are the "
                                                        "consumption; daily: one per local day, overlaps interval"},
        "span_s": {"type": "integer", "minimum": 0, "maximum": 86400,
                   "description": "seconds the reading covers, ending at t_board_s"},
        "unit": {"type": "string", "minLength": 1, "maxLength": 8, "description": "unit of value and register"},
        "scale": {"type": "integer", "minimum": -9, "maximum": 9,
                  "description": "value and register are in units of unit x 10^scale"},
        "k_factor_milli": {"type": "integer", "minimum": 0, "description": "meter: millilitres per pulse"},
        "value": {"type": "integer", "description": "the row's first column (what the register counts), raw: "
                                                    "unit x 10^scale"},
        "register_before": {"type": "integer", "minimum": 0,
                            "description": "the exact register before this reading (roles with REGISTER)"},
        "register": {"type": "integer", "minimum": 0,
                     "description": "the exact register after it: register_before + value"},
        "seq_last": _u32("a merged reading covers seq..seq_last (the board's log filled); absent: just seq"),
        "fields": {"type": "object", "description": "the row's columns by name, scaled, for roles with FIELDS"},
    })
    rules = [_TIME_RULE,
             {"if": {"required": ["register_before"]}, "then": {"required": ["register"]}},
             {"if": {"required": ["register"]}, "then": {"required": ["register_before"]}}]
    for role in roles.available():
        then, absent = {"properties": {}}, []
        fields = role_fields(role)
        if fields:
            then["properties"]["fields"] = fields
            then["required"] = ["fields"]
        else:
            absent.append("fields")
        if not roles.attr(role, "REGISTER", False):
            absent += ["register_before", "register"]
        if absent:
            then["allOf"] = [{"not": {"required": [key]}} for key in absent]
        unit = roles.attr(role, "UNIT", None)
        if unit:
            then["properties"]["unit"] = {"const": unit}
        rules.append(_role_rule(role, then))
    return {"type": "object", "properties": props, "allOf": rules,
            "required": ["device", "boot", "seq", "kind", "role", "series", "t_board_s", "span_s", "wall_t",
                         "time_source", "unit", "scale", "value"]}


def alarm_names(role):
    """{code: name} the alarms of a role can carry: its spec's ALARMS and the runtime's."""
    return {**(roles.attr(role, "ALARMS", None) or {}), **M.RUNTIME_ALARMS}


def alarm_item():
    """One alarm edge: raised (active true) or cleared (active false), in the board's log like a reading."""
    props = _common_item_properties("alarm")
    props.update({
        "role": {"enum": roles.available() + [None], "description": "the board's role; null before the gateway "
                                                                    "heard its hello or a reading"},
        "code": {"type": "integer", "minimum": 0, "description": "1..99 the role's (its spec's ALARMS), "
                                                                 "100+ the runtime's"},
        "name": {"type": "string", "description": "the code's name; code_<n> for a code this gateway does not know"},
        "active": {"type": "boolean", "description": "true: raised; false: cleared"},
        "detail": {"type": "integer", "description": "what the role's spec says the code's detail is (0: none)"},
    })
    rules = [_TIME_RULE]
    for role in roles.available():
        names = alarm_names(role)
        rules.append(_role_rule(role, {"properties": {"name": {
            "anyOf": [{"enum": sorted(set(names.values()))}, {"type": "string", "pattern": "^code_[0-9]+$"}],
            "description": "; ".join(f"{c} {n}" for c, n in sorted(names.items()))}}}))
    return {"type": "object", "properties": props, "allOf": rules,
            "required": ["device", "boot", "seq", "kind", "role", "code", "name", "active", "detail", "t_board_s",
                         "wall_t", "time_source"]}


def entry_item():
    """An item of any other kind: its identity at least. seq < 0: an entry the gateway made, not in the
    board's log (never acknowledged to a board); "raw": a payload that was not a map, as hex."""
    props = _common_item_properties("entry")
    props["kind"] = {"type": "string", "pattern": KIND_PATTERN, "maxLength": 32}
    props["seq"] = {"type": "integer", "minimum": -0xFFFFFFFF, "maximum": 0xFFFFFFFF,
                    "description": "the entry's number; < 0: made by the gateway, not in the board's log"}
    props["raw"] = {"type": "string", "pattern": "^([0-9a-f]{2})*$",
                    "description": "the entry's payload when it was not a map (hex in JSON, bytes in CBOR)"}
    return {"type": "object", "properties": props, "required": ["device", "boot", "seq", "kind"]}


def envelope(kind, item, title):
    """A message of one run of a device's entries of one kind (forward_format.message)."""
    kind_schema = {"const": kind} if kind else {"type": "string", "pattern": KIND_PATTERN, "maxLength": 32}
    return {"$schema": DIALECT, "$id": f"{ID_BASE}{title}", "title": title, "type": "object",
            "description": "one run of a device's entries of one kind; dedup each item by (device, boot, seq)",
            "properties": {
                "v": {"const": VERSION, "description": "the contract's version, as in the topic's v1"},
                "site": {"type": "string", "minLength": 1, "description": "the gateway's site, as in the topic"},
                "device": {"type": "string", "pattern": DEVICE_PATTERN, "description": "as in the topic"},
                "kind": dict(kind_schema, description="as in the topic"),
                "items": {"type": "array", "minItems": 1, "items": item},
                "replay": {"const": True, "description": "republished on a replay request: the same identities "
                                                         "and content as before"},
            },
            "required": ["v", "site", "device", "kind", "items"]}


def _since():
    return {"type": "object", "properties": {"since_boot": dict(U32), "since_seq": dict(U32)},
            "required": ["since_boot", "since_seq"]}


def replay_request():
    return {"$schema": DIALECT, "$id": f"{ID_BASE}replay_request", "title": "replay_request", "type": "object",
            "description": "the cloud asks for a device's stored entries again (CBOR or JSON): those after "
                           "(since_boot, since_seq), or those whose wall time is at or after since_time",
            "properties": {"since_boot": _u32("entries after this boot's since_seq, and every later boot"),
                           "since_seq": _u32("see since_boot"),
                           "since_time": {"type": "number", "description": "Unix seconds"},
                           "until_time": {"type": "number", "description": "Unix seconds, with since_time: "
                                                                           "entries up to this wall time"}},
            "anyOf": [{"required": ["since_time"]}, {"required": ["since_boot", "since_seq"]}]}


def replay_done():
    return {"$schema": DIALECT, "$id": f"{ID_BASE}replay_done", "title": "replay_done", "type": "object",
            "description": "a replay request answered: every entry it found was republished before this",
            "properties": {
                "v": {"const": VERSION}, "site": {"type": "string", "minLength": 1},
                "device": {"type": "string", "pattern": DEVICE_PATTERN},
                "count": {"type": "integer", "minimum": 0, "description": "entries republished"},
                "truncated": {"type": "boolean", "description": "more were stored than one replay sends: "
                                                                "ask again from next"},
                "request": {"type": "object", "description": "the request answered, as it came"},
                "next": dict(_since(), description="where the next request starts when truncated"),
                "error": {"type": "string", "description": "the request was refused: why (count is 0)"},
            },
            "required": ["v", "site", "device", "count"],
            "anyOf": [{"required": ["error"], "properties": {"count": {"const": 0}}},
                      {"required": ["truncated", "request"]}],
            "allOf": [{"if": {"properties": {"truncated": {"const": True}}, "required": ["truncated"]},
                       "then": {"required": ["next"]}}]}


def suspects():
    from gateway import ranking
    states = [s["state"] for s in ranking.legend(roles.available())]
    number_or_null = {"type": ["number", "null"]}
    entry = {"type": "object", "properties": {
        "rank": {"type": "integer", "minimum": 1, "description": "1: visit first"},
        "id": {"type": "string", "pattern": DEVICE_PATTERN}, "name": {"type": "string"},
        "lat": number_or_null, "lon": number_or_null, "catchment": {"type": "string"},
        "score": {"type": "number"}, "state": {"enum": states, "description": "the map's legend"},
        "level_mm": dict(number_or_null, description="mm"), "danger_mm": dict(number_or_null, description="mm"),
        "reasons": {"type": "array", "items": {"type": "string"}},
        "last_seen": dict(number_or_null, description="Unix seconds the gateway last heard it")},
        "required": ["rank", "id", "name", "catchment", "score", "state", "reasons"]}
    return {"$schema": DIALECT, "$id": f"{ID_BASE}catchment_suspects", "title": "catchment_suspects",
            "type": "object", "description": "a catchment's drains in the order a crew visits them (retained; an "
                                             "empty payload clears a catchment that is gone)",
            "properties": {"v": {"const": VERSION}, "site": {"type": "string", "minLength": 1},
                           "catchment": {"type": "string"}, "t": {"type": "number", "description": "Unix seconds"},
                           "raining": {"type": "boolean"}, "rain_mm_h": {"type": "number", "minimum": 0},
                           "suspects": {"type": "array", "items": entry}},
            "required": ["v", "site", "catchment", "t", "raining", "rain_mm_h", "suspects"]}


def command_request():
    """The cloud's request for a board (gateway/commands.py submit())."""
    return {"$schema": DIALECT, "$id": f"{ID_BASE}command_request", "title": "command_request", "type": "object",
            "description": "a command for a board (CBOR or JSON); the same id twice does the work once",
            "properties": {"id": {"type": "string", "pattern": "^[!-~]{1,64}$",
                                  "description": "the cloud's id for the command, echoed in its results"},
                           "name": {"type": "string", "minLength": 1, "maxLength": 32,
                                    "description": "ping, reboot, config, replay or a command of the role's spec"},
                           "args": {"type": "object"}},
            "required": ["id", "name"]}


def command_result():
    """What became of a command, by its id (gateway/commands.py Outcome)."""
    return {"$schema": DIALECT, "$id": f"{ID_BASE}command_result", "title": "command_result", "type": "object",
            "description": "a command's state, published with its id at each step",
            "properties": {"id": {"type": ["string", "null"]},
                           "state": {"type": "string", "description": "accepted, refused, delivered, confirmed, "
                                                                      "failed, timed_out"},
                           "detail": {"type": "string"}, "field": {"type": "string"}, "limit": {},
                           "fix": {"type": "string"}},
            "required": ["id", "state"]}


def gateway_status():
    """The gateway's own state (forward_format.gateway_status), retained; the last will is "offline"."""
    return {"$schema": DIALECT, "$id": f"{ID_BASE}gateway_status", "title": "gateway_status", "type": "object",
            "description": "whether the gateway is connected (retained): online at each connection, offline "
                           "on a clean stop, and offline/connection_lost as its last will when the broker "
                           "loses it (a crash, a power cut, the network)",
            "properties": {"v": {"const": VERSION}, "site": {"type": "string", "minLength": 1},
                           "state": {"enum": ["online", "offline"]},
                           "reason": {"type": "string", "description": "connected, stopped or connection_lost"},
                           "since": {"type": "number", "description": "Unix seconds (not in the last will)"}},
            "required": ["v", "site", "state", "reason"]}


@functools.lru_cache(maxsize=1)
def _schemas():
    return {"reading": envelope("reading", reading_item(), "reading"),
            "alarm": envelope("alarm", alarm_item(), "alarm"),
            "entry": envelope(None, entry_item(), "entry"),
            "replay_request": replay_request(),
            "replay_done": replay_done(),
            "catchment_suspects": suspects(),
            "command_request": command_request(),
            "command_result": command_result(),
            "gateway_status": gateway_status()}


def schemas():
    """{message name: JSON Schema} of every message on the northbound topics (a fresh copy)."""
    return json.loads(json.dumps(_schemas()))


# topic name pattern per message (for the docs; which() reads a topic)
TOPICS = {
    "reading": PREFIX + "/{site}/{device}/reading",
    "alarm": PREFIX + "/{site}/{device}/alarm",
    "entry": PREFIX + "/{site}/{device}/{kind}",
    "replay_request": PREFIX + "/{site}/{device}/replay/request",
    "replay_done": PREFIX + "/{site}/{device}/replay/done",
    "catchment_suspects": PREFIX + "/{site}/catchment/{catchment}/suspects",
    "command_request": PREFIX + "/{site}/{device}/command",
    "command_result": PREFIX + "/{site}/{device}/command/result",
    "gateway_status": PREFIX + "/{site}/gateway/status",
}
# What the gateway receives (the cloud publishes); the rest it publishes.
RECEIVED = ("replay_request", "command_request")
RETAINED = ("catchment_suspects", "gateway_status")


def which(topic):
    """(message name, {parameter: value}) for a northbound topic, or (None, problem)."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
        return None, f"topic {topic!r} is not under {PREFIX}/"
    site = parts[2]
    if len(parts) == 6 and parts[3] == "catchment" and parts[5] == "suspects":
        return "catchment_suspects", {"site": site, "catchment": parts[4]}
    if len(parts) == 5 and parts[3] == "gateway" and parts[4] == "status":
        return "gateway_status", {"site": site}
    if not re.fullmatch(DEVICE_PATTERN[1:-1], parts[3]):
        return None, f"topic {topic!r}: {parts[3]!r} is not a device (8 hex digits)"
    params = {"site": site, "device": parts[3]}
    if len(parts) == 6 and parts[4] == "replay" and parts[5] in ("request", "done"):
        return "replay_" + parts[5], params
    if len(parts) == 6 and parts[4] == "command" and parts[5] == "result":
        return "command_result", params
    if len(parts) == 5 and parts[4] == "command":
        return "command_request", params
    if len(parts) == 5 and re.fullmatch(KIND_PATTERN[1:-1], parts[4]):
        kind = parts[4]
        return (kind if kind in ENTRY_KINDS else "entry"), dict(params, kind=kind)
    return None, f"topic {topic!r} is not one of the northbound topics"


def json_form(value):
    """A decoded CBOR payload in its JSON form: byte strings as hex (as forward_format's JSON encoding)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_form(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return value


def decode(payload):
    """A payload as published: its map (CBOR or JSON, told by the first byte), None for an empty payload
    (a cleared retained topic). ValueError when it is neither."""
    payload = bytes(payload)
    if not payload:
        return None
    if payload[:1] == b"{":
        return json.loads(payload.decode())
    import cbor2
    try:
        return cbor2.loads(payload)
    except Exception as e:
        raise ValueError(f"payload is neither JSON nor CBOR: {e}") from None


@functools.lru_cache(maxsize=16)
def _validator(name):
    import jsonschema
    schema = _schemas()[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _where(path):
    return "/".join(str(p) for p in path) or "(message)"


def _line(e):
    """One problem as a line naming the key: "items/0/register: ...". A key a role must not carry is
    refused by {"not": {"required": [key]}}."""
    where = _where(e.absolute_path)
    if e.validator == "not" and isinstance(e.validator_value, dict) and "required" in e.validator_value:
        return f"{where}/{'/'.join(e.validator_value['required'])}: not carried by this role's items"
    return f"{where}: {e.message}"


def problems(topic, body):
    """[] when body (a decoded payload: a dict, CBOR or JSON form) is a valid message for topic, else one
    line per problem ("items/0/fields/level_mm: 'x' is not of type 'integer', 'null'"). body None: an empty
    payload, valid only on a retained topic (it clears it)."""
    name, params = which(topic)
    if name is None:
        return [params]
    if body is None:
        return [] if name in RETAINED else [f"{topic}: empty payload"]
    if not isinstance(body, dict):
        return [f"{topic}: the payload is a {type(body).__name__}, not a map"]
    body = json_form(body)
    out = [_line(e) for e in sorted(_validator(name).iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]
    if name in RECEIVED or name == "command_result":
        return out
    for key, value in params.items():
        if key in body and body[key] != value:
            out.append(f"{key}: {body[key]!r} is not the topic's {value!r}")
    items = body.get("items") if isinstance(body.get("items"), list) else []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        for key in ("device", "kind"):
            if key in item and key in body and item[key] != body[key]:
                out.append(f"items/{i}/{key}: {item[key]!r} is not the message's {body[key]!r}")
        if isinstance(item.get("seq_last"), int) and isinstance(item.get("seq"), int) \
                and item["seq_last"] < item["seq"]:
            out.append(f"items/{i}/seq_last: {item['seq_last']} is below seq {item['seq']}")
        if isinstance(item.get("register"), int) and isinstance(item.get("register_before"), int) \
                and isinstance(item.get("value"), int) and item["register"] != item["register_before"] + item["value"]:
            out.append(f"items/{i}/register: {item['register']} is not register_before + value")
    return out
