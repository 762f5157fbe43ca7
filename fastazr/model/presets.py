"""Named architectures for performance work: the real config.json of each model, no weights
(random initialization with real shapes costs nothing to download and times the same)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ModelConfig
from .errors import ModelError

_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.json"))


def preset_config(name: str) -> ModelConfig:
    if not isinstance(name, str):
        raise ModelError(f"a model preset is named by a str, one of {', '.join(preset_names())}; got {name!r}")
    path = _DIR / f"{name.lower()}.json"
    if not path.is_file():
        raise ModelError(f"unknown model preset {name!r}: choose one of {', '.join(preset_names())}, "
                         "or pass a Hugging Face directory or a .gguf file")
    return ModelConfig.from_hf(json.loads(path.read_text()), str(path))
