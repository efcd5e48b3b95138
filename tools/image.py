"""The vfs partition image: a littlefs2 filesystem of the board's partition size.

The same image goes to a real board (esptool, at the vfs offset) and into a
virtual board (a file the VM mounts at /). Building is deterministic: the same
firmware, board and role give the same bytes.

An image is written to a temporary file and renamed into place, so a failed
or interrupted build never leaves a half-written image behind. Images are
written 0600 by default: any image may be provisioned (or run as a virtual
board and commissioned) later, and then it holds /device.key.
"""

import json
import os
from pathlib import Path

from gateway import files
from protocol.errors import UsageError

# firmware/ and protocol/ sit next to tools/ both in a checkout and in an installed wheel
# (pyproject.toml ships firmware/, boards/ and deploy/ as top-level folders of site-packages).
FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
PROTOCOL_DIR = FIRMWARE_DIR.parent / "protocol"
# protocol/ modules a board never runs: the CPython stand-in for cryptolib, the spec's examples, field names, the host's view of the role registry.
PROTOCOL_HOST_ONLY = {"_cryptolib_cpython.py", "examples.py", "names.py", "catalog.py"}
# Files at the top of the partition; everything else goes to /lib.
TOP_LEVEL = ("boot.py", "main.py")
# Per target, the HAL backends the image does NOT carry.
EXCLUDE = {"virtual": {"hal_esp32.py"}, "esp32": {"hal_virtual.py"}}


def firmware_files(target):
    """(path on flash, source path) for every firmware and protocol module the target runs."""
    out = []
    for src in sorted(FIRMWARE_DIR.rglob("*.py")):
        rel = src.relative_to(FIRMWARE_DIR).as_posix()
        if src.name in EXCLUDE[target] or "__pycache__" in rel:
            continue
        out.append((rel if rel in TOP_LEVEL else f"lib/{rel}", src))
    for src in sorted(PROTOCOL_DIR.rglob("*.py")):
        rel = src.relative_to(PROTOCOL_DIR).as_posix()
        if src.name not in PROTOCOL_HOST_ONLY and "__pycache__" not in rel:
            out.append((f"lib/protocol/{rel}", src))
    return out


def _littlefs():
    """littlefs-python comes with the tools extra: a gateway-only install has no images to make."""
    try:
        import littlefs
    except ModuleNotFoundError:
        raise UsageError("prapa", "littlefs-python is not installed (prapa without its tools extra)",
                         "pip install 'prapa[tools]'") from None
    return littlefs


def _new_fs(board):
    return _littlefs().LittleFS(block_size=board.block_size, block_count=board.vfs_block_count, mount=True)


def build(board, role, target="virtual", config=None):
    """Return the image bytes: the firmware, /board.json and /config.json."""
    board.check_role(role)
    fs = _new_fs(board)
    _write_firmware(fs, target)
    with fs.open("board.json", "w") as f:
        f.write(board.as_firmware_json(role))
    with fs.open("config.json", "w") as f:
        f.write(json.dumps(config or {"role": role}, sort_keys=True, separators=(",", ":")))
    return bytes(fs.context.buffer)


def install_app(board, role, path, target="virtual"):
    """Replace the firmware and board files inside an existing image, keeping its
    data (boot id, config, logs), as `mpremote cp` onto a running board would."""
    fs = mount(board, path)
    _write_firmware(fs, target)
    with fs.open("board.json", "w") as f:
        f.write(board.as_firmware_json(role))
    write_atomically(path, bytes(fs.context.buffer))


def provision(board, path, config, key, limits=None):
    """Write a device's config and key (and the role's hard limits, for a role whose spec has a
    LIMITS_PATH) into an existing image: a virtual board's commissioning; a real board gets the same
    files over USB."""
    if len(key) != 16:
        raise UsageError("key", f"{len(key)} bytes", "give a 16-byte AES-128 key")
    fs = mount(board, path)
    with fs.open("config.json", "w") as f:
        f.write(json.dumps(config, sort_keys=True, separators=(",", ":")))
    with fs.open("device.key", "wb") as f:
        f.write(bytes(key))
    if limits is not None:
        from protocol.roles import catalog
        with fs.open(catalog.attr(config["role"], "LIMITS_PATH"), "w") as f:
            f.write(json.dumps(limits, sort_keys=True, separators=(",", ":")))
    write_atomically(path, bytes(fs.context.buffer))


def _write_firmware(fs, target):
    for flash_path, src in firmware_files(target):
        directory = os.path.dirname(flash_path)
        if directory:
            fs.makedirs(directory, exist_ok=True)
        with fs.open(flash_path, "wb") as f:
            f.write(src.read_bytes())


def write_atomically(path, data, mode=files.PRIVATE):
    """Replace the image at path, mode 0600 from its first byte (it holds, or may come to hold, a key)."""
    files.write_atomically(path, data, mode=mode)


def check_existing(board, path):
    """Refuse an image that is not this board's vfs partition; return its size."""
    size = Path(path).stat().st_size
    if size != board.vfs_size_bytes:
        raise UsageError(f"--flash {path}", f"image is {size} bytes but board {board.name} has a "
                         f"{board.vfs_size_bytes}-byte vfs partition",
                         "pass the image built for this board, or a new path to create one")
    return size


def mount(board, path):
    """Open an image read-only from the host (tests and tools look inside boards)."""
    fs = _littlefs().LittleFS(block_size=board.block_size, block_count=board.vfs_block_count, mount=False)
    fs.context.buffer = bytearray(Path(path).read_bytes())
    fs.mount()
    return fs
