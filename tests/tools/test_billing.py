"""prapa export billing: a month of a meter from ledger databases built of what the gateway publishes.

The items come from the gateway's own Sessions (a board's readings message in, the item it stores out)
and go out through forward_format's envelope, as the forwarder publishes them; the ledger ingests the
payloads. The period is 2026-11 in +07:00, readings hourly on the local hour."""

import datetime as dt
import json

import pytest

from gateway import forward_format as ff
from gateway.session import Sessions
from protocol import messages as M
from tools import ledger as L

SITE = "town"
TZ = dt.timezone(dt.timedelta(hours=7))
H = 3600


def local(day, hour=0, month=11):
    return dt.datetime(2026, month, day, hour, tzinfo=TZ).timestamp()


class Gateway:
    """The gateway's item construction: Sessions turns a board's message into the items it forwards."""

    def __init__(self):
        self.s = Sessions(store=None, key_for=lambda d: None, send=lambda *a: None,
                          downlink_counters=lambda d: None, clock=lambda: 0.0, role_of=lambda d: "meter")
        self.rowid = 0

    def readings(self, device_id, boot, seq0, wall0, rows, register, span=H, scale=0, series=M.SERIES_INTERVAL):
        """Payloads (topic, bytes) of a batch: rows of litres per interval, the first interval ending at wall0+span
        (board time: one second per second since boot, the boot at wall0 - seq0 * span)."""
        t0 = seq0 * span + span
        m = M.readings(boot, seq0, t0, span, 0, M.units("L", scale, 1000), rows, register=register,
                       wall_t0=wall0 + span, series=series)
        self.s._dispatch(device_id, M.READINGS, m)
        return self._messages()

    def alarm(self, device_id, boot, seq, t_board_s, code, active, timed=True):
        """timed False: the gateway has not heard the board's clock yet (time_source "unknown")."""
        if timed:
            self.s.device(device_id).wall_origin[boot] = 0.0      # the board's clock is wall time here
        self.s._dispatch(device_id, M.ALARM, M.alarm(boot, seq, int(t_board_s), code, active))
        return self._messages()

    def _messages(self, replay=False):
        entries, self.s.pending = self.s.pending, []
        rows = []
        for e in entries:
            self.rowid += 1
            rows.append((self.rowid, e.device_id, e.boot_id, e.seq, e.kind, e.board_t_s, e.wall_t, e.time_source,
                         e.payload))
        return rows

    @staticmethod
    def publish(rows, replay=False, fmt="cbor"):
        out = []
        for run in ff.group(rows, 500, 64 * 1024, SITE):
            for part, payload in ff.message(SITE, run, fmt, 64 * 1024, replay=replay):
                out.append((ff.topic(SITE, part[0][1], part[0][4]), payload))
        return out


def ingest(store, messages):
    return [store.ingest(topic, payload) for topic, payload in messages]


def month_of(gw, device_id, litres_per_h, register, boot=1, first=None, last=None, seq0=0):
    """Hourly rows from `first` to `last` (wall times of interval starts); returns (rows, register after)."""
    first = local(31, 0, month=10) if first is None else first
    last = local(1, 0, month=12) + 6 * H if last is None else last
    n = int((last - first) // H)
    values = [litres_per_h] * n
    rows = gw.readings(device_id, boot, seq0, first, values, register)
    return rows, register + sum(values)


def export(store, accounts=None, now=None):
    return L.billing(store, "2026-11", TZ, accounts, now=now)


def row_of(exp, device):
    return next(r for r in exp["rows"] if r["device"] == device)


@pytest.fixture
def store(tmp_path):
    s = L.LedgerStore(tmp_path / "ledger.db")
    yield s
    s.close()


def test_a_full_month_bills_the_register_at_the_local_month_bounds(store):
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 1000)
    ingest(store, gw.publish(rows))
    r = row_of(export(store), "00002001")
    assert r["start_at"] == "2026-11-01T00:00:00+07:00" and r["end_at"] == "2026-12-01T00:00:00+07:00"
    assert r["start_m3"] == "1.240"                 # 24 h of October at 10 L/h on 1000 L
    assert r["consumption_m3"] == "7.200"           # 720 h x 10 L
    assert r["readings"] == 720 and r["gaps"] == [] and r["exact"] is True


def test_a_reboot_and_a_power_cut_mid_period_chain_the_register_across_boots(store):
    gw = Gateway()
    # boot 1 until Nov 10 14:00; the power is cut; the board counted 3 L after its last reading and had
    # checkpointed them: boot 2's first register_before is the checkpoint, 3 hours later (no power).
    rows1 = gw.readings(0x2001, 1, 0, local(31, 0, 10), [10] * (24 + 9 * 24 + 14), 1000)
    reg1 = 1000 + 10 * (24 + 9 * 24 + 14)
    b2_first = local(10, 17)
    b2_hours = int((local(20, 8) - b2_first) // H)
    rows2 = gw.readings(0x2001, 2, 0, b2_first, [10] * b2_hours, reg1 + 3)
    reg2 = reg1 + 3 + 10 * b2_hours
    # a reboot (watchdog) on Nov 20 08:00: boot 3 starts at once on the same register
    b3_hours = int((local(1, 6, 12) - local(20, 8)) // H)
    rows3 = gw.readings(0x2001, 3, 0, local(20, 8), [10] * b3_hours, reg2)
    ingest(store, gw.publish(rows1 + rows2 + rows3))
    r = row_of(export(store), "00002001")
    assert [(g["kind"], g["boots"], g["exact"]) for g in r["gaps"]] == [("boot", [1, 2], True), ("boot", [2, 3], True)]
    assert r["gaps"][0]["from"] == "2026-11-10T14:00:00+07:00" and r["gaps"][0]["to"] == "2026-11-10T17:00:00+07:00"
    assert r["gaps"][0]["size_s"] == 3 * H and r["gaps"][1]["size_s"] == 0
    hours = 720 - 3                                 # three hours without power
    assert r["consumption_m3"] == f"{(10 * hours + 3) / 1000:.3f}"
    assert r["exact"] is True


def test_readings_late_through_replay_correct_the_next_export_and_raise_its_revision(store):
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 0)
    by_seq = {row[3]: row for row in rows}
    late = [by_seq[s] for s in range(100, 110)] + [row for row in rows if row[6] > local(29, 0)]
    early = [row for row in rows if row not in late]
    ingest(store, gw.publish(early))
    first = export(store, now=local(30, 12))
    r1 = row_of(first, "00002001")
    assert [(g["kind"], g["missing_seq"], g["exact"]) for g in r1["gaps"]] == [("seq", 10, True)]
    assert r1["end_at"] == "2026-11-29T00:00:00+07:00"      # the newest register it has
    assert r1["consumption_m3"] == "6.720"
    assert ingest(store, gw.publish(late, replay=True)) == ["stored"] * len(gw.publish(late, replay=True))
    second = export(store, now=local(1, 12, 12))
    r2 = row_of(second, "00002001")
    assert r2["gaps"] == [] and r2["end_at"] == "2026-12-01T00:00:00+07:00"
    assert r2["consumption_m3"] == "7.200" and r2["readings"] == r1["readings"] + 10 + 48
    assert r2["revision"] > r1["revision"] and second["revision"] > first["revision"]
    assert second["exported_at"] != first["exported_at"]
    assert store.counts()["replayed_items"] == len(late)


def test_a_duplicate_delivery_is_counted_once(store):
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 0)
    messages = gw.publish(rows)
    ingest(store, messages)
    before = export(store, now=0)
    assert ingest(store, messages[:1]) == ["duplicate"]
    assert ingest(store, gw.publish(rows[:5], replay=True)) == ["duplicate"]
    after = export(store, now=0)
    assert after == before
    c = store.counts()
    assert c["duplicates"] == len(L.decode(messages[0][1])["items"]) + 5
    assert c["stored_readings"] == len(rows) and after["rows"][0]["readings"] == 720


def test_a_duplicate_identity_with_other_content_is_a_conflict_and_the_first_copy_stays(store):
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 0)
    ingest(store, gw.publish(rows))
    other = Gateway()
    forged = other.readings(0x2001, 1, 5, local(31, 5, 10), [99], 50)
    assert ingest(store, other.publish(forged)) == ["duplicate"]
    c = store.counts()
    assert c["conflicts"] == 1 and c["duplicates"] == 0
    assert row_of(export(store), "00002001")["consumption_m3"] == "7.200"


def test_a_meter_replaced_mid_period_bills_one_account_from_both_devices(store, tmp_path):
    gw = Gateway()
    old, _ = month_of(gw, 0x2001, 10, 5000, last=local(15, 10))        # taken off on Nov 15 10:00
    new, _ = month_of(gw, 0x2002, 20, 0, first=local(15, 11))          # fitted an hour later, dial at 0
    ingest(store, gw.publish(old + new))
    csv_path = tmp_path / "accounts.csv"
    csv_path.write_text("account,device,from,to\nA-17,00002001,,2026-11-15T10:30\nA-17,00002002,2026-11-15T10:30,\n")
    accounts = L.read_accounts(csv_path, TZ)
    exp = export(store, accounts)
    assert [(r["account"], r["device"]) for r in exp["rows"]] == [("A-17", "00002001"), ("A-17", "00002002")]
    r_old, r_new = exp["rows"]
    assert r_old["end_at"] == "2026-11-15T10:00:00+07:00" and r_new["start_at"] == "2026-11-15T11:00:00+07:00"
    assert r_old["consumption_m3"] == f"{(14 * 24 + 10) * 10 / 1000:.3f}"
    hours_new = int((local(1, 0, 12) - local(15, 11)) // H)
    assert r_new["consumption_m3"] == f"{hours_new * 20 / 1000:.3f}" and r_new["start_m3"] == "0.000"
    assert exp["accounts"] == [{"account": "A-17", "devices": ["00002001", "00002002"], "exact": True,
                                "consumption_m3": f"{((14 * 24 + 10) * 10 + hours_new * 20) / 1000:.3f}"}]


def test_the_register_never_wraps_past_the_dial_and_a_register_that_goes_down_is_an_inexact_reset(store):
    gw = Gateway()
    # Commissioned at 999999.500 m³ (register_l near its 999999999 L maximum): the board counts on past
    # 10**9 L, as the gateway's unbounded register does; nothing is taken modulo the dial's 10**6 m³.
    rows, reg = month_of(gw, 0x2001, 1000, 999_999_500)
    ingest(store, gw.publish(rows))
    r = row_of(export(store), "00002001")
    assert r["start_m3"] == "1000023.500" and r["end_m3"] == "1000743.500"
    assert r["consumption_m3"] == "720.000" and r["gaps"] == [] and r["exact"] is True
    # A register that goes down (a dial re-commissioned at 0 on Nov 20, new boot): not a wrap we undo.
    gw2 = Gateway()
    a = gw2.readings(0x2002, 1, 0, local(31, 0, 10), [10] * (24 * 20), 7000)
    b = gw2.readings(0x2002, 2, 0, local(20, 0), [10] * int((local(1, 0, 12) - local(20, 0)) // H), 0)
    ingest(store, gw.publish(a + b))
    r = row_of(export(store), "00002002")
    assert [(g["kind"], g["exact"]) for g in r["gaps"]] == [("reset", False)]
    assert r["exact"] is False and r["consumption_m3"] == "7.200"   # both segments; the join counts nothing


def test_millilitre_registers_bill_in_m3_to_three_decimals(store):
    gw = Gateway()
    rows = gw.readings(0x2003, 1, 0, local(1, 0), [1500] * 10 + [999], 2_000_750, scale=-3)
    ingest(store, gw.publish(rows))
    r = row_of(export(store), "00002003")
    # as a dial shows them: cut to the litre, never rounded up (2000.750 L, then 2016.749 L)
    assert (r["start_m3"], r["end_m3"], r["consumption_m3"]) == ("2.000", "2.016", "0.016")


def test_alarms_of_the_period_come_with_the_meter_spec_names(store):
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 0)
    from protocol.roles import meter
    alarms = gw.alarm(0x2001, 1, 500, local(12, 3), meter.A_BURST, True)
    alarms += gw.alarm(0x2001, 1, 501, local(12, 5), meter.A_BURST, False)
    alarms += gw.alarm(0x2001, 1, 502, local(3, 0, 12), meter.A_LEAK, True)     # December: not this bill
    ingest(store, gw.publish(rows + alarms))
    r = row_of(export(store), "00002001")
    assert [(a["name"], a["active"], a["at"]) for a in r["alarms"]] == [
        ("burst", True, "2026-11-12T03:00:00+07:00"), ("burst", False, "2026-11-12T05:00:00+07:00")]
    assert store.counts()["stored_alarms"] == 3


def test_the_cli_writes_csv_and_json_and_refuses_bad_arguments_with_exit_2(store, tmp_path, capsys):
    from tools import cli
    gw = Gateway()
    rows, _ = month_of(gw, 0x2001, 10, 0)
    ingest(store, gw.publish(rows, fmt="json"))
    db = str(store.path)
    out = tmp_path / "bill.csv"
    assert cli.main(["export", "billing", "--db", db, "--period", "2026-11", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:5] == ["period", "exported_at", "revision", "account", "device"]
    assert lines[1].split(",")[3:5] == ["00002001", "00002001"] and ",7.200," in lines[1]
    assert cli.main(["export", "billing", "--db", db, "--period", "2026-11", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tz"] == "+07:00" and data["rows"][0]["consumption_m3"] == "7.200"
    assert cli.main(["export", "billing", "--db", db, "--period", "2026-13"]) == 2
    assert "--period" in capsys.readouterr().err
    assert cli.main(["export", "billing", "--db", str(tmp_path / "none.db"), "--period", "2026-11"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["export", "billing", "--db", db, "--period", "2026-11", "--tz", "7"]) == 2
    assert cli.main(["export", "billing", "--db", db, "--period", "2026-11", "--format", "xml"]) == 2


def test_readings_lost_before_the_first_one_held_are_an_inexact_head_gap_and_an_untimed_alarm_is_placed(store):
    # The board's first readings (seq 1-2) never reached the ledger; its burst alarm (seq 3) was raised
    # before the gateway knew the board's clock; seq 4 on carry wall time (boot at Nov 5 00:00 local).
    gw = Gateway()
    boot_at = local(5)
    from protocol.roles import meter
    alarm = gw.alarm(0x2001, 1, 3, 2.5 * H, meter.A_BURST, True, timed=False)
    rows = gw.readings(0x2001, 1, 4, boot_at + 4 * H, [10] * 48, 20)     # board time: seq x 1 h
    ingest(store, gw.publish(alarm + rows))
    assert L.decode(gw.publish(alarm)[0][1])["items"][0]["time_source"] == "unknown"
    r = row_of(export(store), "00002001")
    assert [(g["kind"], g["missing_seq"], g["exact"]) for g in r["gaps"]] == [("head", 2, False)]
    assert r["gaps"][0]["to"] == "2026-11-05T04:00:00+07:00" and r["start_m3"] == "0.020"
    assert r["exact"] is False and r["consumption_m3"] == "0.480"
    assert r["alarms"] == [{"name": "burst", "code": meter.A_BURST, "active": True,
                            "at": "2026-11-05T02:30:00+07:00", "time": "boot"}]
