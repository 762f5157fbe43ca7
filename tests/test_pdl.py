"""Programmatic dependent launch (kernels/runtime.py): where it is on, and that every kernel
launched with it waits for the kernel before it before touching memory.

A kernel launched with launch_pdl may start while its predecessor in the stream is still
draining; only its griddepcontrol.wait (runtime.await_previous) orders its loads and stores after
the predecessor's writes. A race there would show only now and then, so the GPU test reads the
compiled PTX instead: in every kernel the engine compiled with launch_pdl, the wait comes before
the first global load, store, atomic or asynchronous copy."""
import re
from dataclasses import replace

import pytest
import torch
import triton

from fastazr.kernels import decode_advance, decode_linear, layer_fusions, paged_attention, runtime, sampling
from fastazr.kernels import swiglu_linear


def test_never_on_cpu_tensors():
    assert not runtime.pdl(torch.zeros(1))


# global memory in PTX: loads, stores, atomics, reductions, asynchronous and bulk tensor copies
_MEMORY = re.compile(r"\b(ld\.global|st\.global|atom\.global|red\.global|cp\.async)")


def _compiled(module) -> list[tuple[str, object]]:
    device = torch.cuda.current_device()
    out = []
    for name, fn in vars(module).items():
        if isinstance(fn, triton.runtime.jit.JITFunction) and device in fn.device_caches:
            out += [(name, kernel) for kernel in fn.device_caches[device][0].values() if hasattr(kernel, "asm")]
    return out


@pytest.mark.gpu
def test_gpu_every_pdl_kernel_waits_before_it_touches_memory():
    from fastazr.model import Decoder, preset_config
    from fastazr.rollout import Engine, EngineConfig, Request, SamplingParams

    assert runtime.pdl(torch.zeros(1, device="cuda")), "the GPU tests run on Hopper with FASTAZR_PDL unset"
    # SmolLM2's shapes: its projections take decode_linear, its gate_up swiglu_linear
    model = Decoder(replace(preset_config("smollm2-135m"), num_layers=2), device="cuda", dtype=torch.bfloat16)
    model.init_weights(0)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=5)
    requests = [Request(torch.randint(0, 49152, (n,), generator=g).tolist(), params, n=2) for n in (7, 700, 40)]
    # the prefill kernel's decode tiles and sampling in the lm_head, then the split-K decode
    # kernel and the sampler over written logits (gumbel_sample)
    for exact in (True, False):
        config = EngineConfig(kv_cache_bytes=1 << 28, exact_logprobs=exact, sample_in_lm_head=exact)
        engine = Engine(model, None, config)
        engine.generate(requests)
        engine.release_memory()
    seen = set()
    for module in (layer_fusions, paged_attention, sampling, decode_advance, swiglu_linear, decode_linear):
        for name, kernel in _compiled(module):
            if not kernel.metadata.launch_pdl:
                continue
            seen.add(name)
            ptx = kernel.asm["ptx"]
            body = ptx[ptx.index(".entry"):]
            wait = body.find("griddepcontrol.wait")
            first = _MEMORY.search(body)
            assert wait >= 0, f"{name} is launched with PDL but never waits"
            assert first is None or wait < first.start(), f"{name} touches memory ({first.group(0)}) before its wait"
    want = {"_add_rms_norm_kernel", "_rope_to_cache_kernel", "_prefill_kernel", "_decode_kernel", "_sample_kernel",
            "_linear_sample_kernel", "_linear_merge_kernel", "_advance_kernel", "_swiglu_linear_kernel",
            "_linear_kernel"}
    assert want <= seen, f"not compiled with PDL: {sorted(want - seen)}"
