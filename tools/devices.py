"""prapa gateway devices: move commissioned devices between a laptop and the gateway's registry.

An installer without the gateway at hand commissions with `--export FILE`;
`import` loads that file here, all records or none. `list` and `export` are
for the operator; no listing ever shows a key (only export files carry keys,
written mode 0600, and they should be deleted once imported).

Exit codes: 0 ok, 1 failure, 2 bad input (a file or record refused: the
message names the field and the fix, the registry is unchanged).
"""

import json
import time
from pathlib import Path

from protocol.errors import UsageError


def add_devices_parser(gateway_subparsers):
    """Registered by `prapa gateway` (tools/gateway_cli.py) under its subcommands."""
    d = gateway_subparsers.add_parser("devices", help="the device registry: import, list, export",
                                      description=__doc__.split("\n\n")[0])
    dsub = d.add_subparsers(dest="devices_command", metavar="SUBCOMMAND", parser_class=type(d))
    dsub.required = True
    imp = dsub.add_parser("import", help="load an export file (from prapa commission --export)",
                          description="Add every device of an export file to the registry, or none if one "
                                      "record is refused. Creates the registry if its folder exists and it does not.")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--registry", required=True, metavar="PATH", help="the gateway's registry.db")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_import)
    lst = dsub.add_parser("list", help="devices in the registry (never their keys)",
                          description="List the registry's devices: id, role, state, board, firmware, last seen.")
    lst.add_argument("--registry", required=True, metavar="PATH")
    lst.add_argument("--json", action="store_true", help="one JSON object per device")
    lst.set_defaults(func=cmd_list)
    exp = dsub.add_parser("export", help="write devices with their keys to a 0600 file for another gateway",
                          description="Write devices, keys included, to a new file (mode 0600). Retire them here "
                                      "once the other gateway serves them.")
    exp.add_argument("device_ids", nargs="+", metavar="DEVICE_ID")
    exp.add_argument("--registry", required=True, metavar="PATH")
    exp.add_argument("--out", required=True, metavar="FILE", help="a new file (never overwritten)")
    exp.set_defaults(func=cmd_export)


def _open(path, create=False):
    from gateway.registry import Registry
    p = Path(path)
    if not p.is_file() and not (create and p.parent.is_dir()):
        raise UsageError("--registry", f"no registry at {path}",
                         "give the gateway's registry.db (data_dir in gateway.toml)" +
                         ("" if not create else ", in an existing folder"))
    return Registry(p)


def cmd_import(args):
    if not Path(args.file).is_file():
        raise UsageError("FILE", f"{args.file}: no such file", "give the export file written by prapa commission")
    created = not Path(args.registry).exists()
    reg = _open(args.registry, create=True)
    try:
        ids = reg.import_file(args.file)
    except BaseException:
        reg.close()
        if created:                     # a refused file leaves no empty registry behind
            for suffix in ("", "-wal", "-shm"):
                Path(args.registry + suffix).unlink(missing_ok=True)
        raise
    reg.close()
    if args.json:
        print(json.dumps({"imported": ids, "registry": args.registry}))
    else:
        print(f"imported {len(ids)} device(s) into {args.registry}: {', '.join(str(i) for i in ids)}; "
              f"delete {args.file} now (it holds their keys)")
    return 0


def cmd_list(args):
    reg = _open(args.registry)
    try:
        devices = reg.list()
    finally:
        reg.close()
    for d in devices:
        if args.json:
            print(json.dumps(d.public()))
        else:
            seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.last_seen)) if d.last_seen else "never"
            print(f"{d.device_id:>10}  {d.role:6} {d.state:12} {d.board or '-':16} {d.firmware or '-':8} "
                  f"seen {seen}  {d.name or ''}".rstrip())
    if not devices and not args.json:
        print(f"no devices in {args.registry}")
    return 0


def cmd_export(args):
    from tools.role_config import parse_device_id
    ids = [parse_device_id(i) for i in args.device_ids]
    out = Path(args.out)
    if out.exists():
        raise UsageError("--out", f"{out} exists", "give a new file name; an export is never overwritten")
    if not out.parent.is_dir():
        raise UsageError("--out", f"no folder {out.parent}", "create it or give another path")
    reg = _open(args.registry)
    try:
        reg.export_devices(ids, out)
    finally:
        reg.close()
    print(f"exported {len(ids)} device(s) to {out} (mode 0600; it holds their keys)")
    return 0
