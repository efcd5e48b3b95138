"""The VMs a virtual board runs on (tools/sim/vm.py): the 32-bit VM builds from the MicroPython
source (or is in the cache) and really has the ESP32's word size and float width and what the
firmware uses; the cache holds it until the source or the flags change; an unknown VM or a missing
source is refused with the fix. Without the source the unix32 tests skip with the reason."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from protocol.errors import UsageError
from tools import build
from tools.console import BANNER_BYTES
from tools.sim import vm

ROOT = Path(__file__).resolve().parents[2]
BOARD = "esp32-devkitc"


@pytest.fixture(scope="module")
def unix32():
    """The 32-bit VM's path: from the cache, or built now (about 30 s) when this host can."""
    reason = vm.skip_reason()
    if reason and vm.cannot_build():
        pytest.skip(reason)
    return vm.build_unix32(progress=lambda _msg: None)


def run_vm(exe, code, *options):
    r = subprocess.run([exe, *options, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


def tool(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)


# -- the 32-bit VM is what an ESP32 is -------------------------------------------------------------
WORD_AND_FLOAT = """
import sys, struct, micropython
n = int('0')
a = b = small = boxed = 0        # globals made before the lock: a new one would grow the dict
micropython.heap_lock()
try:
    a = (1 << 29) + n            # a small int: no allocation
    small = 1
except MemoryError:
    small = 0
try:
    b = (1 << 30) + n            # past 2**30: a long int on the heap where small ints have 31 bits
    boxed = 0
except MemoryError:
    boxed = 1
micropython.heap_unlock()
f32 = struct.unpack('<f', struct.pack('<f', 0.1))[0] == 0.1
print(sys.maxsize, small, boxed, 16777217.0 == 16777216.0, f32, repr(0.1))
"""


def test_unix32_is_32_bit_with_float32_and_small_ints_ending_at_2_to_the_30(unix32):
    maxsize, small, boxed, f24, f32, tenth = run_vm(unix32, WORD_AND_FLOAT)
    assert int(maxsize) == 2**31 - 1
    assert (small, boxed) == ("1", "1"), "1 << 30 must need the heap on the 32-bit VM"
    assert f24 == "True" and f32 == "True" and tenth == "0.1"
    reports = vm.probe(unix32)
    assert (reports["word_bits"], reports["float_bits"], reports["version"]) == (32, 32, "1.28.0")


def test_the_64_bit_vm_is_what_it_was():
    maxsize, small, boxed, f24, f32, _tenth = run_vm(vm.micropython_exe("unix64"), WORD_AND_FLOAT)
    assert int(maxsize) == 2**63 - 1 and (small, boxed) == ("1", "0") and f24 == f32 == "False"


FIRMWARE_NEEDS = """
import vfs, cryptolib, hashlib, binascii, asyncio, termios, select, gc, micropython

class Ram:
    def __init__(self, blocks, size=4096):
        self.size, self.data = size, bytearray(blocks * size)
    def readblocks(self, n, buf, off=0):
        a = n * self.size + off
        buf[:] = self.data[a:a + len(buf)]
    def writeblocks(self, n, buf, off=0):
        a = n * self.size + off
        self.data[a:a + len(buf)] = buf
    def ioctl(self, op, arg):
        return {4: len(self.data) // self.size, 5: self.size}.get(op, 0)

dev = Ram(16)
vfs.VfsLfs2.mkfs(dev)
vfs.mount(vfs.VfsLfs2(dev), '/ram')
with open('/ram/x.bin', 'wb') as f:
    f.write(b'prapa')
print(open('/ram/x.bin').read())
key = bytes(range(16))
print(binascii.hexlify(cryptolib.aes(key, 1).encrypt(bytes.fromhex('00112233445566778899aabbccddeeff'))).decode())
print(binascii.hexlify(cryptolib.aes(key, 2, bytes(16)).encrypt(bytes(32))).decode())
print(binascii.hexlify(hashlib.sha256(b'abc').digest()).decode())
async def twice(x):
    await asyncio.sleep_ms(1)
    return 2 * x
print(asyncio.run(twice(21)))
print(hasattr(termios, 'tcgetattr'), hasattr(select, 'poll'))
micropython.heap_lock()
try:
    bytearray(64)
    print('allocated')
except MemoryError:
    print('locked')
micropython.heap_unlock()
gc.collect()
print(gc.mem_free() + gc.mem_alloc())
"""


def test_unix32_has_what_the_firmware_uses(unix32):
    lines = run_vm(unix32, FIRMWARE_NEEDS, "-X", "heapsize=112640")
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    enc = Cipher(algorithms.AES(bytes(range(16))), modes.CBC(bytes(16))).encryptor()
    assert lines[:7] == [
        "prapa",
        "69c4e0d86a7b0430d8cdb78070b4c55a",                       # FIPS-197 C.1
        (enc.update(bytes(32)) + enc.finalize()).hex(),
        hashlib.sha256(b"abc").hexdigest(),
        "42", "True", "True"]
    assert lines[7] == "locked"
    assert 100_000 < int(lines[8]) <= 112_640, "-X heapsize= must give the board's budget in bytes"


def test_a_board_heap_in_words_is_the_same_bytes_on_the_32_bit_vm(unix32):
    (total,) = run_vm(unix32, "import gc; gc.collect(); print(gc.mem_free() + gc.mem_alloc())", "-X", "heapsize=112640w")
    assert 100_000 < int(total) <= 112_640


# -- .mpy files ------------------------------------------------------------------------------------------
def test_each_vm_loads_the_bytecode_compiled_for_it_and_the_bytes_do_not_depend_on_the_arch(unix32, tmp_path):
    assert (vm.mpy_arch("unix32"), vm.mpy_arch("unix64")) == ("x86", "x64")
    src = ROOT / "protocol" / "errors.py"
    x86 = build.compile_module(src, "lib/protocol/errors.py", vm.mpy_arch("unix32"))
    x64 = build.compile_module(src, "lib/protocol/errors.py", vm.mpy_arch("unix64"))
    assert x86 == x64 and x86[3] == 31            # bytecode only: no arch recorded, 31-bit small ints
    (tmp_path / "errors.mpy").write_bytes(x86)
    code = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport errors\n"
            "e = errors.UsageError('w', 'p', 'f')\nprint(str(e).replace(' ', '_'), 1 << 40)")
    for exe in (unix32, vm.micropython_exe("unix64")):
        assert run_vm(exe, code) == ["w:_p;_fix:_f", str(1 << 40)]


def test_the_virtual_build_takes_the_arch_of_its_vm(monkeypatch):
    seen = []
    monkeypatch.setattr(build, "compile_module", lambda src, flash_path, arch: seen.append(arch) or b"")
    from tools import boards
    build.app_files(boards.load(BOARD), "virtual", vm="unix32")
    assert set(seen) == {"x86"}
    seen.clear()
    monkeypatch.setenv(vm.ENV_VM, "unix64")
    build.app_files(boards.load(BOARD), "virtual")
    assert set(seen) == {"x64"}


# -- the cache -----------------------------------------------------------------------------------------------
def test_a_second_build_is_instant_and_the_same_binary(unix32):
    said = []
    t0 = time.monotonic()
    again = vm.build_unix32(progress=said.append)
    assert again == unix32 == vm.unix32_exe() and vm.skip_reason() is None
    assert time.monotonic() - t0 < 2 and said == []
    folder = Path(unix32).parent
    assert folder.parent == vm.cache_root() and folder.name == vm.cache_key()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".build-")], "a temp build dir was left"
    info = json.loads((folder / "info.json").read_text())
    assert info["source_sha256"] == vm.source_digest() and info["flags"] == vm.BUILD_FLAGS
    r = tool("tools.sim.vm", "build")
    assert r.returncode == 0 and r.stdout.strip() == unix32 and r.stderr == ""


def test_the_cache_key_follows_the_source_and_the_build_flags(tmp_path, monkeypatch):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    a.write_bytes(b"one source")
    b.write_bytes(b"another source")
    assert vm.source_digest(a) == hashlib.sha256(b"one source").hexdigest()
    key_a = vm.cache_key(a)
    assert key_a != vm.cache_key(b)
    monkeypatch.setattr(vm, "BUILD_FLAGS", vm.BUILD_FLAGS + " MICROPY_PY_BTREE=1")
    key_flags = vm.cache_key(a)
    assert key_flags != key_a
    monkeypatch.setattr(vm, "app_digest", lambda: "another app")       # a firmware change: another VM
    assert vm.cache_key(a) not in (key_a, key_flags)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vm.cache_root() == tmp_path / "xdg" / "prapa" / "vm"
    assert vm.unix32_exe(a) is None and "not built" in vm.skip_reason(a)


# -- refusals -------------------------------------------------------------------------------------------------
def test_an_unknown_vm_is_refused_naming_where_it_came_from_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(vm.ENV_VM, "unix16")
    with pytest.raises(UsageError) as e:
        vm.micropython_exe()
    assert e.value.where == "PRAPA_VM" and "'unix16'" in e.value.problem and "unix32" in e.value.fix
    with pytest.raises(UsageError) as e:
        vm.mpy_arch("esp32")
    assert e.value.where == "--vm"
    monkeypatch.setenv(vm.ENV_VM, "")
    assert vm.resolve() == vm.default_vm()
    from tools.sim import board
    assert board.micropython_exe() == board.micropython_exe(vm.default_vm())
    assert board.micropython_exe("unix64") == vm.unix64_exe()
    flash = tmp_path / "flash.img"
    r = tool("tools.cli", "board", "run", "--board", BOARD, "--role", "meter", "--flash", str(flash), "--vm", "unix16")
    assert r.returncode == 2 and "--vm: unknown VM 'unix16'" in r.stderr and not flash.exists()
    env = dict(os.environ, PRAPA_VM="bogus")
    r = tool("tools.sim.vm", "path", env=env)
    assert r.returncode == 2 and "PRAPA_VM: unknown VM 'bogus'" in r.stderr


def test_without_the_source_unix32_is_unavailable_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(vm.ENV_SOURCE, str(tmp_path / "nowhere.tar.gz"))
    reason = vm.skip_reason()
    assert vm.unix32_exe() is None and reason.startswith("PRAPA_VM_SOURCE=") and "no such file" in reason
    assert vm.cannot_build() == reason
    with pytest.raises(UsageError) as e:
        vm.micropython_exe("unix32")
    assert e.value.where == "--vm unix32" and reason in e.value.problem
    with pytest.raises(UsageError):
        vm.build_unix32(progress=lambda _m: None)
    env = dict(os.environ, PRAPA_VM_SOURCE=str(tmp_path / "nowhere.tar.gz"))
    r = tool("tools.sim.vm", "build", env=env)
    assert r.returncode == 2 and "PRAPA_VM_SOURCE=" in r.stderr and "fix:" in r.stderr
    r = tool("tools.sim.vm", "path", "--vm", "unix32", env=env)
    assert r.returncode == 1 and r.stdout == ""
    r = tool("tools.sim.vm", "info", "--json", env=env)
    row = json.loads(r.stdout)["vms"]["unix32"]
    assert r.returncode == 0 and row["available"] is False and row["reason"] == reason


def test_a_gcc_that_cannot_build_32_bit_programs_is_named_with_the_package_to_install(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcc").write_text("#!/bin/sh\necho 'fatal error: bits/libc-header-start.h: No such file' >&2\nexit 1\n")
    (bin_dir / "gcc").chmod(0o755)
    (bin_dir / "make").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(vm, "_toolchain", {})                # the real host's answer is kept per process
    source = tmp_path / "micropython-1.28.0-src.tar.gz"
    source.write_bytes(b"not built yet")
    reason = vm.skip_reason(source, tmp_path / "cache")
    assert reason.startswith("not built, and cannot be: gcc cannot build 32-bit programs (fatal error: ")
    assert "gcc-multilib" in reason and vm.cannot_build(source) == vm.toolchain_problem()
    with pytest.raises(UsageError) as e:
        vm.build_unix32(source, tmp_path / "cache", progress=lambda _m: None)
    assert "gcc-multilib" in e.value.fix and not (tmp_path / "cache").exists()


# -- a virtual board on the 32-bit VM -------------------------------------------------------------------------
def test_a_virtual_board_boots_to_its_banner_on_the_32_bit_vm(unix32, tmp_path):
    from tools.sim.process import BoardProcess
    vb = BoardProcess(BOARD, "meter", tmp_path / "flash.img", vm="unix32")
    try:
        assert vb.vm == "unix32"
        assert os.path.realpath(f"/proc/{vb.status()['vm_pid']}/exe") == os.path.realpath(unix32)
        seen = b""
        with serial.Serial(vb.console_port, timeout=0.1) as s:
            end = time.monotonic() + 20
            while time.monotonic() < end and not BANNER_BYTES.search(seen):
                seen += s.read(4096)
    finally:
        vb.close()
    text = seen.decode(errors="replace")
    assert re.search(r"prapa \S+ board=esp32-devkitc role=meter boot=1 reset=power_on heap_free=\d+ "
                     r"heap_budget=112640", text), text


def test_the_unix32_vm_carries_the_app_frozen(unix32, tmp_path):
    """As an ESP32 built with prapa build's frozen_manifest.py: the app imports with nothing on the
    filesystem (cwd empty, MICROPYPATH only .frozen), from bytecode in the binary, not the heap."""
    r = subprocess.run([unix32, "-c", "import gc\ngc.collect()\na = gc.mem_free()\n"
                        "import runtime, uplink, roles.meter, protocol.roles.meter, protocol.config\n"
                        "gc.collect()\nprint('imported', a - gc.mem_free())"],
                       cwd=tmp_path, env=dict(os.environ, MICROPYPATH=".frozen"), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    word, held = r.stdout.split()
    assert word == "imported" and int(held) < 20000      # as .mpy in the heap the same modules hold ~50 KB
    info = json.loads((Path(unix32).parent / "info.json").read_text())
    assert info["app_sha256"] == vm.app_digest() and "runtime.py" in info["frozen"]



def test_pruning_old_builds_spares_one_a_process_runs(tmp_path):
    """Only the newest few builds stay, but never one a process runs now: a campaign in another worktree
    starts its VMs again at every power cut."""
    import shutil
    from tools.sim import vm as vms
    builds = []
    for i in range(6):
        b = tmp_path / f"unix32-1.28.0-{i:016x}"
        b.mkdir()
        shutil.copy("/bin/sleep", b / "micropython")
        os.utime(b, (1000 + i, 1000 + i))                 # 0 oldest ... 5 newest
        builds.append(b)
    running = subprocess.Popen([str(builds[0] / "micropython"), "30"])
    try:
        time.sleep(0.2)
        vms._prune(tmp_path, keep=builds[5].name)
    finally:
        running.kill()
        running.wait()
    assert [b.exists() for b in builds] == [True, False, True, True, True, True]
