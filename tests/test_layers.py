"""Layering: who may import whom.

The CPython packages (protocol, gateway, tools, hil_tests, tests) are checked by
import-linter with the contracts in /.importlinter. The firmware is checked here with
`ast`: on the board its modules sit at the root of the filesystem and import each other
by bare names (`import persist`), which import-linter cannot tell from third-party
packages, and what it may import is an allow-list: its own modules, protocol and the
modules MicroPython has built in.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# MicroPython's built-in modules (its micro-libraries, its own modules, the ESP32 port's).
MICROPYTHON = {
    "_thread", "array", "asyncio", "binascii", "builtins", "cmath", "collections", "deflate", "errno",
    "gc", "hashlib", "heapq", "io", "json", "marshal", "math", "os", "platform", "random", "re", "select",
    "socket", "ssl", "struct", "sys", "time", "zlib",
    "bluetooth", "btree", "cryptolib", "framebuf", "machine", "micropython", "neopixel", "network",
    "uctypes", "vfs",
    "esp", "esp32", "espnow",
    "_vboard",              # the virtual board's ROM (tools/sim/rom), which only hal_virtual.py may use
}


def lint_imports(cwd):
    """Run import-linter on the packages found in `cwd` (never the checkout's, whatever is installed)."""
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_linter_catches_a_wrong_import(tmp_path):
    """The contracts bite: the gateway importing the CLI breaks the build, naming both modules."""
    ignore = shutil.ignore_patterns("__pycache__", ".venv")
    for package in ("protocol", "gateway", "tools", "hil_tests", "tests"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "gateway" / "metrics.py", "a") as f:
        f.write("\nfrom tools import cli  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "gateway.metrics" in output and "tools.cli" in output, output


def _own_modules():
    """Top-level names of the firmware's modules: as they sit on the board's root."""
    return ({p.stem for p in FIRMWARE.glob("*.py")}
            | {p.parent.name for p in FIRMWARE.glob("*/__init__.py")})


def _imports(path):
    """(line, top-level module name) of every import in a file, relative ones as None."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, None if node.level else node.module.split(".")[0]


def test_firmware_imports_only_itself_protocol_and_micropython():
    allowed = _own_modules() | {"protocol"} | MICROPYTHON
    files = sorted(FIRMWARE.rglob("*.py"))
    assert files
    wrong = [f"{path.relative_to(ROOT)}:{line}: import {name}"
             for path in files for line, name in _imports(path) if name is not None and name not in allowed]
    assert not wrong, ("firmware may import only its own modules, protocol and MicroPython built-ins "
                       "(never gateway, tools, tests, nor CPython-only modules):\n" + "\n".join(wrong))


def test_protocol_imports_no_firmware_module():
    own = _own_modules()
    wrong = [f"{path.relative_to(ROOT)}:{line}: import {name}"
             for path in sorted((ROOT / "protocol").rglob("*.py")) for line, name in _imports(path) if name in own]
    assert not wrong, "protocol imports nothing of ours, firmware included:\n" + "\n".join(wrong)
