# Picks the HAL backend for the platform the firmware woke up on. The only
# place that knows there is more than one.
import sys


def open_hal():
    if sys.platform == "esp32":
        from hal_esp32 import Hal
    else:
        from hal_virtual import Hal
    return Hal()
