# The virtual board's machine module: the unix port's own, plus the calls a
# technician's tools make on a real board (mpremote reset runs machine.reset()).
# The bench (tools/sim) turns these exit codes into a reboot of the VM.
import sys

from umachine import *  # noqa: F401,F403

import _vboard

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5
_CAUSES = {"power_on": 1, "hard_reset": 2, "watchdog": 3, "deepsleep": 4, "soft_reset": 5}


def reset():
    sys.exit(_vboard.EXIT_HARD_RESET)


def soft_reset():
    sys.exit(_vboard.EXIT_SOFT_RESET)


def reset_cause():
    return _CAUSES.get(_vboard.PARAMS.get("reset_cause"), PWRON_RESET)


def unique_id():
    return bytes.fromhex(_vboard.PARAMS["unique_id"])
