"""The board's flash log on littlefs in the real VM: order, acks, torn records, coarsening."""

import atexit
import shutil
import tempfile

from hil_tests.support import vm

# The flash: a littlefs partition on a file, read and written in place as a board's flash is (a
# bytearray in the VM would take 64 KiB of the board's heap, which a board's flash never does).
_FLASH_DIR = tempfile.mkdtemp(prefix="prapa-test-flash-")
atexit.register(shutil.rmtree, _FLASH_DIR, True)
FLASH_FS = """
import vfs, os, _vboard
f = open("%s/flash.bin", "w+b")
f.seek(16 * 4096 - 1)
f.write(b"\\xff")
bd = _vboard.FileBlockDevice(f, 4096, 16)     # the virtual board's own flash device
vfs.VfsLfs2.mkfs(bd)
vfs.mount(vfs.VfsLfs2(bd), "/fl")
os.chdir("/fl")
""" % _FLASH_DIR + """
from flashlog import FlashLog, Record, K_READING, K_ALARM, REC
def unacked(log, n):
    raw = bytearray(REC * n)
    return [Record().unpack(raw, i * REC) for i in range(log.read_unacked(raw, n))]
def reading(seq, value, reg, t_end, span=900, boot=3):
    r = Record()
    r.kind, r.flags, r.count, r.boot, r.seq, r.t_end, r.span, r.value, r.reg, r.wall_boot = (
        K_READING, 0, 1, boot, seq, t_end, span, value, reg, 0)
    return r
"""


def test_records_come_back_in_order_and_acks_delete_whole_segments():
    out = vm.run(FLASH_FS + """
log = FlashLog(1000)
reg = 0
for i in range(150):
    log.append(reading(i + 1, i % 7, reg, (i + 1) * 900))
    reg += i % 7
recs = unacked(log, 200)
n = len(recs)
print(n, [r.seq for r in recs[:n]] == list(range(1, 151)), len(log.counts))
log.ack(3, 100)
print(log.entries(), len(os.listdir("log")))
log.ack(2, 150)                                   # another boot's ack moves nothing
print(log.entries())
again = FlashLog(1000)                            # a reboot: the first segment's acked records return
recs = unacked(again, 200)
n = len(recs)
print(n, recs[0].seq, again.last.seq)
""")
    lines = out.split("\n")
    assert lines[0] == "150 True 3"
    assert lines[1] == "50 2"              # the first full segment (64) is gone; 100 of 150 acknowledged
    assert lines[2] == "50"
    assert lines[3] == "86 65 150"


def test_a_torn_or_rotten_record_is_discarded_at_boot_never_misread():
    out = vm.run(FLASH_FS + """
log = FlashLog(1000)
for i in range(10):
    log.append(reading(i + 1, 5, 5 * i, (i + 1) * 900))
name = "log/%08d" % log.first
data = bytearray(open(name, "rb").read())
data[3 * REC + 9] ^= 0x40                         # rot inside record 4
with open(name, "wb") as f:
    f.write(data[:9 * REC + 20])                  # and the last record cut short
again = FlashLog(1000)
recs = unacked(again, 20)
n = len(recs)
print(again.torn, n, [r.seq for r in recs[:n]])
print(FlashLog(1000).torn)                        # repaired on flash: the next boot finds nothing torn
""")
    first, second = out.split("\n")[:2]
    assert first == "2 8 [1, 2, 3, 5, 6, 7, 8, 9]"
    assert second == "0"


def test_coarsening_keeps_the_register_chain_exact_and_never_touches_alarms():
    out = vm.run(FLASH_FS + """
log = FlashLog(100)
reg = 0
for i in range(200):
    if i == 50:
        a = Record()
        a.kind, a.flags, a.count, a.boot, a.seq, a.t_end, a.span, a.value, a.reg, a.wall_boot = (
            K_ALARM, 0, 1, 3, 1000, 45000, 0, 1, 0, 0)
        log.append(a)
    log.append(reading(i + 1, (i * 13) % 11, reg, (i + 1) * 900))
    reg += (i * 13) % 11
merged = log.coarsen(90)
recs = unacked(log, 300)
n = len(recs)
total = recs[0].reg
ok = True
covered = 0
for r in recs[:n]:
    if r.kind == K_ALARM:
        continue
    ok = ok and r.reg == total and r.span == 900 * r.count
    total += r.value
    covered += r.count
print(merged, n, total == reg, ok, covered, sum(1 for r in recs[:n] if r.kind == K_ALARM))
""")
    merged, n, exact, chain, covered, alarms = out.split()
    assert int(n) <= 90 and int(merged) == 201 - int(n)
    assert exact == "True" and chain == "True"
    assert covered == "200" and alarms == "1"
