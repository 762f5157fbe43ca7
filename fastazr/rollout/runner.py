"""One forward step of the decoder over the scheduled slices, attending through the paged cache.

The runner reads the model's own parameter tensors (the ones the optimizer updates), layer by
layer: no copy of the weights exists. Each step writes the new tokens' keys and values into
their cache slots, attends, and projects only the last token of each slice that samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastazr.kernels.paged_attention_reference import paged_attention_reference
from fastazr.model import Decoder
from fastazr.model.layers import rms_norm

from .kv_cache import KVCache
from .scheduler import Work


class Runner:
    def __init__(self, model: Decoder):
        self.model = model
        self.scale = model.config.head_dim ** -0.5

    @torch.no_grad()
    def forward(self, work: list[Work], cache: KVCache, block_size: int) -> torch.Tensor:
        """fp32 logits [S, V] of the slices that sample, in work order."""
        model, c, device = self.model, self.model.config, self.model.device
        ids, positions, slots, last = [], [], [], []
        for w in work:
            table = w.seq.blocks
            span = range(w.start, w.start + w.count)
            ids.extend(w.seq.tokens[w.start:w.start + w.count])
            positions.extend(span)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            if w.samples:
                last.append(len(ids) - 1)
        q_lens = [w.count for w in work]
        context_lens = [w.start + w.count for w in work]
        tables = [w.seq.blocks for w in work]
        ids_t = torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
        positions_t = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        slots_t = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        last_t = torch.tensor(last, dtype=torch.long).to(device, non_blocking=True)

        hidden = F.embedding(ids_t, model.embed_tokens)
        cos, sin = model.rotary(positions_t)
        for index, layer in enumerate(model.layers):
            q, k, v = layer.attn.qkv(rms_norm(hidden, layer.input_norm, c.rms_norm_eps), cos, sin)
            k_cache, v_cache = cache.k[index], cache.v[index]
            k_cache.view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slots_t, k)
            v_cache.view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slots_t, v)
            attended = paged_attention_reference(q, k_cache, v_cache, q_lens, context_lens, tables, self.scale)
            hidden = hidden + layer.attn.output(attended)
            hidden = hidden + layer.mlp(rms_norm(hidden, layer.post_attention_norm, c.rms_norm_eps))
        hidden = rms_norm(hidden[last_t], model.norm, c.rms_norm_eps)
        return F.linear(hidden, model.lm_head_weight).float()
