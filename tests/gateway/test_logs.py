"""gateway/logs.py: one JSON object per line, and never a secret."""

import json
import logging

from gateway.logs import MASK, json_line, log_event


def test_one_json_object_per_event_with_secrets_masked(caplog):
    log = logging.getLogger("prapa.test.logs")
    caplog.set_level(logging.INFO, logger="prapa.test.logs")
    log_event(log, logging.WARNING, "device_added", device=7, key=b"\x01" * 16, broker_password="hunter2",
              Secret="s", path=log)
    log_event(log, logging.DEBUG, "not_enabled")
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert record.exc_info is None and record.pathname == __file__
    line = json.loads(record.getMessage())
    assert line == {"event": "device_added", "device": 7, "key": MASK, "broker_password": MASK,
                    "Secret": MASK, "path": str(log)}
    assert "hunter2" not in record.getMessage()


def test_printed_lines_lead_with_the_time():
    line = json.loads(json_line("board_started", stamp=True, board="m1", token="t"))
    assert list(line)[:2] == ["ts", "event"] and line["board"] == "m1" and line["token"] == MASK
    assert "ts" not in json.loads(json_line("x"))
