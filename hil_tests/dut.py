"""pytest-embedded's serial Dut on a board's console, without its ESP-IDF plugin.

Its Serial reader thread writes what the board prints to a log file, and
SerialDut.expect() runs pexpect over that file: the same expect/write API
Espressif's HIL suites use, on any port (a USB board or a virtual board's pty).
"""

import contextlib
import os

from pytest_embedded.app import App
from pytest_embedded.log import PexpectProcess
from pytest_embedded_serial import Serial, SerialDut


class _LogSink:
    """Stands in for pytest-embedded's message queue: Serial only calls put()."""

    def __init__(self, path):
        self._f = open(path, "ab", buffering=0)

    def put(self, data, **_):
        if data and not self._f.closed:
            self._f.write(data if isinstance(data, bytes) else data.encode())

    write = put

    def close(self):
        self._f.close()


@contextlib.contextmanager
def serial_dut(port, logdir, name="console", baud=115200):
    """Open the console; close it before the board goes away (else pyserial retries for seconds)."""
    logfile = os.path.join(logdir, f"{name}.log")
    open(logfile, "ab").close()
    sink = _LogSink(logfile)
    pexpect_proc = PexpectProcess(os.open(logfile, os.O_RDONLY))
    ser = None
    try:
        ser = Serial(msg_queue=sink, port=port, baud=baud)
        yield SerialDut(serial=ser, pexpect_proc=pexpect_proc, msg_queue=sink, app=App(),
                        pexpect_logfile=logfile, test_case_name=name)
    finally:
        if ser is not None:
            ser.close()
        pexpect_proc.close()
        sink.close()
