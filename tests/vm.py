"""Run code in the real MicroPython VM (the board's interpreter) from a CPython test."""

import os
import subprocess
from pathlib import Path

from tools.vboard.bench import micropython_exe

ROOT = Path(__file__).resolve().parent.parent
MICROPYTHON = micropython_exe()


def run(script, stdin="", heap="112640w", timeout=120):
    """Run script with protocol/ importable, as on the board's /lib; return stdout."""
    env = dict(os.environ, MICROPYPATH=f".frozen:{ROOT}")
    r = subprocess.run([MICROPYTHON, "-X", f"heapsize={heap}", "-c", script], input=stdin, capture_output=True,
                       text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"MicroPython failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout
