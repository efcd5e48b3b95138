"""The qemu target: Espressif's QEMU fork (qemu-system-xtensa -machine esp32).

It boots a merged flash image (MicroPython firmware + our vfs image) and
exposes the console UART as a pty. Debian's QEMU has no esp32 machine, so
without Espressif's build on PATH every test skips, saying what to install.
"""

import re
import shutil
import subprocess

import pytest

from hil_tests.targets.base import BoardHandle
from tools import boards, image

QEMU = "qemu-system-xtensa"
INSTALL_HINT = (f"{QEMU} with the esp32 machine (Espressif's QEMU fork) is not on PATH; install it with "
                "ESP-IDF's `idf_tools.py install qemu-xtensa` and pass --qemu-firmware FIRMWARE.bin "
                "(a MicroPython ESP32_GENERIC merged image) to run --target qemu")


def unavailable_reason(options):
    if shutil.which(QEMU) is None:
        return INSTALL_HINT
    if not options.qemu_firmware:
        return f"--target qemu needs --qemu-firmware FIRMWARE.bin ({INSTALL_HINT})"
    return None


class QemuBoard(BoardHandle):
    target = "qemu"

    def __init__(self, board, role, proc, console):
        super().__init__(board, role, console, console)
        self.proc = proc

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def open_board(options, tmp_path, board_name, role, **wishes):
    reason = unavailable_reason(options)
    if reason:
        pytest.skip(reason)
    board = boards.load(board_name)
    flash = tmp_path / "flash.bin"
    merged = bytearray(open(options.qemu_firmware, "rb").read())
    merged.extend(b"\xff" * (board.flash_size_bytes - len(merged)))
    merged[board.vfs_offset:board.vfs_offset + board.vfs_size_bytes] = image.build(board, role, "esp32")
    flash.write_bytes(merged)
    proc = subprocess.Popen([QEMU, "-nographic", "-machine", "esp32", "-drive", f"file={flash},if=mtd,format=raw",
                             "-serial", "pty"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"char device redirected to (/dev/pts/\d+)", line)
        if m:
            return QemuBoard(board, role, proc, m.group(1))
    proc.wait()
    pytest.fail(f"{QEMU} exited without giving a serial pty")
