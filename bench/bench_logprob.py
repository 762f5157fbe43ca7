"""The PPO policy loss from hidden states and the lm_head, side by side on one GPU:

- fastazr fused: kernels/linear_policy_loss.py (linear_pg_loss: the gradient made in the
  forward from each row chunk's logits, 6*N*H*V FLOP; UpdateConfig.policy_loss='fused'), with
  its default store='auto'; "fastazr fused fp32" and "fastazr fused exp16" force what a chunk
  keeps between its GEMM and its row kernel: cuBLAS's fp32 logits, or the fp16 exps that
  linear_logprobs' forward kernel stores beside its statistics
- fastazr: kernels/logprobs.py (logits never materialized, recomputed in backward: 8*N*H*V),
  then pg_loss; and the same with entropy
- naive: bf16 matmul -> fp32 logits -> log_softmax -> gather (what a trainer writes first)
- torch.compile of the naive path
- chunked torch: kernels/logprobs_chunked.py (vocabulary chunks, plain torch matmuls)
- liger: Liger-Kernel's fused linear cross entropy, reduction="none" (loss_i = -logprob_i)
- cce / cce unfiltered: Cut Cross-Entropy's linear_cross_entropy, reduction="none", with its
  default gradient filtering (filter_eps="auto") and without (filter_eps=None)

    python bench/bench_logprob.py --hidden 896,1536,3584 --tokens 4096,16384,65536

Each contender turns random bf16 hidden [N, H], weight [V, H] and targets into per-token
logprobs, and pg_loss (PPO-clip, fixed old logprobs near the new ones, random advantages, 80% of
the tokens counted) into a loss that backpropagates to hidden and weight; the fused contender
does both itself. Times are medians of CUDA-event timings after warm-up; TFLOP/s counts 6*N*H*V
for everyone (the forward GEMM and the two backward GEMMs, no recompute); "extra GiB" is peak
allocation during forward + backward beyond the inputs, gradients included; errors are against
the fp32 reference computed over row blocks. The fused contender's forward makes its gradients
too, so only its fwd+bwd compares with the others'.

Random inputs leave Cut Cross-Entropy's gradient filtering nothing to skip: it skips a 128 x
128 block of the backward only when every |softmax - onehot| in it is below its threshold
(bf16's eps / 32 = 2^-12), and random hidden states spread each row's probability too widely
for any block to qualify. `--inputs embedded` takes real ones instead: the embedded
SmolLM2-135M's final-normed hidden states over real text (this repository's own Python sources
and docs, packed into 2,048-token sequences), its lm_head (H = 576, V = 49,152) and the text's
next tokens as targets; --hidden and --vocab are then the model's. On a machine without network
the model's GGUF must be installed first (the README's Development section carries it to the
GPU node). A line per shape gives the softmax's mean top probability and the share of blocks
filtering can skip.

    python bench/bench_logprob.py --inputs embedded --tokens 16384,65536
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from common import json_line, machine, median, print_table, profiled
from fastazr.kernels import LinearPGLoss, linear_logprobs, linear_logprobs_reference, linear_pg_loss, pg_loss
from fastazr.kernels.logprobs_chunked import linear_logprobs_chunked


def naive(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def liger(hidden, weight, targets):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")[0]
    return -loss


def cce(filter_eps):
    def logprobs(hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=filter_eps)
    return logprobs


def contenders(names, policy):
    """Each takes (hidden, weight, targets) and returns logprobs (the harness applies pg_loss),
    (logprobs, entropy), or a LinearPGLoss (the loss already applied). policy: pg_loss's inputs."""
    table = {
        "fastazr fused": lambda h, w, t: linear_pg_loss(h, w, t, *policy),
        "fastazr fused fp32": lambda h, w, t: linear_pg_loss(h, w, t, *policy, store="fp32-logits"),
        "fastazr fused exp16": lambda h, w, t: linear_pg_loss(h, w, t, *policy, store="fp16-exp"),
        "fastazr": lambda h, w, t: linear_logprobs(h, w, t),
        "fastazr +entropy": lambda h, w, t: linear_logprobs(h, w, t, return_entropy=True),
        "naive": naive,
        "torch.compile": torch.compile(naive, dynamic=False),
        "chunked torch": lambda h, w, t: linear_logprobs_chunked(h, w, t, chunk_bytes=512 << 20),
        "liger": liger,
        "cce": cce("auto"),
        "cce unfiltered": cce(None),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown --contenders {unknown}: choose from {', '.join(table)}")
    return {name: table[name] for name in names}


def policy_inputs(logprobs, gen):
    """Old logprobs near the new ones (ratios on both sides of the clip range), advantages, mask."""
    n = logprobs.shape[0]
    old = logprobs + 0.3 * torch.randn(n, device=logprobs.device, generator=gen)
    advantages = torch.randn(n, device=logprobs.device, generator=gen)
    mask = torch.rand(n, device=logprobs.device, generator=gen) > 0.2
    return old, advantages, mask


def reference(hidden, weight, targets, rows=4096):
    """fp32 logprobs and entropy, one row block at a time (full fp32 logits at N=64K are 40 GB)."""
    weight32 = weight.float()
    with torch.no_grad():
        parts = [linear_logprobs_reference(hidden[r:r + rows], weight32, targets[r:r + rows], 1.0, True)
                 for r in range(0, hidden.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def one_round(fn, hidden, weight, targets, policy):
    hidden.grad = weight.grad = None
    start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    out = fn(hidden, weight, targets)
    if isinstance(out, LinearPGLoss):
        loss = out.loss
    else:
        logprobs, entropy = out if isinstance(out, tuple) else (out, None)
        loss = pg_loss(logprobs, *policy, entropy=entropy, entropy_coef=0.0 if entropy is None else 0.01).loss
    middle.record()
    loss.backward()
    end.record()
    end.synchronize()
    return start.elapsed_time(middle), middle.elapsed_time(end), out


def measure(fn, hidden, weight, targets, policy, warmup, rounds):
    for _ in range(warmup):
        one_round(fn, hidden, weight, targets, policy)
    fwd, bwd = [], []
    for _ in range(rounds):
        f, b, _ = one_round(fn, hidden, weight, targets, policy)
        fwd.append(f)
        bwd.append(b)
    hidden.grad = weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _, _, out = one_round(fn, hidden, weight, targets, policy)
    extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    hidden.grad = weight.grad = None
    return median(fwd), median(bwd), extra, out


def embedded_inputs(count: int):
    """The embedded model's final-normed hidden states predicting `count` tokens of real text
    (see the module docstring), its lm_head and the targets."""
    from fastazr.model import load, pack
    model, tokenizer = load(device="cuda", dtype=torch.bfloat16)
    root = Path(__file__).resolve().parent.parent
    text = "\n\n".join(p.read_text() for p in sorted(root.glob("fastazr/**/*.py")) + sorted(root.glob("docs/*.md")))
    ids = tokenizer.encode(text)
    while len(ids) <= count:  # repeated if the sources are shorter than --tokens
        ids = ids + ids
    ids = ids[:count + 1]
    hidden, targets = [], []
    with torch.no_grad():
        for i in range(0, count, 2048):
            chunk = ids[i:i + 2049]
            p = pack([chunk[:-1]])
            hidden.append(model(p.input_ids.cuda(), p.position_ids.cuda(), p.cu_seqlens.cuda()))
            targets.append(torch.tensor(chunk[1:], device="cuda"))
    return torch.cat(hidden), model.lm_head_weight.detach().clone(), torch.cat(targets)


def peakedness(hidden, weight, targets, rows: int = 2048, block: int = 128) -> tuple[float, float]:
    """(mean top probability, share of block x block tiles of the backward's dLogits = softmax -
    onehot whose every entry is below 2^-12: what Cut Cross-Entropy's filter skips at bf16) over
    the first rows (whole blocks of them; the vocabulary's last partial block counts as a block)."""
    with torch.no_grad():
        rows = max(block, min(rows, hidden.shape[0]) // block * block)
        p = torch.softmax(hidden[:rows].float() @ weight.float().t(), dim=-1)
        top = p.max(dim=-1).values.mean().item()
        p[torch.arange(p.shape[0], device=p.device), targets[:rows]] -= 1.0
        vocab = p.shape[1]
        p = torch.nn.functional.pad(p.abs(), (0, -vocab % block))
        tiles = p.view(rows // block, block, -1, block).amax(dim=(1, 3))
        return top, (tiles < 2.0 ** -12).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="1536", help="comma-separated hidden sizes")
    parser.add_argument("--tokens", default="4096,16384,65536", help="comma-separated token counts N")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--contenders", default="fastazr fused,fastazr,fastazr +entropy,naive,torch.compile,"
                        "chunked torch,liger,cce,cce unfiltered", help="comma-separated; liger and cce need "
                        "liger-kernel and cut-cross-entropy installed")
    parser.add_argument("--inputs", choices=("random", "embedded"), default="random",
                        help="random bf16 tensors, or the embedded SmolLM2's hidden states over real text")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", help="write a torch.profiler trace of one round of each contender here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_logprob.py compares GPU kernels: run it on a CUDA machine (the device tool)")
    names = args.contenders.split(",")
    rows, results = [], []
    sizes = [int(n) for n in args.tokens.split(",")]
    real = embedded_inputs(max(sizes)) if args.inputs == "embedded" else None
    if real is not None:
        args.hidden, args.vocab = str(real[0].shape[1]), real[1].shape[0]
    peaks = []
    for h in map(int, args.hidden.split(",")):
        for n in sizes:
            gen = torch.Generator(device="cuda").manual_seed(0)
            if real is None:
                hidden = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_()
                weight = (torch.randn(args.vocab, h, device="cuda", generator=gen) * 3 / h ** 0.5).bfloat16()
                weight.requires_grad_()
                targets = torch.randint(0, args.vocab, (n,), device="cuda", generator=gen)
            else:
                hidden = real[0][:n].clone().requires_grad_()
                weight = real[1].clone().requires_grad_()
                targets = real[2][:n].clone()
            top, skippable = peakedness(hidden.detach(), weight.detach(), targets)
            peaks.append(f"H={h} N={n}: mean top probability {top:.3f}; {skippable:.3f} of 128 x 128 dLogits blocks "
                         "below 2^-12 (what Cut Cross-Entropy's filter skips)")
            ref_logprobs, ref_entropy = reference(hidden.detach(), weight.detach(), targets)
            policy = policy_inputs(ref_logprobs, gen)
            fns = contenders(names, policy)
            flop = 6 * n * h * args.vocab
            shape_rows = []
            for name, fn in fns.items():
                try:
                    fwd, bwd, extra, out = measure(fn, hidden, weight, targets, policy, args.warmup, args.rounds)
                except torch.cuda.OutOfMemoryError:
                    hidden.grad = weight.grad = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    shape_rows.append([h, n, name, "OOM", "", "", "", "", "", None])
                    results.append({"hidden": h, "tokens": n, "contender": name, "oom": True})
                    continue
                except ImportError as exc:
                    shape_rows.append([h, n, name, f"not installed ({exc.name})", "", "", "", "", "", None])
                    results.append({"hidden": h, "tokens": n, "contender": name, "missing": exc.name})
                    continue
                if isinstance(out, LinearPGLoss):  # its per-token entropy stays inside (the mean is a metric)
                    logprobs, entropy = out.logprobs, None
                else:
                    logprobs, entropy = out if isinstance(out, tuple) else (out, None)
                err = (logprobs.detach() - ref_logprobs).abs().max().item()
                ent_err = (entropy.detach() - ref_entropy).abs().max().item() if entropy is not None else None
                total = fwd + bwd
                shape_rows.append([h, n, name, f"{fwd:.2f}", f"{bwd:.2f}", f"{total:.2f}", f"{flop / total / 1e9:.0f}",
                                   f"{extra:.2f}", f"{err:.1e}" + (f" / {ent_err:.1e}" if ent_err is not None else ""),
                                   total])
                results.append({"hidden": h, "tokens": n, "contender": name, "forward_ms": fwd, "backward_ms": bwd,
                                 "total_ms": total, "tflops": flop / total / 1e9, "extra_gib": extra,
                                 "logprob_max_err": err, "entropy_max_err": ent_err})
                del out, logprobs, entropy
                gc.collect()
                torch.cuda.empty_cache()
            naive_ms = next((r[-1] for r in shape_rows if r[2] == "naive" and r[-1]), None)
            for row in shape_rows:
                row[-1] = f"{naive_ms / row[-1]:.2f}x" if naive_ms and row[-1] else ""
            rows += shape_rows
            if args.profile:
                with profiled(args.profile, f"bench_logprob_h{h}_n{n}") as label:
                    for name, fn in fns.items():
                        with label(name):
                            try:
                                one_round(fn, hidden, weight, targets, policy)
                            except ImportError:
                                pass
                            except torch.cuda.OutOfMemoryError:
                                hidden.grad = weight.grad = None
                                torch.cuda.empty_cache()
            del hidden, weight, targets, policy, fns, ref_logprobs, ref_entropy
            gc.collect()
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {machine()}; bf16, V={args.vocab}; "
          f"inputs: {args.inputs}")
    for line in peaks:
        print(line)
    print_table(["H", "N", "contender", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "extra GiB",
                 "max|err| logp / ent", "vs naive"], rows)
    json_line({"bench": "logprob", "device": torch.cuda.get_device_name(), "vocab": args.vocab, "inputs": args.inputs,
               "results": results})


if __name__ == "__main__":
    main()
