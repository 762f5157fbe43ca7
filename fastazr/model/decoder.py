"""Decoder: the Qwen2/Llama-family transformer that generation and training share.

Inputs are sequences packed back to back with no padding (token ids [T], positions [T],
cu_seqlens [B + 1]); the output is the final-normed hidden states [T, H]. The lm_head is never
applied here: the fused logprob kernels consume hidden states and `lm_head_weight` directly, and
the sampler projects only the last token of each sequence.

Parameters are plain contiguous tensors with q/k/v fused into one [(Hq + 2 Hkv) * D, H] matrix
and gate/up into one [2 I, H] matrix (one GEMM each instead of three and two); the rollout
engine reads these same tensors in place, so an optimizer step is visible to it at once."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .attention import BACKENDS, choose_backend, varlen_causal_attention
from .config import ModelConfig
from .layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, swiglu


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # On CUDA the fused kernels (one launch each way instead of ~8): the same rounding as the
    # torch code, which stays the path on CPU (and the reference the kernels are tested against).
    # Imported here: the model must load where Triton is not installed.
    if x.is_cuda and x.dim() == 2:
        from fastazr.kernels.training_fusions import fused_rms_norm
        return fused_rms_norm(x, weight, eps)
    return rms_norm(x, weight, eps)


def _add_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream hidden + delta, its RMSNorm). On CUDA one kernel each way: the add
    and, in backward, the sum of the stream's two gradients ride in the norm's pass (four
    [T, H] bf16 adds a layer fewer: ~0.2 ms net a qwen2.5-1.5b layer at 16K tokens, H100)."""
    if delta is None:
        return hidden, _norm(hidden, weight, eps)
    if hidden.is_cuda and hidden.dim() == 2:
        from fastazr.kernels.training_fusions import fused_add_rms_norm
        return fused_add_rms_norm(hidden, delta, weight, eps)
    hidden = hidden + delta
    return hidden, rms_norm(hidden, weight, eps)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda and gate_up.dim() == 2:
        from fastazr.kernels.training_fusions import fused_swiglu
        return fused_swiglu(gate_up)
    return swiglu(gate_up)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU (tests, the laptop path), bf16 on CUDA (what training and generation run in)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _param(*shape: int, device, dtype) -> nn.Parameter:
    # torch.empty, not nn.Linear: no throwaway init (a 7B model's kaiming init costs minutes on CPU)
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        qkv_rows = config.q_size + 2 * config.kv_size
        self.qkv_weight = _param(qkv_rows, config.hidden_size, device=device, dtype=dtype)
        self.qkv_bias = _param(qkv_rows, device=device, dtype=dtype) if config.qkv_bias else None
        self.o_weight = _param(config.hidden_size, config.q_size, device=device, dtype=dtype)
        self.o_bias = _param(config.hidden_size, device=device, dtype=dtype) if config.o_bias else None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normed hidden [T, H] -> rotated q [T, Hq, D], rotated k and v [T, Hkv, D]."""
        c = self.config
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        if qkv.is_cuda and qkv.dim() == 2:
            from fastazr.kernels.training_fusions import fused_rope_qkv
            return fused_rope_qkv(qkv, cos, sin, c.num_heads, c.num_kv_heads)
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rope(q.view(-1, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)
        return q, k, v.view(-1, c.num_kv_heads, c.head_dim)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        return F.linear(attended.flatten(1), self.o_weight, self.o_bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.gate_up_weight = _param(2 * config.intermediate_size, config.hidden_size, device=device, dtype=dtype)
        self.down_weight = _param(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_swiglu(F.linear(x, self.gate_up_weight)), self.down_weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_norm = _param(config.hidden_size, device=device, dtype=dtype)
        self.attn = Attention(config, device, dtype)
        self.post_attention_norm = _param(config.hidden_size, device=device, dtype=dtype)
        self.mlp = MLP(config, device, dtype)

    def forward(self, hidden: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, the previous layer's MLP output or None) -> the same pair after this
        layer: each add into the stream is left to the next norm, which fuses it."""
        hidden, normed = _add_norm(hidden, delta, self.input_norm, self.eps)
        q, k, v = self.attn.qkv(normed, cos, sin)
        attended = self.attn.output(varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, backend))
        hidden, normed = _add_norm(hidden, attended, self.post_attention_norm, self.eps)
        return hidden, self.mlp(normed)


class Decoder(nn.Module):
    """A decoder-only language model without its lm_head projection (see module docstring)."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, attention: str = "auto", activation_checkpointing: bool = False):
        super().__init__()
        if attention != "auto" and attention not in BACKENDS:  # else found at the first training forward
            raise ValueError(f"Decoder: attention must be 'auto' or one of {', '.join(BACKENDS)}, got {attention!r}")
        self.config = config
        self.attention = attention
        """'auto' or a backend of fastazr.model.attention.BACKENDS."""
        self.activation_checkpointing = activation_checkpointing
        """Recompute each layer in backward instead of keeping its activations (training only)."""
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype) for _ in range(config.num_layers))
        self.norm = _param(config.hidden_size, device=device, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else _param(
            config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        # fp32 always: a buffer would be cast by model.to(bfloat16) and shift every rotary angle
        self._inv_freq = rope_inv_freq(config, device=device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the embedding matrix itself when the embeddings are tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def backend(self) -> str:
        """The attention backend this model's forward uses on its current device and dtype."""
        return choose_backend(self.attention, self.device, self.dtype)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random initialization like the checkpoints' own: N(0, initializer_range) matrices,
        zero biases, unit norm weights; drawn on the model's device."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        """Packed token ids [T] -> final hidden states [T, H] (see module docstring).

        position_ids restart at 0 for each sequence (or continue a cached prefix); cu_seqlens is
        int32 [B + 1] with cu_seqlens[0] = 0 and cu_seqlens[-1] = T. Pass max_seqlen to avoid a
        device-to-host read."""
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        backend = self.backend()
        hidden = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary(position_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        delta = None
        for layer in self.layers:
            if recompute:
                # the add outside the checkpoint (the same bits as the fused one): a checkpoint
                # keeps its inputs, and one [T, H] a layer is what checkpointing is for
                hidden = hidden if delta is None else hidden + delta
                hidden, delta = checkpoint(layer, hidden, None, cos, sin, cu_seqlens, max_seqlen, backend,
                                           use_reentrant=False)
            else:
                hidden, delta = layer(hidden, delta, cos, sin, cu_seqlens, max_seqlen, backend)
        return _add_norm(hidden, delta, self.norm, self.config.rms_norm_eps)[1]

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] in the model's dtype for integer positions [T]."""
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.config, device=position_ids.device)
        return rope_cos_sin(self._inv_freq, position_ids, self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, V] of a few hidden states (sampling, tests); training never calls this."""
        return F.linear(hidden, self.lm_head_weight).float()
