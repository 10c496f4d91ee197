"""A flow's command-line options, read from the flow itself: each parameter's name, type and
default from its signature, its help from its entry in the docstring's ``Args:`` (which Prefect's
UI shows as the parameter's description). A parameter is declared there alone; the command line
adds only what it spells differently (``Option``: a flag, a metavar, the text it takes).

The flows' modules import Prefect and torch, so the command line parses their source instead of
importing them: a mistyped command is still refused at once. The names a signature uses are
looked up as its module would (its imports, its top-level assignments), and each import is of a
light module (settings, types).

A parameter typed ``SkipJsonSchema[...]`` is set by gptflow itself (the sweep flow sets each
point's ``sweep``; the command line's rendezvous options make ``rendezvous``): Prefect leaves it
out of a deployment's parameter schema, and the command line offers no option for it either.

Parameter types the command line reads: ``bool`` (a flag, off by default), ``str``, ``int`` and
``float``, these two bounded by ``annotated_types``' ``Ge`` and ``Gt`` (``PositiveInt``, ...:
Prefect checks the bounds of a deployment's parameters too), ``Literal`` choices, ``list[str]``
(a repeatable option), and each of them ``| None``.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Gt

PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]

DOCUMENTED_NAME = re.compile(r"``([^`]+)``")
"""Quoted text in a docstring: a parameter's name is shown as its flag, other text as `text`."""


@dataclass(frozen=True)
class Option:
    """How the command line spells a flow parameter, where it differs from the declaration."""

    flag: str | None = None
    """Default: ``--`` and the parameter's name with dashes (``--init-from``)."""
    metavar: str | None = None
    takes: Any = None
    """The type the command line reads instead of the parameter's, for a parameter it cannot spell
    (a mapping, read as ``list[str]`` of ``KEY=VALUE``); the command turns it into the parameter's."""


@dataclass(frozen=True)
class _Parameter:
    annotation: ast.expr
    default: ast.expr | None
    """None: the parameter is required."""
    help: str
    """Its ``Args:`` entry, on one line."""

    @property
    def set_by_gptflow(self) -> bool:
        """Typed ``SkipJsonSchema[...]``: no user gives it (the module docstring says who does)."""
        return (isinstance(self.annotation, ast.Subscript) and isinstance(self.annotation.value, ast.Name)
                and self.annotation.value.id == "SkipJsonSchema")


def add_flow_options(parser: argparse.ArgumentParser, flow: str, options: dict[str, Option],
                     only: Sequence[str] | None = None) -> list[str]:
    """Add an option to ``parser`` for each parameter a user gives to the flow
    ``gptflow.flows.<flow>.<flow>`` (those in ``only``, else all), spelled as ``options`` says;
    return their names, which are also the options' destinations in the parsed arguments."""
    parameters, names = _read_flow(flow)
    chosen = list(only) if only is not None else [name for name, parameter in parameters.items()
                                                  if not parameter.set_by_gptflow]
    flags = {name: options.get(name, Option()).flag or "--" + name.replace("_", "-") for name in chosen}
    for name in chosen:
        parameter, option = parameters[name], options.get(name, Option())
        keywords = _argparse_keywords(name, option.takes or names.evaluate(parameter.annotation))
        repeatable = keywords.get("action") == "append"
        default = None if parameter.default is None else names.evaluate(parameter.default)
        if option.metavar:
            keywords["metavar"] = option.metavar
        # A repeatable option given no times is not refused here: the flow's check says what it needs.
        parser.add_argument(flags[name], dest=name, default=default,
                            required=parameter.default is None and not repeatable,
                            help=_help(parameter.help, flags, default, repeatable), **keywords)
    return chosen


def _help(documented: str, flags: dict[str, str], default: Any, repeatable: bool) -> str:
    """An option's help: its parameter's ``Args:`` entry, parameters named by their flags, then
    whether it repeats and its default (a flag's, off, goes without saying)."""
    text = DOCUMENTED_NAME.sub(lambda quoted: flags.get(quoted[1], f"`{quoted[1]}`"), documented).removesuffix(".")
    if repeatable:
        text += "; repeatable"
    if default is not None and default is not False:  # 0 is a default to show
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


@functools.cache
def _read_flow(flow: str) -> tuple[dict[str, _Parameter], _ModuleNames]:
    """The parameters of the flow ``flow``, each with its ``Args:`` entry, and its module's names."""
    path = Path(__file__).with_name(f"{flow}.py")
    module = ast.parse(path.read_text(), str(path))
    [function] = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == flow]
    documented = _documented_arguments(ast.get_docstring(function) or "")
    arguments = function.args.args
    defaults = [None] * (len(arguments) - len(function.args.defaults)) + function.args.defaults
    missing = [argument.arg for argument in arguments if argument.arg not in documented]
    if missing:
        raise TypeError(f"the {flow} flow's docstring has no Args entry for {', '.join(missing)}")
    parameters = {argument.arg: _Parameter(argument.annotation, default, documented[argument.arg])
                  for argument, default in zip(arguments, defaults)}
    return parameters, _ModuleNames(module)


def _documented_arguments(docstring: str) -> dict[str, str]:
    """A Google-style docstring's ``Args:`` entries, each joined into one line."""
    entries: dict[str, str] = {}
    for line in docstring.partition("\nArgs:\n")[2].splitlines():
        entry = re.fullmatch(r" {4}(\w+): (.*)", line)
        if entry:
            name, text = entry.groups()
            entries[name] = text
        elif line.startswith(" " * 8) and entries:
            entries[name] += " " + line.strip()
        else:  # the section ends
            break
    return entries


def _argparse_keywords(name: str, annotation: Any) -> dict[str, Any]:
    """``type``, ``choices`` or ``action`` for an option of type ``annotation`` (``X | None`` as ``X``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        [annotation] = [member for member in typing.get_args(annotation) if member is not type(None)]
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": "store_true"}
    if annotation is str:
        return {}
    if annotation in (int, float) or (origin is Annotated and arguments[0] in (int, float)):
        return {"type": number_type(annotation)}
    if origin is typing.Literal:
        return {"choices": list(arguments)}
    if origin is list and arguments == (str,):
        return {"action": "append"}
    raise TypeError(f"the command line cannot read {name}: {annotation}; give it an Option with `takes`")


def number_type(annotation: Any) -> Callable[[str], Any]:
    """An argparse ``type`` that reads ``annotation``: ``int`` or ``float``, or either one
    ``Annotated`` with ``Ge`` and ``Gt`` bounds (``PositiveInt``, ...)."""
    kind, *bounds = typing.get_args(annotation) or (annotation,)
    for bound in bounds:
        if not isinstance(bound, (Ge, Gt)):
            raise TypeError(f"the command line checks Ge and Gt bounds only, not {bound!r}")

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        for bound in bounds:
            if isinstance(bound, Ge) and not value >= bound.ge:
                raise argparse.ArgumentTypeError(f"must be >= {bound.ge}, got {text}")
            if isinstance(bound, Gt) and not value > bound.gt:
                raise argparse.ArgumentTypeError(f"must be > {bound.gt}, got {text}")
        return value

    return convert


class _ModuleNames(dict):
    """The names of a flow's module that its signature uses, each looked up on first use: in the
    module it imports the name from, or in the module's own top-level assignment of it. A name of
    neither kind is a builtin (``eval`` looks there once this mapping has no entry)."""

    def __init__(self, module: ast.Module) -> None:
        super().__init__()
        self._imported = {alias.asname or alias.name: (node.module, alias.name)
                          for node in module.body if isinstance(node, ast.ImportFrom) for alias in node.names}
        self._assigned = {node.targets[0].id: node.value for node in module.body
                          if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}

    def __missing__(self, name: str) -> Any:
        if name in self._imported:
            module, attribute = self._imported[name]
            value = getattr(importlib.import_module(module), attribute)
        elif name in self._assigned:
            value = self.evaluate(self._assigned[name])
        else:
            raise KeyError(name)
        self[name] = value
        return value

    def evaluate(self, expression: ast.expr) -> Any:
        """``expression`` (an annotation, a default) as the module would compute it."""
        return eval(ast.unparse(expression), {}, self)  # the package's own source, names resolved as above
