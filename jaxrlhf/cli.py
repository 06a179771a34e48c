"""Command lines generated from one typed config dataclass per entry point.

An entry point declares its settings once::

    @dataclass
    class SFTConfig:
        pretrain: str = arg(None, "HF model directory or converted checkpoint to start from")
        learning_rate: float = arg(5e-6, "peak learning rate")
        bf16: bool = arg(False, "compute in bfloat16 (master weights stay fp32)")
        prompt_data: list[str] = arg([], "datasets, comma- or space-separated")

    cfg = parse_config(SFTConfig)            # reads sys.argv[1:]

and gets ``--pretrain``, ``--learning_rate``, ... (OpenRLHF's spelling: the field name, underscores kept), with the
field's help text, plus ``--config path.yaml``.

Rules
- Precedence: command line > YAML file (``--config``) > dataclass defaults. A field without a default is required
  (from either the command line or the YAML file).
- Types: ``int``, ``float``, ``str``, ``bool``, ``Optional[X]``, ``Literal[...]`` (becomes argparse ``choices``),
  ``list[X]`` and ``tuple[X, ...]`` for X in int/float/str.
- Lists: both ``--xs a,b,c`` and ``--xs a b c`` work (and mix: every token is split on commas, empty pieces dropped).
  ``--xs ""`` gives an empty list. Repeating the flag appends. In YAML a list field takes a YAML list or a
  comma-separated string.
- Booleans: ``--flag`` sets True (OpenRLHF's store_true), ``--flag false`` / ``--flag true`` set it explicitly
  (accepted spellings: true/false, yes/no, on/off, 1/0), and a field whose default is True also gets ``--no_flag``.
- ``Optional[X]``: the words ``none`` / ``null`` (any case) give None. A field whose default is None
  (``name: str = arg(None, ...)``) counts as Optional.
- Unknown keys (command line or YAML) are errors that name the key and suggest the closest field (difflib). A
  ``--config`` file that is missing, not UTF-8 (the line is named), not YAML or not a mapping is an error too.
  Prefix abbreviations (``--learning`` for ``--learning_rate``) are refused: they break silently when a field is added.
- Errors (bad values, unknown keys, a ``ValueError`` raised by the config's ``__post_init__``) are printed argparse
  style (``prog: error: ...``) and exit with code 2, no traceback.
- Other spellings, declared by the config class as data (an entry point's own table, e.g. OpenRLHF 0.11's dotted
  names for PPO)::

      ALIASES: ClassVar[dict] = {"actor.policy_loss_type": "policy_loss_type",          # same value
                                 "ds.param_dtype": ("bf16", {"bf16": "true", "fp32": "false"})}  # value mapped
      IGNORED: ClassVar[dict] = {"zero_stage": "ZeRO sharding is the mesh's fsdp axis"}  # accepted, one notice

  An alias works on the command line (``--actor.policy_loss_type gspo``, listed on its field's ``--help`` line) and
  in YAML (``actor.policy_loss_type: gspo`` or nested ``actor: {policy_loss_type: gspo}``). An ignored flag takes
  an optional value and is reported in one line on stderr (what it was for and why it does not apply here).

This module does not import jax: entry points parse their flags first and may then set ``XLA_FLAGS`` (host device
count for ``--mesh``) before jax starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}
_NONE = {"none", "null"}
_SCALARS = (int, float, str)


def arg(default: Any = dataclasses.MISSING, help: str = "") -> Any:  # noqa: A002 (argparse's own word)
    """A dataclass field with help text: ``lr: float = arg(1e-6, "peak learning rate")``.

    A list/dict/set default is copied per instance (``default_factory``); leave ``default`` out for a required field.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# Types: a field's annotation -> a small description of how to parse it.
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one field is parsed. ``base`` is int/float/str/bool or 'literal'; ``container`` is None, list or tuple."""

    base: Any
    optional: bool = False
    container: type | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.base == "literal":
            inner = "{" + ",".join(str(c) for c in self.choices) + "}"
        else:
            inner = self.base.__name__
        if self.container is not None:
            inner = f"{self.container.__name__}[{inner}]"
        return f"Optional[{inner}]" if self.optional else inner


def _kind_of(tp: Any, where: str) -> _Kind:
    """Classify a (resolved) annotation; unsupported types are a TypeError naming the field."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"{where}: only Optional[X] unions are supported, got {tp}")
        inner = _kind_of(members[0], where)
        return dataclasses.replace(inner, optional=True)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in choices):
            raise TypeError(f"{where}: Literal choices must be str or int, got {choices}")
        return _Kind("literal", choices=choices)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{where}: use tuple[X, ...] (variable length) or list[X], got {tp}")
        elem = args[0] if args else str
        if elem not in _SCALARS:
            raise TypeError(f"{where}: list elements must be int, float or str, got {elem}")
        return _Kind(elem, container=origin)
    if tp in (bool, int, float, str):
        return _Kind(tp)
    raise TypeError(
        f"{where}: type {tp!r} is not supported by the CLI; use int, float, str, bool, Optional[X], Literal[...], "
        "list[X] or tuple[X, ...]"
    )


def _scalar_from_text(text: str, kind: _Kind) -> Any:
    """Parse one command-line token for a non-container kind (raises ValueError with an argparse-style message)."""
    if kind.base is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"invalid bool value: {text!r} (use true/false)")
    if kind.base == "literal":
        for c in kind.choices:
            if text == str(c):
                return c
        raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(repr(c) for c in kind.choices)})")
    if kind.base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"invalid int value: {text!r}") from None
    if kind.base is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"invalid float value: {text!r}") from None
    return text


def _from_tokens(tokens: list[str], kind: _Kind) -> Any:
    """Command-line tokens of one flag -> a typed value."""
    if kind.optional and len(tokens) == 1 and tokens[0].strip().lower() in _NONE:
        return None
    if kind.container is None:
        if len(tokens) != 1:
            raise ValueError(f"expected one value, got {len(tokens)}: {' '.join(tokens)}")
        return _scalar_from_text(tokens[0], kind)
    pieces = [p.strip() for tok in tokens for p in tok.split(",")]
    elem = _Kind(kind.base)
    return kind.container(_scalar_from_text(p, elem) for p in pieces if p)


def _from_yaml(value: Any, kind: _Kind) -> Any:
    """A value read from YAML -> a typed value (YAML already typed most things; strings are parsed like the CLI)."""
    if value is None:
        if kind.optional:
            return None
        raise ValueError("null is not allowed (the field is not Optional)")
    if kind.container is not None:
        if isinstance(value, str):
            return _from_tokens([value], dataclasses.replace(kind, optional=False))
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__} {value!r}")
        elem = _Kind(kind.base)
        return kind.container(_scalar_from_yaml(v, elem) for v in value)
    return _scalar_from_yaml(value, kind)


def _scalar_from_yaml(value: Any, kind: _Kind) -> Any:
    if isinstance(value, str):
        # PyYAML reads 1e-6 (no dot) as a string; parse strings exactly like command-line text.
        return _scalar_from_text(value, kind)
    if kind.base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"invalid bool value: {value!r} (use true/false)")
    if isinstance(value, bool):
        raise ValueError(f"invalid {kind.describe()} value: {value!r}")
    if kind.base == "literal":
        if value in kind.choices:
            return value
        raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(repr(c) for c in kind.choices)})")
    if kind.base is int:
        if isinstance(value, int):
            return value
        raise ValueError(f"invalid int value: {value!r}")
    if kind.base is float:
        if isinstance(value, (int, float)):
            return float(value)
        raise ValueError(f"invalid float value: {value!r}")
    if kind.base is str and isinstance(value, (int, float)):
        return str(value)
    raise ValueError(f"invalid {kind.describe()} value: {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: _Kind
    help: str
    has_default: bool
    default: Any


def _fields(cls: type) -> list[_Field]:
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"parse_config needs a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        where = f"{cls.__name__}.{f.name}"
        help_text = f.metadata.get("help", "")
        if not help_text:
            raise TypeError(f"{where} has no help text: declare it as `{f.name}: ... = arg(default, 'what it does')`")
        if f.name == "config":
            raise TypeError(f"{where}: the name 'config' is reserved for the --config YAML flag")
        if f.default is not dataclasses.MISSING:
            has_default, default = True, f.default
        elif f.default_factory is not dataclasses.MISSING:
            has_default, default = True, f.default_factory()
        else:
            has_default, default = False, None
        kind = _kind_of(hints[f.name], where)
        if has_default and default is None and not kind.optional:
            kind = dataclasses.replace(kind, optional=True)  # `x: str = arg(None, ...)` means Optional[str]
        out.append(_Field(f.name, kind, help_text, has_default, default))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with closest-match suggestions for unknown flags."""

    def __init__(self, *a: Any, known_flags: list[str], **k: Any) -> None:
        super().__init__(*a, **k)
        self._known_flags = known_flags

    def unknown_flag_error(self, extras: list[str]) -> typing.NoReturn:
        flags = [tok.split("=", 1)[0] for tok in extras if tok.startswith("-") and not _is_number(tok)]
        if not flags:  # only stray values (those after an unknown flag are not reported on their own)
            self.error(f"unexpected value(s) {' '.join(extras)!r}: no flag takes them (quote values with spaces)")
        msgs = []
        for flag in flags:
            close = difflib.get_close_matches(flag, self._known_flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see --help for the flags"
            msgs.append(f"unrecognized argument {flag}{hint}")
        self.error("; ".join(msgs))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _aliases(cls: type, fields: list[_Field]) -> dict[str, tuple[str, dict | None]]:
    """``{alias: (field, value map or None)}`` from ``cls.ALIASES``, checked against the fields."""
    names = {f.name for f in fields}
    out = {}
    for alias, target in getattr(cls, "ALIASES", {}).items():
        field_name, values = (target, None) if isinstance(target, str) else target
        if field_name not in names or alias in names:
            raise TypeError(f"{cls.__name__}.ALIASES: {alias!r} -> {field_name!r} must name a field and not be one")
        out[alias] = (field_name, values)
    return out


def _translate(values: dict | None, token: str) -> str:
    return values.get(token.strip().lower(), token) if values else token


def _build_parser(cls: type, fields: list[_Field], prog: str | None) -> _Parser:
    aliases, ignored = _aliases(cls, fields), getattr(cls, "IGNORED", {})
    flags = ["--config"] + [f"--{f.name}" for f in fields] + [f"--{a}" for a in (*aliases, *ignored)]
    flags += [f"--no_{f.name}" for f in fields if f.kind.base is bool and f.has_default and f.default is True]
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature doc: useless as a description
        doc = ""
    epilog = ("accepted and ignored (they do not apply here): " + ", ".join(f"--{k}" for k in ignored)) \
        if ignored else None
    parser = _Parser(
        prog=prog,
        description=doc or None,
        epilog=epilog,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        known_flags=flags,
    )
    parser.add_argument(
        "--config",
        metavar="PATH.yaml",
        help="YAML file mapping field names to values; command-line flags override it, it overrides defaults",
    )
    names = {f.name for f in fields}
    for f in fields:
        default_txt = f" (default: {f.default!r})" if f.has_default else " (required)"
        help_text = f.help.replace("%", "%%") + default_txt
        same = [f"--{a}" for a, (target, values) in aliases.items() if target == f.name and values is None]
        for a, (target, values) in aliases.items():
            if target == f.name and values is not None:  # a value-mapped spelling: one value, translated
                parser.add_argument(f"--{a}", dest=f.name, metavar="|".join(values), help=f"= --{f.name}, mapped",
                                    type=lambda s, v=values: [_translate(v, s)])
        if f.kind.base is bool and f.kind.container is None:
            parser.add_argument(
                f"--{f.name}", *same, dest=f.name, nargs="?", const=["true"], metavar="true|false",
                type=lambda s: [s], help=help_text,
            )
            if f.has_default and f.default is True:
                if f"no_{f.name}" in names:
                    raise TypeError(f"{cls.__name__}: field no_{f.name} collides with the --no_{f.name} switch")
                parser.add_argument(
                    f"--no_{f.name}", dest=f.name, action="store_const", const=["false"],
                    help=f"set --{f.name} to False",
                )
            continue
        nargs = "+" if f.kind.container is not None else None
        metavar = None
        if f.kind.base == "literal":
            metavar = "{" + ",".join(str(c) for c in f.kind.choices) + "}"
        elif f.kind.container is not None:
            metavar = f.kind.base.__name__.upper()
        parser.add_argument(
            f"--{f.name}", *same, dest=f.name, nargs=nargs, metavar=metavar, help=help_text,
            type=str, action="extend" if nargs else "store",
        )
    for name in ignored:
        parser.add_argument(f"--{name}", dest=f"{_IGNORED}{name}", nargs="?", const="", help=argparse.SUPPRESS)
    return parser


_IGNORED = "ignored:"


def _notice_ignored(cls: type, given: list[str], prog: str | None) -> None:
    """One line on stderr naming the ignored flags that were given and why they do not apply."""
    if given:
        why = getattr(cls, "IGNORED", {})
        print(f"{prog or 'jaxrlhf'}: notice: ignored flags that do not apply here: "
              + "; ".join(f"--{k} ({why[k]})" for k in given), file=sys.stderr)


def _flatten(data: dict, fields: dict, prefix: str = "") -> dict[str, Any]:
    """YAML keys as flags: a nested mapping under a key that is no field becomes dotted keys (``actor:
    {policy_loss_type: gspo}`` -> ``actor.policy_loss_type``)."""
    out = {}
    for key, value in data.items():
        key = prefix + str(key)
        if isinstance(value, dict) and key not in fields:
            out.update(_flatten(value, fields, key + "."))
        else:
            out[key] = value
    return out


def _load_yaml(path: str, parser: _Parser, fields: list[_Field], cls: type, ignored_keys: list) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        check_utf8(p, f"--config {path}")
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8
        parser.error(str(e))
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror or e})")
    except yaml.YAMLError as e:
        where = str(e).replace("<unicode string>", path)
        parser.error(f"--config {path}: not valid YAML: {' '.join(where.split())}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of field names to values, got {type(data).__name__}")
    names = [f.name for f in fields]
    by_name = {f.name: f for f in fields}
    aliases, ignored = _aliases(cls, fields), getattr(cls, "IGNORED", {})
    out = {}
    for key, value in _flatten(data, by_name).items():
        if key in ignored:
            ignored_keys.append(key)
            continue
        if key in aliases:
            key, values = aliases[key]
            value = _translate(values, str(value)) if values else value
        if key not in by_name:
            close = difflib.get_close_matches(key.lstrip("-"), names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            parser.error(f"--config {path}: unknown key {key!r}{hint}")
        try:
            out[key] = _from_yaml(value, by_name[key].kind)
        except ValueError as e:
            parser.error(f"--config {path}: key {key!r}: {e}")
    return out


def line_of(path: str | Path, offset: int) -> int:
    """The 1-based line number of byte ``offset`` of the file at ``path`` (read in chunks)."""
    lines = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            offset -= len(chunk)
    return lines


def check_utf8(path: str | Path, what: str, *, chunk_bytes: int = 1 << 24) -> None:
    """ValueError naming ``what`` (e.g. "dataset 'x.jsonl'") and the line where ``path`` stops being UTF-8 text.
    Reads ``chunk_bytes`` at a time (a character split between chunks is fine)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset - len(decoder.getstate()[0]) + e.start
                raise ValueError(f"{what}: line {line_of(path, at)} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                                 f"at offset {at}): save the file as UTF-8") from None
            if not chunk:
                return
            offset += len(chunk)


def parse_config(cls: type[T], argv: list[str] | None = None, *, prog: str | None = None) -> T:
    """Build ``cls`` from defaults, then ``--config`` YAML, then command-line flags (later wins).

    ``argv`` defaults to ``sys.argv[1:]``. Every error exits with code 2 after an argparse-style message.
    """
    fields = _fields(cls)
    parser = _build_parser(cls, fields, prog)
    ns, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if extras:
        parser.unknown_flag_error(extras)
    given = vars(ns)
    values: dict[str, Any] = {}
    ignored = [k[len(_IGNORED):] for k in list(given) if k.startswith(_IGNORED)]
    for name in ignored:
        del given[_IGNORED + name]
    if given.get("config") is not None:
        values.update(_load_yaml(given.pop("config"), parser, fields, cls, ignored))
    given.pop("config", None)
    _notice_ignored(cls, ignored, prog)
    for f in fields:
        if f.name not in given:
            continue
        raw = given[f.name]
        tokens = raw if isinstance(raw, list) else [raw]  # bools and lists arrive as token lists, scalars as one str
        try:
            values[f.name] = _from_tokens(tokens, f.kind)
        except ValueError as e:
            parser.error(f"argument --{f.name}: {e}")
    missing = [f"--{f.name}" for f in fields if not f.has_default and f.name not in values]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (on the command line or in --config)")
    try:
        return cls(**values)
    except ValueError as e:
        parser.error(f"invalid configuration: {e}")


def error_text(e: BaseException) -> str:
    """An error as the one line a CLI prints after ``error:``: an ``OSError`` as "PATH: reason" (what failed where),
    a ``KeyError`` as its message, anything else as its text with line breaks folded."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else e.filename
        return f"{where}: {e.strerror}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass -> plain dict of JSON/YAML-able values (tuples become lists); feeds back into ``--config``."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def field_default(cfg: Any, name: str) -> Any:
    """The declared default of config field ``name`` (of ``cfg``'s own class: a subclass may redeclare it)."""
    f = {f.name: f for f in dataclasses.fields(cfg)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def at_defaults(cfg: T, changes: dict[str, Any]) -> T:
    """``cfg`` with ``changes`` applied to the fields the user left at their defaults (a demo's settings)."""
    keep = {k: v for k, v in changes.items() if getattr(cfg, k) == field_default(cfg, k)}
    return dataclasses.replace(cfg, **keep)


def report_errors(main: typing.Callable[[T], Any], cfg: T, errors: tuple[type[BaseException], ...]) -> Any:
    """``main(cfg)``, or None after printing ``error: <message>`` (one line, no traceback) when it raises one of
    ``errors`` (bad input found after parsing: a missing dataset key, an unreachable reward server...): the entry
    point then exits with code 2."""
    try:
        return main(cfg)
    except errors as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return None
