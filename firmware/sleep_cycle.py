# The sleep cycle of a battery board: the runtime sleeps between a role's
# samples and a wake continues the boot that slept. Generic over roles.
#
# The contract with the role (all optional; without sleep_ms() the
# board never sleeps):
# - sleep_ms(up_s) -> ms the role may sleep now (0: stay awake). A value > 0
#   promises that nothing the role has seen still waits to be logged.
# - wake_gpio() -> a gpio whose going low wakes the board early (an RTC GPIO
#   on an ESP32: a rain gauge's reed switch to GND), or -1.
# - shutdown() (as before a reboot) runs just before the sleep: the role saves
#   its state to flash. Records it logs then (an alarm) are sent before the
#   board sleeps, as long as the link answers.
#
# When: once sleep_ms() > 0 and the link is done: the flash log holds no
# unacknowledged record, no batch is in flight, a downlink frame came since the
# wake (the gateway knows the board is up) and LINGER_MS have passed since the
# last one (a command the gateway queued, e.g. the drain's `rain`, follows the
# ack); or, with a gateway that does not answer, once the link has been silent
# for LINK_WAIT_MS since the wake or its last frame (the records wait in flash
# for the next wake); and at the latest AWAKE_MAX_MS after the wake. Link
# times are real milliseconds (hal.link_ticks_ms), as the uplink's: the gateway
# answers in real time even when a virtual board's clock runs fast.
#
# What carries a boot through a sleep is the RTC record (hal.rtc_memory, kept
# through a deep sleep only; a power cut loses it): _RTC_FMT then a CRC-16.
# A wake (reset cause "deepsleep") with a valid record whose boot id is the
# flash's goes on with that boot: the same boot id (no flash write), the same
# seq, and up_s carried on by what the RTC clock (hal.rtc_ms, which runs while
# the board sleeps) says passed, an early wake's too; so records keep one
# (boot, seq) sequence and one board time across sleeps, and the role gets the
# clock at once when wall time was known. The flash log's acknowledged cursor
# comes back too, so a wake does not send again what the gateway holds (after
# any other boot the records of the log's first segment go again, as they
# must: the cursor is in RAM only). Without a valid record the boot is a new
# one, as after any reset. Every wake says hello (the gateway learns the
# board is up and sends the time and anything queued); frame counters and the
# downlink replay floor are on flash as at any boot. Health is sent when due by
# board time, carried across wakes, not at every wake.
import asyncio
import struct

from micropython import const

import persist
from protocol.framing import crc16

LINGER_MS = const(150)           # after the last downlink frame before a board may sleep
LINK_WAIT_MS = const(3000)       # of a silent link, after which a board sleeps with records unsent
AWAKE_MAX_MS = const(30000)      # a wake lasts at most this, whatever the link does
POLL_MS = const(20)
# magic, boot id, seq (the last one used), up_s and ms (0..999) at the sleep, hal.rtc_ms() then,
# the sleep's ms, wall_boot (-1: unknown), up_s of the next health report, the flash log's cursor
# (the number of its segment, the record in it); then a CRC-16, big-endian
_RTC_FMT = "<HIIIHIIiIIH"
_RTC_MAGIC = const(0x5EE9)
_RTC_BYTES = const(40)


def _record(rt):
    """The RTC record's fields, or None when there is no valid one for the flash's boot."""
    rec = rt.hal.rtc_memory()
    if len(rec) != _RTC_BYTES or crc16(rec, 0, _RTC_BYTES - 2) != (rec[_RTC_BYTES - 2] << 8) | rec[_RTC_BYTES - 1]:
        return None
    fields = struct.unpack_from(_RTC_FMT, rec, 0)
    if fields[0] != _RTC_MAGIC or fields[1] != persist.read_int("boot_id", 0):
        return None
    return fields


def resume(rt):
    """Continue the boot that slept from the RTC record: set rt's boot id, seq, board time, wall_boot
    and next health report and return True; False when there is no valid record (a wake the runtime
    did not ask for, e.g. machine.deepsleep() from the REPL) or it names another boot than the flash's."""
    hal = rt.hal
    fields = _record(rt)
    if fields is None:
        return False
    _magic, boot_id, seq, up_s, ms, rtc_ms, sleep_ms, wall_boot, next_health = fields[:9]
    slept = hal.ticks_diff(hal.rtc_ms(), rtc_ms)      # the whole sleep, early or not, and the boot since
    if slept < 0:
        slept = sleep_ms
    ms += slept
    rt.boot_id, rt.seq, rt.up_s, rt._ms = boot_id, seq, up_s + ms // 1000, ms % 1000
    rt.wall_boot, rt.next_health_s = wall_boot, next_health
    return True


def resume_log(rt):
    """After resume(), once the flash log is open: its acknowledged cursor as it was at the sleep, and
    seq past the newest record of the boot on flash (never twice the same (boot, seq))."""
    log = rt.log
    fields = _record(rt)
    if fields is not None:
        log.set_cursor(fields[9], fields[10])
    last = log.last
    if last.kind and last.boot == rt.boot_id and last.seq_last() > rt.seq:
        rt.seq = last.seq_last()


def rtc_record(rt, sleep_ms):
    """The RTC record for a sleep of sleep_ms starting now."""
    hal = rt.hal
    ms = rt._ms + hal.ticks_diff(hal.ticks_ms(), rt._last_ms)     # board time since the last tick too
    rec = bytearray(_RTC_BYTES)
    log = rt.log
    segment, first_unacked = log.cursor()
    struct.pack_into(_RTC_FMT, rec, 0, _RTC_MAGIC, rt.boot_id, rt.seq, rt.up_s + ms // 1000, ms % 1000,
                     hal.rtc_ms(), sleep_ms, rt.wall_boot, rt.next_health_s, segment, first_unacked)
    c = crc16(rec, 0, _RTC_BYTES - 2)
    rec[_RTC_BYTES - 2], rec[_RTC_BYTES - 1] = c >> 8, c & 255
    return rec


def shutdown(rt):
    """The role saves its state (before the sleep, as before a reboot); True when that logged records."""
    before = rt.log.entries()
    if hasattr(rt.role, "shutdown"):
        rt.role.shutdown()
    return rt.log.entries() > before


def sleep(rt, ms):
    """The RTC record is kept, the board sleeps ms (or until the role's wake gpio goes low). Never
    returns: the wake is a boot."""
    role = rt.role
    wake_gpio = role.wake_gpio() if hasattr(role, "wake_gpio") else -1
    print("prapa sleep ms=%d wake_gpio=%d up_s=%d" % (ms, wake_gpio, rt.up_s))
    rt.hal.rtc_memory(rtc_record(rt, ms))
    rt.hal.deep_sleep(ms, wake_gpio)


async def run(rt):
    """The runtime's task for a role with sleep_ms(): sleeps when the role may and the link is done."""
    hal, role, u = rt.hal, rt.role, rt.uplink
    woke = heard = hal.link_ticks_ms()
    received = u.received if u is not None else 0
    answered = False                # a downlink frame since the wake
    shut = False                    # the role's shutdown() ran and logged records: they go first, once
    while True:
        await asyncio.sleep_ms(POLL_MS)
        now = hal.link_ticks_ms()
        if u is not None and u.received != received:
            received, heard, answered = u.received, now, True
        if rt.reboot_at >= 0:       # a reboot was asked for: it comes first
            continue
        try:
            ms = role.sleep_ms(rt.up_s)
        except Exception as e:      # a failure is a state: the board stays awake, and says why
            rt.fault("role sleep_ms: %r" % e)
            return
        if ms <= 0:
            continue
        if u is not None:
            quiet = hal.ticks_diff(now, heard)
            done = rt.log.entries() == 0 and not u.waiting and answered and quiet >= LINGER_MS
            if not (done or quiet >= LINK_WAIT_MS or hal.ticks_diff(now, woke) >= AWAKE_MAX_MS):
                continue
        if shutdown(rt) and not shut and u is not None and quiet < LINK_WAIT_MS:
            shut = True             # an alarm shutdown() raised is sent now, not a sleep later
            continue
        sleep(rt, ms)
