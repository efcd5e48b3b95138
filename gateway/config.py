"""The gateway's one TOML config, validated at start into immutable objects.

The service refuses to start rather than guess: every error is a
`ConfigError` (a `UsageError`, so the CLI prints it as one line and exits 2)
naming the file, the key path (`links[1].baudrate`, arrays counted from 0),
the bad value and the fix. Unknown keys are errors too, because a misspelt
key that is silently ignored leaves a default in force that the installer
believes they changed.

Relative paths (data_dir, TLS and password files) are taken from the config
file's folder, so a config and its files can travel together. Secrets never
sit in the config: a broker password lives in its own file (password_file),
and no error message ever echoes a secret.
"""

import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from protocol.errors import UsageError

SITE_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,23}$")     # what every MQTT 3.1.1 broker must accept
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*$")
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
LOG_LEVELS = ("debug", "info", "warning", "error")
MQTT_MAX_PAYLOAD = 268_435_455                               # MQTT's own ceiling (remaining length)
_HIDDEN = object()                                           # a value not to echo: a secret, or an absent key


class ConfigError(UsageError):
    """A config the service will not start with; the text says what to change."""


class GatewaySection(NamedTuple):
    site: str                    # topic-safe: prapa/v1/<site>/<device>/<kind>
    data_dir: Path               # holds store.db and registry.db; created by the service if missing
    log_level: str               # "DEBUG", "INFO", "WARNING" or "ERROR" (ready for logging.setLevel)


class SerialLink(NamedTuple):
    port: str
    baudrate: int
    rs485: bool
    type: str = "serial"


class UdpLink(NamedTuple):
    host: str
    port: int
    type: str = "udp"


class StoreSection(NamedTuple):
    retention_days: int          # forwarded readings are kept this long for replay
    min_free_mb: int             # below this much free disk the gateway stops acknowledging
    group_commit_ms: int         # frames arriving within this window share one transaction


class Broker(NamedTuple):
    url: str
    tls: bool                    # True for mqtts://
    host: str
    port: int
    ca_file: Path | None         # None with TLS: the system's trusted CAs
    cert_file: Path | None       # client certificate; set with key_file or not at all
    key_file: Path | None
    username: str | None
    password_file: Path | None
    client_id: str

    def password(self):
        """Read the password when connecting, so it never sits in the config object or its repr."""
        if self.password_file is None:
            return None
        return self.password_file.read_text().rstrip("\r\n")


class ForwardSection(NamedTuple):
    format: str                  # "cbor" or "json"
    max_payload_bytes: int
    qos: int                     # always 1: a reading is forwarded once the broker PUBACKs it
    protocol: str                # "auto", "5" or "3.1.1"
    failback_s: int = 60         # on a broker other than the first: probe the first this often, go back when
                                 # it answers; 0: stay where it is


class TimeSection(NamedTuple):
    utc_offset_minutes: int      # local time of the site for display; stored times are UTC
    sync_interval_s: int         # how often boards are given wall time (in the wall clock's seconds)
    simulate_speed: int = 1      # a simulated site only: the wall clock runs this many times faster
    simulate_from: float = None  # a simulated site only: what its wall clock read (UTC s; None: now) ...
    simulate_since: float = None  # ... at this real instant (UTC s; None: the gateway's start), so a restart
                                  # goes on with the site's calendar


class HttpSection(NamedTuple):
    host: str
    port: int                    # /metrics, / (status page) and /api/status.json


class Config(NamedTuple):
    path: Path
    gateway: GatewaySection
    links: tuple                 # of SerialLink | UdpLink, at least one
    store: StoreSection
    brokers: tuple               # of Broker, at least one, in failover order
    forward: ForwardSection
    time: TimeSection
    http: HttpSection

    @property
    def store_path(self):
        return self.gateway.data_dir / "store.db"

    @property
    def registry_path(self):
        return self.gateway.data_dir / "registry.db"


def load(path):
    """Read and validate one config file; raise ConfigError naming the key and the fix."""
    path = Path(path)
    text = read_text(path, str(path), "pass the path of the gateway's TOML config (an example is "
                     "gateway/gateway.example.toml), readable by the service user", error=ConfigError)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise ConfigError(str(path), f"not valid TOML ({e})", "fix the syntax at that line") from None
    return _Checker(path).config(data)


# -- the one way a file comes in: text or UsageError --------------------------------------------------
# The gateway's TOML, the registry's export files and the tools' JSON (device configs, limits, pushes)
# all come in here, so a file that is missing, a folder, unreadable, not UTF-8, not JSON, or JSON with
# NaN, Infinity or a number past a float's range is refused the same way: one line, exit 2.

def read_text(path, where, fix, error=UsageError):
    """The text of a regular file, as UTF-8; error(where, problem, fix) for anything else."""
    problem = None
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                problem = "not a regular file"
            else:
                return f.read().decode("utf-8")
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "is a folder, not a file"
    except NotADirectoryError:
        problem = "no such file (a part of the path is a file, not a folder)"
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    raise error(where, problem, fix)


def _not_a_number(constant):
    raise ValueError(f"{constant} is not a number (JSON has no NaN or Infinity)")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past the range of a number")
    return value


def parse_json(text):
    """JSON as a board reads it: no NaN or Infinity, no number past a float (they slip past every range
    check); ValueError for anything that is not such JSON."""
    try:
        return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path, where, fix):
    """A JSON file's value (read_text, then parse_json); UsageError naming where for either."""
    text = read_text(path, where, fix)
    try:
        return parse_json(text)
    except ValueError as e:
        raise UsageError(where, f"{path} is not JSON ({e})", fix) from None


def _shown(value):
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


class _Checker:
    def __init__(self, path):
        self.path = path
        self.base = path.resolve().parent

    def fail(self, key, value, problem, fix):
        shown = "" if value is _HIDDEN else f" = {_shown(value)}"
        raise ConfigError(f"{self.path}: {key}{shown}", problem, fix)

    def keys(self, table, prefix, allowed):
        for k in table:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                fix = f"did you mean '{close[0]}'?" if close else "allowed here: " + ", ".join(allowed)
                self.fail(where, _HIDDEN, "unknown key", f"remove it or rename it; {fix}")

    def sub(self, data, key, required=False):
        if key not in data:
            if required:
                self.fail(key, _HIDDEN, "missing", f"add a [{key}] section (see gateway/gateway.example.toml)")
            return {}
        if not isinstance(data[key], dict):
            self.fail(key, data[key], "must be a table", f"write it as a [{key}] section")
        return data[key]

    def array(self, data, key):
        value = data.get(key)
        if value is None:
            self.fail(key, _HIDDEN, "missing", f"add at least one [[{key}]] table (see gateway/gateway.example.toml)")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(key, value, "must be an array of tables", f"write each one as a [[{key}]] table")
        if not value:
            self.fail(key, value, "is empty", f"add at least one [[{key}]] table")
        return value

    def integer(self, table, prefix, key, default, lo, hi, unit=""):
        where = f"{prefix}.{key}"
        value = table.get(key, default)
        if value is None:
            self.fail(where, _HIDDEN, "missing", f"set {key} to a whole number from {lo} to {hi}{unit}")
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, value, "must be a whole number", f"write a number from {lo} to {hi}{unit} without quotes")
        if not lo <= value <= hi:
            self.fail(where, value, "out of range", f"use a number from {lo} to {hi}{unit}")
        return value

    def string(self, table, prefix, key, default=None, required=False):
        where = f"{prefix}.{key}"
        value = table.get(key, default)
        if value is None:
            if required:
                self.fail(where, _HIDDEN, "missing", f"set {key} (see gateway/gateway.example.toml)")
            return None
        if not isinstance(value, str) or not value:
            self.fail(where, value, "must be a non-empty string", f"write {key} as a quoted string")
        if "\x00" in value:                      # no path, host or name holds one (and stat() raises on it)
            self.fail(where, value, "holds a NUL character", f"write {key} without \\u0000")
        return value

    def choice(self, table, prefix, key, default, choices):
        value = table.get(key, default)
        if value is None:
            self.fail(f"{prefix}.{key}", _HIDDEN, "missing", "set it to one of " + ", ".join(repr(c) for c in choices))
        if value not in choices:
            self.fail(f"{prefix}.{key}", value, "not allowed", "use one of " + ", ".join(repr(c) for c in choices))
        return value

    def file(self, table, prefix, key, secret=False):
        """A path that must exist now: the service would otherwise fail later, at connect time."""
        value = self.string(table, prefix, key)
        if value is None:
            return None
        where, path = f"{prefix}.{key}", self.base / value
        try:
            st = path.stat()
        except OSError:
            self.fail(where, value, f"no such file ({path})", "give the path of an existing file, "
                      "absolute or relative to the config's folder")
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK):
            self.fail(where, value, "not a readable file", "point it at a regular file the service user can read")
        if secret and st.st_mode & stat.S_IROTH:
            self.fail(where, value, f"is readable by every user (mode {stat.S_IMODE(st.st_mode):04o})",
                      f"run: chmod 600 {path} (and chown it to the service user)")
        return path

    # sections

    def config(self, data):
        self.keys(data, "", ("gateway", "links", "store", "brokers", "forward", "time", "http"))
        gateway = self.gateway(self.sub(data, "gateway", required=True))
        links = tuple(self.link(t, f"links[{i}]") for i, t in enumerate(self.array(data, "links")))
        self.no_duplicates(links, "links", lambda l: (l.type, l.port if l.type == "serial" else (l.host, l.port)),
                           "each port or address can be opened by one link only")
        store = self.store(self.sub(data, "store"))
        brokers = tuple(self.broker(t, f"brokers[{i}]", gateway.site)
                        for i, t in enumerate(self.array(data, "brokers")))
        self.no_duplicates(brokers, "brokers", lambda b: (b.host, b.port), "list each broker once")
        return Config(self.path, gateway, links, store, brokers, self.forward(self.sub(data, "forward")),
                      self.time(self.sub(data, "time")), self.http(self.sub(data, "http")))

    def no_duplicates(self, items, name, ident, fix):
        seen = {}
        for i, item in enumerate(items):
            if ident(item) in seen:
                self.fail(f"{name}[{i}]", _HIDDEN, f"repeats {name}[{seen[ident(item)]}]", fix)
            seen[ident(item)] = i

    def gateway(self, t):
        self.keys(t, "gateway", ("site", "data_dir", "log_level"))
        site = self.string(t, "gateway", "site", required=True)
        if not SITE_RE.match(site):
            self.fail("gateway.site", site, "not topic-safe",
                      "use 1 to 32 of a-z, 0-9, '_' and '-' (it goes in MQTT topics)")
        data_dir = self.base / self.string(t, "gateway", "data_dir", required=True)
        for folder in (data_dir, *data_dir.parents):        # the first that exists must be a folder
            try:
                is_dir = stat.S_ISDIR(folder.stat().st_mode)
            except (FileNotFoundError, NotADirectoryError):     # not there, or a file above it: look higher
                continue
            except OSError as e:                                # no access
                self.fail("gateway.data_dir", t["data_dir"], f"cannot be reached ({e.strerror})",
                          "point it at a folder the service user can reach")
            if not is_dir:
                self.fail("gateway.data_dir", t["data_dir"], "exists and is not a folder" if folder == data_dir
                          else f"{folder} is a file, not a folder", "point it at a folder")
            break
        level = self.string(t, "gateway", "log_level", "info")
        if level.lower() not in LOG_LEVELS:
            self.fail("gateway.log_level", level, "not a log level", "use one of " + ", ".join(LOG_LEVELS))
        return GatewaySection(site, data_dir, level.upper())

    def link(self, t, prefix):
        kind = self.choice(t, prefix, "type", None, ("serial", "udp"))
        if kind == "serial":
            self.keys(t, prefix, ("type", "port", "baudrate", "rs485"))
            rs485 = t.get("rs485", False)
            if not isinstance(rs485, bool):
                self.fail(f"{prefix}.rs485", rs485, "must be true or false", "write rs485 = true or rs485 = false")
            baudrate = self.integer(t, prefix, "baudrate", 115200, 1200, 921600)
            if baudrate not in BAUDRATES:
                self.fail(f"{prefix}.baudrate", baudrate, "not a standard rate",
                          "use the board's rate, one of " + ", ".join(map(str, BAUDRATES)))
            return SerialLink(self.string(t, prefix, "port", required=True), baudrate, rs485)
        self.keys(t, prefix, ("type", "bind"))
        host, port = self.address(t, prefix, "bind", None, "0.0.0.0:5683")
        return UdpLink(host, port)

    def address(self, t, prefix, key, default, example):
        value = self.string(t, prefix, key, default, required=True)
        where = f"{prefix}.{key}"
        host, sep, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            self.fail(where, value, "not host:port",
                      f"write it like \"{example}\" (port 1 to 65535; IPv6 as [::1]:port)")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not HOST_RE.match(host):
                self.fail(where, value, "the host is not an IP address or host name", f"write it like \"{example}\"")
        return host, int(port)

    def store(self, t):
        self.keys(t, "store", ("retention_days", "min_free_mb", "group_commit_ms"))
        return StoreSection(self.integer(t, "store", "retention_days", 30, 1, 3650, " days"),
                            self.integer(t, "store", "min_free_mb", 200, 10, 1_000_000, " MB"),
                            self.integer(t, "store", "group_commit_ms", 20, 0, 1000, " ms"))

    def broker(self, t, prefix, site):
        if "password" in t:
            self.fail(f"{prefix}.password", _HIDDEN, "a password is never written in the config",
                      "put it alone in a file only the service user can read (chmod 600) and set password_file")
        self.keys(t, prefix, ("url", "ca_file", "cert_file", "key_file", "username", "password_file", "client_id"))
        url = self.string(t, prefix, "url", required=True)
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            port = None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port is None \
                or parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            self.fail(f"{prefix}.url", _HIDDEN if parts.password else url, "not an MQTT broker address",
                      "write mqtts://host:8883 (TLS) or mqtt://host:1883; credentials go in username/password_file")
        ca, cert, key = (self.file(t, prefix, k, secret=(k == "key_file"))
                         for k in ("ca_file", "cert_file", "key_file"))
        if not tls and (ca or cert or key):
            self.fail(f"{prefix}.url", url, "TLS files are set but the url is not mqtts://",
                      "use mqtts://host:8883, or remove ca_file/cert_file/key_file")
        if (cert is None) != (key is None):
            missing = "key_file" if key is None else "cert_file"
            self.fail(f"{prefix}.{missing}", _HIDDEN, "missing: a client certificate needs both cert_file and key_file",
                      f"set {missing} too, or remove the other")
        username = self.string(t, prefix, "username")
        password_file = self.file(t, prefix, "password_file", secret=True)
        if password_file and not username:
            self.fail(f"{prefix}.username", _HIDDEN, "missing: MQTT sends a password only with a user name",
                      "set username, or remove password_file")
        client_id = self.string(t, prefix, "client_id", ("prapa-" + site)[:23])
        if not CLIENT_ID_RE.match(client_id):
            self.fail(f"{prefix}.client_id", client_id, "not accepted by every broker",
                      "use 1 to 23 of A-Z, a-z, 0-9, '_' and '-', unique to this gateway")
        return Broker(url, tls, parts.hostname, port, ca, cert, key, username, password_file, client_id)

    def forward(self, t):
        self.keys(t, "forward", ("format", "max_payload_bytes", "qos", "protocol", "failback_s"))
        if t.get("qos", 1) != 1 or isinstance(t.get("qos"), bool):
            self.fail("forward.qos", t["qos"], "is fixed at 1 (a reading is kept until the broker's PUBACK)",
                      "remove qos or set qos = 1")
        return ForwardSection(self.choice(t, "forward", "format", "cbor", ("cbor", "json")),
                              self.integer(t, "forward", "max_payload_bytes", 131072, 1024, MQTT_MAX_PAYLOAD, " bytes"),
                              1, self.choice(t, "forward", "protocol", "auto", ("auto", "5", "3.1.1")),
                              self.integer(t, "forward", "failback_s", 60, 0, 86400,
                                           " s (how often the first broker is tried again; 0: never)"))

    def time(self, t):
        self.keys(t, "time", ("utc_offset_minutes", "sync_interval_s", "simulate_speed", "simulate_from",
                              "simulate_since"))
        start, since = t.get("simulate_from"), t.get("simulate_since")
        for key, value in (("simulate_from", start), ("simulate_since", since)):
            if value is not None and not (isinstance(value, datetime.datetime) and value.tzinfo is not None):
                self.fail(f"time.{key}", value, "must be a date and time with its UTC offset",
                          f"write it without quotes, e.g. {key} = 2027-01-31T16:30:00Z, or remove it")
        return TimeSection(self.integer(t, "time", "utc_offset_minutes", 420, -720, 840, " minutes (Thailand: 420)"),
                           self.integer(t, "time", "sync_interval_s", 3600, 10, 86400, " s"),
                           self.integer(t, "time", "simulate_speed", 1, 1, 1_000_000, "x (1 in the field)"),
                           None if start is None else start.timestamp(),
                           None if since is None else since.timestamp())

    def http(self, t):
        self.keys(t, "http", ("listen",))
        return HttpSection(*self.address(t, "http", "listen", "127.0.0.1:9466", "127.0.0.1:9466"))
