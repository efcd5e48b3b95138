"""The checks of `prapa campaign` (tools/campaign.py) beyond the ledger's, each a pure function of what the run left:
the attacks' bursts and the gateway rig's taps (tools/rigs/attacks.py, tools/rigs/gateway_rig.py), the boards' hosts'
events, the gateway's answers to bad commands, and the ledger's readings against the gateway clock's steps.
Each returns its figures and a list of problems (empty: the check held); tests/tools/test_campaign.py makes
each fail on crafted input."""

import json

TIME_ERROR_HOST_S = 1.0    # the stated time error: a sync's latency on this (loaded) host; x --speed: site seconds


def attack_summary(bursts, taps):
    """{"tried": {kind: n}, "refused": {reason: n}, "accepted", "problems"} over every burst, and the tap's count
    of frames ever accepted from UDP (every gateway process's: the boards use serial links only)."""
    tried, refused, problems = {}, {}, []
    for b in bursts:
        for k, n in b.get("sent", {}).items():
            tried[k] = tried.get(k, 0) + n
        for r, n in b.get("refused", {}).items():
            refused[r] = refused.get(r, 0) + n
        problems += [f"udp_flood ({b['phase']}): {p}" for p in b.get("problems", ())]
    ever = sum(t.get("udp_accepted", 0) for t in taps.values())
    if ever:
        problems.append(f"the gateways accepted {ever} frames from the UDP link nobody's board uses")
    return {"tried": tried, "refused": refused, "accepted_ever": ever, "problems": problems}


def board_resets(events, cuts, watchdogs, started, wall_minus_mono):
    """{hex: {"by_cause": {cause: n}, "unplanned": [{"cause", "at_s"}]}}: every reset the boards' hosts made (their
    vm_started events, the first boot aside) and those the campaign did not make: more than its power cuts
    and watchdog faults of a cause (power_on / watchdog) in the board's figures; reported, not failed (a board
    starved of the host's CPU for its watchdog's second resets too: read its cause and time)."""
    out = {}
    for hexid, evs in events.items():
        boots = [e for e in evs if e.get("event") == "vm_started"][1:]
        by_cause = {}
        for e in boots:
            by_cause[e.get("reset_cause")] = by_cause.get(e.get("reset_cause"), 0) + 1
        planned = {"power_on": cuts.get(hexid, 0) - watchdogs.get(hexid, 0), "watchdog": watchdogs.get(hexid, 0)}
        unplanned, seen = [], {}
        for e in boots:
            cause = e.get("reset_cause")
            seen[cause] = seen.get(cause, 0) + 1
            if seen[cause] > planned.get(cause, 0):
                unplanned.append({"cause": cause, "at_s": round(e["ts"] - wall_minus_mono - started, 2)
                                  if isinstance(e.get("ts"), (int, float)) else None})
        out[hexid] = {"by_cause": by_cause, "unplanned": unplanned}
    return out


def command_problems(answers):
    """A bad command the gateway did not refuse (accepted, or no answer at all) is a problem."""
    return [f"bad command {a['kind']} for {a['device']}: " + (f"the gateway answered {a['state']}" if a["state"]
                                                             else "no answer from the gateway")
            for a in answers if a["state"] != "refused"]


def link_config_problems(records):
    """A frame put on a board's serial line from the bus side that the board did not count as refused in its
    next health reports (of the same boot), or a board that rebooted after them, is a problem."""
    out = []
    for r in records:
        if r["rebooted"]:
            out.append(f"link config on {r['device']}: the board rebooted after frames it should have refused")
        elif r["refused"] is None or r["refused"] < r["frames"]:
            out.append(f"link config on {r['device']}: {r['frames']} frames put on its line, "
                       f"{r['refused']} counted refused by the board")
    return out


HEAP_FLOOR = 0.10          # a board's lowest free heap below this share of its budget fails the campaign


def heap_figures(taps, report_rows, budget):
    """{"roles": {role: {"lowest_free", "budget", "share", "reports"}}, "problems"}: each role's lowest free heap
    over the run (the lowest heap_min its boards' health reports gave any gateway) against the board's heap
    budget; a board that never reported health, or went below HEAP_FLOOR of the budget, is a problem."""
    lowest, reports = {}, {}
    for tap in taps.values():
        for hexid, h in tap.get("health", {}).items():
            reports[hexid] = reports.get(hexid, 0) + h.get("n", 0)
            for v in (h.get("heap_min_min"), h.get("heap_free_min")):
                if v is not None and (hexid not in lowest or v < lowest[hexid]):
                    lowest[hexid] = v
    roles_, problems = {}, []
    for row in report_rows:
        hexid, role = row["device_id"], row["role"]
        if hexid not in lowest:
            problems.append(f"{hexid}: no health report reached the gateway: its heap is unknown")
            continue
        r = roles_.setdefault(role, {"lowest_free": lowest[hexid], "budget": budget, "reports": 0})
        r["lowest_free"] = min(r["lowest_free"], lowest[hexid])
        r["reports"] += reports[hexid]
        if lowest[hexid] < HEAP_FLOOR * budget:
            problems.append(f"{hexid} ({role}): free heap fell to {lowest[hexid]} bytes, below "
                            f"{HEAP_FLOOR:.0%} of its {budget}")
    for r in roles_.values():
        r["share"] = round(r["lowest_free"] / budget, 3) if budget else None
    return {"roles": roles_, "problems": problems}


SETTLED_S = 8.0            # host seconds after the last step was undone when every board has its true time again


def _true_origins(rs, steps):
    """(the wall origins (wall_t - t_board_s) of a boot's readings stamped on the true time for certain, certain):
    those that reached the ledger before the first step (a reading arrives after it is stamped), else those that
    arrived SETTLED_S after the last step was undone; else all of them (not certain: a boot that lived within
    the steps may have most of its readings stepped)."""
    if not steps:
        return [r[3] for r in rs], True
    first, last = min(st["at"] for st in steps), max(st["back_at"] or st["at"] for st in steps)
    sure = [r[3] for r in rs if r[4] < first] or [r[3] for r in rs if r[4] > last + SETTLED_S]
    return (sure, True) if sure else ([r[3] for r in rs], False)


def time_checks(db_path, steps, speed, tolerance_s=None):
    """What a stepped gateway clock did to the readings' wall times, from the ledger.

    Within one boot a reading's wall_t - t_board_s is the boot's wall origin: the same for every reading but for
    a sync's latency. Each boot's true origin is the median of its readings' stamped on the true time for certain
    (_true_origins). A reading within the stated error of it (tolerance_s, default TIME_ERROR_HOST_S x speed) is
    on time; one off by a step (within the error) was stamped while its board kept the stepped time ("stepped":
    counted, with how far from the exact step). Problems:
      - a reading off by anything else ("off": without a step, every reading off is);
      - a stepped reading the ledger received before the step began (a reading arrives after it is stamped),
        where its boot's true origin is certain.
    A board's time is not the host's (a starved board's clock does not run at --speed), and a record logged
    before its board's first sync is stamped when it is sent (firmware/uplink.py _wall_t0), so when a reading
    was stamped is bounded only by when it arrived. Figures: the latest a stepped reading arrived after its step
    was undone (the boards' re-sync delay, their delivery's included); boots whose readings, in their board's
    order, went from stepped to true and back to stepped ("flip_flop": a backlog sent across a step); readings
    whose wall time went back within their boot's series (interval bucketing after a step back); boots whose
    true origin was not certain."""
    import sqlite3
    import statistics
    tol = TIME_ERROR_HOST_S * speed if tolerance_s is None else tolerance_s
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    rows = db.execute("SELECT device, boot, seq, wall_t, item, received_at FROM readings WHERE wall_t IS NOT NULL "
                      "AND series = 'interval' ORDER BY device, boot, seq").fetchall()
    db.close()
    boots = {}
    for device, boot, seq, wall_t, item, received_at in rows:
        t_board = json.loads(item).get("t_board_s")
        if t_board is not None:
            boots.setdefault((device, boot), []).append((t_board, seq, wall_t, wall_t - t_board, received_at))
    sign_steps = {1: sum(1 for st in steps if st["step_s"] > 0), -1: sum(1 for st in steps if st["step_s"] < 0)}
    ok = stepped = off = back = early = 0
    worst, step_error, lag, problems, flip_flop, uncertain = 0.0, 0.0, 0.0, [], [], []
    for (device, boot), rs in boots.items():
        rs.sort()                                    # the board's own order
        origins, certain = _true_origins(rs, steps)
        base = statistics.median(origins)
        if not certain:
            uncertain.append(f"{device} boot {boot}")
        runs, prev_sign = {1: 0, -1: 0}, 0
        for i, (_t_board, seq, wall_t, d, received_at) in enumerate(rs):
            e = d - base
            sign = 0
            if abs(e) <= tol:
                ok += 1
                worst = max(worst, abs(e))
            else:
                mine = [st for st in steps if abs(abs(e) - abs(st["step_s"])) <= tol and
                        (not certain or (e > 0) == (st["step_s"] > 0))]
                if mine:
                    stepped += 1
                    sign = 1 if e > 0 else -1
                    step_error = max(step_error, abs(abs(e) - abs(mine[0]["step_s"])))
                    began = [st for st in mine if st["at"] <= received_at]
                    if not began:
                        early += certain
                    else:
                        lag = max(lag, received_at - max(st["back_at"] or st["at"] for st in began))
                else:
                    off += 1
                    if off <= 3:
                        problems.append(f"{device} boot {boot} seq {seq}: wall time {e:+.0f} s from its boot's, "
                                        f"beyond the {tol:g} s stated and not a step")
            if sign and sign != prev_sign:
                runs[sign] += 1
            prev_sign = sign
            if i and wall_t <= rs[i - 1][2]:
                back += 1
        if any(n > sign_steps[sign] for sign, n in runs.items()):
            flip_flop.append(f"{device} boot {boot}")
    if off > 3:
        problems.append(f"... {off} readings in all off by more than the stated error and not by a step")
    if early:
        problems.append(f"{early} readings off by a step reached the ledger before the step")
    return {"readings": ok + stepped + off, "on_time": ok, "stepped": stepped, "off": off, "went_back": back,
            "max_error_s": round(worst, 1), "stepped_error_s": round(step_error, 1), "tolerance_s": tol,
            "resync_lag_host_s": round(lag, 2), "flip_flop": flip_flop, "uncertain": uncertain,
            "problems": problems}
