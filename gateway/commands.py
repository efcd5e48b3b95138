"""A request for a board, from the CLI on the Pi or from the cloud over MQTT: one check, one queue.

submit() is the only way a command or a config push enters the downlink queue from outside the
gateway: `prapa gateway command|push-config` calls it and prints the outcome, the service calls it
for prapa/v1/<site>/<device>/command and publishes the outcome on .../command/result. So both paths
refuse the same things: a device the registry does not serve, a command its role does not declare
(ping and reboot are every board's; the role spec's COMMANDS add its own), a config outside the
board's own schema (protocol/config.py and the role's check(), the checks the board runs). The
doser's hard limits live only on the board (written over USB): a config within the schema but beyond
them is refused by the board, which the caller sees as "failed" with the board's field and fix.

Promise: with a command id, the id and the queued request are committed in one transaction, so a
repeated id finds the first one's row (and never queues twice), and a restarted gateway still knows
which cloud command each queued request answers.
"""

import json
import re
from typing import NamedTuple

from protocol import config as protocol_config
from protocol import messages as M
from protocol.errors import ConfigError
from protocol.roles import catalog as roles

BOARD_COMMANDS = ("ping", "reboot")       # every board answers these (firmware/uplink.py)
COMMAND_ID = re.compile(r"[\x21-\x7e]{1,64}\Z")   # printable ASCII, no spaces: safe in a log line and a key


class Outcome(NamedTuple):
    """What became of a request: state accepted (queued as downlink_id) or refused (nothing queued,
    field and limit say what broke), or, for a repeated id, the state the first one has reached."""
    state: str
    detail: str = ""
    field: str | None = None
    limit: object = None
    fix: str | None = None
    downlink_id: int | None = None
    repeated: bool = False

    @classmethod
    def of(cls, row):
        """The Outcome a stored commands row (Store.command) stands for."""
        return cls(row["state"], row["detail"] or "", row["field"], row["limit"], row["fix"], row["downlink_id"],
                   repeated=True)

    def result(self, command_id):
        """The .../command/result payload: {"id", "state", "detail"} and field, limit, fix when set."""
        out = {"id": command_id, "state": self.state, "detail": self.detail}
        for key in ("field", "limit", "fix"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _refused(field, detail, fix=None, limit=None):
    return Outcome("refused", detail, field, limit, fix)


def _limit(role, where):
    """The schema's range for a config field "section.key" as [low, high], or the allowed choices; None
    for a field without one (a role's check() across fields names its limit in the detail)."""
    section, _, key = where.partition(".")
    schema = protocol_config.RUNTIME_SCHEMA.get(section)
    if schema is None and section == role:
        schema = roles.attr(role, "SCHEMA", None)
    for row in schema or ():
        if row[0] == key:
            return list(row[3]) if row[1] == "choice" else (None if row[3] is None else [row[3], row[4]])
    return None


def check_config(role, device_id, body):
    """(the config as the board gets it, None) or (None, a refused Outcome): the board's own checks."""
    if not isinstance(body, dict):
        return None, _refused("args", "the config is not an object",
                              'give the board config as on its /config.json: {"device_id": ..., "ROLE": {...}}')
    if body.get("device_id", device_id) != device_id:
        return None, _refused("args.device_id", f"{body['device_id']!r} is not this device ({device_id})",
                              f"set device_id {device_id} or leave it out")
    if body.get("role", role) != role:
        return None, _refused("args.role", f"{body['role']!r} is not the device's role ({role})",
                              f"set role {role} or leave it out")
    config = dict(body, device_id=device_id, role=role)     # as /config.json holds it (tools/role_config.py)
    try:
        protocol_config.check(config, role)
    except ConfigError as e:
        return None, _refused(e.where, e.problem, e.fix, _limit(role, e.where))
    return config, None


def submit(store, registry, device_id, name, args=None, command_id=None, now=None, replay=None):
    """Check a request for a board and queue it: an Outcome. name: ping, reboot, a command of the
    device's role, "config" (args: the board config as the CLI's --file, device_id optional), or
    "replay" (args {"from": s, "to": s}: the gateway republishes the device's stored entries of that
    wall-time range; replay(device_id, from_s, to_s, command_id) serves it, None where there is no broker).
    command_id: the cloud's id; a repeated one returns the first one's current state, repeated=True,
    and queues nothing. A refusal with an id is recorded too, so its repeat is refused the same way."""
    if command_id is not None:
        if not isinstance(command_id, str) or not COMMAND_ID.match(command_id):
            return _refused("id", f"{command_id!r} is not 1-64 printable characters without spaces",
                            "give each command its own id, e.g. a UUID")
        known = store.command(device_id, command_id)
        if known is not None:
            return Outcome(known["state"], known["detail"] or "", known["field"], known["limit"], known["fix"],
                           known["downlink_id"], repeated=True)
    outcome, msg_type, body = _check(registry, device_id, name, args, replay is not None)
    if outcome is None and name == "replay":
        if command_id is not None:
            store.record_command(device_id, command_id, name, "accepted", now, detail="replay asked")
        replay(device_id, body["from"], body["to"], command_id)
        return Outcome("accepted", f"replay of {body['from']}..{body['to']} asked")
    if outcome is not None:
        if command_id is not None:
            store.record_command(device_id, command_id, str(name), outcome.state, now, outcome.detail,
                                 outcome.field, outcome.limit, outcome.fix)
        return outcome
    qid = store.queue_downlink(device_id, msg_type, json.dumps(body), now=now,
                               command=None if command_id is None else (command_id, name))
    return Outcome("accepted", f"queued as request {qid}; sent when the board is heard", downlink_id=qid)


def _check(registry, device_id, name, args, can_replay=False):
    """(refused Outcome, None, None) or (None, msg_type, body to queue; for a replay, its range)."""
    device = registry.get(device_id)
    if device is None or device.state == "retired":
        return _refused("device", f"{device_id:08x} is " + ("retired" if device else "not served by this gateway"),
                        "send it to the gateway that serves the device"), None, None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return _refused("args", "args is not an object", 'give args as {"key": value, ...} or leave it out'), None, None
    if name == "replay":
        return _check_replay(args, can_replay)
    if name == "config":
        config, refused = check_config(device.role, device_id, args)
        return refused, M.CONFIG_PUSH, config
    allowed = BOARD_COMMANDS + tuple(roles.attr(device.role, "COMMANDS", None) or ())
    if name not in allowed:
        every = list(allowed + ("config", "replay"))
        return _refused("name", f"{name!r} is not a command of a {device.role} board",
                        "use one of " + ", ".join(every), every), None, None
    return None, M.COMMAND, {"name": name, "args": args}


def _check_replay(args, can_replay):
    if not can_replay:
        return _refused("name", "a replay is served by the forwarder", "ask over MQTT: prapa/v1/<site>/<device>/"
                        "command, or replay/request"), None, None
    bounds = [args.get(k) for k in ("from", "to")]
    for key, b in zip(("from", "to"), bounds):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b != b or abs(b) == float("inf"):
            return _refused(f"args.{key}", f"{b!r} is not Unix seconds",
                            'give {"from": 1764460800, "to": 1764547200}'), None, None
    if bounds[0] > bounds[1]:
        return _refused("args.to", f"{bounds[1]} is before from {bounds[0]}", "give to at or after from",
                        bounds[0]), None, None
    return None, None, {"from": bounds[0], "to": bounds[1]}
