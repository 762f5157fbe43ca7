"""Small random checkpoints written by transformers, and a naive attention to check kernels against."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# fp32 logits of two implementations of the same weights differ by summation order only, which
# varies with the CPU's vector width, the BLAS build and the library versions. The noise scales
# with the logits' magnitude: SmolLM2 (30 layers, logits up to ~40) measured 1.4e-6 relative RMS
# and a max error of 1.9e-6 of the largest logit on one Xeon, 4.1e-6 on another. The bounds
# below leave 5-10x of room for other CPUs; a real bug (a wrong rotary, norm or mask) moves
# logits by 1e-2 relative or more.
FP32_LOGITS_REL_RMS = 2e-5
FP32_LOGITS_REL_MAX = 2e-5

# Odd sizes on purpose: nothing a multiple of a block, GQA groups of 3 and 2, head_dim not 64.
TINY = {
    "qwen2": dict(vocab_size=517, hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False,
                  max_position_embeddings=256, rms_norm_eps=1e-6),
    "llama": dict(vocab_size=517, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-rope": dict(vocab_size=517, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, what: str = "logits") -> None:
    """Equal up to fp32 summation-order noise, measured relative to the logits' scale (see above)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error = (got.double() - expected.double())
    scale = expected.double().abs().max().clamp_min(1e-30)
    rel_rms = (error.norm() / expected.double().norm().clamp_min(1e-30)).item()
    rel_max = (error.abs().max() / scale).item()
    assert rel_rms <= FP32_LOGITS_REL_RMS and rel_max <= FP32_LOGITS_REL_MAX, (
        f"{what}: relative RMS error {rel_rms:.2e} (bound {FP32_LOGITS_REL_RMS:.0e}), max error "
        f"{rel_max:.2e} of the largest |logit| (bound {FP32_LOGITS_REL_MAX:.0e})")


def transformers_model(kind: str, seed: int = 0):
    """A transformers model of TINY[kind] with weights large enough that attention is far from
    uniform and logits are O(1) (the default N(0, 0.02) init would hide attention bugs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    model = model_class(config_class(**TINY[kind])).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) * (2.0 if p.ndim == 2 else 0.2))
    return model


def write_checkpoint(kind: str, directory: Path, seed: int = 0):
    model = transformers_model(kind, seed)
    model.save_pretrained(directory)
    return model


@torch.no_grad()
def transformers_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    return [model(torch.tensor([s])).logits[0].float() for s in sequences]


def random_sequences(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(D)) v, causal, one sequence at a time, KV heads repeated."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:stop].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        n = stop - start
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[start:stop] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out
