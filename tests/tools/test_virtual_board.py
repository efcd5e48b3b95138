"""The virtual board's bench (tools/sim/board.py) as its users drive it: started off, switched on."""

import time

import pytest

from protocol.errors import BoardError
from tools.console import ConsoleReader, parse_banner
from tools.rigs.board import BOARD, commissioned_flash
from tools.sim.process import BoardProcess


def test_a_board_started_off_boots_once_switched_on_and_a_console_opened_before_sees_its_first_boot(tmp_path):
    """Opening a serial port flushes what waits on it (pyserial does), so a console opened after the
    first boot printed would miss its banner; a board started off waits for power_on() instead."""
    board = BoardProcess(BOARD, "meter", commissioned_flash(tmp_path, "meter"), powered=False)
    console = ConsoleReader(board.console_port)
    try:
        status = board.status()
        assert status["vm_pid"] is None and status["resets"]["power_on"] == 0
        time.sleep(0.3)
        assert console.lines == []                                   # off: nothing runs, nothing printed
        board.power_on()
        _i, banner = console.wait_for(parse_banner, timeout=30)
        assert banner["boot"] == 1 and banner["reset"] == "power_on"
        assert board.status()["resets"]["power_on"] == 1
        with pytest.raises(BoardError, match="on already"):
            board.power_on()
    finally:
        console.close()
        board.close()
