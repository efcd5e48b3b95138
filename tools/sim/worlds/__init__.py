"""World simulator: the physics a board's sensors see, as plug-in models.

Each role's world is one module here named after the role (worlds/meter.py for
protocol/roles/meter.py): it lists its model classes in MODELS and says how a
`prapa site` board of that role is set up in site_board(n) -> (the role's config
section, world overrides) for the n-th board of the role. Nothing else here
names a role: the modules are found through the role registry. A world may
also say how many boards of its role a site runs (SITE_BOARDS, default 1: a
catchment of drains wants several) and where the n-th stands (site_place(n) ->
{"catchment", "lat", "lon"}, registered with the board's key).

A model is a class with:
- `NAME` and `ROLES` (the roles whose boards it is wired to);
- `PARAMS`: {name: (default, unit, what it means)}: every knob in one place,
  listed by `prapa board world-params` and set with `--world name.param=value`;
- `__init__(params, pins, rng)` with the role's pins from the board file;
- `events_until(t_us)`: input changes up to world time t_us, in time order, as
  (t_us, gpio, kind, value) with kind LEVEL (0/1) or ANALOG (microvolts);
- `levels()`: the current level of every input it drives (sent at power-on);
- `on_output(t_us, gpio, level)`: what the board drives (pumps, relays);
- `on_reset(t_us)` (optional): the board resets at t_us and its outputs float
  (a model whose outputs have a pull-down sets them to 0 here);
- `rebase()`: called before a parameter changes mid-run;
- `truth()`: what really happened (litres, pulses), for tests to judge by.

World time runs from the bench's start and keeps running while the board is
off: water flows through a meter whether or not the board is powered.
"""

import importlib
import random

from protocol import roles
from protocol.errors import UsageError

LEVEL = 1
ANALOG = 2


def _role_worlds():
    """{role: its world module} for every role that has one."""
    out = {}
    for role in roles.ROLES:
        try:
            out[role] = importlib.import_module(f"{__name__}.{role}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{role}":
                raise
    return out


ROLE_WORLDS = _role_worlds()
MODELS = {m.NAME: m for w in ROLE_WORLDS.values() for m in w.MODELS}


def site_board_for(role):
    """The role's site_board(n) -> (config section, world overrides), or None without a world."""
    w = ROLE_WORLDS.get(role)
    return getattr(w, "site_board", None)


def models_for(role):
    return [m for m in MODELS.values() if role in m.ROLES]


def parse_overrides(items):
    """['flow_meter.daily_litres=2000', ...] -> {model: {param: float}}."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        model, dot, param = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--world {item}", "expected MODEL.PARAM=VALUE", "e.g. --world flow_meter.daily_litres=2000")
        if model not in MODELS:
            raise UsageError(f"--world {item}", f"unknown model {model!r}", f"use one of {', '.join(MODELS)}")
        if param not in MODELS[model].PARAMS:
            raise UsageError(f"--world {item}", f"{model} has no parameter {param!r}",
                             f"use one of {', '.join(MODELS[model].PARAMS)} (see prapa board world-params)")
        try:
            out.setdefault(model, {})[param] = float(value)
        except ValueError:
            raise UsageError(f"--world {item}", f"{value!r} is not a number", "give a number") from None
    return out


class World:
    """All the models wired to one board."""

    def __init__(self, role, role_pins, overrides=None, seed=0):
        overrides = overrides or {}
        self.models = []
        for i, cls in enumerate(models_for(role)):
            params = {k: v[0] for k, v in cls.PARAMS.items()}
            params.update(overrides.get(cls.NAME, {}))
            self.models.append(cls(params, dict(role_pins), random.Random(seed * 1000 + i)))

    def events_until(self, t_us):
        events = []
        for m in self.models:
            events.extend(m.events_until(t_us))
        events.sort(key=lambda e: e[0])
        return events

    def levels(self):
        out = {}
        for m in self.models:
            out.update(m.levels())
        return out

    def analog_levels(self):
        """The analog inputs' microvolts now, for the bench to send at power-on."""
        out = {}
        for m in self.models:
            out.update(getattr(m, "analog_levels", dict)())
        return out

    def on_output(self, t_us, gpio, level):
        for m in self.models:
            m.on_output(t_us, gpio, level)

    def on_reset(self, t_us):
        """The board resets: every model that cares sees its outputs float."""
        for m in self.models:
            reset = getattr(m, "on_reset", None)
            if reset is not None:
                reset(t_us)

    def set_param(self, model, param, value):
        for m in self.models:
            if m.NAME == model and param in m.PARAMS:
                m.rebase()
                m.params[param] = float(value)
                return True
        return False

    def truth(self, t_us=None):
        """What each model did up to world time t_us (events are generated ahead of it)."""
        return {m.NAME: m.truth(t_us) for m in self.models}
