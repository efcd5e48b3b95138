"""Errors a person can act on.

A `UsageError` is bad input (an argument, a config or board file, an image):
the CLI prints it as one line and exits 2. Its text names the file or field,
what is wrong, and the fix, so a technician at a bench never has to read a
traceback.
"""


class UsageError(Exception):
    """Bad input: exit code 2, nothing created or half-written."""

    def __init__(self, where, problem, fix):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}; {fix}")
