"""The VM is the board's: CPython-only code and over-budget allocations fail
here the way they fail on an ESP32."""

import pytest


def test_firmware_module_importing_dataclasses_fails_on_the_board(board, tmp_path):
    mod = tmp_path / "reading.py"
    mod.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Reading:\n    litres: int\n")
    r = board.mpremote("cp", str(mod), ":lib/reading.py", "+", "exec",
                       "try:\n import reading\n print('IMPORTED')\nexcept ImportError as e:\n print('ImportError', e)")
    assert r.returncode == 0, r.stderr
    assert "ImportError" in r.stdout and "IMPORTED" not in r.stdout


@pytest.mark.parametrize("module", ["typing", "dataclasses", "pathlib"])
def test_cpython_only_modules_are_absent(board, module):
    out = board.exec(f"try:\n import {module}\n print('PRESENT')\nexcept ImportError:\n print('ABSENT')")
    assert out.strip() == "ABSENT"


def test_allocating_past_the_heap_budget_raises_memory_error(board):
    # A list slot is one machine word on both sides, so a list of budget/4 slots
    # is the whole budget on the ESP32 and on the virtual board's 'w'-scaled heap.
    words = board.board.heap_budget_bytes // 4
    out = board.exec(
        "import gc\n"
        "gc.collect()\n"
        "try:\n"
        f" big = [0] * {words}\n"
        " print('ALLOCATED')\n"
        "except MemoryError:\n"
        " print('MemoryError')\n"
        "gc.collect()\n"
        f"half = [0] * {words // 2}\n"
        "print('HALF_OK')\n")
    assert "MemoryError" in out and "ALLOCATED" not in out
    assert "HALF_OK" in out


def test_clock_wraps_at_2_30_like_an_esp32(board_factory):
    board = board_factory(start_ticks_ms=(1 << 30) - 1000)     # one second before the wrap (ignored on hardware)
    out = board.exec(
        "from hal import open_hal\n"
        "import time\n"
        "h = open_hal()\n"
        "a = h.ticks_ms()\n"
        "time.sleep_ms(1500)\n"
        "b = h.ticks_ms()\n"
        "print(a, b, h.ticks_diff(b, a), h.ticks_add((1 << 30) - 1, 1))\n")
    a, b, diff, wrapped = (int(x) for x in out.split())
    assert 0 <= a < 1 << 30 and 0 <= b < 1 << 30
    assert 1400 <= diff <= 3000
    assert wrapped == 0
    if board.target == "unix":
        assert a > b, "the virtual clock started 1 s before the wrap, so it must have wrapped"


def test_protocol_runs_on_the_board_with_its_own_cryptolib(board):
    """RFC 3610 packet vector #1 through the board's protocol/ccm.py and the VM's cryptolib."""
    out = board.exec("from protocol.ccm import Ccm\n"
                     "print(Ccm(bytes(range(0xC0, 0xD0))).seal(bytes.fromhex('00000003020100A0A1A2A3A4A5'), "
                     "bytes(range(8)), bytes(range(8, 0x1F))).hex())\n")
    assert out.strip() == "588c979a61c663d2f066d0c2c0f989806d5f6b61dac38417e8d12cfdf926e0"
