"""TrainConfig: every option of `python -m fastazr.train`, one dataclass tree, and the command
line built from it.

Each dataclass field is an option; nested dataclasses are groups (`--azr.batch-size 8`,
`--update.lr 1e-6`, `--engine.max-num-seqs 128`, `--sandbox.workers 4`), and the docstring under
a field is its --help text. A preset fills in defaults for a kind of machine; options given on
the command line override it."""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field

from .azr.config import AZRConfig
from .rollout.config import EngineConfig
from .sandbox.config import SandboxConfig
from .update.config import UpdateConfig

PRESETS = ("auto", "cpu", "gpu")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    preset: str = "auto"
    """'cpu' (the embedded SmolLM2-135M, small batches, a few steps on a laptop CPU), 'gpu'
    (the paper's batch sizes on one GPU) or 'auto' (gpu when CUDA is available)."""

    model: str = "default"
    """'default' (the embedded SmolLM2-135M-Instruct), a preset name ('qwen2.5-1.5b': random
    init, for timing), a Hugging Face checkpoint directory or a .gguf file."""

    steps: int = 3
    """Training steps to run."""

    out: str = "runs/azr"
    """Run directory: metrics.jsonl, samples/step_<n>.jsonl."""

    seed: int = 0
    """Every sampling seed and every random choice of the run derives from this."""

    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""

    azr: AZRConfig = field(default_factory=AZRConfig)
    """The self-play game."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """The embedded rollout engine."""

    update: UpdateConfig = field(default_factory=UpdateConfig)
    """The policy update."""

    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """The sandbox that runs model-written programs."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"--steps must be an integer >= 0, got {self.steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"--out must name a run directory, got {self.out!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("--model must name a model: 'default', a preset, a directory or a .gguf file")
        if not math.isclose(self.update.temperature, self.azr.temperature):
            raise ValueError(f"--update.temperature ({self.update.temperature}) must equal --azr.temperature "
                             f"({self.azr.temperature}): the update scores logprobs at the sampling temperature")


# Defaults each preset changes, by option path. The CPU preset keeps a step near a minute on
# 2 cores: the engine's fp32 CPU path generates ~150 tokens/s for SmolLM2 and the update trains
# ~1K tokens/s, so it shows 2 references, runs 2 learnability rollouts and caps responses.
PRESET_VALUES = {
    "cpu": {"device": "cpu", "azr.batch_size": 2, "azr.references": 2, "azr.induction_inputs": 4,
            "azr.induction_min_pairs": 2, "azr.learnability_rollouts": 2, "azr.propose_max_tokens": 160,
            "azr.solve_max_tokens": 96, "update.micro_batch_tokens": 4096},
    "gpu": {"device": "cuda", "steps": 100},
}

TIED = (("azr.temperature", "update.temperature"), ("update.temperature", "azr.temperature"))
"""Options that follow one another when only one of them is given."""

ALIASES = {"prompt-format": "azr.prompt_format", "batch-size": "azr.batch_size", "lr": "update.lr",
           "workers": "sandbox.workers"}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (they are not kept at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _is_callable(kind) -> bool:
    return any(typing.get_origin(k) is collections.abc.Callable for k in (kind, *typing.get_args(kind)))


def _options(cls, prefix: str = ""):
    """(path, field type, help) for every leaf option under cls. Fields holding functions
    (UpdateConfig.lr_schedule) have no text form: they are set from Python, not the command line."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _options(kind, f"{prefix}{f.name}.")
        elif not _is_callable(kind):
            yield f"{prefix}{f.name}", kind, docs.get(f.name, "")


def parse_text(text: str, kind, option: str):
    """A command-line string as a value of the field's type, or an error naming the option."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_text(text, inner, option)
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{option} takes true or false, got {text!r}")
    if origin is tuple:
        parts = [p for p in text.split(",") if p.strip()] if text.strip() else []
        inner = args[0]
        return tuple(parse_text(p.strip(), inner, option) for p in parts)
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"--{option} takes a value of type {getattr(kind, '__name__', kind)}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastazr.train", description="Absolute Zero self-play: propose, validate, solve, check, "
        "reward, update. Options of groups are --group.option; a preset sets defaults the options override.",
        argument_default=argparse.SUPPRESS)
    defaults = TrainConfig()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, kind, doc in _options(TrainConfig):
        head = path.split(".")[0] if "." in path else ""
        group = groups.setdefault(head, parser.add_argument_group(head) if head else parser)
        names = ["--" + path.replace("_", "-")]
        names += ["--" + a for a, target in ALIASES.items() if target == path]
        value = defaults
        for part in path.split("."):
            value = getattr(value, part)
        group.add_argument(*names, dest=path, metavar=_metavar(kind), help=f"{doc} (default: {value!r})".replace("%", "%%"))
    return parser


def _metavar(kind) -> str:
    name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
    return name.upper()


def _set(values: dict, path: str, value) -> None:
    node = values
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_config(overrides: dict[str, object], cuda_available: bool) -> TrainConfig:
    """TrainConfig from option paths to values: the preset's defaults, then the overrides."""
    preset = overrides.get("preset", "auto")
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {PRESETS}, got {preset!r}")
    if preset == "auto":
        preset = "gpu" if cuda_available else "cpu"
    merged = {**PRESET_VALUES[preset], **overrides, "preset": preset}
    # one sampling temperature: the update scores logprobs at the temperature the engine sampled
    # at, so giving either option sets both (giving both, they must agree)
    for given, follower in TIED:
        if given in merged and follower not in merged:
            merged[follower] = merged[given]
    values: dict = {}
    for path, value in merged.items():
        _set(values, path, value)
    return _instantiate(TrainConfig, values)


def _instantiate(cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {sorted(unknown)[0]!r}; options: {', '.join(sorted(known))}")
    kwargs = {name: _instantiate(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
              for name, value in values.items()}
    return cls(**kwargs)


def parse_args(argv: list[str] | None, cuda_available: bool) -> TrainConfig:
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    kinds = {path: kind for path, kind, _ in _options(TrainConfig)}
    try:
        overrides = {path: parse_text(text, kinds[path], path.replace("_", "-")) for path, text in namespace.items()}
        return build_config(overrides, cuda_available)
    except ValueError as exc:
        parser.error(str(exc))


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
