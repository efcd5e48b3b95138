"""Every command that takes input refuses bad input the same way: exit 2, one line on stderr naming the
argument or the file's key, no traceback, and nothing created (in its working folder, its TMPDIR or
the folders it was given).

The argument sets are generated: for each command, its files (not UTF-8, not JSON/TOML, wrong types,
out of range, NaN and Infinity), its values (negative, zero, huge, past 32 bits, text), its paths
(missing, a folder, a file where a folder should be, a folder nobody may write) and its ports (bound
here first). Each set runs `prapa` as a child process in a folder of its own; they run side by side and
each is then one test. `pytest -s` prints how many sets there are."""

import fcntl
import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(1, 17))
BOARD = "esp32-devkitc"
AS_ROOT = os.geteuid() == 0
# Root writes anywhere: a locked set runs as root without the capabilities that override permissions.
SETPRIV = shutil.which("setpriv")
UNPRIVILEGED = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search"] if AS_ROOT and SETPRIV else []
TIMEOUT_S = 30


class Case(NamedTuple):
    name: str
    argv: tuple          # "{d}" is the case's folder (its working folder)
    says: str            # the start of what the one line must name (the argument, or the file's key)
    setup: object = None     # setup(folder, stack): writes or binds what the case needs, held by stack
    locked: bool = False     # {d}/ro may not be written (as root: run without CAP_DAC_OVERRIDE)


# -- files: what a loader may be handed ---------------------------------------------------------------
NOT_UTF8 = b"\xff\xfe\x00bad"
NAN_INF = {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "e400": "1e400"}


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def files(**named):
    """A setup writing {d}/NAME for each NAME=content."""
    def setup(d, _stack):
        for name, data in named.items():
            _write(d / name.replace("__", "/"), data)
    return setup


def both(*setups):
    def setup(d, stack):
        for s in setups:
            if s is not None:
                s(d, stack)
    return setup


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_toml(data_dir="newdata", links=None, http=None, extra="", site="t1"):
    links = links if links is not None else f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{free_port(socket.SOCK_DGRAM)}"\n'
    return (f'[gateway]\nsite = "{site}"\ndata_dir = "{data_dir}"\n\n{links}\n'
            f'[[brokers]]\nurl = "mqtt://127.0.0.1:1"\n\n[http]\nlisten = "127.0.0.1:{http or free_port()}"\n{extra}')


def held_udp(d, stack):
    """A gateway.toml whose UDP port this test holds."""
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.bind(("127.0.0.1", 0))
    _write(d / "gw.toml", gateway_toml(links=f'[[links]]\ntype = "udp"\nbind = "127.0.0.1:{s.getsockname()[1]}"\n'))
    _write(d / "port", str(s.getsockname()[1]))


def held_tcp(d, stack):
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.bind(("127.0.0.1", 0))
    s.listen()
    _write(d / "gw.toml", gateway_toml(http=s.getsockname()[1]))


def held_pty(d, stack):
    """A serial port (a pty) another program holds locked, as pyserial's exclusive=True does; its
    path in {d}/tty.txt and in a gateway.toml's serial link."""
    master, slave = pty.openpty()
    stack.callback(os.close, master)
    stack.callback(os.close, slave)
    fcntl.flock(slave, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = os.ttyname(slave)
    _write(d / "tty.txt", path)
    _write(d / "gw.toml", gateway_toml(links=f'[[links]]\ntype = "serial"\nport = "{path}"\n'))


def free_pty(d, stack):
    """A serial port (a pty) nobody answers on; its path in {d}/tty.txt."""
    master, slave = pty.openpty()
    stack.callback(os.close, master)
    stack.callback(os.close, slave)
    _write(d / "tty.txt", os.ttyname(slave))


def registry_and_store(d, _stack):
    """{d}/data: a gateway's registry (0x1001 a meter, 0x1002 retired) and store, and gw.toml using them."""
    from gateway.registry import Registry
    from gateway.store import Store
    (d / "data").mkdir()
    reg = Registry(d / "data" / "registry.db")
    reg.add(0x1001, "meter", KEY)
    reg.add(0x1002, "meter", bytes(range(2, 18)))
    reg.retire(0x1002)
    reg.close()
    Store(d / "data" / "store.db").close()
    _write(d / "gw.toml", gateway_toml(data_dir="data"))


def export(**record):
    base = {"device_id": 5, "role": "meter", "key": KEY.hex()}
    return json.dumps({"format": "prapa-registry-export", "version": 1, "devices": [{**base, **record}]})


def _raw(template, **values):
    """JSON text with values dropped in as written (NaN, Infinity and 1e400 are not json.dumps output)."""
    text = template
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    return text


# -- the argument sets ----------------------------------------------------------------------------------
BAD_WHOLE = {"neg": "-1", "zero": "0", "u32": "4294967296", "huge": "99999999999999999999999", "text": "ten",
             "frac": "1.5", "nan": "nan", "inf": "inf", "empty": ""}
BAD_POSITIVE = {"neg": "-1", "text": "x", "nan": "nan", "inf": "inf", "huge": "1e400"}


def cases():
    out = []

    def add(name, argv, says, setup=None, locked=False):
        if "@tty" in argv:                      # a held pty (held_pty, run after) takes its place
            setup = both(free_pty, setup)
        out.append(Case(name, tuple(argv), says, setup, locked))

    # argparse's own refusals, in every shape
    add("prapa-nothing", [], "prapa")
    add("prapa-unknown-command", ["nonsense"], "prapa COMMAND")
    add("prapa-unknown-option", ["build", "--board", BOARD, "--role", "meter", "--frobnicate"], "prapa")
    add("gateway-no-subcommand", ["gateway"], "prapa gateway")
    add("build-bad-target", ["build", "--board", BOARD, "--role", "meter", "--target", "esp8266"], "--target")
    add("gateway-command-bad-name", ["gateway", "command", "--config", "gw.toml", "--device", "1", "pong"],
        "prapa gateway command NAME", files(**{"gw.toml": gateway_toml()}))
    add("monitor-bad-direction", ["monitor", "--udp", "127.0.0.1:5683", "--direction", "sideways"], "--direction")

    # prapa build: its config, board, out folder
    build = ["build", "--board", BOARD, "--role", "meter", "--out", "out"]
    good = {"device_id": 7, "role": "meter"}
    for name, text, says in [
        ("not-utf8", NOT_UTF8, "--config"),
        ("not-json", "{not json", "--config"),
        ("empty", "", "--config"),
        ("a-list", "[1, 2]", "--config"),
        ("deep", "[" * 100000 + "]" * 100000, "--config"),
        *[(f"section-{k}", _raw('{"device_id": 7, "role": "meter", "meter": {"k_factor_l": @v@}}', v=v), "--config")
          for k, v in NAN_INF.items()],
        *[(f"device-id-{k}", _raw('{"device_id": @v@, "role": "meter"}', v=v), "--config")
          for k, v in {**NAN_INF, "neg": "-1", "zero": "0", "u32": "4294967296", "text": '"7"', "bool": "true"}.items()],
        ("wrong-type", json.dumps({**good, "meter": {"interval_min": "15"}}), "--config"),
        ("out-of-range", json.dumps({**good, "meter": {"interval_min": 61}}), "--config"),
        ("not-a-divisor", json.dumps({**good, "meter": {"interval_min": 7}}), "--config"),
        ("past-32-bits", json.dumps({**good, "meter": {"register_l": 2**40}}), "--config"),
        ("negative", json.dumps({**good, "meter": {"debounce_us": -1}}), "--config"),
        ("unknown-key", json.dumps({**good, "meter": {"k_factor": 1}}), "--config"),
        ("unknown-section", json.dumps({**good, "pump": {}}), "--config"),
        ("link-addr", json.dumps({**good, "link": {"addr": 255}}), "--config"),
        ("link-gateway", json.dumps({**good, "link": {"kind": "udp", "gateway": "nowhere"}}), "--config"),
        ("section-not-object", json.dumps({**good, "meter": [1]}), "--config"),
    ]:
        add(f"build-config-{name}", build + ["--config", "c.json"], says, files(**{"c.json": text}))
    add("build-config-doser-section", ["build", "--board", BOARD, "--role", "doser", "--out", "out", "--config",
                                       "c.json"], "--config",
        files(**{"c.json": json.dumps({"device_id": 7, "role": "doser", "doser": {"dose_mgl": 11}})}))
    add("build-config-missing", build + ["--config", "nope.json"], "--config")
    add("build-config-folder", build + ["--config", "."], "--config")
    add("build-config-under-a-file", build + ["--config", "f/c.json"], "--config", files(f="x"))
    add("build-out-a-file", build[:-1] + ["f"], "--out", files(f="x"))
    add("build-out-under-a-file", build[:-1] + ["f/out"], "--out", files(f="x"))
    add("build-out-unwritable", build[:-1] + ["ro/out"], "--out", locked=True)
    add("build-board-not-utf8", ["build", "--board", "b.toml", "--role", "meter", "--out", "out"], "--board",
        files(**{"b.toml": NOT_UTF8}))
    add("build-board-not-toml", ["build", "--board", "b.toml", "--role", "meter", "--out", "out"], "--board",
        files(**{"b.toml": "[board\nname ="}))
    add("build-board-folder", ["build", "--board", ".", "--role", "meter", "--out", "out"], "--board")
    add("build-role", ["build", "--board", BOARD, "--role", "pump", "--out", "out"], "--role")

    # prapa flash: refused before any port is touched
    flash = ["flash", "--board", BOARD, "--role", "meter"]
    add("flash-no-port", flash, "prapa flash")
    add("flash-port-missing", flash + ["--port", "/dev/ttyNOPE9", "--app-only"], "--port")
    add("flash-port-folder", flash + ["--port", ".", "--app-only"], "--port")
    add("flash-port-a-file", flash + ["--port", "f", "--app-only"], "--port", files(f="x"))
    add("flash-port-busy", flash + ["--port", "@tty", "--app-only"], "--port", held_pty)
    for k, v in {**BAD_WHOLE, "odd-rate": "12345"}.items():
        add(f"flash-baud-{k}", flash + ["--port", "/dev/ttyNOPE9", f"--baud={v}"], "--baud")
    for arg in ("--firmware", "--image"):
        add(f"flash{arg}-missing", flash + ["--port", "/dev/ttyNOPE9", arg, "nope.bin"], arg)
        add(f"flash{arg}-folder", flash + ["--port", "/dev/ttyNOPE9", arg, "."], arg)
        add(f"flash{arg}-junk", flash + ["--port", "/dev/ttyNOPE9", arg, "j.bin"], arg, files(**{"j.bin": NOT_UTF8}))

    # prapa commission: every refusal before the port is touched (a pty nobody answers on: a set that
    # went through would fail there, not exit 2)
    com = ["commission", "--port", "@tty", "--role", "meter", "--export", "new.json"]
    doser = ["commission", "--port", "@tty", "--role", "doser", "--export", "new.json", "--limit",
             "max_spm=100", "--limit", "max_dose_mgl=5", "--limit", "max_l_day=50", "--limit", "ceiling_mgl=2"]
    for k, v in {**BAD_WHOLE, "max": "4294967295"}.items():
        add(f"commission-device-id-{k}", com + [f"--device-id={v}"], "--device-id")
    for name, text in [("not-utf8", NOT_UTF8), ("not-json", "{"), ("nan", '{"meter": {"k_factor_l": NaN}}'),
                       ("inf", '{"meter": {"k_factor_l": Infinity}}'), ("e400", '{"meter": {"k_factor_l": 1e400}}'),
                       ("range", '{"meter": {"interval_min": 0}}'), ("type", '{"link": {"addr": "3"}}')]:
        add(f"commission-config-{name}", com + ["--device-id", "9", "--config", "c.json"], "--config",
            files(**{"c.json": text}))
    for k, v in {"nan": "NaN", "inf": "Infinity", "range": "61", "text": "often", "u32": "4294967296"}.items():
        add(f"commission-set-{k}", com + ["--device-id", "9", "--set", f"meter.interval_min={v}"], "--set")
    for name, text in [("not-utf8", NOT_UTF8), ("not-json", "{"), ("list", "[]"),
                       ("nan", '{"max_spm": NaN, "max_dose_mgl": 5, "max_l_day": 50, "ceiling_mgl": 2}'),
                       ("range", '{"max_spm": 601, "max_dose_mgl": 5, "max_l_day": 50, "ceiling_mgl": 2}')]:
        add(f"commission-limits-{name}", doser[:7] + ["--device-id", "9", "--limits", "l.json"], "--limits",
            files(**{"l.json": text}))
    add("commission-limit-inf", doser + ["--device-id", "9", "--limit", "max_l_day=Infinity"], "--limit")
    for k, v in {"neg": "-1", "zero": "0", "over": "51", "text": "x", "u32": "4294967296"}.items():
        add(f"commission-prime-{k}", doser + ["--device-id", "9", f"--prime={v}"], "--prime")
    for k, v in {"neg": "-1", "zero": "0", "nan": "nan", "inf": "inf"}.items():
        add(f"commission-drawdown-{k}", doser + ["--device-id", "9", "--calibrate-strokes", "10",
                                                 f"--drawdown-ml={v}"], "--drawdown-ml")
    for k, v in {"neg": "-1", "zero": "0", "text": "x"}.items():
        add(f"commission-calibrate-{k}", doser + ["--device-id", "9", f"--calibrate-strokes={v}",
                                                  "--drawdown-ml", "5"], "--calibrate-strokes")
    for k, v in {"neg": "-1", "nan": "nan", "inf": "inf"}.items():
        add(f"commission-sensor-wait-{k}", com + ["--device-id", "9", f"--sensor-wait={v}"], "--sensor-wait")
    add("commission-export-exists", com[:-1] + ["f", "--device-id", "9"], "--export", files(f="{}"))
    add("commission-export-no-folder", com[:-1] + ["nowhere/new.json", "--device-id", "9"], "--export")
    add("commission-registry-not-a-db", ["commission", "--port", "@tty", "--role", "meter", "--device-id",
                                         "9", "--registry", "r.db"], "r.db", files(**{"r.db": "text " * 100}))
    add("commission-port-missing", ["commission", "--port", "/dev/ttyNOPE9", "--role", "meter", "--device-id", "9",
                                    "--export", "new.json"], "--port")

    # prapa gateway run: its TOML, its data_dir, its ports (nothing may be created: data_dir is new)
    run = ["gateway", "run", "--config", "gw.toml"]
    for name, text, says in [
        ("not-utf8", NOT_UTF8, "gw.toml"),
        ("not-toml", "[gateway\nsite =", "gw.toml"),
        ("empty", "", "gw.toml: gateway"),
        ("nan", gateway_toml(extra="[store]\nretention_days = nan\n"), "gw.toml: store.retention_days"),
        ("inf", gateway_toml(extra="[store]\nmin_free_mb = inf\n"), "gw.toml: store.min_free_mb"),
        ("huge", gateway_toml(extra="[store]\nretention_days = 99999999999999999999\n"), "gw.toml"),
        ("negative", gateway_toml(extra="[store]\ngroup_commit_ms = -1\n"), "gw.toml: store.group_commit_ms"),
        ("wrong-type", gateway_toml(extra='[time]\nsync_interval_s = "60"\n'), "gw.toml: time.sync_interval_s"),
        ("unknown-key", gateway_toml(extra="[time]\nsync_s = 60\n"), "gw.toml: time.sync_s"),
        ("udp-port-range", gateway_toml(links='[[links]]\ntype = "udp"\nbind = "127.0.0.1:65536"\n'),
         "gw.toml: links[0].bind"),
        ("udp-not-here", gateway_toml(links='[[links]]\ntype = "udp"\nbind = "192.0.2.1:5683"\n'),
         "gw.toml: links[0].bind"),
        ("http-privileged", gateway_toml(http=1) if not AS_ROOT else None, "gw.toml: http.listen"),
        ("data-dir-a-file", gateway_toml(data_dir="gw.toml"), "gw.toml: gateway.data_dir"),
        ("data-dir-nul", gateway_toml(data_dir="a\\u0000b"), "gw.toml: gateway.data_dir"),
        ("data-dir-under-a-file", gateway_toml(data_dir="gw.toml/data"), "gw.toml: gateway.data_dir"),
        ("serial-missing", gateway_toml(links='[[links]]\ntype = "serial"\nport = "/dev/ttyNOPE9"\n'),
         "gw.toml: links[0].port"),
        ("serial-a-file", gateway_toml(links='[[links]]\ntype = "serial"\nport = "gw.toml"\n'),
         "gw.toml: links[0].port"),
        ("serial-baud", gateway_toml(links='[[links]]\ntype = "serial"\nport = "/dev/null"\nbaudrate = 0\n'),
         "gw.toml: links[0].baudrate"),
    ]:
        if text is not None:
            add(f"gateway-run-{name}", run, says, files(**{"gw.toml": text}))
    add("gateway-run-config-missing", run, "--config")
    add("gateway-run-config-folder", ["gateway", "run", "--config", "."], "--config")
    add("gateway-run-udp-busy", run, "gw.toml: links[0].bind", held_udp)
    add("gateway-run-http-busy", run, "gw.toml: http.listen", held_tcp)
    add("gateway-run-serial-busy", run, "gw.toml: links[0].port", held_pty)
    add("gateway-run-data-dir-unwritable", ["gateway", "run", "--config", "ro/gw.toml"], "ro/gw.toml: gateway.data_dir",
        files(**{"ro__gw.toml": gateway_toml(data_dir="data")}), locked=True)
    add("gateway-run-store-not-a-db", run, "gw.toml: gateway.data_dir",
        files(**{"gw.toml": gateway_toml(data_dir="old"), "old__store.db": "not a database " * 100}))
    add("gateway-run-registry-not-a-db", run, "old/registry.db",
        files(**{"gw.toml": gateway_toml(data_dir="old"), "old__registry.db": "not a database " * 100}))

    # prapa gateway command / push-config: the device (the registry's), the file (the board's checks)
    for k, v in {**BAD_WHOLE, "max": "4294967295", "unknown": "0x1003", "retired": "0x1002"}.items():
        add(f"gateway-command-device-{k}", ["gateway", "command", "--config", "gw.toml", f"--device={v}", "ping"],
            "--device", registry_and_store)
    add("gateway-command-no-store", ["gateway", "command", "--config", "gw.toml", "--device", "1", "ping"],
        "--config", files(**{"gw.toml": gateway_toml(data_dir=".")}))
    add("gateway-command-config-not-utf8", ["gateway", "command", "--config", "c.toml", "--device", "1", "ping"],
        "c.toml", files(**{"c.toml": NOT_UTF8}))
    push = ["gateway", "push-config", "--config", "gw.toml", "--device", "0x1001", "--file", "p.json"]
    meter = '{"device_id": 4097, "role": "meter", "meter": {@k@: @v@}}'
    for name, text in [("not-utf8", NOT_UTF8), ("not-json", "{"), ("list", "[]"),
                       *[(k, _raw(meter, k='"k_factor_l"', v=v)) for k, v in NAN_INF.items()],
                       ("range", _raw(meter, k='"interval_min"', v="7")),
                       ("type", _raw(meter, k='"interval_min"', v='"15"')),
                       ("unknown", _raw(meter, k='"k"', v="1")),
                       ("other-device", '{"device_id": 4098, "role": "meter"}'),
                       ("other-role", '{"device_id": 4097, "role": "doser"}')]:
        add(f"gateway-push-{name}", push, "--file", both(registry_and_store, files(**{"p.json": text})))
    add("gateway-push-file-missing", push, "--file", registry_and_store)
    add("gateway-push-device-u32", push[:4] + ["--device", "0x100000000", "--file", "p.json"], "--device",
        both(registry_and_store, files(**{"p.json": "{}"})))

    # prapa gateway devices import / list / export
    imp = ["gateway", "devices", "import", "e.json", "--registry", "r.db"]
    for name, text, says in [
        ("not-utf8", NOT_UTF8, "e.json"), ("not-json", "{", "e.json"), ("deep", "[" * 100000, "e.json"),
        ("format", '{"format": "csv"}', "e.json: format"),
        ("empty", '{"format": "prapa-registry-export", "version": 1, "devices": []}', "e.json: devices"),
        *[(f"last-seen-{k}", _raw(export(last_seen="@v@").replace('"@v@"', "@v@"), v=v), "e.json")
          for k, v in {**NAN_INF, "neg": "-5", "text": '"yesterday"'}.items()],
        *[(f"device-id-{k}", _raw(export(device_id="@v@").replace('"@v@"', "@v@"), v=v), "e.json")
          for k, v in {"neg": "-1", "u32": "4294967296", "text": '"5"', "nan": "NaN", "float": "5.0"}.items()],
        ("bound", export(downlink_bound=2**40), "e.json"), ("role", export(role="pump"), "e.json"),
        ("key", export(key="00" * 16), "e.json"), ("name", export(name="x" * 65), "e.json"),
    ]:
        add(f"gateway-import-{name}", imp, says, files(**{"e.json": text}))
    add("gateway-import-missing", imp, "prapa gateway devices import FILE")
    add("gateway-import-folder", ["gateway", "devices", "import", ".", "--registry", "r.db"], "FILE")
    add("gateway-import-registry-folder", imp[:-1] + ["."], "--registry", files(**{"e.json": export()}))
    add("gateway-import-registry-under-a-file", imp[:-1] + ["e.json/r.db"], "--registry", files(**{"e.json": export()}))
    add("gateway-import-registry-not-a-db", imp, "r.db", files(**{"e.json": export(), "r.db": "text " * 100}))
    add("gateway-import-registry-a-store", imp[:-1] + ["data/store.db"], "data/store.db",
        both(registry_and_store, files(**{"e.json": export()})))
    add("gateway-import-registry-unwritable", ["gateway", "devices", "import", "e.json", "--registry", "ro/r.db"],
        "--registry", files(**{"e.json": export()}), locked=True)
    add("gateway-import-taken", imp[:-1] + ["data/registry.db"], "e.json",
        both(registry_and_store, files(**{"e.json": export(device_id=0x1001)})))
    lst = ["gateway", "devices", "list", "--registry"]
    add("gateway-list-missing", lst + ["r.db"], "--registry")
    add("gateway-list-folder", lst + ["."], "--registry")
    add("gateway-list-not-a-db", lst + ["r.db"], "r.db", files(**{"r.db": "text " * 100}))
    add("gateway-list-not-utf8-db", lst + ["r.db"], "r.db", files(**{"r.db": NOT_UTF8 * 100}))
    exp = ["gateway", "devices", "export", "--registry", "data/registry.db", "--out"]
    for k, v in {"neg": "-1", "u32": "4294967296", "text": "five"}.items():
        add(f"gateway-export-id-{k}", exp + ["x.json", v], "prapa gateway devices export DEVICE_ID", registry_and_store)
    add("gateway-export-out-exists", exp + ["gw.toml", "4097"], "--out", registry_and_store)
    add("gateway-export-out-folder", exp + ["data", "4097"], "--out", registry_and_store)
    add("gateway-export-out-no-folder", exp + ["nowhere/x.json", "4097"], "--out", registry_and_store)
    add("gateway-export-unknown", exp + ["x.json", "77"], "device 77", registry_and_store)

    # prapa monitor
    mon = ["monitor", "--key-file", "k", "--device-id", "1"]
    key = files(k=KEY.hex())
    for k, v in {**BAD_WHOLE}.items():
        if k != "empty":
            add(f"monitor-count-{k}", mon + ["--udp", "127.0.0.1:5683", f"--count={v}"], "--count", key)
    for k, v in {**BAD_POSITIVE, "zero": "0"}.items():
        add(f"monitor-duration-{k}", mon + ["--udp", "127.0.0.1:5683", f"--duration={v}"], "--duration", key)
    for k, v in {"no-port": "localhost", "port-zero": "127.0.0.1:0", "port-range": "127.0.0.1:65536",
                 "text": "127.0.0.1:http"}.items():
        add(f"monitor-udp-{k}", mon + ["--udp", v], "--udp", key)
    add("monitor-udp-busy", mon + ["--udp", "127.0.0.1:@port"], "--udp", both(key, held_udp))
    add("monitor-udp-not-here", mon + ["--udp", "192.0.2.1:5683"], "--udp", key)
    add("monitor-port-missing", mon + ["--port", "/dev/ttyNOPE9"], "--port", key)
    add("monitor-port-a-file", mon + ["--port", "k"], "--port", key)
    add("monitor-port-busy", mon + ["--port", "@tty"], "--port", both(key, held_pty))
    for k, v in {"neg": "-1", "u32": "4294967296", "text": "one"}.items():
        add(f"monitor-device-id-{k}", ["monitor", "--udp", "127.0.0.1:5683", "--key-file", "k", f"--device-id={v}"],
            "--device-id", key)
    add("monitor-key-missing", ["monitor", "--udp", "127.0.0.1:5683", "--key-file", "nope", "--device-id", "1"],
        "--key-file")
    add("monitor-key-folder", ["monitor", "--udp", "127.0.0.1:5683", "--key-file", ".", "--device-id", "1"],
        "--key-file")
    add("monitor-key-not-utf8", ["monitor", "--udp", "127.0.0.1:5683", "--key-file", "k", "--device-id", "1"],
        "--key-file", files(k=NOT_UTF8))
    add("monitor-registry-not-a-db", ["monitor", "--udp", "127.0.0.1:5683", "--registry", "r.db"], "r.db",
        files(**{"r.db": "text " * 100}))

    # prapa board run: parsed and checked before the flash file is made
    brun = ["board", "run", "--board", BOARD, "--role", "meter", "--flash", "flash.img"]
    for k, v in BAD_WHOLE.items():
        add(f"board-run-speed-{k}", brun + [f"--speed={v}"], "--speed")
    for k, v in {"neg": "-1", "wrap": str(2**30), "text": "x", "nan": "nan"}.items():
        add(f"board-run-start-ticks-{k}", brun + [f"--start-ticks-ms={v}"], "--start-ticks-ms")
    for k, v in {"neg": "-1", "u32": "4294967296", "text": "x"}.items():
        add(f"board-run-seed-{k}", brun + [f"--seed={v}"], "--seed")
    for k, v in {"short": "abcd", "text": "zzzzzzzzzzzz", "long": "00" * 7}.items():
        add(f"board-run-unique-id-{k}", brun + ["--unique-id", v], "--unique-id")
    for k, v in {"nan": "nan", "inf": "inf", "text": "fast"}.items():
        add(f"board-run-world-{k}", brun + ["--world", f"flow_meter.forced_lpm={v}"], "--world")
    add("board-run-flash-folder", brun[:-1] + ["."], "--flash")
    add("board-run-flash-under-a-file", brun[:-1] + ["f/flash.img"], "--flash", files(f="x"))
    add("board-run-flash-unwritable", brun[:-1] + ["ro/flash.img"], "--flash", locked=True)
    add("board-run-flash-wrong-size", brun, "--flash", files(**{"flash.img": b"\xff" * 4096}))
    add("board-run-control-folder", brun + ["--control", "."], "--control")
    add("board-run-control-too-long", brun + ["--control", "s" * 120], "--control")
    add("board-run-vm", brun + ["--vm", "unix16"], "--vm")

    # prapa campaign: refused before a site starts
    for option, value in [("--faults", "meteor=3"), ("--faults", "power_cut=-1"), ("--faults", "power_cut=x"),
                          ("--speed", "0"), ("--hours", "nan"), ("--hours", "0"), ("--boards", "65"),
                          ("--quiet", "-1")]:
        add(f"campaign{option}={value}", ["campaign", option, value], option)
    add("campaign-hours-too-short", ["campaign", "--hours", "0.1", "--speed", "1000"], "--hours")

    # prapa bench: only the parsing (a set that parsed would start a benchmark)
    for sub, option, kinds in [("boot", "--boots", "whole"), ("doser", "--speed", "whole"),
                               ("doser", "--jitter-s", "whole"), ("firmware", "--jitter-s", "number"),
                               ("firmware", "--days", "number"), ("firmware", "--cuts", "whole"),
                               ("gateway", "--readings", "whole"), ("gateway", "--devices", "whole"),
                               ("protocol", "--reports", "whole"), ("protocol", "--frames", "whole"),
                               ("site", "--boards", "whole"), ("site", "--seconds", "number")]:
        values = {"neg": "-1", "text": "x", "nan": "nan", "inf": "inf", "huge": "1e400",
                  **({"u32": "4294967296", "frac": "1.5"} if kinds == "whole" else {})}
        for k, v in values.items():
            add(f"bench-{sub}{option}-{k}", ["bench", sub, f"{option}={v}"], option)
    return out


CASES = cases()


# -- running them -----------------------------------------------------------------------------------------
def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*"))


def _run(case, base):
    d = base / case.name
    (d / "tmp").mkdir(parents=True)
    (d / "ro").mkdir()
    with ExitStack() as stack:
        if case.setup is not None:
            case.setup(d, stack)
        subs = {"@tty": (d / "tty.txt").read_text() if (d / "tty.txt").exists() else "",
                "@port": (d / "port").read_text() if (d / "port").exists() else ""}
        argv = []
        for a in case.argv:
            for k, v in subs.items():
                a = a.replace(k, v)
            argv.append(a)
        (d / "ro").chmod(0o555)
        before = _tree(d)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(d / "tmp")}
        prefix = UNPRIVILEGED if case.locked else []
        t0 = time.monotonic()
        try:
            r = subprocess.run([*prefix, sys.executable, "-m", "tools.cli", *argv], cwd=d, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
            result = (r.returncode, r.stdout, r.stderr)
        except subprocess.TimeoutExpired as e:
            result = (None, e.stdout or "", f"still running after {TIMEOUT_S} s: {e.stderr or ''}")
        after = _tree(d)
    return {"argv": argv, "code": result[0], "stdout": result[1], "stderr": result[2], "before": before,
            "after": after, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def results():
    base = Path(tempfile.mkdtemp(prefix="prapa-bad-input-"))
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 2))) as pool:
            done = dict(zip((c.name for c in CASES), pool.map(lambda c: _run(c, base), CASES)))
        print(f"\n{len(CASES)} argument sets over {len({c.argv[:2] for c in CASES})} commands, "
              f"run in {time.monotonic() - t0:.1f} s")
        yield done
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_the_sets_have_distinct_names():
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_exits_2_in_one_line_naming_it_and_creates_nothing(results, case):
    if case.locked and AS_ROOT and not SETPRIV:
        pytest.skip("running as root without setpriv: no folder is unwritable")
    r = results[case.name]
    shown = f"prapa {' '.join(r['argv'])[:300]}\nexit {r['code']}\nstderr: {r['stderr'][-2000:]}"
    assert "Traceback" not in r["stderr"], shown
    assert r["code"] == 2, shown
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("prapa: error: ") and "; fix: " in lines[0], shown
    assert case.says in lines[0].split("; fix: ")[0], f"expected it to name {case.says!r}\n{shown}"
    assert r["after"] == r["before"], f"it created or removed: {set(r['after']) ^ set(r['before'])}\n{shown}"
