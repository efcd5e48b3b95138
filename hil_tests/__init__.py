"""Hardware-in-the-loop suite: the same tests on a virtual board, QEMU or a real board."""
