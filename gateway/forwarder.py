"""The MQTT forwarder: drains the store's pending entries to a broker, QoS 1, and serves replays.

Promise: an entry is marked forwarded only after the broker's PUBACK for the
message that carried it; anything unacknowledged when a connection ends is read
again from the store and re-sent on the next connection (at-least-once, the
same identity every time). The store is the only queue: nothing waits in
memory that is not also pending on disk.

Threading: one thread, "prapa-forwarder", owns a paho client per connection,
drives it through paho's external-loop calls (`socket`, `loop_read`,
`loop_write`, `loop_misc`) in its own `select`, and holds its own SQLite
connection to the store (WAL lets it read and mark while the ingest side
commits). So paho callbacks, publishes and store writes all happen on that
thread and need no locks; the asyncio side only calls `kick()` (a byte on a
socketpair that wakes the select), `stop()`, and reads counters. The fsync of
`mark_forwarded` and a TLS handshake never block the event loop. We drive
paho's loop ourselves rather than `loop_start()` because paho's own thread
reconnects to the same host on its own, and failover must choose the broker.

A new paho client per connection (same client id, persistent session) keeps
paho from re-sending its own in-flight copies on top of ours; the broker keeps
the session, and with it the replay-request subscription, across reconnects.

The gateway's own state (its status, each catchment's suspects) goes out as retained messages: retain()
keeps the newest payload per topic in memory, the thread publishes it (QoS 1, retain) ahead of
the backlog, and publishes every one again on each new connection, so the broker holds the
newest whatever was lost with a connection. These are state, not entries: nothing in the store.
The status (prapa/v1/<site>/gateway/status) is "online" at each connection, "offline" on a clean
stop, and "offline"/"connection_lost" as the connection's last will, which the broker publishes when
the gateway dies without a DISCONNECT (SIGKILL, power, network).

Failover and failback: brokers are tried in their listed order, the next one when a connection fails or
ends. brokers[0] is the preferred one: while connected to any other, the thread probes brokers[0] every
failback_s (a TCP connect, non-blocking, checked once per loop turn, so publishing goes on meanwhile;
only the name lookup, if brokers[0] is a host name, is a blocking call). When it answers, the thread stops
taking new entries, waits a short while for the PUBACKs in flight, DISCONNECTs cleanly (no last will: the
gateway is not offline, it moves; a broker apart from brokers[0], not in one cluster with it, keeps the
"online" it was given) and connects to brokers[0], which gets "online" and the retained state afresh. Whatever was not PUBACKed stays pending in the store and goes again to brokers[0], the same
identity. Replay requests and commands that arrive while it drains are carried over to the next
connection. If brokers[0] then refuses MQTT, the rotation goes on as after any failure; failback_s = 0
turns failback off (the forwarder stays where it is, as before).
"""

import asyncio
import collections
import errno
import logging
import random
import select
import socket
import sqlite3
import ssl
import threading
import time
from functools import partial

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import forward_format as ff
from gateway.logs import log_event
from gateway.store import Store
from protocol.errors import UsageError

log = logging.getLogger("prapa.gateway.forwarder")
UNSUPPORTED_PROTOCOL_VERSION = 0x84
BACKLOG_EVERY_S = 2.0
READ_AHEAD = 2000                # pending entries read from the store at once, per priority (alarms, the rest)
FAILBACK_S = 60.0                # default: how often brokers[0] is probed while connected to another broker
FAILBACK_PROBE_S = 2.0           # a probe's TCP connect gives up after this (or connect_timeout_s if shorter)
FAILBACK_DRAIN_S = 2.0           # before leaving for brokers[0]: wait this long at most for PUBACKs in flight


_log = partial(log_event, log)   # _log(level, event, exc_info=False, **fields): one JSON object per line


class Forwarder:
    """store: a Store (its path is reopened on the forwarder's thread) or a path.
    config: a ForwarderConfig or a dict in the shape of the [forwarder] TOML table.
    failback_s: probe brokers[0] this often (seconds) while connected to another broker, and go back to it
    when it answers; 0: never. A dict config may carry it as "failback_s" instead."""

    def __init__(self, store, config, failback_s=None):
        self.store_path = store.path if isinstance(store, Store) else str(store)
        if not isinstance(config, ff.ForwarderConfig):
            config = dict(config)
            if "failback_s" in config:
                failback_s = config.pop("failback_s")
            config = ff.ForwarderConfig.from_dict(config)
        self.config = config
        self.config.check()
        if failback_s is None:
            failback_s = getattr(config, "failback_s", FAILBACK_S)
        if isinstance(failback_s, bool) or not isinstance(failback_s, (int, float)) or not 0 <= failback_s < 1e9:
            raise UsageError("[forwarder] failback_s", f"{failback_s!r} is not a number of seconds from 0",
                             "give seconds between probes of the first broker, e.g. 60 (0: never fail back)")
        self.failback_s = float(failback_s)
        self.failbacks = 0            # returns to brokers[0] after a probe found it back
        self.published = 0            # messages sent to a broker (replays included)
        self.acked = 0                # messages PUBACKed
        self.forwarded = 0            # entries marked forwarded after a PUBACK
        self.refused = 0              # entries that cannot become a valid message (kept in the store)
        self.replays = 0              # replay requests answered
        self.reconnects = 0
        self.pruned = 0
        self.puback_latency_s = collections.deque(maxlen=10_000)   # publish -> PUBACK, seconds
        self.broker = None            # url of the broker in use
        self.protocol = None          # "5" or "3.1.1" on the current connection
        self.connected = False
        self.backlog = 0              # entries not yet PUBACKed, as of the last count
        self.last_error = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._v311 = set()            # broker indexes that refused MQTT 5
        self._thread = None
        self._refused_ids = set()
        self._inflight, self._inflight_ids, self._window = {}, set(), 1
        self._restart_reading()
        self._refused = False         # the last connection ended with the broker refusing a publish
        self._retained, self._retain_due, self._retain_lock = {}, [], threading.Lock()   # topic -> payload
        self.retained_published = 0   # retained messages sent (PUBACKs counted in acked)
        # Commands from the cloud: on_command(topic, payload) is called on this thread for each message on
        # prapa/v1/<site>/<device>/command (the service takes it from there); publish() sends the results.
        self.on_command = None
        self._outbox, self._asked = collections.deque(), collections.deque()   # (topic, payload); replays
        self._carried = collections.deque()   # requests that came while leaving a broker: served on the next

    # -- the asyncio / service side ---------------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="prapa-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s=10.0):
        """Disconnect cleanly; what is in flight stays pending in the store."""
        self._stopping.set()
        self.kick()
        if self._thread:
            self._thread.join(timeout_s)

    def kick(self):
        """New entries are committed: look now rather than at the next poll. Safe from any thread."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def retain(self, topic, payload, content_type="application/json"):
        """Publish payload (bytes; b"" clears the topic) retained, QoS 1, as soon as the connection has room,
        and again on every new connection. Safe from any thread; a newer payload for a topic replaces
        one not yet sent."""
        with self._retain_lock:
            self._retained[topic] = (bytes(payload), content_type)
            if topic not in self._retain_due:
                self._retain_due.append(topic)
        self.kick()

    def publish(self, topic, payload, content_type="application/json"):
        """Publish payload once, QoS 1, not retained, as soon as the connection has room (a command's
        result). Safe from any thread. Held in memory only: one lost with a connection is not sent again
        (the cloud asks again with the same command id and gets the current state)."""
        self._outbox.append((topic, bytes(payload), content_type))
        self.kick()

    def replay_between(self, device_id, from_t, to_t, on_done):
        """Republish a device's stored entries with wall time from_t..to_t (Unix s), as a replay request
        on MQTT would, then .../replay/done; on_done(count, truncated) on this thread when done."""
        self._asked.append((device_id, {"since_time": from_t, "until_time": to_t}, on_done))
        self.kick()

    async def run(self):
        """An asyncio task for the service: runs until cancelled, then stops the thread off the loop."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.stop)

    def stats(self):
        lat = sorted(self.puback_latency_s)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 6) if lat else None)
        return {"published": self.published, "acked": self.acked, "forwarded": self.forwarded,
                "refused": self.refused, "replays": self.replays, "reconnects": self.reconnects,
                "failbacks": self.failbacks,
                "pruned": self.pruned, "broker": self.broker, "protocol": self.protocol,
                "connected": self.connected, "backlog": self.backlog, "last_error": self.last_error,
                "puback_latency_p50_s": pick(0.5), "puback_latency_p99_s": pick(0.99)}

    # -- the forwarder thread --------------------------------------------------------------------

    def _run(self):
        # Only this connection, which writes nothing but forwarded marks and prunes: a mark lost in a power
        # cut means one resend with the same identity, so it need not pay an fsync per PUBACK turn. The
        # ingest side's commits stay FULL; an unsynced WAL tail can only lose frames after the last fsync.
        store = Store(self.store_path, durable=False)
        self._next_prune = self._next_backlog = 0.0
        try:
            index, attempt = 0, 0
            while not self._stopping.is_set():
                client = self._connect(index)
                if client is not None:
                    failback = self._serve(client, store, index)
                    if self._stopping.is_set():
                        break
                    if not self._refused:     # a broker refusing what we publish backs off as one that is down
                        attempt = 0
                    self.reconnects += 1
                    if failback:              # brokers[0] answered a probe: straight there, no backoff
                        index = 0
                        continue
                index = (index + 1) % len(self.config.brokers)
                ceiling = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** attempt)
                attempt += 1
                self._idle(store, random.uniform(ceiling / 2, ceiling))
        except Exception as e:        # a bug, not a network state: say so once, in one line
            self.last_error = f"forwarder stopped: {type(e).__name__}: {e}"
            _log(logging.ERROR, "forwarder_crashed", error=self.last_error)
            raise
        finally:
            self.connected = False
            store.close()

    def _idle(self, store, wait_s):
        deadline = time.monotonic() + wait_s
        while not self._stopping.is_set():
            self._housekeeping(store)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stopping.wait(min(left, 1.0))

    def _connect(self, index):
        """A connected client on brokers[index], or None with last_error saying why."""
        cfg, broker = self.config, self.config.brokers[index]
        v5 = cfg.protocol == "5" or (cfg.protocol == "auto" and index not in self._v311)
        client_id = broker.client_id or cfg.client_id
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False, reconnect_on_failure=False)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = cfg.connect_timeout_s
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        state = {"connack": None, "props": None, "lost": False, "acks": [], "requests": collections.deque(),
                 "refused": []}
        client.on_connect = lambda _c, _u, _f, rc, props: state.update(connack=rc, props=props)
        client.on_disconnect = lambda *_a: state.__setitem__("lost", True)
        client.on_publish = partial(self._on_puback, state)
        client.on_message = lambda _c, _u, msg: state["requests"].append(msg)
        client.user_data_set(state)
        # The last will: the broker says "offline" for us when this connection dies without a DISCONNECT.
        will_props = None
        if v5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.ContentType = self._content_type
        client.will_set(ff.status_topic(cfg.site), self._status("offline", "connection_lost", None), qos=1,
                        retain=True, properties=will_props)
        where = f"broker {broker.url}"
        try:
            if broker.tls:
                ctx = ssl.create_default_context(cafile=broker.ca_file)
                if broker.cert_file:
                    ctx.load_cert_chain(broker.cert_file, broker.key_file)
                client.tls_set_context(ctx)
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(cfg.session_expiry_s)
                client.connect(broker.host, broker.port, cfg.keepalive_s, clean_start=False, properties=props)
            else:
                client.connect(broker.host, broker.port, cfg.keepalive_s)
        except ssl.SSLCertVerificationError as e:
            ca = broker.ca_file or "the system CAs"
            return self._failed(where, "broker_tls_verify_failed",
                                f"TLS certificate verify failed with CA {ca} ({e.verify_message}); fix: set ca_file "
                                f"to the CA that signed this broker's certificate and check the host name")
        except (OSError, ssl.SSLError, ValueError) as e:
            return self._failed(where, "broker_connect_failed", f"connect failed: {type(e).__name__}: {e}")
        # Small PUBLISHes back to back: without NODELAY, Nagle holds each until the previous one's ACK.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + cfg.connect_timeout_s
        while state["connack"] is None and not state["lost"] and not self._stopping.is_set():
            if time.monotonic() > deadline:
                client.disconnect()
                return self._failed(where, "broker_connect_failed", "no CONNACK in time")
            self._io(client, state, 0.1)
        rc = state["connack"]
        if rc is None:
            client.disconnect()
            return self._failed(where, "broker_connect_failed", "connection closed before CONNACK")
        if rc.is_failure:
            client.disconnect()
            if v5 and cfg.protocol == "auto" and rc.value == UNSUPPORTED_PROTOCOL_VERSION:
                self._v311.add(index)
                _log(logging.WARNING, "broker_protocol_fallback", broker=broker.url, protocol="3.1.1")
                return self._connect(index)
            return self._failed(where, "broker_refused", f"CONNACK refused: {rc}")
        self.broker, self.protocol, self.connected = broker.url, "5" if v5 else "3.1.1", True
        # MQTT 5: the broker says how many unacknowledged QoS 1 messages it takes (Mosquitto: 20); paho does
        # not enforce it, so the window does.
        self._window = min(cfg.max_inflight, getattr(state["props"], "ReceiveMaximum", cfg.max_inflight))
        with self._retain_lock:           # "online", retained: the first thing this connection publishes
            self._retained[ff.status_topic(cfg.site)] = (self._status("online", "connected", time.time()),
                                                         self._content_type)
        client.subscribe(ff.topic(cfg.site, 0, "replay/request").replace("/00000000/", "/+/"), qos=1)
        client.subscribe(ff.command_topic(cfg.site, "+"), qos=1)
        _log(logging.INFO, "broker_connected", broker=broker.url, protocol=self.protocol, client_id=client_id,
             window=self._window)
        return client

    @staticmethod
    def _on_puback(state, _client, _userdata, mid, reason, _props):
        """A PUBACK: an acknowledgement, or (MQTT 5, reason >= 0x80) the broker refusing the message (not
        authorized: the ACL; quota exceeded...), which must not mark its entries sent."""
        if getattr(reason, "is_failure", False):
            state["refused"].append((mid, str(reason)))
        else:
            state["acks"].append((mid, time.monotonic()))

    def _failed(self, where, event, problem):
        self.last_error = f"{where}: {problem}"
        _log(logging.ERROR, event, error=self.last_error)
        return None

    def _io(self, client, state, timeout_s):
        """One turn of paho's network loop, woken early by kick(). Returns True when kicked."""
        sock = client.socket()
        if sock is None:
            state["lost"] = True
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            timeout_s = 0
        readable, writable, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [],
                                              timeout_s)
        kicked = self._wake_r in readable
        if kicked:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            rc = client.loop_read()
        if rc == mqtt.MQTT_ERR_SUCCESS and (writable or client.want_write()):
            rc = client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = client.loop_misc()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            state["lost"] = True
        return kicked

    def _serve(self, client, store, index):
        """Publish, settle PUBACKs and answer replays until the connection ends or stop() is called, or
        (on a broker other than brokers[0]) until a probe finds brokers[0] back: True then."""
        state = client.user_data_get()
        self._inflight, self._inflight_ids = {}, set()   # mid -> (entry ids, publish time); ids in flight
        self._restart_reading()
        self._refused = False
        with self._retain_lock:                           # a new connection: the broker gets every one again
            self._retain_due = list(self._retained)
        state["requests"].extend(self._carried)
        self._carried.clear()
        look, next_look = True, 0.0
        probe, failback = None, False
        probe_at = time.monotonic() + self.failback_s if index != 0 and self.failback_s > 0 else None
        while not self._stopping.is_set() and not state["lost"]:
            self._settle(store, state["acks"])
            if state["refused"]:
                self._refused_by_broker(state, index)
                break
            while state["requests"] and not state["lost"]:
                msg = state["requests"].popleft()
                if msg.topic.endswith("/command"):
                    if self.on_command is not None:
                        self.on_command(msg.topic, msg.payload)
                else:
                    self._replay(client, store, msg)
            while self._asked and not state["lost"]:
                device_id, req, on_done = self._asked.popleft()
                served = self._serve_replay(client, store, device_id, req)
                if served is not None:
                    on_done(*served)
            self._publish_retained(client)
            self._publish_outbox(client)
            now = time.monotonic()
            room = len(self._inflight) < self._window
            if room and (look or now >= next_look):
                look = self._fill(client, store)
                next_look = now + self.config.poll_s
                room = len(self._inflight) < self._window
            self._housekeeping(store)
            if probe_at is not None and now >= probe_at:
                probe, failback = self._probe(probe)
                if failback:
                    break
                if probe is None:
                    probe_at = now + self.failback_s
            kicked = self._io(client, state, 0 if look and room else min(self.config.poll_s, 1.0))
            look = look or kicked or bool(state["acks"])
        if probe is not None:
            probe[0].close()
        url = self.config.brokers[index].url
        if failback and not state["lost"] and not self._stopping.is_set():
            self._fail_back(client, store, state, url)
            return True
        if state["refused"]:
            client.disconnect()                   # publish_refused said why; the next connection sends it again
        elif state["lost"]:
            self.last_error = f"broker {url}: connection lost"
            _log(logging.WARNING, "broker_connection_lost", broker=url, unacked_messages=len(self._inflight),
                 unacked_entries=len(self._inflight_ids))
        else:
            self._settle(store, state["acks"])
            self._say_offline(client, state)
            client.disconnect()
            _log(logging.INFO, "broker_disconnected", broker=url, unacked_entries=len(self._inflight_ids))
        self.connected = False
        return False

    def _probe(self, probe):
        """One step of a non-blocking TCP connect to brokers[0]: (probe, answered). probe is None before the
        first step and after the last; (socket, deadline) while the connect is under way."""
        broker = self.config.brokers[0]
        if probe is None:
            sock = None
            try:
                family, kind, proto, _name, addr = socket.getaddrinfo(broker.host, broker.port,
                                                                      type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                err = sock.connect_ex(addr)
            except OSError as e:
                if sock is not None:
                    sock.close()
                _log(logging.DEBUG, "broker_failback_probe", broker=broker.url, answered=False, error=str(e))
                return None, False
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                sock.close()
                _log(logging.DEBUG, "broker_failback_probe", broker=broker.url, answered=False,
                     error=errno.errorcode.get(err, str(err)))
                return None, False
            return (sock, time.monotonic() + min(FAILBACK_PROBE_S, self.config.connect_timeout_s)), False
        sock, deadline = probe
        try:
            _r, writable, _x = select.select([], [sock], [], 0)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if writable else None
        except OSError as e:
            writable, err = True, e.errno or -1
        if not writable and time.monotonic() < deadline:
            return probe, False
        sock.close()
        answered = err == 0
        if not answered:
            _log(logging.DEBUG, "broker_failback_probe", broker=broker.url, answered=False,
                 error="timed out" if err is None else errno.errorcode.get(err, str(err)))
        return None, answered

    def _fail_back(self, client, store, state, url):
        """brokers[0] is back: settle what is in flight (briefly), keep requests that came meanwhile for the
        next connection, and leave with a DISCONNECT (no last will; the gateway stays online)."""
        deadline = time.monotonic() + min(FAILBACK_DRAIN_S, self.config.connect_timeout_s)
        while self._inflight and not state["lost"] and not self._stopping.is_set() and time.monotonic() < deadline:
            self._io(client, state, 0.05)
            self._settle(store, state["acks"])
        self._settle(store, state["acks"])
        self._carried.extend(state["requests"])
        state["requests"].clear()
        self.failbacks += 1
        _log(logging.INFO, "broker_failback", broker=url, to=self.config.brokers[0].url,
             unacked_entries=len(self._inflight_ids), carried_requests=len(self._carried))
        client.disconnect()
        self.connected = False

    @property
    def _content_type(self):
        return "application/cbor" if self.config.format == "cbor" else "application/json"

    def _status(self, state, reason, since):
        return ff.encode(ff.gateway_status(self.config.site, state, reason, since), self.config.format)

    def _say_offline(self, client, state, wait_s=2.0):
        """A clean stop: "offline" retained in place of "online" (a DISCONNECT discards the last will), and
        a short wait for its PUBACK so the broker has it before we go."""
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = self._content_type
        info = client.publish(ff.status_topic(self.config.site), self._status("offline", "stopped", time.time()),
                              qos=1, retain=True, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return
        deadline = time.monotonic() + wait_s
        while not state["lost"] and time.monotonic() < deadline:
            if any(mid == info.mid for mid, _t in state["acks"]):
                break
            self._io(client, state, 0.05)
        with self._retain_lock:           # the next connection says "online" afresh
            self._retained.pop(ff.status_topic(self.config.site), None)

    def _refused_by_broker(self, state, index):
        """The broker refused a publish: nothing it carried is marked sent; this connection ends and the next
        one (after the usual backoff) sends it again, so a broker that keeps refusing is loud, never lossy."""
        self._refused = True
        mid, reason = state["refused"][0]
        url = self.config.brokers[index].url
        self.last_error = f"broker {url}: refused a publish ({reason}); fix: check its ACL for this gateway's user"
        _log(logging.ERROR, "publish_refused", broker=url, reason=reason, refused=len(state["refused"]),
             unacked_entries=len(self._inflight_ids))
        state["lost"] = True

    def _publish_retained(self, client):
        """Send the retained payloads due, newest of each topic, within the in-flight window."""
        while len(self._inflight) < self._window:
            with self._retain_lock:
                if not self._retain_due:
                    return
                topic = self._retain_due.pop(0)
                payload, content_type = self._retained[topic]
                if not payload:                   # a cleared topic is published once, then forgotten
                    del self._retained[topic]
            props = None
            if self.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType = content_type
            info = client.publish(topic, payload, qos=1, retain=True, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                client.user_data_get()["lost"] = True
                with self._retain_lock:               # sent again on the next connection
                    self._retained.setdefault(topic, (payload, content_type))
                return
            self.published += 1
            self.retained_published += 1
            self._inflight[info.mid] = ((), time.monotonic())

    def _publish_outbox(self, client):
        while self._outbox and len(self._inflight) < self._window:
            topic, payload, content_type = self._outbox.popleft()
            props = None
            if self.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType = content_type
            info = client.publish(topic, payload, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                client.user_data_get()["lost"] = True
                return
            self.published += 1
            self._inflight[info.mid] = ((), time.monotonic())

    def _restart_reading(self):
        """Read pending entries from the start again (a new connection, a prune, a failed mark)."""
        self._ahead = ([], [])        # per priority (0 alarms, 1 the rest): pending rows read, not yet published
        self._read_upto = [0, 0]      # per priority: every pending entry up to this id is in flight, refused or ahead

    def _fill(self, client, store):
        """Publish pending entries (alarms first) up to the in-flight window; True if more may be waiting.

        Rows are read from the store ahead (READ_AHEAD at a time, past a cursor per priority) and kept until
        published: at thousands of devices a message holds one device's rows, so most rows read wait for a
        later slot, and reading them again at each PUBACK was a quarter of the gateway's time. Alarms are
        looked for at every call (an index probe when there are none), so one never waits behind the
        readings held ahead. Each call groups at most room x max_items rows: its cost does not grow with
        what is held."""
        cfg = self.config
        room = self._window - len(self._inflight)
        fetch = min(room * cfg.max_items, 5000)
        full = False
        for priority, ahead in enumerate(self._ahead):
            if len(ahead) < fetch:
                read = store.pending(limit=max(fetch, READ_AHEAD), after_id=self._read_upto[priority],
                                     priority=priority)
                if read:
                    self._read_upto[priority] = read[-1][0]
                    full = full or len(read) == max(fetch, READ_AHEAD)
                ahead.extend(r for r in read if r[0] not in self._inflight_ids and r[0] not in self._refused_ids)
        alarms, rest = self._ahead
        head = alarms[:fetch] + rest[:max(0, fetch - len(alarms))]
        try:
            for run in ff.group(self._acceptable(head), cfg.max_items, cfg.max_payload_bytes, cfg.site, room):
                if len(self._inflight) >= self._window:
                    return True
                for part, payload in ff.message(cfg.site, run, cfg.format, cfg.max_payload_bytes):
                    if payload is None:
                        self._refuse(part[0], f"one entry makes a message over {cfg.max_payload_bytes} bytes")
                        continue
                    ids = [r[0] for r in part]
                    if not self._publish(client, ff.topic(cfg.site, part[0][1], part[0][4]), payload, part, ids):
                        return False
            return full or bool(alarms or rest) or len(self._inflight) >= self._window
        finally:
            self._drop_sent(min(len(alarms), fetch), min(len(rest), max(0, fetch - len(alarms))))

    def _drop_sent(self, n_alarms, n_rest):
        """Take the rows now in flight or refused out of the first n of each priority's rows held ahead."""
        gone = self._inflight_ids, self._refused_ids
        for ahead, n in zip(self._ahead, (n_alarms, n_rest)):
            if n:
                ahead[:n] = [r for r in ahead[:n] if r[0] not in gone[0] and r[0] not in gone[1]]

    def _acceptable(self, rows):
        for row in rows:
            if ff.kind_ok(row[4]):
                yield row
            else:
                self._refuse(row, f"kind {row[4]!r} cannot be a topic level (a-z, 0-9, '_', '-', "
                                  f"at most {ff.KIND_MAX_BYTES} bytes)")

    def _refuse(self, row, problem):
        """Kept in the store, unforwarded, for a fixed gateway to send; counted and said once."""
        self._refused_ids.add(row[0])
        self.refused += 1
        _log(logging.ERROR, "entry_refused", device=ff.device_hex(row[1]), boot=row[2], seq=row[3], problem=problem)

    def _publish(self, client, topic, payload, rows, ids=(), replay=False):
        """QoS 1 publish tracked in the window; `ids` are the entries its PUBACK marks forwarded."""
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ff.identity_properties(rows) + ([("replay", "true")] if replay else [])
            props.ContentType = "application/cbor" if self.config.format == "cbor" else "application/json"
        info = client.publish(topic, payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            client.user_data_get()["lost"] = True
            return False
        self.published += 1
        self._inflight[info.mid] = (ids, time.monotonic())
        self._inflight_ids.update(ids)
        return True

    def _settle(self, store, acks):
        """Mark the entries of PUBACKed messages forwarded, in one transaction per turn."""
        if not acks:
            return
        ids = []
        for mid, t_ack in acks:
            sent = self._inflight.pop(mid, None)
            if sent is not None:
                self.acked += 1
                ids.extend(sent[0])
                self.puback_latency_s.append(t_ack - sent[1])
        acks.clear()
        if not ids:
            return
        try:
            store.mark_forwarded(ids)
            self.forwarded += len(ids)
        except sqlite3.Error as e:        # left pending: sent again later, same identity
            self.last_error = f"store {self.store_path}: mark_forwarded failed: {e}"
            _log(logging.ERROR, "store_mark_failed", error=self.last_error, entries=len(ids))
            self._inflight_ids.difference_update(ids)
            self._restart_reading()         # they are pending again, below the read cursors
            return
        self._inflight_ids.difference_update(ids)

    def _wait_for_room(self, client, store):
        """A replay can be larger than the window: turn the network loop until a slot frees."""
        state = client.user_data_get()
        while len(self._inflight) >= self._window and not state["lost"] and not self._stopping.is_set():
            self._io(client, state, 0.1)
            self._settle(store, state["acks"])
        return not state["lost"] and not self._stopping.is_set()

    def _replay(self, client, store, msg):
        """Answer prapa/v1/<site>/<device>/replay/request by republishing stored entries, then .../replay/done."""
        cfg, parts = self.config, msg.topic.split("/")
        try:
            if len(parts[3]) != 8:
                raise ValueError(f"device {parts[3]!r} is not 8 hex digits")
            device_id = int(parts[3], 16)
            req = ff.decode_request(msg.payload)
            if "since_time" not in req and not ("since_boot" in req and "since_seq" in req):
                raise ValueError("give since_boot and since_seq, or since_time (and until_time)")
            if "since_time" in req:
                float(req["since_time"])
                float(req.get("until_time", "inf"))
            else:
                int(req["since_boot"]), int(req["since_seq"])
        except (ValueError, TypeError, IndexError) as e:
            _log(logging.WARNING, "replay_request_refused", topic=msg.topic, problem=str(e))
            if len(parts) > 3 and len(parts[3]) == 8 and all(c in "0123456789abcdef" for c in parts[3]):
                done = {"v": 1, "site": cfg.site, "device": parts[3], "count": 0, "error": str(e)}
                if self._wait_for_room(client, store):
                    self._publish(client, ff.topic(cfg.site, int(parts[3], 16), "replay/done"),
                                  ff.encode(done, cfg.format), [(0, int(parts[3], 16), 0, 0)])
            return
        self._serve_replay(client, store, device_id, req)

    def _serve_replay(self, client, store, device_id, req):
        """Republish what req asks for (since_boot + since_seq, or since_time with an optional until_time),
        then .../replay/done; (count, truncated), or None when the connection went first."""
        cfg = self.config
        limit = cfg.replay_max_entries + 1
        if "since_time" in req:
            until = req.get("until_time")
            rows = store.since_time(device_id, float(req["since_time"]), limit=limit,
                                    until=None if until is None else float(until))
        else:
            rows = store.since(device_id, int(req["since_boot"]), int(req["since_seq"]))[:limit]
        truncated = len(rows) > cfg.replay_max_entries
        rows = rows[:cfg.replay_max_entries]
        for run in ff.group([r for r in rows if ff.kind_ok(r[4])], cfg.max_items, cfg.max_payload_bytes, cfg.site):
            for part, payload in ff.message(cfg.site, run, cfg.format, cfg.max_payload_bytes, replay=True):
                if payload is None:
                    continue
                if not self._wait_for_room(client, store):
                    return None           # the cloud asks again: no replay/done was sent
                self._publish(client, ff.topic(cfg.site, device_id, part[0][4]), payload, part, replay=True)
        done = {"v": 1, "site": cfg.site, "device": ff.device_hex(device_id), "count": len(rows),
                "truncated": truncated, "request": req}
        if truncated:
            done["next"] = {"since_boot": rows[-1][2], "since_seq": rows[-1][3]}
        if not self._wait_for_room(client, store):
            return None
        self._publish(client, ff.topic(cfg.site, device_id, "replay/done"), ff.encode(done, cfg.format),
                      rows or [(0, device_id, 0, 0)])
        self.replays += 1
        _log(logging.INFO, "replay_served", device=ff.device_hex(device_id), count=len(rows), truncated=truncated)
        return len(rows), truncated

    def _housekeeping(self, store):
        now = time.monotonic()
        if now >= self._next_backlog:
            self._next_backlog = now + BACKLOG_EVERY_S
            self.backlog = store.count(forwarded=False)
        if now >= self._next_prune:
            self._next_prune = now + self.config.prune_every_s
            try:
                n = store.prune(self.config.retention_s)
            except sqlite3.Error as e:
                _log(logging.ERROR, "store_prune_failed", error=str(e))
                return
            self.pruned += n
            if n:
                self._restart_reading()     # SQLite may hand a deleted top id to the next entry; read afresh
                _log(logging.INFO, "store_pruned", entries=n, retention_s=self.config.retention_s)
