"""systemd's sd_notify protocol, without libsystemd.

The unit is Type=notify with WatchdogSec=: systemd starts the next unit only
after READY=1 (config validated, store and registry open, links bound), and
restarts the gateway when WATCHDOG=1 stops coming, which is how a wedged
event loop, not only a dead process, gets noticed. Send WATCHDOG=1 from the
event loop itself (an asyncio task), never from a helper thread, or a stuck
loop would still look alive.

Outside systemd (NOTIFY_SOCKET unset) every call is a no-op returning False,
so the same code runs in tests and on a laptop. A failed send is logged and
returns False: losing a status line must never stop the service.
"""

import logging
import os
import socket
from functools import partial

from gateway.logs import log_event

log = logging.getLogger("prapa.gateway.sd_notify")

_log = partial(log_event, log)   # _log(level, event, exc_info=False, **fields): one JSON object per line



class Notifier:
    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._sock = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_usec = int(usec) if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self):
        return self.address is not None

    def watchdog_interval_s(self):
        """How often to send WATCHDOG=1: half of WatchdogSec, as sd_watchdog_enabled(3) advises; None if off."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields):
        """Send KEY=value lines (notify(READY=1, STATUS="...")); True if systemd was told."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = " ".join(str(value).splitlines())          # a newline would smuggle in another assignment
            lines.append(f"{key}={text}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:
            _log(logging.WARNING, "sd_notify_failed", error=str(e))
            return False

    def ready(self, status=None):
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def watchdog(self):
        return self.notify(WATCHDOG=1)

    def status(self, text):
        return self.notify(STATUS=text)

    def stopping(self, status=None):
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value):
    """'@name' is a Linux abstract socket (a leading NUL byte); a path otherwise; None when unset or unusable."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None
