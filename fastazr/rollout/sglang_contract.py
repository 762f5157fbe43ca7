"""The SGLang backend's contract with SGLang, checked against SGLang's source by syntax tree.

Every name the backend relies on is read from its own modules (sglang_*.py here), never listed
by hand, and looked up in an unpacked sglang release:

- imports: each `from sglang.X import Y` resolves (following re-exports);
- the engine: each `self.engine.M(...)` is a method of the Engine class sglang_runtime imports,
  its keywords parameters of M, and a string passed for keyword K is compared with K in SGLang
  (load_format="flattened_bucket" in engine.py and the weight updater);
- calls of imported SGLang names: keywords of FlattenedTensorMetadata(...), methods such as
  MultiprocessingSerializer.serialize;
- ServerArgs fields: the keys of the dict `server_args()` builds (ServerArgs is assembled from
  the namespaces of sglang/srt/arg_groups/fields since 0.5.2x; fields of the class body count too);
- SamplingParams fields: the keys of the dict `sampling_params()` builds;
- outputs: keys read from `output[...]`, `meta[...]` (produced by the TokenizerManager, which
  fills meta_info) and `finish[...]` (the finish reasons' to_json), the finish types compared
  with `finish["type"]`, and the (logprob, token id, text) layout of output_token_logprobs;
- the bucket payload's keys (read by the weight updater), the memory-saver tags in
  SGLANG_CONSTANTS (sglang/srt/constants.py), SGLANG_* environment names (sampler.py);
- and one semantic: the sampler divides the logits by the temperature before it takes the log of
  the probabilities it returns as logprobs.

A release that renames or moves any of them fails the check, which names it.

    python -m fastazr.rollout.sglang_contract [PATH/TO/sglang]   # default: the pinned wheel, fetched
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .sglang_config import SGLANG_VERSION

OURS = ("sglang_config.py", "sglang_requests.py", "sglang_runtime.py", "sglang_weights.py", "sglang_backend.py")
SERVER_ARGS = ("sglang.srt.server_args", "ServerArgs")
SAMPLING_PARAMS = ("sglang.srt.sampling.sampling_params", "SamplingParams")
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager"
FINISH_REASONS = "sglang.srt.managers.schedule_batch"
CONSTANTS = "sglang.srt.constants"
SAMPLER = "sglang.srt.layers.sampler"
WEIGHT_UPDATER = "sglang.srt.model_executor.model_runner_components.weight_updater"
VALUE_READERS = ("sglang.srt.entrypoints.engine", WEIGHT_UPDATER)
"""Where a string fastazr passes for an engine keyword must be compared with that keyword."""


@dataclass(frozen=True)
class Use:
    kind: str
    name: str
    where: str
    """fastazr's file:line that uses it."""


@dataclass
class Report:
    checked: list[Use] = field(default_factory=list)
    missing: list[tuple[Use, str]] = field(default_factory=list)

    def check(self, use: Use, found: bool, why: str) -> None:
        self.checked.append(use)
        if not found:
            self.missing.append((use, why))

    def names(self) -> set[str]:
        return {u.name for u in self.checked}


class Source:
    """An unpacked sglang package, parsed on demand; `read` lists the files parsed."""

    def __init__(self, package: str | os.PathLike):
        package = Path(package)
        if not (package / "srt").is_dir():
            raise FileNotFoundError(f"{package} is not an sglang package directory (no srt/ in it)")
        self.root = package.parent
        self.read: set[Path] = set()
        self._trees: dict[str, ast.Module | None] = {}

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.path(module)
            self._trees[module] = None if path is None else ast.parse(path.read_text(), str(path))
            if path is not None:
                self.read.add(path)
        return self._trees[module]

    def definition(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """(module, node) defining `name` at module level, following `from X import name`."""
        tree = self.tree(module)
        if tree is None or depth > 8:
            return None
        for node in _top_level(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
        for node in _top_level(tree):
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                alias = next(a for a in node.names if (a.asname or a.name) == name)
                return self.definition(_absolute(module, node, self.path(module)), alias.name, depth + 1)
            targets = _assigned(node)
            if name in targets:
                return module, node
        return None

    def members(self, module: str, cls: ast.ClassDef) -> dict[str, ast.AST]:
        """A class's methods and attributes, its bases' (resolved by name) included."""
        found: dict[str, ast.AST] = {}
        for base in cls.bases:
            if isinstance(base, ast.Name):
                hit = self.definition(module, base.id)
                if hit is not None and isinstance(hit[1], ast.ClassDef):
                    found.update(self.members(*hit))
        for node in cls.body:
            # an abstract method is no implementation: a subclass that renamed its own lacks it
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _abstract(node):
                found[node.name] = node
            for target in _assigned(node):
                found[target] = node
        return found

    def fields(self, module: str, name: str) -> set[str]:
        """Annotated fields of a class (a dataclass's or msgspec Struct's), bases included."""
        hit = self.definition(module, name)
        if hit is None or not isinstance(hit[1], ast.ClassDef):
            return set()
        return {n for n, node in self.members(*hit).items() if isinstance(node, ast.AnnAssign)}

    def server_args_fields(self) -> set[str]:
        """ServerArgs' fields: its class body's, and those of every namespace class listed in
        server_args.py's _INPUT_NAMESPACES, from which 0.5.2x assembles it."""
        module, name = SERVER_ARGS
        names = self.fields(module, name)
        tree = self.tree(module)
        for node in _top_level(tree) if tree else ():
            if "_INPUT_NAMESPACES" in _assigned(node) and isinstance(node.value, ast.List):
                for element in node.value.elts:
                    if isinstance(element, ast.Name):
                        names |= self.fields(module, element.id)
        return names

    def callable_params(self, module: str, node: ast.AST) -> tuple[list[str], set[str], bool, bool] | None:
        """(positional names, keyword names, *args, **kwargs) of a function, or of a class's
        __init__ (its fields, for a dataclass without one)."""
        if isinstance(node, ast.ClassDef):
            members = self.members(module, node)
            init = members.get("__init__")
            if isinstance(init, ast.FunctionDef):
                return _params(init, method=True)
            names = [n for n, m in members.items() if isinstance(m, ast.AnnAssign)]
            return names, set(names), False, False
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return _params(node, method=False)
        return None


def _top_level(tree: ast.Module):
    """Module-level statements, those under if/try included (conditional definitions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            stack[:0] = node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]


def _abstract(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(getattr(d, "id", getattr(d, "attr", None)) == "abstractmethod" for d in func.decorator_list)


def _assigned(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


def _absolute(module: str, node: ast.ImportFrom, path: Path | None) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path is not None and path.name == "__init__.py" else module.split(".")[:-1]
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> tuple[list[str], set[str], bool, bool]:
    a = func.args
    positional = [p.arg for p in a.posonlyargs + a.args]
    if method and positional:
        positional = positional[1:]
    return positional, {p.arg for p in a.args + a.kwonlyargs}, a.vararg is not None, a.kwarg is not None


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dict_keys(node: ast.AST) -> list[str]:
    """Keys of a dict literal or of dict(k=...)."""
    if isinstance(node, ast.Dict):
        return [k for k in map(_string, node.keys) if k is not None]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return [k.arg for k in node.keywords if k.arg]
    return []


class Ours:
    """fastazr's SGLang modules, parsed."""

    def __init__(self, directory: Path = Path(__file__).parent):
        self.trees = {name: ast.parse((directory / name).read_text(), name) for name in OURS}
        self.strings = {n.targets[0].id: n.value.value for tree in self.trees.values() for n in tree.body
                        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                        and _string(n.value) is not None}
        """Module-level string constants (LOAD_FORMAT), so a keyword given one is checked by value."""

    def walk(self):
        for name, tree in self.trees.items():
            for node in ast.walk(tree):
                yield name, node

    def imports(self) -> dict[str, tuple[str, str, str]]:
        """Local name -> (sglang module, name, file:line) of every `from sglang... import`."""
        return {(a.asname or a.name): (node.module, a.name, f"{file}:{node.lineno}") for file, node in self.walk()
                if isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "sglang"
                for a in node.names}

    def function_dicts(self, function: str) -> list[tuple[str, str]]:
        """(key, file:line) of the dict a function named `function` returns or builds."""
        found = []
        for name, node in self.walk():
            if isinstance(node, ast.FunctionDef) and node.name == function:
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Dict, ast.Call)):
                        found += [(k, f"{name}:{inner.lineno}") for k in _dict_keys(inner)]
        return found

    def subscripts(self, variable: str) -> list[tuple[str, str]]:
        return [(key, f"{name}:{node.lineno}") for name, node in self.walk()
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == variable and (key := _string(node.slice)) is not None]


def check(package: str | os.PathLike, ours: Ours | None = None) -> tuple[Report, Source]:
    """Every use of SGLang by fastazr's backend, looked up in the sglang package at `package`."""
    source, ours, report = Source(package), ours or Ours(), Report()
    imports = ours.imports()
    for module, name, where in imports.values():
        report.check(Use("import", f"{module}.{name}", where), source.definition(module, name) is not None,
                     f"{module} defines no {name}")
    _check_engine(source, ours, imports, report)
    _check_calls(source, ours, imports, report)
    server_fields = source.server_args_fields()
    for key, where in ours.function_dicts("server_args"):
        report.check(Use("ServerArgs field", key, where), key in server_fields, "ServerArgs has no such field")
    sampling_fields = source.fields(*SAMPLING_PARAMS)
    for key, where in ours.function_dicts("sampling_params"):
        report.check(Use("sampling key", key, where), key in sampling_fields, "SamplingParams has no such field")
    _check_outputs(source, ours, report)
    _check_constants(source, ours, report)
    _check_logprob_semantics(source, report)
    return report, source


def _check_engine(source: Source, ours: Ours, imports: dict, report: Report) -> None:
    module, name, _ = imports.get("Engine", ("", "Engine", ""))
    hit = source.definition(module, name)
    members = source.members(*hit) if hit and isinstance(hit[1], ast.ClassDef) else {}
    for file, node in ours.walk():
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "engine"):
            continue
        method, where = node.func.attr, f"{file}:{node.lineno}"
        report.check(Use("Engine method", method, where), method in members, f"{module}.{name} has no method")
        if method in members:
            _check_arguments(source, hit[0], members[method], node, f"Engine.{method}", where, report)
        for keyword in node.keywords:
            value = _string(keyword.value) or (ours.strings.get(keyword.value.id)
                                               if isinstance(keyword.value, ast.Name) else None)
            if value is not None and keyword.arg:
                for reader in VALUE_READERS:
                    report.check(Use("keyword value", f"{keyword.arg}={value!r} in {reader}", where),
                                 _compared(source, reader, keyword.arg, value), f"{reader} never compares it")


def _check_arguments(source: Source, module: str, target: ast.AST, call: ast.Call, label: str, where: str,
                     report: Report) -> None:
    params = source.callable_params(module, target)
    if params is None:
        return
    positional, keywords, varargs, varkw = params
    for keyword in call.keywords:
        if keyword.arg:
            report.check(Use("keyword", f"{label}({keyword.arg}=)", where), varkw or keyword.arg in keywords,
                         "no such parameter")
    if not varargs and len(call.args) > len(positional):
        report.check(Use("arguments", f"{label} with {len(call.args)} positional", where), False,
                     f"takes {len(positional)} positional")


def _check_calls(source: Source, ours: Ours, imports: dict, report: Report) -> None:
    for file, node in ours.walk():
        if not isinstance(node, ast.Call):
            continue
        where, func = f"{file}:{node.lineno}", node.func
        if isinstance(func, ast.Name) and func.id in imports:
            hit = source.definition(*imports[func.id][:2])
            if hit is not None:
                _check_arguments(source, *hit, node, func.id, where, report)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in imports:
            hit = source.definition(*imports[func.value.id][:2])
            members = source.members(*hit) if hit and isinstance(hit[1], ast.ClassDef) else {}
            label = f"{func.value.id}.{func.attr}"
            report.check(Use("method", label, where), func.attr in members, "no such method")
            if func.attr in members:
                _check_arguments(source, hit[0], members[func.attr], node, label, where, report)


def _compared(source: Source, module: str, name: str, value: str) -> bool:
    """Whether `module` compares a variable or attribute called `name` with `value`."""
    tree = source.tree(module)
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.Compare) and len(node.comparators) == 1:
            sides = [node.left, node.comparators[0]]
            named = any((isinstance(s, ast.Name) and s.id == name) or (isinstance(s, ast.Attribute) and s.attr == name)
                        for s in sides)
            if named and value in map(_string, sides):
                return True
    return False


def _check_outputs(source: Source, ours: Ours, report: Report) -> None:
    tree = source.tree(TOKENIZER_MANAGER)
    nodes = list(ast.walk(tree)) if tree else []
    meta_keys, output_keys = set(), set()
    for node in nodes:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                        and target.value.id == "meta_info" and _string(target.slice):
                    meta_keys.add(_string(target.slice))
                if isinstance(target, ast.Name) and target.id == "meta_info":
                    meta_keys.update(_dict_keys(node.value))
        if isinstance(node, ast.Dict) and "meta_info" in _dict_keys(node):
            output_keys.update(_dict_keys(node))
    for key, where in ours.subscripts("meta"):
        report.check(Use("meta_info key", key, where), key in meta_keys, "the TokenizerManager never sets it")
    for key, where in ours.subscripts("output"):
        report.check(Use("output key", key, where), key in output_keys, "no generate() output has it")
    layout = any(isinstance(n, ast.FunctionDef) and n.name == "detokenize_logprob_tokens"
                 and any(isinstance(t, ast.Tuple) and [getattr(e, "id", None) for e in t.elts[:2]]
                         == ["logprob", "token_id"] for t in ast.walk(n)) for n in nodes)
    report.check(Use("logprob entry", "output_token_logprobs = [(logprob, token_id, text)]", "sglang_requests.py"),
                 layout, "detokenize_logprob_tokens no longer builds (logprob, token_id, ...) tuples")
    reasons = source.tree(FINISH_REASONS)
    returned = [r.value for n in (ast.walk(reasons) if reasons else ())
                if isinstance(n, ast.FunctionDef) and n.name == "to_json"
                for r in ast.walk(n) if isinstance(r, ast.Return) and isinstance(r.value, ast.Dict)]
    keys = {k for d in returned for k in _dict_keys(d)}
    types = {_string(v) for d in returned for k, v in zip(d.keys, d.values) if _string(k) == "type"}
    for key, where in ours.subscripts("finish"):
        report.check(Use("finish key", key, where), key in keys, "no finish reason's to_json has it")
    for file, node in ours.walk():
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Subscript) \
                and getattr(node.left.value, "id", None) == "finish" and _string(node.left.slice) == "type":
            for value in map(_string, node.comparators):
                report.check(Use("finish type", value, f"{file}:{node.lineno}"), value in types,
                             "no finish reason's to_json has this type")


def _check_constants(source: Source, ours: Ours, report: Report) -> None:
    tree = source.tree(CONSTANTS)
    theirs = {t.id: _string(n.value) for n in (tree.body if tree else []) if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name)}
    for file, tree_ in ours.trees.items():
        for node in tree_.body:
            if "SGLANG_CONSTANTS" in _assigned(node) and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    name, value = _string(k), _string(v)
                    report.check(Use("constant", f"{name} = {value!r}", f"{file}:{node.lineno}"),
                                 theirs.get(name) == value, f"{CONSTANTS} has {name} = {theirs.get(name)!r}")
    sampler = source.path(SAMPLER)
    text = sampler.read_text() if sampler else ""
    for file, node in ours.walk():
        value = _string(node)
        if value and re.fullmatch(r"SGLANG_[A-Z0-9_]+", value):
            report.check(Use("environment variable", value, f"{file}:{node.lineno}"), f'"{value}"' in text,
                         f"{SAMPLER} no longer reads it")
    updater = source.tree(WEIGHT_UPDATER)
    read = {_string(n.slice) for n in (ast.walk(updater) if updater else ()) if isinstance(n, ast.Subscript)}
    for key, where in ours.function_dicts("bucket_payload"):
        report.check(Use("payload key", key, where), key in read, f"{WEIGHT_UPDATER} never reads it")


def _check_logprob_semantics(source: Source, report: Report) -> None:
    """Sampler.forward's standard path: logits.div_(...temperatures) comes before torch.log(probs)."""
    hit = source.definition(SAMPLER, "Sampler")
    forward = source.members(*hit).get("forward") if hit and isinstance(hit[1], ast.ClassDef) else None
    scaled = logged = None
    for node in ast.walk(forward) if forward else ():
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = getattr(node.func.value, "id", None)
            if node.func.attr == "div_" and target == "logits" and node.args \
                    and getattr(node.args[0], "attr", None) == "temperatures":
                scaled = node.lineno if scaled is None else min(scaled, node.lineno)
            if node.func.attr == "log" and target == "torch" and node.args \
                    and getattr(node.args[0], "id", None) == "probs":
                logged = node.lineno if logged is None else max(logged, node.lineno)
    report.check(Use("semantics", "logprobs = log softmax(logits / T)", "sglang_requests.py"),
                 scaled is not None and logged is not None and scaled < logged,
                 f"{SAMPLER} no longer divides the logits by the temperature before taking log(probs)")


def cache_dir() -> Path:
    base = os.environ.get("FASTAZR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastazr")
    return Path(base)


class FetchError(RuntimeError):
    pass


def fetch(version: str = SGLANG_VERSION, cache: Path | None = None, timeout: float = 120) -> Path:
    """The unpacked `sglang` package (its .py files) of the release's wheel, from the cache or
    downloaded once with pip (no dependencies). The x86-64 Linux CPython 3.11 wheel is asked for
    on every machine: the same file, whatever Python runs this. FetchError when it cannot be had
    (no network, no pip, an unwritable cache: set FASTAZR_CACHE)."""
    root = (cache or cache_dir()) / f"sglang-{version}"
    package = root / "src" / "sglang"
    if (root / "src" / ".complete").is_file():
        return package
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            wheel = _download(version, Path(tmp), timeout)
            unpacked = Path(tmp) / "src"
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(unpacked, [n for n in archive.namelist()
                                              if n.startswith("sglang/") and n.endswith(".py")])
            (unpacked / ".complete").write_text(wheel.name + "\n")
            shutil.rmtree(root / "src", ignore_errors=True)
            unpacked.rename(root / "src")
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"cannot unpack sglang {version} into {root}: {exc}") from None
    return package


def _download(version: str, directory: Path, timeout: float) -> Path:
    # fail fast without a network: pip's defaults retry for minutes
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
               "--platform", "manylinux_2_34_x86_64", "--disable-pip-version-check", "--quiet", "--timeout", "15",
               "--retries", "1", "-d", str(directory), f"sglang=={version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"`{' '.join(command)}` did not finish: {exc}") from None
    wheels = list(directory.glob("sglang-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`pip download sglang=={version}` failed: {' / '.join(tail)}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    package = Path(args[0]) if args else fetch()
    report, _ = check(package)
    kinds = sorted({u.kind for u in report.checked})
    print(f"{package}: {len(report.checked)} uses checked ({', '.join(kinds)})")
    for use, why in report.missing:
        print(f"MISSING {use.kind} {use.name} (used at {use.where}): {why}")
    return 1 if report.missing else 0


if __name__ == "__main__":
    sys.exit(main())
