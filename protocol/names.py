"""Field names of every payload key, as in schema.cddl and SPEC.md section 5: what `prapa monitor`
prints and what the northbound contract names. Host only: a board never needs the names, so the
image does not carry this module (tools/image.py PROTOCOL_HOST_ONLY)."""

from protocol.messages import RESET_CAUSES
from protocol.roles import ROLES

FIELDS = {
    "hello": {0: "boot_id", 1: "firmware", 2: "board", 3: "role", 4: "config_hash", 5: "clock_synced",
              6: "reset_cause", 7: "board_t_s", 8: "addr"},
    "readings": {0: "boot_id", 1: "seq", 2: "t0_s", 3: "interval_s", 4: "role", 5: "units", 6: "rows",
                 7: "register", 8: "wall_t0", 9: "series", 10: "seq_step"},
    "alarm": {0: "boot_id", 1: "seq", 2: "board_t_s", 3: "code", 4: "active", 5: "detail"},
    "health": {0: "boot_id", 1: "uptime_s", 2: "heap_free", 3: "heap_min", 4: "resets", 5: "reset_cause",
               6: "link", 7: "log_fill_permille", 8: "flash_writes", 9: "timer_late_us"},
    "ack": {0: "boot_id", 1: "seq"},
    "time_sync": {0: "wall_ms", 1: "board_t_s"},
    "config_push": {0: "config_id", 1: "config"},
    "command": {0: "command_id", 1: "name", 2: "args"},
    "command_result": {0: "command_id", 1: "ok", 2: "detail"},
}
NESTED = {"units": {0: "unit", 1: "scale", 2: "k_factor_milli"}, "link": {0: "sent", 1: "received", 2: "rejected"},
          "timer_late_us": {0: "p50", 1: "p99", 2: "max"}}
ENUMS = {"role": ROLES, "reset_cause": RESET_CAUSES, "series": ("interval", "daily")}   # by wire number
