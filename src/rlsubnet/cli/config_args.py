"""Command-line options generated from a config dataclass, so that a flag, its help, its choices and its default
are written once, on the field (the habit of TRL's ``HfArgumentParser``).

A field's ``metadata`` may hold:

- ``help``: the option's help text; ``default_help``: what the default means, when its value alone does not say
  (``None`` standing for "per size", "the other task"...);
- ``choices``: the allowed values, shown in the help; for an ``X | None`` field the word ``none`` gives None.
  Options are checked by the dataclass's ``__post_init__`` (a one-line error naming the option), not by argparse;
  a positional argument is checked by argparse;
- ``flag``: the option's name when it is not ``--field-name``; ``aliases``: more names (``-q``);
- ``positional``: a positional argument; ``group``: the title of the help section; ``metavar``;
- ``cli``: False keeps the field off the command line (its default applies).

Supported types: bool (a switch), int, float, str, ``X | None`` and ``list[str] | None`` (a repeatable option). This module imports nothing heavy: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable


def option_name(f: dataclasses.Field) -> str:
    """The option that sets field ``f``: ``metadata["flag"]`` or ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _unwrap(tp) -> tuple[object, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _scalar(tp, optional: bool):
    if tp in (int, float):
        return tp
    if tp is str:
        return (lambda s: None if s.lower() == "none" else s) if optional else str
    raise TypeError(f"no command-line form for a field of type {tp!r}")


def _fmt(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices and "metavar" in f.metadata:  # otherwise the metavar lists them
        text += f" ({', '.join(map(str, choices))})"
    if "default_help" in f.metadata:
        text += f" (default: {f.metadata['default_help']})"
    elif default is not dataclasses.MISSING and default is not None and default is not False:
        text += f" (default: {_fmt(default)})"
    return text.replace("%", "%%")


def _target(parser: argparse.ArgumentParser, title: str | None, default):
    if title is None:
        return default
    for g in parser._action_groups:  # argparse keeps its groups here; reuse one of the same title
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls, *, exclude: Iterable[str] = (), group: str | None = None
) -> None:
    """Add one argument per field of ``cls`` (in field order) to ``parser``; ``group``: the help section of the
    fields that name none. The parsed value lands under the field's own name (``from_args`` reads it back)."""
    hints = typing.get_type_hints(cls)
    exclude = set(exclude)
    section = _target(parser, group, parser)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or meta.get("cli") is False:
            continue
        tp, optional = _unwrap(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        where = _target(parser, meta.get("group"), section)
        kwargs: dict = {"help": _help(f, default)}
        if meta.get("positional"):
            where.add_argument(f.name, type=_scalar(tp, optional), choices=meta.get("choices"), **kwargs)
            continue
        names = [option_name(f), *meta.get("aliases", ())]
        kwargs["dest"] = f.name
        if tp is bool:
            where.add_argument(
                *names,
                action="store_true" if default is False else argparse.BooleanOptionalAction,
                default=default,
                **kwargs,
            )
            continue
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if "metavar" in meta or "choices" in meta:
            kwargs["metavar"] = meta.get("metavar") or "{" + ",".join(map(str, meta["choices"])) + "}"
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            where.add_argument(*names, action="append", type=_scalar(item, False), **kwargs)
        else:
            where.add_argument(*names, type=_scalar(tp, optional and "choices" in meta), **kwargs)


def from_args(cls, namespace: argparse.Namespace, **overrides):
    """An instance of ``cls`` from the parsed ``namespace`` (fields that were not on the command line keep their
    defaults); ``overrides`` replace values, e.g. those the command derives from other options."""
    values = {
        f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(namespace, f.name)
    }
    values.update(overrides)
    return cls(**values)
