"""prapa gateway: run the gateway service, queue commands and config pushes for boards.

Exit codes: 0 ok, 1 failure, 2 usage (a bad config file or argument: the
message names the key or argument and the fix; the service does not start).
"""

import json
import logging
import sqlite3
import sys

from protocol.errors import UsageError
from tools import args as types


def add_parser(sub):
    g = sub.add_parser("gateway", help="the gateway service and its device registry", description=__doc__)
    gsub = g.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND", parser_class=type(g))
    gsub.required = True
    run = gsub.add_parser("run", help="run the gateway service until SIGTERM",
                          description="Run the gateway: links, sessions, durable store, MQTT forwarder, metrics "
                                      "and status page, as configured in one TOML file (see "
                                      "gateway/gateway.example.toml). Under systemd it notifies READY and pings "
                                      "the watchdog (deploy/prapa-gateway.service).")
    run.add_argument("--config", required=True, type=types.existing_file, metavar="TOML",
                     help="the gateway config file")
    run.set_defaults(func=cmd_run)
    cmd = gsub.add_parser("command", help="queue a command for a board (held until the board answers)",
                          description="Queue a command for a board. The gateway sends it at once and the moment "
                                      "the board is heard (a battery board listens only just after it wakes), "
                                      "again each time the board is heard without answering, up to 5 tries, and "
                                      "records the board's answer; a command the board refuses is reported, not "
                                      "retried.")
    cmd.add_argument("--config", required=True, type=types.existing_file, metavar="TOML")
    cmd.add_argument("--device", required=True, type=types.device_id,
                     help="device id (decimal or 0x...), of a device in the gateway's registry")
    cmd.add_argument("name", metavar="NAME", choices=_command_names(),
                     help="ping, reboot, or a command the device's role declares (doser: reset_interlock; "
                          "drain: rain); checked as a command over MQTT is (gateway/commands.py)")
    cmd.add_argument("--args", default="{}", metavar="JSON", help='the command\'s arguments as a JSON object, '
                     'e.g. \'{"mm_h": 30, "for_s": 1800}\' (default {})')
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_command)
    push = gsub.add_parser("push-config", help="queue a new role config for a board",
                           description="Queue a config push; the board validates it against its own schema and "
                                       "limits, stores it atomically and reboots into it, or refuses it with the "
                                       "field and the fix.")
    push.add_argument("--config", required=True, type=types.existing_file, metavar="TOML")
    push.add_argument("--device", required=True, type=types.device_id,
                      help="device id (decimal or 0x...), of a device in the gateway's registry")
    push.add_argument("--file", required=True, type=types.existing_file, metavar="JSON",
                      help="the board config (as on the board's /config.json), checked here with the board's "
                      "own schema for the device's role")
    push.add_argument("--json", action="store_true")
    push.set_defaults(func=cmd_push)
    try:
        from tools import devices
    except ImportError:
        return
    devices.add_devices_parser(gsub)


def _setup_logging(level):
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")


def cmd_run(args):
    """Config, then everything the service must own (ports, links, its folder's parent), then the
    service: a refusal at any step exits 2 with nothing created."""
    import asyncio

    from gateway import config
    from gateway.service import Service, claim
    cfg = config.load(args.config)
    _setup_logging(cfg.gateway.log_level)
    claimed = claim(cfg)
    return asyncio.run(Service.create(cfg, claimed).run())


def _registered(cfg, device_id):
    """The device's registry record: a command for a device the gateway does not serve would wait forever."""
    from gateway.registry import Registry
    if not cfg.registry_path.is_file():
        raise UsageError("--config", f"no registry at {cfg.registry_path}", "start the gateway once (prapa gateway "
                         "run) and commission the device (prapa commission --registry)")
    reg = Registry(cfg.registry_path)
    try:
        device = reg.get(device_id)
    finally:
        reg.close()
    if device is None or device.state == "retired":
        raise UsageError("--device", f"{device_id} ({device_id:#x}) is " +
                         ("retired" if device else f"not in the registry {cfg.registry_path}"),
                         "give the id of a device this gateway serves (see: prapa gateway devices list "
                         f"--registry {cfg.registry_path})")
    return device


def _submit(args, name, body, cfg, flag):
    """gateway/commands.py's submit(), the same check and queue as a command over MQTT; a refusal is a
    UsageError naming `flag` and the field (exit 2), nothing queued."""
    from gateway import commands
    from gateway.registry import Registry
    from gateway.store import Store
    if not cfg.store_path.is_file():
        raise UsageError("--config", f"no store at {cfg.store_path}", "start the gateway once (prapa gateway run)")
    try:
        store, registry = Store(cfg.store_path), Registry(cfg.registry_path)
        try:
            outcome = commands.submit(store, registry, args.device, name, body)
        finally:
            store.close()
            registry.close()
    except (OSError, sqlite3.Error) as e:           # not a store, or a full disk: nothing was queued
        raise UsageError("--config", f"cannot queue in {cfg.store_path} ({e})",
                         "check the gateway's data_dir (disk space, permissions)") from None
    if outcome.state == "refused":
        limit = "" if outcome.limit is None else f" (limit {outcome.limit})"
        raise UsageError(f"{flag}: {outcome.field}", outcome.detail + limit, outcome.fix or "")
    qid = outcome.downlink_id
    print(json.dumps({"queued": qid, "device": args.device}) if args.json else
          f"queued request {qid} for device {args.device:#x}; the gateway sends it when the board is heard")
    return 0


def _command_names():
    """Every command a board of some role takes: refused before any file is read when it is none of them
    (whether the device's own role takes it is checked with the registry, by submit())."""
    from protocol.roles import catalog
    names = ["ping", "reboot"]
    for role in catalog.available():
        names += [n for n in catalog.attr(role, "COMMANDS", ()) if n not in names]
    return names


def cmd_command(args):
    from gateway import config
    cfg = config.load(args.config)
    _registered(cfg, args.device)
    try:
        command_args = json.loads(args.args)
    except ValueError as e:
        raise UsageError("--args", f"not JSON ({e})", 'give a JSON object, e.g. \'{"mm_h": 30}\'') from None
    return _submit(args, args.name, command_args, cfg, "command")


def cmd_push(args):
    """The file as the board will get it, once the board's own checks (gateway/commands.py: the schema
    of the role the registry gives the device) accept it: a push the board must refuse is refused here,
    exit 2. The doser's hard limits are on the board only: a push beyond them the board refuses."""
    from gateway import config
    cfg = config.load(args.config)
    _registered(cfg, args.device)
    body = config.read_json(args.file, "--file", "give a board config JSON file (as the board keeps /config.json)")
    if not isinstance(body, dict) or "device_id" not in body or body["device_id"] != args.device:
        raise UsageError("--file", "device_id missing or not the --device given",
                         f'set "device_id": {args.device} in the file')
    return _submit(args, "config", body, cfg, f"--file {args.file}")
