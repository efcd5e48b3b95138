"""Board files: every mistake is named with its file, key and fix."""

import pytest

from tools import boards
from protocol.errors import UsageError


def test_every_shipped_board_loads_and_fits_its_flash():
    names = boards.available()
    assert {"esp32-devkitc", "esp32-s3-devkitc-n8r2"} <= set(names)
    for name in names:
        b = boards.load(name)
        assert b.vfs_offset + b.vfs_size_bytes <= b.flash_size_bytes
        assert b.vfs_size_bytes % b.block_size == 0
        assert b.heapsize_option("unix64") == f"heapsize={b.heap_budget_bytes}w"   # words: x2 on a 64-bit VM
        assert b.heapsize_option("unix32") == f"heapsize={b.heap_budget_bytes}"    # bytes, as on the board


def test_devkitc_has_no_psram_sized_heap():
    assert boards.load("esp32-devkitc").heap_budget_bytes <= 128 * 1024


def _write(tmp_path, text, name="myboard"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _good_text():
    return (boards.BOARDS_DIR / "esp32-devkitc.toml").read_text().replace('"esp32-devkitc"', '"myboard"', 1)


def test_a_copy_of_a_good_board_loads(tmp_path):
    assert boards.load(_write(tmp_path, _good_text())).name == "myboard"


@pytest.mark.parametrize("mutation, key", [
    (lambda t: t.replace("budget_bytes = 112640", ""), "heap.budget_bytes"),
    (lambda t: t.replace("budget_bytes = 112640", 'budget_bytes = "110K"'), "heap.budget_bytes"),
    (lambda t: t.replace("block_size = 4096", "block_size = 512"), "flash.block_size"),
    (lambda t: t.replace("vfs_size_bytes = 0x200000", "vfs_size_bytes = 0x300000"), "flash.vfs_size_bytes"),
    (lambda t: t.replace("pulse_in = 27", "pulse_in = 99"), "roles.meter.pulse_in"),
    (lambda t: t.replace('chip = "esp32"', 'chip = "esp8266"'), "board.chip"),
    (lambda t: t.replace("[link]", "[lnk]"), "[link]"),
    (lambda t: t.replace('fits = ["meter", "doser", "drain"]', 'fits = ["meter", "pump"]'), "roles.fits"),
])
def test_bad_board_file_names_file_key_and_fix(tmp_path, mutation, key):
    path = _write(tmp_path, mutation(_good_text()))
    with pytest.raises(UsageError) as err:
        boards.load(path)
    message = str(err.value)
    assert str(path) in message and key in message
    assert err.value.fix


def test_unknown_board_and_role_are_usage_errors():
    with pytest.raises(UsageError, match="esp32-devkitc"):
        boards.load("esp32-nope")
    with pytest.raises(UsageError, match="meter, doser, drain"):
        boards.load("esp32-devkitc").check_role("pump")
