"""prapa gateway: run the gateway service, queue commands and config pushes for boards.

Exit codes: 0 ok, 1 failure, 2 usage (a bad config file or argument: the
message names the key or argument and the fix; the service does not start).
"""

import json
import logging
import sys

from protocol.errors import UsageError


def add_parser(sub):
    g = sub.add_parser("gateway", help="the gateway service and its device registry", description=__doc__)
    gsub = g.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND", parser_class=type(g))
    gsub.required = True
    run = gsub.add_parser("run", help="run the gateway service until SIGTERM",
                          description="Run the gateway: links, sessions, durable store, MQTT forwarder, metrics "
                                      "and status page, as configured in one TOML file (see "
                                      "gateway/gateway.example.toml). Under systemd it notifies READY and pings "
                                      "the watchdog (deploy/prapa-gateway.service).")
    run.add_argument("--config", required=True, metavar="TOML", help="the gateway config file")
    run.set_defaults(func=cmd_run)
    cmd = gsub.add_parser("command", help="queue a command for a board (held until the board answers)",
                          description="Queue a command for a board. The gateway sends it when the board is "
                                      "heard, resends it unanswered up to 5 times, and records the board's answer; "
                                      "a command the board refuses is reported, not retried.")
    cmd.add_argument("--config", required=True, metavar="TOML")
    cmd.add_argument("--device", required=True, type=lambda v: int(v, 0), help="device id (decimal or 0x...)")
    cmd.add_argument("name", choices=("ping", "reboot"), help="the command")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=cmd_command)
    push = gsub.add_parser("push-config", help="queue a new role config for a board",
                           description="Queue a config push; the board validates it against its own schema and "
                                       "limits, stores it atomically and reboots into it, or refuses it with the "
                                       "field and the fix.")
    push.add_argument("--config", required=True, metavar="TOML")
    push.add_argument("--device", required=True, type=lambda v: int(v, 0))
    push.add_argument("--file", required=True, metavar="JSON", help="the board config (as on the board's /config.json)")
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
    import asyncio

    from gateway import config
    from gateway.service import Service
    cfg = config.load(args.config)
    _setup_logging(cfg.gateway.log_level)
    return asyncio.run(Service(cfg).run())


def _queue(args, msg_type, body):
    from gateway import config
    from gateway.store import Store
    cfg = config.load(args.config)
    if not cfg.store_path.exists():
        raise UsageError("--config", f"no store at {cfg.store_path}", "start the gateway once (prapa gateway run)")
    store = Store(cfg.store_path)
    try:
        qid = store.queue_downlink(args.device, msg_type, json.dumps(body))
    finally:
        store.close()
    print(json.dumps({"queued": qid, "device": args.device}) if args.json else
          f"queued request {qid} for device {args.device:#x}; the gateway sends it when the board is heard")
    return 0


def cmd_command(args):
    from protocol import messages as M
    return _queue(args, M.COMMAND, {"name": args.name, "args": {}})


def cmd_push(args):
    from protocol import messages as M
    try:
        with open(args.file) as f:
            body = json.load(f)
    except OSError as e:
        raise UsageError("--file", str(e), "give the path of a board config JSON file")
    except ValueError as e:
        raise UsageError("--file", f"not JSON: {e}", "fix the file (it is what the board keeps as /config.json)")
    if not isinstance(body, dict) or "device_id" not in body or body["device_id"] != args.device:
        raise UsageError("--file", "device_id missing or not the --device given",
                         f'set "device_id": {args.device} in the file')
    return _queue(args, M.CONFIG_PUSH, body)
