"""A board's role config checked on the host with the board's own checks (protocol/config.py and the
role's spec), so a board never boots into an idle state the host could have foreseen; a new role
plugs in with its spec (SCHEMA, check()) and nothing here changes."""

import json
from pathlib import Path

from protocol import config as protocol_config
from protocol.roles import catalog as roles
from protocol.errors import ConfigError, UsageError


def parse_device_id(text):
    try:
        value = int(str(text), 0)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= 0xFFFFFFFE:
        raise UsageError("--device-id", f"{text!r} is not a device id",
                         "give a whole number 1..4294967294 (decimal or 0x...), unique on the gateway")
    return value


def build_config(role, device_id, config_file=None, sets=()):
    """The board's /config.json as a dict with every default filled in; UsageError names the field."""
    known = roles.available()
    if role not in known:
        raise UsageError("--role", f"{role!r} has no role spec", "use one of " + ", ".join(known))
    raw, origin = {}, "--set"
    if config_file is not None:
        origin = f"--config {config_file}"
        try:
            raw = json.loads(Path(config_file).read_text())
        except OSError as e:
            raise UsageError("--config", f"{config_file}: {e.strerror}", "give the path of a JSON config file")
        except ValueError as e:
            raise UsageError("--config", f"{config_file} is not JSON ({e})", "write it as on the board's /config.json")
        if not isinstance(raw, dict):
            raise UsageError("--config", f"{config_file} is not a JSON object", 'write {"ROLE": {...}, "link": {...}}')
        for key, want in (("device_id", device_id), ("role", role)):
            if key in raw and raw[key] != want:
                raise UsageError(f"{origin}: {key}", f"{raw[key]!r} differs from --{key.replace('_', '-')} {want}",
                                 f"leave {key} out of the file or make them agree")
    for item in sets:
        name, eq, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not eq or not dot or not section or not key:
            raise UsageError("--set", f"{item!r} is not SECTION.KEY=VALUE", f"e.g. --set {role}.KEY=VALUE or --set link.addr=3")
        try:
            value = json.loads(value)
        except ValueError:
            pass                                  # the schema says what a text value should have been
        if section in ("device_id", "role") or not isinstance(raw.setdefault(section, {}), dict):
            raise UsageError(f"--set {name}", f"{section} is not a config section",
                             "sections: " + ", ".join([role, *protocol_config.RUNTIME_SCHEMA]))
        raw[section][key] = value
        origin = "--set"
    raw = dict(raw, device_id=device_id, role=role)
    try:
        cfg = protocol_config.check(raw, role)
    except ConfigError as e:
        raise UsageError(f"{origin} {e.where}" if origin == "--set" else f"{origin}: {e.where}", e.problem,
                         e.fix) from None
    for derived in ("host", "port"):            # check_link's additions are not part of the file
        cfg["link"].pop(derived, None)
    return cfg
