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
"""

ROLES = (
    "meter",      # 0: water meter (pulses -> exact register, interval and daily readings)
    "doser",      # 1: chlorine dosing pump (reserved: no spec yet)
    "drain",      # 2: storm-drain level sensor (reserved: no spec yet)
)


def spec(name):
    """The role's spec module; ImportError when the role has no spec (yet), KeyError-free."""
    if name not in ROLES:
        raise ImportError("no role %r (roles: %s)" % (name, ", ".join(ROLES)))
    full = "protocol.roles." + name
    __import__(full)
    import sys
    return sys.modules[full]


def code(name):
    """The role's number on the wire."""
    return ROLES.index(name)


def name_of(code):
    """The role's name for its wire number (str(code) for a number this side does not know)."""
    return ROLES[code] if 0 <= code < len(ROLES) else str(code)


def available():
    """The roles that have a spec: the ones a board can be built and commissioned for."""
    out = []
    for name in ROLES:
        try:
            spec(name)
        except ImportError as e:
            if name not in str(e):          # the spec exists but is broken: say so, do not hide it
                raise
            continue
        out.append(name)
    return out


def attr(name, attribute, default=None):
    """One declaration of a role's spec, or default for a role without a spec or that declaration."""
    try:
        return getattr(spec(name), attribute, default)
    except ImportError:
        return default


def alarm_name(role, code):
    """An alarm's name: the role's own (1..99, its spec's ALARMS) or the runtime's (100+)."""
    from protocol.messages import RUNTIME_ALARMS
    if code in RUNTIME_ALARMS:
        return RUNTIME_ALARMS[code]
    try:
        return spec(role).ALARMS.get(code) or "code_%d" % code
    except ImportError:
        return "code_%d" % code
