"""The HIL plugin: --target picks where boards come from; tests never know.

  --target unix     virtual boards (`prapa board run`), the default; --vm unix32|unix64 picks their
                    MicroPython VM (default: $PRAPA_VM, else unix32 when built, else unix64)
  --target serial   a real board: --port CONSOLE [--uart-port LINK]
  --target qemu     Espressif's QEMU (skips when it is not installed)

Fixtures: `board` (one board, fresh flash on the unix target), `board_factory`
(boards with wishes: speed, clock start, world parameters), `console` (a
pytest-embedded Dut on the board's REPL), `link` (pyserial on the data UART),
`broker` (a real Mosquitto on loopback).
"""

import importlib
import os

import pytest
import serial

TARGETS = ("unix", "serial", "qemu")


def pytest_addoption(parser):
    group = parser.getgroup("prapa-hil", "prapa hardware-in-the-loop")
    group.addoption("--target", choices=TARGETS, default="unix", help="where boards come from (default unix)")
    group.addoption("--port", help="console port of a real board (serial target), e.g. /dev/ttyUSB0")
    group.addoption("--uart-port", help="data-link port of a real board (serial target), e.g. /dev/ttyUSB1")
    group.addoption("--board", default="esp32-devkitc", help="board definition (default esp32-devkitc)")
    group.addoption("--role", default="meter", help="role the board runs (default meter)")
    group.addoption("--qemu-firmware", help="MicroPython merged firmware image for the qemu target")
    group.addoption("--vm", choices=("unix32", "unix64"), default=None,
                    help="the unix target's MicroPython VM: unix32 (32-bit, single floats, like an ESP32) or "
                    "unix64 (the PyPI VM); default: $PRAPA_VM, else unix32 when built (python -m tools.sim.vm "
                    "build), else unix64. The whole session then runs on it (it sets $PRAPA_VM)")


def pytest_configure(config):
    if config.getoption("--target") == "serial" and not config.getoption("--port"):
        raise pytest.UsageError("--target serial needs --port CONSOLE (and --uart-port LINK for link tests)")
    asked, config.option.vm = config.getoption("--vm"), None      # the resolved VM, on the unix target only
    if config.getoption("--target") == "unix":
        from protocol.errors import UsageError
        from tools.sim import vm as vms
        try:
            if not asked and not os.environ.get(vms.ENV_VM) and vms.unix32_exe() is None and not vms.cannot_build():
                # the reference VM is stale (the app changed: it is frozen in) or not built yet: build it now
                vms.build_unix32(progress=lambda msg: print(f"prapa HIL: {msg}", flush=True))
            config.option.vm = vms.resolve(asked)
            vms.micropython_exe(config.option.vm)       # an unbuilt unix32 is refused here, with the fix
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
        os.environ[vms.ENV_VM] = config.option.vm   # boards, the VM runner and the rigs of this session: one VM


def pytest_report_header(config):
    if config.getoption("--target") != "unix":
        return f"prapa HIL: target {config.getoption('--target')}"
    from tools.sim import vm as vms
    vm = config.option.vm
    return f"prapa HIL: target unix, VM {vm} ({vms.ABOUT[vm]}): {vms.micropython_exe(vm)}"


@pytest.fixture(scope="session")
def hil_options(request):
    return request.config.option


@pytest.fixture
def board_factory(hil_options, tmp_path):
    module = importlib.import_module(f"hil_tests.targets.{hil_options.target}")
    opened = []

    def make(**wishes):
        folder = tmp_path / f"board{len(opened)}"
        folder.mkdir()
        handle = module.open_board(hil_options, folder, hil_options.board, hil_options.role, **wishes)
        opened.append(handle)
        return handle

    yield make
    for handle in reversed(opened):
        handle.close()


@pytest.fixture
def board(board_factory):
    return board_factory()


@pytest.fixture
def console(board, tmp_path):
    """Opens the board's console as a pytest-embedded Dut: `with console() as dut:`."""
    from hil_tests.dut import serial_dut
    return lambda: serial_dut(board.console_port, str(tmp_path))


@pytest.fixture
def link(board):
    if not board.uart_port:
        pytest.skip("no data-link port for this board: pass --uart-port")
    port = serial.Serial(board.uart_port, 115200, timeout=0.2)
    yield port
    port.close()


@pytest.fixture
def needs_world(board):
    if not board.has_world:
        pytest.skip(f"needs the world simulator; target {board.target} has none")


@pytest.fixture
def needs_power_switch(board):
    if not board.has_power_switch:
        pytest.skip(f"needs a power switch; target {board.target} has none")


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    from tools.broker import Broker
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()
