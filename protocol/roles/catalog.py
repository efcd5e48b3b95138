"""What the host asks of the role registry: which roles exist, a declaration of a role's spec,
names for wire numbers and alarm codes. Host only: the board image does not carry this module
(tools/image.py PROTOCOL_HOST_ONLY), so none of it costs a board heap."""

from protocol.messages import RUNTIME_ALARMS
from protocol.roles import ROLES, spec


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
    if code in RUNTIME_ALARMS:
        return RUNTIME_ALARMS[code]
    try:
        return spec(role).ALARMS.get(code) or "code_%d" % code
    except ImportError:
        return "code_%d" % code
