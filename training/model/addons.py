"""Every model add-on (training/model/addon.py) a model may have, one line each: a new method that adds parameters
is its module and its line here."""
from __future__ import annotations

from training.model.slimming import Slimming
from training.registry import Registry

ADDONS = Registry("model add-on", (
    Slimming,
))


def addons_of(cfg) -> list:
    """The add-ons a model of `cfg` has, as instances, in the order listed (ValueError for a name `model.addons`
    gives that no add-on has)."""
    for name in cfg.addons:
        ADDONS.lookup(name)
    return [cls(cfg) for cls in ADDONS.values() if cls.enabled(cfg)]
