# Runs on every boot before main.py. Keep it tiny: a broken boot.py makes a
# board that a technician can only recover by reflashing.
import gc

gc.collect()
