"""The reference pages of the site, read from the code: config keys, command-line options, modules.

Nothing here is written by hand about a key or an option: the config keys come from the pydantic models of
:mod:`polypure.config.settings` (walked recursively, each key's description being its ``Field(description=...)``
or the docstring written under it), the command-line options from the parser that ``polypure.cli`` builds, the
modules from the files under ``src/polypure``. ``gen_pages.py`` renders them at build time, and
``tests/test_docs_reference.py`` uses the same walks to fail on a key or an option without a description.

This module imports no MkDocs package, so that the test can load it.
"""

from __future__ import annotations

import argparse
import ast
import html
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

#: The package's source folder, whose modules get an API page.
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / "polypure"

# ---------------------------------------------------------------------------------------------------
# config keys


@dataclass(frozen=True)
class ConfigKey:
    """One key of a config.

    Attributes
    ----------
    key : str
        Its dotted path: ``relevance.n_refs``; ``[]`` stands for any item of a list
        (``relevance.targets[].layer``) and ``<name>`` for any key of a mapping (``model.layers.<name>.module``).
    group : str
        The path of the mapping it belongs to (``relevance``; empty at the top level).
    type : str
        Its type in YAML terms (``int ≥ 1``, ``str | null``, ``max | mean | cls``).
    default : str
        Its default as YAML, or ``required``.
    description : str
        What it means; empty where the code gives none.
    model : type
        The pydantic model that declares it.
    """

    key: str
    group: str
    type: str
    default: str
    description: str
    model: type


@dataclass(frozen=True)
class ConfigGroup:
    """A mapping of keys: a config section, or one of the mappings inside one.

    Attributes
    ----------
    path : str
        Dotted path, as :attr:`ConfigKey.key` (empty for the top level).
    model : type
        The pydantic model that validates it.
    summary : str
        The model's docstring.
    key : str
        The key whose value it is (``relevance.targets`` for ``relevance.targets[]``); empty for the top level
        and for mappings that no key of the models declares (``evaluate.<name>``).
    """

    path: str
    model: type
    summary: str
    key: str = ""


def _sections(annotation: Any, container: str = "") -> list[tuple[type[BaseModel], str]]:
    """The pydantic models inside an annotation, each with how it is held: ``""``, ``"[]"`` or ``".<name>"``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, container)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sections(args[0], container)
    if origin in (list, tuple, set, frozenset):
        inner = "[]"
    elif origin is dict:
        args, inner = args[1:], ".<name>"
    else:
        inner = ""
    found: list[tuple[type[BaseModel], str]] = []
    for arg in args:
        for model, how in _sections(arg, container + inner):
            if model not in [m for m, _ in found]:
                found.append((model, how))
    # a model given both as itself and as a list of itself (relevance.planted) is documented as itself
    return sorted(found, key=lambda item: len(item[1]))


def _constraints(metadata: list) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for item in metadata:
        for name, sign in signs.items():
            value = getattr(item, name, None)
            if value is not None:
                out.append(f"{sign} {value}")
        # Field(ge=...) inside Annotated[...] carries its bounds as metadata of its own
        if isinstance(item, FieldInfo):
            inner = _constraints(item.metadata)
            if inner:
                out.append(inner)
    return ", ".join(out)


def type_text(annotation: Any, metadata: list | None = None) -> str:
    """An annotation in YAML terms: ``int ≥ 1``, ``str | null``, ``list[str]``, ``mapping``, ``max | mean``.

    Parameters
    ----------
    annotation : type or typing construct
        The field's annotation.
    metadata : list, optional
        The field's constraints (pydantic's ``FieldInfo.metadata``).
    """
    text = _type_text(annotation)
    bounds = _constraints(metadata or [])
    return f"{text} {bounds}" if bounds else text


def _type_text(annotation: Any) -> str:
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        if issubclass(annotation, Path):
            return "path"
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin is typing.Annotated:
        return type_text(args[0], list(args[1:]))
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(arg) for arg in args]
        # null last, as the descriptions read
        return " | ".join(sorted(dict.fromkeys(parts), key=lambda part: part == "null"))
    if origin in (list, set, frozenset):
        return f"list[{_type_text(args[0])}]" if args else "list"
    if origin is tuple:
        return "[" + ", ".join(_type_text(arg) for arg in args) + "]"
    if origin is dict:
        if not args or args[1] is Any:
            return "mapping"
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    return str(annotation).replace("typing.", "")


def yaml_text(value: Any) -> str:
    """A default value as it would be written in a config file (``null``, ``[block_3]``, ``max``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_unset=True)
    elif isinstance(value, (list, tuple)):
        value = [v.model_dump(mode="json", exclude_unset=True) if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()


@cache
def attribute_docstrings(model: type) -> dict[str, str]:
    """The docstrings written under a class's own annotated attributes, by attribute name.

    Pydantic keeps them only when a model is configured with ``use_attribute_docstrings``; they are read from
    the source here, as documentation tools read them.
    """
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    out = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            out[statement.target.id] = inspect.cleandoc(following.value.value)
    return out


def field_description(model: type[BaseModel], name: str) -> str:
    """A field's description: ``Field(description=...)``, else the docstring under it (in the class declaring it)."""
    field = model.model_fields[name]
    if field.description:
        return inspect.cleandoc(field.description)
    for klass in model.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return attribute_docstrings(klass).get(name, "")
    return ""


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    return yaml_text(value)


def _summary(model: type) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def walk_model(model: type[BaseModel], prefix: str = "", key: str = "") -> tuple[list[ConfigGroup], list[ConfigKey]]:
    """Every key of a pydantic model and of the models inside it, depth first in declaration order.

    Parameters
    ----------
    model : pydantic model class
        The mapping to walk (:class:`polypure.config.settings.Config` for a whole config).
    prefix : str
        The path of ``model`` inside the config (empty at the top).
    key : str
        The key whose value ``model`` validates (see :attr:`ConfigGroup.key`).

    Returns
    -------
    groups : list of ConfigGroup
        ``model`` itself, then every mapping found inside it.
    keys : list of ConfigKey
        Every key of every group, a group's keys in declaration order.
    """
    groups = [ConfigGroup(prefix, model, _summary(model), key)]
    keys: list[ConfigKey] = []
    nested: list[tuple[list[ConfigGroup], list[ConfigKey]]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        keys.append(ConfigKey(path, prefix, type_text(field.annotation, field.metadata), _default_text(field),
                              field_description(model, name), model))
        for inner, how in _sections(field.annotation):
            nested.append(walk_model(inner, path + how, path))
    for inner_groups, inner_keys in nested:
        groups += inner_groups
        keys += inner_keys
    return groups, keys


def _extra_models() -> list[tuple[str, type[BaseModel]]]:
    """Mappings of a config that are validated outside :class:`~polypure.config.settings.Config`.

    ``data.synthetic`` is read by the synthetic data kind, and ``evaluate.<name>`` by the evaluator of that
    name: the common settings of every evaluator, then those of each built-in one. Plugins document their own.
    """
    from polypure.data.synthetic import SyntheticSpec
    from polypure.evaluation.evaluators import EVALUATORS, EvaluatorSettings

    out = [("data.synthetic", SyntheticSpec), ("evaluate.<name>", EvaluatorSettings)]
    for name in EVALUATORS.names():
        try:
            evaluator = EVALUATORS.get(name)
        except Exception:  # a broken plugin is no built-in
            continue
        settings = getattr(evaluator, "Settings", None)
        if (evaluator.__module__.startswith("polypure.") and isinstance(settings, type)
                and issubclass(settings, EvaluatorSettings) and settings is not EvaluatorSettings):
            out.append((f"evaluate.{name}", settings))
    return out


def config_reference() -> tuple[list[ConfigGroup], list[ConfigKey]]:
    """Every config key: those of :class:`polypure.config.settings.Config`, then ``data.synthetic`` and the evaluators'.

    An evaluator's own settings are listed without the common ones it inherits (``evaluate.<name>.*``).

    Returns
    -------
    groups : list of ConfigGroup
    keys : list of ConfigKey
    """
    from polypure.config.settings import Config

    groups, keys = walk_model(Config)
    for path, model in _extra_models():
        inner_groups, inner_keys = walk_model(model, path, path if any(k.key == path for k in keys) else "")
        if path.startswith("evaluate.") and path != "evaluate.<name>":
            from polypure.evaluation.evaluators import EvaluatorSettings

            inner_keys = [k for k in inner_keys if k.key.rpartition(".")[2] not in EvaluatorSettings.model_fields]
        # each extra mapping goes right after the group that holds it
        parent = path.rpartition(".")[0]
        at = max(i for i, g in enumerate(groups) if g.path == parent or g.path.startswith(parent + ".")) + 1
        groups[at:at] = inner_groups
        at_key = max((i for i, k in enumerate(keys) if k.key.startswith(parent + ".")), default=len(keys) - 1) + 1
        keys[at_key:at_key] = inner_keys
    return groups, keys


def anchor(key: str) -> str:
    """The id of a key's heading: its path without ``[]`` and ``<>`` (``relevance.targets.layer``)."""
    return re.sub(r"[^\w.-]+", "", key)


def render_config_page() -> str:
    """The Markdown of the config keys page: an index table, then every key under its section.

    A key that holds a mapping (``relevance.targets``) is followed by the keys of that mapping, one heading
    level down; mappings that no key holds (``evaluate.<name>``, ``evaluate.clip``) follow the keys of the
    section they belong to.
    """
    groups, keys = config_reference()
    keys_of: dict[str, list[ConfigKey]] = {}
    for key in keys:
        keys_of.setdefault(key.group, []).append(key)
    loose = [g for g in groups if g.path and not g.key]
    lines = [
        "# Config keys",
        "",
        "Every key a config file can set, read from the code (the pydantic models of "
        "`polypure.config.settings`, the synthetic data kind's options and the built-in evaluators' "
        "settings) when this site was built. Paths are relative to the working directory, and unknown keys "
        "are errors. Any key can be overridden on the command line with `--set KEY=VALUE`, the value read as "
        "YAML: `--set relevance.neurons=[1,2]`.",
        "",
        "In a path, `[]` stands for any item of a list (`relevance.targets[].layer`) and `<name>` for any key "
        "of a mapping (`model.layers.<name>.module`, `evaluate.<name>.view`).",
        "",
        "| key | type | default |",
        "|---|---|---|",
    ]
    lines += [f"| [`{k.key}`](#{anchor(k.key)}) | {_cell(k.type)} | {_cell(k.default)} |" for k in keys]
    lines.append("")

    def emit_key(key: ConfigKey, level: int) -> None:
        lines.extend([
            f"{'#' * min(level, 6)} `{key.key}` {{ #{anchor(key.key)} }}",
            "",
            f"**Type** `{key.type}` · **Default** `{key.default}`",
            "",
            docstring_markdown(key.description) if key.description else "*No description.*",
            "",
        ])
        for group in groups:
            if group.key == key.key:
                if group.summary and group.summary != key.description and level > 2:
                    each = {"[]": "Each item: ", ".<name>": "Each value: "}.get(group.path[len(key.key):], "")
                    summary = docstring_markdown(group.summary)
                    lines.extend([each + (summary[:1].lower() + summary[1:] if each else summary), ""])
                for inner in keys_of.get(group.path, []):
                    emit_key(inner, level + 1)
        for group in loose:
            if group.path.rpartition(".")[0] == key.key:
                emit_group(group, level + 1)

    def emit_group(group: ConfigGroup, level: int) -> None:
        lines.extend([f"{'#' * min(level, 6)} `{group.path}` {{ #{anchor(group.path)} }}", ""])
        if group.summary:
            lines.extend([docstring_markdown(group.summary), ""])
        for inner in keys_of.get(group.path, []):
            emit_key(inner, level + 1)

    top = keys_of.get("", [])
    sections = {g.key for g in groups}
    lines.extend(["## Top level", ""])
    for key in top:
        if key.key not in sections:
            emit_key(key, 3)
    for key in top:
        if key.key in sections:
            emit_key(key, 2)
    return "\n".join(lines)


def _cell(text: str) -> str:
    # Python-Markdown's tables do not split a cell at a pipe inside a code span
    return f"`{text}`"


def docstring_markdown(text: str) -> str:
    """Docstring text (reStructuredText inline markup) as Markdown: ``code`` spans and roles become code spans."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text


# ---------------------------------------------------------------------------------------------------
# command line


@dataclass(frozen=True)
class CliArgument:
    """One argument of a command.

    Attributes
    ----------
    names : tuple of str
        Its option strings (``-q``, ``--quiet``), or its name for a positional argument.
    metavar : str
        What its value looks like (``KEY=VALUE``, ``{csv,parquet}``); empty for a flag.
    default : str
        Its default, empty where there is none to show.
    help : str
        Its help text; empty where the code gives none.
    positional : bool
    """

    names: tuple[str, ...]
    metavar: str
    default: str
    help: str
    positional: bool


@dataclass(frozen=True)
class CliCommand:
    """One command of the ``polypure`` program (the program itself has an empty name).

    Attributes
    ----------
    name : str
    help : str
        Its line in the program's list of commands.
    description : str
        What its own ``--help`` says first.
    usage : str
        Its usage line.
    arguments : tuple of CliArgument
    """

    name: str
    help: str
    description: str
    usage: str
    arguments: tuple[CliArgument, ...]


def _usage(parser: argparse.ArgumentParser) -> str:
    # a fixed width, so that the page does not depend on the terminal that built it
    formatter = argparse.HelpFormatter(prog=parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument(action: argparse.Action) -> CliArgument:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    elif action.nargs == 0:
        metavar = ""
    else:
        metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    default = action.default
    shown = "" if default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0 else str(default)
    names = tuple(action.option_strings) or (action.metavar or action.dest,)
    return CliArgument(names, str(metavar), shown, action.help or "", not action.option_strings)


def cli_reference(parser: argparse.ArgumentParser | None = None) -> list[CliCommand]:
    """The program and each of its commands, in the order ``polypure --help`` lists them.

    Parameters
    ----------
    parser : argparse.ArgumentParser, optional
        Default: the one :func:`polypure.cli.build_parser` builds.
    """
    if parser is None:
        from polypure.cli import build_parser

        parser = build_parser()
    commands = []
    sub_actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    own = tuple(_argument(a) for a in parser._actions
                if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)))
    commands.append(CliCommand("", "", parser.description or "", _usage(parser), own))
    for sub in sub_actions:
        helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
        for name, subparser in sub.choices.items():
            arguments = tuple(_argument(a) for a in subparser._actions if not isinstance(a, argparse._HelpAction))
            commands.append(CliCommand(name, helps.get(name, ""), subparser.description or "", _usage(subparser),
                                       arguments))
    return commands


def _text(text: str) -> str:
    """Plain help text made safe for Markdown: no tags, emphasis or table cells out of it."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def render_cli_page() -> str:
    """The Markdown of the command-line page."""
    commands = cli_reference()
    program, subcommands = commands[0], commands[1:]
    lines = [
        "# Command line",
        "",
        "Every command of `polypure` and its options, read from the program's argument parser "
        "(`polypure.cli.build_parser`) when this site was built; `polypure COMMAND --help` prints the same.",
        "",
        "Exit status: 0 success, 1 runtime failure, 2 bad input (a usage or config error, or a file, store, model "
        "or plugin that cannot be used as given; one line names the problem).",
        "",
        "```text",
        program.usage,
        "```",
        "",
        _text(program.description),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| [`{c.name}`](#{c.name}) | {_text(c.help)} |" for c in subcommands]
    lines += ["", "Options of the program itself:", ""] + _argument_table(program.arguments) + [""]
    for command in subcommands:
        lines += [
            f"## `polypure {command.name}` {{ #{command.name} }}",
            "",
            "```text",
            command.usage,
            "```",
            "",
            _text(command.description),
            "",
        ]
        lines += _argument_table(command.arguments) + [""]
    return "\n".join(lines)


def _argument_table(arguments: tuple[CliArgument, ...]) -> list[str]:
    lines = ["| argument | value | default | meaning |", "|---|---|---|---|"]
    for arg in arguments:
        names = ", ".join(f"`{name}`" for name in arg.names)
        value = f"`{arg.metavar}`" if arg.metavar and not arg.positional else ""
        default = f"`{arg.default}`" if arg.default else ""
        lines.append(f"| {names} | {value} | {default} | {_text(arg.help)} |")
    return lines


# ---------------------------------------------------------------------------------------------------
# modules


@dataclass(frozen=True)
class ModuleEntry:
    """A module of the package, found on disk.

    Attributes
    ----------
    name : str
        Its dotted name (``polypure.store.results``).
    path : Path
        Its file.
    summary : str
        The first line of its docstring, empty where it has none.
    package : bool
        Whether it is a package (an ``__init__.py``).
    """

    name: str
    path: Path
    summary: str
    package: bool


def modules(package_dir: Path = PACKAGE_DIR) -> list[ModuleEntry]:
    """Every public module under ``package_dir``, packages before their modules, in name order.

    Found on disk, not from a list, so that a module added or moved gets its page without touching the docs.
    Modules whose name starts with ``_`` (``__main__``, private helpers) are left out, as are folders without
    an ``__init__.py``.
    """
    out = []
    root = package_dir.parent
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        if not all((root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        summary = docstring.strip().splitlines()[0] if docstring.strip() else ""
        out.append(ModuleEntry(".".join(parts), path, summary, package))
    return sorted(out, key=lambda m: m.name.split("."))
