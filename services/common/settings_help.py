"""`--help` for service settings: each setting's flag, type, default, environment variables and description.

A description is `dataclasses.field(metadata={"help": ...})` when given, else the comment lines
directly above the field in its dataclass source, looked up along the MRO so inherited
`ServerSettings` fields are described too. Imported only when `--help` is asked for: reading source
is a cost no service start should pay.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import shutil
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any

PRECEDENCE = ("Each setting is read from its flag, else AIAAS_{SERVICE}_<NAME>, else AIAAS_<NAME>, else its\n"
              "default; flags win. Lists are comma-separated; booleans read 1/0, true/false, yes/no, on/off.")


def field_descriptions(cls: type) -> dict[str, str]:
    """Description of each field of the dataclass `cls` that has one (metadata "help", then comments)."""
    described: dict[str, str] = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for name, text in comments_above_fields(klass).items():
                described.setdefault(name, text)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.metadata.get("help"):
            described[field.name] = str(field.metadata["help"])
    return described


def comments_above_fields(klass: type) -> dict[str, str]:
    """Field name -> the comment lines directly above its annotation in the body of `klass` (no blank line
    between), plus a comment ending the field's own line. Empty when the source cannot be read."""
    try:
        source = inspect.getsource(klass)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    described: dict[str, str] = {}
    pending: list[str] = []
    depth, body_depth, after_class = 0, -1, False
    line_start = True  # the next significant token begins a logical line
    field: str | None = None  # the field whose annotation is on the current logical line
    for index, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            depth += 1
            if after_class and body_depth < 0:
                body_depth = depth
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                pending.append(text)
            elif field is not None and text:
                described[field] = f"{described[field]} {text}" if field in described else text
            continue
        if tok.type == tokenize.NL:
            if not tok.line.strip():  # a blank line parts a comment from what follows
                pending = []
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            pending, field, line_start = [], None, True
            continue
        if line_start:
            line_start = False
            if tok.type == tokenize.NAME and tok.string == "class":
                after_class = True
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            if (depth == body_depth and tok.type == tokenize.NAME and following is not None
                    and following.type == tokenize.OP and following.string == ":"):
                field = tok.string
                if any(pending):
                    described[field] = " ".join(line for line in pending if line)
            pending = []
    return described


class SettingsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of a setting's help (description, then type/default/env) and wraps each
    line on its own, never inside a word: env names and URLs stay whole."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, 110)
        super().__init__(prog, max_help_position=36, width=width)

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for paragraph in text.splitlines():
            lines.extend(textwrap.wrap(paragraph, width, break_long_words=False, break_on_hyphens=False) or [""])
        return lines


def type_label(annotation: Any, kind: type) -> str:
    if kind is not list:
        return kind.__name__
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    element = next((a for a in typing.get_args(annotation) if isinstance(a, type)), str)
    return f"list of {element.__name__}"


def default_label(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list, frozenset, set)):
        return f'"{",".join(str(v) for v in value)}"'
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def setting_help(field: dataclasses.Field[Any], annotation: Any, kind: type, env_names: list[str],
                 description: str | None) -> str:
    """Description, then `type, default ...; env ...`, escaped for argparse's %-formatting."""
    facts = f"{type_label(annotation, kind)}, default {default_label(field)}; env {' or '.join(env_names)}"
    text = f"{description}\n{facts}" if description else facts
    return text.replace("%", "%%")


def help_parser(cls: type, service: str, add_setting: Callable[..., argparse.Action],
                kind_of: Callable[[Any], type], env_names: Callable[[str], list[str]]) -> argparse.ArgumentParser:
    """A parser holding the same flags as `load_settings`, fully described and grouped: the settings
    `cls` declares itself first, then those it inherits, per declaring class."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes when a class has no docstring
        doc = ""
    description = "\n\n".join(part for part in (doc, PRECEDENCE.replace("{SERVICE}", service.upper())) if part)
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=description,
                                     formatter_class=SettingsHelpFormatter)
    hints = typing.get_type_hints(cls)
    described = field_descriptions(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    groups: dict[type, argparse._ArgumentGroup] = {}
    for klass in cls.__mro__:  # the class's own settings first, then each base's
        if any(field.name in inspect.get_annotations(klass) for field in fields):
            title = f"{service} settings" if klass is cls else f"inherited from {klass.__name__}"
            groups[klass] = parser.add_argument_group(title)
    for field in fields:
        owner = next(k for k in groups if field.name in inspect.get_annotations(k))
        kind = kind_of(hints[field.name])
        help_text = setting_help(field, hints[field.name], kind, env_names(field.name), described.get(field.name))
        add_setting(groups[owner], field, kind, help_text)
    return parser
