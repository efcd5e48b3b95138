# A decoded message map checked against its rule table (protocol/messages.py RULES, which says
# what schema.cddl says), before any handler on either side sees it: the board's downlink and
# the gateway's uplink go through the same check in messages.decode. A message that passes has
# every key of the right type and in range, so a handler never meets a text boot id or a
# negative seq.
#
# A rule is (key, name, kind, lo, hi, required); kinds, one letter each, so that a table is a
# literal tuple the board keeps in flash (frozen), not in its heap:
#   u  unsigned int in lo..hi (hi None: any)      i  int in lo..hi (None: unbounded)
#   t  text of lo..hi UTF-8 bytes                 y  bytes of lo..hi
#   b  bool                                       m  map following the rules in lo
#   s  map of text keys, any values               r  readings rows (see _rows)
# A bool is never an int here, nor an int a float. Keys not in the table are ignored (the
# spec's compatible change: a new optional key).
U32 = 0xFFFFFFFF


def problem(m, rules):
    """None when the map m follows rules, else (missing, text): missing is true when a required
    key is absent (the payload is not this message at all: that is said first, whatever else is
    wrong), text names the key and the fault."""
    for key, name, _kind, _lo, _hi, required in rules:
        if required and key not in m:
            return True, "key %d missing (%s)" % (key, name)
    for key, name, kind, lo, hi, _required in rules:
        if key not in m:
            continue
        why = _wrong(m[key], kind, lo, hi, m)
        if why is not None:
            if type(why) is tuple:             # inside a map: its own key's fault
                return False, "key %d (%s) %s" % (key, name, why[1])
            return False, "key %d (%s) %s" % (key, name, why)
    return None


def _int_in(v, lo, hi):
    return type(v) is int and (lo is None or v >= lo) and (hi is None or v <= hi)


def _wrong(v, kind, lo, hi, m):
    """None when v is of kind within lo..hi, else what it is not (a tuple from a map's rules)."""
    t = type(v)
    if kind == "u":
        if _int_in(v, lo, hi):
            return None
        if hi == U32 and lo == 0:
            return "is not a u32"
        if hi is None:
            return "is not a uint" if lo == 0 else "is not a uint >= %d" % lo
        return "is not a uint <= %d" % hi if lo == 0 else "is not a uint in %d..%d" % (lo, hi)
    if kind == "i":
        if _int_in(v, lo, hi):
            return None
        return "is not an int" if lo is None else "is not an int in %d..%d" % (lo, hi)
    if kind == "t" or kind == "y":
        if t is (str if kind == "t" else bytes) and lo <= len(v.encode() if kind == "t" else v) <= hi:
            return None
        what = "text" if kind == "t" else "a byte string"
        return "is not %s of %d bytes" % (what, lo) if lo == hi else "is not %s of %d..%d bytes" % (what, lo, hi)
    if kind == "b":
        return None if t is bool else "is not a bool"
    if kind == "m":
        if t is not dict:
            return "is not a map"
        return problem(v, lo)
    if kind == "s":
        if t is dict:
            for k in v:
                if type(k) is not str:
                    break
            else:
                return None
        return "is not a map of text keys"
    return _rows(v, m)


_WIDTHS = {}


def _row_width(role):
    """Columns of a role's row: its spec's FIELDS (0: a bare uint, the meter's); -1 for a role
    this side has no spec for (the drain, reserved). Imported on first use (the board never
    receives readings) and kept: it was half of the gateway's check of a readings frame."""
    width = _WIDTHS.get(role)
    if width is None:
        from protocol import roles
        try:
            width = len(getattr(roles.spec(roles.ROLES[role]), "FIELDS", None) or ())
        except ImportError:
            width = -1
        _WIDTHS[role] = width
    return width


def _rows(rows, m):
    """Readings rows (the rules check keys 0-5 and 7-10 first): uints, or for a role whose spec
    declares FIELDS arrays of exactly that many uints (a role without a spec here: uints or arrays
    of 1..16 ints, schema.cddl's shapes); every row's seq and end time a u32."""
    if type(rows) is not list:
        return "is not an array"
    width = _row_width(m[4])
    for i, row in enumerate(rows):
        if width == 0 or (width < 0 and type(row) is int):
            if not _int_in(row, 0, None):
                return "row %d is not a uint" % i
        elif width < 0:
            if type(row) is not list or not 0 < len(row) <= 16 or not all(_int_in(c, None, None) for c in row):
                return "row %d is not a uint or an array of 1..16 ints" % i
        elif type(row) is not list or len(row) != width or not all(_int_in(c, 0, None) for c in row):
            return "row %d is not an array of %d uints" % (i, width)
    n = len(rows)
    if n and (m[1] + n * m.get(10, 1) - 1 > U32 or m[2] + (n - 1) * m[3] > U32):
        return "run past a u32 seq or board second (%d rows)" % n
    return None
