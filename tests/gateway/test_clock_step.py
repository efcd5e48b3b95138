"""The gateway's time syncs are paced on the monotonic clock, and a stepped wall clock syncs boards at once."""

from tests.gateway.test_catchments import close, make_service


def test_syncs_keep_their_pace_when_the_wall_clock_steps_back_and_a_step_syncs_at_once(tmp_path):
    svc = make_service(tmp_path)
    try:
        every = svc.cfg.time.sync_interval_s
        wall0 = 1_800_000_000.0
        due = lambda mono, wall: svc._time_sync_due(mono, wall)
        assert due(100.0, wall0)                                   # the first turn syncs
        assert not due(101.0, wall0 + 1)
        assert due(100.0 + every, wall0 + every)                   # then every sync_interval_s
        assert not due(101.0 + every, wall0 + every + 1)
        assert svc.clock_steps == 0
        # NTP steps the wall clock back an hour: the boards hear the true time now, not an hour later.
        assert due(102.0 + every, wall0 + every + 2 - 3600)
        assert svc.clock_steps == 1
        assert not due(103.0 + every, wall0 + every + 3 - 3600)   # and the pace goes on from there
        assert due(102.0 + 2 * every, wall0 + 2 * every + 2 - 3600)
        # Forward by an hour: at once too. A second of scheduling lateness is no step.
        assert due(103.0 + 2 * every, wall0 + 2 * every + 3)
        assert not due(105.0 + 2 * every, wall0 + 2 * every + 5.5)
        assert svc.clock_steps == 2
    finally:
        close(svc)
