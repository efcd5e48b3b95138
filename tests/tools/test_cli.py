"""The prapa CLI: --help everywhere, exit codes, bad input leaves nothing behind."""

import json
import subprocess
import sys

import pytest

from tools import boards, image


def prapa(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=timeout)


def _command_paths():
    """Every command and subcommand of the real parser, so a new one cannot be missed."""
    import argparse

    from tools.cli import build_parser

    def walk(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])
    return list(walk(build_parser(), []))


@pytest.mark.parametrize("args", _command_paths(), ids=lambda a: " ".join(a) or "prapa")
def test_every_command_has_help_with_exit_codes(args):
    r = prapa(*args, "--help")
    assert r.returncode == 0
    assert "exit codes: 0 ok, 1 failure, 2 usage" in r.stdout


@pytest.mark.parametrize("args, field", [
    (["--board", "esp32-nope", "--role", "meter"], "--board"),
    (["--board", "esp32-devkitc", "--role", "pump"], "--role"),
    (["--board", "esp32-devkitc", "--role", "meter", "--world", "flow_meter.nope=1"], "--world"),
    (["--board", "esp32-devkitc", "--role", "meter", "--world", "flow_meter.draw_lpm=fast"], "--world"),
    (["--board", "esp32-devkitc", "--role", "meter", "--unique-id", "xyz"], "--unique-id"),
])
def test_bad_board_run_arguments_exit_2_naming_the_field_and_create_nothing(tmp_path, args, field):
    flash = tmp_path / "flash.img"
    r = prapa("board", "run", *args, "--flash", str(flash))
    assert r.returncode == 2
    assert field in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_flash_image_of_the_wrong_size_is_refused_untouched(tmp_path):
    flash = tmp_path / "flash.img"
    flash.write_bytes(b"\xff" * 4096)
    r = prapa("board", "run", "--board", "esp32-devkitc", "--role", "meter", "--flash", str(flash))
    assert r.returncode == 2
    assert "2097152-byte vfs partition" in r.stderr
    assert flash.read_bytes() == b"\xff" * 4096


def test_argparse_usage_errors_exit_2():
    assert prapa("board", "run", "--speed", "0", "--board", "x", "--role", "y", "--flash", "z").returncode == 2
    assert prapa("nonsense").returncode == 2


def test_board_list_and_world_params_print_what_exists():
    out = prapa("board", "list").stdout
    for name in boards.available():
        assert name in out
    params = prapa("board", "world-params").stdout
    assert "flow_meter.litres_per_pulse" in params and "flow_meter.bounce_max_us" in params


def test_image_build_is_deterministic_and_holds_the_app():
    b = boards.load("esp32-devkitc")
    one, two = image.build(b, "meter"), image.build(b, "meter")
    assert one == two and len(one) == b.vfs_size_bytes
    esp = image.build(b, "meter", target="esp32")
    assert esp != one


def test_install_app_keeps_board_data(tmp_path):
    b = boards.load("esp32-devkitc")
    path = tmp_path / "flash.img"
    image.write_atomically(path, image.build(b, "meter"))
    fs = image.mount(b, path)
    with fs.open("boot_id", "w") as f:
        f.write("41")
    image.write_atomically(path, bytes(fs.context.buffer))
    image.install_app(b, "meter", path)
    fs = image.mount(b, path)
    assert fs.open("boot_id").read() == "41"
    assert "hal_virtual.py" in fs.listdir("lib")
    assert "ccm.py" in fs.listdir("lib/protocol") and "_cryptolib_cpython.py" not in fs.listdir("lib/protocol")


def test_bench_boot_prints_its_figures_as_json():
    r = prapa("bench", "boot", "--boots", "2", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["boots"] == 2
    assert 0 < figures["heap_free_after_boot_share"] < 1
    assert figures["boot_vs_bare_vm_ratio"] > 0


def test_bench_protocol_prints_figures_beside_their_baselines():
    r = prapa("bench", "protocol", "--reports", "50", "--frames", "200", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    assert f["secure_frame_bytes"] <= 250 and f["readings_per_frame"] >= 80
    assert f["bytes_per_reading_all_in"] < f["senml_cbor_base_value_bytes_per_reading"]
    assert f["gateway_frames_per_s"] > 0 and f["gateway_baseline_cbor2_aesccm_frames_per_s"] > 0
    for role in ("doser", "drain"):                 # every role's frames, beside SenML-CBOR and ThingsBoard JSON
        assert f[f"{role}_readings_per_frame"] >= 2 and f[f"{role}_columns"] > 1
        assert f[f"vm_{role}_us_per_report"] > 0 and f[f"vm_{role}_heap_bytes_per_report"] >= 0
        assert f[f"{role}_bytes_per_reading_all_in"] < f[f"{role}_thingsboard_json_bytes_per_reading"]
        assert f[f"{role}_bytes_per_reading_all_in"] < f[f"{role}_senml_cbor_bytes_per_reading"]


def test_a_roles_wire_figure_is_a_full_frame_of_rows_that_follow_the_readings_rule():
    from protocol import framing, roles, secure
    from tools.bench import protocol as bench
    for role in bench.ROLE_ROWS:
        f = bench.role_wire(role)                 # decodes its frame with protocol.messages: the rule holds
        n, columns = f[f"{role}_readings_per_frame"], f[f"{role}_columns"]
        assert columns == len(roles.spec(role).FIELDS)
        wire_bytes = f[f"{role}_bytes_per_reading_all_in"] * n
        # a frame of n rows fits, one more row would not: the figure is a full frame's
        assert secure.OVERHEAD < wire_bytes <= framing.MAX_WIRE
