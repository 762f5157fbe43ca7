"""Model loading, side by side: fastazr's load_hf vs transformers' from_pretrained on the same
checkpoint directory, plus random initialization of a preset and saving.

    python bench/bench_load.py --model qwen2.5-1.5b --device cuda

The checkpoint is written first, so loads read it from the page cache (the case of every load
after the first); the rate column is checkpoint bytes / seconds."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import json_line, machine, median, print_table, profiled
from fastazr.model import load, load_hf, save_hf


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def transformers_load(directory: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a preset name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", help="write a torch.profiler trace of the measured loads here")
    args = parser.parse_args()
    device = args.device
    workdir = Path(tempfile.mkdtemp(prefix="fastazr-bench-load-"))
    try:
        init_s, (model, _tokenizer) = timed(device, lambda: load(args.model, device=device, dtype=torch.bfloat16))
        save_s, _ = timed(device, lambda: save_hf(model, workdir / "ckpt"))
        nbytes = sum(p.stat().st_size for p in (workdir / "ckpt").glob("*.safetensors"))
        params = model.config.num_parameters()
        model = None  # frees its GPU memory before the loads are measured
        contenders = {"fastazr load_hf": lambda: load_hf(workdir / "ckpt", device, torch.bfloat16)}
        if not args.skip_transformers:
            contenders["transformers from_pretrained"] = lambda: transformers_load(workdir / "ckpt", device)
        times = {name: [] for name in contenders}
        with profiled(args.profile, "bench_load") as mark:
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    with mark(name):
                        seconds, loaded = timed(device, fn)
                    times[name].append(seconds)
                    del loaded
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "none"
    print(f"machine: {machine()}; GPU: {gpu}; torch {torch.__version__}")
    print(f"{args.model}: {params / 1e9:.2f}B parameters, bf16 checkpoint {nbytes / 2**30:.2f} GiB, "
          f"device {device}, {args.rounds} rounds (median)")
    rows = [["fastazr random init (preset)", f"{init_s:.2f}", "", ""],
            ["fastazr save_hf", f"{save_s:.2f}", f"{nbytes / save_s / 1e9:.2f}", ""]]
    base = median(times["fastazr load_hf"])
    for name, values in times.items():
        m = median(values)
        rows.append([name, f"{m:.2f}", f"{nbytes / m / 1e9:.2f}", f"{m / base:.2f}x"])
    print_table(["step", "seconds", "GB/s", "vs fastazr load"], rows)
    json_line({"bench": "load", "model": args.model, "device": device, "gpu": gpu, "checkpoint_bytes": nbytes,
               "init_s": init_s, "save_s": save_s, **{f"{k} s": median(v) for k, v in times.items()}})


if __name__ == "__main__":
    main()
