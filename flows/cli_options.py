"""Command-line options generated from a flow's signature and docstring, so that each parameter is declared once.

The signature is read from the flow module's source rather than by importing it: importing a flow loads Prefect
and TensorFlow, which would make ``anomaly --help`` take seconds. Only the names the signature itself uses
(types, constants, ``default_workspace``) are imported, through the flow module's own import statements.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import datetime as dt
import functools
import importlib
import importlib.util
import inspect
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

NO_DEFAULT = inspect.Parameter.empty
BOUND_WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
ARGS_ENTRY = re.compile(r"(?P<name>\w+)(?:\s*\([^)]*\))?:\s*(?P<text>.*)")


def parse_date(text: str) -> dt.date:
    """Read an ISO date argument, or refuse it with a message argparse prints as a usage error."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2026-11-28") from None


ARGUMENT_READERS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str, dt.date: parse_date}


@dataclass(frozen=True)
class FlowParameter:
    """One parameter of a flow, as its signature and docstring declare it (``default`` is NO_DEFAULT if none)."""

    name: str
    annotation: Any
    default: Any
    doc: str


@dataclass(frozen=True)
class Spelling:
    """How the command line spells a parameter where the rule (``--name-with-dashes``) does not fit.

    A flag whose parameter defaults to True is ``--no-name`` by that rule, storing False.
    """

    flag: str | None = None
    positional: str | None = None


@dataclass(frozen=True)
class FlowCommand:
    """A subcommand that runs a flow: where the flow is defined, and the parameters it spells its own way."""

    module: str
    function: str
    spellings: Mapping[str, Spelling] = field(default_factory=dict)

    def parameters(self) -> tuple[FlowParameter, ...]:
        """Return the flow's parameters, read from its module's source."""
        return read_flow_parameters(self.module, self.function)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Add one argument per flow parameter to ``parser``, its value stored under the parameter's name."""
        parameters = self.parameters()
        stale = sorted(self.spellings.keys() - {p.name for p in parameters})
        if stale:
            raise TypeError(f"{self.module}.{self.function} has no parameter {', '.join(stale)} to spell")
        for parameter in parameters:
            add_option(parser, parameter, self.spellings.get(parameter.name, Spelling()))

    def arguments(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """Return the flow's keyword arguments from the parsed command line."""
        return {p.name: getattr(namespace, p.name) for p in self.parameters()}

    def run(self, namespace: argparse.Namespace) -> Any:
        """Import the flow and call it with the parsed command line."""
        flow = getattr(importlib.import_module(self.module), self.function)
        return flow(**self.arguments(namespace))


def docstring_args(docstring: str) -> dict[str, str]:
    """Return each entry of a Google-style docstring's ``Args:`` section, its continuation lines joined."""
    entries: dict[str, list[str]] = {}
    entry_indent = None
    current: list[str] | None = None
    in_args = False
    for line in inspect.cleandoc(docstring).splitlines():
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if not in_args:
            in_args = text == "Args:"
            continue
        if not text:
            continue
        if indent == 0:
            break
        if entry_indent is None:
            entry_indent = indent
        match = ARGS_ENTRY.fullmatch(text)
        if indent == entry_indent and match:
            current = entries.setdefault(match["name"], [])
            current.append(match["text"])
        elif current is not None:
            current.append(text)
    return {name: " ".join(lines) for name, lines in entries.items()}


class _SourceNames:
    """The names a module's source binds at its top level (imports, assignments), resolved without running it."""

    def __init__(self, module: str, tree: ast.Module):
        self.module = module
        self._resolvers: dict[str, Callable[[], Any]] = {}
        self._values: dict[str, Any] = {}
        package = module.rpartition(".")[0]
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to ``a.b``.
                    bound = alias.asname or alias.name.partition(".")[0]
                    bound_module = alias.name if alias.asname else bound
                    self._resolvers[bound] = functools.partial(_import_bound, alias.name, bound_module)
            elif isinstance(node, ast.ImportFrom):
                source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                for alias in node.names:
                    self._resolvers[alias.asname or alias.name] = functools.partial(_import_name, source, alias.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self._resolvers[target.id] = functools.partial(self.evaluate, node.value)

    def value(self, name: str) -> Any:
        """Return what ``name`` is bound to at the module's top level."""
        if name not in self._values:
            if name not in self._resolvers:
                raise NameError(f"{self.module} neither imports nor assigns {name!r} at its top level")
            self._values[name] = self._resolvers[name]()
        return self._values[name]

    def evaluate(self, expression: ast.expr) -> Any:
        """Evaluate an expression of the module's source, importing only the names it uses."""
        used = {node.id for node in ast.walk(expression) if isinstance(node, ast.Name)}
        # A builtin the module does not rebind is left to eval; any other unknown name fails in value().
        looked_up = [name for name in sorted(used) if name in self._resolvers or name not in vars(builtins)]
        scope = {name: self.value(name) for name in looked_up}
        return eval(compile(ast.Expression(expression), f"<{self.module}>", "eval"), scope)


def _import_bound(module: str, bound_module: str) -> Any:
    importlib.import_module(module)
    return importlib.import_module(bound_module)


def _import_name(module: str, name: str) -> Any:
    imported = importlib.import_module(module)
    try:
        return getattr(imported, name)
    except AttributeError:
        return importlib.import_module(f"{module}.{name}")


@functools.cache
def read_flow_parameters(module: str, function: str) -> tuple[FlowParameter, ...]:
    """Return the parameters of ``module.function`` from the module's source, in the signature's order."""
    spec = importlib.util.find_spec(module)
    source = spec.loader.get_source(module) if spec and spec.loader else None
    if source is None:
        raise ImportError(f"no source of {module} to read {function}'s parameters from")
    tree = ast.parse(source)
    definitions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function]
    if not definitions:
        raise LookupError(f"{module} defines no function {function}")
    definition = definitions[-1]
    signature = definition.args
    if signature.vararg or signature.kwarg:
        raise TypeError(f"{module}.{function}: a command line cannot pass *args or **kwargs")
    names = _SourceNames(module, tree)
    docs = docstring_args(ast.get_docstring(definition) or "")
    positional = [*signature.posonlyargs, *signature.args]
    defaults = [None] * (len(positional) - len(signature.defaults)) + list(signature.defaults)
    parameters = []
    declared = [*zip(positional, defaults, strict=True), *zip(signature.kwonlyargs, signature.kw_defaults, strict=True)]
    for argument, default in declared:
        if argument.annotation is None:
            raise TypeError(f"{module}.{function}: parameter {argument.arg} has no type annotation")
        parameters.append(
            FlowParameter(
                name=argument.arg,
                annotation=names.evaluate(argument.annotation),
                default=NO_DEFAULT if default is None else names.evaluate(default),
                doc=docs.get(argument.arg, ""),
            )
        )
    return tuple(parameters)


def value_type(annotation: Any) -> Any:
    """Return the type a value must have, without ``Annotated``'s metadata or an optional's ``None``."""
    return _unwrapped(annotation)[0]


def value_range(annotation: Any) -> str | None:
    """Describe the bounds (``Field(ge=..., lt=...)``) an annotation puts on a number, e.g. ``1 to 3660``."""
    bounds: dict[str, Any] = {}
    for item in _unwrapped(annotation)[1]:
        # Pydantic's Field keeps its bounds as annotated_types constraints in its own metadata.
        for constraint in [item, *getattr(item, "metadata", ())]:
            bounds.update({key: getattr(constraint, key) for key in BOUND_WORDS if hasattr(constraint, key)})
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']} to {bounds['le']}"
    return ", ".join(f"{BOUND_WORDS[key]} {bounds[key]}" for key in BOUND_WORDS if key in bounds) or None


def _unwrapped(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extras = get_args(annotation)
            metadata.extend(extras)
        elif origin in (Union, types.UnionType):
            members = [member for member in get_args(annotation) if member is not type(None)]
            if len(members) != 1:
                raise TypeError(f"a command line cannot tell which of {members} a value is")
            annotation = members[0]
        else:
            return annotation, metadata


def _reader(kind: Any, parameter: str) -> tuple[Callable[[str], Any], tuple[Any, ...] | None]:
    """Return the function that reads one command-line value of ``kind``, and the choices a Literal allows."""
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return type(choices[0]), choices
    if kind not in ARGUMENT_READERS:
        raise TypeError(f"parameter {parameter}: a command line cannot read a {kind!r}")
    return ARGUMENT_READERS[kind], None


class _AppendReplacingDefault(argparse.Action):
    """Collect a repeatable option's values; the first use replaces the default list instead of extending it."""

    def __call__(self, parser, namespace, values, option_string=None):
        collected = getattr(namespace, self.dest, None)
        earlier = [] if collected is None or collected is self.default else list(collected)
        setattr(namespace, self.dest, [*earlier, values])


class _ValuesOrDefault(argparse.Action):
    """Store a positional list's values, or its default when none are given (argparse would store ``[]``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.default if values == [] else values)


def _shown(default: Any) -> str:
    return ", ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)


def _help(doc: str, note: str | None) -> str:
    text = doc.rstrip(".")
    if note:
        text = f"{text} ({note})" if text else note
    # argparse formats help with %, so a docstring's "2%" would break --help.
    return text.replace("%", "%%")


def add_option(parser: argparse.ArgumentParser, parameter: FlowParameter, spelling: Spelling) -> None:
    """Add the argument of one flow parameter: its type, choices and default from the signature, help from the docs."""
    kind = value_type(parameter.annotation)
    required = parameter.default is NO_DEFAULT
    default = None if required else parameter.default
    dashed = parameter.name.replace("_", "-")
    if kind is bool:
        if not isinstance(default, bool):
            raise TypeError(f"parameter {parameter.name}: a flag needs a default of True or False")
        flag = spelling.flag or (f"--no-{dashed}" if default else f"--{dashed}")
        action = "store_false" if default else "store_true"
        note = "on unless this flag is given" if default else None
        parser.add_argument(flag, dest=parameter.name, action=action, default=default, help=_help(parameter.doc, note))
        return
    element = value_type(get_args(kind)[0]) if get_origin(kind) is list else None
    read, choices = _reader(kind if element is None else element, parameter.name)
    if spelling.positional:
        nargs = "*" if element is not None else (None if required else "?")
        parser.add_argument(
            parameter.name,
            metavar=spelling.positional,
            nargs=nargs,
            type=read,
            choices=choices,
            default=default,
            action=_ValuesOrDefault,
            help=_help(parameter.doc, None if default is None else f"default: {_shown(default)}"),
        )
        return
    flag = spelling.flag or f"--{dashed}"
    notes = ["repeat for several" if element is not None else value_range(parameter.annotation)]
    notes.append("required" if required else None if default is None else f"default: {_shown(default)}")
    parser.add_argument(
        flag,
        dest=parameter.name,
        # argparse shows a choice option's choices in place of its metavar.
        metavar=None if choices else flag.removeprefix("--").replace("-", "_").upper(),
        type=read,
        choices=choices,
        default=default,
        required=required,
        action=_AppendReplacingDefault if element is not None else "store",
        help=_help(parameter.doc, "; ".join(note for note in notes if note) or None),
    )
