"""Board definitions: the TOML files in boards/, validated into plain read-only objects.

A board file is data the firmware build, the virtual board and HIL all read,
so a typo must stop every one of them with the same clear message instead of
surfacing later as a wrong pin or a heap that is too big.
"""

import json
import tomllib
from pathlib import Path
from types import MappingProxyType

from protocol.roles import catalog as role_specs
from gateway.config import read_text      # the one way a file comes in
from protocol.errors import UsageError
from protocol.roles import ROLES

BOARDS_DIR = Path(__file__).resolve().parent.parent / "boards"
GPIO_MAX = 48
FLASH_SIZES = tuple(mib << 20 for mib in (2, 4, 8, 16, 32))

_int = (int,)
# section -> key -> (python types, check(value) -> error text or None, fix hint)
_SCHEMA = {
    "board": {
        "name": ((str,), None, "give the board's file name without .toml"),
        "description": ((str,), None, "describe the board in a few words"),
        "chip": ((str,), lambda v: None if v in ("esp32", "esp32s3", "esp32c3", "esp32s2") else "unknown chip",
                 "use one of esp32, esp32s3, esp32c3, esp32s2"),
        "arch": ((str,), lambda v: None if v in ("xtensawin", "rv32imc", "xtensa") else "unknown mpy-cross arch",
                 "use xtensawin (ESP32, S2, S3) or rv32imc (C3)"),
        "word_bits": (_int, lambda v: None if v == 32 else "only 32-bit boards are supported", "set word_bits = 32"),
    },
    "heap": {
        "budget_bytes": (_int, lambda v: None if 16384 <= v <= 16 * 1024 * 1024 else "out of range",
                         "give the MicroPython GC heap in bytes (16 KiB to 16 MiB) and cite its source"),
    },
    "flash": {
        "size_bytes": (_int, lambda v: None if v in FLASH_SIZES else "not a flash chip size",
                       "give the flash size in bytes: 2, 4, 8, 16 or 32 MiB"),
        "app_offset": (_int, None, "offset of the factory app partition"),
        "app_size_bytes": (_int, None, "size of the factory app partition"),
        "vfs_offset": (_int, lambda v: None if v % 4096 == 0 else "not 4096-aligned", "align the vfs partition to 4096 bytes"),
        "vfs_size_bytes": (_int, lambda v: None if v > 0 and v % 4096 == 0 else "not a positive multiple of 4096",
                           "give the vfs partition size in bytes, a multiple of 4096"),
        "block_size": (_int, lambda v: None if v == 4096 else "must be 4096", "set block_size = 4096 (the ESP32 flash sector)"),
    },
    "link": {
        "uart_id": (_int, lambda v: None if v in (0, 1, 2) else "no such UART", "use UART 1 or 2 (0 is the console)"),
        "uart_tx": (_int, None, "GPIO of the link UART's TX"),
        "uart_rx": (_int, None, "GPIO of the link UART's RX"),
        "rs485_de": (_int, None, "GPIO of the RS-485 driver-enable pin"),
        "baudrate": (_int, lambda v: None if v in (9600, 19200, 38400, 57600, 115200, 230400, 460800) else "not a standard rate",
                     "use a standard baud rate such as 115200"),
    },
}


class Board:
    """One validated board definition; attributes are read-only after load."""

    __slots__ = ("name", "description", "chip", "arch", "word_bits", "heap_budget_bytes", "flash_size_bytes",
                 "app_offset", "app_size_bytes", "vfs_offset", "vfs_size_bytes", "block_size", "link", "pins",
                 "roles_fit", "role_pins", "source")

    def __init__(self, **fields):
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError("board definitions are read-only")

    @property
    def vfs_block_count(self):
        return self.vfs_size_bytes // self.block_size

    def heapsize_option(self, vm=None):
        """The unix port's -X heapsize value for this board on a VM (tools/sim/vm.py; None: the default).

        unix32 has the ESP32's word size: the budget in bytes, exactly as on the board.
        unix64: the `w` suffix scales a size given for a 32-bit word to the host's word
        size (x2), an approximation (objects grow about 1.22x there, not 2x, so that VM
        gives the firmware more room than an ESP32 has).
        """
        from tools.sim import vm as vms
        if vms.resolve(vm) == "unix32":
            return "heapsize=%d" % self.heap_budget_bytes
        return "heapsize=%dw" % self.heap_budget_bytes

    def check_role(self, role):
        if role not in ROLES:
            raise UsageError("--role", f"unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if role not in self.roles_fit:
            raise UsageError("--role", f"role {role!r} does not fit board {self.name!r}",
                             f"use one of {', '.join(self.roles_fit)} or another board")

    def as_firmware_json(self, role):
        """The slice of the definition the firmware reads at boot (it has no TOML parser)."""
        return json.dumps({
            "name": self.name, "chip": self.chip, "heap_budget_bytes": self.heap_budget_bytes,
            "vfs_size_bytes": self.vfs_size_bytes, "block_size": self.block_size,
            "link": dict(self.link), "pins": dict(self.pins), "role": role,
            "role_pins": dict(self.role_pins.get(role, {})),
            "safe_low": self.safe_low_pins(role),
        }, sort_keys=True, separators=(",", ":"))

    def safe_low_pins(self, role):
        """GPIOs boot.py drives low before anything else runs (the role spec's SAFE_LOW: a pump's outputs)."""
        from protocol.roles import catalog
        pins = self.role_pins.get(role, {})
        return sorted(pins[name] for name in catalog.attr(role, "SAFE_LOW", ()) if name in pins)


def available():
    return sorted(p.stem for p in BOARDS_DIR.glob("*.toml"))


def load(name_or_path):
    """Load a board by name (from boards/) or by path; raise UsageError naming file, key and fix."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = BOARDS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError("--board", f"unknown board {str(name_or_path)!r}",
                         f"use one of {', '.join(available())} or a path to a board .toml file")
    try:
        data = tomllib.loads(read_text(path, "--board", "give a board definition: a UTF-8 TOML file"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(str(path), f"not valid TOML ({exc})", "fix the syntax at that line") from None
    return _validate(path, data)


def _validate(path, data):
    fields = {}
    for section, keys in _SCHEMA.items():
        table = data.get(section)
        if not isinstance(table, dict):
            raise UsageError(f"{path}", f"missing table [{section}]", f"add a [{section}] table")
        for key, (types, check, hint) in keys.items():
            where = f"{path}: {section}.{key}"
            if key not in table:
                raise UsageError(where, "missing", hint)
            value = table[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise UsageError(where, f"{value!r} is a {type(value).__name__}, expected {types[0].__name__}", hint)
            problem = check(value) if check else None
            if problem:
                raise UsageError(where, f"{value!r}: {problem}", hint)
            fields[f"{section}.{key}"] = value
    b, f = "board.", "flash."
    if fields[b + "name"] != path.stem:
        raise UsageError(f"{path}: board.name", f"{fields[b + 'name']!r} differs from the file name",
                         f"set name = {path.stem!r} or rename the file")
    if fields[f + "vfs_offset"] + fields[f + "vfs_size_bytes"] > fields[f + "size_bytes"]:
        raise UsageError(f"{path}: flash.vfs_size_bytes", "vfs partition runs past the end of flash",
                         "shrink the partition or fix flash.size_bytes")
    if fields[f + "app_offset"] + fields[f + "app_size_bytes"] > fields[f + "vfs_offset"]:
        raise UsageError(f"{path}: flash.app_size_bytes", "app partition overlaps the vfs partition",
                         "fix the partition offsets to match the firmware's partition table")
    roles = data.get("roles")
    if not isinstance(roles, dict) or not isinstance(roles.get("fits"), list) or not roles["fits"]:
        raise UsageError(f"{path}: roles.fits", "missing or empty", f"list the roles that fit, from {', '.join(ROLES)}")
    role_pins = {}
    for role in roles["fits"]:
        if role not in ROLES:
            raise UsageError(f"{path}: roles.fits", f"unknown role {role!r}", f"use roles from {', '.join(ROLES)}")
        table = roles.get(role)
        if not isinstance(table, dict):
            raise UsageError(f"{path}: roles.{role}", "missing", f"add a [roles.{role}] table with its pins")
        for pin in role_specs.attr(role, "PINS", ()):      # a reserved role (no spec yet): pins unchecked
            _check_gpio(path, f"roles.{role}.{pin}", table.get(pin))
        role_pins[role] = MappingProxyType(dict(table))
    pins = data.get("pins", {})
    for key, value in pins.items():
        _check_gpio(path, f"pins.{key}", value)
    link = {k: fields["link." + k] for k in _SCHEMA["link"]}
    for key in ("uart_tx", "uart_rx", "rs485_de"):
        _check_gpio(path, f"link.{key}", link[key])
    return Board(
        name=fields[b + "name"], description=fields[b + "description"], chip=fields[b + "chip"],
        arch=fields[b + "arch"], word_bits=fields[b + "word_bits"], heap_budget_bytes=fields["heap.budget_bytes"],
        flash_size_bytes=fields[f + "size_bytes"], app_offset=fields[f + "app_offset"],
        app_size_bytes=fields[f + "app_size_bytes"], vfs_offset=fields[f + "vfs_offset"],
        vfs_size_bytes=fields[f + "vfs_size_bytes"], block_size=fields[f + "block_size"],
        link=MappingProxyType(link), pins=MappingProxyType(dict(pins)), roles_fit=tuple(roles["fits"]),
        role_pins=MappingProxyType(role_pins), source=str(path),
    )


def _check_gpio(path, key, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= GPIO_MAX:
        raise UsageError(f"{path}: {key}", f"{value!r} is not a GPIO number", f"give a GPIO number 0-{GPIO_MAX}")
