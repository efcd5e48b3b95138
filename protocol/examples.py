"""One example of every message, as the spec shows them and the tests check them."""

from protocol import messages as M
from protocol import roles

KEY = bytes(range(16))
DEVICE_ID = 0x00001001

EXAMPLES = [
    (M.HELLO, M.hello(7, "0.1.0", "esp32-devkitc", roles.code("meter"), bytes.fromhex("5e2a9c01d4f3b7a8"), False, 0)),
    (M.READINGS, M.readings(7, 120, 900, 900, roles.code("meter"), M.units("L", 0, 1000),
                            [3, 0, 0, 12, 41, 7, 0, 0, 25, 2], register=123456)),
    (M.READINGS, M.readings(3, 10, 900, 900, roles.code("doser"), M.units("stroke", 0),
                            [[225, 11250, 1250, 480, 521, 562, 900, 0, 0, 0, 2000],
                             [0, 0, 0, 65535, 65535, 65535, 0, 0, 900, 17, 2000]], register=40211)),
    (M.READINGS, M.readings(5, 44, 300, 300, roles.code("drain"), M.units("mm", 0), [[420, 0, 12, 3710, 0, 0, 1200, 1000, 5], [455, 3600, 20, 3708, 0, 0, 1200, 1000, 5]],
                            wall_t0=1795466400)),
    (M.ALARM, M.alarm(7, 131, 86400, 1, True, 24)),
    (M.HEALTH, M.health(7, 3600, 61234, 58012, 9, 0, 130, 128, 2, 12, 41)),
    (M.ACK, M.ack(7, 129)),
    (M.TIME_SYNC, M.time_sync(1795466400123, 3600)),
    (M.CONFIG_PUSH, M.config_push(4, {"interval_min": 15, "k_factor_l": 1})),
    (M.COMMAND, M.command(11, "checkpoint", {})),
    (M.COMMAND_RESULT, M.command_result(11, True, "")),
]


def sealed_examples():
    """[(name, msg_type, payload bytes, secure frame bytes)] with counters 1, 2, ..."""
    from protocol import cbor, secure
    sealer = secure.Sealer(KEY, DEVICE_ID, secure.UPLINK, secure.MemoryCounters(1))
    out = []
    for msg_type, message in EXAMPLES:
        payload = cbor.encode(message)
        buf = bytearray(secure.OVERHEAD + len(payload))
        n = sealer.seal_into(msg_type, payload, len(payload), buf)
        out.append((M.NAMES[msg_type], msg_type, payload, bytes(buf[:n])))
    return out


def spec_blocks():
    """The example blocks of SPEC.md, as markdown (python -m protocol.examples)."""
    lines = []
    for name, _t, payload, frame in sealed_examples():
        lines += [f"Example `{name}` (payload, then the sealed frame):", "", "```hex", payload.hex(), "```",
                  "", "```frame", frame.hex(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(spec_blocks())
