"""What the forwarder puts on the wire: its config, topics and messages, within managed-broker limits.

Kept apart from the network code so that the limits are checked, and the
config refused, before anything connects. The limits are the tightest of the
managed brokers a town is likely to use (AWS IoT Core: topic at most 256 bytes
and 7 slashes, payload at most 128 KiB); EMQX, HiveMQ and Mosquitto allow more.

A message carries one run of a device's entries of one kind, so that a consumer
can deduplicate by each item's (device, boot, seq) without any other state:

    {"v": 1, "site": "...", "device": "0000002a", "kind": "readings", "items": [{...}, ...]}

Each item is the entry's own CBOR map (it already names device, boot, seq and
kind), plus the gateway's wall time and its source when the store knows them.
Replayed messages add "replay": true.

The gateway's own state rides on retained topics beside the devices' ones: each catchment's
ranked suspect devices (gateway/ranking.py) on prapa/v1/<site>/catchment/<catchment>/suspects,
JSON, QoS 1, retained, so a consumer that subscribes later gets the newest list at once:

    {"v": 1, "site": "...", "catchment": "...", "t": 1750000000.0, "raining": false,
     "rain_mm_h": 0.0, "suspects": [{"rank": 1, "id": "0000002a", "state": "blocked", ...}, ...]}
"""

import dataclasses
import functools
import json
import re
import socket

import cbor2

from protocol.errors import UsageError

TOPIC_MAX_BYTES = 256            # AWS IoT Core
TOPIC_MAX_SLASHES = 7            # AWS IoT Core: 8 levels
PAYLOAD_MAX_BYTES = 128 * 1024   # AWS IoT Core
CLIENT_ID_MAX_BYTES = 128        # AWS IoT Core
KIND_MAX_BYTES = 32
KIND = re.compile(r"[a-z][a-z0-9_-]*\Z")
SITE_FORBIDDEN = re.compile(r"[/+#\x00-\x20\x7f]")
LONGEST_TAIL = max(KIND_MAX_BYTES, len("replay/request"), len("command/result"))
# A catchment (registry: a device's place) is one topic level too: letters, digits, '_', '-', '.',
# starting with a letter or digit (never '.', '..' or a leading '-' a shell would read as a flag).
CATCHMENT_MAX_BYTES = 32
CATCHMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}\Z" % (CATCHMENT_MAX_BYTES - 1))
UNASSIGNED = "_unassigned"        # the devices of no catchment: a name no catchment can have
ITEM_EXTRA_BYTES = 40            # wall_t and time_source added to an item, upper bound for sizing
ENVELOPE_BYTES = 64              # v, site key, device, kind, items header, replay flag


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 8883
    tls: bool = True
    ca_file: str | None = None       # None with tls: the system's CAs (a managed broker's public chain)
    cert_file: str | None = None     # client certificate for mutual TLS
    key_file: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    client_id: str | None = None     # this broker's session id, when not the forwarder's client_id

    @property
    def url(self):
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ForwarderConfig:
    site: str
    brokers: tuple
    client_id: str
    protocol: str = "auto"            # "auto": MQTT 5, 3.1.1 when a broker refuses 5; or "5", "3.1.1"
    format: str = "cbor"              # or "json"
    max_payload_bytes: int = 64 * 1024
    max_items: int = 500
    max_inflight: int = 200           # messages published and not yet PUBACKed
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    session_expiry_s: int = 86400     # MQTT 5: how long the broker keeps our session (replay subscription)
    retention_s: float = 7 * 86400    # forwarded entries kept for replay
    prune_every_s: float = 600.0
    replay_max_entries: int = 100_000
    poll_s: float = 0.2               # look for new entries at least this often without a kick()

    @classmethod
    def from_dict(cls, table, where="[forwarder]"):
        """Validate a parsed TOML table; raise UsageError naming the key, the value and the fix."""
        table = dict(table)
        shared_tls = {k: table.pop(k) for k in ("ca_file", "cert_file", "key_file") if k in table}
        raw_brokers = table.pop("brokers", None)
        if not raw_brokers or not isinstance(raw_brokers, list):
            raise UsageError(f"{where} brokers", "no broker given",
                             'add [[forwarder.brokers]] tables with host = "..." and port = 8883')
        brokers = tuple(_broker(b, shared_tls, f"{where} brokers[{i}]") for i, b in enumerate(raw_brokers))
        known = {f.name for f in dataclasses.fields(cls)} - {"brokers"}
        for key in table:
            if key not in known:
                raise UsageError(f"{where} {key}", "unknown key", f"use one of {', '.join(sorted(known))}")
        site = table.get("site")
        if not isinstance(site, str):
            raise UsageError(f"{where} site", "missing or not a string", 'give the site name, e.g. site = "cmn-north"')
        if "client_id" not in table:                # stable across restarts: the broker keeps our session by it
            cid = f"prapa-{socket.gethostname()}-{site}"
            while len(cid.encode()) > CLIENT_ID_MAX_BYTES:
                cid = cid[:-1]
            table["client_id"] = cid
        cfg = cls(brokers=brokers, **table)
        cfg.check(where)
        return cfg

    def check(self, where="[forwarder]"):
        check_site(self.site, f"{where} site")
        cid = self.client_id.encode() if isinstance(self.client_id, str) else b""
        if not 0 < len(cid) <= CLIENT_ID_MAX_BYTES:
            raise UsageError(f"{where} client_id", f"{self.client_id!r} is empty or over {CLIENT_ID_MAX_BYTES} bytes",
                             "give a stable id unique to this gateway, e.g. prapa-<host>-<site>")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise UsageError(f"{where} protocol", f"{self.protocol!r} is not allowed", 'use "auto", "5" or "3.1.1"')
        if self.format not in ("cbor", "json"):
            raise UsageError(f"{where} format", f"{self.format!r} is not allowed", 'use "cbor" or "json"')
        if not 1024 <= self.max_payload_bytes <= PAYLOAD_MAX_BYTES:
            raise UsageError(f"{where} max_payload_bytes", f"{self.max_payload_bytes} is out of range",
                             f"give 1024 to {PAYLOAD_MAX_BYTES} (AWS IoT Core refuses larger payloads)")
        for key, low, high in (("max_items", 1, 10_000), ("max_inflight", 1, 1000), ("keepalive_s", 5, 3600),
                               ("replay_max_entries", 1, 10_000_000)):
            value = getattr(self, key)
            if not isinstance(value, int) or not low <= value <= high:
                raise UsageError(f"{where} {key}", f"{value!r} is out of range", f"give an integer from {low} to {high}")
        for key in ("connect_timeout_s", "backoff_initial_s", "backoff_max_s", "retention_s", "prune_every_s",
                    "poll_s", "session_expiry_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"{where} {key}", f"{value!r} is not a positive number", "give seconds above 0")


def _broker(raw, shared_tls, where):
    if not isinstance(raw, dict) or not isinstance(raw.get("host"), str) or not raw["host"]:
        raise UsageError(f"{where} host", "missing", 'give host = "broker.example.org"')
    raw = {**shared_tls, **raw}
    known = {f.name for f in dataclasses.fields(BrokerConfig)}
    for key in raw:
        if key not in known:
            raise UsageError(f"{where} {key}", "unknown key", f"use one of {', '.join(sorted(known))}")
    b = BrokerConfig(**raw)
    if not isinstance(b.port, int) or not 0 < b.port < 65536:
        raise UsageError(f"{where} port", f"{b.port!r} is not a TCP port", "give 8883 (TLS) or 1883")
    if b.client_id is not None and not 0 < len(str(b.client_id).encode()) <= CLIENT_ID_MAX_BYTES:
        raise UsageError(f"{where} client_id", f"{b.client_id!r} is empty or over {CLIENT_ID_MAX_BYTES} bytes",
                         "give a stable id unique to this gateway")
    if (b.cert_file is None) != (b.key_file is None):
        raise UsageError(f"{where} cert_file/key_file", "only one of the pair is given",
                         "give both the client certificate and its key, or neither")
    if not b.tls and (b.ca_file or b.cert_file):
        raise UsageError(f"{where} tls", "false while certificate files are given", "set tls = true")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(b, key)
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise UsageError(f"{where} {key}", f"cannot read {path} ({e.strerror})", "give a readable PEM file")
    return b


def check_site(site, where):
    """A site name becomes one topic level: refuse what would break a topic or a managed broker's limits."""
    if not isinstance(site, str) or not site or site.startswith("$") or SITE_FORBIDDEN.search(site):
        raise UsageError(where, f"{site!r} cannot be an MQTT topic level",
                         "use letters, digits, '-', '_' or '.', without '/', '+', '#', spaces or a leading '$'")
    longest = max(len(topic(site, 0, "x").encode()) - 1 + LONGEST_TAIL,
                  len(f"prapa/v1/{site}/catchment/{'c' * CATCHMENT_MAX_BYTES}/suspects".encode()))
    if longest > TOPIC_MAX_BYTES:
        room = len(site.encode()) - (longest - TOPIC_MAX_BYTES)
        raise UsageError(where, f"makes topics up to {longest} bytes long (AWS IoT Core allows {TOPIC_MAX_BYTES})",
                         f"use a site name of at most {room} bytes")


def device_hex(device_id):
    return "%08x" % device_id


def topic(site, device_id, tail):
    """prapa/v1/<site>/<device>/<tail>; refuses a topic a managed broker would refuse."""
    t = f"prapa/v1/{site}/{device_hex(device_id)}/{tail}"
    if len(t.encode()) > TOPIC_MAX_BYTES or t.count("/") > TOPIC_MAX_SLASHES:
        raise ValueError(f"topic {t!r} is over {TOPIC_MAX_BYTES} bytes or {TOPIC_MAX_SLASHES} slashes")
    return t


def command_topic(site, device, result=False):
    """prapa/v1/<site>/<device>/command (the cloud's requests; device: 8 hex digits, or "+" to subscribe)
    and .../command/result (the gateway's answers, QoS 1, not retained). Payloads, JSON or CBOR as the
    forward format (a request is taken in either):

        request: {"id": "<1-64 chars>", "name": "ping"|"reboot"|"config"|"replay"|<role command>, "args": {...}}
        result:  {"id", "state": "accepted"|"refused"|"delivered"|"confirmed"|"failed"|"timed_out",
                  "detail", and with a refusal "field", "limit" (where the schema has one), "fix"}
    """
    dev = device if isinstance(device, str) else device_hex(device)
    return f"prapa/v1/{site}/{dev}/command" + ("/result" if result else "")


def status_topic(site):
    """prapa/v1/<site>/gateway/status: the gateway's own state, retained; its last will says "offline"."""
    return f"prapa/v1/{site}/gateway/status"


def gateway_status(site, state, reason, since=None):
    """The payload on status_topic: {"v", "site", "state": "online"|"offline", "reason", "since"}. Online at
    each connection (reason "connected"), offline on a clean stop ("stopped") or, as the last will the
    broker publishes when the connection dies without one, "connection_lost" (no time: it is written at
    connect)."""
    body = {"v": 1, "site": site, "state": state, "reason": reason}
    if since is not None:
        body["since"] = round(since, 3)
    return body


def catchment_topic(site, catchment):
    """prapa/v1/<site>/catchment/<catchment>/suspects: the catchment's ranked suspects, retained."""
    t = f"prapa/v1/{site}/catchment/{catchment}/suspects"
    if len(t.encode()) > TOPIC_MAX_BYTES or t.count("/") > TOPIC_MAX_SLASHES or "+" in catchment \
            or "#" in catchment or "/" in catchment:
        raise ValueError(f"topic {t!r} is over {TOPIC_MAX_BYTES} bytes or {TOPIC_MAX_SLASHES} slashes")
    return t


@functools.lru_cache(maxsize=256)
def kind_ok(kind):
    return isinstance(kind, str) and len(kind.encode()) <= KIND_MAX_BYTES and bool(KIND.match(kind))


def item(row):
    """One entry as a message item. A payload that is not a CBOR map travels whole under "raw"."""
    _id, device_id, boot_id, seq, kind, _board_t_s, wall_t, time_source, payload = row
    try:
        m = cbor2.loads(payload)
    except Exception:
        m = None
    if not isinstance(m, dict):
        m = {"raw": bytes(payload)}
    m.setdefault("device", device_id)
    m.setdefault("boot", boot_id)
    m.setdefault("seq", seq)
    m.setdefault("kind", kind)
    if wall_t is not None:
        m.setdefault("wall_t", wall_t)
        m.setdefault("time_source", time_source)
    return m


def group(rows, max_items, max_payload_bytes, site, max_runs=None):
    """Runs of rows per (device, kind), in the order of each run's first row; a run closes at max_items or
    at the estimated size. Order within a device and kind is kept; alarms never share a run with readings.
    With max_runs, a key that cannot open a run skips its later rows too (they come in a later call)."""
    budget = max_payload_bytes - ENVELOPE_BYTES - len(site.encode())
    open_runs, runs, shut = {}, [], set()
    for row in rows:
        key = (row[1], row[4])
        size = len(row[8]) + ITEM_EXTRA_BYTES
        run = open_runs.get(key)
        if run is None or len(run[1]) >= max_items or run[0] + size > budget:
            if key in shut:
                continue
            if max_runs is not None and len(runs) >= max_runs:
                shut.add(key)
                continue
            run = [0, []]
            open_runs[key] = run
            runs.append(run)
        run[0] += size
        run[1].append(row)
    return [r[1] for r in runs]


def encode(obj, fmt):
    if fmt == "cbor":
        return cbor2.dumps(obj, canonical=True)
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return str(value)


def message(site, rows, fmt, max_payload_bytes, replay=False):
    """[(rows, payload bytes)]: one message, or more when the size estimate was short. A row whose
    message alone is over the limit comes back with payload None: the caller refuses it."""
    device_id, kind = rows[0][1], rows[0][4]
    msg = {"v": 1, "site": site, "device": device_hex(device_id), "kind": kind, "items": [item(r) for r in rows]}
    if replay:
        msg["replay"] = True
    payload = encode(msg, fmt)
    if len(payload) <= max_payload_bytes:
        return [(rows, payload)]
    if len(rows) == 1:
        return [(rows, None)]
    half = len(rows) // 2
    return (message(site, rows[:half], fmt, max_payload_bytes, replay)
            + message(site, rows[half:], fmt, max_payload_bytes, replay))


def identity_properties(rows):
    """MQTT 5 user properties naming the message's first and last identity ("boot:seq"), for broker rules
    and dedup without decoding the payload. Three pairs: paho packs properties in pure Python, per message."""
    first, last = rows[0], rows[-1]
    return [("device", device_hex(first[1])), ("first", f"{first[2]}:{first[3]}"), ("last", f"{last[2]}:{last[3]}")]


def decode_request(payload):
    """A replay request arrives as CBOR or JSON (whatever the cloud finds easier); a map or ValueError."""
    for loads in (cbor2.loads, lambda b: json.loads(b.decode())):
        try:
            req = loads(payload)
        except Exception:
            continue
        if isinstance(req, dict):
            return req
    raise ValueError("replay request is neither a CBOR nor a JSON map")
