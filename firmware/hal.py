# Picks the HAL backend for the platform the firmware woke up on. The only
# place that knows there is more than one.
import sys

_hal = None


def open_hal():
    """The board's one HAL (boot.py opens it first, the runtime gets the same one)."""
    global _hal
    if _hal is None:
        if sys.platform == "esp32":
            from hal_esp32 import Hal
        else:
            from hal_virtual import Hal
        _hal = Hal()
    return _hal


def outputs_safe():
    """Drive the outputs that must be low at reset (board.json "safe_low": a pump's enable and stroke
    pins) low. boot.py calls this before anything else runs, so after any reset, watchdog or crash
    the pump stays off until the role has loaded a valid config and its limits."""
    hal = open_hal()
    for gpio in hal.board.get("safe_low", ()):
        hal.pin_out(gpio, 0)
