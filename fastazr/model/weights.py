"""Where each Hugging Face checkpoint tensor lives in a Decoder, and filling a Decoder from them.

HF stores q/k/v and gate/up as separate matrices; the Decoder fuses them, so one checkpoint
tensor maps to a row range of one parameter. Every loader (safetensors, GGUF) and the saver
go through this one table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .decoder import Decoder
from .errors import ModelError


@dataclass(frozen=True)
class Slot:
    """Rows [start, stop) of the Decoder parameter `param` hold the checkpoint tensor."""

    param: str
    start: int | None = None
    stop: int | None = None

    def view(self, model: Decoder) -> torch.Tensor:
        p = model.get_parameter(self.param)
        return p if self.start is None else p[self.start:self.stop]


def hf_layout(config: ModelConfig) -> dict[str, Slot]:
    """Every tensor name of a HF checkpoint of this config -> its Slot (lm_head only if untied)."""
    layout = {"model.embed_tokens.weight": Slot("embed_tokens"), "model.norm.weight": Slot("norm")}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = Slot("lm_head")
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        layout[hf + "input_layernorm.weight"] = Slot(ours + "input_norm")
        layout[hf + "post_attention_layernorm.weight"] = Slot(ours + "post_attention_norm")
        kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        for kind in kinds:
            layout[hf + f"self_attn.q_proj.{kind}"] = Slot(ours + f"attn.qkv_{kind}", 0, q)
            layout[hf + f"self_attn.k_proj.{kind}"] = Slot(ours + f"attn.qkv_{kind}", q, q + kv)
            layout[hf + f"self_attn.v_proj.{kind}"] = Slot(ours + f"attn.qkv_{kind}", q + kv, q + 2 * kv)
        layout[hf + "self_attn.o_proj.weight"] = Slot(ours + "attn.o_weight")
        if config.o_bias:
            layout[hf + "self_attn.o_proj.bias"] = Slot(ours + "attn.o_bias")
        layout[hf + "mlp.gate_proj.weight"] = Slot(ours + "mlp.gate_up_weight", 0, inter)
        layout[hf + "mlp.up_proj.weight"] = Slot(ours + "mlp.gate_up_weight", inter, 2 * inter)
        layout[hf + "mlp.down_proj.weight"] = Slot(ours + "mlp.down_weight")
    return layout


# Tensors some checkpoints carry that the model recomputes or shares.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightFiller:
    """Copies checkpoint tensors into a Decoder's parameters, checking names and shapes, and
    reports what is missing at the end."""

    def __init__(self, model: Decoder, source: str):
        self.model = model
        self.source = source
        self.layout = hf_layout(model.config)
        self.missing = set(self.layout)

    @torch.no_grad()
    def fill(self, name: str, tensor: torch.Tensor, origin: str | None = None) -> None:
        origin = origin or self.source
        slot = self.layout.get(name)
        if slot is None:
            if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.model.config.tie_word_embeddings):
                return
            raise ModelError(f"{origin} holds tensor {name!r}, which a {self.model.config.architecture} model "
                             "with this config does not have: the config and the weights belong to different models")
        target = slot.view(self.model)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelError(f"{name} in {origin} has shape {list(tensor.shape)}, but the config implies "
                             f"{list(target.shape)}: the config and the weights belong to different models")
        target.copy_(tensor)
        self.missing.discard(name)

    def finish(self) -> Decoder:
        if self.missing:
            names = sorted(self.missing)
            raise ModelError(f"{self.source} lacks {len(names)} tensor(s) the config needs, e.g. {names[:3]}: "
                             "the checkpoint is incomplete (a shard missing?) or belongs to another model")
        return self.model

