"""Typed, versioned option classes, and the registries that bind each class to its function.

A build method or an objective is a frozen dataclass made with :func:`config` (a ``name``, a
``version`` and its own options), bound to the function that runs it by one :class:`Registry`
(torchao's pattern: the config class is the key, ``register(ConfigClass)(fn)`` or a table entry adds
one). Each option is declared once, with :func:`option`: default, help, bounds or choices, and its
command-line flag. From that one declaration come

* validation when an instance is made (one ``NestpruneError`` line naming the flag),
* a JSON record ``{"name", "version", "options"}`` and back (:meth:`Registry.from_record` refuses an
  unknown name, version or option),
* the flat keyword form the command line and ``BuildConfig(**options)`` use (:meth:`Registry.resolve`:
  an option the chosen class does not have is refused), and the typer options (``nestprune.cli.options``).

Nothing here imports torch: the command line reads these declarations at start-up.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Generic, Protocol, TypeVar, dataclass_transform

from nestprune.errors import NestpruneError

META = "nestprune"
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class VersionedConfig(Protocol):
    """What :func:`config` makes: a frozen dataclass with a registry name and a version."""

    name: str
    version: int


@dataclass(frozen=True)
class Option:
    """What one config field means: help, bounds or choices, and how the command line spells it."""

    help: str
    flag: str | None = None  # default: --field-name
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    negate: bool = False  # a bool the flag turns off (--no-chat-template sets chat_template False)
    cli_type: Any = None  # the command-line type, where it differs from the field's
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value


def option(default: Any = MISSING, *, help: str, flag: str | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: Iterable[str] = (), negate: bool = False, cli_type: Any = None,
           parse: Callable[[Any], Any] | None = None, default_factory: Any = MISSING) -> Any:
    """A config field with its meaning (see :class:`Option`)."""
    spec = Option(help=help, flag=flag, ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices), negate=negate,
                  cli_type=cli_type, parse=parse)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META: spec})


@dataclass(frozen=True)
class Param:
    """One option as the command line and the flat keyword form see it."""

    key: str  # flat keyword and Python name: the flag without dashes ("r_max", "no_chat_template")
    flag: str  # "--r-max"
    field: str  # the dataclass field
    type: Any  # the field's resolved annotation
    default: Any
    spec: Option
    owner: str  # the config's name ("gisp"); "" for a class without one

    def to_field(self, value: Any) -> Any:
        """A flat value -> the field's value (a negated flag's True is False)."""
        return (not value) if self.spec.negate else value


def params(cls: type) -> list[Param]:
    """The declared options of a dataclass, in field order (fields made without :func:`option` are skipped)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(META)
        if spec is None:
            continue
        flag = spec.flag or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        out.append(Param(key=flag.removeprefix("--").replace("-", "_"), flag=flag, field=f.name, type=hints[f.name],
                         default=default, spec=spec, owner=getattr(cls, "name", "")))
    return out


def _number(x: float) -> str:
    return f"{x:g}"


def bounds_text(spec: Option) -> str | None:
    """'at least 1', 'in (0, 1]', … for a spec with bounds; None without."""
    lo = (spec.ge, "[") if spec.ge is not None else (spec.gt, "(") if spec.gt is not None else None
    hi = (spec.le, "]") if spec.le is not None else (spec.lt, ")") if spec.lt is not None else None
    if lo and hi:
        return f"in {lo[1]}{_number(lo[0])}, {_number(hi[0])}{hi[1]}"
    if lo:
        return f"at least {_number(lo[0])}" if lo[1] == "[" else f"greater than {_number(lo[0])}"
    if hi:
        return f"at most {_number(hi[0])}" if hi[1] == "]" else f"less than {_number(hi[0])}"
    return None


def check_value(p: Param, value: Any) -> None:
    """Refuse, in one line naming the flag, a value outside the option's bounds or choices."""
    if value is None:
        return
    s = p.spec
    if s.choices and value not in s.choices:
        raise NestpruneError(f"{p.flag} must be one of {', '.join(s.choices)}; got {value!r}")
    if any(b is not None for b in (s.ge, s.gt, s.le, s.lt)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NestpruneError(f"{p.flag} must be a number, got {value!r}")
        ok = ((s.ge is None or value >= s.ge) and (s.gt is None or value > s.gt)
              and (s.le is None or value <= s.le) and (s.lt is None or value < s.lt))
        if not ok:
            raise NestpruneError(f"{p.flag} must be {bounds_text(s)}, got {value!r}")


def check(cfg: Any) -> None:
    """Check every declared option of ``cfg`` (bounds, choices)."""
    for p in params(type(cfg)):
        check_value(p, getattr(cfg, p.field))


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, option))
def config(name: str, version: int = 1) -> Callable[[type[T]], type[T]]:
    """Make a frozen, versioned config class: ``name`` as the registry and the command line know it,
    ``version`` bumped whenever an option's meaning changes. Instances are checked when made; a class
    may add its own checks in ``validate(self)``."""

    def decorate(cls: type[T]) -> type[T]:
        cls.name = name  # type: ignore[attr-defined]
        cls.version = version  # type: ignore[attr-defined]
        extra = getattr(cls, "validate", None)

        def __post_init__(self) -> None:
            check(self)
            if extra is not None:
                extra(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
        return dataclass(frozen=True)(cls)

    return decorate


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def record(cfg: Any) -> dict[str, Any]:
    """``{"name", "version", "options"}``: the JSON form of a config (every field, defaults included)."""
    cls = type(cfg)
    return {"name": cls.name, "version": cls.version,
            "options": {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}}


class Registry(Generic[F]):
    """Config classes and the function each is bound to, by name.

    ``entries`` maps a config class to its function, or to ``"package.module:function"``, imported on
    first use (so that reading the options does not import torch). ``kind``/``flag`` name the choice in
    messages ("method", "--method"); ``unknown`` is the message for a name that is not registered.
    """

    def __init__(self, kind: str, flag: str, entries: Mapping[type, F | str] | None = None,
                 unknown: str = "{flag} must be one of {names}; got {name!r}"):
        self.kind, self.flag, self.unknown = kind, flag, unknown
        self._entries: dict[type, F | str] = {}
        for cls, fn in (entries or {}).items():
            self.register(cls)(fn)

    def register(self, cls: type) -> Callable[[F | str], F | str]:
        """``@registry.register(MyConfig)`` on the function (or ``registry.register(MyConfig)(fn)``)."""
        if not dataclasses.is_dataclass(cls) or not isinstance(getattr(cls, "name", None), str) \
                or not isinstance(getattr(cls, "version", None), int):
            raise TypeError(f"{cls!r} is not a config class (make it with nestprune.config.config)")
        taken = self.names()
        if cls not in self._entries and cls.name in taken:
            raise ValueError(f"{self.kind} {cls.name!r} is already registered")

        def bind(fn: F | str) -> F | str:
            self._entries[cls] = fn
            return fn

        return bind

    def unregister(self, cls: type) -> None:
        self._entries.pop(cls, None)

    def classes(self) -> tuple[type, ...]:
        return tuple(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._entries)

    def config_class(self, name: str) -> type:
        for cls in self._entries:
            if cls.name == name:
                return cls
        raise NestpruneError(self.unknown.format(flag=self.flag, kind=self.kind, name=name,
                                                 names=", ".join(self.names())))

    def function(self, cfg: Any) -> F:
        """The function bound to ``cfg``'s class (a lazy reference is imported now)."""
        fn = self._entries.get(type(cfg))
        if fn is None:
            raise NestpruneError(f"no {self.kind} is registered for {type(cfg).__name__}")
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
            self._entries[type(cfg)] = fn
        return fn  # type: ignore[return-value]

    def params(self) -> list[Param]:
        """Every option of every registered class (a key may appear in several classes)."""
        return [p for cls in self._entries for p in params(cls)]

    def keys(self) -> set[str]:
        return {p.key for p in self.params()}

    def resolve(self, choice: str | Any, given: Mapping[str, Any]) -> Any:
        """A config from a name (or an instance to update) and flat options; an option that the chosen
        class does not have is refused in one line."""
        cls = self.config_class(choice) if isinstance(choice, str) else type(choice)
        if not isinstance(choice, str) and cls not in self._entries:
            raise NestpruneError(f"{cls.__name__} is not a registered {self.kind}")
        own = {p.key: p for p in params(cls)}
        foreign = [k for k in given if k not in own]
        if foreign:
            flags = {p.key: p.flag for p in self.params()}
            takes = ", ".join(p.flag for p in own.values()) or "no options"
            raise NestpruneError(f"{', '.join(flags.get(k, k) for k in foreign)} does not apply to "
                                 f"{self.flag} {cls.name} (it takes {takes})")
        fields = {own[k].field: own[k].to_field(v) for k, v in given.items()}
        return cls(**fields) if isinstance(choice, str) else dataclasses.replace(choice, **fields)

    def from_record(self, data: Mapping[str, Any]) -> Any:
        """The config a :func:`record` describes; refuses an unknown name, a version other than the
        class's, or an option it does not have."""
        if not isinstance(data, Mapping) or not isinstance(data.get("options", {}), Mapping):
            raise NestpruneError(f"a {self.kind} record must be an object with name, version and options")
        cls = self.config_class(str(data.get("name")))
        version = data.get("version")
        if version != cls.version:
            raise NestpruneError(f"{self.kind} {cls.name!r} version {version!r} is not supported "
                                 f"(this nestprune reads version {cls.version}); upgrade nestprune")
        options = dict(data.get("options", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise NestpruneError(f"{self.kind} {cls.name!r} has no option {unknown[0]!r}")
        return cls(**options)

