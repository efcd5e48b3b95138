"""tools/rigs/secrets_scan.py: every encoding of a planted key is found, with its source, encoding and
offset and never the key; a clean tree has no hit; and a real `prapa site` leaks no key into its logs,
report, stdout, gateway data, broker files, MQTT payloads or HTTP pages.

Keys at rest (which files may hold a key, and their modes) are tests/tools/test_secrets_at_rest.py's;
its files_holding (raw and hex only) cross-checks the scanner's idea of where the keys belong."""

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from gateway.registry import Registry
from tests.tools.test_secrets_at_rest import ROOT, files_holding
from tools.rigs import secrets_scan
from tools.rigs.secrets_scan import Hit, keys_from_registry, scan

# A key whose base64 has '+' and '/' (fb ff bf is "+/+/") at each byte alignment, so its URL-safe forms,
# whole or inside a longer text, differ from the standard ones.
PLUS_SLASH = b"\xfb\xff\xbf"
KEY = PLUS_SLASH + b"\x30\x31" + PLUS_SLASH + bytes(range(0x32, 0x37)) + PLUS_SLASH
OTHER = bytes(range(0x10, 0x20))
assert base64.b64encode(KEY) != base64.urlsafe_b64encode(KEY)


def every_text_form(key):
    """Every way the key may be written down, with the encoding the scanner must name."""
    b64, url = base64.b64encode(key), base64.urlsafe_b64encode(key)
    return {"hex": key.hex().encode(), "HEX": key.hex().upper().encode(),
            "hex-mixed": key.hex()[:16].encode() + key.hex()[16:].upper().encode(),
            "base64": b64, "base64-nopad": b64.rstrip(b"="), "base64url": url, "base64url-nopad": url.rstrip(b"="),
            "py-repr": repr(key)[2:-1].encode(), "int-list": json.dumps(list(key)).encode()[1:-1]}


# -- each encoding, in files and byte strings ----------------------------------------------------------
@pytest.mark.parametrize("encoding", sorted(every_text_form(KEY)))
def test_each_text_encoding_is_found_in_a_nested_file_with_its_offset(tmp_path, encoding):
    text = every_text_form(KEY)[encoding]
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    prefix = b'{"event": "x", "note": "'
    (folder / "log.jsonl").write_bytes(b"noise\n" * 3 + prefix + text + b'"}\n')
    (tmp_path / "clean.txt").write_bytes(OTHER.hex().encode())
    hits = scan([tmp_path], {"0000abcd": KEY})
    assert hits == [Hit(str(folder / "log.jsonl"), encoding, 18 + len(prefix), "0000abcd")]


def test_raw_bytes_are_found_in_a_binary_file_and_in_given_byte_strings(tmp_path):
    (tmp_path / "flash.img").write_bytes(b"\xff" * 4097 + KEY + b"\x00" * 100)
    hits = scan([tmp_path / "flash.img", b"\x00\x01" + KEY, ("mqtt prapa/v1/s/00000001/reading", b"\xa2" + KEY),
                 ("stdout", "nothing here")], [OTHER, KEY])
    assert hits == [Hit(str(tmp_path / "flash.img"), "raw", 4097, "1"), Hit("<bytes #1>", "raw", 2, "1"),
                    Hit("mqtt prapa/v1/s/00000001/reading", "raw", 1, "1")]


@pytest.mark.parametrize("lead", [0, 1, 2])
@pytest.mark.parametrize("alphabet", ["base64", "base64url"])
def test_a_key_inside_a_longer_base64_text_is_found_at_every_alignment(alphabet, lead):
    enc = base64.b64encode if alphabet == "base64" else base64.urlsafe_b64encode
    blob = enc(b"\x01" * lead + KEY + b"\xff" * 7)     # fixed neighbours: no padded form can match by chance
    hits = scan([("export.b64", b"data: " + blob)], [KEY])
    assert [(h.source, h.encoding, h.key) for h in hits] == [("export.b64", alphabet + "-inside", "0")]
    assert 6 <= hits[0].offset <= 6 + 4


def test_a_key_in_a_sqlite_file_is_found_in_its_pages_and_in_its_cells(tmp_path):
    """As a BLOB (the registry's form) and as hex text in a value so long that SQLite splits it over
    overflow pages (so only the row by row read finds it whole); the database still in WAL mode."""
    path = tmp_path / "some.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, k BLOB, note TEXT)")
    db.execute("INSERT INTO things VALUES (7, ?, ?)", (KEY, "x" * 4090 + KEY.hex() + "y" * 5000))
    db.commit()
    hits = scan([tmp_path], [KEY])
    cells = {(h.source, h.encoding, h.offset) for h in hits if "#" in h.source}
    assert cells == {(f"{path}#things.k[7]", "raw", 0), (f"{path}#things.note[7]", "hex", 4090)}
    assert any(h.source in (str(path), f"{path}-wal") and h.encoding == "raw" for h in hits)
    db.close()


def test_the_registry_as_the_gateway_writes_it_holds_its_keys_and_they_read_back(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    reg.add(0x2001, "meter", KEY)
    reg.add(0x2002, "meter", OTHER)
    keys = keys_from_registry(tmp_path / "registry.db")       # the live registry (WAL) read from a copy
    assert keys == {"00002001": KEY, "00002002": OTHER}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.db", "registry.db-shm", "registry.db-wal"]
    hits = scan([tmp_path], keys)
    assert {h.key for h in hits if h.source.endswith("#devices.key[8193]")} == {"00002001"}
    assert {h.key for h in hits if h.encoding == "raw" and "#" not in h.source} == {"00002001", "00002002"}
    reg.close()


def test_a_key_across_a_chunk_boundary_is_found_once(tmp_path, monkeypatch):
    monkeypatch.setattr(secrets_scan, "CHUNK", 64)
    text = b"." * 50 + base64.b64encode(KEY) + b"." * 50 + KEY.hex().encode() + b"." * 200
    (tmp_path / "big.log").write_bytes(text)
    assert [(h.encoding, h.offset) for h in scan([tmp_path / "big.log"], [KEY])] == [("base64", 50), ("hex", 124)]


def test_a_clean_tree_has_no_hit(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "random.bin").write_bytes(os.urandom(1 << 16))
    (tmp_path / "sub" / "log.txt").write_text("\n".join(f"{os.urandom(16).hex()} {base64.b64encode(os.urandom(16))}"
                                                        for _ in range(500)))
    db = sqlite3.connect(tmp_path / "sub" / "store.db")
    db.execute("CREATE TABLE t (v BLOB)")
    db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(64),) for _ in range(200)])
    db.commit()
    db.close()
    os.symlink("/etc", tmp_path / "link")                      # not followed
    assert scan([tmp_path, b"", ("stdout", "")], {"a": KEY, "b": OTHER}) == []


def test_a_hit_never_carries_the_key_and_a_bad_key_is_refused(tmp_path):
    hits = scan([("log", b"".join(every_text_form(KEY).values()) + KEY)], [KEY])
    assert len(hits) == len(every_text_form(KEY)) + 1
    shown = "\n".join([*map(str, hits), *map(repr, hits)]).encode()
    assert scan([("hits", shown)], [KEY]) == []                # the scanner finds nothing of the key in them
    with pytest.raises(ValueError, match="16 bytes"):
        scan([b""], [b"short"])
    with pytest.raises(FileNotFoundError):
        scan([tmp_path / "missing"], [KEY])


def test_the_command_line_reports_hits_without_the_key_and_exits_1(tmp_path, capsys):
    reg = Registry(tmp_path / "registry.db")
    reg.add(0x2001, "meter", KEY)
    reg.close()
    (tmp_path / "gateway.log").write_text(f"oops key={KEY.hex()}\n")
    code = secrets_scan.main(["--registry", str(tmp_path / "registry.db"), str(tmp_path),
                              "--allow", str(tmp_path / "registry.db")])
    out = capsys.readouterr().out
    assert code == 1 and f"{tmp_path / 'gateway.log'}: key 00002001 as hex at offset 9" in out, out
    assert scan([("out", out)], [KEY]) == []


# -- a real site: nothing it says, stores, publishes or serves holds a key ------------------------------
class Watcher:
    """Follows the site's stdout (JSON events): subscribes to everything on its broker as soon as it has
    started, and fetches the gateway's status page, /api/status.json and /metrics while the site runs."""

    def __init__(self, proc):
        self.proc, self.lines, self.messages, self.pages = proc, [], [], {}
        self.client = None
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "broker_started":
                self._subscribe(event["host"], event["port"])
            elif event.get("event") == "gateway_started":
                threading.Thread(target=self._fetch, args=(event["status_page"],), daemon=True).start()

    def _subscribe(self, host, port):
        import paho.mqtt.client as mqtt
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="secrets-scan", protocol=mqtt.MQTTv5)
        c.on_connect = lambda client, *_a: client.subscribe("#", qos=1)
        c.on_message = lambda _c, _u, msg: self.messages.append(
            (msg.topic, msg.payload, str(msg.properties) if msg.properties else ""))   # user properties too
        c.connect(host, port)
        c.loop_start()
        self.client = c

    def _fetch(self, url):
        while self.proc.poll() is None:
            for path in ("", "api/status.json", "metrics"):
                try:
                    with urllib.request.urlopen(url + path, timeout=2) as r:
                        self.pages[path or "/"] = r.read()
                except OSError:
                    pass
            time.sleep(1.5)

    def close(self):
        self.thread.join(10)
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One board of each role for 10 s in a kept workdir; what it said, stored, published and served."""
    base = tmp_path_factory.mktemp("scan-site")
    workdir, report = base / "work", base / "r.json"
    with open(base / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "site", "--boards", "3", "--headless",
                                 "--duration", "10", "--report", str(report), "--workdir", str(workdir)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
        watcher = Watcher(proc)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            watcher.close()
    err = (base / "stderr.txt").read_text()
    assert proc.returncode == 0, err
    return {"workdir": workdir, "report": report, "stdout": "".join(watcher.lines), "stderr": err,
            "messages": watcher.messages, "pages": watcher.pages,
            "keys": keys_from_registry(workdir / "data" / "registry.db")}


def test_a_site_run_leaks_no_key_anywhere_but_where_keys_belong(site):
    workdir, keys = site["workdir"], site["keys"]
    assert len(keys) == 3 and len(set(keys.values())) == 3
    assert site["messages"] and {"/", "api/status.json", "metrics"} <= set(site["pages"])
    assert (workdir / "gateway.log").is_file() and (workdir / "broker" / "mosquitto.db").is_file()
    sources = [workdir, site["report"], ("site stdout", site["stdout"]), ("site stderr", site["stderr"]),
               *((f"mqtt {topic} #{i}", payload + props.encode())
                 for i, (topic, payload, props) in enumerate(site["messages"])),
               *((f"http {path}", body) for path, body in site["pages"].items())]
    hits = scan(sources, keys)
    registry = {str(workdir / "data" / ("registry.db" + s)) for s in ("", "-wal", "-shm")}

    def belongs(h):            # the gateway's registry and each board's flash image hold its key
        path = h.source.split("#")[0]
        return path in registry or path.endswith(".img")

    assert [str(h) for h in hits if not belongs(h)] == []
    for name, key in keys.items():        # the scan saw each key where it is, in the SQLite file and an image
        holders = {h.source.split("#")[0] for h in hits if h.key == name}
        assert holders == {str(p) for p in files_holding(workdir, key)}, name
        assert str(workdir / "data" / "registry.db") in holders and sum(p.endswith(".img") for p in holders) == 1
        assert any(h.key == name and h.source.endswith("#devices.key[%d]" % int(name, 16)) for h in hits)
