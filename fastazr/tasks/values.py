"""Values from repr strings, parsed without evaluating anything.

Children return repr() text; a model's answer is text too. Both sides of every comparison are
parsed here from the AST, accepting only literals (numbers, strings, bytes, None, booleans,
tuples, lists, dicts, sets) plus the few reprs that are not literals: set(), frozenset(...),
inf, nan. Anything else (a call, a name, an object repr such as <Foo object at 0x..>) is
rejected, so a value a program invented cannot pass for another."""

from __future__ import annotations

import ast
import math

# ast.parse recurses per nesting level; deeper text than this is not a value we compare.
MAX_NESTING = 100


class ValueParseError(ValueError):
    """The text is not a literal value."""


def parse_value(text: str, max_chars: int = 100_000):
    """The Python value written by `text`, or ValueParseError."""
    if not isinstance(text, str):
        raise ValueParseError(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueParseError(f"value text of {len(text)} chars exceeds {max_chars}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueParseError(f"not a literal: {type(exc).__name__}") from None
    return _convert(tree.body, 0)


def _convert(node: ast.AST, depth: int):
    if depth > MAX_NESTING:
        raise ValueParseError(f"nested deeper than {MAX_NESTING}")
    d = depth + 1
    if isinstance(node, ast.Constant):
        if node.value is Ellipsis:
            raise ValueParseError("Ellipsis is not a value here")
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_convert(e, d) for e in node.elts)
    if isinstance(node, ast.List):
        return [_convert(e, d) for e in node.elts]
    if isinstance(node, ast.Set):
        return _hashable_set(set, node.elts, d)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueParseError("dict unpacking is not a literal")
        try:
            return {_convert(k, d): _convert(v, d) for k, v in zip(node.keys, node.values)}
        except TypeError as exc:
            raise ValueParseError(f"unhashable dict key: {exc}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _convert(node.operand, d)
        if not _is_number(operand):
            raise ValueParseError("sign applied to a non-number")
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        # complex reprs: (1+2j), (-0-1j)
        left, right = _convert(node.left, d), _convert(node.right, d)
        if not (_is_real(left) and isinstance(right, complex)):
            raise ValueParseError("only complex literals may add or subtract")
        return left + right if isinstance(node.op, ast.Add) else left - right
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return math.inf if node.id == "inf" else math.nan
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id in ("set", "frozenset") and len(node.args) <= 1:
            kind = set if node.func.id == "set" else frozenset
            if not node.args:
                return kind()
            arg = node.args[0]
            if isinstance(arg, (ast.Set, ast.List, ast.Tuple)):
                return _hashable_set(kind, arg.elts, d)
        if node.func.id == "float" and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value in ("inf", "-inf", "nan"):
            return float(node.args[0].value)
    raise ValueParseError(f"not a literal value: {type(node).__name__}")


def _hashable_set(kind, elements, depth: int):
    try:
        return kind(_convert(e, depth) for e in elements)
    except TypeError as exc:
        raise ValueParseError(f"unhashable set element: {exc}") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float, complex)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def to_source(value) -> str:
    """Python source that evaluates to `value` (a value parse_value returns): repr, except
    where repr does not round-trip (nan, inf, complex parts, empty sets), at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({repr(value)!r})"
    if isinstance(value, complex):
        return f"complex({to_source(value.real)}, {to_source(value.imag)})"
    if isinstance(value, list):
        return "[" + ", ".join(map(to_source, value)) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(to_source, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_source(k)}: {to_source(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (set, frozenset)):
        inner = "{" + ", ".join(map(to_source, value)) + "}" if value else ""
        return f"frozenset({inner})" if isinstance(value, frozenset) else inner or "set()"
    return repr(value)


def same_value(a, b) -> bool:
    """Equality as Python's ==, except that NaN equals NaN at any depth, and a container never
    equals one of another type (list vs tuple, set vs frozenset); 1 == 1.0 == True stays."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple, dict, set, frozenset)) or isinstance(b, (list, tuple, dict, set, frozenset)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, (list, tuple)):
            return all(same_value(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return all(k in b and same_value(v, b[k]) for k, v in a.items())
        return a == b or _sets_equal_with_nan(a, b)
    if (isinstance(a, complex) or isinstance(b, complex)) and _is_number(a) and _is_number(b):
        a, b = complex(a), complex(b)
        return same_value(a.real, b.real) and same_value(a.imag, b.imag)
    return a == b


def _sets_equal_with_nan(a, b) -> bool:
    # float('nan') hashes by identity in sets, so two parsed nans never match by ==.
    rest_a = [x for x in a if not (isinstance(x, float) and math.isnan(x))]
    rest_b = [x for x in b if not (isinstance(x, float) and math.isnan(x))]
    return len(rest_a) == len(rest_b) and set(rest_a) == set(rest_b)
