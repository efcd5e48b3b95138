"""The board as a technician meets it: it boots, talks on its link, takes
mpremote on its console, keeps its flash through resets and power cuts."""

import time

from gateway.harness import OneLinkGateway
from tools.console import BANNER_BYTES, IDLE_BYTES, parse_banner, parse_idle


def stop_app(dut, tries=4):
    """Ctrl-C until the REPL answers, as a technician does: a Ctrl-C that lands while the board is
    still starting may be lost (or, on the virtual board, restart it), so one is not always enough."""
    import pexpect
    for _ in range(tries):
        dut.write(b"\r\x03")
        try:
            dut.expect_exact(b">>> ", timeout=3)
            return
        except pexpect.TIMEOUT:
            continue
    raise AssertionError(f"no REPL prompt after {tries} Ctrl-C")


def test_board_boots_into_the_app_and_prints_its_banner(board, console):
    with console() as dut:
        stop_app(dut)
        dut.write(b"import machine; machine.reset()\r")
        banner = parse_banner(dut.expect(BANNER_BYTES, timeout=15).group(0))
    assert banner["board"] == board.board.name
    assert banner["role"] == board.role
    assert banner["reset"] == "hard_reset"
    assert banner["heap_budget"] == board.board.heap_budget_bytes
    assert 0 < banner["heap_free"] < banner["heap_budget"]


def test_an_uncommissioned_board_stays_idle_and_says_why(board, console):
    with console() as dut:
        stop_app(dut)
        dut.write(b"import machine; machine.reset()\r")
        dut.expect(BANNER_BYTES, timeout=15)
        idle = parse_idle(dut.expect(IDLE_BYTES, timeout=10).group(0))
    assert idle["field"] == "device_id"
    assert "commission" in idle["fix"]


def test_a_commissioned_board_says_hello_and_answers_over_the_secure_link(board, link, tmp_path):
    """Config and key written over the console (as commissioning does), then a round trip on the
    data link through the gateway's session layer: hello, wall time, a command and its result."""
    key = bytes(range(16))
    board.exec("import json\n"
               "f = open('config.json', 'w'); f.write(json.dumps({'device_id': 4242, 'role': %r})); f.close()\n"
               "f = open('device.key', 'wb'); f.write(%r); f.close()\n" % (board.role, key))
    link.reset_input_buffer()
    with OneLinkGateway(link, tmp_path / "gw.db", {4242: key}) as gateway:
        board.hard_reset()
        dev = gateway.wait_hello(4242, 15)
        assert dev, f"no hello from the board; link refusals: {gateway.refused()}"
        assert dev.role == board.role and dev.board == board.board.name
        result = gateway.command(4242, "ping", timeout=10, resend_s=10)
        assert result, "no command_result"
        assert result[1] is True and result[2].startswith("pong")


def test_mpremote_exec_cp_and_soft_reset_work_on_the_console(board, tmp_path):
    out = board.exec("import os; print(sorted(os.listdir('/')))")
    assert "'main.py'" in out and "'board.json'" in out and "'lib'" in out
    src = tmp_path / "note.txt"
    src.write_text("installed at the bench\n")
    r = board.mpremote("cp", str(src), ":note.txt", "+", "soft-reset", "+", "exec", "print(open('note.txt').read())")
    assert r.returncode == 0, r.stderr
    assert "installed at the bench" in r.stdout


def test_hard_reset_runs_main_again_and_boot_id_advances(board):
    first = int(board.exec("print(open('boot_id').read())"))
    board.hard_reset()
    time.sleep(1.0)
    assert int(board.exec("print(open('boot_id').read())")) == first + 1


def test_flash_survives_a_power_cut(board, needs_power_switch):
    board.exec("f = open('kept.txt', 'w'); f.write('water'); f.close()")
    before = int(board.exec("print(open('boot_id').read())"))
    board.power_cut()
    time.sleep(1.0)
    out = board.exec("print(open('kept.txt').read(), open('boot_id').read())")
    kept, boot = out.split()
    assert kept == "water"
    assert int(boot) == before + 1


def test_watchdog_resets_firmware_that_stops_feeding_it(board, console):
    with console() as dut:
        stop_app(dut)
        dut.write(b"from hal import open_hal; w = open_hal().watchdog(1000)\r")
        dut.write(b"while True: pass\r\r")
        banner = parse_banner(dut.expect(BANNER_BYTES, timeout=20).group(0))
    assert banner["reset"] == "watchdog"


def test_debounced_pulse_count_is_exact_through_contact_bounce(board, needs_world):
    board.set_world("flow_meter", "forced_lpm", 0.0)
    board.exec("from hal import open_hal\n"
               "h = open_hal()\n"
               "c = h.counter(h.board['role_pins']['pulse_in'], active_level=0, filter_us=5000)\n")
    time.sleep(0.5)
    before = board.status()["world"]["flow_meter"]["pulses"]
    board.set_world("flow_meter", "forced_lpm", 120.0)       # 2 pulses per second, bouncing up to 5 ms
    time.sleep(4.0)
    board.set_world("flow_meter", "forced_lpm", 0.0)
    time.sleep(1.5)
    truth = board.status()["world"]["flow_meter"]["pulses"] - before
    counted = int(board.exec("print(c.count())", resume=True))
    assert truth >= 6
    assert counted == truth


def test_reading_inputs_allocates_nothing_under_heap_lock(board, needs_world):
    """The sampling path reads pins and counters under micropython.heap_lock():
    any allocation there raises MemoryError, as it would in a hard IRQ."""
    board.set_world("flow_meter", "forced_lpm", 600.0)       # 10 pulses/s of bouncing edges to process
    out = board.exec(
        "import micropython, time\n"
        "from hal import open_hal\n"
        "h = open_hal()\n"
        "pins = h.board['role_pins']\n"
        "c = h.counter(pins['pulse_in'], active_level=0, filter_us=5500)\n"
        "p = h.pin_in(pins['pulse_in'])\n"
        "def sample(n):\n"
        "    for _ in range(n):\n"
        "        c.count(); p.value(); h.ticks_ms(); h.ticks_us()\n"
        "sample(10)\n"
        "r = None\n"                        # a new global under the lock would grow the globals' dict
        "time.sleep_ms(1000)\n"
        "micropython.heap_lock()\n"
        "try:\n"
        "    sample(2000)\n"
        "    r = 'NO_ALLOC'\n"
        "except MemoryError:\n"
        "    r = 'ALLOCATED'\n"
        "micropython.heap_unlock()\n"
        "print(r, c.count())\n", timeout=60)
    verdict, count = out.split()
    assert verdict == "NO_ALLOC"
    assert int(count) > 0, "edges must have flowed while the heap was locked"


def test_frame_counters_resume_above_every_used_one_after_a_power_cut(board, needs_power_switch):
    """Counter reservations on the board's own littlefs flash survive a power cut."""
    first = board.exec("from frame_counter import FlashCounters\n"
                       "c = FlashCounters('ctr_test', block=16)\n"
                       "print(' '.join(str(c.next()) for _ in range(20)))\n")
    used = [int(x) for x in first.split()]
    assert used == list(range(20))
    board.power_cut()
    time.sleep(1.0)
    after = board.exec("from frame_counter import FlashCounters\n"
                       "print(FlashCounters('ctr_test', block=16).next())\n")
    assert int(after) > max(used)
