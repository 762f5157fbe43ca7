"""ModelConfig: the shape of a decoder, read from and written as a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ModelError

# model_type in config.json -> the class name other tools look up in "architectures".
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED = "qwen2 (Qwen2, Qwen2.5) and llama (Llama 2/3, SmolLM, SmolLM2)"
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """A Qwen2/Llama-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

    architecture: str
    """'qwen2' or 'llama' (the model_type of config.json)."""

    vocab_size: int
    """Rows of the embedding and of the lm_head."""

    hidden_size: int
    """Width of the residual stream."""

    intermediate_size: int
    """Width of the SwiGLU MLP's gate and up projections."""

    num_layers: int
    """Decoder blocks."""

    num_heads: int
    """Query heads."""

    num_kv_heads: int
    """Key/value heads; num_heads must be a multiple (grouped-query attention)."""

    head_dim: int = 0
    """Width of one head; 0 means hidden_size // num_heads."""

    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""

    rope_scaling: dict[str, Any] | None = None
    """Rotary scaling as in config.json: None, {'rope_type': 'linear', 'factor': f} or the
    Llama 3 form {'rope_type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor',
    'original_max_position_embeddings'}."""

    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""

    qkv_bias: bool = False
    """Bias on the q, k and v projections (Qwen2: yes; Llama: only with attention_bias)."""

    o_bias: bool = False
    """Bias on the attention output projection (Llama with attention_bias only)."""

    tie_word_embeddings: bool = False
    """The lm_head is the embedding matrix (one tensor, shared)."""

    max_position_embeddings: int = 32768
    """Longest sequence the checkpoint was trained for; generation caps prompts + completions here."""

    initializer_range: float = 0.02
    """Standard deviation of random initialization."""

    bos_token_id: int | None = None
    """Beginning-of-sequence token, if the model has one."""

    eos_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a generation."""

    pad_token_id: int | None = None
    """Padding token, if the checkpoint names one."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.architecture!r}: fastazr supports {SUPPORTED}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ModelError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ModelError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}: set ModelConfig.head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ModelError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ModelError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)});"
                                 " use a checkpoint without it or set rope_scaling to null")
        self.eos_token_ids = [int(t) for t in self.eos_token_ids]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Distinct parameters (a tied lm_head counted once)."""
        h, layer = self.hidden_size, 0
        layer += h * (self.q_size + 2 * self.kv_size) + self.qkv_bias * (self.q_size + 2 * self.kv_size)
        layer += self.q_size * h + self.o_bias * h
        layer += 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + h + embeddings

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config.json dict (transformers 4 and 5 spellings)."""
        kind = hf.get("model_type")
        if kind not in ARCHITECTURES:
            names = hf.get("architectures") or [kind]
            raise ModelError(f"unknown architecture {names} (model_type {kind!r}) in {source}: "
                             f"fastazr supports {SUPPORTED}")
        if hf.get("use_sliding_window"):
            raise ModelError(f"{source} turns on sliding-window attention, which fastazr does not "
                             "implement: set use_sliding_window to false")
        if hf.get("mlp_bias"):
            raise ModelError(f"{source} has mlp_bias: true, which fastazr does not implement")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"{source} uses hidden_act {hf['hidden_act']!r}; fastazr implements silu only")
        rope = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        eos = hf.get("eos_token_id")
        attention_bias = bool(hf.get("attention_bias", False))
        try:
            return cls(
                architecture=kind,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                head_dim=int(hf.get("head_dim") or 0),
                rope_theta=float(theta),
                rope_scaling=scaling,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=True if kind == "qwen2" else attention_bias,
                o_bias=False if kind == "qwen2" else attention_bias,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                initializer_range=float(hf.get("initializer_range", 0.02)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as missing:
            raise ModelError(f"{source} lacks {missing}, which every {kind} config has") from None

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A config.json that transformers, vLLM and SGLang read."""
        if self.architecture == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ModelError("a qwen2 checkpoint always has q/k/v biases and no o_proj bias; "
                             "save this model with architecture='llama'")
        if self.architecture == "llama" and self.qkv_bias != self.o_bias:
            raise ModelError("llama's attention_bias covers q, k, v and o together; "
                             "save a q/k/v-bias-only model with architecture='qwen2'")
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
        hf = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        if self.architecture == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        else:
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
        return hf
