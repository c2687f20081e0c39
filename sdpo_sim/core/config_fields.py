"""Settings dataclasses as the single source of their help: command-line flags, ``--set KEY=VALUE`` and docs tables.

Every field of a settings dataclass (``MethodConfig``, ``RunConfig``, the recipe sections) carries its help text in
its metadata, declared with :func:`setting` (``alpha: float = setting(1.0, "divergence index ...")``, which is
``field(default=1.0, metadata={"help": ..., "choices": ...})``). From that one place:

- :func:`add_field_flags` declares one flag per field (``task_seed`` → ``--task-seed``; with ``prefix="training"``,
  ``max_new_tokens`` → ``--training.max-new-tokens``), with its help line, allowed values and default;
- :func:`add_set_flag` declares ``--set KEY=VALUE`` (a YAML value, repeatable), the other way to reach the same fields;
- :func:`merge_overrides` joins the two and refuses a key given twice;
- :func:`field_table` writes the markdown table of the docs (``docs/render_fields.py``).

Pure dataclasses, argparse and YAML: nothing here knows the toy world or the LLM path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import yaml

HELP, CHOICES = "help", "choices"  # the metadata keys


class YamlLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-5`` as a float: YAML 1.1 (PyYAML) wants a dot (``1.0e-5``)
    and would hand over the string ``'1e-5'``."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`YamlLoader` (safe: no Python tags)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 — a SafeLoader subclass


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Optional[Sequence] = None,
            factory: Optional[Callable[[], Any]] = None) -> Any:
    """A settings field with its help (and allowed values): ``field(default=..., metadata={"help": ..., "choices": ...})``.
    ``factory`` instead of ``default`` for mutable defaults (lists, nested configs)."""
    metadata = {HELP: help, **({CHOICES: tuple(choices)} if choices is not None else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ----- reading a dataclass's fields -----
def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise ValueError(f"{cls.__name__} has no field {name!r}; its fields: {', '.join(f.name for f in dataclasses.fields(cls))}")


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` (``metadata={"help": ...}``); refuses a field without one."""
    text = _field(cls, name).metadata.get(HELP)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{cls.__name__}.{name} has no help: give it field(..., metadata={{'help': '...'}})")
    return text


def field_choices(cls: type, name: str) -> Optional[tuple]:
    """The allowed values of field ``name`` (``metadata={"choices": ...}``), or ``None`` where any value of its type goes."""
    choices = _field(cls, name).metadata.get(CHOICES)
    return None if choices is None else tuple(choices)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (``default_factory`` called); ``dataclasses.MISSING`` when it has none."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _hint(cls: type, name: str) -> tuple[Any, bool]:
    """``(type, optional)`` of a field: ``Optional[float]`` → ``(float, True)``."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, False


def config_class(cls: type, name: str) -> Optional[type]:
    """The settings dataclass field ``name`` holds (``ModelConfig.lora`` → ``LoraConfig``), or ``None`` for a plain value."""
    kind, _ = _hint(cls, name)
    return kind if dataclasses.is_dataclass(kind) else None


def show(value: Any) -> str:
    """A value as a user writes it on a command line or in YAML: ``null``, ``true``, ``0.5``, ``[0.9, 0.999]``, ``sdpo``."""
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, str):
        return value if value.isprintable() and value.strip() == value and value else repr(value)
    if dataclasses.is_dataclass(value):
        return type(value).__name__ + "()"
    return str(value)


# ----- flags -----
def flag_name(key: str) -> str:
    """``task_seed`` → ``--task-seed``; ``training.max_new_tokens`` → ``--training.max-new-tokens``."""
    return "--" + key.replace("_", "-")


def _dest(key: str) -> str:
    """An attribute name for a key: ``training.max_new_tokens`` → ``training__max_new_tokens``."""
    return key.replace(".", "__")


def _yaml_value(text: str) -> Any:
    """argparse type of a field whose value is YAML (a list, a mapping, ``auto``/``true``/``false``)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({str(err).splitlines()[0]})") from None


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type of an ``Optional`` field: ``none``/``null`` → ``None``, anything else through ``kind``."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def add_field_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: Iterable[str] = (),
                    rename: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Declare one flag per field of dataclass ``cls`` on ``parser``; returns ``{dest: key}`` for :func:`given_fields`.

    The key is the field's name, under ``prefix`` (``prefix="training"``: ``training.steps``); ``rename`` gives a field
    another key (the toy world's flat ``method`` for ``MethodConfig.name``). Each flag's help line is the field's help
    with its default; its metavar is the allowed values (``metadata["choices"]``) or the type. Types come from the
    annotation: ``int``/``float``/``str``; ``Optional[x]`` also takes ``none``/``null``; ``bool`` is ``--x``/``--no-x``;
    anything else (lists, mappings, ``auto``/``true``/``false``) is YAML (``--training.adam-betas "[0.9, 0.99]"``).
    A field holding a settings dataclass gets flags for its own fields (``--model.lora.r``), and, when it may be
    ``None``, one flag for the whole block too (``--model.lora "{r: 8}"`` or ``--model.lora null``).
    Defaults are ``argparse.SUPPRESS``: only the flags given reach the namespace, so defaults live in the dataclass.
    Values are checked by the dataclass's own validation, not by argparse (one message for every way in).
    """
    rename, dests = dict(rename or {}), {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = ".".join(filter(None, (prefix, rename.get(f.name, f.name))))
        kind, optional = _hint(cls, f.name)
        inner = config_class(cls, f.name)
        if inner is not None and not optional:
            dests.update(add_field_flags(parser, inner, prefix=key))
            continue
        choices = field_choices(cls, f.name)
        default = field_default(f)
        text = field_help(cls, f.name) + f" (default: {show(default)})"
        kw: dict[str, Any] = {"dest": _dest(key), "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if kind is bool and not optional:
            parser.add_argument(flag_name(key), action=argparse.BooleanOptionalAction, **kw)
        else:
            parse = kind if kind in _METAVARS else _yaml_value
            names = [show(c) for c in choices] if choices else [_METAVARS.get(kind, "YAML")]
            parser.add_argument(flag_name(key), type=_or_none(parse) if optional else parse,
                                metavar="|".join(names + (["null"] if optional else [])), **kw)
        dests[_dest(key)] = key
        if inner is not None:
            dests.update(add_field_flags(parser, inner, prefix=key))
    return dests


def given_fields(args: argparse.Namespace, dests: Mapping[str, str]) -> dict[str, Any]:
    """``{key: value}`` of the field flags given on the command line (``dests`` from :func:`add_field_flags`)."""
    return {key: getattr(args, dest) for dest, key in dests.items() if hasattr(args, dest)}


# ----- --set KEY=VALUE -----
def parse_override(text: str, key_form: str = "section.field") -> tuple[str, Any]:
    """``"training.steps=5"`` → ``("training.steps", 5)``; the value is parsed as YAML (safe; ``1e-5`` is a float).
    ``key_form`` is how the message spells a key (``section.field`` for a recipe, ``field`` for a toy run)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r} must look like {key_form}=value")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0]
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({reason}); quote strings, e.g. key='a: b'") from None


def add_set_flag(parser: argparse.ArgumentParser, *, key_form: str = "section.field", example: str = "training.steps=3") -> None:
    """Declare ``--set KEY=VALUE`` (repeatable; ``args.set`` is a list of ``(key, value)`` pairs, the value YAML).
    A malformed one (no ``=``, no key, bad YAML) is a usage error: one line, exit 2."""
    def parse(text: str) -> tuple[str, Any]:
        try:
            return parse_override(text, key_form)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parser.add_argument("--set", action="append", default=[], type=parse, metavar=f"{key_form.upper()}=VALUE",
                        help=f"set any field by its key, the value as YAML (repeatable), e.g. --set {example}; the same as "
                             f"the field's own flag ({flag_name(example.partition('=')[0])} ...), and a key may be given once")


def merge_overrides(flags: Mapping[str, Any], pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """The fields given by their flags (``{key: value}``) and by ``--set`` pairs, as one ``{key: value}``; a key given
    twice (a flag and ``--set``, or two ``--set``) is refused rather than one of them silently winning."""
    merged = dict(flags)
    for key, value in pairs:
        if key in merged:
            how = f"by {flag_name(key)} and by --set {key}=..." if key in flags else f"twice by --set {key}=..."
            raise ValueError(f"{key} is given {how}; give each field once")
        merged[key] = value
    return merged


# ----- docs -----
def _type_name(cls: type, name: str) -> str:
    choices = field_choices(cls, name)
    if choices:
        return " \\| ".join(f"`{show(c)}`" for c in choices)
    kind, optional = _hint(cls, name)
    base = getattr(kind, "__name__", str(kind))
    return base + (" or null" if optional else "")


def field_table(cls: type) -> str:
    """The markdown table ``| field | type | default | help |`` of dataclass ``cls``, one row per field, from the
    fields' metadata (what ``docs/render_fields.py`` writes into the docs)."""
    rows = ["| field | type | default | help |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = show(field_default(f)).replace("|", "\\|")
        help_ = field_help(cls, f.name).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_type_name(cls, f.name)} | `{default}` | {help_} |")
    return "\n".join(rows) + "\n"
