"""prapa commission for a role with hard limits, a prime, a calibration and live inputs: the doser,
against real virtual boards (the firmware on the VM, the chlorine plant's world) through mpremote.

The installer's story: the pump's hard limits go to the board over USB with the config and the
key, checked with them on this machine first (a config beyond a limit is refused and nothing is
written); the board comes up dosing; --prime makes exactly the strokes asked for; the draw-down
calibration sets stroke_ml; the analyser's loop current is shown with its range and the fix."""

import json
import re
import subprocess
import sys
import time

import pexpect
import pytest

from gateway.registry import Registry
from tools import boards
from tools.rigs.board import wait_for
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess
from tests.tools.test_commission_monitor import BOARD, MPREMOTE, ROOT, assert_key_hidden, prapa

LIMITS = {"max_spm": 120, "max_dose_mgl": 3.0, "max_l_day": 40.0, "ceiling_mgl": 2.0}
FLOW = "chlorine_plant.forced_flow_lps=20"       # the plant's water runs: flow pulses, no no_flow interlock
READ_FILES = ("import os, json\nout = {'files': sorted(os.listdir('/'))}\n"
              "for n in ('config.json', 'device.key', 'doser_limits.json'):\n"
              " try:\n  out[n] = open(n, 'rb').read().hex()\n except OSError:\n  pass\n"
              "print(json.dumps(out))")


def fresh_doser(tmp_path, name="flash.img", world=(FLOW,), speed=10):
    """A board flashed with the doser app and never commissioned (it boots idle, the pump off)."""
    flash = tmp_path / name
    prepare_flash(boards.load(BOARD), "doser", flash)
    return BoardProcess(BOARD, "doser", flash, speed=speed, world=list(world))


def board_files(port):
    r = subprocess.run([MPREMOTE, "connect", port, "exec", READ_FILES], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: (json.loads(bytes.fromhex(v)) if k.endswith(".json") else v) for k, v in out.items()}


def board_status(port):
    """The running role's status() over mpremote, the app left as it was (resume, no reset)."""
    code = "import runtime, json\nprint(json.dumps(runtime.current.role.status()))"
    r = subprocess.run([MPREMOTE, "connect", port, "resume", "exec", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def world_strokes(board):
    return board.status()["world"]["chlorine_plant"]["strokes"]


def commission(board, tmp_path, *extra, export="device.json", device_id="0x3001"):
    limits = tmp_path / "limits.json"
    if not limits.exists():
        limits.write_text(json.dumps(LIMITS))
    return prapa("commission", "--port", board.console_port, "--role", "doser", "--device-id", device_id,
                 "--export", str(tmp_path / export), "--sensor-wait", "1", "--yes", *extra)


def test_commissioning_a_doser_writes_config_limits_and_key_and_it_boots_dosing(tmp_path):
    registry = tmp_path / "registry.db"
    Registry(registry).close()
    (tmp_path / "limits.json").write_text(json.dumps(dict(LIMITS, ceiling_mgl=4.0)))
    board = fresh_doser(tmp_path)
    try:
        assert world_strokes(board) == 0                    # idle without limits: the pump is off
        r = prapa("commission", "--port", board.console_port, "--role", "doser", "--device-id", "0x3001",
                  "--limits", str(tmp_path / "limits.json"), "--limit", "ceiling_mgl=2", "--set", "doser.dose_mgl=2",
                  "--registry", str(registry), "--uart-port", board.uart_port, "--sensor-wait", "1", "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        for step in ("board answers", "config, limits and key written", "console shows the device", "sensor reads",
                     "live inputs", "gateway round trip"):
            assert f"{step} ... ok" in r.stdout, r.stdout
        assert "doser_limits.json" in r.stdout
        line = next(x for x in r.stdout.splitlines() if "console shows the device" in x)
        assert "prapa device=12289 " in line and " state=" in line and "config invalid" not in r.stdout
        assert re.search(r"live inputs \.\.\. ok .*analyser loop, uA \(4000-20000\) (\d+) \[3600\.\.21000\]", r.stdout)
        reg = Registry(registry)
        device = reg.get(0x3001)
        reg.close()
        assert device.role == "doser"
        assert_key_hidden(device.key, r.stdout, r.stderr)

        # The board runs the role (not idle) and doses the plant's water with the limits in force.
        before = world_strokes(board)
        wait_for(lambda: world_strokes(board) > before, 15, "strokes after commissioning")
        status = board_status(board.console_port)
        assert status["state"] == "dosing" and status["interlocks"] == "-" and status["total_strokes"] > 0
        assert status["day_allow"] == 80000                           # 40 L a day of 0.5 mL strokes

        on_board = board_files(board.console_port)
        assert on_board["doser_limits.json"] == LIMITS                # the file's keys, --limit over the file
        assert bytes.fromhex(on_board["device.key"]) == device.key
        config = on_board["config.json"]
        assert config["device_id"] == 0x3001 and config["doser"]["dose_mgl"] == 2
        assert config["doser"]["stroke_ml"] == 0.5                    # defaults filled in
        assert not [f for f in on_board["files"] if f.endswith(".new")]
    finally:
        board.close()


@pytest.fixture(scope="module")
def idle_doser(tmp_path_factory):
    board = fresh_doser(tmp_path_factory.mktemp("idle-doser"), world=())
    yield board
    board.close()


BAD_DOSER = [
    ([], "--limits"),                                                     # the limits are required
    (["--limits", "LIMITS", "--set", "doser.dose_mgl=5"], "doser.dose_mgl: 5 exceeds the limit max_dose_mgl 3"),
    (["--limits", "LIMITS", "--set", "doser.target_mgl=2.5"], "ceiling_mgl"),
    (["--limits", "LIMITS", "--set", "doser.stroke_ms=300"], "doser.stroke_ms"),
    (["--limits", "LIMITS", "--limit", "max_spm=0"], "--limit max_spm"),
    (["--limits", "LIMITS", "--limit", "speed=3"], "--limit speed: unknown key"),
    (["--limits", "LIMITS", "--limit", "max_dose_mgl=NaN"], "--limit max_dose_mgl: 'NaN' is not a number"),
    (["--limit", "max_spm=120"], "--limit max_dose_mgl: missing"),         # a limit missing
    (["--limits", "/nonexistent/limits.json"], "--limits"),
    (["--limits", "LIMITS", "--prime", "51"], "--prime"),
    (["--limits", "LIMITS", "--prime", "0"], "--prime"),
    (["--limits", "LIMITS", "--calibrate-strokes", "20"], "--drawdown-ml"),   # no terminal to ask on
    (["--limits", "LIMITS", "--drawdown-ml", "10"], "--drawdown-ml"),
    (["--limits", "LIMITS", "--calibrate-strokes", "20", "--drawdown-ml", "2000"], "--drawdown-ml"),
    (["--limits", "LIMITS", "--calibrate-strokes", "20", "--drawdown-ml", "0"], "--drawdown-ml"),
    (["--limits", "LIMITS", "--calibrate-strokes", "20", "--drawdown-ml", "inf"], "--drawdown-ml"),
    (["--limits", "LIMITS", "--calibrate-strokes", "20", "--drawdown-ml", "10", "--set", "doser.stroke_ml=1"],
     "--calibrate-strokes"),
    (["--role", "meter", "--limits", "LIMITS"], "--limits"),              # a role without hard limits
    (["--role", "meter", "--prime", "5"], "--prime"),
]


@pytest.mark.parametrize("extra, said", BAD_DOSER, ids=[" ".join(c[0]) or "no limits" for c in BAD_DOSER])
def test_bad_doser_commission_input_exits_2_naming_the_field_and_writes_nothing(tmp_path, idle_doser, extra, said):
    (tmp_path / "limits.json").write_text(json.dumps(LIMITS))
    before = board_files(idle_doser.console_port)
    assert "doser_limits.json" not in before and "device.key" not in before
    args = [str(tmp_path / "limits.json") if x == "LIMITS" else x for x in extra]
    role = args[args.index("--role") + 1] if "--role" in args else "doser"
    args = [x for i, x in enumerate(args) if x != "--role" and (i == 0 or args[i - 1] != "--role")]
    r = prapa("commission", "--port", idle_doser.console_port, "--role", role, "--device-id", "9",
              "--export", str(tmp_path / "device.json"), "--yes", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and said in r.stderr and "; fix: " in r.stderr, r.stderr
    assert board_files(idle_doser.console_port) == before
    assert not (tmp_path / "device.json").exists()


def test_prime_makes_exactly_the_strokes_asked_for(tmp_path):
    board = fresh_doser(tmp_path)
    try:
        # dose 0: the water runs (the sensor check passes) but the control law makes no strokes itself
        r = commission(board, tmp_path, "--limits", str(tmp_path / "limits.json"), "--set", "doser.dose_mgl=0",
                       "--prime", "5", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        prime = next(e for e in events if e.get("step") == "prime")
        assert prime["ok"] and prime["detail"] == "5 of 5 made"
        summary = events[-1]
        assert summary["ok"] and summary["primed"] == 5 and summary["limits"] == LIMITS
        assert summary["calibrated"] is None
        inputs = summary["inputs"]
        assert inputs["analyzer_ua"]["ok"] and 3600 <= inputs["analyzer_ua"]["value"] <= 21000
        assert inputs["interlocks"] == {"value": "-", "ok": True, "label": "interlocks stopping the pump",
                                        "low": ["-"], "high": None}
        assert world_strokes(board) == 5                              # the pump's truth
        assert board_status(board.console_port)["total_strokes"] == 5  # counted like any other stroke
    finally:
        board.close()


def test_a_draw_down_calibration_writes_stroke_ml(tmp_path):
    board = fresh_doser(tmp_path)
    try:
        r = commission(board, tmp_path, "--limits", str(tmp_path / "limits.json"), "--calibrate-strokes", "20",
                       "--drawdown-ml", "10.4")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "calibration ... ok" in r.stdout and "doser.stroke_ml = 0.52 mL (10.4 mL drawn by 20 strokes)" in r.stdout
        assert board_files(board.console_port)["config.json"]["doser"]["stroke_ml"] == 0.52
    finally:
        board.close()


def test_an_analyser_loop_below_3_6_mA_fails_the_live_inputs_with_the_fix(tmp_path):
    board = fresh_doser(tmp_path, world=(FLOW, "chlorine_plant.analyzer_fault=1"))      # 2 mA: a broken loop
    try:
        r = commission(board, tmp_path, "--limits", str(tmp_path / "limits.json"), "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        step = next(e for e in events if e.get("step") == "live inputs")
        assert step["ok"] is False and "OUT OF RANGE" in step["detail"]
        assert step["fix"].startswith("analyzer_ua 2000: below 3600 uA") and "loop wiring to GPIO 36" in step["fix"]
        assert next(e for e in events if e.get("step") == "sensor reads")["ok"]     # the flow check still passes
        assert events[-1]["inputs"]["analyzer_ua"] == {"value": 2000, "ok": False,
                                                       "label": "analyser loop, uA (4000-20000)",
                                                       "low": 3600, "high": 21000}
        assert (tmp_path / "device.json").exists()          # commissioned: the gateway must learn the key
    finally:
        board.close()


def test_a_low_tank_refuses_the_prime_and_shows_on_the_live_inputs_with_the_fixes(tmp_path):
    board = fresh_doser(tmp_path, world=(FLOW, "chlorine_plant.tank_start_l=10"))     # below the float switch
    try:
        r = commission(board, tmp_path, "--limits", str(tmp_path / "limits.json"), "--prime", "5")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "prime ... FAIL" in r.stdout and "the board refused: prime: the tank's low switch is closed" in r.stdout
        assert "fix: fill the tank first" in r.stdout
        assert "console shows the device ... ok" in r.stdout and "sensor reads ... ok" in r.stdout   # back in the app
        assert re.search(r"live inputs \.\.\. FAIL .*interlocks stopping the pump tank_low \[-\] OUT OF RANGE", r.stdout)
        assert "fix: interlocks tank_low: tank_low: fill the tank or check the float switch on GPIO 13" in r.stdout
        assert world_strokes(board) == 0                    # nothing primed, nothing dosed: the tank is low
    finally:
        board.close()


def test_at_a_terminal_the_board_makes_the_calibration_strokes_and_asks_for_the_ml(tmp_path):
    board = fresh_doser(tmp_path)
    (tmp_path / "limits.json").write_text(json.dumps(LIMITS))
    child = pexpect.spawn(sys.executable, ["-m", "tools.cli", "commission", "--port", board.console_port, "--role",
                                           "doser", "--device-id", "77", "--export", str(tmp_path / "device.json"),
                                           "--limits", str(tmp_path / "limits.json"), "--set", "doser.dose_mgl=0",
                                           "--calibrate-strokes", "20"],
                          cwd=str(ROOT), encoding="utf-8", timeout=30)
    try:
        child.expect(r"press Enter to make 20 strokes")
        child.sendline("")
        child.expect(r"mL drawn from the column by 20 strokes")
        child.sendline("2000")                            # 100 mL a stroke: beyond the schema, asked again
        child.expect(r"doser.stroke_ml 100: .*out of range.*fix: ")
        child.sendline("10.4")
        child.expect(r"calibration \.\.\. ok .*doser.stroke_ml = 0.52 mL \(10.4 mL drawn by 20 strokes\)")
        child.expect(r"press Enter when it has")          # the sensor check, once the board runs the new config
        time.sleep(1)                                     # 10 s of the plant's water at speed 10
        child.sendline("")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert world_strokes(board) == 20
        assert board_files(board.console_port)["config.json"]["doser"]["stroke_ml"] == 0.52
    finally:
        child.close(force=True)
        board.close()
