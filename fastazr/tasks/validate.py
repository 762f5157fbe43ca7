"""Static checks of a model-written program before anything runs it.

These judge task quality, not safety (the sandbox is the safety): an Absolute Zero program
must be deterministic and self-contained, so it may use only modules of pure computation, and
every route to the clock, randomness, the system or text evaluation is closed as a class, not
one spelling at a time (each class below names routes that once passed):

- imports: only ALLOWED_MODULES, an allowlist (`_random`, `_strptime`, `posixpath`, `_io`,
  `_imp`, `_posixsubprocess` each reach randomness, the clock or the system); no relative or
  star imports; a from-import names a public attribute that is no other module;
- modules as objects: a module is used only as `module.name`, never as a value (no aliases to
  hide it behind), and every name along that path is public and, where it is a module, an
  allowed one (`dataclasses.sys`, `typing.sys`, `statistics.random`, `enum.bltns`: builtins);
- builtins: a name that resolves to a BANNED_BUILTINS entry is rejected wherever it appears,
  called or not (`e = eval`, `[exec][0](...)`, `g = globals`, `__loader__`: it imports); a
  function's own parameter or local of that name is fine;
- memory addresses: `id`, `hash` (an object's hash is its address) and the attributes that
  expose one (`__hash__`, `array.buffer_info`) are banned like the builtins above. Two runs in
  children of one zygote share its address layout, so the determinism check passes them, and
  another worker's layout differs: `(id(a) >> 28) % 2` validated, then a review's later runs
  gave its gold output in 8 of 12;
- attributes: BANNED_ATTRIBUTES reach the interpreter through any object (`print.__self__` is
  the builtins module, `__globals__`, `__subclasses__`, frames) or evaluate text (typing's
  get_type_hints), whether read or imported; getattr, setattr, delattr and hasattr only called
  directly, with a constant public name (`getattr(f, '__glob' + 'als__')`); an annotation
  written as a string holds only a type expression (typing evaluates it).
"""

from __future__ import annotations

import ast
import importlib
import symtable
import types
from dataclasses import dataclass

from .values import MODEL_TEXT, parse_model_text

# Pure computation: nothing here reads the clock, draws randomness or reaches the system
# (statistics does, through NormalDist.samples: see BANNED_ATTRIBUTES).
ALLOWED_MODULES = frozenset({
    "__future__", "abc", "array", "bisect", "cmath", "collections", "collections.abc", "contextlib",
    "copy", "dataclasses", "decimal", "difflib", "enum", "fractions", "functools", "graphlib",
    "heapq", "itertools", "json", "json.decoder", "json.encoder", "json.scanner", "keyword", "math",
    "numbers", "operator", "pprint", "re", "reprlib", "statistics", "string", "struct", "textwrap",
    "typing", "unicodedata",
})
BANNED_BUILTINS = frozenset({"input", "open", "eval", "exec", "compile", "breakpoint", "globals", "locals",
                             "vars", "exit", "quit", "help", "memoryview",
                             # the builtins module's dunders that reach the import system
                             "__import__", "__builtins__", "__loader__", "__spec__"})
ADDRESS_BUILTINS = frozenset({"id", "hash"})
# Builtins that read attributes by a string: only called directly, with a constant public name.
STRING_ATTRIBUTE_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attribute names that reach interpreter internals from any object (the builtins module, globals,
# the class graph, frames, module loaders), read attributes by string, or draw randomness.
BANNED_ATTRIBUTES = frozenset({
    "__self__", "__globals__", "__builtins__", "__subclasses__", "__code__", "__closure__", "__func__",
    "__mro__", "__bases__", "__base__", "__getattribute__", "__reduce__", "__reduce_ex__", "__loader__",
    "__spec__", "__import__", "__traceback__", "__objclass__", "f_globals", "f_locals", "f_builtins",
    "f_back", "f_code", "gi_frame", "cr_frame", "ag_frame", "tb_frame",
    "attrgetter", "methodcaller",  # operator's getattr by string
    "get_field",                   # string.Formatter's getattr by string
    "get_type_hints", "ForwardRef", "_evaluate",  # typing's eval of annotation text
    "samples",                     # statistics.NormalDist.samples: random draws
    "__hash__", "buffer_info",     # memory addresses (see the module docstring)
})
# What a string annotation may hold: functools.singledispatch and typing evaluate it as code.
TYPE_EXPRESSION_NODES = (ast.Expression, ast.Name, ast.Attribute, ast.Subscript, ast.Tuple, ast.List,
                         ast.Constant, ast.BinOp, ast.BitOr, ast.Load)


@dataclass(frozen=True)
class ProgramCheck:
    ok: bool
    reason: str = ""


class _Rejected(Exception):
    pass


def check_program(source: str, entry: str = "f", max_chars: int = 20_000) -> ProgramCheck:
    """Whether source parses, defines `entry` at top level, and stays within the rules in this
    module's docstring. `reason` names the first problem found and what to write instead."""
    if not isinstance(source, str) or not source.strip():
        return ProgramCheck(False, "empty program")
    if len(source) > max_chars:
        return ProgramCheck(False, f"program of {len(source)} chars exceeds {max_chars}")
    try:
        tree = parse_model_text(source)
        table = symtable.symtable(source, MODEL_TEXT, "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        return ProgramCheck(False, f"does not parse: {type(exc).__name__}: {getattr(exc, 'msg', exc)}")
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if entry not in defined:
        return ProgramCheck(False, f"no top-level definition of {entry!r}")
    try:
        _check_names(table)
        _check_tree(tree)
    except _Rejected as exc:
        return ProgramCheck(False, str(exc))
    return ProgramCheck(True)


def _check_names(table: symtable.SymbolTable) -> None:
    """Names that may resolve to a banned builtin, in any scope. Only a function's own
    parameters and locals (and an enclosing function's, reached as free variables) cannot fall
    through to builtins; a module- or class-level binding can (`if 0: eval = len`). Scopes are
    walked with a stack, not by recursion: 990 nested lambdas (10K chars) parse and run, and
    recursing over their scopes raised RecursionError out of the check."""
    pending = [table]
    while pending:
        scope = pending.pop()
        function = scope.get_type() == "function"
        for symbol in scope.get_symbols():
            name = symbol.get_name()
            if not symbol.is_referenced() or (function and symbol.is_local()) or symbol.is_free():
                continue
            if name in BANNED_BUILTINS:
                raise _Rejected(f"uses banned builtin {name}: programs must not read input, evaluate text or "
                                "reach the interpreter")
            if name in ADDRESS_BUILTINS:
                raise _Rejected(f"uses banned builtin {name}: it reads memory addresses, which differ between "
                                "runs; compute from the values instead")
        pending.extend(scope.get_children())


def _check_tree(tree: ast.AST) -> None:
    nodes = list(ast.walk(tree))
    modules = _imported_modules(nodes)
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    attribute_values = {id(n.value) for n in nodes if isinstance(n, ast.Attribute)}
    for node in nodes:
        if isinstance(node, ast.Attribute):
            if node.attr in BANNED_ATTRIBUTES:
                raise _Rejected(f"uses banned attribute {node.attr}: it reaches interpreter internals or memory "
                                "addresses, reads attributes by string, evaluates text or draws random numbers")
            path = _module_path(node)
            if path and path[0] in modules:
                _check_module_path(modules[path[0]], path[1:])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in modules and id(node) not in attribute_values:
                raise _Rejected(f"uses module {node.id} as a value: write {node.id}.<name>, or rename the "
                                "variable that shadows it")
            if node.id in STRING_ATTRIBUTE_BUILTINS and id(node) not in called:
                raise _Rejected(f"uses {node.id} as a value: call it directly with a constant attribute name")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in STRING_ATTRIBUTE_BUILTINS:
            name = node.args[1] if len(node.args) >= 2 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                raise _Rejected(f"calls {node.func.id}() with a computed attribute name: use a constant public name")
            if name.value.startswith("_") or name.value in BANNED_ATTRIBUTES:
                raise _Rejected(f"calls {node.func.id}() on attribute {name.value!r}: only public names, "
                                "none of BANNED_ATTRIBUTES")
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None:
            _check_annotation(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            _check_annotation(node.returns)


def _check_annotation(annotation: ast.AST) -> None:
    """Every string inside an annotation is a type expression of public names."""
    for node in ast.walk(annotation):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        try:
            parsed = list(ast.walk(parse_model_text(node.value.strip(), mode="eval")))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise _Rejected(f"string annotation {node.value[:50]!r} is no type expression") from None
        for inner in parsed:
            name = getattr(inner, "id", None) or getattr(inner, "attr", None) or ""
            if not isinstance(inner, TYPE_EXPRESSION_NODES) or name.startswith("_") or name in BANNED_BUILTINS:
                raise _Rejected(f"string annotation {node.value[:50]!r} may hold only a type expression "
                                "(public names, [], |): typing evaluates it as code")
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                _check_annotation(inner)


def _imported_modules(nodes: list[ast.AST]) -> dict[str, types.ModuleType]:
    """Every name an import statement binds to a module, anywhere in the program, checked
    against the allowlist. Allowed modules are imported here to look their names up: they are
    stdlib modules of pure computation, the same ones the child would import."""
    modules = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = _allowed_module(alias.name)
                if alias.asname:
                    modules[alias.asname] = module
                else:
                    root = alias.name.split(".")[0]
                    modules[root] = importlib.import_module(root)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = ", ".join(a.name for a in node.names)
                raise _Rejected(f"relative import (from {'.' * node.level}{node.module or ''} import {names}): "
                                "import modules by absolute name")
            module = _allowed_module(node.module)
            for alias in node.names:
                if alias.name == "*":
                    raise _Rejected(f"star import from {node.module}: import the names used")
                if alias.name in BANNED_ATTRIBUTES:
                    raise _Rejected(f"imports {node.module}.{alias.name}, one of BANNED_ATTRIBUTES")
                value = _public_attribute(module, alias.name)
                if isinstance(value, types.ModuleType):
                    modules[alias.asname or alias.name] = value
    return modules


def _allowed_module(name: str) -> types.ModuleType:
    if name not in ALLOWED_MODULES:
        raise _Rejected(f"imports module {name!r}, which is not allowed: only {', '.join(sorted(ALLOWED_MODULES))}")
    return importlib.import_module(name)


def _public_attribute(module: types.ModuleType, name: str):
    """module.name when it is public and not a module outside the allowlist."""
    if name.startswith("_"):
        raise _Rejected(f"uses private name {module.__name__}.{name}: only public names of allowed modules")
    if not hasattr(module, name):
        # A from-import of a name the module lacks would import a submodule (from json import tool).
        raise _Rejected(f"{module.__name__} has no attribute {name!r} (importing it would import a submodule): "
                        "only the modules in ALLOWED_MODULES")
    value = getattr(module, name)
    if isinstance(value, types.ModuleType) and value.__name__ not in ALLOWED_MODULES:
        raise _Rejected(f"reaches module {value.__name__} through {module.__name__}.{name}: only the modules "
                        "in ALLOWED_MODULES")
    return value


def _module_path(node: ast.Attribute) -> list[str] | None:
    """['a', 'b', 'c'] for a.b.c, None when the chain starts at anything but a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return [node.id, *reversed(attrs)] if isinstance(node, ast.Name) else None


def _check_module_path(module: types.ModuleType, attrs: list[str]) -> None:
    """Each name along module.a.b... is public, and where it is a module, an allowed one;
    the path ends being checked at the first name that is no module (a function, a class)."""
    value = module
    for attr in attrs:
        if not isinstance(value, types.ModuleType):
            return
        if not attr.startswith("_") and not hasattr(value, attr):
            return  # an AttributeError at run time, or a name the program sets itself
        value = _public_attribute(value, attr)
