"""prapa gateway devices: move commissioned devices between a laptop and the gateway's registry.

An installer without the gateway at hand commissions with `--export FILE`;
`import` loads that file here, all records or none. `list` and `export` are
for the operator; no listing ever shows a key (only export files carry keys,
written mode 0600, and they should be deleted once imported). `place` sets
where a device is (--location LAT,LON, --catchment NAME), for the ranking of
suspect drains per catchment and its map; the running gateway picks it up.

Exit codes: 0 ok, 1 failure, 2 bad input (a file or record refused: the
message names the field and the fix, the registry is unchanged).
"""

import json
import sqlite3
import time
from pathlib import Path

from protocol.errors import UsageError
from tools import args as types


def add_devices_parser(gateway_subparsers):
    """Registered by `prapa gateway` (tools/gateway_cli.py) under its subcommands."""
    d = gateway_subparsers.add_parser("devices", help="the device registry: import, list, export",
                                      description=__doc__.split("\n\n")[0])
    dsub = d.add_subparsers(dest="devices_command", metavar="SUBCOMMAND", parser_class=type(d))
    dsub.required = True
    imp = dsub.add_parser("import", help="load an export file (from prapa commission --export)",
                          description="Add every device of an export file to the registry, or none if one "
                                      "record is refused. Creates the registry if its folder exists and it does not.")
    imp.add_argument("file", metavar="FILE", type=types.existing_file)
    imp.add_argument("--registry", required=True, metavar="PATH", type=types.file_to_write,
                     help="the gateway's registry.db")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_import)
    lst = dsub.add_parser("list", help="devices in the registry (never their keys)",
                          description="List the registry's devices: id, role, state, board, firmware, last seen.")
    lst.add_argument("--registry", required=True, metavar="PATH", type=types.existing_file)
    lst.add_argument("--json", action="store_true", help="one JSON object per device")
    lst.set_defaults(func=cmd_list)
    exp = dsub.add_parser("export", help="write devices with their keys to a 0600 file for another gateway",
                          description="Write devices, keys included, to a new file (mode 0600). Retire them here "
                                      "once the other gateway serves them.")
    exp.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", type=types.device_id)
    exp.add_argument("--registry", required=True, metavar="PATH", type=types.existing_file)
    exp.add_argument("--out", required=True, metavar="FILE", type=types.new_file, help="a new file (never overwritten)")
    exp.set_defaults(func=cmd_export)
    pl = dsub.add_parser("place", help="set where a device is: its location and catchment",
                         description="Set a device's location (WGS84 degrees) and/or catchment; a part not given "
                                     "stays as it is, --clear removes both. The gateway ranks suspect drains per "
                                     "catchment and draws them on its status page at their location; it reads "
                                     "the change while it runs.")
    pl.add_argument("device_id", metavar="DEVICE_ID", type=types.device_id)
    pl.add_argument("--registry", required=True, metavar="PATH", type=types.existing_file)
    add_place_arguments(pl)
    pl.add_argument("--clear", action="store_true", help="remove the device's location and catchment")
    pl.add_argument("--json", action="store_true", help="the device's record (never its key) as JSON")
    pl.set_defaults(func=cmd_place)


def location(text):
    """--location LAT,LON: decimal degrees (WGS84), latitude -90..90 first, longitude -180..180."""
    from gateway.registry import parse_location
    return parse_location(text, where=types.WHERE)


def catchment(text):
    """--catchment NAME: 1 to 32 letters, digits, '_', '-', '.', starting with a letter or digit."""
    from gateway.registry import parse_catchment
    return parse_catchment(text, where=types.WHERE)


def add_place_arguments(parser):
    """--location and --catchment, as `place` and `prapa commission` take them."""
    parser.add_argument("--location", metavar="LAT,LON", type=location,
                        help="where the device is: latitude,longitude in decimal degrees, WGS84 "
                             "(e.g. 13.7563,100.5018; south of the equator: --location=-33.87,151.21)")
    parser.add_argument("--catchment", metavar="NAME", type=catchment,
                        help="the catchment it serves: 1 to 32 letters, digits, '_', '-' or '.' (e.g. khlong-toei-3)")


def _open(path, create=False):
    from gateway.registry import Registry
    p = Path(path)
    if not p.is_file() and not (create and p.parent.is_dir()):
        raise UsageError("--registry", f"no registry at {path}",
                         "give the gateway's registry.db (data_dir in gateway.toml)" +
                         ("" if not create else ", in an existing folder"))
    return Registry(p)


def cmd_import(args):
    from gateway.registry import read_export
    read_export(Path(args.file))             # every record checked before the registry is opened or made
    created = not Path(args.registry).exists()
    reg = _open(args.registry, create=True)
    try:
        ids = reg.import_file(args.file)
    except BaseException as e:
        reg.close()
        if created:                     # a refused file leaves no empty registry behind
            for suffix in ("", "-wal", "-shm"):
                Path(args.registry + suffix).unlink(missing_ok=True)
        if isinstance(e, (OSError, sqlite3.Error)):      # a full disk: the import is all or nothing
            raise UsageError("--registry", f"{args.registry}: {e}", "free space on its disk, then import again") \
                from None
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
                  f"seen {seen}  {_place(d)}  {d.name or ''}".rstrip())
    if not devices and not args.json:
        print(f"no devices in {args.registry}")
    return 0


def _place(d):
    where = f"{d.lat:.6f},{d.lon:.6f}" if d.lat is not None else "-"
    return f"{where} {d.catchment or '-'}"


def cmd_place(args):
    if args.clear and (args.location is not None or args.catchment is not None):
        raise UsageError("--clear", "given with --location or --catchment", "give --clear alone, or the parts to set")
    if not args.clear and args.location is None and args.catchment is None:
        raise UsageError("prapa gateway devices place", "nothing to set",
                         "give --location LAT,LON and/or --catchment NAME (or --clear)")
    parts = {"location": None, "catchment": None} if args.clear else {
        k: v for k, v in (("location", args.location), ("catchment", args.catchment)) if v is not None}
    reg = _open(args.registry)
    try:
        device = reg.set_place(args.device_id, **parts)
    except sqlite3.Error as e:              # a full or read-only disk: nothing was changed
        raise UsageError("--registry", f"{args.registry}: {e}", "free space on its disk or check its permissions, "
                         "then run it again") from None
    finally:
        reg.close()
    if args.json:
        print(json.dumps(device.public()))
    else:
        print(f"device {device.device_id}: {_place(device)}")
    return 0


def cmd_export(args):
    ids = args.device_ids
    out = Path(args.out)
    if out.exists():
        raise UsageError("--out", f"{out} exists", "give a new file name; an export is never overwritten")
    if not out.parent.is_dir():
        raise UsageError("--out", f"no folder {out.parent}", "create it or give another path")
    reg = _open(args.registry)
    try:
        reg.export_devices(ids, out)
    except OSError as e:                     # a full disk: the export is whole or absent
        raise UsageError("--out", f"{out}: {e.strerror or e}", "free space or give another path") from None
    finally:
        reg.close()
    print(f"exported {len(ids)} device(s) to {out} (mode 0600; it holds their keys)")
    return 0
