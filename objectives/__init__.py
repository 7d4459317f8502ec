"""Training objectives: one file each, registered by name.

A new objective is one file in this folder that subclasses :class:`Objective` and decorates it with
``@register("name")``; every module here is imported on first use, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from ssvit.objectives.base import Objective, StepOutput
from ssvit.errors import UsageError

OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    def add(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__module__}, {cls.__module__})")
        OBJECTIVES[name] = cls
        cls.name = name  # what its options are addressed by: --<name>.<option>
        return cls

    return add


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def get(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise UsageError(f"Unknown objective {name!r}. Available objectives are: {', '.join(sorted(OBJECTIVES))}.")
    return OBJECTIVES[name]


_import_all()

__all__ = ["OBJECTIVES", "Objective", "StepOutput", "get", "register"]
