"""prapa flash: MicroPython and our littlefs image onto an ESP32 with esptool, or the app alone with mpremote.

Everything that can be checked without touching the board is checked first (the
files, their sizes, the board definition inside the image, the port), so a
refusal writes nothing. The chip is asked before a byte is written.

Full flash: esptool writes the technician's MicroPython firmware and the vfs
image, then compares the flash's MD5 with the files' (verify_flash), so a
flaky USB cable is caught at the bench, not at the meter.

--app-only: a board already running MicroPython gets the app over its REPL.
Each file goes to NAME.new, is hashed on the board, and only then renamed over
NAME, so a copy cut short leaves the old app whole. The board's config and key
are never touched (the placeholder config is written only where none exists).
"""

import ast
import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from tools import boards, build
from tools.console import BANNER, ConsoleReader
from tools.sim import vm as vms
from protocol.errors import BoardError, UsageError
from tools import args as types

# Where a MicroPython firmware .bin (bootloader + partition table + app) starts, per chip.
FIRMWARE_OFFSET = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0}
ESP_IMAGE_MAGIC = 0xE9
# sys.implementation._mpy >> 10 for each mpy-cross -march (MicroPython py/persistentcode.h).
MPY_ARCH = {"x86": 1, "x64": 2, "xtensa": 8, "xtensawin": 9, "rv32imc": 10}
MPY_VERSION, MPY_SUB_VERSION = 6, 3          # what mpy-cross 1.29 emits
BOOT_TIMEOUT_S = 20


class FlashFailed(RuntimeError):
    """The board or the link failed (not bad input): exit 1."""


def add_parser(sub):
    p = sub.add_parser(
        "flash", help="flash MicroPython and the app image (esptool), or the app alone (mpremote)",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:4]))
    p.add_argument("--port", required=True, help="the board's USB serial port, e.g. /dev/ttyUSB0")
    p.add_argument("--board", required=True, type=types.board, help="board name from boards/ (see: prapa board list) or a .toml path")
    p.add_argument("--role", required=True, help="the role the board serves (protocol/roles: one of the roles the board fits)")
    p.add_argument("--firmware", metavar="BIN", type=types.existing_file, help="MicroPython firmware .bin for the chip (from micropython.org); "
                   "written at 0x1000 (esp32) or 0x0 (esp32s3). Without it only the image is written")
    p.add_argument("--image", metavar="IMG", type=types.existing_file, help="image from prapa build (default: built now, idle until commissioned)")
    p.add_argument("--app-only", action="store_true",
                   help="copy the app onto a board already running MicroPython (mpremote); config and key stay")
    p.add_argument("--baud", type=types.whole(1, 5_000_000), help="serial rate (default: 460800 for esptool, the console's 115200 "
                   "for --app-only)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")
    p.set_defaults(func=run)


def run(args):
    board = boards.load(args.board)
    board.check_role(args.role)
    if args.baud is not None and args.baud not in (9600, 57600, 115200, 230400, 460800, 921600, 1500000, 2000000):
        raise UsageError("--baud", f"{args.baud} is not a rate esptool and the USB bridges use",
                         "use 115200, 460800 or 921600")
    try:
        if args.app_only:
            for flag, value in (("--firmware", args.firmware), ("--image", args.image)):
                if value:
                    raise UsageError(flag, "not used with --app-only", f"drop {flag}, or drop --app-only for a full flash")
            check_port(args.port)
            result = flash_app(board, args.role, args.port, args.baud or 115200, args.json)
        else:
            firmware = check_firmware(board, args.firmware) if args.firmware else None
            img = check_image(board, args.role, args.image) if args.image else None
            check_port(args.port)
            if img is None:
                img, _files = build.build(board, args.role, "esp32", progress=build.Counter("mpy-cross", args.json))
            result = flash_full(board, args.port, args.baud or 460800, firmware, img)
    except (FlashFailed, build.BuildFailed) as exc:
        _say(args.json, {"ok": False, "error": str(exc)}, f"prapa: flash failed: {exc}")
        return 1
    _say(args.json, {"ok": True, **result}, _summary(result))
    return 0


def _say(as_json, obj, text):
    if as_json:
        print(json.dumps(obj))
    else:
        print(text, file=sys.stderr if not obj.get("ok") else sys.stdout)


def _summary(r):
    if r["mode"] == "app-only":
        return (f"{r['port']}: app copied ({r['copied']} files changed, {r['unchanged']} unchanged, "
                f"{r['target']}), hashes verified on the board; booted: {r['banner']}")
    return (f"{r['port']}: {r['chip']} flashed ({', '.join(r['written'])}), verified against the flash's hashes")


# -- checks that touch nothing ---------------------------------------------------------------------
def check_port(port):
    """Refuse a missing port, or one another program holds (pyserial, esptool and mpremote all lock it)."""
    import serial
    if not os.path.exists(port):
        raise UsageError("--port", f"{port}: no such port",
                         "plug the board in and give its port (list them: python -m serial.tools.list_ports)")
    try:
        serial.Serial(port, exclusive=True).close()
    except serial.SerialException as exc:
        if "lock" in str(exc).lower() or "busy" in str(exc).lower():
            raise UsageError("--port", f"{port} is busy: another program has it open",
                             "close the serial monitor (prapa monitor, mpremote, screen, an IDE) and retry") from None
        raise UsageError("--port", f"{port}: cannot open it ({exc})",
                         "check the cable, and that you may use the port (group dialout)") from None


def check_firmware(board, path):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError("--firmware", f"{path}: {exc.strerror or exc}", "give the MicroPython .bin you downloaded") from None
    offset = FIRMWARE_OFFSET[board.chip]
    if not data or data[0] != ESP_IMAGE_MAGIC:
        raise UsageError("--firmware", f"{path} is not an ESP firmware image (no 0xE9 header)",
                         f"download the {board.chip.upper()} .bin from micropython.org/download")
    if offset + len(data) > board.vfs_offset:
        raise UsageError("--firmware", f"{path} is {len(data)} bytes and would run from 0x{offset:x} into the vfs "
                         f"partition at 0x{board.vfs_offset:x}", f"use the firmware built for board {board.name}")
    return offset, data


def check_image(board, role, path):
    """The image's bytes, once it is known to be this board's vfs partition for this role."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError("--image", f"{path}: {exc.strerror or exc}", "give an image from prapa build") from None
    if len(data) > board.vfs_size_bytes:
        raise UsageError("--image", f"{path} is {len(data)} bytes, too big for board {board.name}'s "
                         f"{board.vfs_size_bytes}-byte vfs partition", f"build it with: prapa build --board {board.name}")
    if len(data) != board.vfs_size_bytes or len(data) % board.block_size:
        raise UsageError("--image", f"{path} is {len(data)} bytes, not board {board.name}'s "
                         f"{board.vfs_size_bytes}-byte vfs partition", f"build it with: prapa build --board {board.name}")
    from littlefs import LittleFS, LittleFSError          # the tools extra
    fs = LittleFS(block_size=board.block_size, block_count=len(data) // board.block_size, mount=False)
    fs.context.buffer = bytearray(data)
    try:
        fs.mount()
        with fs.open("board.json", "r") as f:
            inside = json.loads(f.read())
        names = set(fs.listdir("lib"))
    except (LittleFSError, ValueError, OSError):
        raise UsageError("--image", f"{path} is not a prapa littlefs image (no readable /board.json)",
                         f"build one with: prapa build --board {board.name} --role {role}") from None
    if inside.get("name") != board.name:
        raise UsageError("--image", f"{path} was built for board {inside.get('name')!r}, not {board.name!r}",
                         f"build it with --board {board.name}, or pass --board {inside.get('name')}")
    if inside.get("role") != role:
        raise UsageError("--image", f"{path} was built for role {inside.get('role')!r}, not {role!r}",
                         f"build it with --role {role}, or pass --role {inside.get('role')}")
    if names & {"hal_virtual.py", "hal_virtual.mpy"}:
        raise UsageError("--image", f"{path} was built for the virtual board", "rebuild it with --target esp32")
    return data


# -- full flash: esptool -------------------------------------------------------------------------------
def flash_full(board, port, baud, firmware, img):
    """esptool as a library; its progress goes to stderr so --json keeps stdout to one object."""
    from esptool import cmds
    from esptool.util import FatalError
    regions = ([firmware] if firmware else []) + [(board.vfs_offset, img)]
    esp = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            esp = cmds.detect_chip(port, 115200)
            chip = esp.CHIP_NAME.lower().replace("-", "")
            if chip != board.chip:
                raise UsageError("--board", f"the chip on {port} is an {esp.CHIP_NAME}, board {board.name} is {board.chip}",
                                 "pick the board definition for this chip (prapa board list) or plug in the right board")
            esp = cmds.run_stub(esp)
            if baud != 115200:
                esp.change_baud(baud)
            cmds.attach_flash(esp)
            size = cmds.detect_flash_size(esp)
            if size and _mib(size) < board.flash_size_bytes:
                raise UsageError("--board", f"the board on {port} has {size} of flash, {board.name} needs "
                                 f"{board.flash_size_bytes >> 20}MB", "pick the board definition for this module")
            cmds.write_flash(esp, regions, compress=True)
            cmds.verify_flash(esp, regions)
    except FatalError as exc:
        raise FlashFailed(f"esptool on {port}: {' '.join(str(exc).split())}") from None
    finally:
        if esp is not None:     # out of the bootloader, refused or not: the board runs what it has
            with contextlib.suppress(Exception), contextlib.redirect_stdout(sys.stderr):
                cmds.reset_chip(esp, "hard-reset")
            esp._port.close()
    written = [f"firmware {len(d)} B at 0x{o:x}" for o, d in regions[:-1]]
    written.append(f"image {len(img)} B at 0x{board.vfs_offset:x}")
    return {"mode": "full", "port": port, "chip": board.chip, "written": written,
            "image_sha256": hashlib.sha256(img).hexdigest(), "verified": True}


def _mib(esptool_size):
    m = re.match(r"(\d+)MB", esptool_size)
    return int(m.group(1)) << 20 if m else 0


# -- app only: mpremote -----------------------------------------------------------------------------------
HASH_FN = """
import hashlib, binascii
def _prapa_h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256(); b = bytearray(512); m = memoryview(b)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(m[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
"""


def _hashes(t, paths):
    out = t.exec(HASH_FN + "print(repr([_prapa_h(p) for p in %r]))" % (list(paths),))
    return dict(zip(paths, ast.literal_eval(out.decode().strip())))


def flash_app(board, role, port, baud, quiet):
    from mpremote.transport import TransportError, TransportExecError
    from mpremote.transport_serial import SerialTransport
    try:
        t = SerialTransport(port, baudrate=baud)
    except TransportError as exc:
        raise FlashFailed(f"cannot open {port}: {exc}") from None
    try:
        try:
            t.enter_raw_repl(soft_reset=True)   # the app stops: nothing writes flash while we copy
        except TransportError:
            raise FlashFailed(f"no MicroPython REPL on {port}; flash MicroPython first: "
                              f"prapa flash --port {port} --board {board.name} --role {role} --firmware BIN") from None
        try:
            target, vm = _target_of(t, board, port)
            files = [(p, d) for p, d, _s in build.app_files(board, target, build.Counter("mpy-cross", quiet), vm=vm)]
            files.append(("board.json", board.as_firmware_json(role).encode()))
            result = _copy(t, files, role, quiet)
            t.exec_raw_no_follow("import machine\nmachine.reset()")
        except (TransportError, TransportExecError) as exc:
            _restart_app(t)
            raise FlashFailed(f"the board on {port} stopped answering: {exc}; the old app is whole unless "
                              "this came after the rename, run again") from None
        except (UsageError, FlashFailed):
            _restart_app(t)
            raise
        banner = _wait_banner(t.serial)
    finally:
        with contextlib.suppress(Exception):
            t.close()
    if banner is None:
        raise FlashFailed(f"the app is on the board (hashes verified) but no prapa banner came within "
                          f"{BOOT_TIMEOUT_S} s of the reset; watch the console: mpremote connect {port} repl")
    return {"mode": "app-only", "port": port, "target": target, "banner": banner, "verified": True, **result}


def _restart_app(t):
    """A refusal leaves the board running its old app, not parked in the raw REPL."""
    with contextlib.suppress(Exception):
        t.exit_raw_repl()
        t.read_until(1, b">>> ", timeout_overall=5)   # Ctrl-D in the raw REPL would not run main.py
        t.serial.write(b"\x04")   # Ctrl-D at the friendly REPL: soft reboot into main.py
        t.serial.flush()


def _virtual_vm(mpy):
    """The VM (tools/sim/vm.py) a virtual board runs on, from the native arch it reports; None: the default."""
    return next((name for name in vms.VMS if MPY_ARCH[vms.mpy_arch(name)] == mpy >> 10), None)


def _target_of(t, board, port):
    """(target, vm): which build the board runs (esp32 .mpy, or the virtual board's and on which VM),
    refusing one it cannot load."""
    info = t.exec("import sys\nprint(repr((sys.platform, getattr(sys.implementation, '_mpy', 0), "
                  "getattr(sys.implementation, '_machine', ''))))")
    platform, mpy, machine = ast.literal_eval(info.decode().strip())
    vm = None
    if platform == "linux":
        vm = _virtual_vm(mpy) or vms.resolve()
        target, arch = "virtual", vms.mpy_arch(vm)
    elif platform == "esp32":
        target, arch = "esp32", board.arch
        chip = "esp32" + (re.search(r"ESP32-?(S2|S3|C3|C6)", machine.upper()) or [None, ""])[1].lower()
        if chip != board.chip:
            raise UsageError("--board", f"the board on {port} reports {machine!r}, board {board.name} is {board.chip}",
                             "pick the board definition for this chip (prapa board list)")
    else:
        raise UsageError("--port", f"the board on {port} runs MicroPython for {platform!r}", "use an ESP32 or a virtual board")
    if (mpy & 0xFF, (mpy >> 8) & 3) != (MPY_VERSION, MPY_SUB_VERSION):
        raise UsageError("--port", f"the MicroPython on {port} loads .mpy v{mpy & 0xFF}.{(mpy >> 8) & 3}, "
                         f"the app is v{MPY_VERSION}.{MPY_SUB_VERSION}",
                         "flash MicroPython 1.23 or newer first (prapa flash --firmware BIN)")
    if mpy >> 10 and mpy >> 10 != MPY_ARCH.get(arch):
        raise UsageError("--board", f"the board on {port} has native arch {mpy >> 10}, board {board.name} "
                         f"says {arch}", "pick the board definition for this chip (prapa board list)")
    _refuse_frozen_app(t, port)
    on_board = _read_json(t, "board.json")
    if on_board and on_board.get("name") not in (None, board.name):
        raise UsageError("--board", f"the board on {port} was flashed as {on_board.get('name')!r}, not {board.name!r}",
                         f"pass --board {on_board.get('name')}, or reflash it whole (without --app-only)")
    return target, vm


def _refuse_frozen_app(t, port):
    """A firmware built with the app frozen in (frozen_manifest.py) runs that app before /lib: files
    copied there would change nothing that runs, and the technician would think the board updated."""
    where = t.exec("try:\n import runtime\n print(runtime.__file__)\nexcept ImportError:\n print('-')").decode().strip()
    if where != "-" and not where.startswith("/lib/"):
        raise UsageError("--app-only", f"the board on {port} runs the app frozen into its MicroPython firmware "
                         f"(runtime from {where!r}), which files in /lib cannot replace",
                         "flash the firmware built with the new app's frozen_manifest.py (prapa build writes it), "
                         "or a stock MicroPython with --firmware BIN and the image")


def _read_json(t, path):
    out = t.exec("try:\n print(open(%r).read())\nexcept OSError:\n print('null')" % path)
    try:
        return json.loads(out.decode())
    except ValueError:
        return None


def _copy(t, files, role, quiet):
    """Stage changed files as NAME.new, check their hashes, then rename them over NAME."""
    local = {p: hashlib.sha256(d).hexdigest() for p, d in files}
    twins = [_twin(p) for p, _d in files if _twin(p)]
    before = _hashes(t, list(local) + ["config.json"])
    changed = [(p, d) for p, d in files if before[p] != local[p]]
    dirs = sorted({os.path.dirname(p) for p, _d in changed if os.path.dirname(p)}, key=len)
    t.exec("import os\nfor d in %r:\n try:\n  os.mkdir(d)\n except OSError:\n  pass" % (dirs,))
    done_bytes, total_bytes = 0, sum(len(d) for _p, d in changed) or 1
    progress = build.Counter("copy", quiet)
    for n, (path, data) in enumerate(changed, 1):
        t.fs_writefile(path + ".new", data)
        done_bytes += len(data)
        progress(n, len(changed), f"{path} ({100 * done_bytes // total_bytes}%)")
    staged = _hashes(t, [p + ".new" for p, _d in changed])
    bad = [p for p, _d in changed if staged[p + ".new"] != local[p]]
    if bad:
        raise FlashFailed(f"copies differ on the board: {', '.join(bad)}; the old app is untouched, run again")
    pairs = [(p + ".new", p) for p, _d in changed]
    t.exec("import os\nfor a, b in %r:\n try:\n  os.rename(a, b)\n except OSError:\n  os.remove(b)\n  os.rename(a, b)\n"
           "for p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass" % (pairs, twins))
    placeholder = before["config.json"] is None
    if placeholder:
        t.fs_writefile("config.json", json.dumps({"role": role}, sort_keys=True, separators=(",", ":")).encode())
    after = _hashes(t, list(local))
    bad = [p for p in local if after[p] != local[p]]
    if bad:
        raise FlashFailed(f"files differ on the board after the rename: {', '.join(bad)}; run again")
    return {"files": len(files), "copied": len(changed), "unchanged": len(files) - len(changed),
            "bytes_copied": sum(len(d) for _p, d in changed), "config": "placeholder" if placeholder else "kept"}


def _twin(path):
    """The other form of a module (.py beside .mpy): MicroPython imports the .py first, so a stale
    one would shadow the new bytecode."""
    if path.endswith(".mpy"):
        return path[:-4] + ".py"
    return None


def _wait_banner(ser):
    """The app's banner (from "prapa" on) on mpremote's port after the reset, or None within BOOT_TIMEOUT_S."""
    try:
        _i, m = ConsoleReader(ser, follow=False).wait_for(BANNER, timeout=BOOT_TIMEOUT_S)
    except BoardError:
        return None
    return m.group(0)
