"""A board's role config checked on the host with the firmware's own schema tables.

`prapa commission` (and anything else that writes a /config.json) builds the
config here, so a board never boots into an idle state the host could have
foreseen; a new role plugs in with its firmware module (SCHEMA, check()) and
nothing here changes.
"""

import json
import sys
from pathlib import Path

from protocol.errors import UsageError

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"


def firmware_roles():
    return sorted(p.stem for p in (FIRMWARE_DIR / "roles").glob("*.py") if p.stem != "__init__")


def firmware_modules(role):
    """(config module, role module) of firmware/, importable here because they are plain Python.

    The role module says `from micropython import const`; CPython has no such
    module (the venv's `micropython` is the VM launcher), so a stand-in is
    lent for the import only."""
    import types
    if str(FIRMWARE_DIR) not in sys.path:
        sys.path.insert(0, str(FIRMWARE_DIR))
    lent = sys.modules.get("micropython")
    sys.modules["micropython"] = types.SimpleNamespace(const=lambda x: x)
    try:
        import importlib
        config = importlib.import_module("config")
        module = importlib.import_module("roles." + role)
    finally:
        if lent is None:
            del sys.modules["micropython"]
        else:
            sys.modules["micropython"] = lent
    if Path(config.__file__).resolve().parent != FIRMWARE_DIR:
        raise RuntimeError(f"`config` resolved to {config.__file__}, not firmware/config.py")
    return config, module


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
    roles = firmware_roles()
    if role not in roles:
        raise UsageError("--role", f"{role!r} has no firmware module", "use one of " + ", ".join(roles))
    fwconfig, module = firmware_modules(role)
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
            raise UsageError("--config", f"{config_file} is not a JSON object", 'write {"meter": {...}, ...}')
        for key, want in (("device_id", device_id), ("role", role)):
            if key in raw and raw[key] != want:
                raise UsageError(f"{origin}: {key}", f"{raw[key]!r} differs from --{key.replace('_', '-')} {want}",
                                 f"leave {key} out of the file or make them agree")
    for item in sets:
        name, eq, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not eq or not dot or not section or not key:
            raise UsageError("--set", f"{item!r} is not SECTION.KEY=VALUE", f"e.g. --set {role}.k_factor_l=10")
        try:
            value = json.loads(value)
        except ValueError:
            pass                                  # the schema says what a text value should have been
        if section in ("device_id", "role") or not isinstance(raw.setdefault(section, {}), dict):
            raise UsageError(f"--set {name}", f"{section} is not a config section",
                             "sections: " + ", ".join([role, *fwconfig.RUNTIME_SCHEMA]))
        raw[section][key] = value
        origin = "--set"
    allowed = ("device_id", "role", role, *fwconfig.RUNTIME_SCHEMA)
    cfg = {"device_id": device_id, "role": role}
    try:
        for k in raw:
            if k not in allowed:
                raise fwconfig.ConfigError(k, "unknown section", "use one of " + ", ".join(allowed[2:]))
        for name, schema in fwconfig.RUNTIME_SCHEMA.items():
            cfg[name] = fwconfig.check_section(name, raw.get(name), schema)
        cfg[role] = fwconfig.check_section(role, raw.get(role), module.SCHEMA)
        module.check(cfg[role])
        fwconfig.check_link(dict(cfg["link"]))
    except fwconfig.ConfigError as e:
        field, _, rest = str(e).partition(": ")
        problem, _, fix = rest.partition("; fix: ")
        raise UsageError(f"{origin} {field}" if origin == "--set" else f"{origin}: {field}", problem, fix) from None
    return cfg
