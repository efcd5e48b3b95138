"""Nothing left behind in the temp folder: every folder the tools make there goes when its owner
closes, on error too. TMPDIR points at a fresh folder, which the child processes (the bench, the
VM, the gateway, Mosquitto) inherit, so whatever any of them leaves is seen."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools import boards, image
from tools.sim.process import BoardError, BoardProcess

BOARD = "esp32-devkitc"


@pytest.fixture
def fresh_tmp(monkeypatch, tmp_path):
    """A fresh, short TMPDIR (a board's control socket lives there; AF_UNIX paths stop at 107 bytes).
    tmp_path comes first: pytest's own folders stay where they were."""
    with tempfile.TemporaryDirectory(prefix="prapa-hyg-") as folder:
        monkeypatch.setenv("TMPDIR", folder)
        monkeypatch.setattr(tempfile, "tempdir", folder)      # gettempdir() caches its first answer
        yield Path(folder)


def left_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def prapa(*args):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_virtual_board_leaves_nothing_when_closed(fresh_tmp, tmp_path):
    flash = tmp_path / "flash.img"
    image.write_atomically(flash, image.build(boards.load(BOARD), "meter", "virtual"))
    vb = BoardProcess(BOARD, "meter", flash)
    try:
        assert Path(vb.control_path).is_relative_to(fresh_tmp)        # the bench did use this TMPDIR
        vb.status()
    finally:
        vb.close()
    assert left_in(fresh_tmp) == []


def test_a_virtual_board_that_does_not_start_leaves_nothing(fresh_tmp, tmp_path):
    with pytest.raises(BoardError):
        BoardProcess("no-such-board", "meter", tmp_path / "flash.img")
    assert left_in(fresh_tmp) == []


def test_a_site_removes_its_temp_folder_when_it_stops(fresh_tmp, tmp_path):
    report = tmp_path / "r.json"
    r = prapa("site", "--boards", "1", "--headless", "--duration", "1", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert report.exists()
    assert left_in(fresh_tmp) == []


def test_a_site_refused_at_start_leaves_nothing_even_with_keep(fresh_tmp):
    """Bad arguments are refused before anything is created, --keep or not (issue 17)."""
    r = prapa("site", "--headless", "--board", "no-such-board")
    assert r.returncode == 2, r.stderr
    assert left_in(fresh_tmp) == []
    r = prapa("site", "--headless", "--boards", "0", "--keep")
    assert r.returncode == 2, r.stderr
    assert left_in(fresh_tmp) == []
