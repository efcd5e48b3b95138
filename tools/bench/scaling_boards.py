"""The boards of `prapa bench scaling`: every simulated meter in one process, speaking to the gateway over UDP.

Run by tools/bench/scaling.py as a child process (`python -c "... boards_main()"`), so the load it makes is
not paid by the process that measures; keys come on stdin, never on a command line. Each device seals with
its own key and counters (cryptography's AESCCM on protocol/secure.py's wire), keeps at most its share of a
window of frames in flight, resends a frame its ack did not cover within the board's ACK_TIMEOUT_S, and
accepts a downlink frame only when its tag verifies and its counter is new.
"""

import collections
import json
import math
import resource
import select
import socket
import struct
import sys
import time

from protocol import messages as M
from protocol import secure
from tools.bench.scaling import ROWS, _pct_ms

UPLINK, DOWNLINK = secure.UPLINK, secure.DOWNLINK
HELLO, READINGS, ACK, TIME_SYNC = M.HELLO, M.READINGS, M.ACK, M.TIME_SYNC

ACK_TIMEOUT_S = 1.5              # the board's (firmware/uplink.py ACK_TIMEOUT_MS)
HELLO_SLOT_S = 0.2               # a hello is answered at once (no commit): it holds a window slot this long
HELLO_QUIET_S = 1.0              # a round of hellos ends when no answer came for this long
HELLO_ROUNDS = 3                 # a device unanswered after this many rounds: the gateway refuses it
HEADER = struct.Struct(">BBIIB")     # protocol/secure.py: version, flags (direction), device, counter, type
NONCE = struct.Struct(">IBII")       # device, direction, 0, counter


class Frame:
    __slots__ = ("device", "msg_type", "payload", "seq_last", "first_sent", "deadline", "tries", "done")

    def __init__(self, device, msg_type, payload, seq_last):
        self.device, self.msg_type, self.payload, self.seq_last = device, msg_type, payload, seq_last
        self.first_sent = self.deadline = None
        self.tries = 0
        self.done = False


class Boards:
    """Every simulated meter in one process, on one UDP socket (the gateway answers each datagram's source).

    Each device seals with its own key and counter (cryptography's AESCCM, the wire of protocol/secure.py),
    keeps its frames in flight until an ack covers their last seq, resends one after ACK_TIMEOUT_S with a
    new counter, and accepts a downlink frame only if its tag verifies and its counter is new."""

    def __init__(self, keys, port, window):
        from cryptography.hazmat.primitives.ciphers.aead import AESCCM
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.setblocking(False)
        self.window = window
        self.aead = {d: AESCCM(k, tag_length=8) for d, k in keys.items()}
        self.counter = dict.fromkeys(keys, 0)
        self.down_top = dict.fromkeys(keys, -1)
        self.next_seq = dict.fromkeys(keys, 1)
        self.inflight = {d: collections.deque() for d in keys}
        self.timers = collections.deque()            # frames by deadline (one timeout: send order)
        self.in_flight = 0
        self.resends = self.acks_refused = 0
        self.rtts = []
        self.answered = set()

    def seal(self, device, msg_type, payload):
        counter = self.counter[device]
        self.counter[device] = counter + 1
        header = HEADER.pack(1, UPLINK, device, counter, msg_type)
        return header + self.aead[device].encrypt(NONCE.pack(device, UPLINK, 0, counter), payload, header)

    def _sendto(self, wire):
        while True:
            try:
                return self.sock.sendto(wire, self.addr)
            except BlockingIOError:
                select.select([], [self.sock], [], 0.01)

    def send(self, frame, now):
        self._sendto(self.seal(frame.device, frame.msg_type, frame.payload))
        if frame.first_sent is None:
            frame.first_sent = now
            self.inflight[frame.device].append(frame)
            self.in_flight += 1
        frame.tries += 1
        frame.deadline = now + ACK_TIMEOUT_S
        self.timers.append((frame.deadline, frame))

    def _done(self, frame, now):
        frame.done = True
        self.in_flight -= 1
        self.rtts.append(now - frame.first_sent)

    def receive(self, now):
        """Take every downlink waiting: acks retire frames, a time sync answers a hello."""
        import cbor2
        from cryptography.exceptions import InvalidTag
        while True:
            try:
                data = self.sock.recv(512)
            except BlockingIOError:
                return
            try:
                _v, flags, device, counter, msg_type = HEADER.unpack_from(data)
                if flags & 1 != DOWNLINK or device not in self.aead or counter <= self.down_top[device]:
                    raise ValueError("not ours, or a replay")
                plain = self.aead[device].decrypt(NONCE.pack(device, DOWNLINK, 0, counter), data[11:], data[:11])
                m = cbor2.loads(plain)
            except (struct.error, ValueError, InvalidTag, cbor2.CBORDecodeError):
                self.acks_refused += 1
                continue
            self.down_top[device] = counter
            q = self.inflight[device]
            if msg_type == ACK:
                while q and q[0].seq_last is not None and q[0].seq_last <= m[1]:
                    self._done(q.popleft(), now)
            elif msg_type == TIME_SYNC:
                self.answered.add(device)

    def resend_due(self, now):
        while self.timers and self.timers[0][0] <= now:
            deadline, frame = self.timers.popleft()
            if frame.done or frame.deadline != deadline:
                continue
            self.resends += 1
            self.send(frame, now)

    def wait(self, timeout):
        select.select([self.sock], [], [], max(0.0, timeout))

    def readings_frame(self, device):
        import cbor2
        from protocol import messages as M
        seq = self.next_seq[device]
        self.next_seq[device] = seq + ROWS
        msg = M.readings(1, seq, 900 * seq, 900, 0, M.units("L", 0, 1000), [(seq + k) % 7 for k in range(ROWS)],
                         1000 + 3 * seq, 1_795_000_000 + 900 * seq)
        return Frame(device, READINGS, cbor2.dumps(msg, canonical=True), seq + ROWS - 1)

    def hello_phase(self):
        """Every device says hello until the gateway answers (a time sync) or HELLO_ROUNDS rounds went
        unanswered (a device the gateway refuses). A hello holds a window slot for HELLO_SLOT_S only, so
        refused devices cost the run little; an answer counts whenever it comes."""
        import cbor2
        from protocol import messages as M
        t0 = time.perf_counter()
        for round_ in range(HELLO_ROUNDS):
            todo = collections.deque(d for d in self.aead if d not in self.answered)
            if not todo:
                break
            self.resends += len(todo) if round_ else 0
            slots = collections.deque()
            last = time.perf_counter()
            while todo or (time.perf_counter() - last < HELLO_QUIET_S and len(self.answered) < len(self.aead)):
                now = time.perf_counter()
                before = len(self.answered)
                self.receive(now)
                if len(self.answered) > before:
                    last = now
                while slots and now - slots[0] >= HELLO_SLOT_S:
                    slots.popleft()
                while todo and len(slots) < self.window:
                    d = todo.popleft()
                    hello = M.hello(1, "bench", "esp32-devkitc", 0, bytes(8), True, 0, 5)
                    self._sendto(self.seal(d, HELLO, cbor2.dumps(hello, canonical=True)))
                    slots.append(now)
                    last = now
                self.wait(0.01)
        return {"answered": len(self.answered), "seconds": round(time.perf_counter() - t0, 2),
                "resends": self.resends}

    def readings_phase(self, frames_per_device=None, readings=None, rate=None):
        """Flat out (frames_per_device each) or paced (readings at rate readings/s, round robin); returns
        the phase's figures and every device's readings sent so far."""
        self.resends, self.acks_refused, self.rtts = 0, 0, []
        devices = sorted(self.answered)
        cap = max(1, math.ceil(self.window / max(1, len(devices))))     # a device's share of the window
        left = {d: frames_per_device for d in devices} if frames_per_device else {}
        frames_to_send = frames_per_device * len(devices) if frames_per_device else math.ceil(readings / ROWS)
        ready = collections.deque(devices)
        gap = ROWS / rate if rate else 0.0
        cpu0 = _own_cpu_s()
        t_first = time.time()
        t0 = next_at = time.perf_counter()
        sent = 0
        while sent < frames_to_send or self.in_flight:
            now = time.perf_counter()
            self.receive(now)
            self.resend_due(now)
            while sent < frames_to_send and self.in_flight < self.window and (not gap or now >= next_at):
                d = ready.popleft() if ready else None
                if d is None:
                    break
                if len(self.inflight[d]) >= cap or (left and not left[d]):
                    ready.append(d)
                    if all(len(self.inflight[x]) >= cap for x in ready):
                        break
                    continue
                self.send(self.readings_frame(d), now)
                sent += 1
                next_at += gap
                if left:
                    left[d] -= 1
                if not left or left[d]:
                    ready.append(d)
            until = (next_at - now) if gap and sent < frames_to_send else 0.005
            self.wait(min(until, 0.005) if self.in_flight < self.window else 0.005)
        elapsed = time.perf_counter() - t0
        n = sent * ROWS
        return {"t_first_send": t_first, "frames": sent, "readings_per_s": round(n / elapsed),
                "resends": self.resends, "acks_refused": self.acks_refused,
                "rtt_ms_p50": _pct_ms(self.rtts, 0.5), "rtt_ms_p99": _pct_ms(self.rtts, 0.99),
                "cpu_share": round((_own_cpu_s() - cpu0) / elapsed, 2),
                "sent": {str(d): self.next_seq[d] - 1 for d in devices}}


def _own_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def boards_main():
    """The generator process: a job line on stdin (keys in hex: never on a command line), then one
    command line per phase, each answered with one JSON line on stdout."""
    job = json.loads(sys.stdin.readline())
    boards = Boards({int(d): bytes.fromhex(k) for d, k in job["keys"].items()}, job["port"], job["window"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["phase"] == "hello":
            out = boards.hello_phase()
        elif cmd["phase"] == "flat":
            out = boards.readings_phase(frames_per_device=cmd["frames_per_device"])
        else:
            out = boards.readings_phase(readings=cmd["readings"], rate=cmd["rate"])
        print(json.dumps(out), flush=True)
