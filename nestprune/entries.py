"""Registered entries: a name → entry table, filled by ``register``, where an unknown name is one clear error.

The variant side keeps two: width policies (``variant.widths.WIDTH_POLICIES``, the ``--layout`` values) and
writers (``variant.writers.WRITERS``, the ``--format`` values). An entry is any object with a ``name``.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from nestprune.errors import NestpruneError


class Named(Protocol):
    @property
    def name(self) -> str: ...


E = TypeVar("E", bound=Named)


class Entries(dict[str, E], Generic[E]):
    def __init__(self, option: str):
        super().__init__()
        self.option = option  # the command-line option whose values these are, e.g. "layout"

    def register(self, entry: E) -> E:
        if entry.name in self:
            raise ValueError(f"{self.option} {entry.name!r} is already registered")
        self[entry.name] = entry
        return entry

    def find(self, name: str) -> E:
        try:
            return self[name]
        except KeyError:
            names = list(self)
            choices = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
            raise NestpruneError(f"unknown {self.option} {name!r} (use {choices})") from None
