"""deploy/prapa-gateway.service: a configuration error stops the unit instead of restarting it, and
systemd itself accepts the file (where systemd-analyze exists; CI has it)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.errors import BoardError, UsageError

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "prapa-gateway.service"


def settings(text):
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def prevented_exit_statuses():
    return {word for value in settings(UNIT.read_text()).get("RestartPreventExitStatus", []) for word in value.split()}


def test_a_configuration_error_is_not_restarted_but_a_failure_is():
    s = settings(UNIT.read_text())
    assert s["Restart"] == ["on-failure"]
    assert str(UsageError.exit_code) in prevented_exit_statuses()
    assert str(BoardError.exit_code) not in prevented_exit_statuses()     # a port that went away: try again


def test_a_bad_gateway_config_exits_with_the_status_the_unit_does_not_restart(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nsite = 5\n')
    r = subprocess.run([sys.executable, "-m", "tools.cli", "gateway", "run", "--config", str(config)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert str(r.returncode) in prevented_exit_statuses(), r.stderr
    assert "gateway.site" in r.stderr and "fix:" in r.stderr


def installed_copy(folder):
    """The unit as installed: ExecStart's /opt/prapa/venv/bin/prapa replaced by this venv's prapa."""
    prapa = Path(sys.executable).with_name("prapa")
    if not prapa.is_file():
        pytest.skip(f"no prapa entry point beside {sys.executable} (pip install -e . first)")
    text = UNIT.read_text()
    (exec_start,) = settings(text)["ExecStart"]
    installed_exe = exec_start.split()[0]
    assert installed_exe.endswith("/bin/prapa"), exec_start
    path = folder / UNIT.name
    path.write_text(text.replace(installed_exe, str(prapa)))
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (no systemd here)")
def test_systemd_analyze_verify_accepts_the_unit_with_its_install_path(tmp_path):
    unit = installed_copy(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    # verify exits 0 even for a setting it ignores ("Failed to parse value, ignoring"): any output is a complaint.
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr
