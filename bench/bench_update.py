"""The policy update and the optimizer-state swap on one GPU, side by side.

    python bench/bench_update.py --models qwen2.5-1.5b,qwen2.5-3b

Per model (random init, bf16 compute, fp32 master weights and AdamW state):

- update: fastazr.update.PolicyUpdate on AZR-like rollouts (prompts 300-1500 tokens, completions
  128-1024) packed into --micro-tokens micro-batches, one optimizer step per update: with the
  fused policy loss (UpdateConfig.policy_loss='fused'), with the two-kernel one ('composable';
  the default 'auto' picks between them by hidden size), the fused one with activation
  checkpointing; against the same update with the logits materialized
  (F.linear + log_softmax in fp32, what a plain torch trainer does). Training tokens/s (prompt +
  completion tokens), MFU and peak memory. MFU counts the model FLOPs the update needs: 6 x the
  matmul parameters per token (the lm_head only on the scored completion tokens), plus causal
  attention (6 s^2 x q_size per layer and sequence of s tokens), over --peak-tflops (989 TFLOP/s,
  H100 SXM dense bf16); activation checkpointing's recompute is not counted.
- push (--push, needs `pip install "fastazr[sglang]"`): the weight push into SGLang
  (fastazr.rollout.SGLangBackend: HF-named tensors in flat buckets of --push-buckets bytes, one
  update_weights_from_tensor call each over CUDA IPC), as seconds per GB of weights: into a
  resident engine (KV cache in place), and inside the colocated cycle (resume weights, push,
  resume KV cache and graphs), each timed from the trainer's side.
- swap: MasterOptimizer.offload / onload of the master and both Adam moments (pinned host buffers,
  side stream; the first offload, which pins the buffers, is timed apart) against a plain `.cpu()` / `.to(device)` of the same tensors (pageable memory: the
  pattern some colocated trainers use), each as GB/s and as a fraction of the pinned bandwidth of
  one large copy measured in the same run.

Medians over --rounds after one warm-up. A table, then one JSON line."""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from common import json_line, machine, median, print_table, profiled
from fastazr.model import Decoder, preset_config
from fastazr.rollout import SGLangBackend, SGLangConfig
from fastazr.update import PolicyUpdate, Rollout, UpdateConfig


class MaterializedLogits(PolicyUpdate):
    """The same update with the logits tensor [N, V] built in fp32, as a plain trainer does."""

    def _logprobs(self, batch):
        logits = F.linear(self._hidden(batch), self.model.lm_head_weight).float() / self.config.temperature
        return logits.log_softmax(-1).gather(-1, batch.targets[:, None]).squeeze(-1), None


def make_rollouts(vocab: int, tokens: int, seed: int) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    rollouts, total = [], 0
    while total < tokens:
        p, c = int(torch.randint(300, 1501, (), generator=g)), int(torch.randint(128, 1025, (), generator=g))
        completion = torch.randint(0, vocab, (c,), generator=g).tolist()
        # old logprobs near the random model's (~ -log V), so ratios sit around 1 and some clip
        old = (torch.randn(c, generator=g) * 0.1 - torch.log(torch.tensor(float(vocab)))).tolist()
        rollouts.append(Rollout(torch.randint(0, vocab, (p,), generator=g).tolist(), completion,
                                float(torch.randn((), generator=g)), old))
        total += p + c
    return rollouts


def update_flops(model: Decoder, rollouts: list[Rollout]) -> float:
    c = model.config
    embedding = c.vocab_size * c.hidden_size
    body = c.num_parameters() - embedding * (1 if c.tie_word_embeddings else 2)  # the layers' matmuls (+ norms)
    tokens = sum(r.num_tokens for r in rollouts)
    scored = sum(len(r.completion_ids) for r in rollouts)
    attention = sum(6 * r.num_tokens ** 2 * c.q_size * c.num_layers for r in rollouts)
    return 6 * body * tokens + 6 * embedding * scored + attention


def sync() -> None:
    torch.cuda.synchronize()


def run_update(label: str, model: Decoder, rollouts, config: UpdateConfig, cls, flops: float, args, mark) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    update = cls(model, config)
    try:
        update(rollouts)  # warm-up: Triton compiles, the allocator settles, Adam's state appears
        sync()
        torch.cuda.reset_peak_memory_stats()
        seconds = []
        for i in range(args.rounds):
            sync()
            start = time.perf_counter()
            with mark(f"{label} round {i}"):
                metrics = update(rollouts)
            sync()
            seconds.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return dict(contender=label, oom=True)
    s = median(seconds)
    tokens = metrics["tokens"]
    row = dict(contender=label, seconds=s, tokens=tokens, tokens_per_s=tokens / s,
               tflops=flops / s / 1e12, mfu=flops / s / (args.peak_tflops * 1e12),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, micro_batches=metrics["micro_batches"],
               loss=metrics["loss"], oom=False)
    return row


def pinned_bandwidth(nbytes: int) -> tuple[float, float]:
    """(device-to-host, host-to-device) bytes/s of one large pinned copy, median of 5."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for dst, src in ((host, device), (device, host)):
        times = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            sync()
            times.append(time.perf_counter() - start)
        rates.append(nbytes / median(times))
    return rates[0], rates[1]


def run_swap(model: Decoder, rollouts, config: UpdateConfig, args, mark) -> list[dict]:
    gc.collect()
    torch.cuda.empty_cache()
    update = PolicyUpdate(model, replace(config, activation_checkpointing=True))
    update(rollouts[:2])  # creates Adam's moments
    optimizer = update.optimizer
    state = optimizer._state_tensors()
    nbytes = sum(t.numel() * t.element_size() for t in state)
    sync()
    start = time.perf_counter()
    optimizer.offload()  # the first one pins its host buffers (cudaHostAlloc): once per run
    first_out = time.perf_counter() - start
    optimizer.onload()
    optimizer.wait_onloaded()
    outs, ins = [], []
    for i in range(args.rounds):
        sync()
        start = time.perf_counter()
        with mark(f"offload round {i}"):
            optimizer.offload()
        outs.append(time.perf_counter() - start)
        start = time.perf_counter()
        with mark(f"onload round {i}"):
            optimizer.onload()
            optimizer.wait_onloaded()
            sync()
        ins.append(time.perf_counter() - start)
    plain_out, plain_in = [], []
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        host = [t.cpu() for t in state]
        plain_out.append(time.perf_counter() - start)
        start = time.perf_counter()
        for t, h in zip(state, host):
            t.copy_(h.to("cuda"))
        sync()
        plain_in.append(time.perf_counter() - start)
        del host
    del update, optimizer, state
    return [dict(contender="MasterOptimizer.offload / onload (pinned, side stream)", bytes=nbytes,
                 out_s=median(outs), in_s=median(ins), first_out_s=first_out),
            dict(contender="tensor.cpu() / .to(device) (pageable)", bytes=nbytes,
                 out_s=median(plain_out), in_s=median(plain_in))]


def seconds(mark, label: str, *calls) -> float:
    """Wall seconds of the calls in order, the GPU idle before and after."""
    sync()
    start = time.perf_counter()
    with mark(label):
        for call in calls:
            call()
        sync()
    return time.perf_counter() - start


def run_push(model: Decoder, bucket_bytes: list[int], args, mark) -> list[dict]:
    """Seconds per GB of the weight push into SGLang, per bucket size: pushed into the resident
    engine, and as the colocated cycle's release -> resume weights -> push -> resume KV."""
    gc.collect()
    torch.cuda.empty_cache()
    backend = SGLangBackend(model, None, SGLangConfig(mem_fraction_static=args.push_memory_fraction), seed=args.seed)
    rows = []
    try:
        backend.resume_memory()  # starts SGLang
        backend.weights_updated()
        for size in bucket_bytes:
            backend.config = replace(backend.config, bucket_bytes=size)
            resident, cycle = [], []
            for i in range(args.rounds):
                resident.append(seconds(mark, f"push {size} round {i}", backend.weights_updated))
                backend.release_memory()
                cycle.append(seconds(mark, f"resume + push {size} round {i}", backend.resume_memory,
                                     backend.weights_updated))
            gb = backend.stats["push_bytes"] / 1e9
            rows.append(dict(bucket_bytes=size, bytes=backend.stats["push_bytes"], buckets=backend.stats["buckets"],
                             push_s_per_gb=median(resident) / gb, cycle_s_per_gb=median(cycle) / gb,
                             residual_gib=backend.stats["residual_bytes"] / 2**30))
    finally:
        backend.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-1.5b,qwen2.5-3b", help="comma-separated presets")
    parser.add_argument("--micro-tokens", type=int, default=16384, help="UpdateConfig.micro_batch_tokens")
    parser.add_argument("--update-tokens", type=int, default=65536, help="tokens of rollouts per update")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="the GPU's dense bf16 peak (H100 SXM)")
    parser.add_argument("--skip-plain", action="store_true", help="skip the materialized-logits contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="write torch.profiler traces of the measured regions here")
    parser.add_argument("--push", action="store_true", help="also time the weight push into SGLang (needs sglang)")
    parser.add_argument("--push-buckets", default="134217728,536870912,2147483648",
                        help="comma-separated bucket sizes in bytes for --push")
    parser.add_argument("--push-memory-fraction", type=float, default=0.5,
                        help="SGLang's mem_fraction_static for --push (its KV pool is not used)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_update.py measures the GPU: run it on a CUDA machine (the device tool)")

    gpu = torch.cuda.get_device_name()
    d2h, h2d = pinned_bandwidth(2 << 30)
    print(f"machine: {machine()}; GPU: {gpu}; torch {torch.__version__}")
    print(f"pinned copy bandwidth (2 GiB, median of 5): device-to-host {d2h / 1e9:.1f} GB/s, "
          f"host-to-device {h2d / 1e9:.1f} GB/s")
    update_rows, swap_rows, push_rows, results = [], [], [], []
    for name in args.models.split(","):
        config = preset_config(name)
        model = Decoder(config, device="cuda", dtype=torch.bfloat16)
        model.init_weights(args.seed)
        rollouts = make_rollouts(config.vocab_size, args.update_tokens, args.seed)
        flops = update_flops(model, rollouts)
        base = UpdateConfig(micro_batch_tokens=args.micro_tokens)
        fused = replace(base, policy_loss="fused")
        # MaterializedLogits replaces the composable path's logprobs: it must take that path
        composable = replace(base, policy_loss="composable")
        contenders = [("fused loss", fused, PolicyUpdate),
                      ("two-kernel loss", composable, PolicyUpdate),
                      ("fused loss + checkpointing", replace(fused, activation_checkpointing=True), PolicyUpdate)]
        if not args.skip_plain:
            contenders.append(("materialized logits", composable, MaterializedLogits))
        with profiled(args.profile, f"bench_update_{name}") as mark:
            for label, update_config, cls in contenders:
                row = run_update(label, model, rollouts, update_config, cls, flops, args, mark)
                results.append(dict(model=name, kind="update", **row))
                update_rows.append([name, label, "OOM"] + ["-"] * 5 if row["oom"] else
                                   [name, label, row["tokens"], f"{row['seconds']:.2f}", f"{row['tokens_per_s']:.0f}",
                                    f"{row['tflops']:.0f}", f"{row['mfu']:.3f}", f"{row['peak_gib']:.1f}"])
            for row in run_swap(model, rollouts, base, args, mark):
                out_rate, in_rate = row["bytes"] / row["out_s"], row["bytes"] / row["in_s"]
                row.update(out_gb_s=out_rate / 1e9, in_gb_s=in_rate / 1e9, out_of_pinned=out_rate / d2h,
                           in_of_pinned=in_rate / h2d)
                results.append(dict(model=name, kind="swap", **row))
                swap_rows.append([name, row["contender"], f"{row['bytes'] / 2**30:.1f}", f"{row['out_s']:.3f}",
                                  f"{row['out_gb_s']:.1f}", f"{row['out_of_pinned']:.2f}", f"{row['in_s']:.3f}",
                                  f"{row['in_gb_s']:.1f}", f"{row['in_of_pinned']:.2f}"])
            if args.push:
                for row in run_push(model, [int(b) for b in args.push_buckets.split(",")], args, mark):
                    results.append(dict(model=name, kind="push", **row))
                    push_rows.append([name, f"{row['bucket_bytes'] / 2**20:.0f}", row["buckets"],
                                      f"{row['bytes'] / 1e9:.2f}", f"{row['push_s_per_gb']:.3f}",
                                      f"{row['cycle_s_per_gb']:.3f}", f"{row['residual_gib']:.2f}"])
        del model
    print(f"update: {args.update_tokens} tokens of rollouts per update, micro-batches of {args.micro_tokens} tokens, "
          f"one optimizer step, median of {args.rounds}")
    print_table(["model", "contender", "tokens", "s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"], update_rows)
    print_table(["model", "swap", "GiB", "out s", "out GB/s", "of pinned", "in s", "in GB/s", "of pinned"],
                swap_rows)
    if push_rows:
        print("push: the trainer's weights into SGLang (update_weights_from_tensor, flattened buckets over CUDA IPC); "
              "resident = KV cache in place, cycle = resume weights + push + resume KV cache and graphs")
        print_table(["model", "bucket MiB", "buckets", "GB", "resident s/GB", "cycle s/GB", "residual GiB"],
                    push_rows)
    for row in results:
        if "first_out_s" in row:
            print(f"{row['model']}: the first offload, pinning {row['bytes'] / 2**30:.1f} GiB of host buffers, "
                  f"took {row['first_out_s']:.2f} s")
    json_line({"bench": "update", "gpu": gpu, "pinned_d2h_bytes_per_s": d2h, "pinned_h2d_bytes_per_s": h2d,
               "micro_tokens": args.micro_tokens, "update_tokens": args.update_tokens, "rounds": args.rounds,
               "peak_tflops": args.peak_tflops, "results": results})


if __name__ == "__main__":
    main()
