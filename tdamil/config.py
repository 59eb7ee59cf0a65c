"""Typed YAML configuration shared by every command of the project.

Each command declares its configuration as (nested) dataclasses and loads YAML with
:func:`load_config`. Loading validates everything before any work starts:

* unknown keys are rejected, every one of them named, with a "did you mean" hint,
* required fields (dataclass fields without a default) must be present,
* values must match the annotated type (``int``, ``float``, ``str``, ``bool``, ``Path``,
  ``Optional[...]``, ``list[...]``, ``dict[str, ...]``, ``Literal[...]`` and nested dataclasses),
* ``Path`` fields are resolved relative to the YAML file's folder, so a config can be moved
  together with its data.

Every problem raises :class:`ConfigError` whose message names the file, the key path
(``train.lr``) and what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "json_safe", "load_yaml", "check_keys"]


class ConfigError(ValueError):
    """A configuration file or value is invalid. The message says where and how to fix it."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Check the path (cwd is {Path.cwd()}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}. Fix the syntax there.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; is this really a YAML config?") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def load_config(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load ``path`` into dataclass ``cls``, validating keys, types and required fields.

    ``overrides`` maps dotted keys (``"train.lr"``) to values applied on top of the file, e.g.
    from command-line flags.
    """
    path = Path(path)
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return from_dict(cls, data, source=str(path), base_dir=path.resolve().parent)


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> T:
    """Build dataclass ``cls`` from a plain mapping with the same validation as :func:`load_config`."""
    return _build(cls, data, source=source, key="", base_dir=base_dir)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-friendly structure (``Path`` becomes ``str``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_safe(value: Any) -> Any:
    """A copy that standard JSON can hold: undefined numbers (NaN, inf; e.g. AUROC of a one-class
    split) become ``None`` (``null``), numpy / torch scalars Python numbers, dataclasses and paths
    plain values. The one NaN-to-null rule of every JSON file and log line the project writes."""
    value = to_dict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_keys(data: dict[str, Any], known: Any, source: str, key: str = "") -> None:
    """Raise one :class:`ConfigError` naming every key of ``data`` not in ``known`` (names, or a
    dataclass whose init fields are the names), each with a "did you mean" where one is close.

    The one home of the unknown-key rule: :func:`load_config` applies it to every section, and a
    command that reads a section by hand calls it before looking at the values."""
    if dataclasses.is_dataclass(known) and isinstance(known, type):
        known = [f.name for f in dataclasses.fields(known) if f.init]
    names = [str(k) for k in known]
    unknown = [str(k) for k in data if str(k) not in names]
    if not unknown:
        return
    sentences = []
    for name in unknown:
        close = difflib.get_close_matches(name, names, n=1)
        sentences.append(f"'{key}.{name}' is not a known setting." if key else f"'{name}' is not a known setting.")
        if close:
            sentences.append(f"Did you mean '{close[0]}'?")
    raise ConfigError(f"{source}: {' '.join(sentences)} Known keys here: {', '.join(sorted(names))}.")


# --------------------------------------------------------------------------------------------
def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _where(source: str, key: str) -> str:
    return f"{source}: '{key}'" if key else source


def _build(cls: type, data: Any, source: str, key: str, base_dir: Path | None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, key)} must be a mapping (key: value lines), got {type(data).__name__}.")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, fields, source, key)
    kwargs = {}
    for name, field in fields.items():
        full = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, full, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(source, full)} is required but missing. Add it to the file.")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks of the dataclass
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{_where(source, key)}: {exc}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, source: str, key: str, base_dir: Path | None) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    bad = lambda expected: ConfigError(  # noqa: E731
        f"{_where(source, key)} must be {expected}, got {value!r} ({type(value).__name__})."
    )
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key, base_dir)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{_where(source, key)} must be one of {choices}, got {value!r}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, source, key, base_dir)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = args[0] if args else Any
        out = [_coerce(item, v, source, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, source, f"{key}.{k}", base_dir) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-5" (no dot) as a string: accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("text")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise bad("a path (text)")
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return p
    raise TypeError(f"config type {tp!r} at {key} is not supported by tdamil.config")
