"""prapa monitor: a live decoder for the link, to see what a board and a gateway say to each other.

Why it is shaped like this:
- It only listens. It never acknowledges or answers, so watching a line
  changes nothing the board keeps (a board's flash log waits for the real
  gateway's ack).
- One stream reader deframes the wire; each frame goes to the protocol's own
  Receiver for the direction its header names, so both directions on a
  shared RS-485 pair are verified and replay-checked separately, and a frame
  is refused for the same reasons, with the same counts, as on the gateway.
- Keys come from the registry or a key file and are used, never shown.

Exit codes: 0 ok (with --count: that many frames decoded), 1 the link failed
or --duration ended before --count frames, 2 bad input.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

from protocol.errors import UsageError
from tools import args as types
from protocol.names import ENUMS, FIELDS, NESTED

STATS_EVERY_S = 10.0
def named(type_name, message):
    """A payload with its field names, enums spelled out and bytes as hex (JSON-safe)."""
    names = FIELDS.get(type_name, {})
    out = {}
    for k, v in message.items():
        name = names.get(k, str(k))
        if name in NESTED and isinstance(v, dict):
            v = {NESTED[name].get(kk, str(kk)): vv for kk, vv in v.items()}
        elif name in ENUMS and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(ENUMS[name]):
            v = ENUMS[name][v]
        out[name] = _plain(v)
    return out


def _plain(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class Decoder:
    """Bytes or datagrams in; for each frame, on_frame(event dict) whether accepted or refused."""

    def __init__(self, key_for, directions, on_frame):
        from protocol import framing, link, secure
        self.framing, self.secure = framing, secure
        self.on_frame = on_frame
        self.directions = directions
        self.receivers = {d: link.Receiver(d, key_for, self._message, accept_any_addr=True, max_devices=4096)
                          for d in (secure.UPLINK, secure.DOWNLINK)}
        self.reader = framing.Reader(self._frame, accept_any=True)
        self.skipped = 0
        self._current = None

    def counts(self):
        """Refusals by reason over both directions and the framing, plus frames accepted."""
        out = dict(self.reader.dropped)
        for r in self.receivers.values():          # their own stream readers are never fed: no double count
            for reason, n in r.counts.items():
                out[reason] = out.get(reason, 0) + n
        return {"accepted": sum(r.accepted for r in self.receivers.values()),
                "rejected": {k: n for k, n in out.items() if n}, "other_direction": self.skipped}

    def feed(self, data):
        before = dict(self.reader.dropped)
        self.reader.feed(data)
        for reason, n in self.reader.dropped.items():
            for _ in range(n - before[reason]):
                self.on_frame({"event": "rejected", "reason": reason, "layer": "framing"})

    def datagram(self, frame):
        self._frame(None, frame, len(frame))

    def _frame(self, addr, buf, n):
        frame = bytes(buf[:n])
        direction = frame[1] & 1 if n > 1 else self.secure.UPLINK
        if direction not in self.directions:
            self.skipped += 1
            return
        receiver = self.receivers[direction]
        before = receiver.counts
        self._current = {"direction": "up" if direction == self.secure.UPLINK else "down", "addr": addr,
                         "bytes": n}
        receiver.datagram(frame)
        if self._current is not None:          # not accepted: find the reason the receiver counted
            after = receiver.counts
            reason = next((r for r in after if after[r] > before[r]), "unknown")
            event = {"event": "rejected", "reason": reason, "layer": "secure", **self._current}
            if n >= self.secure.OVERHEAD:
                _v, _d, device_id, counter, msg_type = self.secure.parse_header(frame, n)
                event.update(device=device_id, counter=counter, msg_type=msg_type, frame=frame.hex())
            self._current = None
            self.on_frame(event)

    def _message(self, device_id, counter, msg_type, message):
        from protocol import messages as M
        name = M.NAMES[msg_type]
        event = {"event": "frame", **self._current, "type": name, "msg_type": msg_type, "device": device_id,
                 "counter": counter, "payload": named(name, message)}
        self._current = None
        self.on_frame(event)


def pretty(event):
    t = time.strftime("%H:%M:%S")
    if event["event"] == "rejected":
        where = f" device {event['device']:#010x} #{event['counter']}" if "device" in event else ""
        return f"{t} {event.get('direction', '--'):4} REJECTED {event['reason']}{where}"
    fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in event["payload"].items())
    return (f"{t} {event['direction']:4} {event['type']:14} device {event['device']:#010x} "
            f"#{event['counter']:<6} {fields}")


def add_parser(sub):
    p = sub.add_parser("monitor", help="live decoder: frames on a link, verified and decrypted",
                       description=__doc__.split("\n\n")[0] + "\n\nReads a serial link (--port) or UDP datagrams "
                       "(--udp HOST:PORT, bound here), verifies and decrypts each frame with the devices' keys "
                       "(--registry, or --key-file with --device-id) and prints every message with its field "
                       "names, plus counts of frames accepted and refused by reason every 10 s and at the end. "
                       "It never answers or acknowledges, and never prints a key.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--port", help="serial port carrying the link (a board's UART, an RS-485 adapter)")
    src.add_argument("--udp", metavar="HOST:PORT", type=types.host_port, help="listen for datagrams on this address")
    p.add_argument("--registry", metavar="PATH", type=types.existing_file,
                   help="the gateway's registry.db: keys of every device")
    p.add_argument("--key-file", metavar="F", type=types.existing_file,
                   help="one device's key: 16 raw bytes or 32 hex digits")
    p.add_argument("--device-id", type=types.device_id, help="the device the --key-file belongs to")
    p.add_argument("--direction", choices=("up", "down", "both"), default="both",
                   help="board->gateway, gateway->board, or both (default; a shared wire)")
    p.add_argument("--count", type=types.count, metavar="N", help="stop after N frames decoded")
    p.add_argument("--duration", type=types.positive_seconds, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per frame (bytes as hex), then a summary")
    p.set_defaults(func=cmd_monitor)


def _key_source(args):
    if args.registry and (args.key_file or args.device_id):
        raise UsageError("--key-file", "given with --registry",
                         "use one: --registry PATH, or --key-file F --device-id N")
    if args.registry:
        if not Path(args.registry).is_file():
            raise UsageError("--registry", f"no registry at {args.registry}",
                             "give the gateway's registry.db (data_dir in gateway.toml)")
        from gateway.registry import Registry
        reg = Registry(args.registry)
        return reg.key_for, reg.close
    if not args.key_file or args.device_id is None:
        raise UsageError("--registry", "no keys given", "pass --registry PATH, or --key-file F with --device-id N")
    device_id = args.device_id
    try:
        raw = Path(args.key_file).read_bytes()
    except OSError as e:
        raise UsageError("--key-file", f"{args.key_file}: {e.strerror}", "give the path of the device's key file")
    key = raw if len(raw) == 16 else None
    if key is None:
        try:
            key = bytes.fromhex(raw.decode().strip())
        except (UnicodeDecodeError, ValueError):
            key = None
    if key is None or len(key) != 16:
        raise UsageError("--key-file", f"{args.key_file} holds no 16-byte key", "give 16 raw bytes or 32 hex digits")
    return (lambda d: key if d == device_id else None), (lambda: None)


def _open_link(args):
    if args.port:
        if not os.path.exists(args.port):
            raise UsageError("--port", f"{args.port}: no such port", "give the link's serial port (ls /dev/tty*)")
        import serial
        try:
            s = serial.Serial(args.port, 115200, timeout=0.1, exclusive=True)     # a second reader steals bytes
        except (serial.SerialException, OSError, ValueError) as e:
            if "lock" in str(e).lower() or "busy" in str(e).lower():
                raise UsageError("--port", f"{args.port} is busy: another program has it open",
                                 "stop it (the gateway: watch its UDP link instead, or stop the service)") from None
            raise UsageError("--port", f"{args.port} cannot be opened ({e})",
                             "check it is a serial port and that you may use it (group dialout)") from None
        return (lambda: s.read(max(1, s.in_waiting))), s.close, False
    host, sep, port = args.udp.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError("--udp", f"{args.udp!r} is not HOST:PORT", "e.g. --udp 0.0.0.0:5683")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host or "0.0.0.0", int(port)))
    except OSError as e:
        sock.close()
        raise UsageError("--udp", f"cannot listen on {args.udp} ({e.strerror})", "pick a free port or address")
    sock.settimeout(0.1)

    def recv():
        try:
            return sock.recv(2048)
        except socket.timeout:
            return None
    return recv, sock.close, True


def cmd_monitor(args):
    from protocol import secure
    key_for, close_keys = _key_source(args)
    read, close_link, datagrams = _open_link(args)
    directions = {"up": (secure.UPLINK,), "down": (secure.DOWNLINK,),
                  "both": (secure.UPLINK, secure.DOWNLINK)}[args.direction]
    decoded = []

    def show(event):
        if event["event"] == "frame":
            decoded.append(1)
        print(json.dumps(event) if args.json else pretty(event), flush=True)

    decoder = Decoder(key_for, directions, show)
    start = last_stats = time.monotonic()
    rc = 0
    print(f"monitoring {args.port or 'udp ' + args.udp} ({args.direction}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        while args.count is None or len(decoded) < args.count:
            now = time.monotonic()
            if args.duration is not None and now - start >= args.duration:
                rc = 1 if args.count is not None else 0
                break
            try:
                data = read()
            except OSError as e:
                print(f"prapa monitor: the link failed ({e})", file=sys.stderr)
                rc = 1
                break
            if data and datagrams:
                decoder.datagram(data)
            while data and not datagrams and (args.count is None or len(decoded) < args.count):
                end = data.find(0) + 1 or len(data)      # frame by frame: --count stops exactly
                decoder.feed(data[:end])
                data = data[end:]
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                _stats(decoder, args.json, "counts")
    except KeyboardInterrupt:
        pass
    finally:
        close_link()
        close_keys()
    _stats(decoder, args.json, "summary")
    return rc


def _stats(decoder, as_json, event):
    c = decoder.counts()
    if as_json:
        print(json.dumps({"event": event, **c}), flush=True)
    else:
        rej = ", ".join(f"{k} {n}" for k, n in sorted(c["rejected"].items())) or "none"
        print(f"-- {c['accepted']} frames decoded; refused: {rej}", flush=True)
