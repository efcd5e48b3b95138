"""The one error type a person acts on: where, what is wrong, and the fix.

Board and host raise the same type: the board's config check (an installer
reads it on the console and in a config_invalid alarm), the host's CLI
arguments, config and board files and images (a technician reads one line and
the CLI exits 2), the gateway's config and registry (the service refuses to
start). The text is always "WHERE: PROBLEM; fix: FIX", so nobody has to read a
traceback. Runs on MicroPython (no f-strings in the class, no typing).
"""


class UsageError(ValueError):
    """Bad input: the CLI exits with exit_code, nothing is created or half-written."""

    exit_code = 2

    def __init__(self, where, problem, fix):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__("%s: %s; fix: %s" % (where, problem, fix))


class BoardError(UsageError):
    """A board (or its port) that does not answer or misbehaves: a failure, exit 1, not bad input.

    where is the port or the board; the fix says what to check (the cable, the app, the port's owner)."""

    exit_code = 1


# A config's key is its "where": the board's schema checks read best with this name.
ConfigError = UsageError
