# The virtual board's machine module: the unix port's own, plus the calls a
# technician's tools make on a real board (mpremote reset runs machine.reset()).
# The bench (tools/sim) turns these exit codes into a reboot of the VM, and
# machine.deepsleep() into a sleep it wakes the board from, as an ESP32's.
from umachine import *  # noqa: F401,F403

import _vboard

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
_CAUSES = {"power_on": 1, "hard_reset": 2, "watchdog": 3, "deepsleep": 4, "soft_reset": 5}
# wake_reason() values as the ESP32 port's (esp_sleep_wakeup_cause_t)
PIN_WAKE = EXT0_WAKE = 2
EXT1_WAKE = 3
TIMER_WAKE = 4


def reset():
    _vboard.end(_vboard.EXIT_HARD_RESET)


def soft_reset():
    _vboard.end(_vboard.EXIT_SOFT_RESET)


def deepsleep(time_ms=0):
    """As on an ESP32: the board sleeps time_ms (0: until a wake pin or a power cut), then boots
    with reset cause DEEPSLEEP_RESET; RTC memory is kept."""
    _vboard.deep_sleep(time_ms)


def reset_cause():
    return _CAUSES.get(_vboard.PARAMS.get("reset_cause"), PWRON_RESET)


def wake_reason():
    if _vboard.PARAMS.get("reset_cause") != "deepsleep":
        return 0
    return EXT0_WAKE if _vboard.PARAMS.get("wake_pin") else TIMER_WAKE


def unique_id():
    return bytes.fromhex(_vboard.PARAMS["unique_id"])


class RTC:
    """Only what survives a deep sleep: memory(), as an ESP32's machine.RTC().memory()."""

    def memory(self, data=None):
        return _vboard.rtc_memory(data)
