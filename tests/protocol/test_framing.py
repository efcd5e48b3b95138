"""protocol/framing.py: COBS + CRC-16 frames that survive a noisy RS-485 line."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import framing
from hil_tests.support import vm

frames = st.binary(min_size=1, max_size=framing.MAX_FRAME)


def wire(frame, addr=0):
    out = bytearray(framing.MAX_WIRE)
    return bytes(out[:framing.encode_into(out, addr, frame, len(frame))])


def reader(my_addr=0, accept_any=False):
    got = []
    r = framing.Reader(lambda a, b, n: got.append((a, bytes(b[:n]))), my_addr, accept_any)
    return r, got


@settings(max_examples=300, deadline=None)
@given(frames, st.integers(0, 255))
def test_frame_round_trips_and_has_no_zero_inside(frame, addr):
    w = wire(frame, addr)
    assert w[-1] == 0 and 0 not in w[:-1] and len(w) <= framing.MAX_WIRE
    r, got = reader(accept_any=True)
    r.feed(w)
    assert got == [(addr, frame)]


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, min_size=1, max_size=6), st.binary(max_size=300), st.integers(0, 10_000))
def test_good_frames_after_garbage_noise_and_half_frames_all_arrive(good, garbage, seed):
    rnd = random.Random(seed)
    stream = bytearray(garbage)
    for f in good:
        w = wire(f)
        if rnd.random() < 0.3:                       # a half frame cut by a reset, before the good one
            stream += w[: rnd.randint(1, len(w) - 2)]   # strictly less than the whole frame
        if rnd.random() < 0.3:                       # a frame hit by line noise
            hit = bytearray(w)
            i = rnd.randrange(len(hit) - 1)
            hit[i] ^= 1 << rnd.randrange(8)
            if hit[i] == 0:                          # a 0x00 would just split it: make it another byte
                hit[i] = 0x02 if w[i] == 0x01 else 0x01
            stream += hit
        stream += b"\x00" + w
    r, got = reader()
    for i in range(0, len(stream), 7):               # bytes arrive in dribs, as from a UART
        r.feed(stream[i:i + 7])
    assert [f for _a, f in got][-len(good):] == good


def test_rs485_drop_takes_its_own_and_broadcast_frames_only():
    r, got = reader(my_addr=7)
    r.feed(wire(b"to-7", 7) + wire(b"to-8", 8) + wire(b"all", framing.ADDR_BROADCAST))
    assert got == [(7, b"to-7"), (255, b"all")]
    assert r.dropped["not_for_us"] == 1


def test_overlong_input_is_dropped_then_the_next_frame_accepted():
    r, got = reader()
    r.feed(b"\x01" * 2000 + b"\x00" + wire(b"ok"))
    assert got == [(0, b"ok")] and r.dropped["too_long"] == 1


def test_oversize_frame_is_refused_at_encode():
    with pytest.raises(ValueError):
        wire(bytes(framing.MAX_FRAME + 1))


def test_vm_frames_identically_and_decodes_without_allocating():
    cases = [bytes([i % 256 for i in range(n)]) for n in (1, 2, 17, 253 - 3, 250)] + [b"\x00" * 40, b"\xff" * 250]
    script = (
        "import micropython\nfrom protocol import framing\n"
        "out = bytearray(framing.MAX_WIRE)\ncount = [0]\n"
        "def on_frame(a, b, n):\n    count[0] += 1\n"
        "r = framing.Reader(on_frame)\nn = 0\n"
        + "".join(f"n = framing.encode_into(out, 0, {c!r}, {len(c)})\nprint(bytes(out[:n]).hex())\n" for c in cases)
        + "micropython.heap_lock()\n"
        "for _ in range(50):\n    n = framing.encode_into(out, 0, out, 200)\n    r.feed(out, n)\n"
        "micropython.heap_unlock()\n"
        "print('frames', count[0])\n")
    lines = vm.run(script).split("\n")
    assert lines[:len(cases)] == [wire(c).hex() for c in cases]
    assert lines[len(cases)] == "frames 50"
