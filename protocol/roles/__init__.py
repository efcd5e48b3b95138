"""The registry of roles: one line per role, nothing else.

A role is declared once, in its spec module beside this file
(protocol/roles/<name>.py), which the board and every host tool import: its
config schema, reading fields and units, alarm codes and names, pins, the
commissioning sensor check, what the status page charts and what the console
status line says. Its board logic is firmware/roles/<name>.py and its world
model tools/sim/worlds/<name>.py; nothing else in the tree names a role.

A role's position in ROLES is its number on the wire (hello key 3, readings
key 4): append, never reorder. A name whose spec module does not exist yet is
reserved: boards may list its pins, nothing builds or runs it.

This module is what a board needs (it runs on MicroPython, in the board's
heap); what only the host asks of the registry is in catalog.py beside it.
"""

ROLES = (
    "meter",      # 0: water meter (pulses -> exact register, interval and daily readings)
    "doser",      # 1: chlorine dosing pump (flow-proportional, trimmed on the residual, interlocked)
    "drain",      # 2: storm-drain level sensor (reserved: no spec yet)
)


def spec(name):
    """The role's spec module; ImportError when the role has no spec (yet)."""
    if name not in ROLES:
        raise ImportError("no role %r (roles: %s)" % (name, ", ".join(ROLES)))
    full = "protocol.roles." + name
    __import__(full)
    import sys
    return sys.modules[full]


def code(name):
    """The role's number on the wire."""
    return ROLES.index(name)
