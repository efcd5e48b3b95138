# The firmware runtime every role runs on: boot, config, scheduler, flash log,
# link, watchdog, health.
#
# Why it looks like this:
# - Sampling runs from the HAL's hard timer (tick): it keeps board time and
#   calls the role's sample(), and allocates nothing. Everything else (flash,
#   link, GC, health) is an asyncio task that yields often, so none of it can
#   hold sampling up beyond the timer's own jitter, which tick() records.
# - Board time is up_s, seconds since boot, kept from HAL ticks (which wrap at
#   2**30 ms); wall time is wall_boot + up_s once the gateway has sent it.
#   wall_boot is a big int on a 32-bit board, so the timer never touches it:
#   the role gets local seconds-of-day (a small int) when the clock is set.
# - A board without a valid config stays idle and safe: no role runs, the
#   reason goes to the console every few seconds and, when the board has an
#   identity, to the gateway as a config_invalid alarm; a config push can fix it.
# - A failure is a state, not a traceback: counted in health, the loop goes on.
# - A battery board (a role with sleep_ms()) sleeps between its samples: a wake
#   continues the boot that slept (firmware/sleep_cycle.py says how and when).
import array
import asyncio
import gc
import sys

from micropython import const

import config
import persist
import sleep_cycle
from flashlog import F_WALL, K_ALARM, REC, FlashLog, Record
from protocol import messages as M
from protocol import roles
from protocol.messages import A_CONFIG_INVALID, A_LOG_FULL

FW_VERSION = "0.2.0"
WATCHDOG_MS = const(30000)
HOUSEKEEPING_MS = const(500)
ROLE_SERVICE_MS = const(50)      # real ms; the role's rings hold 8 closes, so this is never the bottleneck
_JITTER_BINS = const(500)        # 100 us each: 0..50 ms, the last bin holds everything later
_LOG_SHARE = const(2)            # the log may use 1/_LOG_SHARE of the vfs partition before coarsening


def role_module(name):
    """The role's board logic (firmware/roles/<name>.py): make(hal, cfg_section, sink) -> role."""
    __import__("roles." + name)
    return sys.modules["roles." + name]


class RecordSink:
    """All a role may ask of the runtime: append a record (the runtime gives it its identity,
    time base and a place in the flash log), raise or clear an alarm, and the newest reading and
    daily record logged (what a role recovers its totals from after a cut)."""

    def __init__(self, rt):
        self.append = rt.log_record
        self.alarm = rt.alarm
        self.last_reading = rt.log.last_reading
        self.last_daily = rt.log.last_daily


class Runtime:
    FW_VERSION = FW_VERSION

    def __init__(self, hal):
        self.hal = hal
        self.board = hal.board
        self.reset_cause = hal.reset_cause()
        self.up_s = 0
        self._ms = 0
        self.wall_boot = -1
        self.utc_offset_s = 420 * 60
        self.seq = 0
        self.next_health_s = 5
        self.woke = self.reset_cause == "deepsleep" and sleep_cycle.resume(self)   # the boot that slept goes on
        if not self.woke:
            self.boot_id = persist.next_boot_id()
        self._last_ms = hal.ticks_ms()
        self.faults = 0
        self.last_fault = ""
        # 16-bit bins (1 KB, made without a temporary list): the timer stops a full bin at 65535 and
        # housekeeping halves every bin before one fills, so the percentiles follow recent ticks.
        self.jitter = array.array("H", bytes(2 * _JITTER_BINS))   # from raw bytes: 2 per bin
        self.jitter_max_us = 0
        self.heap_min = hal.heap_free_bytes()
        self.role = None
        self.uplink = None
        self.cfg = None
        self.config_error = None
        self.config_hash = b"\x00" * 8
        self.timer = None
        self.log_full_active = 0
        self.reboot_at = -1             # up_s at which a requested reboot happens (-1: none)
        self.refused = 0                # config pushes and commands refused (beyond a limit, unknown, ...)
        try:
            self.cfg, key = config.load(self.board)
        except config.ConfigError as e:
            self.config_error = str(e)
            ident = config.identity()
        else:
            ident = (self.cfg["device_id"], key)
            self.config_hash = config.config_hash(persist.read(config.CONFIG_PATH))
            self.utc_offset_s = self.cfg["time"]["utc_offset_min"] * 60
        extra = getattr(roles.spec(self.board["role"]), "EXTRA_BYTES", 0)   # the role's own columns
        capacity = self.cfg["log"]["max_entries"] if self.cfg and self.cfg["log"]["max_entries"] else \
            self.board["vfs_size_bytes"] // _LOG_SHARE // (REC + extra)
        self.log = FlashLog(capacity, extra=extra)
        if self.woke:
            sleep_cycle.resume_log(self)
        if self.cfg:
            try:    # a role may refuse a config the schema allowed (the doser: beyond its hard limits)
                self.role = role_module(self.cfg["role"]).make(hal, self.cfg[self.cfg["role"]], RecordSink(self))
            except config.ConfigError as e:
                self.config_error = str(e)
        if self.role is not None and self.wall_boot >= 0:
            self.role.on_clock(self.up_s, self.local_sod())        # a wake: the clock is known already
        if ident:
            from uplink import Uplink
            link = self.cfg["link"] if self.cfg else {"kind": "uart", "addr": 1}
            try:
                if link["kind"] == "udp":
                    transport = hal.udp(link["host"], link["port"], config.wifi())
                else:
                    transport = hal.uart()
            except OSError as e:        # no link: the board still counts and logs, and says why
                transport = None
                self.fault("link: %s" % e)
            if transport is not None:
                self.uplink = Uplink(self, ident[0], ident[1], link["addr"], transport, link["kind"] == "udp")
        if self.config_error:
            self.alarm(A_CONFIG_INVALID, 1, 0)

    # -- identity for messages -------------------------------------------------------
    def role_index(self):
        return roles.code(self.board["role"])

    def reset_cause_index(self):
        return M.RESET_CAUSES.index(self.reset_cause) if self.reset_cause in M.RESET_CAUSES else 0

    def banner(self):
        hal = self.hal
        print("prapa %s board=%s role=%s boot=%d reset=%s heap_free=%d heap_budget=%d" % (
            FW_VERSION, self.board["name"], self.board["role"], self.boot_id, self.reset_cause,
            hal.heap_free_bytes(), hal.heap_budget_bytes()))
        if self.config_error:
            self.say_idle()
        else:
            print("prapa device=%d log=%d/%d torn=%d %s" % (
                self.cfg["device_id"], self.log.entries(), self.log.capacity, self.log.torn,
                " ".join("%s=%s" % kv for kv in sorted(self.role.status().items()))))

    def say_idle(self):
        print("prapa idle: config invalid: %s" % self.config_error)

    # -- the hard timer ------------------------------------------------------------------
    def tick(self, timer):
        hal = self.hal
        now = hal.ticks_ms()
        self._ms += hal.ticks_diff(now, self._last_ms)
        self._last_ms = now
        while self._ms >= 1000:
            self._ms -= 1000
            self.up_s += 1
        late = timer.late_us
        if late > self.jitter_max_us:
            self.jitter_max_us = late
        b = late // 100
        b = b if b < _JITTER_BINS else _JITTER_BINS - 1
        if self.jitter[b] < 65535:
            self.jitter[b] += 1
        if self.role is not None:
            self.role.sample(self.up_s)

    # -- time ---------------------------------------------------------------------------------
    def on_time_sync(self, wall_ms):
        wall_boot = wall_ms // 1000 - self.up_s
        if self.wall_boot >= 0 and abs(wall_boot - self.wall_boot) <= 2:
            return
        first = self.wall_boot < 0
        self.wall_boot = wall_boot
        if self.role is not None and first:
            self.role.on_clock(self.up_s, self.local_sod())

    def local_sod(self):
        if self.wall_boot < 0:
            return -1
        return (self.wall_boot + self.up_s + self.utc_offset_s) % 86400

    # -- the flash log ----------------------------------------------------------------------
    def log_record(self, r):
        """Give r its identity (boot, seq) and time base, and append it; never loses it."""
        r.boot = self.boot_id
        r.seq = self.seq + 1
        self.seq += 1 if r.kind == K_ALARM else r.count
        r.flags, r.wall_boot = (F_WALL, self.wall_boot) if self.wall_boot >= 0 else (0, 0)
        log = self.log
        for attempt in range(3):
            try:
                log.append(r)
                break
            except OSError as e:            # the partition itself is full: merge harder, try again
                self.fault("flash log append: %s" % e)
                log.coarsen(log.entries() * 3 // 4)
        if log.entries() > log.capacity:
            log.coarsen(log.capacity * 9 // 10)
            if self.log_full_active == 0:
                self.log_full_active = 1
                self.alarm(A_LOG_FULL, 1, log.merged)
        elif self.log_full_active and log.entries() < log.capacity // 2:
            self.log_full_active = 0
            self.alarm(A_LOG_FULL, 0, log.merged)
        if self.uplink is not None:
            self.uplink.kick()

    def alarm(self, code, active, detail):
        r = Record()
        r.kind, r.count, r.t_end, r.span, r.value, r.reg = K_ALARM, code, self.up_s, 0, 1 if active else 0, detail
        self.log_record(r)
        if self.uplink is not None:
            self.uplink.send_alarm(r)         # ahead of any backlog; again in its turn until acknowledged

    def fault(self, what):
        self.faults += 1
        self.last_fault = what
        print("prapa fault: %s" % what)

    # -- downlink requests ----------------------------------------------------------------
    def apply_config(self, new):
        """Validate a pushed config; on success store it atomically and reboot into it."""
        import json
        data = json.dumps(new).encode()
        persist.write_atomic(config.CONFIG_PATH + ".try", data)
        try:
            cfg, _key = config.load(self.board, config.CONFIG_PATH + ".try")
            spec = roles.spec(cfg["role"])
            if self.cfg and hasattr(spec, "check_change"):
                spec.check_change(self.cfg[cfg["role"]], cfg[cfg["role"]], self.log.entries())
            if self.role is not None and hasattr(self.role, "check_config"):
                self.role.check_config(cfg[cfg["role"]])      # e.g. within the doser's hard limits
        except config.ConfigError as e:
            self.refused += 1
            return False, str(e)
        import os
        os.rename(config.CONFIG_PATH + ".try", config.CONFIG_PATH)
        self.reboot_at = self.up_s + 2
        return True, "stored; rebooting"

    def command(self, name, args):
        if name == "reboot":
            self.reboot_at = self.up_s + 2
            return True, "rebooting"
        if name == "ping":
            return True, "pong boot=%d" % self.boot_id
        commands = getattr(roles.spec(self.board["role"]), "COMMANDS", ())
        if name in commands and self.role is not None:
            ok, detail = self.role.command(name, args)
            if not ok:
                self.refused += 1
            return ok, detail
        self.refused += 1
        return False, "unknown command %s: use %s" % (name, ", ".join(("ping", "reboot") + tuple(commands)))

    def restart(self):
        """A reboot the firmware asked for: the role parks its outputs and saves its state first."""
        if self.role is not None and hasattr(self.role, "shutdown"):
            self.role.shutdown()
        self.hal.reset()

    # -- tasks -----------------------------------------------------------------------------
    async def role_task(self):
        while True:
            try:
                self.role.service()
            except Exception as e:      # a failure is a state: count it, keep sampling
                self.fault("role: %r" % e)
            await asyncio.sleep_ms(ROLE_SERVICE_MS)

    async def housekeeping(self):
        """Watchdog, GC, heap minimum, health reports, idle reminders, requested reboots.

        Paced in real milliseconds (link ticks): a virtual board running 10,000x
        faster must not collect garbage 10,000x as often."""
        hal = self.hal
        wdt = hal.watchdog(WATCHDOG_MS)
        health_s = self.cfg["link"]["health_s"] if self.cfg else 900
        next_idle_note = 0
        while True:
            wdt.feed()
            if max(self.jitter) > 60000:
                for i in range(_JITTER_BINS):
                    self.jitter[i] >>= 1
            gc.collect()
            free = hal.heap_free_bytes()
            if free < self.heap_min:
                self.heap_min = free
            if self.uplink is not None and self.up_s >= self.next_health_s:
                self.next_health_s = self.up_s + health_s
                self.send_health()
            if self.config_error and self.up_s >= next_idle_note:
                next_idle_note = self.up_s + 10
                self.say_idle()
            if 0 <= self.reboot_at <= self.up_s:
                self.restart()
            await asyncio.sleep_ms(HOUSEKEEPING_MS)

    def send_health(self):
        u = self.uplink
        self.uplink.send_dict(M.HEALTH, M.health(
            self.boot_id, self.up_s, self.hal.heap_free_bytes(), self.heap_min, self.boot_id - 1,
            self.reset_cause_index(), u.sent, u.received, u.rejected(), self.log.fill_permille(),
            persist.writes, (self.jitter_percentile_us(50), self.jitter_percentile_us(99), self.jitter_max_us)))

    def jitter_percentile_us(self, p):
        total = sum(self.jitter)
        if not total:
            return 0
        want = total * p // 100
        seen = 0
        for i in range(_JITTER_BINS):
            seen += self.jitter[i]
            if seen >= want:
                return i * 100
        return _JITTER_BINS * 100

    async def run(self):
        hal = self.hal
        if hasattr(hal, "background"):
            asyncio.create_task(hal.background())
        period = self.cfg["link"]["sample_ms"] if self.cfg else 1000
        self.timer = hal.periodic(period, self.tick)
        if self.role is not None:
            asyncio.create_task(self.role_task())
        if self.uplink is not None:
            asyncio.create_task(self.uplink.run())
        if self.role is not None and hasattr(self.role, "sleep_ms"):
            asyncio.create_task(sleep_cycle.run(self))
        await self.housekeeping()


current = None


def main():
    from hal import open_hal
    hal = open_hal()
    global current
    rt = current = Runtime(hal)          # reachable from the REPL for a technician's inspection
    gc.collect()
    rt.banner()
    asyncio.run(rt.run())
