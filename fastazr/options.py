"""TrainConfig: every option of `python -m fastazr.train`, one dataclass tree, and the command
line built from it.

Each dataclass field is an option; nested dataclasses are groups (`--azr.batch-size 8`,
`--update.lr 1e-6`, `--engine.max-num-seqs 128`, `--sandbox.workers 4`), and the docstring under
a field is its --help text. A preset fills in defaults for a kind of machine; a config file
(`--config run.toml`, the same tree as TOML tables) overrides the preset, and options given on the
command line override both. save_config writes a built TrainConfig back as such a file."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .azr.config import AZRConfig
from .config_file import is_callable, read_options, read_toml, to_table
from .distributed.config import DistributedConfig
from .rollout.config import EngineConfig
from .rollout.sglang_config import SGLangConfig
from .runlog.config import RunConfig
from .sandbox.config import SandboxConfig
from .update.config import UpdateConfig

PRESETS = ("auto", "cpu", "gpu")
DEVICES = ("auto", "cpu", "cuda")
ROLLOUTS = ("embedded", "sglang")
CONFIG_NAME = "config.toml"
"""The resolved options a run writes into its directory; `--resume DIR` reads them back."""


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
    """Run directory: metrics.jsonl, samples/step_<n>.jsonl, config.toml, checkpoints/, tb/."""

    resume: str | None = None
    """A run directory to continue from its newest complete checkpoint (its options are the
    defaults; options given here override them, --steps included)."""

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

    run: RunConfig = field(default_factory=RunConfig)
    """Checkpoints, TensorBoard and progress bars."""

    rollout: str = "embedded"
    """The rollout backend: 'embedded' (the engine on the trainer's own tensors, options
    --engine.*) or 'sglang' (SGLang's offline engine colocated on the trainer's GPU, its memory
    released while training and the weights pushed after every update; options --sglang.*,
    needs CUDA and `pip install "fastazr[sglang]"`; docs/sglang.md)."""

    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """The SGLang rollout backend (--rollout sglang)."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data-parallel runs under torchrun (timeouts, gradient buckets, checks); one process reads none."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"--rollout must be one of {ROLLOUTS}, got {self.rollout!r}")
        if self.rollout == "sglang" and self.device == "cpu":
            raise ValueError("--rollout sglang runs on a CUDA GPU: pass --device cuda (or auto on a GPU machine), "
                             "or --rollout embedded")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--steps must be an integer >= 1 (a run of 0 steps writes nothing), got {self.steps!r}")
        # saved in config.toml, whose integers are signed 64-bit (torch.manual_seed takes < 2**64)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
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


def _options(cls, prefix: str = ""):
    """(path, field type, help) for every leaf option under cls. Fields holding functions
    (UpdateConfig.lr_schedule) have no text form: they are set from Python, not the command line."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _options(kind, f"{prefix}{f.name}.")
        elif not is_callable(kind):
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
        "reward, update. Options of groups are --group.option; a preset sets defaults, a --config file "
        "overrides them and options given here override both.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help=(
        "A TOML file of options: top-level keys for the top-level options (preset, model, steps, out, seed, "
        "device, resume, rollout) and tables [azr], [azr.rewards], [engine], [update], [sandbox], [run], [sglang], "
        "[distributed] "
        'keyed by option name (batch_size or batch-size); "none" stands for None. Every run writes its resolved '
        f"options to OUT/{CONFIG_NAME}, which --config reproduces. Default with --resume DIR: DIR/{CONFIG_NAME}."))
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
    merged = tie({**PRESET_VALUES[preset], **overrides, "preset": preset})
    values: dict = {}
    for path, value in merged.items():
        _set(values, path, value)
    return _instantiate(TrainConfig, values)


def tie(layer: dict[str, object]) -> dict[str, object]:
    """The layer with each TIED follower set to the option it follows where only that one is given.
    One sampling temperature: the update scores logprobs at the temperature the engine sampled at,
    so giving either option sets both (giving both, they must agree). parse_args ties each layer
    before merging them, so a command-line --azr.temperature replaces both of a file's."""
    tied = dict(layer)
    for given, follower in TIED:
        if given in layer and follower not in layer:
            tied[follower] = layer[given]
    return tied


def _instantiate(cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {sorted(unknown)[0]!r}; options: {', '.join(sorted(known))}")
    kwargs = {name: _instantiate(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
              for name, value in values.items()}
    return cls(**kwargs)


# argparse reads "-1e-3" (no pattern of its own for exponents) and "-inf" as options, so
# "--azr.rewards.solver-wrong -1e-3" failed with "expected one argument" and the whole usage.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-infinity", re.IGNORECASE)


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """argv with each negative number that follows an option joined to it (--opt=-1e-3)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and out[-1] not in ("--", "--help") and "=" not in out[-1] \
                and _NEGATIVE_NUMBER.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_args(argv: list[str] | None, cuda_available: bool) -> TrainConfig:
    """TrainConfig from the command line: the preset's defaults, then the --config file, then the
    options given. `--resume DIR` without --config takes DIR/config.toml (the resumed run's
    options) as the file, and without --out keeps writing into DIR."""
    parser = build_parser()
    namespace = vars(parser.parse_args(attach_negative_numbers(sys.argv[1:] if argv is None else argv)))
    config_file = namespace.pop("config", None)
    kinds = {path: kind for path, kind, _ in _options(TrainConfig)}
    try:
        given = {path: parse_text(text, kinds[path], path.replace("_", "-")) for path, text in namespace.items()}
        resume = given.get("resume")
        if resume is not None:
            if config_file is None:
                config_file = Path(resume) / CONFIG_NAME
                if not config_file.is_file():
                    raise ValueError(f"--resume {resume}: {config_file} not found, so the run's options are unknown "
                                     f"(is {resume} a run directory?); pass them with --config FILE")
            # the resumed run's directory, not the one its file names: the file may be from another
            # working directory or a copied run, and a resumed run continues where its checkpoints are
            given.setdefault("out", resume)
        from_file = load_config_file(config_file) if config_file is not None else {}
        if from_file.get("resume") is not None:
            raise ValueError(f"{config_file}: resume = {from_file['resume']!r}: a run is resumed from the command line "
                             "(--resume DIR, which reads DIR/config.toml); remove the key from the file")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return build_config({**tie(from_file), **tie(given)}, cuda_available)
    except (TypeError, ValueError) as exc:  # a range or consistency check of the built tree
        parser.error(f"{exc} (options from {config_file} and the command line)" if from_file else str(exc))


def load_config_file(path: str | Path) -> dict[str, object]:
    """Option path -> value for every option a TOML config file sets ('azr.batch_size' -> 8), each
    checked against its field's type; a ValueError that names the file and the key otherwise.
    Values are not range-checked here: build_config does that once the layers are merged."""
    document = read_toml(path)
    try:
        return read_options(TrainConfig, document)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write every option of config as TOML: `--config path` rebuilds an equal TrainConfig (but for
    `resume`, which is written as none: a run is resumed from the command line).
    Function-valued fields (update.lr_schedule) have no text form and are left out; a header line
    names any that was set, since a run rebuilt from the file has none."""
    table, skipped = to_table(dataclasses.replace(config, resume=None))  # a file describes a run; --resume continues one
    header = ["# The resolved options of a `python -m fastazr.train` run: every option, the preset's included.",
              f"# Run it again:  python -m fastazr.train --config {path}  (options given there override it)",
              f"# Continue it:   python -m fastazr.train --resume {config.out}  (reads {CONFIG_NAME} there)",
              '# TOML has no null: "none" stands for None.']
    header += [f"# {p} was set from Python and is not written: a run from this file has none." for p in skipped]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole or not at all: a run resumed from this directory reads it back
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n\n" + tomli_w.dumps(table))
    os.replace(tmp, path)


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
