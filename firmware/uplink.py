# The board's side of the link to the gateway: sends its flash log in order,
# deletes only what the gateway acknowledges, takes wall time, config pushes
# and commands from it.
#
# Why it looks like this:
# - It is an asyncio task polling a non-blocking UART (COBS frames with an
#   address and CRC) or UDP socket (one bare frame a datagram, over Wi-Fi on an
#   ESP32): the sampling timer never waits for it, and a dead line only costs retries.
# - One batch is in flight at a time; the gateway's ack (boot, seq) moves the
#   log's cursor and the next batch goes at once. Without an ack the batch is
#   resent after a backoff that doubles to BACKOFF_MAX_MS (real time: the
#   gateway answers in real time even when a virtual board runs fast). Any
#   downlink frame means the gateway is back, and the backoff resets.
# - Alarms are sent the moment they are logged, ahead of any backlog, and
#   again in their turn until acknowledged.
# - Frame counters come from FlashCounters: never reused across power cuts.
import asyncio

from micropython import const

import persist
from flashlog import F_WALL, K_ALARM, Record
from frame_counter import FlashCounters
from protocol import cbor, link, secure
from protocol import messages as M

MAX_BATCH = const(32)
DOWNLINK_FLOOR = "dl_floor"      # the highest downlink counter acted on, for the next boot's window
ACK_TIMEOUT_MS = const(1500)
BACKOFF_MAX_MS = const(15000)
IDLE_MS = const(200)             # nothing to send: look at the log again after this
_PAYLOAD_MAX = const(231)        # 250-byte frame minus header and tag


class Uplink:
    def __init__(self, rt, device_id, key, addr, transport, datagrams=False):
        """transport: the HAL's uart() (a byte stream, COBS frames) or udp() (one bare frame a datagram)."""
        self.rt = rt
        self.hal = rt.hal
        self.device_id = device_id
        self.uart = transport
        self.datagrams = datagrams
        self.addr = addr
        self.sender = link.Sender(key, device_id, secure.UPLINK, FlashCounters())
        self._key = key
        self.receiver = link.Receiver(secure.DOWNLINK, self._key_for, self._on_message, my_addr=addr,
                                      window_for=self._window_from_flash)
        self.payload = bytearray(_PAYLOAD_MAX)
        # A batch is read as raw records and walked with two Record objects: 32 decoded Records would
        # hold 3 KiB of the board's heap (an instance's attributes are a dict on MicroPython).
        self.batch = bytearray(rt.log.rec * MAX_BATCH)
        self.values = [0] * MAX_BATCH  # the batch's values, for the role's encode_batch
        self.first = Record()
        self.prev = Record()
        self.cur = Record()
        self.rx = bytearray(64)
        self.dgram = bytearray(256) if datagrams else None
        self.sent = 0
        self.received = 0
        self.retries = 0
        self.synced = False
        self.backoff_ms = ACK_TIMEOUT_MS
        self.next_try = rt.hal.link_ticks_ms()
        self.waiting = False          # a batch is out, its ack not yet in
        self.pending_reset = False

    # -- receive ---------------------------------------------------------------------
    def _key_for(self, device_id):
        return self._key if device_id == self.device_id else None

    def _window_from_flash(self, _device_id):
        """A reboot must not reopen the door to downlink frames already acted on: start above the floor."""
        w = secure.ReplayWindow(persist.read_int(DOWNLINK_FLOOR, -1))
        if w.top >= 0:
            w.bits = (1 << secure.WINDOW) - 1         # everything at or below the floor counts as seen
        return w

    def rejected(self):
        return sum(self.receiver.counts.values())

    def poll(self):
        if self.datagrams:
            n = self.uart.recv_into(self.dgram)
            while n:
                self.receiver.datagram(memoryview(self.dgram)[:n])
                n = self.uart.recv_into(self.dgram)
            return
        n = self.uart.readinto(self.rx)
        while n:
            self.receiver.feed(self.rx, n)
            n = self.uart.readinto(self.rx)

    def _on_message(self, _device, counter, msg_type, m):
        """The receiver's handler: m follows its message's rule (messages.decode checked every key's
        type and range; a bad message was counted there and never gets here). Returns None, or
        "handler_error" when acting on it raised: a fault, counted in health, and a request answered
        as refused (the gateway never retries a refusal)."""
        self.received += 1
        self.backoff_ms = ACK_TIMEOUT_MS          # the gateway is there
        rt = self.rt
        try:
            if msg_type in (M.TIME_SYNC, M.CONFIG_PUSH, M.COMMAND):
                # These change the board; a replay after a reboot could set an old time or config. Their
                # counter is kept as the floor first (a few writes a day). Acks need not: an old ack only
                # deletes what was acknowledged already.
                persist.write_int(DOWNLINK_FLOOR, counter)
            if msg_type == M.ACK:
                rt.log.ack(m[0], m[1])
                self.waiting = False
                self.next_try = self.hal.link_ticks_ms()       # the next batch goes at once
            elif msg_type == M.TIME_SYNC:
                rt.on_time_sync(m[0])
                if not self.synced:
                    self.synced = True
                    self.next_try = self.hal.link_ticks_ms()    # the backlog goes now, not a backoff later
            elif msg_type == M.CONFIG_PUSH:
                ok, detail = rt.apply_config(m[1])
                self.send_dict(M.COMMAND_RESULT, M.command_result(m[0], ok, detail))
            elif msg_type == M.COMMAND:
                ok, detail = rt.command(m[1], m[2])
                self.send_dict(M.COMMAND_RESULT, M.command_result(m[0], ok, detail))
        except Exception as e:                    # a failure is a state: count it, answer, go on
            what = "%s: %r" % (M.NAMES[msg_type], e)
            rt.fault("downlink " + what)
            if msg_type == M.CONFIG_PUSH or msg_type == M.COMMAND:
                self.send_dict(M.COMMAND_RESULT, M.command_result(m[0], False, what[:80]))
            return "handler_error"

    # -- send --------------------------------------------------------------------------
    def _send(self, msg_type, plen):
        try:
            if self.datagrams:
                n = self.sender.frame(msg_type, self.payload, plen)
                self.uart.send(memoryview(self.sender.frame_buf)[:n])
            else:
                n = self.sender.wire_into(msg_type, self.payload, plen)
                self.uart.write(memoryview(self.sender.wire)[:n])
        except OverflowError:
            self.rt.fault("frame counter exhausted")
            return
        self.sent += 1

    def send_dict(self, msg_type, message):
        data = cbor.encode(message)
        self.payload[:len(data)] = data
        self._send(msg_type, len(data))

    def hello(self):
        rt = self.rt
        self.send_dict(M.HELLO, M.hello(rt.boot_id, rt.FW_VERSION, rt.board["name"], rt.role_index(),
                                        rt.config_hash, self.synced, rt.reset_cause_index(), rt.up_s,
                                        self.addr))

    def kick(self):
        """A record was logged: with no batch out and the gateway there, it goes at the next poll, not
        after IDLE_MS (a sleeping board's wake is as short as its link makes it)."""
        if not self.waiting and self.synced:
            self.next_try = self.hal.link_ticks_ms()

    def send_alarm(self, r):
        self.send_dict(M.ALARM, M.alarm(r.boot, r.seq, r.t_end, r.count, r.value, r.reg))

    def _wall_t0(self, r):
        if r.flags & F_WALL:
            return r.wall_boot + r.t_end
        rt = self.rt
        if r.boot == rt.boot_id and rt.wall_boot >= 0:
            return rt.wall_boot + r.t_end
        return -1

    def _send_batch(self):
        """Send the oldest unacknowledged records as one frame; False when the log is empty."""
        raw = self.batch
        size = self.rt.log.rec
        n = self.rt.log.read_unacked(raw, MAX_BATCH)
        if n == 0:
            return False
        first, a, b, values = self.first, self.prev, self.cur, self.values
        first.unpack(raw, 0)
        if first.kind == K_ALARM:
            self.send_alarm(first)
            return True
        values[0] = first.value
        a.unpack(raw, 0)
        k = 1
        while k < n:
            b.unpack(raw, k * size)
            if (b.kind != first.kind or b.boot != first.boot or b.span != first.span or b.count != first.count
                    or b.flags != first.flags or b.wall_boot != first.wall_boot or b.seq != a.seq + a.count
                    or b.t_end != a.t_end + a.span):
                break
            values[k] = b.value
            a, b = b, a
            k += 1
        wall_t0 = self._wall_t0(first)
        while True:
            try:
                plen = self.rt.role.encode_batch(self.payload, 0, first, values, k, wall_t0, raw, size)
                break
            except IndexError:          # too many rows for one frame: halve
                k = (k + 1) // 2
        self._send(M.READINGS, plen)
        return True

    async def run(self):
        hal = self.hal
        self.hello()
        while True:
            self.poll()
            now = hal.link_ticks_ms()
            if hal.ticks_diff(now, self.next_try) >= 0:
                if self.waiting:
                    self.retries += 1
                    self.backoff_ms = min(self.backoff_ms * 2, BACKOFF_MAX_MS)
                if not self.synced:
                    self.hello()
                self.waiting = self.rt.role is not None and self._send_batch()
                wait = self.backoff_ms if self.waiting or not self.synced else IDLE_MS
                self.next_try = hal.ticks_add(now, wait)
            await asyncio.sleep_ms(5)
