"""A board's role config checked on the host with the board's own checks (protocol/config.py and the
role's spec), so a board never boots into an idle state the host could have foreseen; a new role
plugs in with its spec (SCHEMA, check(); for hard limits LIMITS_PATH, LIMITS_SCHEMA, check_limits_file(),
check_limits()) and nothing here changes."""

from protocol import config as protocol_config
from protocol.roles import catalog as roles
from protocol.errors import ConfigError, UsageError
from gateway.config import parse_json, read_json   # the one JSON every loader reads: no NaN, no Infinity


def parse_device_id(text):
    try:
        value = int(str(text), 0)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= 0xFFFFFFFE:
        raise UsageError("--device-id", f"{text!r} is not a device id",
                         "give a whole number 1..4294967294 (decimal or 0x...), unique on the gateway")
    return value


def build_config(role, device_id, config_file=None, sets=(), flag="--config"):
    """The board's /config.json as a dict with every default filled in; UsageError names the field
    (flag: the option that named config_file)."""
    known = roles.available()
    if role not in known:
        raise UsageError("--role", f"{role!r} has no role spec", "use one of " + ", ".join(known))
    raw, origin = {}, "--set"
    if config_file is not None:
        origin = f"{flag} {config_file}"
        raw = read_json(config_file, flag, "give a JSON config file, written as on the board's /config.json")
        if not isinstance(raw, dict):
            raise UsageError(flag, f"{config_file} is not a JSON object", 'write {"ROLE": {...}, "link": {...}}')
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
            value = parse_json(value)
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


def build_limits(role, cfg, limits_file=None, sets=(), config_sets=()):
    """The role's hard limits (a spec with LIMITS_PATH) from --limits FILE and --limit KEY=VALUE (applied
    over the file), checked with the spec's own check_limits_file, and the config section against them
    (check_limits); None for a role without hard limits. UsageError names the flag and the field."""
    spec = roles.spec(role)
    path = getattr(spec, "LIMITS_PATH", None)
    given = limits_file is not None or bool(sets)
    if path is None:
        if given:
            raise UsageError("--limits" if limits_file is not None else "--limit", f"role {role} has no hard limits",
                             "leave --limits and --limit out")
        return None
    keys = [row[0] for row in spec.LIMITS_SCHEMA]
    if not given:
        raise UsageError("--limits", f"missing: role {role} needs its hard limits ({path}, written over USB only)",
                         f"give --limits FILE.json with {', '.join(keys)} (or --limit KEY=VALUE for each)")
    raw, origin = {}, {}
    if limits_file is not None:
        raw = read_json(limits_file, "--limits", 'give a JSON limits file: {"' + '": ..., "'.join(keys) + '": ...}')
        if not isinstance(raw, dict):
            raise UsageError("--limits", f"{limits_file} is not a JSON object",
                             'write {"' + '": ..., "'.join(keys) + '": ...}')
        origin = {k: f"--limits {limits_file}: {k}" for k in raw}
    for item in sets:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError("--limit", f"{item!r} is not KEY=VALUE", f"e.g. --limit {keys[0]}=VALUE; keys: "
                             + ", ".join(keys))
        try:
            value = parse_json(value)
        except ValueError:
            pass                                  # the schema says what a text value should have been
        raw[key] = value
        origin[key] = f"--limit {key}"
    try:
        limits = spec.check_limits_file(raw)
    except ConfigError as e:
        key = e.where.rpartition(".")[2]
        where = origin.get(key) or (f"--limits {limits_file}: {key}" if limits_file else f"--limit {key}")
        raise UsageError(where, e.problem, e.fix + (f" (in {limits_file or '--limits FILE.json'} or with --limit "
                                                   f"{key}=VALUE)" if e.problem == "missing" else "")) from None
    check_within_limits(role, cfg[role], limits, config_sets)
    return limits


def check_within_limits(role, section, limits, config_sets=()):
    """The role's config section within its hard limits (the spec's check_limits); UsageError names the
    field (as --set gave it, if it did) and the limit."""
    try:
        roles.spec(role).check_limits(section, limits)
    except ConfigError as e:
        by_set = any(item.partition("=")[0].strip() == e.where for item in config_sets)
        raise UsageError(f"--set {e.where}" if by_set else e.where, e.problem, e.fix) from None
