# Bring-up application: what a freshly built board runs until the firmware
# runtime (scheduler, link, flash log) takes over this module. It proves each
# part of the HAL on the board it wakes up on:
# - a boot id persisted in flash (atomic rename: a power cut leaves old or new);
# - a console banner a technician reads at the bench;
# - the data link: one beacon line per board second, and "ping" answered with
#   "pong" so an installer can check the wire both ways;
# - the role's inputs as the world (or the real sensor) drives them.
import asyncio
import gc

from hal import open_hal

FW_VERSION = "0.1.0-bringup"
BOOT_ID_FILE = "boot_id"
DEBOUNCE_US = 5500   # longer than a reed switch's worst contact bounce (5 ms)


def next_boot_id():
    try:
        with open(BOOT_ID_FILE) as f:
            boot_id = int(f.read()) + 1
    except (OSError, ValueError):
        boot_id = 1
    with open(BOOT_ID_FILE + ".new", "w") as f:
        f.write(str(boot_id))
    import os
    os.rename(BOOT_ID_FILE + ".new", BOOT_ID_FILE)
    return boot_id


class BringUp:
    def __init__(self, hal):
        self.hal = hal
        self.board = hal.board
        self.role = self.board["role"]
        self.boot_id = next_boot_id()
        self.uart = hal.uart()
        self.inputs = {}
        pins = self.board["role_pins"]
        for name in ("pulse_in", "flow_pulse_in", "rain_pulse_in"):
            if name in pins:
                self.inputs[name] = hal.counter(pins[name], active_level=0, filter_us=DEBOUNCE_US)
        self.seq = 0
        self.rx = bytearray(64)
        self.line = bytearray()

    def banner(self):
        hal = self.hal
        free = hal.heap_free_bytes()
        print("prapa %s board=%s role=%s boot=%d reset=%s heap_free=%d heap_budget=%d" % (
            FW_VERSION, self.board["name"], self.role, self.boot_id, hal.reset_cause(), free,
            hal.heap_budget_bytes()))

    def beacon(self):
        self.seq += 1
        counts = " ".join("%s=%d" % (k, c.count()) for k, c in self.inputs.items())
        self.uart.write(b"prapa-bringup boot=%d seq=%d ticks_ms=%d heap_free=%d %s\n" % (
            self.boot_id, self.seq, self.hal.ticks_ms(), self.hal.heap_free_bytes(), counts.encode()))

    def poll_link(self):
        n = self.uart.readinto(self.rx)
        while n:
            for b in self.rx[:n]:
                if b == 10:
                    if bytes(self.line).strip() == b"ping":
                        self.uart.write(b"pong boot=%d\n" % self.boot_id)
                    self.line = bytearray()
                elif len(self.line) < 64:
                    self.line.append(b)
            n = self.uart.readinto(self.rx)

    async def link_task(self):
        while True:
            self.poll_link()
            await asyncio.sleep_ms(5)

    async def beacon_task(self):
        while True:
            self.beacon()
            gc.collect()
            await self.hal.asleep_ms(1000)


def main():
    hal = open_hal()
    app = BringUp(hal)
    app.banner()

    async def run():
        asyncio.create_task(hal.background())
        asyncio.create_task(app.link_task())
        await app.beacon_task()

    asyncio.run(run())
