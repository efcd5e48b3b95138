"""protocol/secure.py: authenticated frames, replay refusal, counters that
never repeat across reboots and power cuts."""

import os
import random
import signal
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from protocol import link, secure
from protocol.ccm import TAG_LEN
from hil_tests.support import vm

KEY = bytes(range(16))
DEVICE = 0x0A0B0C0D


def seal(payload, counter, msg_type=3, key=KEY, device=DEVICE, direction=secure.UPLINK):
    out = bytearray(secure.OVERHEAD + len(payload))
    s = secure.Sealer(key, device, direction, secure.MemoryCounters(counter))
    return bytes(out[:s.seal_into(msg_type, payload, len(payload), out)])


def opener():
    return secure.Opener(KEY, DEVICE, secure.UPLINK)


def open_(o, frame):
    out = bytearray(256)
    t, c, n = o.open_into(frame, len(frame), out)
    return t, c, bytes(out[:n])


def test_overhead_is_header_plus_tag():
    assert secure.OVERHEAD == secure.HEADER_LEN + TAG_LEN == 19


def test_frame_opens_and_the_gateway_can_check_it_with_aesccm_alone():
    frame = seal(b"readings", 42)
    assert open_(opener(), frame) == (3, 42, b"readings")
    nonce = bytearray(13)
    secure.nonce_into(nonce, DEVICE, secure.UPLINK, 42)
    header = frame[:secure.HEADER_LEN]
    assert AESCCM(KEY, tag_length=8).decrypt(bytes(nonce), frame[secure.HEADER_LEN:], header) == b"readings"


def test_board_sealed_frame_in_the_vm_is_accepted_by_cpython():
    out = vm.run("from protocol import secure\n"
                 f"s = secure.Sealer({KEY!r}, {DEVICE}, 0, secure.MemoryCounters(7))\n"
                 "out = bytearray(64)\n"
                 "for p in (b'one', b'two'):\n"
                 "    n = s.seal_into(5, p, len(p), out)\n"
                 "    print(bytes(out[:n]).hex())\n")
    o = opener()
    assert [open_(o, bytes.fromhex(h)) for h in out.split()] == [(5, 7, b"one"), (5, 8, b"two")]


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: f[:10], "short"),
    (lambda f: bytes([2]) + f[1:], "version"),
    (lambda f: f[:1] + bytes([1]) + f[2:], "direction"),
    (lambda f: f[:2] + b"\x00\x00\x00\x01" + f[6:], "unknown_device"),
    (lambda f: f[:10] + bytes([9]) + f[11:], "auth"),          # message type is authenticated
    (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "auth"),
])
def test_bad_frames_are_refused_and_counted_by_reason(mutate, reason):
    o = opener()
    with pytest.raises(secure.Reject) as r:
        open_(o, mutate(seal(b"x", 1)))
    assert r.value.reason == reason and o.rejected[reason] == 1
    assert open_(o, seal(b"next", 2))[2] == b"next"             # the next good frame still gets in


def test_replay_old_and_far_future_counters_are_refused():
    o = opener()
    open_(o, seal(b"a", 100))
    for frame, reason in ((seal(b"a", 100), "replay"), (seal(b"a", 100 - secure.WINDOW), "too_old"),
                          (seal(b"a", 100 + secure.MAX_JUMP + 1), "future")):
        with pytest.raises(secure.Reject, match=reason):
            open_(o, frame)
    assert open_(o, seal(b"late", 90))[2] == b"late"              # reordered within the window: fine
    with pytest.raises(secure.Reject, match="replay"):
        open_(o, seal(b"late", 90))


def test_a_forged_frame_does_not_move_the_window():
    o = opener()
    forged = bytearray(seal(b"x", 1000))
    forged[-1] ^= 1
    with pytest.raises(secure.Reject, match="auth"):
        open_(o, bytes(forged))
    assert open_(o, seal(b"ok", 5))[1] == 5


def test_flash_counters_never_repeat_across_power_cuts(tmp_path):
    """SIGKILL a VM sealing frames at random instants, 30 times over one
    counter file: every counter printed is new and each boot starts above the last."""
    rnd = random.Random(1)
    seen = []
    script = ("import os\nos.chdir(%r)\nfrom protocol import secure\n"
              "from frame_counter import FlashCounters\nc = FlashCounters(block=16)\n"
              "while True:\n    print(c.next())\n" % str(tmp_path))
    env = dict(os.environ, MICROPYPATH=vm.micropypath())
    for _ in range(30):
        p = subprocess.Popen([vm.MICROPYTHON, "-c", script], stdout=subprocess.PIPE, env=env)
        time.sleep(rnd.uniform(0.05, 0.4))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        lines = out.decode().split("\n")[:-1]          # the last line may be cut
        boot = [int(x) for x in lines if x.strip().isdigit()]
        if seen and boot:
            assert boot[0] > seen[-1]
        seen.extend(boot)
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert len(seen) > 1000


def test_the_whole_report_path_allocates_nothing_on_the_board():
    """encode (meter batch) + seal (AES-CCM) + COBS frame, 20 reports under heap_lock in the VM;
    the frames are the same bytes the gateway expects."""
    out = vm.run(
        "import micropython\n"
        "from protocol import link, secure\nfrom protocol.roles import meter as meter_spec\n"
        f"s = link.Sender({KEY!r}, {DEVICE}, 0, secure.MemoryCounters(1))\n"
        "buf = bytearray(120)\ndeltas = bytearray([0, 3, 0, 12, 41, 7, 0, 0, 25, 2])\n"
        "def report():\n"
        "    n = meter_spec.encode_readings_into(buf, 0, 7, 120, 900, 900, 1000, 123456, deltas, 10)\n"
        "    return s.wire_into(2, buf, n)\n"
        "def campaign():\n"
        "    micropython.heap_lock()\n"
        "    try:\n"
        "        for _ in range(20):\n"
        "            w = report()\n"
        "        verdict = 'NO_ALLOC'\n"
        "    except MemoryError:\n"
        "        verdict = 'ALLOCATED'\n"
        "    micropython.heap_unlock()\n"
        "    return verdict, w\n"
        "verdict, w = campaign()\n"
        "print(verdict, bytes(s.wire[:w]).hex())\n")
    verdict, wire_hex = out.split()
    assert verdict == "NO_ALLOC"
    got = []
    r = link.Receiver(secure.UPLINK, lambda d: KEY, lambda d, c, t, m: got.append((c, t, m)))
    r.feed(bytes.fromhex(wire_hex))
    assert got and got[0][0] == 20 and got[0][2][6] == [0, 3, 0, 12, 41, 7, 0, 0, 25, 2]
