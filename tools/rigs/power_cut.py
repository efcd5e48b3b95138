"""Power cuts at random instants while a board counts: how much does each cut lose?

Generic over the roles: the world module names the knob that makes the sensor
busy (ACTIVITY: model, parameter, busy value) and the true count (TRUTH: model,
key); the role's spec names the board's status counter that a boot recovers
from flash and prints on its status line (DURABLE_COUNTER, else COMMISSION_COUNTER).
"""

import random
import time

from protocol.roles import catalog as roles
from tools.console import parse_banner, parse_status
from tools.sim import worlds


class CampaignFailed(AssertionError):
    """The board broke a promise during the campaign (a boot skipped, a total went backwards)."""


def _boot_status(rig, after, counter):
    """(console line index, boot id, count recovered) of the next boot's status line."""
    i, status = rig.console.wait_for(parse_status, after=after, timeout=30)
    return i, parse_banner(rig.console.lines[i - 1])["boot"], status[counter]


def power_cut_campaign(rig, cuts, rng=None, busy=None):
    """Cut the board's power `cuts` times at random instants while it counts; return counts lost per cut.

    The sensor is busy (the world's ACTIVITY knob at `busy`, or its default busy
    value) only while a boot is up (status line seen: its counter is live) and
    goes idle 80 ms (past the world's look-ahead) before each cut, so every count
    the board does not have after the next boot was lost by the cut: a checkpoint
    loss. Every fifth cut lands within 20 ms of the sensor starting, in the first
    writes after a boot. Raises CampaignFailed if a boot is skipped or the
    recovered total ever goes backwards."""
    rng = rng or random.Random(0)
    world = worlds.ROLE_WORLDS[rig.role]
    model, knob, default_busy = world.ACTIVITY
    truth_model, truth_key = world.TRUTH
    counter = roles.attr(rig.role, "DURABLE_COUNTER") or rig.counter()   # what survives a cut
    after, recovered, truths, boots = 0, {}, [], []
    for k in range(cuts + 1):
        after, boot, total = _boot_status(rig, after, counter)
        recovered[boot] = total
        boots.append(boot)
        if k == cuts:
            break
        rig.board.set_world(model, knob, default_busy if busy is None else busy)
        time.sleep(rng.uniform(0, 0.02) if k % 5 == 4 else rng.uniform(0.05, 0.4))
        rig.board.set_world(model, knob, 0)
        time.sleep(0.08)
        truths.append(rig.board.power_cut()[truth_model][truth_key])
        after += 1
    losses, previous = [], 0
    for k, truth in enumerate(truths):
        boot, next_boot = boots[k], boots[k + 1]
        if next_boot != boot + 1:
            raise CampaignFailed(f"cut {k}: boot {boot} was followed by boot {next_boot}")
        if recovered[next_boot] < recovered[boot]:
            raise CampaignFailed(f"cut {k}: the total went backwards ({recovered[boot]} -> {recovered[next_boot]})")
        cumulative = truth - recovered[next_boot]
        losses.append(cumulative - previous)
        previous = cumulative
    return losses
