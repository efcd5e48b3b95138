"""The serial target: a real board on USB, flashed with our firmware.

--port is its console (the USB-serial of the module), --uart-port the data
link (a USB-RS485 adapter or a second USB-serial on the link UART). In CI the
same code runs against a virtual board's pseudo-terminals.
"""

from hil_tests.targets.base import BoardHandle
from tools import boards


class SerialBoard(BoardHandle):
    target = "serial"


def open_board(options, tmp_path, board_name, role, **wishes):
    return SerialBoard(boards.load(board_name), role, options.port, options.uart_port)
