# prapa protocol: the same code on the board (MicroPython) and the gateway (CPython).
