# The board's flash log: every reading and alarm, kept until the gateway
# acknowledges it, surviving a power cut at any instant.
#
# Why it looks like this:
# - Segment files log/00000001, log/00000002, ... of fixed-size records (36
#   bytes, plus the role's own columns where its spec declares EXTRA_BYTES),
#   appended one record per open/write/close (littlefs commits on close, so a
#   cut leaves the record whole or absent); each record also carries a
#   CRC-16, so anything torn or rotten is found at boot, discarded and
#   counted, never misread.
# - Segments are numbered without gaps, so RAM holds only the first number
#   and one byte (record count) per segment: a full 1 MB log costs ~400 bytes.
# - An acknowledgement advances a RAM cursor; a segment is deleted when all
#   its records are behind it. After a reboot the unacknowledged-but-not-yet-
#   deleted records of the first segment are sent again (the gateway
#   deduplicates by (device, boot, seq)); nothing is written for an ack.
# - When the log passes its capacity with the gateway gone, the oldest
#   interval readings are merged pairwise (spans and seq ranges add up, the
#   register chain is unchanged, so the cumulative total stays exact) by
#   rewriting a segment to a sibling and renaming it. Alarms and daily
#   (billing) readings are never merged and nothing is ever dropped: past the
#   capacity the log grows into the rest of the partition. Records with role
#   columns (the doser's) are never merged: the log just grows.
import os
import struct

from micropython import const
from protocol.framing import crc16

import persist

K_READING = const(1)     # interval reading: value = units in the span, reg = register before
K_DAILY = const(2)       # daily reading at local midnight: same fields, never merged
K_ALARM = const(3)       # alarm: count = code, value = active, reg = detail
F_WALL = const(1)        # wall_boot holds the wall time (Unix s) of this boot's start
REC = const(36)          # a record without role columns: 34 bytes of fields, the CRC-16 last
SEG_RECORDS = const(64)
_FMT = "<BBHIIIIIIIH"    # kind flags count boot seq t_end span value reg wall_boot reserved, then crc
_SPAN_MAX = const(86400)


class Record:
    """One decoded record; the send path reuses one instance per slot. `extra` holds the role's own
    columns (EXTRA_BYTES of its spec) when it appends; unpack() reads the common fields only."""
    __slots__ = ("kind", "flags", "count", "boot", "seq", "t_end", "span", "value", "reg", "wall_boot", "extra")

    def __init__(self, extra=0):
        self.kind = 0
        self.extra = bytearray(extra) if extra else None

    def unpack(self, buf, off):
        (self.kind, self.flags, self.count, self.boot, self.seq, self.t_end, self.span, self.value, self.reg,
         self.wall_boot, _r) = struct.unpack_from(_FMT, buf, off)
        return self

    def pack(self, buf, off, size=REC):
        """Write the record as `size` bytes: the fields, the role columns (zeros when it has none), the CRC."""
        struct.pack_into(_FMT, buf, off, self.kind, self.flags, self.count, self.boot, self.seq, self.t_end,
                         self.span, self.value, self.reg, self.wall_boot, 0)
        x = self.extra
        for i in range(size - REC):
            buf[off + REC - 2 + i] = x[i] if x is not None and i < len(x) else 0
        c = crc16(buf, off, off + size - 2)
        buf[off + size - 2] = c >> 8
        buf[off + size - 1] = c & 255

    def seq_last(self):
        return self.seq + (self.count if self.kind != K_ALARM else 1) - 1


def _valid(buf, off, size):
    c = crc16(buf, off, off + size - 2)
    return buf[off] in (K_READING, K_DAILY, K_ALARM) and buf[off + size - 2] == c >> 8 and \
        buf[off + size - 1] == c & 255


def can_merge(a, b):
    return (a.kind == K_READING and b.kind == K_READING and a.boot == b.boot and a.flags == b.flags
            and a.wall_boot == b.wall_boot and a.seq + a.count == b.seq and a.t_end + b.span == b.t_end
            and a.reg + a.value == b.reg and a.count + b.count <= 0xFFFF and a.span + b.span <= _SPAN_MAX)


class FlashLog:
    def __init__(self, capacity, path="log", extra=0):
        """extra: bytes of role columns per record (its spec's EXTRA_BYTES); a log keeps one size."""
        self.path = path
        self.capacity = capacity
        self.rec = REC + extra                     # bytes per record on flash
        self.seg = bytearray(self.rec * SEG_RECORDS)   # one segment, for scans, sends and rewrites
        self.first = 1              # number of the oldest segment on flash
        self.counts = bytearray()   # records in each segment, oldest first
        self.cursor_seg = 0         # index into counts: first record not acknowledged
        self.cursor_rec = 0
        self.torn = 0               # records found torn or corrupt at boot, discarded
        self.merged = 0             # records removed by coarsening
        self.last = Record()        # the newest record
        self.last_reading = Record()    # the newest of each reading kind, for a role's recovery
        self.last_daily = Record()
        try:
            os.mkdir(path)
        except OSError:
            pass
        self._scan()

    # -- boot ------------------------------------------------------------------
    def _name(self, index):
        return "%s/%08d" % (self.path, self.first + index)

    def _scan(self):
        numbers = []
        for entry in os.ilistdir(self.path):
            name = entry[0]
            if name.endswith(".new"):
                os.remove(self.path + "/" + name)      # a rewrite the cut interrupted; the old file stands
            elif name.isdigit():
                numbers.append(int(name))
        numbers.sort()
        if numbers:
            self.first = numbers[0]
            # A gap can only be a segment deleted out of order by a cut: keep what is there.
            for i, n in enumerate(numbers):
                if n != self.first + i:
                    os.rename("%s/%08d" % (self.path, n), self._name(i))
        for i in range(len(numbers)):
            n = self._load(i, repair=True)
            self.counts.append(n)
            for k in range(n):
                self._keep_last(k * self.rec)
        while len(self.counts) > 1 and self.counts[-1] == 0:
            os.remove(self._name(len(self.counts) - 1))
            self.counts = self.counts[:-1]

    def _keep_last(self, off):
        self.last.unpack(self.seg, off)
        if self.last.kind == K_READING:
            self.last_reading.unpack(self.seg, off)
        elif self.last.kind == K_DAILY:
            self.last_daily.unpack(self.seg, off)

    def _load(self, index, repair=False):
        """Read segment index into self.seg; return its number of valid records."""
        try:
            with open(self._name(index), "rb") as f:
                n = f.readinto(self.seg)
        except OSError:
            n = 0
        good = 0
        off = 0
        while off + self.rec <= n:
            if _valid(self.seg, off, self.rec):
                if good != off // self.rec:
                    self.seg[good * self.rec:(good + 1) * self.rec] = self.seg[off:off + self.rec]
                good += 1
            off += self.rec
        if repair and good * self.rec != n:
            self.torn += (n - good * self.rec + self.rec - 1) // self.rec
            self._rewrite(index, good)
        return good

    def _rewrite(self, index, n):
        persist.write_atomic(self._name(index), memoryview(self.seg)[:n * self.rec])

    # -- the acknowledged cursor, for a wake that goes on with the same boot (sleep_cycle.py) -----------
    def cursor(self):
        """(segment number, record) of the first record not acknowledged: a place that stays true while
        older segments are deleted."""
        return self.first + self.cursor_seg, self.cursor_rec

    def set_cursor(self, segment, rec):
        """Move the cursor back to where cursor() was, if that place still exists; True when it did.
        (At boot the log starts from its oldest record: acknowledgements inside a segment are not on
        flash, and a deep-sleep wake need not send those records again.)"""
        seg = segment - self.first
        if 0 <= seg < len(self.counts) and 0 <= rec <= self.counts[seg]:
            self.cursor_seg, self.cursor_rec = seg, rec
            return True
        return False

    # -- append ----------------------------------------------------------------
    def entries(self):
        """Records not yet acknowledged."""
        n = 0
        for i in range(self.cursor_seg, len(self.counts)):
            n += self.counts[i]
        return n - self.cursor_rec

    def fill_permille(self):
        return min(1000, self.entries() * 1000 // self.capacity)

    def append(self, rec):
        """Write one record durably; raises OSError if the partition is full."""
        if not self.counts or self.counts[-1] >= SEG_RECORDS:
            self.counts.append(0)
        buf = self.seg
        rec.pack(buf, 0, self.rec)
        with open(self._name(len(self.counts) - 1), "ab") as f:
            f.write(memoryview(buf)[:self.rec])
        persist.writes += 1
        self.counts[-1] += 1
        self._keep_last(0)

    # -- send and acknowledge ----------------------------------------------------
    def read_unacked(self, out, max_n):
        """Copy up to max_n records from the cursor into the bytearray out (self.rec bytes each, as on
        flash: Record().unpack(out, i * self.rec) reads one); return how many."""
        n = 0
        seg, rec = self.cursor_seg, self.cursor_rec
        while n < max_n and seg < len(self.counts):
            count = self._load(seg)
            k = min(count - rec, max_n - n)          # the segment's next k records, in one copy
            if k > 0:
                out[n * self.rec:(n + k) * self.rec] = memoryview(self.seg)[rec * self.rec:(rec + k) * self.rec]
                n += k
            seg, rec = seg + 1, 0
        return n

    def ack(self, boot, seq):
        """The gateway holds every record of `boot` up to `seq`: move the cursor, delete whole segments."""
        r = Record()
        moved = 0
        loaded = -1                     # read each segment once, not once per acknowledged record
        while True:
            self._normalise()
            if self.cursor_seg >= len(self.counts) or self.cursor_rec >= self.counts[self.cursor_seg]:
                break
            if loaded != self.cursor_seg:
                self._load(self.cursor_seg)
                loaded = self.cursor_seg
            r.unpack(self.seg, self.cursor_rec * self.rec)
            if r.boot != boot or r.seq_last() > seq:
                break
            self.cursor_rec += 1
            moved += 1
        while self.cursor_seg > 0:
            os.remove(self._name(0))
            self.first += 1
            self.counts = self.counts[1:]
            self.cursor_seg -= 1
        return moved

    def _normalise(self):
        """Step the cursor past segments it has finished that will get no more records."""
        while self.cursor_seg < len(self.counts) and self.cursor_rec >= self.counts[self.cursor_seg] and (
                self.cursor_seg < len(self.counts) - 1 or self.counts[self.cursor_seg] >= SEG_RECORDS):
            self.cursor_seg += 1
            self.cursor_rec = 0

    # -- coarsening --------------------------------------------------------------
    def coarsen(self, target):
        """Merge the oldest interval readings pairwise until at most target records wait; return merges.
        A log of records with role columns merges nothing (their columns do not add up)."""
        if self.rec != REC:
            return 0
        a, b = Record(), Record()
        done = 0
        progress = True
        while self.entries() > target and progress:
            progress = False
            for i in range(self.cursor_seg, len(self.counts)):
                if self.entries() <= target:
                    break
                start = self.cursor_rec if i == self.cursor_seg else 0
                n = self._load(i)
                out = start
                k = start
                merged_here = 0
                while k < n:
                    a.unpack(self.seg, k * self.rec)
                    if k + 1 < n and b.unpack(self.seg, (k + 1) * self.rec) and can_merge(a, b):
                        a.count += b.count
                        a.span += b.span
                        a.value += b.value
                        a.t_end = b.t_end
                        k += 2
                        merged_here += 1
                    else:
                        k += 1
                    a.pack(self.seg, out * self.rec, self.rec)
                    out += 1
                if merged_here:
                    self._rewrite(i, out)
                    self.counts[i] = out
                    self.merged += merged_here
                    done += merged_here
                    progress = True
        return done
