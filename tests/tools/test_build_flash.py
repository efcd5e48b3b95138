"""prapa build and prapa flash: the same bytes every time, an image a board boots, an app copy
that is verified on the board, and refusals that write nothing.

The esptool path needs a real ESP32 (set PRAPA_ESP_PORT, and PRAPA_ESP_FIRMWARE to a MicroPython
.bin); everything else runs here against virtual boards and pseudo-terminals."""

import hashlib
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from tools import boards, build, image
from tools.cli import main
from tools.sim.process import BoardProcess

BOARD = "esp32-devkitc"
MPREMOTE = str(Path(sys.executable).with_name("mpremote"))
DEVKITC_TOML = (boards.BOARDS_DIR / f"{BOARD}.toml").read_text()


def prapa(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=timeout)


def board_toml(tmp_path, name, *edits):
    """A board definition like the devkitc's with some lines changed (name and file name follow)."""
    text = DEVKITC_TOML.replace(f'name = "{BOARD}"', f'name = "{name}"')
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def read_console(port, until, timeout=15):
    """Console output up to the line matching `until` (a regex), or all of it at the timeout."""
    seen = b""
    with serial.Serial(port, timeout=0.1) as s:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not re.search(until, seen):
            seen += s.read(4096)
    return seen.decode(errors="replace")


def wait_for(predicate, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def mpremote(port, *args):
    r = subprocess.run([MPREMOTE, "connect", port, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builds of the same inputs, in two folders, through the CLI a technician runs."""
    outs = [tmp_path_factory.mktemp(f"build{i}") for i in range(2)]
    runs = [prapa("build", "--board", BOARD, "--role", "meter", "--out", str(o)) for o in outs]
    for r in runs:
        assert r.returncode == 0, r.stderr
    return outs, runs


def test_build_twice_gives_identical_bytes_and_prints_their_hash(built):
    (a, b), runs = built
    img_a, img_b = (a / f"{BOARD}-meter.img").read_bytes(), (b / f"{BOARD}-meter.img").read_bytes()
    assert img_a == img_b
    digest = hashlib.sha256(img_a).hexdigest()
    assert f"sha256 {digest}" in runs[0].stdout
    assert (a / f"{BOARD}-meter.img.sha256").read_text() == f"{digest}  {BOARD}-meter.img\n"
    for name in ("manifest.json", "frozen_manifest.py"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert len(img_a) == boards.load(BOARD).vfs_size_bytes


def test_manifest_lists_every_file_in_the_image_with_its_hash_and_the_app_is_bytecode(built):
    (out, _), _ = built
    board = boards.load(BOARD)
    fs = image.mount(board, out / f"{BOARD}-meter.img")
    on_image = {}
    for root, _dirs, names in fs.walk("/"):
        for name in names:
            path = f"{root.rstrip('/')}/{name}"
            with fs.open(path, "rb") as f:
                on_image[path] = hashlib.sha256(f.read()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == on_image
    assert "/lib/runtime.mpy" in on_image and "/lib/runtime.py" not in on_image
    assert "/lib/hal_esp32.mpy" in on_image and "/lib/hal_virtual.mpy" not in on_image
    assert {"/boot.py", "/main.py", "/board.json", "/config.json"} <= set(on_image)


def test_frozen_manifest_names_every_library_module_and_carries_its_sources(built):
    (out, _), _ = built
    frozen = []
    calls = {
        "include": lambda path: None,
        "module": lambda name, base_path=".": frozen.append(Path(base_path) / name),
        "package": lambda pkg, files=None, base_path=".": frozen.extend(Path(base_path) / pkg / f for f in files),
    }
    exec((out / "frozen_manifest.py").read_text(), calls)
    manifest = json.loads((out / "manifest.json").read_text())
    lib = sorted(f["path"][len("/lib/"):-len(".mpy")] + ".py" for f in manifest["files"] if f["path"].startswith("/lib/"))
    assert sorted(str(p.relative_to("frozen")) for p in frozen) == lib
    for p in frozen:
        assert (out / p).is_file(), p


def test_virtual_image_boots_from_bytecode_and_idles_until_commissioned(tmp_path):
    r = prapa("build", "--board", BOARD, "--role", "meter", "--target", "virtual", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    flash = tmp_path / "flash.img"
    shutil.copy(result["image"], flash)
    fs = image.mount(boards.load(BOARD), flash)
    assert "hal_virtual.mpy" in fs.listdir("lib") and "runtime.py" not in fs.listdir("lib")
    vb = BoardProcess(BOARD, "meter", flash)
    try:
        console = read_console(vb.console_port, rb"prapa idle: [^\r\n]*\r\n")
    finally:
        vb.close()
    assert re.search(r"prapa \S+ board=esp32-devkitc role=meter boot=1 ", console), console
    assert "prapa idle: config invalid: device_id: " in console, console


def test_flash_app_only_copies_verified_bytecode_keeps_config_and_key_and_reboots_into_the_app(tmp_path):
    """On a stock MicroPython firmware the app runs from /lib: the 64-bit VM is that board (the unix32
    VM has the app frozen in, which /lib cannot override, as on an ESP32 built with it)."""
    board = boards.load(BOARD)
    flash = tmp_path / "flash.img"
    image.write_atomically(flash, image.build(board, "meter", "virtual"))     # a board running the source app
    config = {"device_id": 4242, "role": "meter", "meter": {"interval_min": 1}}
    image.provision(board, flash, config, bytes(range(16)))
    vb = BoardProcess(BOARD, "meter", flash, vm="unix64")
    try:
        before = len(vb.events)
        wrong = prapa("flash", "--port", vb.console_port, "--board", "esp32-s3-devkitc-n8r2", "--role", "meter",
                      "--app-only")
        assert wrong.returncode == 2, wrong.stderr
        assert wrong.stderr.splitlines()[-1].startswith("prapa: error: --board: the board on ")
        assert "was flashed as 'esp32-devkitc'" in wrong.stderr
        assert wait_for(lambda: any(e["event"] == "vm_started" and e["run_main"] for e in vb.events[before + 1:])), \
            "the refusal left the board in the raw REPL instead of back in its app"
        r = prapa("flash", "--port", vb.console_port, "--board", BOARD, "--role", "meter", "--app-only", "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["ok"] and result["target"] == "virtual" and result["config"] == "kept"
        assert re.match(r"prapa \S+ board=esp32-devkitc role=meter boot=\d+ reset=hard_reset", result["banner"])
        assert any(e.get("event") == "reset" and e.get("kind") == "hard_reset" for e in vb.events)
        local = {p: hashlib.sha256(d).hexdigest() for p, d, _s in build.app_files(board, "virtual")}
        paths = sorted(local) + ["lib/runtime.py", "config.json", "device.key"]
        out = mpremote(vb.console_port, "exec",
                       "import hashlib, binascii\n"
                       "def h(p):\n try:\n  return binascii.hexlify(hashlib.sha256(open(p,'rb').read()).digest()).decode()\n"
                       " except OSError:\n  return None\n"
                       f"for p in {paths!r}: print(p, h(p))\n"
                       "import runtime\nprint('runtime from', runtime.__file__)")
        on_board = dict(line.split(" ", 1) for line in out.splitlines() if not line.startswith("runtime from"))
        for path, digest in local.items():
            assert on_board[path] == digest, path
        assert on_board["lib/runtime.py"] == "None"           # the source twin would shadow the bytecode
        assert on_board["config.json"] == hashlib.sha256(
            json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert on_board["device.key"] == hashlib.sha256(bytes(range(16))).hexdigest()
        assert "runtime from /lib/runtime.mpy" in out
    finally:
        vb.close()
    assert "hal_virtual.py" not in image.mount(board, flash).listdir("lib")


def test_flash_app_only_refuses_a_board_whose_firmware_has_the_app_frozen_in(tmp_path):
    """Files in /lib cannot replace a frozen app: copying them would look like an update and change
    nothing that runs. The unix32 VM is such a firmware (built with the app's frozen_manifest)."""
    from tools.sim import vm as vms
    if vms.unix32_exe() is None:
        pytest.skip(f"the frozen-app VM is not built: {vms.skip_reason()}")
    flash = tmp_path / "flash.img"
    board = boards.load(BOARD)
    image.write_atomically(flash, image.build(board, "meter", "virtual"))
    image.provision(board, flash, {"device_id": 4243, "role": "meter"}, bytes(range(16)))
    vb = BoardProcess(BOARD, "meter", flash, vm="unix32")
    try:
        before = len(vb.events)
        r = prapa("flash", "--port", vb.console_port, "--board", BOARD, "--role", "meter", "--app-only")
        assert r.returncode == 2, r.stdout + r.stderr
        line = r.stderr.splitlines()[-1]
        assert line.startswith("prapa: error: --app-only: the board on ") and "frozen into its MicroPython firmware" in line
        assert "frozen_manifest.py" in line
        assert wait_for(lambda: any(e["event"] == "vm_started" and e["run_main"] for e in vb.events[before + 1:])), \
            "the refusal left the board in the raw REPL instead of back in its app"
    finally:
        vb.close()


@pytest.mark.skipif(not os.environ.get("PRAPA_ESP_PORT") or not os.environ.get("PRAPA_ESP_FIRMWARE"),
                    reason="the esptool path needs a real ESP32: set PRAPA_ESP_PORT=/dev/ttyUSB0 and "
                    "PRAPA_ESP_FIRMWARE=ESP32_GENERIC-<version>.bin (the board's definition: PRAPA_ESP_BOARD)")
def test_full_flash_writes_firmware_and_image_and_verifies_them_on_a_real_board():
    port, board = os.environ["PRAPA_ESP_PORT"], os.environ.get("PRAPA_ESP_BOARD", BOARD)
    r = prapa("flash", "--port", port, "--board", board, "--role", "meter",
              "--firmware", os.environ["PRAPA_ESP_FIRMWARE"], "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True
    console = read_console(port, rb"prapa idle: [^\r\n]*\r\n", timeout=30)
    assert "prapa idle: config invalid: device_id: " in console


def test_full_flash_where_no_esp32_answers_fails_with_exit_1_and_one_json_object(port):
    path, _written = port
    r = prapa("flash", "--port", path, "--board", BOARD, "--role", "meter", "--json")
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] is False and "Failed to connect" in result["error"] and "\n" not in result["error"]


# -- refusals: one line naming the argument, exit 2, nothing written ----------------------------------
@pytest.fixture
def port():
    """A serial port nobody else holds (a pty); yields (path, read what was written to it)."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)

    def written():
        try:
            return os.read(master, 65536)
        except (BlockingIOError, OSError):
            return b""
    yield os.ttyname(slave), written
    os.close(master)
    os.close(slave)


def refused(capsys, argv, where):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()              # a progress line may come first; the error is one line, the last
    assert lines[-1].startswith("prapa: error: ") and err.count("prapa:") == 1, err
    assert where in lines[-1].split(";")[0], err
    return lines[-1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images that are wrong for a devkitc meter in one way each."""
    d = tmp_path_factory.mktemp("images")
    other = boards.load(board_toml(d, "other-board"))
    made = {
        "other_board": build.build(other, "meter")[0],
        "other_role": build.build(boards.load(BOARD), "drain")[0],
        "virtual": build.build(boards.load(BOARD), "meter", "virtual")[0],
        "too_big": bytes(boards.load(BOARD).vfs_size_bytes + 4096),
        "not_littlefs": bytes(boards.load(BOARD).vfs_size_bytes),
    }
    for name, data in made.items():
        (d / f"{name}.img").write_bytes(data)
    (d / "fw.bin").write_bytes(b"\x7fELF" + bytes(100))
    return d


@pytest.mark.parametrize("extra, where, says", [
    (["--image", "{images}/too_big.img"], "--image", "too big"),
    (["--image", "{images}/other_board.img"], "--image", "built for board 'other-board'"),
    (["--image", "{images}/other_role.img"], "--image", "built for role 'drain'"),
    (["--image", "{images}/virtual.img"], "--image", "virtual board"),
    (["--image", "{images}/not_littlefs.img"], "--image", "not a prapa littlefs image"),
    (["--image", "{images}/missing.img"], "--image", "no such file"),
    (["--firmware", "{images}/fw.bin"], "--firmware", "not an ESP firmware image"),
    (["--app-only", "--image", "{images}/virtual.img"], "--image", "not used with --app-only"),
    (["--baud", "12345"], "--baud", "not a rate"),
])
def test_flash_refuses_bad_input_before_touching_the_port(capsys, port, images, extra, where, says):
    path, written = port
    argv = ["flash", "--port", path, "--board", BOARD, "--role", "meter"]
    err = refused(capsys, argv + [a.format(images=images) for a in extra], where)
    assert says in err
    assert written() == b""


def test_flash_refuses_a_port_that_does_not_exist(capsys, tmp_path):
    err = refused(capsys, ["flash", "--port", str(tmp_path / "ttyUSB9"), "--board", BOARD, "--role", "meter",
                           "--app-only"], "--port")
    assert "no such port" in err


def test_flash_refuses_a_busy_port_and_writes_nothing_to_it(capsys, port):
    path, written = port
    with serial.Serial(path, exclusive=True):
        err = refused(capsys, ["flash", "--port", path, "--board", BOARD, "--role", "meter", "--app-only"], "--port")
    assert "busy" in err
    assert written() == b""


@pytest.mark.parametrize("board_edit, role, config, where, says", [
    (None, "meter", "[1, 2]", "--config", "not an object"),
    (None, "meter", "{not json", "--config", "not valid JSON"),
    (None, "meter", '{"role": "meter"}', "device_id", "None is not a device id"),
    (None, "meter", '{"device_id": true, "role": "meter"}', "device_id", "is not a device id"),
    (None, "meter", '{"device_id": 7, "role": "drain"}', "role", "'drain' but --role is 'meter'"),
    (None, "meter", '{"device_id": 7, "role": "meter", "key": "00"}', "key", "does not belong"),
    (None, "pump", None, "--role", "unknown role"),
    ((('fits = ["meter", "doser", "drain"]', 'fits = ["meter"]'),), "drain", None, "--role", "does not fit"),
    ((("vfs_size_bytes = 0x200000", "vfs_size_bytes = 0x8000"),), "meter", None, "--board", "does not fit"),
])
def test_build_refuses_bad_input_and_writes_nothing(capsys, tmp_path, board_edit, role, config, where, says):
    board = str(board_toml(tmp_path, "small-board", *board_edit)) if board_edit else BOARD
    argv = ["build", "--board", board, "--role", role, "--out", str(tmp_path / "out")]
    if config is not None:
        (tmp_path / "config.json").write_text(config)
        argv += ["--config", str(tmp_path / "config.json")]
    err = refused(capsys, argv, where)
    assert says in err
    assert not (tmp_path / "out").exists()


def test_build_refuses_an_unknown_board(capsys, tmp_path):
    assert "unknown board" in refused(capsys, ["build", "--board", "esp32-nope", "--role", "meter",
                                               "--out", str(tmp_path / "out")], "--board")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["build"], ["flash"]])
def test_build_and_flash_have_help_with_exit_codes(args):
    r = prapa(*args, "--help")
    assert r.returncode == 0 and "exit codes: 0 ok, 1 failure, 2 usage" in r.stdout
