# A board's config, checked the same way on the board (at boot, and for a
# config push) and on the host (`prapa commission`, `prapa site`): the runtime's
# schema tables here, the role's in its spec (protocol/roles/<role>.py SCHEMA,
# check()). Pure: no files; firmware/config.py reads /config.json and the key.
#
# A schema is a tuple of rows (key, kind, default, low, high, hint):
# kind "int" or "num" (a JSON number, kept as given), "str" (up to 64
# characters), or "choice" (low is the tuple of allowed values); default None
# means required. Ranges are checked, unknown keys are refused. Every refusal
# is a ConfigError naming the field and the fix.
from protocol import roles
from protocol.errors import ConfigError

RUNTIME_SCHEMA = {
    "link": (
        ("kind", "choice", "uart", ("uart", "udp"), None, "uart (RS-485 or a wire to the gateway) or udp (Wi-Fi)"),
        ("gateway", "str", "", None, None, "the gateway's UDP link as host:port (with kind udp)"),
        ("addr", "int", 1, 1, 254, "the board's RS-485 address, 1-254"),
        ("sample_ms", "int", 100, 10, 1000, "sampling period in ms, 10-1000"),
        ("health_s", "int", 900, 10, 86400, "seconds between health reports, 10-86400"),
    ),
    "time": (
        ("utc_offset_min", "int", 420, -720, 840, "local time offset from UTC in minutes (Thailand: 420)"),
    ),
    "log": (
        ("max_entries", "int", 0, 0, 1000000, "flash-log entries before coarsening (0: sized from the board)"),
    ),
}
DEVICE_ID_MAX = 0xFFFFFFFE


def check_section(name, given, schema):
    """Return the section with defaults filled in; raise ConfigError on the first bad key."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(name, "must be an object", "write %s as {\"key\": value, ...}" % name)
    known = [row[0] for row in schema]
    for k in given:
        if k not in known:
            raise ConfigError("%s.%s" % (name, k), "unknown key", "use one of " + ", ".join(known))
    out = {}
    for key, kind, default, low, high, hint in schema:
        field = "%s.%s" % (name, key)
        if key not in given:
            if default is None:
                raise ConfigError(field, "missing", "set " + hint)
            out[key] = default
            continue
        v = given[key]
        if kind == "choice" or kind == "str":
            if kind == "choice" and v not in low:
                raise ConfigError(field, "%r is not allowed" % (v,), "use one of " + ", ".join(low))
            if not isinstance(v, str) or len(v) > 64:
                raise ConfigError(field, "%r is not a short text" % (v,), "set " + hint)
            out[key] = v
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind == "int" and not isinstance(v, int)):
            raise ConfigError(field, "%r is not %s" % (v, "an integer" if kind == "int" else "a number"),
                              "set " + hint)
        if v < low or v > high:
            raise ConfigError(field, "%r is out of range %r..%r" % (v, low, high), "set " + hint)
        out[key] = v
    return out


def check_device_id(dev):
    if dev is None:
        raise ConfigError("device_id", "missing: the board is not commissioned",
                          "commission it: prapa commission --port ... --device-id N")
    if isinstance(dev, bool) or not isinstance(dev, int) or not 1 <= dev <= DEVICE_ID_MAX:
        raise ConfigError("device_id", "%r is not a device id" % (dev,), "set an integer 1..4294967294")


def check_link(link):
    """A UDP link needs the gateway's host:port; adds host and port to the section."""
    if link["kind"] == "udp":
        host, _, port = link["gateway"].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("link.gateway", "%r is not host:port" % link["gateway"],
                              "set the gateway's UDP link, e.g. \"192.168.4.1:5683\"")
        link["host"], link["port"] = host, int(port)


def check(raw, board_role):
    """The whole config with defaults filled in, for a board built for board_role; ConfigError else."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json", "is not a JSON object", "rewrite it with prapa commission")
    check_device_id(raw.get("device_id"))
    role = raw.get("role")
    if role != board_role:
        raise ConfigError("role", "%r but the image was built for %r" % (role, board_role),
                          "build and flash the image for role %s" % role)
    try:
        spec = roles.spec(role)
    except ImportError:
        raise ConfigError("role", "%r has no spec in this firmware" % (role,),
                          "build and flash an image of a role that exists (prapa build --role)")
    allowed = ("device_id", "role", role) + tuple(RUNTIME_SCHEMA)
    for k in raw:
        if k not in allowed:
            raise ConfigError(k, "unknown key", "use one of " + ", ".join(allowed))
    cfg = {"device_id": raw["device_id"], "role": role}
    for name, schema in RUNTIME_SCHEMA.items():
        cfg[name] = check_section(name, raw.get(name), schema)
    cfg[role] = check_section(role, raw.get(role), spec.SCHEMA)
    spec.check(cfg[role])
    check_link(cfg["link"])
    return cfg
