# The receiving end of a link: bytes in, verified messages out, never an
# exception. Framing drops, security refusals and bad payloads are counted by
# reason and the link goes on: the next good frame gets through.
#
# Used by the board (one peer: the gateway, downlink) and by the gateway (many
# boards, uplink). Memory is bounded: one frame buffer, one opener per known
# device (at most max_devices), counters.
from protocol import framing, secure
from protocol import messages as M

# After the tag verifies: a type this side does not know, a payload that is not its message's
# shape (messages.decode), one whose keys break its rule (invalid_<name>, one per message type),
# and a handler that raised (handler_error: a bug on this side, counted, never raised out).
REASONS = framing.Reader.REASONS + secure.REASONS + (
    "unknown_type", "bad_payload", "invalid_hello", "invalid_readings", "invalid_alarm", "invalid_health",
    "invalid_ack", "invalid_time_sync", "invalid_config_push", "invalid_command", "invalid_command_result",
    "handler_error")


class Receiver:
    def __init__(self, direction, key_for, on_message, my_addr=framing.ADDR_GATEWAY, accept_any_addr=False,
                 max_devices=64, window_for=None, on_refused=None):
        """key_for(device_id) -> 16-byte key or None; on_message(device_id, counter, msg_type, message)
        gets only messages that decode and follow their rule, and returns None (accepted) or a reason of
        REASONS it refused the message for (an exception out of it is counted as handler_error);
        window_for(device_id) -> the replay window a restarted receiver resumes from (None: a fresh one);
        on_refused(device_id, reason, error): told of each message refused after its tag verified
        for its type or payload (the gateway logs it; the board only counts).

        Every frame ends as one count: accepted, or refused under one reason."""
        self.direction = direction
        self.key_for = key_for
        self.on_message = on_message
        self.max_devices = max_devices
        self.window_for = window_for
        self.on_refused = on_refused
        self.openers = {}
        self._refused = {r: 0 for r in REASONS}
        self.accepted = 0
        self._plain = bytearray(framing.MAX_FRAME)
        self._reader = framing.Reader(self._on_frame, my_addr, accept_any_addr)

    def feed(self, data, length=-1):
        """Bytes from a UART or RS-485 line."""
        self._reader.feed(data, length)

    @property
    def counts(self):
        """Refusals by reason, framing drops included."""
        out = dict(self._refused)
        for r, n in self._reader.dropped.items():
            out[r] += n
        return out

    def datagram(self, frame):
        """One secure frame from UDP or ESP-NOW."""
        if len(frame) > framing.MAX_FRAME:
            self._refused["too_long"] += 1
            return
        self._on_frame(0, frame, len(frame))

    def _opener(self, device_id):
        op = self.openers.get(device_id)
        if op is None:
            key = self.key_for(device_id)
            if key is None or len(self.openers) >= self.max_devices:
                return None
            op = secure.Opener(key, device_id, self.direction, self.window_for(device_id) if self.window_for else None)
            self.openers[device_id] = op
        return op

    def _on_frame(self, _addr, buf, n):
        try:
            device_id = secure.device_of(buf, n)
        except secure.Reject as r:
            self._refused[r.reason] += 1
            return
        op = self._opener(device_id)
        if op is None:
            self._refused["unknown_device"] += 1
            return
        try:
            msg_type, counter, plen = op.open_into(buf, n, self._plain)
        except secure.Reject as r:
            self._refused[r.reason] += 1
            return
        try:
            message = M.decode(msg_type, bytes(self._plain[:plen]))
        except M.MessageError as e:
            self._refuse_message(device_id, e)
            return
        self._deliver(device_id, counter, msg_type, message)

    def _refuse_message(self, device_id, e):
        """An opened frame whose message broke the profile (a MessageError): counted under its reason,
        and told to on_refused (the gateway logs it once per device and reason)."""
        self._refused[e.reason] += 1
        if self.on_refused is not None:
            self.on_refused(device_id, e.reason, e)

    def _deliver(self, device_id, counter, msg_type, message):
        """Hand a decoded message to on_message and count what it said: accepted, or refused under the
        reason it returned; an exception it raised is its own bug, counted as handler_error."""
        try:
            refused = self.on_message(device_id, counter, msg_type, message)
        except Exception:                   # the handler's bug: counted, the link goes on
            refused = "handler_error"
        if refused:
            self._refused[refused] += 1
        else:
            self.accepted += 1


class Sender:
    """Seals and frames messages for one (key, device, direction)."""

    def __init__(self, key, device_id, direction, counters, addr=framing.ADDR_GATEWAY):
        self.sealer = secure.Sealer(key, device_id, direction, counters)
        self.addr = addr
        self.frame_buf = bytearray(framing.MAX_FRAME)
        self.wire = bytearray(framing.MAX_WIRE)

    def frame(self, msg_type, payload, plen):
        """Seal payload[:plen]; return the secure frame's length (in self.frame_buf)."""
        return self.sealer.seal_into(msg_type, payload, plen, self.frame_buf)

    def wire_into(self, msg_type, payload, plen):
        """Seal and COBS-frame payload[:plen] into self.wire; return the bytes to send."""
        n = self.frame(msg_type, payload, plen)
        return framing.encode_into(self.wire, self.addr, self.frame_buf, n)
