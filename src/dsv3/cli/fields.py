"""argparse flags generated from a config dataclass, and the dataclass built back from the parsed flags.

Each knob is declared once, as a field of its config dataclass (``dsv3.knobs.knob``): default, help
text, and where needed the value parser, choices, metavar or flag name. :func:`add_dataclass_args`
makes one flag per field, :func:`from_args` builds the config from the parsed namespace by field
name. A field without help text is an error when the parser is built (so no knob is silently
unreachable), unless the command excludes it and offers it some other way (``--model-set``).

Flags come in declaration order, the dataclass's own fields before those of its bases. Flag forms:
``field_name`` -> ``--field-name``; a ``bool`` field that defaults to False is a switch
``--field-name``, one that defaults to True is ``--no-field-name``; a ``list[...]`` field takes one or
more values; ``X | None`` parses as ``X``. A knob's ``aliases`` (old spellings) are accepted too:
hidden from the usage line, named as deprecated in the flag's help, and a warning on stderr when used.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Iterable

SCALARS = (int, float, str)


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when the dataclass is built without it."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default: it can't be an optional flag")


def _strip_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def add_dataclass_args(parser, cls: type, *, exclude: Iterable[str] = (),
                       defaults_override: dict[str, Any] | None = None) -> list[str]:
    """Add one flag per field of dataclass ``cls`` to ``parser`` (a parser or an argument group).

    ``exclude`` names fields the command sets some other way; ``defaults_override`` replaces the
    command-line default of some fields (``None``: the flag is "not given" unless used, and
    :func:`from_args` leaves the dataclass default; a ``{default}`` in the help names that default).
    Returns the names of the fields that got a flag, in declaration order.
    """
    exclude = set(exclude)
    overrides = dict(defaults_override or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((exclude | set(overrides)) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    added = []
    # the command's own knobs first, then those it inherits (e.g. the training loop's LoopOptions)
    own = set(vars(cls).get("__annotations__", {}))
    ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # stable: declaration order kept
    for f in ordered:
        if f.name in exclude:
            continue
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with dsv3.knobs.knob(...) "
                            f"(or exclude it and give the command another flag for it)")
        base = field_default(f)
        default = overrides.get(f.name, base)
        help_text = meta["help"]
        if "{default}" in help_text:  # argparse shows non-None defaults itself (%(default)s stops a repeat)
            help_text = help_text.replace("{default}", "%(default)s" if default is not None else str(base))
        kind = _strip_optional(hints[f.name])
        flag = meta.get("flag")
        aliases = meta.get("aliases", ())
        if aliases:
            help_text += f" ({', '.join(aliases)}: deprecated spelling{'s' if len(aliases) > 1 else ''})"
        if kind is bool:
            switch_on = not base  # the flag turns the default around
            flag = flag or ("--" if switch_on else "--no-") + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="store_true" if switch_on else "store_false",
                                default=default, help=help_text)
            for alias in aliases:
                parser.add_argument(alias, dest=f.name, action=DeprecatedAlias, nargs=0, const=switch_on,
                                    new_flag=flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            added.append(f.name)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind) or (str,)
            kwargs["nargs"] = "+"
            kind = item
        if "type" in meta:
            kwargs["type"] = meta["type"]
        elif kind in SCALARS:
            kwargs["type"] = kind
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hints[f.name]!r}; give the knob a "
                            f"type= parser or exclude the field")
        for key in ("choices", "metavar", "nargs"):
            if key in meta:
                kwargs[key] = meta[key]
        flag = flag or "--" + f.name.replace("_", "-")
        parser.add_argument(flag, **kwargs)
        for alias in aliases:  # the old spelling parses like the flag (same type, choices, nargs)
            alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("default", "help")}
            parser.add_argument(alias, action=DeprecatedAlias, new_flag=flag, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS, **alias_kwargs)
        added.append(f.name)
    return added


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores like the flag (``const`` for a switch) and warns on stderr.

    Its default is ``SUPPRESS`` (the flag itself sets the default) and it is hidden from ``--help``;
    the flag's help names it as deprecated.
    """

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def from_args(cls: type, args: argparse.Namespace, **values: Any):
    """``cls`` built from the attributes of ``args`` named like its fields, then ``values`` on top.

    An attribute that is ``None`` (a flag not given whose command-line default is None) or missing
    leaves the field's own default.
    """
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if getattr(args, f.name, None) is not None}
    kwargs.update(values)
    return cls(**kwargs)
