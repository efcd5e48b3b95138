"""prapa gateway run: the gateway service (asyncio), from one validated TOML config.

What it promises, and where each promise is kept:
- A board's entry is acknowledged only after its group commit is fsynced
  (Sessions.flush -> Store.commit, synchronous=FULL); frames arriving within
  group_commit_ms share one transaction.
- Entries leave the store only after a broker's PUBACK and the retention
  window (Forwarder); the cloud can ask for a replay.
- With less than min_free_mb on the data disk the gateway stops acknowledging:
  frames are verified and dropped, the boards keep their logs, an alarm is
  raised; it resumes by itself when space returns. The store is never written
  past the guard.
- Serial ports are read by one thread each (pyserial blocks); everything else,
  sessions included, runs on the loop thread, so sessions need no locks.
- Start-up creates nothing it cannot keep: claim() opens the serial ports, binds
  the UDP and HTTP ports and checks the data_dir can be written before the
  data_dir, the store or the registry exist; a refusal there, or one while
  they are made, is a UsageError (exit 2, which systemd does not restart) and
  leaves no data_dir behind.
- A request queued for a board goes out the moment the board is heard (Sessions.on_heard), so a
  battery board that wakes, sends and listens a few hundred ms gets it in that window (one queued
  while the board is quiet is also sent at once, for a mains board that listens all the time); an
  unanswered one is sent again only once the board is heard again (HEARD_RESEND_S after the
  send), never into a sleeping board's silence. A send counts as a try only when the board was
  heard within HEARD_RESEND_S of it (it was listening); DOWNLINK_MAX_TRIES tries and it expires.
- A command from the cloud (prapa/v1/<site>/<device>/command) goes through gateway/commands.py's
  submit(), as the CLI's do: checked, queued with its id in one transaction, its result published
  on .../command/result at each step (accepted or refused, delivered, confirmed or failed, timed_out).
  The forwarder's thread hands it over (_inbox); the loop thread alone writes the store.
- Each catchment's ranked suspects (gateway/ranking.py) are in the status JSON and published
  retained on MQTT when they change; its rain is shared with the devices without a gauge
  (gateway/catchments.py) through the downlink queue. After a restart the ranked devices start
  from their newest stored reading and alarms, so a restart never publishes an alarming device as ok.
"""

import asyncio
import collections
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from gateway import catchments, commands, ranking
from gateway import forward_format as ff
from gateway.forwarder import Forwarder
from gateway.logs import log_event
from gateway.metrics import HttpServer, Metrics
from gateway.registry import DownlinkCounters, Registry
from gateway.sd_notify import Notifier
from gateway.serial_link import SerialLink
from gateway.session import Sessions
from gateway.store import Store
from protocol import link
from protocol.errors import UsageError
from protocol.roles import catalog as roles
from protocol import messages as M

log = logging.getLogger("prapa.gateway")
DISK_CHECK_S = 5.0
STATUS_EVERY_S = 1.0
STATUS_READ_HOLD_S = 60.0     # the status page's device list is built while it was read within this long
STATUS_FRESH_WAIT_S = 2.0     # a reader after a pause waits this long at most for a fresh one
CLOCK_STEP_HOST_S = 2.0          # the wall clock moved this much more or less than the host's monotonic one
                                 # (x simulate_speed): a step (NTP, an operator): boards are synced at once
HEARD_RESEND_S = 2.0             # an unanswered request goes again when the board is heard this long after it
DOWNLINK_MAX_TRIES = 5
CATCHMENT_VALUES_EVERY_S = 30.0  # a catchment's list republished for new levels and scores at most this often
SERIES_POINTS = 96
# Readings per MQTT message. With Mosquitto's 20 messages in flight this bounds what the forwarder holds
# in memory (about 5,000 entries) while keeping messages far under managed brokers' size limits.
FORWARD_MAX_ITEMS = 250
QUEUED_CHUNKS = 32              # serial reads handed to the loop and not yet ingested (bounds memory)
GROUP_MAX_ENTRIES = 4000         # a group commit closes at group_commit_ms or this many entries


def _log(event, level=logging.INFO, **fields):
    log_event(log, level, event, **fields)


def forwarder_config(cfg):
    """The [brokers] and [forward] sections in the forwarder's own terms."""
    brokers = []
    for b in cfg.brokers:
        brokers.append({"host": b.host, "port": b.port, "tls": b.tls, "ca_file": b.ca_file and str(b.ca_file),
                        "cert_file": b.cert_file and str(b.cert_file), "key_file": b.key_file and str(b.key_file),
                        "username": b.username, "password": b.password(), "client_id": b.client_id})
    table = {"site": cfg.gateway.site, "brokers": [{k: v for k, v in b.items() if v is not None} for b in brokers],
             "client_id": cfg.brokers[0].client_id, "protocol": cfg.forward.protocol, "format": cfg.forward.format,
             "max_payload_bytes": min(cfg.forward.max_payload_bytes, ff.PAYLOAD_MAX_BYTES),
             "retention_s": cfg.store.retention_days * 86400, "max_items": FORWARD_MAX_ITEMS}
    return ff.ForwarderConfig.from_dict(table, where=f"{cfg.path}: [[brokers]]")


def _field_charts(role, series):
    """The role's spec CHART_FIELDS as charts, one per field, from the fields of the readings kept in
    `series` ((wall_t, value, register, fields) each): [{"field", "unit", "series": [[t, v], ...],
    "band", "ceiling"}]. The first chart carries the spec's CHART_BAND and the newest value of its
    CHART_CEILING field (None where the role declares none); [] for a role without CHART_FIELDS."""
    names = roles.attr(role, "CHART_FIELDS", None) or ()
    if not names:
        return []
    units = {f[0]: f[1] for f in roles.attr(role, "FIELDS", None) or ()}
    band = roles.attr(role, "CHART_BAND", None)
    ceiling_field = roles.attr(role, "CHART_CEILING", None)
    ceiling = None
    if ceiling_field:
        ceiling = next((p[3][ceiling_field] for p in reversed(series)
                        if p[3] and p[3].get(ceiling_field) is not None), None)
    return [{"field": name, "unit": units.get(name),
             "series": [[p[0], p[3].get(name)] for p in series if p[3]],
             "band": list(band) if i == 0 and band else None, "ceiling": ceiling if i == 0 else None}
            for i, name in enumerate(names)]


# -- start-up: claim what the service must own before anything is created --------------------------
def wall_clock(time_cfg):
    """The wall time the gateway gives its boards: the host's, or for a simulated site ([time]
    simulate_speed / simulate_from) a clock that starts at simulate_from and runs simulate_speed times
    faster, as the virtual boards' clocks and their world do; then a board that reboots is synced onto
    the calendar it left, not back to the host's day. The clock counts from simulate_since (a real
    instant in the config), so a gateway restarted mid-run goes on where the site's calendar is.
    Liveness, resends and commit times stay on the host's clock."""
    if time_cfg.simulate_speed == 1 and time_cfg.simulate_from is None:
        return time.time
    now = time.time()
    since = now if time_cfg.simulate_since is None else time_cfg.simulate_since
    start_wall = since if time_cfg.simulate_from is None else time_cfg.simulate_from
    speed = time_cfg.simulate_speed
    return lambda: start_wall + (time.time() - since) * speed


class Claimed(NamedTuple):
    """The links' ports, opened and bound by claim(), in the order of cfg.links."""
    serial_links: list           # SerialLink, flock'ed: no second reader on the wire
    udp_sockets: list            # bound datagram sockets

    def close(self):
        for link_ in self.serial_links:
            link_.close()
        for sock in self.udp_sockets:
            sock.close()


def claim(cfg):
    """Open every serial port, bind every UDP port, try the HTTP port and check the data_dir can be made
    or written, all before anything is created; UsageError naming the config key and the fix."""
    claimed = Claimed([], [])
    try:
        _check_data_dir(cfg)
        for i, link_cfg in enumerate(cfg.links):
            where = f"{cfg.path}: links[{i}]"
            if link_cfg.type == "serial":
                claimed.serial_links.append(_open_serial(link_cfg, where))
            else:
                claimed.udp_sockets.append(_bind(link_cfg.host, link_cfg.port, socket.SOCK_DGRAM,
                                                 f"{where}.bind", "the boards' UDP link"))
        _bind(cfg.http.host, cfg.http.port, socket.SOCK_STREAM, f"{cfg.path}: http.listen",
              "the status page and /metrics").close()        # HttpServer binds it again at start
    except BaseException:
        claimed.close()
        raise
    return claimed


def _check_data_dir(cfg):
    data_dir, where = cfg.gateway.data_dir, f"{cfg.path}: gateway.data_dir"
    folder = data_dir
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(where, f"{folder} is a file, not a folder", "point data_dir at a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(where, f"{data_dir}: the service user cannot write in {folder}",
                         f"chown {folder} to the service user, or point data_dir at a folder it owns "
                         "(systemd: StateDirectory=prapa gives /var/lib/prapa)")
    for path in (cfg.store_path, cfg.registry_path):
        if path.exists() and (not path.is_file() or not os.access(path, os.R_OK | os.W_OK)):
            raise UsageError(where, f"{path} is not a file the service user can read and write",
                             "move it away, or chown it to the service user")


def _open_serial(link_cfg, where):
    port = link_cfg.port
    if not os.path.exists(port):
        raise UsageError(f"{where}.port = {port!r}", "no such port",
                         "plug the adapter in, or set port to its path (ls /dev/serial/by-id/)")
    try:
        serial_link = SerialLink(port, link_cfg.baudrate)
    except (OSError, ValueError) as e:          # pyserial's SerialException is an OSError
        raise UsageError(f"{where}.port = {port!r}", f"cannot be opened ({e})",
                         "check the service user may use it (group dialout) and that it is a serial port") from None
    try:
        fcntl.flock(serial_link.serial.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        serial_link.close()
        raise UsageError(f"{where}.port = {port!r}", "busy: another program holds it",
                         "stop the other program (another gateway, prapa monitor, mpremote, screen)") from None
    return serial_link


def _bind(host, port, kind, where, what):
    """A socket bound to host:port (kind SOCK_DGRAM or SOCK_STREAM), or UsageError saying why not."""
    try:
        family, _type, proto, _name, address = socket.getaddrinfo(host, port, type=kind)[0]
    except socket.gaierror as e:
        raise UsageError(where, f"{host} cannot be resolved ({e.strerror})",
                         "use an IP address of this machine") from None
    sock = socket.socket(family, kind, proto)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as http.server does
        sock.bind(address)
    except OSError as e:
        sock.close()
        ss = "ss -lunp" if kind == socket.SOCK_DGRAM else "ss -ltnp"
        problem, fix = {
            errno.EADDRINUSE: (f"port {port} is in use", f"stop what listens there ({ss}), or give {what} another port"),
            errno.EADDRNOTAVAIL: (f"{host} is not an address of this machine", "use one of its addresses, or 0.0.0.0"),
            errno.EACCES: (f"port {port} needs privileges", "use a port above 1023"),
        }.get(e.errno, (f"cannot bind {host}:{port} ({e.strerror})", f"give {what} another address"))
        raise UsageError(where, problem, fix) from None
    return sock


def _made_by(data_dir):
    """The topmost folder creating data_dir would make (None if it exists): removed if start-up fails."""
    made = None
    for folder in (data_dir, *data_dir.parents):
        if folder.exists():
            return made
        made = folder
    return made


class UdpPeer:
    """A board on UDP: replies go to the address its last frame came from, one bare frame a datagram."""

    framed = False

    def __init__(self, transport, addr):
        self.transport, self.addr = transport, addr

    def write(self, _link_addr, data):
        self.transport.sendto(data, self.addr)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, service, name):
        self.service, self.name, self.transport = service, name, None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.service.ingest_datagram(self.name, data, UdpPeer(self.transport, addr))


def read_link(link, stopping, deliver, on_error=None, retry_s=1.0):
    """Pump one serial link until the event stopping is set (pyserial blocks: run it on a thread of its own).

    deliver(data) gets every read that brought bytes; a failed read goes to on_error(exc), then the
    loop rests retry_s and reads again (a USB adapter unplugged and plugged back comes back by itself).
    The service runs one per port; gateway/harness.py runs one for its single link."""
    while not stopping.is_set():
        try:
            data = link.read()
        except OSError as e:
            if on_error is not None:
                on_error(e)
            time.sleep(retry_s)
            continue
        if data:
            deliver(data)


class Service:
    @classmethod
    def create(cls, cfg, claimed):
        """The service on what claim() took: its data_dir, store and registry are made here, and a
        failure while making them (disk full, a file that is not a database) is a UsageError that
        leaves neither the claimed ports nor a new data_dir behind."""
        made = _made_by(cfg.gateway.data_dir)
        files = [Path(f"{p}{suffix}") for p in (cfg.store_path, cfg.registry_path) for suffix in ("", "-wal", "-shm")]
        new = [f for f in files if not f.exists()]
        try:
            return cls(cfg, claimed)
        except (OSError, sqlite3.Error, UsageError) as e:
            claimed.close()
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            for f in new:
                f.unlink(missing_ok=True)
            if isinstance(e, UsageError):
                raise
            if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
                problem, fix = f"{cfg.store_path} is not a prapa store ({e})", "move it away: a new one is made"
            elif isinstance(e, OSError) and e.errno == errno.ENOSPC or "full" in str(e):
                problem, fix = f"no space left for the store in {cfg.gateway.data_dir}", "free space on that disk"
            else:
                problem, fix = f"cannot create the store in {cfg.gateway.data_dir} ({e})", \
                    "check the folder and the disk the service user writes to"
            raise UsageError(f"{cfg.path}: gateway.data_dir", problem, fix) from None

    def __init__(self, cfg, claimed=None):
        self.cfg = cfg
        self.claimed = claimed              # None: run() claims the ports itself
        cfg.gateway.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = Store(cfg.store_path)
        self.registry = Registry(cfg.registry_path)
        self.metrics = Metrics(cfg.gateway.site)
        self.sessions = Sessions(self.store, self.registry.key_for, self._nowhere,
                                 lambda d: DownlinkCounters(self.registry, d), role_of=self._role_of,
                                 wall_clock=wall_clock(cfg.time))
        self.sessions.on_command_result = self._command_result
        self.sessions.on_heard = self._heard
        self.forwarder = Forwarder(self.store, forwarder_config(cfg), failback_s=cfg.forward.failback_s)
        self.forwarder.on_command = self._command_arrived
        self._inbox = collections.deque()     # work handed from the forwarder's thread to the loop's
        self._loop, self._loop_thread = None, None
        self.http = HttpServer(cfg.http.host, cfg.http.port, self.metrics, self.status)
        self.notifier = Notifier()
        self.serial_links = []
        self.udp_links = []
        self.stopping = None
        self.acks_withheld = False
        self.series = collections.defaultdict(lambda: collections.deque(maxlen=SERIES_POINTS))
        self._snapshot = {"site": cfg.gateway.site, "devices": [], "backlog": 0, "alarms": []}
        self._snapshot_at = None              # time.monotonic() the snapshot was built
        self._status_read_at = time.monotonic()   # as if read at the start: the first minute builds it
        self._snapshot_built = threading.Event()
        self._rejected_seen = {}
        for reason in link.REASONS:                    # every reason shows, at 0 until it happens
            self.metrics.rejections.labels(reason=reason)
        self._acked_seen = 0
        self._seen_noted = {}              # device -> the last_seen the registry and metrics were last told
        self._last_sync_mono = None        # time.monotonic() of the last periodic time sync
        self._clock_seen = None            # (monotonic, wall) at the last downlink turn: steps show against it
        self.clock_steps = 0
        self._queued = threading.BoundedSemaphore(QUEUED_CHUNKS)
        # devices with an open request (refreshed by downlink_loop): from the store at once, so a request
        # queued before a restart goes to a board heard in the first second after it
        self._downlink_devices = {row[1] for row in self.store.downlink_open()}
        self.rain = catchments.RainSharing()
        self._catchments = {}              # catchment -> {"suspects", "raining", "rain_mm_h", "gauges"}
        self._published = {}               # catchment -> (suspects, raining, rain_mm_h, t) last published
        self._topic_refused = set()
        self._failures = set()
        self._seed_from_store()

    # -- inputs ------------------------------------------------------------------------------
    @staticmethod
    def _nowhere(addr, wire):
        _log("downlink_unrouted", logging.WARNING, addr=addr, bytes=len(wire))

    def _role_of(self, device_id):
        d = self.registry.get(device_id)
        return d.role if d else None

    def ingest(self, link, name, data):
        self._queued.release()
        before = self._frames()
        self.sessions.feed(data, link)
        self._count_frames(name, before)
        if len(self.sessions.pending) >= GROUP_MAX_ENTRIES:
            self._commit()

    def ingest_datagram(self, name, data, peer):
        before = self._frames()
        self.sessions.datagram(data, peer)
        self._count_frames(name, before)

    def _frames(self):
        return self.sessions.receiver.accepted + sum(self.sessions.counts().values())

    def _count_frames(self, name, before):
        n = self._frames() - before
        if n:
            self.metrics.frames_received.labels(link=name).inc(n)

    def _read_serial(self, link, loop):
        """One thread per port: pyserial blocks; the data goes to the loop thread."""
        def deliver(data):
            self._queued.acquire()        # backpressure: at most QUEUED_CHUNKS reads wait for the loop
            loop.call_soon_threadsafe(self.ingest, link, link.port, data)
        read_link(link, self.stopping, deliver,
                  lambda e: _log("link_error", logging.ERROR, port=link.port, error=str(e)), retry_s=1.0)

    # -- commit and acknowledge ------------------------------------------------------------------
    async def commit_loop(self):
        period = self.cfg.store.group_commit_ms / 1000
        while True:
            await asyncio.sleep(period)
            self._commit()

    def _commit(self):
        if not self.sessions.pending:
            return
        t0 = time.perf_counter()
        n = self.sessions.flush()
        self.metrics.commit_latency.observe(time.perf_counter() - t0)
        self.metrics.readings_committed.inc(n)
        self.forwarder.kick()
        for device_id, point in self.sessions.take_latest().items():   # the live charts
            self.series[device_id].append(point)
            d = self.sessions.devices.get(device_id)
            self.rain.observe(device_id, d.role if d else None, point[0], point[3], self.sessions.clock())

    def _seed_from_store(self):
        """Ranked and rain-sharing devices start from their newest stored reading and alarm states."""
        for reg in self.registry.list():
            if reg.state == "retired" or not (ranking.participates(reg.role) or catchments.told_rain(reg.role)):
                continue
            item = self.store.newest_reading(reg.device_id)
            if isinstance(item, dict) and isinstance(item.get("fields"), dict) and item.get("wall_t") is not None \
                    and item.get("series", "interval") == "interval":
                self.series[reg.device_id].append((item["wall_t"], item.get("value"), item.get("register"),
                                                   item["fields"]))
            alarms = self.store.newest_alarms(reg.device_id)
            if alarms:
                d = self.sessions.device(reg.device_id)
                for code, a in alarms.items():
                    d.alarms.setdefault(code, (a.get("active"), a.get("wall_t"), a.get("name"), a.get("detail", 0)))

    async def disk_guard(self):
        """Stop acknowledging before the disk is full: boards keep what they have."""
        floor = self.cfg.store.min_free_mb * 1024 * 1024
        while True:
            free = shutil.disk_usage(self.cfg.gateway.data_dir).free
            withhold = free < floor
            if withhold != self.acks_withheld:
                self.acks_withheld = withhold
                self.sessions.accepting = not withhold
                self.metrics.acks_withheld.set(1 if withhold else 0)
                _log("acks_withheld" if withhold else "acks_resumed", logging.ERROR if withhold else logging.INFO,
                     free_mb=free // 2**20, min_free_mb=self.cfg.store.min_free_mb)
            await asyncio.sleep(DISK_CHECK_S)

    # -- downlink queue ----------------------------------------------------------------------------
    async def downlink_loop(self):
        while True:
            now = time.time()
            self.serve_commands()
            self._send_downlinks(now)
            if self._time_sync_due(time.monotonic(), self.sessions.wall_clock()):
                for d in list(self.sessions.devices.values()):
                    if d.link is not None:
                        self.sessions.time_sync(d.device_id)
            await asyncio.sleep(1.0)

    def _time_sync_due(self, mono, wall):
        """Every sync_interval_s of wall time, paced on the monotonic clock (a wall clock stepped back an
        hour must not hold the boards' syncs back an hour); at once when the wall clock stepped, so boards
        given the wrong time are corrected within a second of the host's being."""
        speed = self.cfg.time.simulate_speed
        seen, self._clock_seen = self._clock_seen, (mono, wall)
        if seen is not None:
            step = (wall - seen[1]) - (mono - seen[0]) * speed
            if abs(step) > CLOCK_STEP_HOST_S * speed:
                self.clock_steps += 1
                _log("wall_clock_stepped", logging.WARNING, step_s=round(step, 3), devices=len(self.sessions.devices))
                self._last_sync_mono = mono
                return True
        if self._last_sync_mono is None or (mono - self._last_sync_mono) * speed >= self.cfg.time.sync_interval_s:
            self._last_sync_mono = mono
            return True
        return False

    def _heard(self, device_id):
        """A message from the device was taken: its open request goes now, while it listens."""
        if device_id in self._downlink_devices:
            self._send_downlinks(self.sessions.clock(), device_id)

    def _send_downlinks(self, now, device_id=None):
        """Send the oldest open request of every device (or of one) heard on a link: one never sent, or
        one unanswered although the board was heard HEARD_RESEND_S or more after it went (a board
        answers at once: it did not get it). A board not heard since is asleep or away: nothing is
        sent into that, and a send to a board not heard just before is no try (it may sleep)."""
        rows = self.store.downlink_open(device_id)
        if device_id is None:
            self._downlink_devices = {row[1] for row in rows}
        elif not rows:
            self._downlink_devices.discard(device_id)
        for qid, dev, msg_type, body, attempts, sent_at in rows:
            d = self.sessions.devices.get(dev)
            if d is None or d.link is None or (sent_at is not None and d.last_seen < sent_at + HEARD_RESEND_S):
                continue
            if attempts >= DOWNLINK_MAX_TRIES:
                self.store.finish_downlink(qid, "expired", f"no answer after {attempts} tries")
                _log("downlink_expired", device=dev, id=qid)
                self._command_moved(qid, "timed_out", f"no answer after {attempts} tries",
                                    only_from=("accepted", "delivered"))
                continue
            try:
                message = json.loads(body)
            except ValueError:
                self.store.finish_downlink(qid, "expired", "its body is not JSON")
                _log("downlink_expired", logging.ERROR, device=dev, id=qid, problem="body is not JSON")
                continue
            # Marked before the send: a board that answers within the send (a test's stand-in) finds it sent.
            self.store.mark_downlink_sent(qid, now, attempt=now - d.last_seen <= HEARD_RESEND_S)
            self._command_moved(qid, "delivered", "sent to the board", only_from=("accepted",))
            if msg_type == M.COMMAND:
                self.sessions.downlink(dev, M.COMMAND, M.command(qid, message["name"], message.get("args")))
            else:
                self.sessions.downlink(dev, M.CONFIG_PUSH, M.config_push(qid, message))

    def _command_result(self, device_id, m):
        state = "done" if m[1] else "refused"          # a refused command is reported, never retried
        self.store.finish_downlink(m[0], state, m.get(2, ""))
        _log("downlink_result", device=device_id, id=m[0], state=state, detail=m.get(2, ""))
        self._command_moved(m[0], "confirmed" if m[1] else "failed", str(m.get(2, "")),
                            only_from=("accepted", "delivered"))

    # -- commands from the cloud -------------------------------------------------------------------
    def _command_arrived(self, topic, payload):
        """On the forwarder's thread: hand the message to the loop thread."""
        self._inbox.append(lambda: self._command(topic, payload))
        self._wake()

    def _wake(self):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.serve_commands)

    def serve_commands(self):
        """Take what the forwarder's thread handed over (commands, replays served), on the loop thread."""
        while self._inbox:
            self._guarded("command_failed", self._inbox.popleft())

    def _command(self, topic, payload):
        dev = topic.split("/")[3]
        if len(dev) != 8 or any(c not in "0123456789abcdef" for c in dev):
            _log("command_refused", logging.WARNING, topic=topic, problem="device is not 8 hex digits")
            return
        device_id = int(dev, 16)
        try:
            req = ff.decode_request(payload)
        except ValueError as e:
            self._publish_result(device_id, commands.Outcome("refused", str(e), "payload", None,
                                 'send {"id": ..., "name": ..., "args": {...}} as JSON or CBOR').result(None))
            return
        cmd_id, name = req.get("id"), req.get("name")
        outcome = commands.submit(self.store, self.registry, device_id, name, req.get("args"),
                                  command_id=cmd_id if cmd_id is not None else "", replay=self._replay)
        _log("command", device=dev, id=cmd_id, name=name, state=outcome.state, repeated=outcome.repeated,
             field=outcome.field)
        self._publish_result(device_id, outcome.result(cmd_id))
        if outcome.state == "accepted" and outcome.downlink_id is not None and not outcome.repeated:
            self._downlink_devices.add(device_id)
            self._send_downlinks(self.sessions.clock(), device_id)

    def _replay(self, device_id, from_s, to_s, cmd_id):
        def done(count, truncated):                  # on the forwarder's thread
            self._inbox.append(lambda: self._replayed(device_id, cmd_id, count, truncated))
            self._wake()
        self.forwarder.replay_between(device_id, from_s, to_s, done)

    def _replayed(self, device_id, cmd_id, count, truncated):
        if cmd_id is None:
            return
        detail = f"{count} entries republished" + (" (truncated: ask again from the last)" if truncated else "")
        self.store.set_command_state(device_id, cmd_id, "confirmed", detail)
        self._publish_result(device_id, commands.Outcome.of(self.store.command(device_id, cmd_id)).result(cmd_id))

    def _command_moved(self, qid, state, detail, only_from):
        """A queued request of the cloud's moved on: record the command's new state, then publish it."""
        ref = self.store.command_of_downlink(qid)
        if ref is None:
            return
        device_id, cmd_id = ref
        row = self.store.command(device_id, cmd_id)
        if row["state"] not in only_from:
            return
        self.store.set_command_state(device_id, cmd_id, state, detail)
        self._publish_result(device_id, commands.Outcome.of(self.store.command(device_id, cmd_id)).result(cmd_id))

    def _publish_result(self, device_id, result):
        fmt = self.forwarder.config.format
        self.forwarder.publish(ff.command_topic(self.cfg.gateway.site, device_id, result=True), ff.encode(result, fmt),
                               "application/cbor" if fmt == "cbor" else "application/json")

    # -- observability -------------------------------------------------------------------------------
    async def status_loop(self):
        watchdog_s = self.notifier.watchdog_interval_s()
        last_ping = 0.0
        while True:
            now = time.time()
            self.status_tick(now)
            if watchdog_s and now - last_ping >= watchdog_s:
                self.notifier.watchdog()
                last_ping = now
            await asyncio.sleep(STATUS_EVERY_S)

    def status_tick(self, now):
        """One turn of the status loop: metrics, the rain shared, the status page's snapshot, the
        catchments' lists on MQTT, last_seen into the registry."""
        heard = self._heard_since_last_tick()
        self._update_metrics(heard)
        registered = self.registry.list()
        placed = self._placed(registered)
        self._guarded("rain_sharing_failed", self._share_rain, now, placed)
        if time.monotonic() - self._status_read_at < STATUS_READ_HOLD_S:
            self._snapshot = self._build_status(now, registered, placed)
            self._snapshot_at = time.monotonic()
            self._snapshot_built.set()
        else:                           # nobody reads the page: its device list is not built (~90 ms at
            self._update_catchments(now, placed)     # 5,000 devices, which held the loop's acks)
        self._guarded("catchments_publish_failed", self._publish_catchments, now)
        for d in heard:
            self.registry.mark_seen(d.device_id, d.last_seen, d.firmware)
            self._seen_noted[d.device_id] = d.last_seen

    def _heard_since_last_tick(self):
        """The sessions heard since the registry and metrics were last told: only they are written, so a
        tick costs the devices that spoke, not every device the gateway serves (5,000 made it 0.3 s)."""
        noted = self._seen_noted
        return [d for d in self.sessions.devices.values() if d.last_seen and noted.get(d.device_id) != d.last_seen]

    def _guarded(self, event, fn, *args):
        """fn(*args), a failure of which (a bug) is logged once per kind and leaves the rest of the status
        loop running: the status page, last_seen and the watchdog do not stop for the catchments."""
        try:
            return fn(*args)
        except Exception as e:
            if (event, repr(e)) not in self._failures:
                self._failures.add((event, repr(e)))
                _log(event, logging.ERROR, error=repr(e), exc_info=True)
            return None

    def _update_metrics(self, heard=()):
        m, f = self.metrics, self.forwarder
        for reason, n in self.sessions.counts().items():
            if n > self._rejected_seen.get(reason, 0):
                m.rejections.labels(reason=reason).inc(n - self._rejected_seen.get(reason, 0))
                self._rejected_seen[reason] = n
        m.backlog.set(f.backlog)
        new = f.acked - self._acked_seen
        self._acked_seen = f.acked
        for s in list(f.puback_latency_s)[-new:] if new > 0 else ():
            m.puback_latency.observe(s)
        for b in self.forwarder.config.brokers:
            m.broker_connected.labels(broker=b.url).set(1 if f.connected and f.broker == b.url else 0)
        for d in heard:
            m.device_seen(d.device_id, d.last_seen)

    def _placed(self, registered):
        """Every served device with its place, role, newest reading fields, alarm states and last word:
        what gateway/ranking.py and gateway/catchments.py take (each picks the roles it knows)."""
        out = []
        for reg in registered:
            if reg.state == "retired":
                continue
            sess = self.sessions.devices.get(reg.device_id)
            series = self.series.get(reg.device_id)
            out.append({"id": reg.device_id, "name": reg.name, "role": reg.role or (sess.role if sess else None),
                        "lat": reg.lat, "lon": reg.lon, "catchment": reg.catchment,
                        "fields": series[-1][3] if series else None, "wall_t": series[-1][0] if series else None,
                        "alarms": {code: (a[0], a[3]) for code, a in (sess.alarms.items() if sess else ())},
                        "last_seen": sess.last_seen if sess and sess.last_seen else reg.last_seen})
        return out

    def _share_rain(self, now, placed):
        """Queue the rain commands the catchments' gauges call for (each replaces its device's older one)."""
        for device_id, args in self.rain.tick(now, placed):
            self.store.queue_downlink(device_id, M.COMMAND, json.dumps({"name": catchments.COMMAND, "args": args}),
                                      now=now, supersede=catchments.COMMAND)
            self._downlink_devices.add(device_id)

    def _catchment_status(self, now, placed):
        ranked = ranking.rank(placed, now)
        rain = self.rain.state
        dry = {"raining": False, "rain_mm_h": 0.0, "gauges": 0}
        return {name: {"suspects": ranked.get(name, []), **rain.get(name, dry)}
                for name in sorted(set(ranked) | set(rain))}

    def _update_catchments(self, now, placed):
        ranked = self._guarded("ranking_failed", self._catchment_status, now, placed)
        self._catchments = self._catchments if ranked is None else ranked      # a bug keeps the last lists

    def _publish_catchments(self, now):
        """Each catchment's list, retained on prapa/v1/<site>/catchment/<name>/suspects: at once when a
        device moves, comes, goes or changes state or the rain starts or stops, at most every
        CATCHMENT_VALUES_EVERY_S for new levels and scores; a catchment gone is cleared."""
        site = self.cfg.gateway.site
        for name, c in self._catchments.items():
            before = self._published.get(name)
            how = ranking.changed(before[0] if before else None, c["suspects"])
            if before is not None and before[1] == c["raining"] and how != "order" and not (
                    (how == "values" or before[2] != c["rain_mm_h"]) and now - before[3] >= CATCHMENT_VALUES_EVERY_S):
                continue
            try:
                topic = ff.catchment_topic(site, name)
            except ValueError as e:
                if name not in self._topic_refused:
                    self._topic_refused.add(name)
                    _log("catchment_topic_refused", logging.ERROR, catchment=name, problem=str(e))
                continue
            payload = {"v": 1, "site": site, "catchment": name, "t": now, "raining": c["raining"],
                       "rain_mm_h": c["rain_mm_h"], "suspects": c["suspects"]}
            self.forwarder.retain(topic, json.dumps(payload, separators=(",", ":")).encode())
            self._published[name] = (c["suspects"], c["raining"], c["rain_mm_h"], now)
        for name in [n for n in self._published if n not in self._catchments]:
            del self._published[name]
            try:
                self.forwarder.retain(ff.catchment_topic(site, name), b"")
            except ValueError:
                pass

    def _build_status(self, now, registered=None, placed=None):
        devices, alarms = [], []
        registered = self.registry.list() if registered is None else registered
        placed = self._placed(registered) if placed is None else placed
        known = {d.device_id: d for d in registered}
        for device_id in sorted(set(known) | set(self.sessions.devices)):
            reg, sess = known.get(device_id), self.sessions.devices.get(device_id)
            active = {code: a for code, a in (sess.alarms.items() if sess else ())}
            for code, (on, wall, name, _detail) in active.items():
                alarms.append({"device": f"{device_id:08x}", "code": name, "active": on, "t": wall})
            series = list(self.series.get(device_id, ()))
            role = (reg.role if reg else None) or (sess.role if sess else None)
            devices.append({
                "id": f"{device_id:08x}", "name": (reg.name if reg else None) or f"{device_id:08x}",
                "role": role,
                "last_seen": sess.last_seen if sess and sess.last_seen else (reg.last_seen if reg else None),
                "firmware": (sess.firmware if sess else None) or (reg.firmware if reg else None),
                "state": reg.state if reg else "unknown", "readings": len(series),
                "alarms_active": sum(1 for on, *_ in active.values() if on),
                "series": [[t, v] for t, v, *_ in series], "chart": roles.attr(role, "CHART") if role else None,
                "register": series[-1][2] if series else None,
                "charts": _field_charts(role, series) if role else []})
        if self.acks_withheld:
            alarms.append({"device": "gateway", "code": "disk_nearly_full", "active": True, "t": now})
        f = self.forwarder.stats()
        self._update_catchments(now, placed)
        return {"site": self.cfg.gateway.site, "now": now, "devices": devices, "backlog": f["backlog"],
                "catchments": self._catchments,
                "suspect_legend": ranking.legend(sorted({p["role"] for p in placed if p["role"]})),
                "alarms": alarms, "utc_offset_minutes": self.cfg.time.utc_offset_minutes,
                "brokers": [{"url": b.url, "connected": f["connected"] and f["broker"] == b.url}
                            for b in self.forwarder.config.brokers],
                "links": [{"link": s.port, "type": "serial"} for s in self.serial_links] +
                         [{"link": name, "type": "udp"} for name in self.udp_links]}

    def status(self):
        """The status page's snapshot. The status loop builds it only while somebody reads it (within
        STATUS_READ_HOLD_S): a reader after a pause, on another thread than the running loop's (the HTTP
        server's), waits up to STATUS_FRESH_WAIT_S for the next tick to build a fresh one."""
        self._status_read_at = time.monotonic()
        stale = self._snapshot_at is None or time.monotonic() - self._snapshot_at > 2 * STATUS_EVERY_S
        loop = self._loop
        if stale and loop is not None and loop.is_running() and threading.current_thread() is not self._loop_thread:
            self._snapshot_built.clear()
            self._snapshot_built.wait(STATUS_FRESH_WAIT_S)
        return self._snapshot

    # -- life cycle ------------------------------------------------------------------------------------
    async def run(self):
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.current_thread()
        self.stopping = threading.Event()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        claimed = self.claimed or claim(self.cfg)
        serial_links, udp_sockets = iter(claimed.serial_links), iter(claimed.udp_sockets)
        for link_cfg in self.cfg.links:
            if link_cfg.type == "serial":
                link = next(serial_links)
                self.serial_links.append(link)
                threading.Thread(target=self._read_serial, args=(link, loop), daemon=True,
                                 name=f"link {link_cfg.port}").start()
            else:
                name = f"udp {link_cfg.host}:{link_cfg.port}"
                await loop.create_datagram_endpoint(lambda n=name: _Udp(self, n), sock=next(udp_sockets))
                self.udp_links.append(name)
        self.http.start()
        self.forwarder.start()
        tasks = [asyncio.create_task(t) for t in (self.commit_loop(), self.disk_guard(), self.downlink_loop(),
                                                  self.status_loop())]
        self.notifier.ready(f"{len(self.cfg.links)} links, http {self.cfg.http.host}:{self.http.port}")
        _log("gateway_started", site=self.cfg.gateway.site, links=len(self.cfg.links), http_port=self.http.port,
             devices=len(self.registry.list()))
        await done.wait()
        _log("gateway_stopping")
        self.notifier.stopping()
        for t in tasks:
            t.cancel()
        self.stopping.set()
        self.sessions.flush()
        await asyncio.to_thread(self.forwarder.stop)
        self.http.close()
        for link in self.serial_links:
            link.close()
        self.registry.close()
        self.store.close()
        return 0
