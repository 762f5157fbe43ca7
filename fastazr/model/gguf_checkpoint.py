"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors dequantized by the `gguf`
package -> Decoder, vocabulary -> Tokenizer. The embedded default model is one of these."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SUPPORTED, ModelConfig
from .decoder import Decoder, default_dtype
from .errors import ModelError, ModelNotFoundError
from .gguf_file import GGUFFile
from .tokenizer import Tokenizer
from .weights import WeightFiller

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _unpermute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each Llama q/k head from the half-split rotary layout
    (i, i + D/2) to interleaved pairs (2i, 2i + 1); put the rows back."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def config_from_metadata(meta: dict[str, Any], vocab_size: int, has_output: bool, has_qkv_bias: bool,
                         has_o_bias: bool, source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelError(f"unknown architecture {arch!r} in {source}: fastazr supports {SUPPORTED}")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"{source} lacks the metadata field {arch}.{key}: the file is incomplete")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif meta.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise ModelError(f"{source} uses rope scaling {meta[f'{arch}.rope.scaling.type']!r}, which fastazr "
                         "does not read from GGUF files: load the Hugging Face directory instead")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        qkv_bias=has_qkv_bias,
        o_bias=has_o_bias,
        tie_word_embeddings=not has_output,
        max_position_embeddings=int(get("context_length", 32768)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else [],
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def load_gguf(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
              attention: str = "auto") -> tuple[Decoder, Tokenizer | None]:
    """Decoder and Tokenizer (None when the file has no vocabulary) from a GGUF file; quantized
    tensors are dequantized to fp32 on the host, one at a time, then copied to `device` in
    `dtype` (default fp32 on CPU, bf16 on CUDA)."""
    from gguf import dequantize

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    reader = GGUFFile(path)
    meta = reader.metadata
    shapes = {t.name: t.shape for t in reader.tensors}
    names = set(shapes)
    if "token_embd.weight" not in names:
        raise ModelError(f"{path} has no token_embd.weight tensor: it is not a language model checkpoint")
    if "rope_freqs.weight" in names:
        raise ModelError(f"{path} carries per-frequency rope factors (Llama 3.1 style), which fastazr does not "
                         "read from GGUF files: load the Hugging Face directory instead")
    # the tokenizer first: an unsupported one should fail before seconds of dequantization
    tokenizer = Tokenizer.from_gguf_metadata(meta, str(path)) if "tokenizer.ggml.tokens" in meta else None
    config = config_from_metadata(meta, shapes["token_embd.weight"][0], "output.weight" in names,
                                  "blk.0.attn_q.bias" in names, "blk.0.attn_output.bias" in names, str(path))
    model = Decoder(config, device=device, dtype=dtype or default_dtype(device), attention=attention)
    filler = WeightFiller(model, str(path))
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ModelError(f"{path} holds tensor {tensor.name!r}, which fastazr does not know for a "
                             f"{config.architecture} model")
        try:
            values = dequantize(tensor.data, tensor.kind)
        except Exception as e:
            raise ModelError(f"tensor {tensor.name} in {path} cannot be dequantized ({e}): the file is corrupt "
                             "or uses a quantization this gguf package lacks (pip install -U gguf)") from None
        values = values.reshape(shapes[tensor.name])
        kind = tensor.name.split(".")[-2]
        if config.architecture == "llama" and kind in heads:
            values = _unpermute_rotary(values, heads[kind])
        # F32 tensors come back as read-only views of the memory map; torch wants writable memory
        filler.fill(name, torch.from_numpy(np.require(values, requirements=["C", "W"])), str(path))
    return filler.finish(), tokenizer
