"""The HIL suite's other targets, exercised here: `serial` against a virtual
board's pseudo-terminals (the code path a real board on /dev/ttyUSB0 takes),
and `qemu`, which must skip with a reason saying what to install."""

import re
import subprocess
import sys
from pathlib import Path

from hil_tests.targets.unix import VirtualBoard

ROOT = Path(__file__).resolve().parents[2]


BOARD_TESTS = [str(ROOT / "hil_tests" / "test_board.py"), str(ROOT / "hil_tests" / "test_vm_is_real.py")]


def run_suite(*args, paths=(str(ROOT / "hil_tests"),)):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *paths, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_serial_target_runs_the_same_suite_on_a_board_it_did_not_start(tmp_path):
    board = VirtualBoard("esp32-devkitc", "meter", tmp_path / "flash.img")
    try:
        r = run_suite("--target", "serial", "--port", board.console_port, "--uart-port", board.uart_port)
    finally:
        board.close()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
    assert passed >= 8
    # What needs the bench's world or power switch skips, saying why.
    assert "needs the world simulator" in r.stdout and "needs a power switch" in r.stdout


def test_serial_target_without_a_port_is_a_usage_error():
    r = run_suite("--target", "serial")
    assert r.returncode == 4 and "--target serial needs --port" in r.stderr


def test_qemu_target_skips_every_board_test_with_what_to_install():
    r = run_suite("--target", "qemu", paths=BOARD_TESTS)
    assert r.returncode == 0, r.stdout[-2000:]
    assert " passed" not in r.stdout and re.search(r"\d+ skipped", r.stdout)
    assert "qemu-system-xtensa" in r.stdout and "idf_tools.py install qemu-xtensa" in r.stdout
