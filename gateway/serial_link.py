"""A serial port (USB-serial or an RS-485 adapter) carrying board frames.

pyserial is blocking, so a link is pumped from its own thread; what it reads
goes to Sessions.feed under the caller's lock, and downlink frames are written
whole (one write per frame, so frames on a multi-drop bus never interleave).
"""

import threading

import serial


class SerialLink:
    framed = True          # frames travel COBS-encoded with an address and a CRC

    def __init__(self, port, baudrate=115200, read_timeout_s=0.01):
        self.port = port
        self.serial = serial.Serial(port, baudrate, timeout=read_timeout_s)
        self._write_lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0

    def read(self):
        """Whatever has arrived (waits at most read_timeout_s); b"" on a quiet line."""
        data = self.serial.read(max(1, self.serial.in_waiting))
        self.bytes_in += len(data)
        return data

    def write(self, _addr, data):
        with self._write_lock:
            self.serial.write(data)
            self.bytes_out += len(data)

    def close(self):
        self.serial.close()
