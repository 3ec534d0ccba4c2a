"""A registry of method classes by name: what a config may name (stage hooks, training modifiers, model add-ons).

Each kind keeps one static list, one line per method (`stages/hooks.py` HOOKS, `stages/modifiers.py` MODIFIERS,
`model/addons.py` ADDONS): a method module plus its line there is the whole of adding one. `add` registers a
class at run time (a plugin, or a test's toy method); `added` does it for a `with` block only. Lookups of an
unknown name say which names exist and the nearest one.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Mapping, Generic[T]):
    """name -> class (each class's `name` attribute), in the order listed."""

    def __init__(self, kind: str, classes=()):
        self.kind = kind
        self._classes: dict[str, T] = {}
        for cls in classes:
            self.add(cls)

    def add(self, cls: T) -> T:
        """Register `cls` under `cls.name` (ValueError if the name is taken by another class); returns it, so it
        also serves as a class decorator."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a class attribute `name`, {cls.__name__} has none")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} '{name}' is already registered ({self._classes[name].__name__})")
        self._classes[name] = cls
        return cls

    def remove(self, name: str) -> None:
        del self._classes[name]

    @contextlib.contextmanager
    def added(self, cls: T) -> Iterator[T]:
        """`cls` registered for the block only."""
        self.add(cls)
        try:
            yield cls
        finally:
            self.remove(cls.name)

    def lookup(self, name: str) -> T:
        """The class registered as `name`; ValueError (one line: the known names, the nearest) otherwise."""
        if name not in self._classes:
            close = difflib.get_close_matches(name, list(self._classes), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._classes))}){hint}")
        return self._classes[name]

    def __getitem__(self, name: str) -> T:
        return self._classes[name]

    def __iter__(self):
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)
