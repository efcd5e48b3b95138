"""Attack frames for a gateway's UDP link, and the verdict on what the gateway did with them (issue 16).

Each kind is what an attacker on the network can send without a device key, made from real frames the boards
sent (captured by tools/rigs/gateway_rig.py's tap) or from nothing:

  garbage     random bytes, 1-200 of them                                    -> any reason
  replay      a captured frame sent again as it was                          -> replay or too_old
  forged      a captured frame, its counter moved ahead and a tag bit flipped -> auth
  other_id    a captured frame of one board under another board's id         -> refused (its window or its tag)
  foreign_id  a well-formed header under a device id nobody has              -> unknown_device
  truncated   a captured frame cut short                                     -> short, or refused by window/tag
  oversized   more than a frame's 250 bytes                                  -> too_long
  reflected   a captured uplink frame with its direction bit set              -> direction

The verdict (flood_verdict) reads the gateway's own counters (its /metrics: frames received on the UDP link,
frames refused by reason) before and after, and the tap's count of frames accepted from UDP (the site's boards
use serial links: every frame accepted there is an attack that got through). It fails when any attack frame was
accepted, when the refusals grew by less than the frames that arrived, when a kind with one expected reason
(EXACT) grew its reasons by less than its frames (less the frames the kernel dropped before the gateway read
them: a full socket buffer drops datagrams, which is itself the bound on what a flood can queue), or when the
gateway's RSS grew by more than RSS_GROWTH_MB over the flood.
"""

import random
import re
import socket
import struct

from protocol import framing, secure

KINDS = ("garbage", "replay", "forged", "other_id", "foreign_id", "truncated", "oversized", "reflected")
SECURE_REFUSALS = frozenset(secure.REASONS)
EXPECT = {                      # kind -> the reasons any of its frames may be refused under
    "garbage": None,            # any
    "replay": frozenset({"replay", "too_old"}),
    "forged": frozenset({"auth"}),
    "other_id": frozenset({"replay", "too_old", "auth", "future"}),
    "foreign_id": frozenset({"unknown_device"}),
    "truncated": frozenset({"short", "replay", "too_old", "auth"}),
    "oversized": frozenset({"too_long"}),
    "reflected": frozenset({"direction"}),
}
# Kinds whose reasons no other kind's frames are expected under: their growth bounds the kind's count alone.
EXACT = ("replay", "forged", "foreign_id", "oversized", "reflected")
RSS_GROWTH_MB = 16.0
FOREIGN_BASE = 0xFA000000       # device ids from here are nobody's (a site's run from 0x2001)
FORGED_AHEAD = 1 << 20          # a forged counter this far past the captured one: inside the window's reach


def _with(frame, *, device_id=None, counter=None, flags=None):
    out = bytearray(frame)
    if flags is not None:
        out[1] = flags
    if device_id is not None:
        out[2:6] = struct.pack(">I", device_id)
    if counter is not None:
        out[6:10] = struct.pack(">I", counter & 0xFFFFFFFF)
    return bytes(out)


def _counter(frame):
    return struct.unpack(">I", frame[6:10])[0]


def attack_frames(captured, device_ids, rng, per_kind):
    """[(kind, bytes)] shuffled: per_kind frames of each kind. captured: [(device hex, frame bytes)] real frames
    the boards sent (the kinds made from them are left out when there are none); device_ids: the site's
    registered ids (other_id moves a frame under one of the others)."""
    out = []
    ids = sorted(device_ids)
    for _ in range(per_kind):
        out.append(("garbage", rng.randbytes(rng.randrange(1, 201))))
        out.append(("oversized", rng.randbytes(rng.randrange(framing.MAX_FRAME + 1, framing.MAX_FRAME + 400))))
        header = _with(bytes([secure.VERSION, secure.UPLINK]) + bytes(9),
                       device_id=FOREIGN_BASE + rng.randrange(1 << 20), counter=rng.randrange(1 << 32))
        out.append(("foreign_id", header[:10] + bytes([2]) + rng.randbytes(rng.randrange(8, 120))))
        if not captured:
            continue
        hexid, frame = rng.choice(captured)
        out.append(("replay", frame))
        forged = bytearray(_with(frame, counter=_counter(frame) + FORGED_AHEAD + rng.randrange(1000)))
        bit = rng.randrange(secure.TAG_LEN * 8)
        forged[len(forged) - 1 - bit // 8] ^= 1 << (bit % 8)
        out.append(("forged", bytes(forged)))
        others = [d for d in ids if d != int(hexid, 16)] or ids
        out.append(("other_id", _with(frame, device_id=rng.choice(others))))
        out.append(("truncated", frame[:rng.randrange(1, len(frame))]))
        out.append(("reflected", _with(frame, flags=frame[1] | secure.DOWNLINK)))
    rng.shuffle(out)
    return out


def send(frames, port, host="127.0.0.1", pace_every=0, pace_s=0.0):
    """Send each frame as one datagram, at full speed (pace_every 0) or resting pace_s after every pace_every
    of them; {kind: sent}. A datagram the kernel refuses to send (ENOBUFS) is not counted as sent."""
    import time
    sent = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, (kind, frame) in enumerate(frames):
            try:
                s.sendto(frame, (host, port))
            except OSError:
                continue
            sent[kind] = sent.get(kind, 0) + 1
            if pace_every and (i + 1) % pace_every == 0:
                time.sleep(pace_s)
    return sent


_SAMPLE = re.compile(r'^(prapa_frames_rejected_total|prapa_frames_received_total)\{(\w+)="([^"]*)"\} (\S+)$')


def parse_metrics(text):
    """{"rejected": {reason: n}, "received": {link: n}} from the gateway's Prometheus text."""
    out = {"rejected": {}, "received": {}}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            name, _label, value, n = m.groups()
            out["rejected" if "rejected" in name else "received"][value] = int(float(n))
    return out


def delta(before, after):
    """after - before, per reason and per link (counters)."""
    return {k: {x: after[k].get(x, 0) - before[k].get(x, 0) for x in set(after[k]) | set(before[k])}
            for k in ("rejected", "received")}


def flood_verdict(sent, grown, udp_link, udp_accepted, rss_before_kb, rss_peak_kb, rss_growth_mb=RSS_GROWTH_MB,
                  exact=True):
    """Problems (a list of str, empty when every check held) of one attack burst.

    sent {kind: frames}; grown: delta() of the gateway's counters over the burst; udp_link: the link's label;
    udp_accepted: frames the gateway accepted from UDP over the burst (the tap's); exact: check each EXACT kind's
    reasons (a paced burst; a flood at full speed checks only the totals)."""
    problems = []
    total = sum(sent.values())
    arrived = grown["received"].get(udp_link, 0)
    refused = sum(n for n in grown["rejected"].values())
    dropped = max(0, total - arrived)
    if udp_accepted:
        problems.append(f"{udp_accepted} attack frames were accepted by the gateway")
    if arrived > total:
        problems.append(f"the UDP link counted {arrived} frames for {total} sent")
    if refused < arrived:
        problems.append(f"{arrived} attack frames arrived but only {refused} refusals were counted")
    if exact:
        for kind in EXACT:
            n = sent.get(kind, 0)
            got = sum(grown["rejected"].get(r, 0) for r in EXPECT[kind])
            if n and got < n - dropped:
                problems.append(f"{n} {kind} frames ({dropped} dropped before the gateway) but "
                                f"{'/'.join(sorted(EXPECT[kind]))} grew by {got}")
    if rss_before_kb and rss_peak_kb and (rss_peak_kb - rss_before_kb) / 1024 > rss_growth_mb:
        problems.append(f"the gateway's RSS grew {(rss_peak_kb - rss_before_kb) / 1024:.1f} MB over the attack "
                        f"(bound {rss_growth_mb:g} MB)")
    return problems


def rss_kb(pid):
    """A process's resident set (VmRSS) in kB, or 0."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def uart_garbage(rng, nbytes):
    """nbytes of garbage for a serial line: random bytes with a frame delimiter now and then (what a motor or a
    bad cable puts on an RS-485 pair), in pieces a board's control socket takes (4096 bytes each)."""
    data = bytearray(rng.randbytes(nbytes))
    for _ in range(nbytes // 300):
        data[rng.randrange(nbytes)] = 0
    return [bytes(data[i:i + 4096]) for i in range(0, nbytes, 4096)]


def new_rng(seed):
    return random.Random(seed)
