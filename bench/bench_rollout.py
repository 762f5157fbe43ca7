"""Rollout generation, side by side on one GPU: fastazr's embedded engine (fastazr.rollout.Engine)
vs Hugging Face transformers `generate`, on the same weights and the same requests.

    python bench/bench_rollout.py --device cuda
    python bench/bench_rollout.py --device cpu --workloads uniform,azr --model qwen2.5-0.5b --layers 2 \
        --batch 2 --prompt-len 16 --new-tokens 4 --azr-prompts 2 --azr-n 2 --azr-prompt-len 8,16 \
        --azr-new-tokens 2,6 --hf-batch 2 --hf-azr-seqs 2          # CPU smoke test
    python bench/bench_rollout.py --device cpu --workloads smollm2,selfplay --smollm2-batch 32 \
        --new-tokens 64                                             # the CPU rows (issue 21)

Workloads (--workloads, default all four), prompts of random token ids unless said otherwise:
- uniform: preset --model (qwen2.5-1.5b, random init, --layers overrides its depth), --batch 256
  prompts of --prompt-len 256 tokens, --new-tokens 256 each, temperature 1, EOS ignored.
- azr: an Absolute-Zero-like mix on the same model: --azr-prompts 64 x --azr-n 8 samples
  (Request n=8), prompt lengths uniform in 300..1500. A random-init model ends at random, so
  instead of waiting for EOS each request draws its own max_new_tokens uniform in 128..1024 and
  ignores EOS: a realistic spread of completion lengths. transformers cannot give the sequences
  of one generate() different lengths: it runs left-padded batches of --hf-batch 64 sequences to
  the batch's longest max_new_tokens and is credited only each sequence's own tokens. To stay
  bounded it runs only the first --hf-azr-seqs 64 sequences; its row says so, and its tokens/s,
  TTFT and bound are those of that subset.
- smollm2: the embedded SmolLM2-135M-Instruct (real GGUF weights and tokenizer), --smollm2-batch
  64 chat prompts (a few Python tasks repeated), --new-tokens 256, EOS ignored.
- selfplay: the shape of `python -m fastazr.train --preset cpu`'s generate calls, on the embedded
  SmolLM2: --selfplay-seqs 8 prompts of --selfplay-prompt-len 120..320 tokens, each drawing
  max_new_tokens in --selfplay-new-tokens 96..160, EOS ignored; transformers runs them as one
  left-padded batch to the longest (credited each sequence's own tokens, as in azr).

`--backend sglang` runs SGLang's offline engine instead of the embedded one, behind the same
interface (fastazr.rollout.SGLangBackend: token ids in and out, the model's weights pushed into it,
its prefix cache flushed before each timed run); it needs CUDA and `pip install "fastazr[sglang]"`.

On CUDA the engine runs four ways side by side: as configured (decode rounds of --decode-steps
passes, exact logprobs), with one pass per host round trip (decode_steps=1), with the split-K
decode kernel (exact_logprobs=False), and with sample_in_lm_head flipped (sampling inside the
lm_head GEMM's epilogue, or from the fp32 logits cuBLAS writes).

tokens/s = completion tokens / wall seconds of generate(). TTFT = wall seconds of the same
requests with max_new_tokens=1 (the whole batch's prefill). peak GiB = max allocated during
generate(); the engine's includes its KV pool, preallocated as --kv-fraction of free memory.
bound = the tokens/s that reading what each decode step needs at the measured device-to-device
copy bandwidth gives: per step every weight (an untied embedding table excepted: a step gathers
a few of its rows) plus the keys and values of each running sequence's context, at most
min(sequences, --max-num-seqs) sequences per step. "of bound" = tokens/s / bound; prefill time
counts against it. Each contender runs warm: the whole workload once, untimed, so compilation,
CUDA-graph capture and the caching allocator's growth stay out of the timings. transformers
needs that as much as the engine: its first full-length generate() of the uniform workload took
18.7 s on the H100, the next ones 6.3-6.9 (not profiled; its KV cache grows by concatenation
every step, which the caching allocator likely serves from new blocks only the first time).
Trees before this one warmed it with 2 new tokens and so timed it cold: 2,711-3,560 tokens/s
instead of ~9,800. The engine's prefix cache is dropped before every timed run, so prompts are
prefilled each time (the n samples of a prompt, and repeated prompts, still share within a
run). Each contender is timed over --rounds runs (default 3) and reports the median, the
min-max beside it.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common import json_line, machine, median, print_table, profiled
from fastazr.model import Decoder, Tokenizer, load, preset_config, save_hf
from fastazr.model.decoder import default_dtype
from fastazr.rollout import Engine, EngineConfig, Request, RolloutBackend, SamplingParams, SGLangBackend, SGLangConfig
from fastazr.rollout.sglang_config import SGLANG_VERSION

WORKLOADS = ("uniform", "azr", "smollm2", "selfplay")
EMBEDDED = "SmolLM2-135M-Instruct (embedded GGUF)"
TASKS = [
    "Write a Python function that returns the n-th Fibonacci number, then trace fib(7) step by step.",
    "Given f(x) = sorted(set(x))[::-1], what does f([3, 1, 3, 2]) return? Explain your reasoning.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Find an input list for which sum(v * i for i, v in enumerate(lst)) == 20, and show your work.",
]


@dataclass
class Workload:
    name: str
    label: str
    """The model, as the JSON line names it (the preset, or the embedded model)."""
    model: Decoder | None
    tokenizer: Tokenizer | None
    requests: list[Request]
    hf_batch: int
    hf_seqs: int

    def sequences(self) -> list[tuple[list[int], int]]:
        """(prompt ids, max_new_tokens) of every sample, in the engine's order."""
        return [(r.prompt_ids, r.params.max_new_tokens) for r in self.requests for _ in range(r.n)]


def timed(device: str, fn):
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def copy_bandwidth() -> float:
    """Device-to-device bytes/s of a 1 GiB copy_, read + write counted: the rate a decode step that
    only streams weights and KV could reach."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(11):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / median(times[1:])


def ideal_tokens_per_s(seqs: list[tuple[int, int]], model_bytes: int, kv_token_bytes: int, max_seqs: int,
                       bandwidth: float) -> float:
    """Completion tokens / the seconds it takes to read each decode step's bytes once; seqs are
    (prompt length, completion length)."""
    tokens = sum(m for _, m in seqs)
    steps = max(max(m for _, m in seqs), -(-tokens // min(len(seqs), max_seqs)))
    # the token at completion index t attends over p + t keys and values
    kv_tokens = sum(m * p + m * (m - 1) // 2 for p, m in seqs)
    return tokens * bandwidth / (steps * model_bytes + kv_tokens * kv_token_bytes)


def step_bytes(model: Decoder) -> tuple[int, int]:
    """(weight bytes one decode step reads, KV bytes per context token)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # untied: a step gathers a few embedding rows, the lm_head is read whole
        weights -= model.embed_tokens.numel() * model.embed_tokens.element_size()
    return weights, 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize


def preset_model(args, device: str) -> Decoder:
    """What load(preset) builds, with --layers applied to the preset's config first."""
    config = preset_config(args.model)
    if args.layers:
        config = replace(config, num_layers=args.layers)
    model = Decoder(config, device=device, dtype=default_dtype(device))
    model.init_weights(args.seed)
    return model


def build(name: str, args, device: str) -> Workload:
    g = torch.Generator().manual_seed(args.seed)  # one per workload: its requests never depend on --workloads
    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def prompt(model: Decoder, length: int) -> list[int]:
        return torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()

    if name == "uniform":
        model = preset_model(args, device)
        params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
        requests = [Request(prompt(model, args.prompt_len), params) for _ in range(args.batch)]
        return Workload(name, args.model, model, None, requests, args.batch, args.batch)
    if name == "azr":
        model = preset_model(args, device)
        (plo, phi), (nlo, nhi) = args.azr_prompt_len, args.azr_new_tokens
        requests = [Request(prompt(model, draw(plo, phi)), SamplingParams(
            temperature=1.0, max_new_tokens=draw(nlo, nhi), ignore_eos=True), n=args.azr_n)
            for _ in range(args.azr_prompts)]
        return Workload(name, args.model, model, None, requests, args.hf_batch,
                        min(args.hf_azr_seqs, args.azr_prompts * args.azr_n))
    if name == "selfplay":
        model, tokenizer = load(device=device, dtype=default_dtype(device))
        (plo, phi), (nlo, nhi) = args.selfplay_prompt_len, args.selfplay_new_tokens
        requests = [Request(prompt(model, draw(plo, phi)), SamplingParams(
            temperature=1.0, max_new_tokens=draw(nlo, nhi), ignore_eos=True)) for _ in range(args.selfplay_seqs)]
        return Workload(name, EMBEDDED, model, tokenizer, requests, args.selfplay_seqs, args.selfplay_seqs)
    model, tokenizer = load(device=device, dtype=default_dtype(device))
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    requests = [Request(tokenizer.encode_chat([{"role": "user", "content": TASKS[i % len(TASKS)]}]), params)
                for i in range(args.smollm2_batch)]
    return Workload(name, EMBEDDED, model, tokenizer, requests, args.smollm2_batch, args.smollm2_batch)


def engine_config(args) -> EngineConfig:
    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   kv_memory_fraction=args.kv_fraction, decode_steps=args.decode_steps)
    if args.no_graphs:
        if "cuda_graphs" in EngineConfig.__dataclass_fields__:
            options["cuda_graphs"] = False
        else:
            print("--no-graphs ignored: this engine's EngineConfig has no cuda_graphs field")
    return EngineConfig(**options)


def with_new_tokens(requests: list[Request], new_tokens: int) -> list[Request]:
    return [Request(r.prompt_ids, replace(r.params, max_new_tokens=new_tokens), r.n) for r in requests]


def run_engine(w: Workload, config: EngineConfig, args, device: str, label: str = "fastazr engine") -> dict:
    engine = Engine(w.model, w.tokenizer, config, seed=args.seed)
    result = run_backend(w, engine, args, device, label)
    result.update(stats=dict(engine.stats), kv_cache_gib=engine.cache.bytes / 2**30)
    engine.release_memory()
    return result


def run_sglang(w: Workload, args, device: str) -> dict:
    """SGLang's offline engine behind the same interface (fastazr.rollout.SGLangBackend): its weights
    pushed from the model, its KV pool --kv-fraction of the free memory (mem_fraction_static), at
    most --max-num-seqs sequences at once. Its peak memory is its own process's: not measured here."""
    if not device.startswith("cuda"):
        raise SystemExit("--backend sglang runs on a CUDA GPU: pass --device cuda")
    backend = SGLangBackend(w.model, w.tokenizer, SGLangConfig(mem_fraction_static=args.kv_fraction,
                                                               max_running_requests=args.max_num_seqs), seed=args.seed)
    try:
        result = run_backend(w, backend, args, device, f"SGLang {SGLANG_VERSION} (SGLangBackend)")
        result.update(stats=dict(backend.stats), peak_gib=None)
    finally:
        backend.close()
    return result


def run_backend(w: Workload, engine: RolloutBackend, args, device: str, label: str) -> dict:
    """The workload on a rollout backend: warm-up, TTFT, then --rounds timed runs (median)."""

    def go(requests):
        # drops the prefix cache (SGLang's: the weights pushed again, flush with the last bucket):
        # otherwise a repeat run skips its prefill
        engine.weights_updated()
        return timed(device, lambda: engine.generate(requests))

    # The whole workload once, untimed: EOS is ignored, so the timed run meets the same batch
    # shapes, and each was met here first (Triton compiles a kernel per new specialization, ~1 s;
    # a graph is captured per new decode batch size). A shorter warm-up left a compile in the
    # timed run on a fresh machine: 11.7K instead of 49K tokens/s on the uniform workload.
    go(w.requests)
    ttft = median([go(with_new_tokens(w.requests, 1))[0] for _ in range(args.rounds)])
    free(device)
    seconds = []
    # one trace per contender: the engine runs up to four ways per workload
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    with profiled(args.profile, f"bench_rollout_{w.name}_{slug}") as mark:
        for i in range(args.rounds):
            with mark(f"fastazr round {i}"):
                s, out = go(w.requests)
            seconds.append(s)
    lengths = [(len(c.prompt_ids), len(c.completion_ids)) for group in out for c in group]
    return dict(contender=label, lengths=lengths, tokens=sum(n for _, n in lengths),
                seconds=median(seconds), round_seconds=seconds, ttft_s=ttft, peak_gib=peak_gib(device))


def run_hf(w: Workload, directory: Path, dtype: torch.dtype, args, device: str) -> dict:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("transformers is not installed: pip install it or pass --skip-hf") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device)
    seqs = w.sequences()
    subset = seqs[:w.hf_seqs]
    batches = [subset[i:i + w.hf_batch] for i in range(0, len(subset), w.hf_batch)]

    def go(batches, new_tokens=None) -> float:
        total = 0.0
        for batch in batches:
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
            m = new_tokens or max(n for _, n in batch)
            # min_new_tokens is HF's ignore_eos: EOS is masked, so every sequence runs m tokens;
            # top_k=0 turns off generate's default top-k 50, so both sample the full softmax
            s, _ = timed(device, lambda: hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=m, min_new_tokens=m, pad_token_id=0))
            total += s
        return total

    # the whole workload once, untimed, as the engine gets (cold: 18.7 s against 6.5 warm, H100)
    go(batches)
    ttft = median([go(batches, new_tokens=1) for _ in range(args.rounds)])
    free(device)
    with profiled(args.profile, f"bench_rollout_{w.name}_transformers") as mark:
        seconds = []
        for i in range(args.rounds):
            with mark(f"transformers round {i}"):
                seconds.append(go(batches))
    label = "transformers generate"
    if len(subset) < len(seqs):
        label += f" (first {len(subset)} of {len(seqs)} seqs)"
    # credited only each sequence's own max_new_tokens, not its batch's padding to the longest
    lengths = [(len(p), n) for p, n in subset]
    return dict(contender=label, lengths=lengths, tokens=sum(n for _, n in lengths), seconds=median(seconds),
                round_seconds=seconds, ttft_s=ttft, peak_gib=peak_gib(device))


def measure(w: Workload, config: EngineConfig, bandwidth: float | None, workdir: Path, args, device: str) -> list:
    model_bytes, kv_token_bytes = step_bytes(w.model)
    c, seqs, dtype = w.model.config, w.sequences(), w.model.dtype
    print(f"{w.name}: {c.architecture} {c.num_parameters() / 1e9:.2f}B params, {c.num_layers} layers, {dtype}, "
          f"{len(w.requests)} requests = {len(seqs)} sequences, prompts {min(len(p) for p, _ in seqs)}.."
          f"{max(len(p) for p, _ in seqs)} tokens, new tokens {min(n for _, n in seqs)}..{max(n for _, n in seqs)}")
    if not args.skip_hf:
        save_hf(w.model, workdir / w.name)
    if args.backend == "sglang":
        runs = [run_sglang(w, args, device)]
    else:
        runs = engine_runs(w, config, args, device)
    w.model = None  # transformers' peak memory must not include fastazr's copy of the weights
    free(device)
    if not args.skip_hf:
        runs.append(run_hf(w, workdir / w.name, dtype, args, device))
        free(device)
    hf_rate = None if args.skip_hf else runs[-1]["tokens"] / runs[-1]["seconds"]
    for run in runs:
        run["model"] = w.label
        lengths = run.pop("lengths")
        run["tokens_per_s"] = run["tokens"] / run["seconds"]
        if bandwidth:
            run["ideal_tokens_per_s"] = ideal_tokens_per_s(lengths, model_bytes, kv_token_bytes, args.max_num_seqs,
                                                           bandwidth)
            run["fraction_of_bound"] = run["tokens_per_s"] / run["ideal_tokens_per_s"]
        run["speedup_vs_hf"] = hf_rate and run["tokens_per_s"] / hf_rate
    return runs


def engine_runs(w: Workload, config: EngineConfig, args, device: str) -> list:
    runs = [run_engine(w, config, args, device)]
    if device == "cuda" and config.decode_steps > 1:
        # what decode rounds buy: the host's bookkeeping once per token instead of per round
        runs.append(run_engine(w, replace(config, decode_steps=1), args, device,
                               label="fastazr engine, decode_steps=1"))
    if device == "cuda" and config.exact_logprobs:
        # what exact logprobs cost: the split-K decode kernel, whose rounding is not the trainer's
        runs.append(run_engine(w, replace(config, exact_logprobs=False), args, device,
                               label="fastazr engine, split-K decode (inexact logprobs)"))
    if device == "cuda":
        # what sampling inside the lm_head GEMM buys, against cuBLAS's fp32 logits and the sampler over them
        other = not config.sample_in_lm_head
        runs.append(run_engine(w, replace(config, sample_in_lm_head=other), args, device,
                               label=f"fastazr engine, sample_in_lm_head={other}"))
    return runs


def int_pair(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--backend", choices=("embedded", "sglang"), default="embedded",
                        help="embedded: fastazr's engine, four ways on CUDA; sglang: SGLang's offline engine "
                             '(fastazr.rollout.SGLangBackend, pip install "fastazr[sglang]")')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="qwen2.5-1.5b", help="preset of the uniform and azr workloads")
    parser.add_argument("--layers", type=int, help="override the preset's num_layers (fast CPU smoke tests)")
    parser.add_argument("--batch", type=int, default=256, help="uniform: prompts")
    parser.add_argument("--prompt-len", type=int, default=256, help="uniform: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="uniform and smollm2: new tokens")
    parser.add_argument("--azr-prompts", type=int, default=64)
    parser.add_argument("--azr-n", type=int, default=8, help="azr: samples per prompt (Request.n)")
    parser.add_argument("--azr-prompt-len", type=int_pair, default=(300, 1500), help="azr: LO,HI prompt tokens")
    parser.add_argument("--azr-new-tokens", type=int_pair, default=(128, 1024), help="azr: LO,HI max_new_tokens")
    parser.add_argument("--smollm2-batch", type=int, default=64)
    parser.add_argument("--selfplay-seqs", type=int, default=8)
    parser.add_argument("--selfplay-prompt-len", type=int_pair, default=(120, 320),
                        help="selfplay: LO,HI prompt tokens")
    parser.add_argument("--selfplay-new-tokens", type=int_pair, default=(96, 160),
                        help="selfplay: LO,HI max_new_tokens")
    parser.add_argument("--skip-hf", action="store_true", help="run the engine only")
    parser.add_argument("--hf-batch", type=int, default=64, help="azr: sequences per transformers generate()")
    parser.add_argument("--hf-azr-seqs", type=int, default=64, help="azr: transformers runs the first N sequences")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps,
                        help="forward passes per host round trip in decode-only steps")
    parser.add_argument("--kv-fraction", type=float, default=EngineConfig.kv_memory_fraction,
                        help="share of free GPU memory the engine's KV cache takes")
    parser.add_argument("--no-graphs", action="store_true", help="EngineConfig(cuda_graphs=False), if it exists")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per contender (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="write a torch.profiler trace of each measured generate here")
    args = parser.parse_args()
    names = args.workloads.split(",")
    if unknown := set(names) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    device = args.device
    cuda = device.startswith("cuda")
    config = engine_config(args)

    gpu = torch.cuda.get_device_name() if cuda else "none"
    bandwidth = copy_bandwidth() if cuda else None
    free(device)
    print(f"machine: {machine()}; GPU: {gpu}; torch {torch.__version__}")
    print(f"copy bandwidth: {cell(bandwidth / 1e9 if bandwidth else None, '.0f')} GB/s (device-to-device copy_, "
          "read + write, median of 10)")
    rows, results = [], []
    workdir = Path(tempfile.mkdtemp(prefix="fastazr-bench-rollout-"))
    try:
        for name in names:
            runs = measure(build(name, args, device), config, bandwidth, workdir, args, device)
            for run in runs:
                results.append(dict(workload=name, **run))
                slowest, fastest = max(run["round_seconds"]), min(run["round_seconds"])
                spread = f"{run['tokens'] / slowest:.0f}-{run['tokens'] / fastest:.0f}"
                rows.append([name, run["contender"], run["tokens"], f"{run['seconds']:.2f}",
                             f"{run['tokens_per_s']:.0f}", spread, f"{run['ttft_s']:.3f}", cell(run["peak_gib"], ".1f"),
                             cell(run.get("ideal_tokens_per_s"), ".0f"), cell(run.get("fraction_of_bound"), ".2g"),
                             cell(run["speedup_vs_hf"], ".2f")])
            if args.skip_hf:
                rows.append([name, "transformers generate", "skipped"] + ["-"] * 8)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(["workload", "contender", "new tokens", "gen s", "tokens/s", "rounds min-max", "TTFT s", "peak GiB",
                 "bound tok/s", "of bound", "vs HF"], rows)
    json_line({"bench": "rollout", "backend": args.backend, "device": device, "gpu": gpu, "copy_bytes_per_s": bandwidth,
               "preset": args.model, "layers": args.layers, "engine_config": asdict(config), "rounds": args.rounds,
               "results": results})


if __name__ == "__main__":
    main()
