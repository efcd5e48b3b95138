"""prapa: one command for the waterworks edge stack.

Exit codes (every subcommand): 0 ok, 1 failure, 2 usage or configuration error.
"""

import argparse
import json
import signal
import sys

from protocol.errors import UsageError
from tools import args as types

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SPEED_MAX = 100_000                 # board time this many times faster at most (prapa bench doser runs 2000)
EPILOG = "exit codes: 0 ok, 1 failure, 2 usage or configuration error"


class Parser(argparse.ArgumentParser):
    """prapa's parser: every refusal is the one error type (one line, exit 2), raised before a command runs.

    argparse's own refusals (an unknown option, a missing one, a bad choice) and a type's (tools/args.py)
    become UsageError naming the argument. A bare type=int or type=float is read as a whole number or a
    finite number from 0 to 2**32-1, so nothing starts with -1, NaN, infinity or 2**40; where 0 is not
    allowed either, the option says so with a type from tools/args.py (or its command checks it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", EPILOG)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(self.prog, message, f"see: {self.prog} --help")

    def _where(self, action):
        if action.option_strings:
            return max(action.option_strings, key=len)
        return f"{self.prog} {action.metavar if isinstance(action.metavar, str) else action.dest.upper()}"

    def _get_value(self, action, text):
        convert = self._registry_get("type", action.type, action.type)
        if action.type is int:
            convert = types.whole(0, types.U32_MAX)
        elif action.type is float:
            convert = types.number(0.0, types.U32_MAX)
        try:
            return convert(text)
        except UsageError as e:            # named by the argument; a file's key stays after it
            where = self._where(action)
            if e.where != types.WHERE and not e.where.startswith("-") and e.where != text:
                where = f"{where} {e.where}"
            raise UsageError(where, e.problem, e.fix) from None
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise UsageError(self._where(action), f"{text!r}: {e}", f"see: {self.prog} --help") from None

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            raise UsageError(self._where(action), f"{value!r} is not a choice",
                             "use one of: " + ", ".join(map(str, action.choices)))


def build_parser():
    parser = Parser(prog="prapa", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    board = sub.add_parser("board", help="virtual boards and board definitions",
                           description="Virtual boards (the firmware on the real MicroPython VM) and board definitions.")
    bsub = board.add_subparsers(dest="board_command", metavar="SUBCOMMAND", parser_class=Parser)
    bsub.required = True

    run = bsub.add_parser("run", help="run a virtual board until stopped",
                          description="Run the firmware on a virtual board: the MicroPython unix port with the "
                          "board's heap budget, FILE as its flash (created with the app if missing), a UART pty "
                          "for the gateway and a console pty for mpremote.\n\n"
                          "Prints one JSON object per event on stdout; the first, board_ready, names the ptys. "
                          "SIGUSR1 cuts the power and restores it; SIGTERM or Ctrl-C stops the board.")
    run.add_argument("--board", required=True, type=types.board,
                     help="board name from boards/ (see: prapa board list) or a .toml path")
    run.add_argument("--role", required=True, help="the role the board serves (protocol/roles: one of the roles the board fits)")
    run.add_argument("--flash", required=True, type=types.file_to_write, metavar="FILE",
                     help="flash image of the board's vfs partition")
    run.add_argument("--install-app", action="store_true",
                     help="copy the current firmware into an existing image (its data stays)")
    run.add_argument("--speed", type=types.whole(1, SPEED_MAX), default=1,
                     help=f"board time runs this many times faster, 1 to {SPEED_MAX} (default 1)")
    run.add_argument("--start-ticks-ms", type=types.whole(0, 2**30 - 1), default=0,
                     help="board ticks_ms at power-on; 1073740824 starts 1 s before the 2**30 wrap")
    run.add_argument("--world", action="append", default=[], type=types.world_setting, metavar="MODEL.PARAM=VALUE",
                     help="set a world-simulator parameter (see: prapa board world-params)")
    run.add_argument("--seed", type=types.whole(0, types.U32_MAX), default=0,
                     help="seed of the world's randomness (default 0)")
    run.add_argument("--control", type=types.socket_path, metavar="SOCKET",
                     help="unix socket for the bench's JSON control commands")
    run.add_argument("--unique-id", type=types.unique_id, metavar="HEX",
                     help="the board's 6-byte unique id (default: random)")
    run.add_argument("--off", action="store_true",
                     help="start with the power off: the control socket's power_on switches it on (so a "
                          "console opened first sees the first boot)")
    from tools.sim import vm as vms
    vms.add_argument(run)
    run.set_defaults(func=cmd_board_run)

    lst = bsub.add_parser("list", help="list board definitions", description="List the board definitions in boards/.")
    lst.add_argument("--json", action="store_true", help="one JSON object per board")
    lst.set_defaults(func=cmd_board_list)

    wp = bsub.add_parser("world-params", help="list the world simulator's parameters",
                         description="List every world-simulator model and its parameters, defaults and units.")
    wp.add_argument("--role", help="only the models wired to this role")
    wp.set_defaults(func=cmd_world_params)

    from tools import bench, gateway_cli, site
    site.add_parser(sub)
    bench.add_parser(sub)
    gateway_cli.add_parser(sub)
    from tools import commission, monitor
    commission.add_parser(sub)
    monitor.add_parser(sub)
    from tools import campaign, ledger
    ledger.add_parser(sub)
    campaign.add_parser(sub)
    from tools import build, flash
    build.add_parser(sub)
    flash.add_parser(sub)
    return parser


def cmd_board_list(args):
    from tools import boards
    for name in boards.available():
        b = boards.load(name)
        if args.json:
            print(json.dumps({"name": b.name, "chip": b.chip, "heap_budget_bytes": b.heap_budget_bytes,
                              "vfs_size_bytes": b.vfs_size_bytes, "roles": list(b.roles_fit)}))
        else:
            print(f"{b.name:24} {b.chip:8} heap {b.heap_budget_bytes // 1024} KiB  vfs {b.vfs_size_bytes // 1024} KiB"
                  f"  roles {', '.join(b.roles_fit)}  ({b.description})")
    return EXIT_OK


def cmd_world_params(args):
    from tools.sim import worlds as world
    models = world.models_for(args.role) if args.role else list(world.MODELS.values())
    for m in models:
        print(f"{m.NAME} (roles: {', '.join(m.ROLES)})")
        for name, (default, unit, doc) in m.PARAMS.items():
            print(f"  {m.NAME}.{name} = {default:g} {unit:8} {doc}")
    return EXIT_OK


def cmd_board_run(args):
    from tools import boards
    from tools.sim import worlds as world
    from tools.sim.board import SimBoard, prepare_flash
    from tools.sim import vm as vms

    board = boards.load(args.board)
    board.check_role(args.role)
    overrides = world.parse_overrides(args.world)
    vms.micropython_exe(args.vm)        # an unknown or unbuilt VM is refused before the flash is made
    try:
        created = prepare_flash(board, args.role, args.flash, args.install_app)
    except OSError as exc:                   # a full disk, a folder made read-only meanwhile
        raise UsageError("--flash", f"{args.flash}: {exc.strerror or exc}", "free space or give another path") from None
    bench = SimBoard(board, args.role, args.flash, speed=args.speed, start_ticks_ms=args.start_ticks_ms,
                  world_overrides=overrides, seed=args.seed, control_path=args.control, unique_id=args.unique_id,
                  vm=args.vm, powered=not args.off)
    if created:
        bench.log("flash_created", flash=bench.flash_path, bytes=board.vfs_size_bytes)

    def stop(_sig, _frame):
        bench.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda _s, _f: bench.power_cut())
    print(f"virtual board {board.name} ({args.role}): UART {bench.uart_path}, console {bench.console_path} "
          f"(try: mpremote connect {bench.console_path} repl)", file=sys.stderr)
    bench.run()
    return EXIT_OK


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as exc:          # BoardError too: its exit_code is 1 (a failure, not bad input)
        print("prapa: error: " + str(exc).replace("\r", " ").replace("\n", " "), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
