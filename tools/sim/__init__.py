"""The virtual board: the real MicroPython VM on a littlefs flash image, with
pseudo-terminals for its UART and console, a world simulator for its sensors,
and a harness that powers, resets and watches it (board.py); process.py runs
it as a child process; worlds/ holds one world model per role. Rigs that put a
board beside a one-link gateway are in tools/rigs."""
