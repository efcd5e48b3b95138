"""Run code in the real MicroPython VM (the board's interpreter) from a CPython test."""

import os
import subprocess
from pathlib import Path

from tools.sim.board import micropython_exe

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = micropython_exe()
# As on the board: firmware modules at the root, protocol/ under /lib.
MICROPYPATH = f".frozen:{ROOT / 'firmware'}:{ROOT}"


def run(script, stdin="", heap="112640w", timeout=120):
    """Run script with firmware/ and protocol/ importable as on the board; return stdout."""
    env = dict(os.environ, MICROPYPATH=MICROPYPATH)
    r = subprocess.run([MICROPYTHON, "-X", f"heapsize={heap}", "-c", script], input=stdin, capture_output=True,
                       text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"MicroPython failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout
