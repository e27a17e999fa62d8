"""Typer options from config classes: each option is declared once, as a config field (``nestprune.config``).

``@config_options(shared, registries)`` on a command ``fn(..., **options)`` gives it one typer option
per declared field and calls it with the flat options (``--r-max 0.5`` → ``options["r_max"] = 0.5``):

* ``shared`` options (e.g. BuildConfig's ``--batch-size``) always apply; their default is the field's
  and is passed through (a negated flag such as ``--no-compact``: False, the config's class maps it).
* the options of the classes of each registry one picks from (a method's ``--steps``, an objective's
  ``--prompt-template``); one flag serves every class of the registry that declares the key, and its
  help says which unless all do. Only the ones given on the command line are passed, so that the library can refuse one the
  chosen class does not take.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import typer

from nestprune.config import Param, Registry

F = TypeVar("F", bound=Callable[..., Any])


def _plain(t: Any) -> Any:
    """The command-line type of a field type: Optional stripped, a Literal as str."""
    origin = typing.get_origin(t)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return _plain(args[0]) if len(args) == 1 else str
    if origin is Literal:
        return str
    return t


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def merged_help(group: Sequence[Param], owners: Sequence[str]) -> str:
    """One help text for a key several classes declare; says which classes take it unless all do."""
    parts: list[str] = []
    seen: dict[tuple[str, str], list[str]] = {}
    for p in group:
        default = "" if p.default is None or isinstance(p.default, bool | Mapping) else f" (default {_show(p.default)})"
        seen.setdefault((p.spec.help, default), []).append(p.owner)
    every = sorted({p.owner for p in group}) == sorted(owners)
    for (text, default), names in seen.items():
        prefix = "" if every and len(seen) == 1 else ", ".join(names) + ": "
        parts.append(prefix + text + default)
    return "; ".join(parts)


def _param(key: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def generated_parameters(shared: Sequence[Param], registries: Sequence[Registry]) -> list[inspect.Parameter]:
    out = []
    for p in shared:
        t = p.spec.cli_type or p.type
        # a negated flag (--no-compact) is off unless given; the config turns it into its field (Param.to_field)
        default = False if p.spec.negate else p.default
        out.append(_param(p.key, Annotated[t, typer.Option(p.flag, help=p.spec.help)], default))
    for registry in registries:
        groups: dict[str, list[Param]] = {}
        for p in registry.params():
            groups.setdefault(p.key, []).append(p)
        for key, group in groups.items():
            kinds = {_plain(p.spec.cli_type or p.type) for p in group}
            if len(kinds) != 1 or len({p.flag for p in group}) != 1:
                raise TypeError(f"{registry.kind} option {key!r} is declared with different types or flags")
            t, flag = kinds.pop(), group[0].flag
            option = typer.Option(flag, help=merged_help(group, registry.names()), show_default=False)
            out.append(_param(key, Annotated[bool, option], False) if t is bool
                       else _param(key, Annotated[t | None, option], None))
    keys = [p.name for p in out]
    if len(keys) != len(set(keys)):
        raise TypeError(f"one option key is declared by two groups: {sorted(k for k in keys if keys.count(k) > 1)}")
    return out


def config_options(shared: Sequence[Param], registries: Sequence[Registry]) -> Callable[[F], F]:
    """Add the declared options to a typer command (see the module docstring)."""
    generated = generated_parameters(shared, registries)
    parse = {p.key: p.spec.parse for r in registries for p in r.params() if p.spec.parse is not None}
    shared_keys = {p.key for p in shared}

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        explicit = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            options = {}
            for p in generated:
                value = kwargs.pop(p.name)
                if p.name in shared_keys:
                    options[p.name] = value
                elif value is not None and value is not False:
                    options[p.name] = parse[p.name](value) if p.name in parse else value
            return fn(*args, **kwargs, **options)

        command.__signature__ = sig.replace(parameters=explicit + generated)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in explicit + generated}
        return command  # type: ignore[return-value]

    return decorate
