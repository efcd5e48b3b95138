"""gateway/config.py refuses a bad config with one line naming the file, the key, the value and the fix."""

import os
import re
from pathlib import Path

import time

import pytest

from gateway.config import Broker, ConfigError, SerialLink, UdpLink, load

EXAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.example.toml"

MINIMAL = """
[gateway]
site = "town-1"
data_dir = "data"

[[links]]
type = "serial"
port = "/dev/ttyUSB0"

[[brokers]]
url = "mqtt://127.0.0.1:1883"
"""


def write(tmp_path, text, name="gateway.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "gateway.toml") + ": ")
    return message


def test_the_shipped_example_validates():
    config = load(EXAMPLE)
    assert config.gateway.site == "nakhon-pathom-north"
    assert [link.type for link in config.links] == ["serial", "serial", "udp"]
    assert config.forward.qos == 1 and config.time.utc_offset_minutes == 420


def test_a_minimal_config_gets_the_documented_defaults(tmp_path):
    config = load(write(tmp_path, MINIMAL))
    assert config.gateway.data_dir == tmp_path / "data"
    assert config.gateway.log_level == "INFO"
    assert config.links == (SerialLink("/dev/ttyUSB0", 115200, False),)
    assert config.store.retention_days == 30 and config.store.min_free_mb == 200 and config.store.group_commit_ms == 20
    assert config.brokers[0].host == "127.0.0.1" and config.brokers[0].port == 1883 and not config.brokers[0].tls
    assert config.brokers[0].client_id == "prapa-town-1"
    assert (config.forward.format, config.forward.protocol) == ("cbor", "auto")
    assert config.time.utc_offset_minutes == 420
    assert (config.time.simulate_speed, config.time.simulate_from) == (1, None)     # the host's own clock
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9466)
    assert config.registry_path == tmp_path / "data" / "registry.db"


LINK = 'port = "/dev/ttyUSB0"'
URL = 'url = "mqtt://127.0.0.1:1883"'


# An edit is a text appended after the last table (the broker), or an (old, new) replacement.
@pytest.mark.parametrize("edit, key, value, fix", [
    ((LINK, LINK + "\nbaudrate = 9601"), "links[0].baudrate", "9601", "115200"),
    ((LINK, LINK + '\nbaudrate = "115200"'), "links[0].baudrate", "'115200'", "without quotes"),
    ((LINK, LINK + '\nrs485 = "yes"'), "links[0].rs485", "'yes'", "rs485 = true"),
    ((LINK, LINK + "\nbaudrat = 9600"), "links[0].baudrat", None, "did you mean 'baudrate'"),
    (('type = "serial"', 'type = "tcp"'), "links[0].type", "'tcp'", "'serial', 'udp'"),
    (('site = "town-1"', 'site = "Town 1"'), "gateway.site", "'Town 1'", "a-z, 0-9"),
    (('site = "town-1"', f'site = "{"a" * 33}"'), "gateway.site", repr("a" * 33), "1 to 32"),
    (('data_dir = "data"', 'data_dir = "data"\nlog_level = "loud"'), "gateway.log_level", "'loud'", "debug, info"),
    (('data_dir = "data"', 'datadir = "data"'), "gateway.datadir", None, "did you mean 'data_dir'"),
    ((URL, 'url = "http://127.0.0.1:1883"'), "brokers[0].url", "'http://127.0.0.1:1883'", "mqtts://host:8883"),
    ((URL, 'url = "mqtt://127.0.0.1:99999"'), "brokers[0].url", None, "mqtts://host:8883"),
    ('client_id = "a b"', "brokers[0].client_id", "'a b'", "1 to 23"),
    ('username = "u"\npassword_file = "nope"', "brokers[0].password_file", "'nope'", "existing file"),
    ("[store]\nretention_days = 0", "store.retention_days", "0", "1 to 3650"),
    ("[store]\nmin_free_mb = true", "store.min_free_mb", "True", "whole number"),
    ("[forward]\nqos = 0", "forward.qos", "0", "qos = 1"),
    ('[forward]\nformat = "xml"', "forward.format", "'xml'", "'cbor', 'json'"),
    ("[forward]\nprotocol = 5", "forward.protocol", "5", "'3.1.1'"),
    ("[forward]\nfailback_s = -1", "forward.failback_s", "-1", "0 to 86400 s"),
    ('[forward]\nfailback_s = "60"', "forward.failback_s", "'60'", "without quotes"),
    ("[time]\nutc_offset_minutes = 900", "time.utc_offset_minutes", "900", "420"),
    ("[time]\nsimulate_speed = 0", "time.simulate_speed", "0", "1 in the field"),
    ('[time]\nsimulate_from = "2027-02-01"', "time.simulate_from", "'2027-02-01'", "2027-01-31T16:30:00Z"),
    ("[time]\nsimulate_from = 2027-02-01T00:00:00", "time.simulate_from", None, "its UTC offset"),
    ("[time]\nsimulate_since = 5", "time.simulate_since", "5", "simulate_since = 2027-01-31T16:30:00Z"),
    ('[http]\nlisten = "9466"', "http.listen", "'9466'", "127.0.0.1:9466"),
    ('[htpp]\nlisten = "127.0.0.1:1"', "htpp", None, "did you mean 'http'"),
])
def test_each_bad_value_is_refused_naming_its_key_value_and_fix(tmp_path, edit, key, value, fix):
    if isinstance(edit, tuple):
        assert edit[0] in MINIMAL
        text = MINIMAL.replace(*edit, 1)
    else:
        text = MINIMAL + edit + "\n"
    message = refused(tmp_path, text)
    assert f": {key}" in message
    if value is not None:
        assert f"{key} = {value}:" in message
    assert fix in message


def test_second_link_is_named_by_its_index(tmp_path):
    text = MINIMAL + '[[links]]\ntype = "udp"\nbind = "0.0.0.0:5683"\n[[links]]\ntype = "serial"\nport = "/dev/ttyS1"\n'
    text += "baudrate = 7\n"
    message = refused(tmp_path, text)
    assert "links[2].baudrate = 7:" in message


def test_udp_links_take_ipv4_and_ipv6_binds(tmp_path):
    text = MINIMAL + '\n[[links]]\ntype = "udp"\nbind = "0.0.0.0:5683"\n[[links]]\ntype = "udp"\nbind = "[::1]:5684"\n'
    assert load(write(tmp_path, text)).links[1:] == (UdpLink("0.0.0.0", 5683), UdpLink("::1", 5684))


@pytest.mark.parametrize("cut, missing", [
    ('[gateway]\nsite = "town-1"\ndata_dir = "data"\n', "gateway"),
    ('[[links]]\ntype = "serial"\nport = "/dev/ttyUSB0"\n', "links"),
    ('[[brokers]]\nurl = "mqtt://127.0.0.1:1883"\n', "brokers"),
    ('site = "town-1"\n', "gateway.site"),
])
def test_a_missing_section_or_key_is_named(tmp_path, cut, missing):
    assert cut in MINIMAL
    message = refused(tmp_path, MINIMAL.replace(cut, ""))
    assert f": {missing}: missing;" in message


def test_the_same_serial_port_twice_is_refused(tmp_path):
    message = refused(tmp_path, MINIMAL + '[[links]]\ntype = "serial"\nport = "/dev/ttyUSB0"\n')
    assert "links[1]: repeats links[0]" in message


def test_an_inline_password_is_refused_without_echoing_it(tmp_path):
    message = refused(tmp_path, MINIMAL + 'username = "u"\npassword = "hunter2-secret"\n')
    assert "brokers[0].password" in message and "password_file" in message and "chmod 600" in message
    assert "hunter2" not in message


def test_credentials_in_the_url_are_refused_without_echoing_them(tmp_path):
    message = refused(tmp_path, MINIMAL.replace("mqtt://127.0.0.1", "mqtt://u:hunter2@127.0.0.1"))
    assert "brokers[0].url" in message and "password_file" in message and "hunter2" not in message


def tls_files(tmp_path, key_mode):
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("-----BEGIN TEST-----\n")
    os.chmod(tmp_path / "client.key", key_mode)
    return MINIMAL.replace('url = "mqtt://127.0.0.1:1883"', 'url = "mqtts://127.0.0.1"\nca_file = "ca.pem"\n'
                           'cert_file = "client.pem"\nkey_file = "client.key"')


def test_a_world_readable_key_file_is_refused_with_the_chmod_fix(tmp_path):
    message = refused(tmp_path, tls_files(tmp_path, 0o644))
    assert "brokers[0].key_file = 'client.key'" in message and "mode 0644" in message
    assert f"chmod 600 {tmp_path / 'client.key'}" in message


def test_tls_files_resolve_from_the_config_folder(tmp_path):
    broker = load(write(tmp_path, tls_files(tmp_path, 0o600))).brokers[0]
    assert broker == Broker("mqtts://127.0.0.1", True, "127.0.0.1", 8883, tmp_path / "ca.pem", tmp_path / "client.pem",
                            tmp_path / "client.key", None, None, "prapa-town-1")


def test_tls_files_on_a_plain_url_and_half_a_client_certificate_are_refused(tmp_path):
    text = tls_files(tmp_path, 0o600)
    assert "url is not mqtts://" in refused(tmp_path, text.replace("mqtts://", "mqtt://"))
    message = refused(tmp_path, text.replace('key_file = "client.key"', ""))
    assert "brokers[0].key_file: missing" in message and "set key_file too" in message


def test_a_password_file_is_read_only_when_asked_and_must_be_private(tmp_path):
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    text = MINIMAL + 'username = "gw"\npassword_file = "mqtt.password"\n'
    broker = load(write(tmp_path, text)).brokers[0]
    assert "s3cret" not in repr(broker) and broker.password() == "s3cret"
    os.chmod(secret, 0o604)
    assert "brokers[0].password_file" in refused(tmp_path, text)
    os.chmod(secret, 0o600)
    assert "brokers[0].username: missing" in refused(tmp_path, text.replace('username = "gw"\n', ""))


def test_broken_toml_names_the_line(tmp_path):
    message = refused(tmp_path, MINIMAL + "[store\n")
    assert re.search(r"not valid TOML .*line \d+", message)


def test_a_missing_file_says_where_the_example_is(tmp_path):
    with pytest.raises(ConfigError, match="gateway.example.toml"):
        load(tmp_path / "absent.toml")


def test_the_config_objects_are_immutable(tmp_path):
    config = load(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        config.store.retention_days = 1
    assert isinstance(config.links, tuple) and isinstance(config.brokers, tuple)


def test_a_simulated_sites_wall_clock_starts_where_asked_and_runs_at_its_speed(tmp_path):
    from gateway.service import wall_clock
    config = load(write(tmp_path, MINIMAL + "[time]\nsimulate_speed = 20000\nsimulate_from = 2027-01-31T23:30:00+07:00\n"))
    assert config.time.simulate_from == 1801413000.0        # 2027-01-31T16:30:00Z
    clock = wall_clock(config.time)
    t0 = time.monotonic()
    first = clock()
    time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert 1801413000.0 <= first < 1801413000.0 + 20000 * elapsed
    assert clock() - first >= 20000 * 0.05 * 0.9       # 50 ms of the host's is 1,000 s of the site's
    assert wall_clock(load(write(tmp_path, MINIMAL)).time) is time.time


def test_a_restarted_gateway_goes_on_with_the_simulated_sites_calendar(tmp_path):
    """simulate_since pins the simulated clock to a real instant: a gateway started later (a restart in a
    campaign) reads the same calendar as one that ran all along, not the site's start again."""
    from gateway.service import wall_clock
    real_start = time.time() - 10.0                       # the site wrote its config 10 s ago
    text = (MINIMAL + "[time]\nsimulate_speed = 1000\nsimulate_from = 2027-01-31T16:30:00Z\n"
            f"simulate_since = {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(real_start))}\n")
    clock = wall_clock(load(write(tmp_path, text)).time)
    ahead = clock() - 1801413000.0
    assert 9_000 <= ahead <= 12_000, ahead               # 10 s of the host's at 1000x, from the site's start
