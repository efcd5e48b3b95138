# The virtual board's boot ROM: what an ESP32's frozen _boot.py does, then
# boot.py and main.py from flash. The bench starts it as
#   micropython -X heapsize=<budget> -i vboot.py    (<budget>w on the 64-bit VM)
# with its parameters as JSON in PRAPA_VBOARD; -i gives the REPL afterwards,
# as an ESP32 gives one when main.py ends or is interrupted.


def _rom_boot():
    import json
    import os
    import sys
    import vfs

    import _vboard
    import machine  # noqa: F401  (cached now: the host path vanishes below)

    p = json.loads(os.getenv("PRAPA_VBOARD"))
    _vboard.PARAMS = p
    p["world_in"] = open(p["world_in_fd"], "rb")
    p["world_out"] = open(p["world_out_fd"], "wb")
    f = open(p["flash_path"], "r+b")
    bdev = _vboard.FileBlockDevice(f, p["block_size"], p["block_count"])
    p["bdev"] = bdev
    vfs.umount("/")
    try:
        vfs.mount(vfs.VfsLfs2(bdev), "/")
    except OSError:
        # As inisetup.py on an ESP32: a blank or unreadable partition is formatted.
        print("Flash filesystem not found: formatting the vfs partition")
        vfs.VfsLfs2.mkfs(bdev)
        vfs.mount(vfs.VfsLfs2(bdev), "/")
        with open("boot.py", "w") as b:
            b.write("# This file is executed on every boot (including wake-boot from deepsleep)\n")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]   # as on an ESP32
    # Flash is mounted: from here a Ctrl-C meets boot.py or main.py, as on a
    # board. Tell the bench to let console input through.
    p["world_out"].write(bytes((_vboard.K_BOOTED,)) + bytes(15))
    return p["run_main"]


def _rom_run(name):
    import os
    try:
        os.stat(name)
    except OSError:
        return
    with open(name) as f:
        source = f.read()
    exec(source, globals())


_run_main = _rom_boot()
del _rom_boot
_rom_run("boot.py")
if _run_main:
    _rom_run("main.py")
del _run_main, _rom_run
