"""The model: one decoder implementation (Qwen2/Llama family) shared by generation and training,
its checkpoints (Hugging Face safetensors directories, GGUF files, random-init presets), its
tokenizer and chat template, and the embedded default model."""

from .attention import BACKENDS, available_backends, choose_backend
from .config import ModelConfig
from .decoder import Decoder
from .errors import ModelError, ModelNotFoundError
from .gguf_checkpoint import load_gguf
from .hf_checkpoint import load_hf, save_hf
from .loader import DEFAULT, load
from .packing import Packed, pack
from .presets import preset_config, preset_names
from .tokenizer import Tokenizer

__all__ = ["BACKENDS", "DEFAULT", "Decoder", "ModelConfig", "ModelError", "ModelNotFoundError", "Packed",
           "Tokenizer", "available_backends", "choose_backend", "load", "load_gguf", "load_hf", "pack",
           "preset_config", "preset_names", "save_hf"]
