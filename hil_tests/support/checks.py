"""Assertions the tests share about what reached the gateway."""


def interval_readings(entries):
    return [e for e in entries if e["series"] == "interval"]


def check_register_chain(readings):
    """Within a boot, each reading starts where the last ended; across boots it never goes back."""
    last = None
    for r in readings:
        if last is not None:
            if r["boot"] == last["boot"]:
                assert r["register_before"] == last["register"], (last, r)
            else:
                assert r["register_before"] >= last["register"], (last, r)
        assert r["register"] == r["register_before"] + r["value"]
        last = r
