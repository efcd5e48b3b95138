# The board's config: /config.json (written at commissioning or by a config
# push) plus /device.key (16 raw bytes, never printed). Validated at boot
# against the runtime's schema and the role's; an invalid config leaves the
# board in its safe idle state with a reason that names the field and the fix.
# The checks themselves are protocol/config.py's (the runtime's schema) and the
# role spec's (protocol/roles/<role>.py), the same code the host runs.
import json

from protocol.errors import ConfigError

CONFIG_PATH = "config.json"
KEY_PATH = "device.key"
WIFI_PATH = "wifi.json"      # {"ssid": ..., "password": ...}: a secret, so not in config.json


def identity():
    """(device_id, key) when the board has been commissioned, even if its config is bad; else None.

    A board with a bad config can still tell the gateway why, over an authenticated link."""
    try:
        with open(CONFIG_PATH) as f:
            dev = json.load(f).get("device_id")
        with open(KEY_PATH, "rb") as f:
            key = f.read()
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(dev, int) and not isinstance(dev, bool) and 1 <= dev <= 0xFFFFFFFE and len(key) == 16:
        return dev, key
    return None


def load(board, path=CONFIG_PATH):
    """Return (config, key): the file checked by protocol.config against the runtime's and the role's
    schema tables."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError:
        raise ConfigError(CONFIG_PATH, "not on the board", "commission it: prapa commission --port ...")
    except ValueError:
        raise ConfigError(CONFIG_PATH, "is not valid JSON", "rewrite it with prapa commission")
    cfg = _check(raw, board["role"])
    try:
        with open(KEY_PATH, "rb") as f:
            key = f.read()
    except OSError:
        key = b""
    if len(key) != 16:
        raise ConfigError(KEY_PATH, "missing or not 16 bytes", "commission the board to provision its key")
    return cfg, key


def _check(raw, role):
    """protocol.config.check, imported for the call and dropped after it: its tables are needed at
    boot and for a config push only, and the heap they would hold belongs to the running board."""
    import sys
    import protocol
    try:
        from protocol.config import check
        return check(raw, role)
    finally:
        sys.modules.pop("protocol.config", None)
        if hasattr(protocol, "config"):
            delattr(protocol, "config")


def config_hash(raw_bytes):
    import hashlib
    return hashlib.sha256(raw_bytes).digest()[:8]


def wifi():
    """(ssid, password) for a board on Wi-Fi, or None."""
    try:
        with open(WIFI_PATH) as f:
            w = json.load(f)
        return w["ssid"], w["password"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
