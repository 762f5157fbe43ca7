"""Training attention over packed sequences, side by side on one CUDA device: fastazr's Triton
kernel (fp32-accurate P.V, the engine's numerics) vs torch's varlen FlashAttention (and
flash-attn when installed).

    python bench/bench_attention.py --models qwen2.5-1.5b,qwen2.5-0.5b

The workload is one micro-batch of the policy update: AZR-like sequences of 300-2,500 tokens
packed into --tokens tokens, with the model's query and KV heads. Times are medians over
--rounds of CUDA-event-timed calls after --warmup calls; "fwd+bwd" is the forward and the
backward of q, k and v. TFLOP/s counts the causal FLOPs (forward 4 * D * H * sum L(L+1)/2,
backward 2.5x that), the same count for every contender. "bits" is the share of outputs equal
to the fp32 reference rounded to bf16: what decides whether the trainer's logprobs are the
engine's (whose kernels round like fastazr's)."""

from __future__ import annotations

import argparse
import random

import torch

from common import cuda_ms, json_line, machine, print_table, profiled
from fastazr.kernels.varlen_attention_reference import varlen_attention_reference
from fastazr.model import available_backends, preset_config
from fastazr.model.attention import varlen_causal_attention


def make_batch(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(300, 2500), tokens - sum(lengths)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)

    def rand(h):
        return torch.randn(total, h, head_dim, device="cuda", generator=g).bfloat16().requires_grad_()

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return lengths, rand(heads), rand(kv_heads), rand(kv_heads), cu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-1.5b,qwen2.5-0.5b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", default=None, help="write a torch.profiler trace of the measured region here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device")
    backends = [b for b in available_backends(torch.device("cuda"), torch.bfloat16) if b != "sdpa"]
    rows, results = [], []
    with profiled(args.profile, "bench_attention") as region:
        for name in args.models.split(","):
            c = preset_config(name)
            lengths, q, k, v, cu = make_batch(args.tokens, c.num_heads, c.num_kv_heads, c.head_dim)
            max_len = max(lengths)
            flops = 4 * c.head_dim * c.num_heads * sum(n * (n + 1) // 2 for n in lengths)
            want = varlen_attention_reference(q.detach(), k.detach(), v.detach(), cu).bfloat16()
            dout = torch.randn_like(q)
            for backend in backends:
                def forward():
                    return varlen_causal_attention(q, k, v, cu, max_len, backend)

                def both():
                    torch.autograd.grad(forward(), (q, k, v), dout)

                with region(f"{name}/{backend}"):
                    fwd, fwd_bwd = cuda_ms(forward, args.warmup, args.rounds), cuda_ms(both, args.warmup, args.rounds)
                out = forward().detach()
                bits = (out == want).float().mean().item()
                err = (out.float() - want.float()).abs().max().item()
                rows.append([name, backend, f"{fwd:.3f}", f"{flops / fwd / 1e9:.0f}", f"{fwd_bwd:.3f}",
                             f"{3.5 * flops / fwd_bwd / 1e9:.0f}", f"{bits:.4f}", f"{err:.1e}"])
                results.append(dict(model=name, backend=backend, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                    fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9,
                                    bits=bits, max_err=err))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {machine()}")
    print(f"{args.tokens} tokens a micro-batch, sequences of 300-2,500, bf16")
    print_table(["model", "backend", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "bits", "max err"],
                rows)
    json_line(dict(bench="attention", tokens=args.tokens, results=results))


if __name__ == "__main__":
    main()
