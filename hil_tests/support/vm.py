"""Run code in the real MicroPython VM (the board's interpreter) from a CPython test.

Modules are imported as a board imports them: firmware and protocol compiled
to .mpy by the same mpy-cross call `prapa build` makes (a board never compiles
its app from source, which would need far more heap than running it), laid out
as on the board's /lib. The compiled tree is made once per test process and
removed when it exits. Source on the path behind it serves only what a board
never carries (protocol/examples.py).

Which VM: run(vm=...), else the session's (tools/sim/vm.py: $PRAPA_VM, which the HIL plugin's --vm
sets, else unix32 when it is built, else unix64); the .mpy files take that VM's -march."""

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tools import image
from tools.build import compile_module
from tools.sim import vm as vms

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = vms.micropython_exe()       # the session's VM
_compiled = {}                            # mpy-cross -march -> the compiled /lib


def compiled_lib(vm=None):
    """A folder laid out like the board's /lib: every module the virtual image carries, as .mpy
    for the VM's -march."""
    arch = vms.mpy_arch(vm)
    if arch not in _compiled:
        lib = Path(tempfile.mkdtemp(prefix="prapa-vm-lib-"))
        atexit.register(shutil.rmtree, lib, True)
        for flash_path, src in image.firmware_files("virtual"):
            if flash_path in image.TOP_LEVEL:
                continue
            out = lib / (flash_path[len("lib/"):-3] + ".mpy")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(compile_module(src, flash_path, arch))
        _compiled[arch] = lib
    return _compiled[arch]


def micropypath(vm=None):
    return f".frozen:{compiled_lib(vm)}:{ROOT / 'firmware'}:{ROOT}:{ROOT / 'tools' / 'sim' / 'rom'}"


def run(script, stdin="", heap="112640w", timeout=120, vm=None):
    """Run script with firmware/ and protocol/ importable as on the board; return stdout.

    vm: unix32 or unix64 (None: the session's). heap: -X heapsize (the `w` suffix is bytes on unix32,
    twice that on unix64)."""
    vm = vms.resolve(vm)
    env = dict(os.environ, MICROPYPATH=micropypath(vm))
    r = subprocess.run([vms.micropython_exe(vm), "-X", f"heapsize={heap}", "-c", script], input=stdin,
                       capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"MicroPython failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout
