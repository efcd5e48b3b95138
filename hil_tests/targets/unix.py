"""The unix target: virtual boards (`prapa board run`, the firmware on the real MicroPython VM:
unix32 or unix64, the plugin's --vm)."""

from hil_tests.targets.base import BoardHandle
from tools.sim.process import BoardProcess


class VirtualBoard(BoardProcess, BoardHandle):
    target = "unix"
    has_world = True
    has_power_switch = True


def open_board(options, tmp_path, board_name, role, **wishes):
    """A virtual board on the session's VM (the plugin's --vm: unix32 or unix64)."""
    wishes.setdefault("vm", getattr(options, "vm", None))
    return VirtualBoard(board_name, role, tmp_path / "flash.img", **wishes)
