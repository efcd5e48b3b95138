"""The virtual board: the real MicroPython VM on a littlefs flash image, with
pseudo-terminals for its UART and console, a world simulator for its sensors,
and a bench that powers, resets and watches it."""
