"""A dataclass option tree as TOML, both ways: `read_options` checks a parsed TOML document against
the tree and flattens it to option paths ('azr.batch_size' -> 64); `to_table` turns a built tree
back into the nested dict that tomli_w writes. fastazr.options uses them for `--config FILE` and
OUT/config.toml; nothing here knows TrainConfig, so the walk over the tree stays in one place.

TOML has no null: an Optional option's None is the string "none" (as on the command line). Fields
whose type is a function (UpdateConfig.lr_schedule) have no text form: they are not options,
never written, and refused when read."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path

NONE = "none"


def is_callable(kind) -> bool:
    return any(typing.get_origin(k) is collections.abc.Callable for k in (kind, *typing.get_args(kind)))


def read_toml(path: str | Path) -> dict:
    """The parsed file, or a ValueError naming it (missing, unreadable, not TOML)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML (not UTF-8: {exc})") from None


def read_options(root: type, document: dict) -> dict[str, object]:
    """Option path -> value for every option the document sets, each value checked against its
    field's type and converted (an int to a float field's float, an array to a tuple, "none" to
    None). Raises ValueError naming the key path for an unknown key, a wrong type, or a table
    where a value belongs (or the reverse). Ranges are left to the dataclasses' own checks."""
    return _read_table(root, document, "", root)


def to_table(config, prefix: str = "") -> tuple[dict, list[str]]:
    """The nested dict of a dataclass tree that tomli_w writes (None as "none", tuples as arrays),
    and the paths of the function-valued fields left out because they were set (not None)."""
    hints = typing.get_type_hints(type(config))
    table: dict = {}
    skipped: list[str] = []
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), hints[f.name]
        if dataclasses.is_dataclass(kind):
            table[f.name], inner = to_table(value, f"{prefix}{f.name}.")
            skipped += inner
        elif is_callable(kind):
            if value is not None:
                skipped.append(prefix + f.name)
        else:
            table[f.name] = _to_toml(value)
    return table, skipped


def _to_toml(value):
    if value is None:
        return NONE
    if isinstance(value, tuple):
        return [_to_toml(v) for v in value]
    return value


def _options_of(cls) -> dict[str, object]:
    """Field name -> type for the fields of cls a file may set (every one but functions)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not is_callable(hints[f.name])}


def _read_table(cls, table: dict, prefix: str, root: type) -> dict[str, object]:
    options = _options_of(cls)
    values: dict[str, object] = {}
    seen: dict[str, str] = {}
    for key, value in table.items():
        # the command line spells options with dashes, the dataclasses with underscores: take both
        name = key.replace("-", "_")
        path = prefix + name
        if name in seen:
            raise ValueError(f"{path} is given twice, as {seen[name]!r} and {key!r}")
        seen[name] = key
        if name not in options:
            raise ValueError(_unknown(cls, key, prefix, options, root))
        kind = options[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"{path} is a table of options ([{path}]), got {_shown(value)}")
            values.update(_read_table(kind, value, path + ".", root))
        elif isinstance(value, dict):
            raise ValueError(f"{path} is an option, not a table: it takes {_describe(kind)}")
        else:
            values[path] = convert(value, kind, path)
    return values


def _unknown(cls, key: str, prefix: str, options: dict, root: type) -> str:
    name = key.replace("-", "_")
    if name in {f.name for f in dataclasses.fields(cls)}:  # a function-valued field
        return (f"{prefix}{name} holds a Python function: it is set from Python ({cls.__name__}.{name}), "
                f"not from a config file")
    message = f"unknown option {key!r} " + (f"in [{prefix[:-1]}]" if prefix else "at the top level")
    close = difflib.get_close_matches(name, options, n=3)
    if close:
        message += " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    # an option of another table written here (`lr = 1e-6` at the top level): say where it goes
    elsewhere = [p.rpartition(".")[0] for p in _all_paths(root)
                 if p.rpartition(".")[2] == name and p.rpartition(".")[0] != prefix[:-1]]
    if elsewhere:
        message += "; it is an option of " + " and ".join(f"[{t}]" if t else "the top level" for t in elsewhere)
    choices = ", ".join(f"[{prefix}{n}]" if dataclasses.is_dataclass(k) else n for n, k in options.items())
    return f"{message}; valid keys: {choices}"


def _all_paths(cls, prefix: str = "") -> list[str]:
    paths = []
    for name, kind in _options_of(cls).items():
        if dataclasses.is_dataclass(kind):
            paths += _all_paths(kind, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def convert(value, kind, path: str):
    """A parsed TOML value as a value of the field type `kind`, or a ValueError naming the path,
    the type it takes and the value. Strict where TOML has the type: a quoted "3" is not an
    integer, true is not 1, and 2.0 is not an integer (a float option takes an integer)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and isinstance(value, str) and value.lower() == NONE:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return convert(value, inner, path)
        except ValueError:
            raise ValueError(_wrong(path, kind, value)) from None
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(_wrong(path, kind, value))
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise ValueError(_wrong(path, kind, value))
        return tuple(convert(v, args[i] if fixed else args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value  # equal to what `--x 1` gives, so configs compare equal
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{path}: no TOML form for a field of type {kind!r}")
    if not ok:
        raise ValueError(_wrong(path, kind, value))
    return value


def _wrong(path: str, kind, value) -> str:
    return f"{path} takes {_describe(kind)}, got {_shown(value)}"


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f'{_describe(inner)} or "{NONE}"'
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_plural(args[0])}"
        return f"an array of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else f"an array {list(args)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, repr(kind))


def _plural(kind) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(kind, repr(kind))


def _shown(value) -> str:
    if isinstance(value, dict):
        return "a table"
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}.get(type(value),
                                                                                             type(value).__name__)
    shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return f"{kind} {shown}"
