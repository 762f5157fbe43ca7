"""Values from repr strings, parsed without evaluating anything.

Children return repr() text; a model's answer is text too. Both sides of every comparison are
parsed here from the AST, accepting only literals (numbers, strings, bytes, None, booleans,
tuples, lists, dicts, sets) plus the few reprs that are not literals: set(), frozenset(...),
inf, nan. Anything else (a call, a name, an object repr such as <Foo object at 0x..>) is
rejected, so a value a program invented cannot pass for another."""

from __future__ import annotations

import ast
import math
import re
import warnings

# Model-written text is parsed under this file name, and the compiler's SyntaxWarnings about it
# ("invalid decimal literal" for 1if 1else 2, "is" with a literal) are dropped: 2 lines of stderr
# per answer otherwise. A filter on this name alone leaves the user's own warnings as they were.
MODEL_TEXT = "<model text>"
warnings.filterwarnings("ignore", category=SyntaxWarning, module=re.escape(MODEL_TEXT) + r"\Z")


def parse_model_text(source: str, mode: str = "exec") -> ast.AST:
    """ast.parse of text a model wrote (MODEL_TEXT: its SyntaxWarnings go nowhere)."""
    return ast.parse(source, filename=MODEL_TEXT, mode=mode)


# ast.parse recurses per nesting level; deeper text than this is not a value we compare.
MAX_NESTING = 100
# Ints wider than this are written in hex: repr() refuses more decimal digits than
# sys.get_int_max_str_digits() (4300 by default, 640 at the lowest, ~2,126 bits), hex has no limit.
HEX_BITS = 2000


class ValueParseError(ValueError):
    """The text is not a literal value."""


def parse_value(text: str, max_chars: int = 100_000):
    """The Python value written by `text`, or ValueParseError."""
    if not isinstance(text, str):
        raise ValueParseError(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueParseError(f"value text of {len(text)} chars exceeds {max_chars}")
    return _converted(_parsed(text.strip()).body)


def parse_arguments(text: str, max_chars: int = 100_000) -> tuple:
    """The argument values written by `text` as in a call f(<text>) ("[3, 1], 'a'", "1,",
    "1  # a comment", ""), or ValueParseError. Parsed as the call it is, not pasted into one:
    a comment or trailing comma in the text cannot swallow or break what surrounds it."""
    if not isinstance(text, str):
        raise ValueParseError(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueParseError(f"argument text of {len(text)} chars exceeds {max_chars}")
    call = _parsed(f"f({text}\n)").body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise ValueParseError("not an argument list")
    if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
        raise ValueParseError("keyword or starred arguments are not literal values")
    return _converted(ast.Tuple(elts=call.args, ctx=ast.Load()))


def _parsed(source: str) -> ast.Expression:
    try:
        return parse_model_text(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        raise ValueParseError(f"not a literal: {type(exc).__name__}") from None


def _converted(node: ast.AST):
    try:
        return _convert(node, 0)
    except (OverflowError, MemoryError, RecursionError) as exc:  # (1e400 digits)+1j: no float holds it
        raise ValueParseError(f"not a representable value: {type(exc).__name__}") from None


_NON_FINITE = {"inf": math.inf, "nan": math.nan, "infj": complex(0.0, math.inf), "nanj": complex(0.0, math.nan)}


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
    if isinstance(node, ast.Name) and node.id in _NON_FINITE:  # repr writes complex(1, nan) as (1+nanj)
        return _NON_FINITE[node.id]
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
        if node.func.id == "complex" and len(node.args) == 2:  # to_source's own form of a complex
            real, imag = (_convert(a, d) for a in node.args)
            if _is_real(real) and _is_real(imag):
                return complex(real, imag)
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
    where repr does not round-trip (nan, inf, complex parts, empty sets) or cannot be written
    (ints past the decimal digit limit: hex), at any depth."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > HEX_BITS:
        return hex(value)
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
    """Equality as Python's ==, except that NaN equals NaN at any depth (dict keys and set
    elements included), and a container never equals one of another type (list vs tuple,
    set vs frozenset); 1 == 1.0 == True stays."""
    interned: dict = {}
    return _same(_canonical(a, interned), _canonical(b, interned))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True  # also the parts of complex numbers, which _canonical does not reach
    if isinstance(a, (list, tuple, dict, set, frozenset)) or isinstance(b, (list, tuple, dict, set, frozenset)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, (list, tuple)):
            return all(_same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return all(k in b and _same(v, b[k]) for k, v in a.items())
        return a == b
    if _is_number(a) and _is_number(b) and (isinstance(a, complex) or isinstance(b, complex)):
        # By parts, never through complex(): complex(10**400) overflows.
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    return a == b


def _canonical(value, interned: dict):
    """value with every NaN replaced by one shared object, at any depth. Containers compare
    identical elements as equal, and NaNs hash by identity: so two parsed NaNs, even inside a
    set's tuple or as a dict key, then match."""
    if isinstance(value, float):
        return math.nan if math.isnan(value) else value
    if isinstance(value, complex) and (math.isnan(value.real) or math.isnan(value.imag)):
        key = tuple("nan" if math.isnan(x) else x for x in (value.real, value.imag))
        return interned.setdefault(key, value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_canonical(x, interned) for x in value)
    if isinstance(value, dict):
        return {_canonical(k, interned): _canonical(v, interned) for k, v in value.items()}
    return value
