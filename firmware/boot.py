# Runs on every boot before main.py. Keep it tiny: a broken boot.py makes a
# board that a technician can only recover by reflashing.
# First of all a pump's outputs go low (the safe state), whatever runs after:
# after any reset, watchdog or crash the pump is off until a valid config loads.
try:
    import hal
    hal.outputs_safe()
except Exception as e:      # a board without its board.json: it drives nothing yet
    print("prapa boot: outputs not set safe: %r" % (e,))
import gc

gc.collect()
