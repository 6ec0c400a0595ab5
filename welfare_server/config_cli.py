"""Command-line options built from the config dataclasses: one statement of every field.

Each config is a dataclass whose fields carry a docstring (the string literal under the field).
`add_options` turns the init fields into `--field-name` options with the dataclass default and the
docstring as help; `build` makes the dataclass back from parsed arguments, so its own validation
(and its error messages naming the field and the bound) runs unchanged. Nothing here repeats a
default or a bound.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring} for a dataclass whose fields are documented in its source as a
    string literal right after each field (the house style); fields without one are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _option_type(hint):
    """(argparse type, is_bool) for a field's type hint; Optional[X] takes X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if hint is bool:
        return None, True
    if hint in (int, float, str):
        return hint, False
    return str, False


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *,
                only: typing.Iterable[str] | None = None, exclude: typing.Iterable[str] = (),
                prefix: str = "", overrides: dict[str, typing.Any] | None = None) -> None:
    """Add one option per init field of dataclass `cls` (or the `only` ones), named
    --{prefix}{field-name}, its dest `{cls.__name__}.{field}`. overrides: a default for this
    command that differs from the dataclass's (the dataclass still validates it)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    wanted = None if only is None else list(only)
    overrides = overrides or {}
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in set(exclude)]
    if wanted is not None:
        by_name = {f.name: f for f in fields}
        fields = [by_name[name] for name in wanted]
    for f in fields:
        if f.name in overrides:
            default = overrides[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kind, is_bool = _option_type(hints[f.name])
        # The parser's ArgumentDefaultsHelpFormatter appends the default.
        help_text = docs.get(f.name, "").replace("%", "%%")
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = f"{cls.__name__}.{f.name}"
        if is_bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=default, help=help_text,
                                metavar=f.name.upper())


def build(cls, args: argparse.Namespace, **extra):
    """The dataclass from the options add_options made (plus `extra` fields): its own validation
    runs, so a bad value is refused with the message the dataclass gives."""
    prefix = cls.__name__ + "."
    values = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    values.update(extra)
    return cls(**values)
